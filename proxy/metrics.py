"""Prometheus metrics (DESIGN §9) and the HTTP endpoints ``/metrics``, ``/healthz``, ``/readyz``.

The hot path only bumps plain integers on the event loop's thread; a custom collector turns them
into metric families when Prometheus scrapes.  prometheus-client's own metric objects take a lock
per update, and a proxied command touched about nine of them: measurably a fifth of the proxy's
per-command CPU.  A scrape may read a counter a moment before an update lands; Prometheus
semantics tolerate that, and every value only ever grows.

The HTTP server runs in its own thread so a scrape never adds latency to the event loop, and so
``/healthz`` can notice a stuck loop: the loop stamps a heartbeat every second and ``/healthz``
answers 503 when the stamp is stale.  ``/readyz`` is 200 only while every route's upstream is
negotiated.

Label values are bounded: ``command`` and ``event`` are kept only when the probed schema names
them, else ``other``; every other label has a fixed set of values.
"""

from __future__ import annotations

import bisect
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import prometheus_client
from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

VERSION = "0.1.0"
HEALTH_STALE_S = 5.0

DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                    5.0, 10.0, 30.0)  # fmt: skip
LANE_WAIT_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0)
CONNECT_RESULTS = ("ok", "refused", "no_greeting", "error")
DISCONNECT_REASONS = ("eof", "reset", "slow", "limit", "upstream_lost", "shutdown")
PROTOCOL_ERROR_KINDS = ("parse", "not_object", "member", "limit")
RESTORE_OUTCOMES = ("ok", "failed")


