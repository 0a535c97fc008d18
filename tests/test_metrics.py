"""Metrics and health endpoints over real HTTP, with the proxy in front of QEMU 7.2.

The proxy runs in this event loop; the endpoints are scraped from a thread (as Prometheus
would, over TCP) and parsed with prometheus-client's own parser, so a malformed exposition
fails here as it would fail a real scrape.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

import proxy.metrics
from proxy import VERSION, address
from proxy.config import Config, Limits, ListenConfig, RouteConfig
from proxy.policy import Policy
from proxy.server import Server
from tests.aclient import AsyncRaw
from tests.helpers import free_port, wait_route_ready
from tests.qemu import QemuProcess

VM = "vm1"

# The README's 'Metrics' table: name -> (type, label names besides vm)
DOCUMENTED_METRICS: dict[str, tuple[str, set[str]]] = {
    "qmp_proxy_build_info": ("gauge", {"version"}),
    "qmp_proxy_upstream_info": ("gauge", {"vm", "qemu_version", "mode"}),
    "qmp_proxy_upstream_up": ("gauge", {"vm"}),
    "qmp_proxy_upstream_connects_total": ("counter", {"vm", "result"}),
    "qmp_proxy_client_sessions": ("gauge", {"vm"}),
    "qmp_proxy_client_connections_total": ("counter", {"vm"}),
    "qmp_proxy_client_disconnects_total": ("counter", {"vm", "reason"}),
    "qmp_proxy_commands_total": ("counter", {"vm", "command", "outcome"}),
    "qmp_proxy_command_duration_seconds": ("histogram", {"vm"}),
    "qmp_proxy_lane_wait_seconds": ("histogram", {"vm"}),
    "qmp_proxy_backport_total": ("counter", {"vm", "command", "mode", "outcome"}),
    "qmp_proxy_backport_restores_total": ("counter", {"vm", "outcome"}),
    "qmp_proxy_events_total": ("counter", {"vm", "event"}),
    "qmp_proxy_protocol_errors_total": ("counter", {"vm", "kind"}),
    "qmp_proxy_policy_denials_total": ("counter", {"vm", "command"}),
    "qmp_proxy_bytes_total": ("counter", {"vm", "peer", "direction"}),
}

CAPS = [{"capability": "xbzrle", "state": True}]


@dataclass
class Response:
    status: int
    body: str
    content_type: str


def get(url: str) -> Response:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return Response(r.status, r.read().decode(), r.headers.get("Content-Type", ""))
    except urllib.error.HTTPError as e:
        return Response(e.code, e.read().decode(), e.headers.get("Content-Type", ""))


class Scrape:
    """One parsed /metrics page."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        self.samples = [s for f in self.families.values() for s in f.samples]

    def value(self, name: str, **labels: str) -> float:
        """The sample's value; 0 when the series does not exist (yet)."""
        found = [
            s.value
            for s in self.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        ]
        assert len(found) <= 1, (name, labels, found)
        return found[0] if found else 0.0

    def series(self, name: str) -> list[dict[str, str]]:
        return [s.labels for s in self.samples if s.name == name]


@dataclass
class Harness:
    qemu: QemuProcess
    server: Server
    sock: str  # open listener
    ro_sock: str  # allow = ["query-*"]
    port: int

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def get(self, path: str) -> Response:
        return await asyncio.to_thread(get, self.url(path))

    async def scrape(self) -> Scrape:
        r = await self.get("/metrics")
        assert r.status == 200, r
        assert r.content_type.startswith("text/plain"), r.content_type
        return Scrape(r.body)

    async def eventually(
        self, check: Callable[[Scrape], bool], what: str, timeout: float = 5.0
    ) -> Scrape:
        deadline = time.monotonic() + timeout
        while True:
            s = await self.scrape()
            if check(s):
                return s
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: not seen in /metrics:\n{s.text}")
            await asyncio.sleep(0.05)

    async def client(self, path: str | None = None) -> AsyncRaw:
        c = await AsyncRaw.connect(path or self.sock)
        await c.negotiate()
        return c


@contextlib.asynccontextmanager
async def harness(qemu: QemuProcess, tmp_path: Path) -> AsyncIterator[Harness]:
    port = free_port()
    sock, ro_sock = str(tmp_path / "open.sock"), str(tmp_path / "ro.sock")
    listen = (
        ListenConfig(address.parse(sock)),
        ListenConfig(address.parse(ro_sock), policy=Policy(allow=("query-*",))),
    )
    route = RouteConfig(VM, address.parse(qemu.sock_path), listen)
    config = Config((route,), Limits(), "debug", metrics=("127.0.0.1", port), state_dir=tmp_path)
    server = Server(config, asyncio.get_running_loop())
    server.start()
    try:
        await wait_route_ready(server)
        yield Harness(qemu, server, sock, ro_sock, port)
    finally:
        await server.stop()


