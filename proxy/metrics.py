"""Prometheus metrics and the HTTP endpoints ``/metrics``, ``/healthz``, ``/readyz``.

The hot path only bumps plain integers on the event loop's thread; a custom collector turns them
into metric families when Prometheus scrapes.  prometheus-client's own metric objects take a lock
per update, and a proxied command touched about nine of them: measurably a fifth of the proxy's
per-command CPU.  A scrape may read a counter a moment before an update lands; Prometheus
semantics tolerate that, and every value only ever grows.

The HTTP server (:mod:`proxy.httpd`) runs on its own thread so a scrape never adds latency to
the event loop, and so ``/healthz`` can notice a stuck loop: the loop stamps a heartbeat every
second and ``/healthz`` answers 503 when the stamp is stale.  ``/readyz`` is 200 only while
every route's upstream is negotiated.

Label values are bounded: ``command`` and ``event`` are kept only when the probed schema names
them, else ``other``; every other label has a fixed set of values.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final, Literal, get_args

import prometheus_client
from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from proxy import VERSION
from proxy.httpd import TEXT, HttpServer
from proxy.session import FdBudget

JSON: Final = "application/json"

HEALTH_STALE_S = 5.0
PUBLISH_INTERVAL = 5.0
GATHER_MAX_AGE = 30.0  # a published file not refreshed for this long is a dead process's

DURATION_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
LANE_WAIT_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0)
ConnectResult = Literal["ok", "refused", "no_greeting", "protocol_error", "error"]
DisconnectReason = Literal["eof", "reset", "slow", "limit", "upstream_lost", "shutdown", "error"]
CONNECT_RESULTS: tuple[ConnectResult, ...] = get_args(ConnectResult)
DISCONNECT_REASONS: tuple[DisconnectReason, ...] = get_args(DisconnectReason)
ACCEPT_ERRORS = ("descriptors", "other")
PROTOCOL_ERROR_KINDS = ("parse", "not_object", "member", "limit")
RESTORE_OUTCOMES = ("ok", "failed")


class Histogram:
    """Cumulative-on-export bucket counts, a sum and a count: what Prometheus needs, no lock.

    ``zeros`` counts observations of exactly zero, added by the caller itself
    (``hist.zeros += 1``): the commonest lane wait, of a command that never queued, costs no
    call and no search.
    """

    __slots__ = ("bounds", "counts", "n", "total", "zeros")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0
        self.n = 0
        self.zeros = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value
        self.n += 1

    def buckets(self) -> list[tuple[str, int]]:
        out = []
        running = zeros = self.zeros  # every bound is at least zero
        for bound, count in zip(self.bounds, self.counts, strict=False):
            running += count
            out.append((repr(bound), running))
        out.append(("+Inf", self.n + zeros))
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
        self.desyncs = 0
        self.internal_errors = 0
        self.fds_refused = 0
        self.journal_invalid = 0
        self.accept_errors = dict.fromkeys(ACCEPT_ERRORS, 0)
        # Name -> bounded label, one cache per name space: a client's command named like an
        # event must not decide how the event is counted, nor the other way round.
        self._command_labels: dict[str, str] = {}
        self._event_labels: dict[str, str] = {}

    def probed(
        self, commands: frozenset[str], events: frozenset[str], qemu: str, mode: str
    ) -> None:
        self.commands_known = commands
        self.events_known = events
        self._command_labels.clear()
        self._event_labels.clear()
        self.info = (qemu, mode)

    @staticmethod
    def _label(name: str, known: frozenset[str], cache: dict[str, str]) -> str:
        label = name if name in known else "other"
        # Bounded in entries and in bytes: names come from clients, as long as a message.
        if len(cache) < 4096 and (label != "other" or len(name) <= 64):
            cache[name] = label
        return label

    def answered(self, name: str, outcome: str, seconds: float) -> None:
        """A client command's reply was handed on: its count and its duration, in one call."""
        label = self._command_labels.get(name) or self._label(
            name, self.commands_known, self._command_labels
        )
        key = (label, outcome)
        self.commands[key] = self.commands.get(key, 0) + 1
        duration = self.duration
        duration.counts[bisect.bisect_left(duration.bounds, seconds)] += 1
        duration.total += seconds
        duration.n += 1

    def command(self, name: str, outcome: str) -> None:
        # Once per command: the cached label first, without a call (the hot path).
        label = self._command_labels.get(name) or self._label(
            name, self.commands_known, self._command_labels
        )
        key = (label, outcome)
        self.commands[key] = self.commands.get(key, 0) + 1

    def event(self, name: str) -> None:
        label = self._event_labels.get(name) or self._label(
            name, self.events_known, self._event_labels
        )
        self.events[label] = self.events.get(label, 0) + 1

    def connect(self, result: ConnectResult) -> None:
        self.connects[result] += 1

    def disconnect(self, reason: DisconnectReason) -> None:
        self.disconnects[reason] += 1

    def protocol_error(self, kind: str) -> None:
        self.protocol_errors[kind] += 1

    def denial(self, command: str) -> None:
        label = self._command_labels.get(command) or self._label(
            command, self.commands_known, self._command_labels
        )
        self.denials[label] = self.denials.get(label, 0) + 1

    def desync(self) -> None:
        self.desyncs += 1

    def internal_error(self) -> None:
        self.internal_errors += 1

    def fd_refused(self) -> None:
        self.fds_refused += 1

    def journal_rejected(self) -> None:
        self.journal_invalid += 1

    def accept_error(self, kind: str) -> None:
        self.accept_errors[kind] += 1

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
        self.fd_budget: FdBudget | None = None
        self.http: HttpServer | None = None
        # Where wrapped domains' proxies publish (see :meth:`publish`): merged into /metrics.
        self.gather_dir: Path | None = None
        self.registry.register(self)

    def route(self, vm: str) -> RouteMetrics:
        metrics = RouteMetrics(vm)
        self.routes.append(metrics)
        return metrics

    def collect(self) -> Iterator[Metric]:
        if self.gather_dir is None:
            yield from self._own()
        else:
            yield from _merge(list(self._own()), gathered(self.gather_dir))

    async def publish(self, path: Path, interval: float = PUBLISH_INTERVAL) -> None:
        """Write this process's route metrics to ``path`` every ``interval`` seconds, for a
        host-wide ``/metrics`` (``metrics_dir``) or node_exporter's textfile collector; the
        file goes when this does.  Only the per-route families (``vm`` label): the process-
        wide ones would clash between processes."""
        try:
            while True:
                families = [
                    f
                    for f in self._own()
                    if f.name != "qmp_proxy_build_info"
                    and f.samples
                    and all("vm" in s.labels for s in f.samples)
                ]
                _write_atomically(path, _exposition(families))
                await asyncio.sleep(interval)
        finally:
            with contextlib.suppress(OSError):
                path.unlink()

    def _own(self) -> Iterator[Metric]:
        routes = list(self.routes)
        build = GaugeMetricFamily("qmp_proxy_build_info", "qmp-proxy build", labels=["version"])
        build.add_metric([VERSION], 1)
        yield build

        def family(kind: type[Any], name: str, doc: str, labels: list[str]) -> Any:
            return kind(name, doc, labels=["vm", *labels])

        info = family(
            GaugeMetricFamily,
            "qmp_proxy_upstream_info",
            "QEMU behind a route",
            ["qemu_version", "mode"],
        )
        up = family(
            GaugeMetricFamily, "qmp_proxy_upstream_up", "1 while the upstream is negotiated", []
        )
        connects = family(
            CounterMetricFamily,
            "qmp_proxy_upstream_connects",
            "upstream connection attempts",
            ["result"],
        )
        sessions = family(GaugeMetricFamily, "qmp_proxy_client_sessions", "client sessions now", [])
        connections = family(
            CounterMetricFamily, "qmp_proxy_client_connections", "client connections accepted", []
        )
        disconnects = family(
            CounterMetricFamily, "qmp_proxy_client_disconnects", "client sessions ended", ["reason"]
        )
        commands = family(
            CounterMetricFamily, "qmp_proxy_commands", "client commands", ["command", "outcome"]
        )
        duration = family(
            HistogramMetricFamily,
            "qmp_proxy_command_duration_seconds",
            "client command in to reply out",
            [],
        )
        lane_wait = family(
            HistogramMetricFamily,
            "qmp_proxy_lane_wait_seconds",
            "time a command waited for the lane",
            [],
        )
        backports = family(
            CounterMetricFamily,
            "qmp_proxy_backport",
            "migrate commands carrying capabilities",
            ["command", "mode", "outcome"],
        )
        restores = family(
            CounterMetricFamily,
            "qmp_proxy_backport_restores",
            "capability restores after a failed split",
            ["outcome"],
        )
        events = family(CounterMetricFamily, "qmp_proxy_events", "events from QEMU", ["event"])
        errors = family(
            CounterMetricFamily, "qmp_proxy_protocol_errors", "malformed client input", ["kind"]
        )
        denials = family(
            CounterMetricFamily,
            "qmp_proxy_policy_denials",
            "commands refused by policy",
            ["command"],
        )
        traffic = family(
            CounterMetricFamily, "qmp_proxy_bytes", "bytes moved", ["peer", "direction"]
        )
        desyncs = family(
            CounterMetricFamily,
            "qmp_proxy_upstream_desyncs",
            "QEMU output the proxy could not place (the connection was dropped)",
            [],
        )
        internal = family(
            CounterMetricFamily,
            "qmp_proxy_internal_errors",
            "unexpected exceptions caught by a last-resort guard",
            [],
        )
        fds_refused = family(
            CounterMetricFamily,
            "qmp_proxy_fd_batches_refused",
            "descriptor batches closed: over the process's budget",
            [],
        )
        journal_invalid = family(
            CounterMetricFamily,
            "qmp_proxy_journal_invalid",
            "journal files moved aside unapplied",
            [],
        )
        accept_errors = family(
            CounterMetricFamily,
            "qmp_proxy_accept_errors",
            "failed accepts (descriptors: the process or system table is full)",
            ["reason"],
        )
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
            desyncs.add_metric([vm], r.desyncs)
            internal.add_metric([vm], r.internal_errors)
            fds_refused.add_metric([vm], r.fds_refused)
            journal_invalid.add_metric([vm], r.journal_invalid)
            for why, n in r.accept_errors.items():
                accept_errors.add_metric([vm, why], n)
        yield from (
            info,
            up,
            connects,
            sessions,
            connections,
            disconnects,
            commands,
            duration,
            lane_wait,
            backports,
            restores,
            events,
            errors,
            denials,
            traffic,
            desyncs,
            internal,
            fds_refused,
            journal_invalid,
            accept_errors,
        )
        if self.fd_budget is not None:
            held = GaugeMetricFamily("qmp_proxy_client_fds", "descriptors held for clients")
            held.add_metric([], self.fd_budget.held)
            limit = GaugeMetricFamily(
                "qmp_proxy_client_fds_limit", "the budget of descriptors held for clients"
            )
            limit.add_metric([], self.fd_budget.limit)
            yield from (held, limit)
        if self.http is not None:
            http = self.http
            conns = CounterMetricFamily(
                "qmp_proxy_http_connections",
                "metrics endpoint connections, by how they ended",
                labels=["outcome"],
            )
            for outcome, n in (
                ("accepted", http.accepted),
                ("evicted", http.evicted),
                ("timed_out", http.timed_out),
                ("idle_closed", http.idle_closed),
                ("bad_request", http.bad_requests),
            ):
                conns.add_metric([outcome], n)
            yield conns