class Histogram:
    """Cumulative-on-export bucket counts, a sum and a count: what Prometheus needs, no lock."""

    __slots__ = ("bounds", "counts", "n", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0
        self.n = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value
        self.n += 1

    def observe_zero(self) -> None:
        """A zero: no search (the commonest lane wait, of a command that never queued)."""
        self.counts[0] += 1
        self.n += 1

    def buckets(self) -> list[tuple[str, int]]:
        out = []
        running = 0
        for bound, count in zip(self.bounds, self.counts, strict=False):
            running += count
            out.append((repr(bound), running))
        out.append(("+Inf", self.n))
        return out


class RouteMetrics:
    """One route's numbers, updated on the event loop's thread only."""

    def __init__(self, vm: str) -> None:
        self.vm = vm
        self.commands_known: frozenset[str] = frozenset()
        self.events_known: frozenset[str] = frozenset()
        self.info: tuple[str, str] | None = None  # (qemu_version, mode)
        self.up = 0
        self.sessions = 0
        self.connections = 0
        self.client_in = self.client_out = self.upstream_in = self.upstream_out = 0
        self.duration = Histogram(DURATION_BUCKETS)
        self.lane_wait = Histogram(LANE_WAIT_BUCKETS)
        self.connects = dict.fromkeys(CONNECT_RESULTS, 0)
        self.disconnects = dict.fromkeys(DISCONNECT_REASONS, 0)
        self.protocol_errors = dict.fromkeys(PROTOCOL_ERROR_KINDS, 0)
        self.restores = dict.fromkeys(RESTORE_OUTCOMES, 0)
        self.commands: dict[tuple[str, str], int] = {}
        self.events: dict[str, int] = {}
        self.denials: dict[str, int] = {}
        self.backports: dict[tuple[str, str, str], int] = {}
        self._labels: dict[str, str] = {}  # command or event name -> bounded label

    def probed(
        self, commands: frozenset[str], events: frozenset[str], qemu: str, mode: str
    ) -> None:
        self.commands_known = commands
        self.events_known = events
        self._labels.clear()
        self.info = (qemu, mode)

    def _label(self, name: str, known: frozenset[str]) -> str:
        label = self._labels.get(name)
        if label is None:
            label = name if name in known else "other"
            if len(self._labels) < 4096:  # bounded: names come from clients
                self._labels[name] = label
        return label

    def command(self, name: str, outcome: str) -> None:
        # Once per command: the cached label first, without a call (the hot path).
        label = self._labels.get(name) or self._label(name, self.commands_known)
        key = (label, outcome)
        self.commands[key] = self.commands.get(key, 0) + 1

    def event(self, name: str) -> None:
        label = self._label(name, self.events_known)
        self.events[label] = self.events.get(label, 0) + 1

    def connect(self, result: str) -> None:
        self.connects[result] += 1

    def disconnect(self, reason: str) -> None:
        self.disconnects[reason] += 1

    def protocol_error(self, kind: str) -> None:
        self.protocol_errors[kind] += 1

    def denial(self, command: str) -> None:
        label = self._label(command, self.commands_known)
        self.denials[label] = self.denials.get(label, 0) + 1

    def backport(self, command: str, mode: str, outcome: str) -> None:
        key = (command, mode, outcome)
        self.backports[key] = self.backports.get(key, 0) + 1

    def restore(self, outcome: str) -> None:
        self.restores[outcome] += 1


class Metrics(Collector):
    """Every route's numbers, exported in one registry with the process collectors."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.routes: list[RouteMetrics] = []
        self.registry.register(self)

    def route(self, vm: str) -> RouteMetrics:
        metrics = RouteMetrics(vm)
        self.routes.append(metrics)
        return metrics

    def collect(self) -> Iterator[Metric]:
        routes = list(self.routes)
        build = GaugeMetricFamily("qmp_proxy_build_info", "qmp-proxy build", labels=["version"])
        build.add_metric([VERSION], 1)
        yield build

        def family(kind: type[Any], name: str, doc: str, labels: list[str]) -> Any:
            return kind(name, doc, labels=["vm", *labels])

        info = family(GaugeMetricFamily, "qmp_proxy_upstream_info", "QEMU behind a route",
                      ["qemu_version", "mode"])  # fmt: skip
        up = family(GaugeMetricFamily, "qmp_proxy_upstream_up",
                    "1 while the upstream is negotiated", [])  # fmt: skip
        connects = family(CounterMetricFamily, "qmp_proxy_upstream_connects",
                          "upstream connection attempts", ["result"])  # fmt: skip
        sessions = family(GaugeMetricFamily, "qmp_proxy_client_sessions", "client sessions now", [])
        connections = family(CounterMetricFamily, "qmp_proxy_client_connections",
                             "client connections accepted", [])  # fmt: skip
        disconnects = family(CounterMetricFamily, "qmp_proxy_client_disconnects",
                             "client sessions ended", ["reason"])  # fmt: skip
        commands = family(CounterMetricFamily, "qmp_proxy_commands", "client commands",
                          ["command", "outcome"])  # fmt: skip
        duration = family(HistogramMetricFamily, "qmp_proxy_command_duration_seconds",
                          "client command in to reply out", [])  # fmt: skip
        lane_wait = family(HistogramMetricFamily, "qmp_proxy_lane_wait_seconds",
                           "time a command waited for the lane", [])  # fmt: skip
        backports = family(CounterMetricFamily, "qmp_proxy_backport",
                           "migrate commands carrying capabilities",
                           ["command", "mode", "outcome"])  # fmt: skip
        restores = family(CounterMetricFamily, "qmp_proxy_backport_restores",
                          "capability restores after a failed split", ["outcome"])  # fmt: skip
        events = family(CounterMetricFamily, "qmp_proxy_events", "events from QEMU", ["event"])
        errors = family(CounterMetricFamily, "qmp_proxy_protocol_errors",
                        "malformed client input", ["kind"])  # fmt: skip
        denials = family(CounterMetricFamily, "qmp_proxy_policy_denials",
                         "commands refused by policy", ["command"])  # fmt: skip
        traffic = family(CounterMetricFamily, "qmp_proxy_bytes", "bytes moved",
                         ["peer", "direction"])  # fmt: skip
        for r in routes:
            vm = r.vm
            if r.info is not None:
                info.add_metric([vm, *r.info], 1)
            up.add_metric([vm], r.up)
            sessions.add_metric([vm], r.sessions)
            connections.add_metric([vm], r.connections)
            for result, n in r.connects.items():
                connects.add_metric([vm, result], n)
            for reason, n in r.disconnects.items():
                disconnects.add_metric([vm, reason], n)
            for (command, outcome), n in list(r.commands.items()):
                commands.add_metric([vm, command, outcome], n)
            duration.add_metric([vm], r.duration.buckets(), r.duration.total)
            lane_wait.add_metric([vm], r.lane_wait.buckets(), r.lane_wait.total)
            for (command, mode, outcome), n in list(r.backports.items()):
                backports.add_metric([vm, command, mode, outcome], n)
            for outcome, n in r.restores.items():
                restores.add_metric([vm, outcome], n)
            for event, n in list(r.events.items()):
                events.add_metric([vm, event], n)
            for kind, n in r.protocol_errors.items():
                errors.add_metric([vm, kind], n)
            for command, n in list(r.denials.items()):
                denials.add_metric([vm, command], n)
            moved = (
                ("client", "in", r.client_in),
                ("client", "out", r.client_out),
                ("upstream", "in", r.upstream_in),
                ("upstream", "out", r.upstream_out),
            )
            for peer, direction, n in moved:
                traffic.add_metric([vm, peer, direction], n)
        yield from (info, up, connects, sessions, connections, disconnects, commands, duration,
                    lane_wait, backports, restores, events, errors, denials, traffic)  # fmt: skip


class Heartbeat:
    """Stamped by the event loop; read by the HTTP thread."""

    def __init__(self) -> None:
        self.last = time.monotonic()

    def beat(self) -> None:
        self.last = time.monotonic()

    def alive(self) -> bool:
        return time.monotonic() - self.last < HEALTH_STALE_S


def serve(
    metrics: Metrics,
    host: str,
    port: int,
    heartbeat: Heartbeat,
    not_ready: Callable[[], dict[str, str]],
) -> ThreadingHTTPServer:
    """Start the HTTP endpoints in a daemon thread; returns the server (``shutdown()`` stops it).

    ``not_ready`` runs in the HTTP thread; it must only read plain attributes.
    """

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                body = prometheus_client.generate_latest(metrics.registry)
                self._send(200, body, prometheus_client.CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                ok = heartbeat.alive()
                self._send(200 if ok else 503, b"ok\n" if ok else b"event loop stuck\n")
            elif path == "/readyz":
                waiting = not_ready()
                if waiting:
                    body = json.dumps({"not_ready": waiting}).encode() + b"\n"
                    self._send(503, body, "application/json")
                else:
                    self._send(200, b'{"ready": true}\n', "application/json")
            else:
                self._send(404, b"not found\n")

        def _send(self, code: int, body: bytes, ctype: str = "text/plain") -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # scrapes are not events worth a log line

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

    server = Server((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server