@pytest.fixture
async def h(qemu72: QemuProcess, tmp_path: Path) -> AsyncIterator[Harness]:
    async with harness(qemu72, tmp_path) as hh:
        yield hh


# -- the exposition -----------------------------------------------------------------------------


async def test_every_documented_metric_present(h: Harness) -> None:
    s = await h.scrape()
    for name, (kind, labels) in DOCUMENTED_METRICS.items():
        family = name.removesuffix("_total") if kind == "counter" else name
        assert family in s.families, f"{name} missing from /metrics"
        assert s.families[family].type == kind, (name, s.families[family].type)
        for sample in s.families[family].samples:
            if kind == "histogram" and sample.name.endswith("_bucket"):
                assert set(sample.labels) == labels | {"le"}, (name, sample.labels)
            else:
                assert set(sample.labels) == labels, (name, sample.labels)
    assert any(n.startswith("process_") for n in s.families), "no process collector"
    assert s.value("qmp_proxy_build_info", version=VERSION) == 1


async def test_no_created_series(h: Harness) -> None:
    c = await h.client()
    await c.command({"execute": "query-status"})
    s = await h.scrape()
    created = sorted({x.name for x in s.samples if x.name.endswith("_created")})
    assert created == [], created
    assert "_created" not in s.text


async def test_upstream_up_and_info(h: Harness) -> None:
    s = await h.scrape()
    assert s.value("qmp_proxy_upstream_up", vm=VM) == 1
    (info,) = s.series("qmp_proxy_upstream_info")
    assert info["vm"] == VM
    assert re.fullmatch(r"7\.2\.\d+", info["qemu_version"]), info
    assert info["mode"] == "split"
    assert s.value("qmp_proxy_upstream_info", vm=VM) == 1
    assert s.value("qmp_proxy_upstream_connects_total", vm=VM, result="ok") == 1


async def test_command_counters(h: Harness) -> None:
    before = await h.scrape()
    c = await h.client()
    assert "return" in await c.command({"execute": "query-status"})
    reply = await c.command({"execute": "query-status", "arguments": {"bogus": 1}})
    assert reply["error"]["desc"] == "Parameter 'bogus' is unexpected", reply
    reply = await c.command({"execute": "no-such-command-xyz"})
    assert reply["error"]["class"] == "CommandNotFound", reply
    after = await h.scrape()

    def delta(**labels: str) -> float:
        return after.value("qmp_proxy_commands_total", vm=VM, **labels) - before.value(
            "qmp_proxy_commands_total", vm=VM, **labels
        )

    # qmp_capabilities is answered by the proxy's session itself; only what reaches QEMU counts.
    assert delta(command="query-status", outcome="return") == 1
    assert delta(command="query-status", outcome="error") == 1
    assert delta(command="other", outcome="error") == 1
    labels = {x["command"] for x in after.series("qmp_proxy_commands_total")}
    assert "no-such-command-xyz" not in labels, labels
    count = "qmp_proxy_command_duration_seconds_count"
    assert after.value(count, vm=VM) - before.value(count, vm=VM) == 3
    lane = "qmp_proxy_lane_wait_seconds_count"
    assert after.value(lane, vm=VM) - before.value(lane, vm=VM) == 3
    # None of them queued: three waits of zero, in the lowest bucket and so in every one.
    for le in ("0.0001", "10.0", "+Inf"):
        lane = "qmp_proxy_lane_wait_seconds_bucket"
        assert after.value(lane, vm=VM, le=le) - before.value(lane, vm=VM, le=le) == 3, le
    await c.close()


async def test_backport_split_ok(h: Harness) -> None:
    c = await h.client()
    reply = await c.command(
        {"execute": "migrate", "arguments": {"uri": "exec:cat > /dev/null", "capabilities": CAPS}}
    )
    assert reply == {"return": {}}, reply
    s = await h.scrape()
    labels = {"vm": VM, "command": "migrate", "mode": "split"}
    assert s.value("qmp_proxy_backport_total", **labels, outcome="ok") == 1
    assert s.value("qmp_proxy_backport_total", **labels, outcome="command_error") == 0
    assert s.value("qmp_proxy_backport_restores_total", vm=VM, outcome="ok") == 0
    assert s.value("qmp_proxy_commands_total", vm=VM, command="migrate", outcome="return") == 1
    await c.close()


async def test_backport_precheck_error(h: Harness) -> None:
    c = await h.client()
    reply = await c.command({"execute": "migrate", "arguments": {"capabilities": CAPS}})
    assert reply["error"]["desc"] == "Parameter 'uri' is missing", reply
    s = await h.scrape()
    labels = {"vm": VM, "command": "migrate", "mode": "split"}
    assert s.value("qmp_proxy_backport_total", **labels, outcome="precheck_error") == 1
    assert s.value("qmp_proxy_backport_total", **labels, outcome="ok") == 0
    assert s.value("qmp_proxy_backport_restores_total", vm=VM, outcome="ok") == 0
    await c.close()