def gathered(directory: Path, max_age: float = GATHER_MAX_AGE) -> list[Metric]:
    """The families published in ``directory`` by live processes (files refreshed within
    ``max_age`` seconds); unreadable or malformed files are skipped."""
    families: list[Metric] = []
    now = time.time()
    try:
        entries = sorted(directory.glob("*.prom"))
    except OSError:
        return families
    for entry in entries:
        try:
            if now - entry.stat().st_mtime > max_age:
                continue
            families.extend(text_string_to_metric_families(entry.read_text()))
        except (OSError, ValueError):
            continue
    return families


def _merge(own: list[Metric], more: list[Metric]) -> Iterator[Metric]:
    """One family per name, every series once (the first one seen wins)."""
    by_name: dict[str, Metric] = {}
    seen: set[tuple[str, tuple[tuple[str, str], ...]]] = set()
    order: list[Metric] = []
    for family in [*own, *more]:
        target = by_name.get(family.name)
        if target is None:
            target = Metric(family.name, family.documentation, family.type, family.unit)
            by_name[family.name] = target
            order.append(target)
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            if key not in seen:
                seen.add(key)
                target.samples.append(sample)
    yield from order


def _exposition(families: list[Metric]) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(families))
    return prometheus_client.generate_latest(registry)


class _Families(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class Heartbeat:
    """Stamped by the event loop; read by the HTTP thread."""

    def __init__(self) -> None:
        self.last = time.monotonic()

    def beat(self) -> None:
        self.last = time.monotonic()

    def alive(self) -> bool:
        return time.monotonic() - self.last < HEALTH_STALE_S


def endpoints(
    metrics: Metrics, heartbeat: Heartbeat, not_ready: Callable[[], dict[str, str]]
) -> Callable[[str], tuple[int, str, bytes]]:
    """The handler of ``/metrics``, ``/healthz`` and ``/readyz`` for :class:`HttpServer`.

    It runs on the HTTP thread; ``not_ready`` must only read plain attributes.
    """

    def handle(path: str) -> tuple[int, str, bytes]:
        if path == "/metrics":
            return (
                200,
                prometheus_client.CONTENT_TYPE_LATEST,
                prometheus_client.generate_latest(metrics.registry),
            )
        if path == "/healthz":
            ok = heartbeat.alive()
            return (200, TEXT, b"ok\n") if ok else (503, TEXT, b"event loop stuck\n")
        if path == "/readyz":
            waiting = not_ready()
            if waiting:
                return 503, JSON, json.dumps({"not_ready": waiting}).encode() + b"\n"
            return 200, JSON, b'{"ready": true}\n'
        return 404, TEXT, b"not found\n"

    return handle


def serve(
    metrics: Metrics,
    host: str,
    port: int,
    heartbeat: Heartbeat,
    not_ready: Callable[[], dict[str, str]],
) -> HttpServer:
    """Start the HTTP endpoints on their own thread; ``close()`` stops them.

    The server has bounds of its own (connections, deadlines, request size); see
    :mod:`proxy.httpd`.  Its counters are exported with the rest.
    """
    server = HttpServer(host, port, endpoints(metrics, heartbeat, not_ready))
    server.start()
    metrics.http = server
    return server
