"""Prometheus metrics (DESIGN §9) and the HTTP endpoints ``/metrics``, ``/healthz``, ``/readyz``.

The HTTP server runs in its own thread so a scrape never adds latency to the event loop, and so
``/healthz`` can notice a stuck loop: the loop stamps a heartbeat every second and ``/healthz``
answers 503 when the stamp is stale.  ``/readyz`` is 200 only while every route's upstream is
negotiated.

Label values are bounded: ``command`` and ``event`` are kept only when the probed schema names
them, else ``other``; every other label has a fixed set of values.  The hot path updates
pre-bound children, never a label lookup by string per message where it can be avoided.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import prometheus_client
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)

VERSION = "0.1.0"
HEALTH_STALE_S = 5.0

prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]


class Metrics:
    """Every metric of the process, in one registry."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        Gauge("qmp_proxy_build_info", "qmp-proxy build", ["version"], registry=r).labels(
            VERSION
        ).set(1)
        self.upstream_info = Gauge("qmp_proxy_upstream_info", "QEMU behind a route",
                                   ["vm", "qemu_version", "mode"], registry=r)  # fmt: skip
        self.upstream_up = Gauge("qmp_proxy_upstream_up", "1 while the upstream is negotiated",
                                 ["vm"], registry=r)  # fmt: skip
        self.upstream_connects = Counter("qmp_proxy_upstream_connects", "upstream connections",
                                         ["vm", "result"], registry=r)  # fmt: skip
        self.client_sessions = Gauge("qmp_proxy_client_sessions", "client sessions now",
                                     ["vm"], registry=r)  # fmt: skip
        self.client_connections = Counter(
            "qmp_proxy_client_connections", "client connections accepted", ["vm"], registry=r
        )
        self.client_disconnects = Counter("qmp_proxy_client_disconnects", "sessions ended",
                                          ["vm", "reason"], registry=r)  # fmt: skip
        self.commands = Counter("qmp_proxy_commands", "client commands",
                                ["vm", "command", "outcome"], registry=r)  # fmt: skip
        self.command_duration = Histogram(
            "qmp_proxy_command_duration_seconds", "client command in to reply out", ["vm"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5,
                     10, 30),
            registry=r,
        )  # fmt: skip
        self.lane_wait = Histogram(
            "qmp_proxy_lane_wait_seconds", "time a command waited for the lane", ["vm"],
            buckets=(0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10),
            registry=r,
        )  # fmt: skip
        self.backport = Counter("qmp_proxy_backport", "migrate commands carrying capabilities",
                                ["vm", "command", "mode", "outcome"], registry=r)  # fmt: skip
        self.backport_restores = Counter("qmp_proxy_backport_restores",
                                         "capability restores after a failed split",
                                         ["vm", "outcome"], registry=r)  # fmt: skip
        self.events = Counter("qmp_proxy_events", "events from QEMU", ["vm", "event"], registry=r)
        self.protocol_errors = Counter("qmp_proxy_protocol_errors", "malformed client input",
                                       ["vm", "kind"], registry=r)  # fmt: skip
        self.policy_denials = Counter("qmp_proxy_policy_denials", "commands refused by policy",
                                      ["vm", "command"], registry=r)  # fmt: skip
        self.bytes = Counter("qmp_proxy_bytes", "bytes moved", ["vm", "peer", "direction"],
                             registry=r)  # fmt: skip

    def route(self, vm: str) -> RouteMetrics:
        return RouteMetrics(self, vm)


class RouteMetrics:
    """One route's children, bound once; ``names`` bounds the command and event labels."""

    def __init__(self, m: Metrics, vm: str) -> None:
        self.m = m
        self.vm = vm
        self.commands_known: frozenset[str] = frozenset()
        self.events_known: frozenset[str] = frozenset()
        self.up = m.upstream_up.labels(vm)
        self.up.set(0)
        self.sessions = m.client_sessions.labels(vm)
        self.sessions.set(0)
        self.connections = m.client_connections.labels(vm)
        self.duration = m.command_duration.labels(vm)
        self.lane_wait = m.lane_wait.labels(vm)
        self.client_in = m.bytes.labels(vm, "client", "in")
        self.client_out = m.bytes.labels(vm, "client", "out")
        self.upstream_in = m.bytes.labels(vm, "upstream", "in")
        self.upstream_out = m.bytes.labels(vm, "upstream", "out")
        for result in ("ok", "refused", "no_greeting", "error"):
            m.upstream_connects.labels(vm, result)
        for reason in ("eof", "reset", "slow", "limit", "upstream_lost", "shutdown"):
            m.client_disconnects.labels(vm, reason)
        for kind in ("parse", "not_object", "member", "limit"):
            m.protocol_errors.labels(vm, kind)
        for outcome in ("ok", "failed"):
            m.backport_restores.labels(vm, outcome)
        self._commands: dict[tuple[str, str], Any] = {}
        self._events: dict[str, Any] = {}
        self._info: tuple[str, str] | None = None

    def probed(
        self, commands: frozenset[str], events: frozenset[str], qemu: str, mode: str
    ) -> None:
        self.commands_known = commands
        self.events_known = events
        self._commands.clear()
        self._events.clear()
        if self._info is not None:
            self.m.upstream_info.remove(self.vm, *self._info)
        self._info = (qemu, mode)
        self.m.upstream_info.labels(self.vm, qemu, mode).set(1)

    def command_label(self, name: str) -> str:
        return name if name in self.commands_known else "other"

    def command(self, name: str, outcome: str) -> None:
        key = (name, outcome)
        child = self._commands.get(key)
        if child is None:
            child = self._commands[key] = self.m.commands.labels(
                self.vm, self.command_label(name), outcome
            )
        child.inc()

    def event(self, name: str) -> None:
        child = self._events.get(name)
        if child is None:
            label = name if name in self.events_known else "other"
            child = self._events[name] = self.m.events.labels(self.vm, label)
        child.inc()

    def connect(self, result: str) -> None:
        self.m.upstream_connects.labels(self.vm, result).inc()

    def disconnect(self, reason: str) -> None:
        self.m.client_disconnects.labels(self.vm, reason).inc()

    def protocol_error(self, kind: str) -> None:
        self.m.protocol_errors.labels(self.vm, kind).inc()

    def denial(self, command: str) -> None:
        self.m.policy_denials.labels(self.vm, self.command_label(command)).inc()

    def backport(self, command: str, mode: str, outcome: str) -> None:
        self.m.backport.labels(self.vm, command, mode, outcome).inc()

    def restore(self, outcome: str) -> None:
        self.m.backport_restores.labels(self.vm, outcome).inc()


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