async def test_backport_caps_error(h: Harness) -> None:
    c = await h.client()
    bad = [{"capability": "no-such-capability", "state": True}]
    reply = await c.command(
        {"execute": "migrate", "arguments": {"uri": "exec:cat", "capabilities": bad}}
    )
    assert "no-such-capability" in reply["error"]["desc"], reply
    s = await h.scrape()
    labels = {"vm": VM, "command": "migrate", "mode": "split"}
    # Refused by the proxy's check of the list, as a patched QEMU's visitor refuses it.
    assert s.value("qmp_proxy_backport_total", **labels, outcome="precheck_error") == 1
    await c.close()


async def test_backport_command_error_and_restore(h: Harness) -> None:
    c = await h.client()
    reply = await c.command(
        {"execute": "migrate", "arguments": {"uri": "bogus:x", "capabilities": CAPS}}
    )
    assert reply["error"]["class"] == "GenericError", reply
    assert "migration protocol" in reply["error"]["desc"], reply
    s = await h.scrape()
    labels = {"vm": VM, "command": "migrate", "mode": "split"}
    assert s.value("qmp_proxy_backport_total", **labels, outcome="command_error") == 1
    assert s.value("qmp_proxy_backport_restores_total", vm=VM, outcome="ok") == 1
    assert s.value("qmp_proxy_backport_restores_total", vm=VM, outcome="failed") == 0
    caps = await c.command({"execute": "query-migrate-capabilities"})
    assert {x["capability"]: x["state"] for x in caps["return"]}["xbzrle"] is False
    await c.close()


async def test_events_counter(h: Harness) -> None:
    c = await h.client()
    assert await c.command({"execute": "cont"}) == {"return": {}}
    s = await h.eventually(
        lambda s: s.value("qmp_proxy_events_total", vm=VM, event="RESUME") == 1, "RESUME"
    )
    assert s.value("qmp_proxy_events_total", vm=VM, event="other") == 0
    await c.close()


async def test_protocol_errors_counter(h: Harness) -> None:
    c = await h.client()
    await c.send(b"}")
    assert (await c.reply())["error"]["desc"].startswith("JSON parse error"), "no parse error"
    await c.send(b"[1]")
    assert (await c.reply())["error"]["desc"] == "QMP input must be a JSON object"
    await c.send(b'{"execute": "query-status", "bogus": 1}')
    assert (await c.reply())["error"]["desc"] == "QMP input member 'bogus' is unexpected"
    s = await h.scrape()
    assert s.value("qmp_proxy_protocol_errors_total", vm=VM, kind="parse") == 1
    assert s.value("qmp_proxy_protocol_errors_total", vm=VM, kind="not_object") == 1
    assert s.value("qmp_proxy_protocol_errors_total", vm=VM, kind="member") == 1
    await c.close()


async def test_policy_denials_counter(h: Harness) -> None:
    c = await h.client(h.ro_sock)
    reply = await c.command({"execute": "stop", "id": 7})
    assert reply == {
        "id": 7,
        "error": {
            "class": "CommandNotFound",
            "desc": "The command stop has been disabled for this socket",
        },
    }
    assert "return" in await c.command({"execute": "query-status"})
    s = await h.scrape()
    assert s.value("qmp_proxy_policy_denials_total", vm=VM, command="stop") == 1
    # Denied commands never reach QEMU, so they are not counted as relayed.
    assert s.value("qmp_proxy_commands_total", vm=VM, command="stop", outcome="error") == 0
    assert s.value("qmp_proxy_commands_total", vm=VM, command="stop", outcome="return") == 0
    await c.close()


async def test_sessions_connections_disconnects(h: Harness) -> None:
    a = await h.client()
    b = await h.client(h.ro_sock)
    s = await h.scrape()
    assert s.value("qmp_proxy_client_sessions", vm=VM) == 2
    assert s.value("qmp_proxy_client_connections_total", vm=VM) == 2
    await a.close()
    s = await h.eventually(
        lambda s: s.value("qmp_proxy_client_sessions", vm=VM) == 1, "one session left"
    )
    assert s.value("qmp_proxy_client_disconnects_total", vm=VM, reason="eof") == 1
    b.writer.write_eof()  # a half-close is an eof too
    assert await b.eof() == b""
    s = await h.eventually(lambda s: s.value("qmp_proxy_client_sessions", vm=VM) == 0, "none")
    assert s.value("qmp_proxy_client_disconnects_total", vm=VM, reason="eof") == 2
    assert s.value("qmp_proxy_client_disconnects_total", vm=VM, reason="reset") == 0
    await b.close()


async def test_bytes_counter(h: Harness) -> None:
    before = await h.scrape()
    c = await h.client()
    request = b'{"execute":"query-status","id":"abc"}'
    await c.send(request)
    line = await c.line()
    after = await h.scrape()

    def delta(peer: str, direction: str) -> float:
        labels = {"vm": VM, "peer": peer, "direction": direction}
        return after.value("qmp_proxy_bytes_total", **labels) - before.value(
            "qmp_proxy_bytes_total", **labels
        )

    negotiation = len(b'{"execute":"qmp_capabilities"}')
    assert delta("client", "in") == negotiation + len(request)
    # The greeting, qmp_capabilities' reply and query-status' reply.
    assert c.greeting is not None
    assert delta("client", "out") >= len(line) + len(b'{"return": {}}\r\n')
    assert delta("upstream", "out") > 0
    assert delta("upstream", "in") >= len(line) - len(b'"abc"')
    await c.close()


# -- health and readiness -----------------------------------------------------------------------


async def test_healthz_and_readyz(h: Harness) -> None:
    r = await h.get("/healthz")
    assert r.status == 200, r
    r = await h.get("/readyz")
    assert r.status == 200, r
    assert r.content_type == "application/json"
    assert json.loads(r.body) == {"ready": True}
    assert (await h.get("/nope")).status == 404


async def test_readyz_503_while_qemu_down(h: Harness) -> None:
    h.qemu.stop()
    deadline = time.monotonic() + 5
    while True:
        r = await h.get("/readyz")
        if r.status == 503:
            break
        assert time.monotonic() < deadline, f"/readyz still {r.status} with QEMU gone"
        await asyncio.sleep(0.05)
    assert r.content_type == "application/json"
    body = json.loads(r.body)
    assert set(body) == {"not_ready"}, body
    assert set(body["not_ready"]) == {VM}, body
    assert body["not_ready"][VM] in {"down", "connecting"}, body
    s = await h.scrape()
    assert s.value("qmp_proxy_upstream_up", vm=VM) == 0
    await h.eventually(
        lambda s: s.value("qmp_proxy_upstream_connects_total", vm=VM, result="refused") >= 1,
        "refused reconnects",
    )
    # Liveness is not readiness: the process itself is fine.
    assert (await h.get("/healthz")).status == 200


async def test_readyz_names_awaiting_greeting(tmp_path: Path, qemu72: QemuProcess) -> None:
    """A QEMU whose monitor is held by another client: not ready, in state awaiting greeting."""
    from tests.qemu import RawQMP

    with RawQMP(qemu72.sock_path) as holder:
        holder.negotiate()
        port = free_port()
        listen = (ListenConfig(address.parse(str(tmp_path / "p.sock"))),)
        route = RouteConfig(VM, address.parse(qemu72.sock_path), listen)
        config = Config((route,), metrics=("127.0.0.1", port), state_dir=tmp_path)
        server = Server(config, asyncio.get_running_loop())
        server.start()
        try:
            url = f"http://127.0.0.1:{port}/readyz"
            deadline = time.monotonic() + 5
            while True:
                r = await asyncio.to_thread(get, url)
                if r.status == 503 and "awaiting greeting" in r.body:
                    break
                assert time.monotonic() < deadline, r
                await asyncio.sleep(0.05)
            assert json.loads(r.body) == {"not_ready": {VM: "awaiting greeting"}}
            holder.close()
            deadline = time.monotonic() + 5
            while (r := await asyncio.to_thread(get, url)).status != 200:
                assert time.monotonic() < deadline, r
                await asyncio.sleep(0.05)
        finally:
            await server.stop()


async def test_healthz_503_when_loop_stuck(h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    # The loop stamps its heartbeat every second; 1.5 s without one means stuck.
    monkeypatch.setattr(proxy.metrics, "HEALTH_STALE_S", 1.5)
    assert (await h.get("/healthz")).status == 200
    result: dict[str, Any] = {}

    def scrape_during_block() -> None:
        time.sleep(2.1)
        result["during"] = get(h.url("/healthz"))
        result["metrics"] = get(h.url("/metrics")).status

    thread = threading.Thread(target=scrape_during_block)
    blocked = asyncio.get_running_loop().create_future()

    def block() -> None:
        thread.start()
        time.sleep(2.6)  # the event loop is wedged
        blocked.set_result(None)

    asyncio.get_running_loop().call_soon(block)
    await blocked
    await asyncio.to_thread(thread.join)
    during: Response = result["during"]
    assert during.status == 503, during
    assert "stuck" in during.body
    assert result["metrics"] == 200, "/metrics must not depend on the event loop"
    deadline = time.monotonic() + 3
    while (r := await h.get("/healthz")).status != 200:
        assert time.monotonic() < deadline, f"/healthz stays {r.status} after the loop recovered"
        await asyncio.sleep(0.05)
