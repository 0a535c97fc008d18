"""The real proxy, in-process, against the scriptable fake QEMU (``tests/fakeqemu.py``).

These tests cover what real QEMU cannot be made to do on demand: stall a command, die
half-way through a reply, flood events, and expose exactly what the proxy sent and in which
order (``fake.received``).  Whether the proxy *matches* QEMU is proven against real QEMU in
``test_proxy_qemu.py``; here the fake's fidelity matters only as far as the proxy relies on it.

Clients are the real ``qemu.qmp.QMPClient`` and raw sockets (exact bytes, and control over
reading, which a slow-reader or vanishing-client test needs).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from typing import Any

import pytest
from qemu.qmp import EventListener, ExecInterruptedError, ExecuteError, QMPClient

from proxy import address
from proxy.config import Config, Limits, ListenConfig, RouteConfig
from proxy.route import Route
from proxy.server import Server
from proxy.upstream import Runstate
from tests.fakeqemu import Call, Error, Event, FakeQemu, Kill, Outcome, Received

# Fast failure paths for tests: reconnect at once, drain briefly on stop.
TEST_LIMITS = {"backoff_min": 0.01, "backoff_max": 0.05, "drain": 0.2, "client_wait": 3.0}
TIMEOUT = 5.0


# -- plumbing --------------------------------------------------------------------------------------


@pytest.fixture
def sockdir() -> Iterator[str]:
    """A short directory for unix sockets (sun_path holds 107 bytes; pytest's tmp_path is long)."""
    path = tempfile.mkdtemp(prefix="fq-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def fake(sockdir: str) -> AsyncIterator[FakeQemu]:
    async with FakeQemu(f"{sockdir}/qemu.sock") as f:
        yield f


@dataclass
class Proxy:
    server: Server
    path: str

    @property
    def route(self) -> Route:
        return self.server.routes[0]

    async def wait(self, predicate: Any, timeout: float = TIMEOUT, what: str = "") -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what or predicate}")
            await asyncio.sleep(0.005)

    async def ready(self) -> None:
        await self.wait(lambda: self.route.state == Runstate.READY, what="route READY")


@contextlib.asynccontextmanager
async def running_proxy(upstream: str, listen: str, **limits: Any) -> AsyncIterator[Proxy]:
    route = RouteConfig(
        "vm", address.parse(f"unix:{upstream}"), (ListenConfig(address.parse(f"unix:{listen}")),)
    )
    config = Config((route,), Limits(**{**TEST_LIMITS, **limits}), "debug")
    server = Server(config, asyncio.get_running_loop())
    server.start()
    try:
        yield Proxy(server, listen)
    finally:
        await server.stop()


@pytest.fixture
async def proxy(fake: FakeQemu, sockdir: str) -> AsyncIterator[Proxy]:
    async with running_proxy(fake.path, f"{sockdir}/proxy.sock") as p:
        await p.ready()
        yield p


async def qmp_client(path: str, name: str = "qmp") -> QMPClient:
    client = QMPClient(name)
    await client.connect(path)
    return client


@contextlib.asynccontextmanager
async def qmp_clients(path: str, count: int) -> AsyncIterator[list[QMPClient]]:
    clients = [await qmp_client(path, f"qmp{i}") for i in range(count)]
    try:
        yield clients
    finally:
        for client in clients:
            with contextlib.suppress(Exception):
                await client.disconnect()


class Raw:
    """A QMP client on a bare socket: exact bytes out, CRLF lines in, reading under our control."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.events: list[dict[str, Any]] = []

    @classmethod
    async def connect(cls, path: str) -> Raw:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, path)
        return cls(sock)

    async def send(self, data: bytes) -> None:
        await asyncio.get_running_loop().sock_sendall(self.sock, data)

    async def line(self, timeout: float = TIMEOUT) -> bytes:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (end := self.buf.find(b"\r\n")) < 0:
            chunk = await asyncio.wait_for(
                loop.sock_recv(self.sock, 65536), max(0.0, deadline - loop.time())
            )
            if not chunk:
                raise EOFError(f"EOF; unfinished line {bytes(self.buf)!r}")
            self.buf += chunk
        line = bytes(self.buf[: end + 2])
        del self.buf[: end + 2]
        return line

    async def message(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        msg: dict[str, Any] = json.loads(await self.line(timeout))
        return msg

    async def reply(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        """The next message that is not an event (events are kept in ``self.events``)."""
        while "event" in (msg := await self.message(timeout)):
            self.events.append(msg)
        return msg

    async def greeting(self) -> dict[str, Any]:
        msg = await self.message()
        assert "QMP" in msg, msg
        return msg

    async def negotiate(self) -> None:
        await self.greeting()
        await self.send(b'{"execute": "qmp_capabilities"}')
        assert await self.message() == {"return": {}}

    async def eof(self, timeout: float = TIMEOUT) -> bytes:
        """Everything until the proxy closes the connection (fails if it does not)."""
        loop = asyncio.get_running_loop()
        data = bytes(self.buf)
        self.buf.clear()
        deadline = loop.time() + timeout
        while chunk := await asyncio.wait_for(
            loop.sock_recv(self.sock, 1 << 20), max(0.0, deadline - loop.time())
        ):
            data += chunk
        return data

    def unread(self) -> bytes:
        """Bytes waiting in the socket right now, without consuming or waiting."""
        try:
            return bytes(self.buf) + self.sock.recv(1 << 20, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return bytes(self.buf)

    def close(self) -> None:
        self.sock.close()


def names(fake: FakeQemu, start: int = 0) -> list[str]:
    return [m.name or "?" for m in fake.received[start:]]


# -- the fake itself -------------------------------------------------------------------------------


async def test_fake_serves_one_client_at_a_time(fake: FakeQemu) -> None:
    """The fake must hold a second connection ungreeted, as QEMU does, or the tests lie."""
    first = await Raw.connect(fake.path)
    greeting = await first.line()
    assert greeting == (
        b'{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, '
        b'"package": "fake"}, "capabilities": ["oob"]}}\r\n'
    )
    second = await Raw.connect(fake.path)
    await second.send(b'{"execute":"qmp_capabilities","id":"c2"}')
    await asyncio.sleep(0.1)
    assert second.unread() == b""
    await first.send(b'{"execute":"query-status","id":1}')
    assert await first.line() == (
        b'{"id": 1, "error": {"class": "CommandNotFound", '
        b'"desc": "Expecting capabilities negotiation with \'qmp_capabilities\'"}}\r\n'
    )
    first.close()
    assert (await second.message())["QMP"]["capabilities"] == ["oob"]
    assert await second.line() == b'{"return": {}, "id": "c2"}\r\n'
    second.close()
    assert [m.conn for m in fake.received] == [1, 2]


async def test_fake_answers_oob_at_once_and_in_band_in_order(fake: FakeQemu) -> None:
    """The fake's own dispatch model, checked directly: in-band strictly in order (a stalled
    command holds the ones behind it), exec-oob answered at once; scripted replies and events
    come out as QEMU writes them."""
    gate = fake.stall("query-status")
    fake.on("x-err", lambda call: Error("boom", events_after=[Event("STOP")]))
    r = await Raw.connect(fake.path)
    await r.greeting()
    await r.send(b'{"execute":"qmp_capabilities","arguments":{"enable":["oob"]}}')
    assert await r.line() == b'{"return": {}}\r\n'
    await r.send(
        b'{"execute":"query-status","id":1}{"execute":"x-err","id":2}'
        b'{"exec-oob":"migrate-pause","id":3}{"exec-oob":"query-status","id":4}'
    )
    assert json.loads(await r.line())["id"] == 3
    assert await r.line() == (
        b'{"id": 4, "error": {"class": "GenericError", '
        b'"desc": "The command query-status does not support OOB"}}\r\n'
    )
    await fake.wait_until(lambda: len(fake.received) == 5)
    assert fake.inband_pending == 2
    gate.set()
    assert await r.line() == b'{"return": {"status": "prelaunch", "running": false}, "id": 1}\r\n'
    assert await r.line() == b'{"id": 2, "error": {"class": "GenericError", "desc": "boom"}}\r\n'
    assert (await r.message())["event"] == "STOP"
    r.close()


# -- lane ------------------------------------------------------------------------------------------


async def test_at_most_seven_in_flight_with_three_pipelining_clients(
    fake: FakeQemu, proxy: Proxy
) -> None:
    fake.inband_delay = 0.001  # let the queue build up behind QEMU
    fake.reset_counters()
    async with qmp_clients(proxy.path, 3) as clients:
        results = await asyncio.gather(
            *(c.execute("query-status") for c in clients for _ in range(40))
        )
    assert results == [{"status": "prelaunch", "running": False}] * 120
    assert names(fake).count("query-status") == 120
    assert fake.max_inband_pending == 7  # never more, and the window was used


async def test_success_replies_are_spliced_by_their_top_level_id(
    fake: FakeQemu, proxy: Proxy
) -> None:
    """The proxy hands ``{"return": ..., "id": N}`` lines on without decoding them; a payload
    full of nested ``, "id": N}`` members (naming ids the proxy has in flight) and 300 KB of
    text must still reach each client whole, under the client's own id, in its order."""
    fake.inband_delay = 0.001  # several commands in flight at once
    payload = "x" * 300_000

    def nested(call: Call) -> Any:
        uid = call.msg["id"]
        return {"a": 0, "id": uid - 1, "list": [{"b": 1, "id": uid + 1}], "big": payload}

    fake.on("query-nested", nested)
    r = await Raw.connect(proxy.path)
    await r.negotiate()
    ids = [f'"c{i}"'.encode() for i in range(12)] + [b"7", b"-3", b"1.5", b"null", b"[1, 2]"]
    await r.send(b"".join(b'{"execute": "query-nested", "id": %s}' % i for i in ids))
    for client_id in ids:
        line = await r.line()
        assert line.endswith(b', "id": ' + client_id + b"}\r\n"), line[-80:]
        reply = json.loads(line)
        assert reply["return"]["big"] == payload and reply["return"]["a"] == 0
        assert set(reply["return"]) == {"a", "id", "list", "big"}
    r.close()


async def test_exec_oob_overtakes_a_stalled_inband_command(fake: FakeQemu, proxy: Proxy) -> None:
    """With the window full of stalled in-band commands, exec-oob still gets through at once."""
    gate = fake.stall("query-status")
    async with qmp_clients(proxy.path, 1) as (client,):
        slow = [asyncio.ensure_future(client.execute("query-status")) for _ in range(10)]
        await fake.wait_until(lambda: names(fake).count("query-status") == 7)
        with pytest.raises(ExecuteError) as err:
            await asyncio.wait_for(client.execute("migrate-pause", oob=True), TIMEOUT)
        assert "migrate-pause is currently only supported" in str(err.value)
        assert (
            await asyncio.wait_for(client.execute("yank", {"instances": []}, oob=True), TIMEOUT)
            == {}
        )
        assert not any(task.done() for task in slow)
        gate.set()
        results = await asyncio.wait_for(asyncio.gather(*slow), TIMEOUT)
        assert results == [{"status": "prelaunch", "running": False}] * 10
    tail = [(m.name, m.oob) for m in fake.received[-12:]]
    assert tail[:9] == [("query-status", False)] * 7 + [("migrate-pause", True), ("yank", True)]
    assert tail[9:] == [("query-status", False)] * 3


async def test_round_robin_a_single_command_is_not_stuck_behind_a_pipeline(
    fake: FakeQemu, proxy: Proxy
) -> None:
    fake.inband_delay = 0.005
    fake.on("x-a", lambda call: {})
    fake.on("x-b", lambda call: {"b": True})
    a = await Raw.connect(proxy.path)
    await a.negotiate()
    await a.send(b"".join(b'{"execute":"x-a","id":%d}' % i for i in range(60)))
    await fake.wait_until(lambda: names(fake).count("x-a") >= 10)
    async with qmp_clients(proxy.path, 1) as (b,):
        mark = len(fake.received)
        assert await asyncio.wait_for(b.execute("x-b"), TIMEOUT) == {"b": True}
    after = names(fake, mark)
    position = after.index("x-b")
    # 6 of A's can be in flight ahead of it, plus A's turn: B goes within the next ~8.
    assert position <= 8, after[: position + 1]
    assert names(fake)[: mark + position].count("x-a") < 30  # A's pipeline was far from done
    for i in range(60):
        assert (await a.reply())["id"] == i
    assert names(fake).count("x-a") == 60
    a.close()


# -- events ----------------------------------------------------------------------------------------


async def test_events_reach_each_negotiated_session_once_and_no_other(
    fake: FakeQemu, proxy: Proxy
) -> None:
    listener = EventListener()
    async with qmp_clients(proxy.path, 1) as (q,):
        q.register_listener(listener)
        r = await Raw.connect(proxy.path)
        await r.negotiate()
        waiting = await Raw.connect(proxy.path)
        await waiting.greeting()  # greeted, not negotiated

        assert fake.emit("STOP") == 1  # one upstream connection: the proxy's
        fake.emit("RESUME")
        fake.emit("MIGRATION", {"status": "setup"})
        got = [(await r.message())["event"] for _ in range(3)]
        assert got == ["STOP", "RESUME", "MIGRATION"]
        q_got = [(await asyncio.wait_for(listener.get(), TIMEOUT))["event"] for _ in range(3)]
        assert q_got == got
        await asyncio.sleep(0.05)
        assert waiting.unread() == b""  # QEMU sends nothing in negotiation mode
        assert r.unread() == b"" and listener.empty()  # and each event once

        await waiting.send(b'{"execute":"qmp_capabilities","id":"late"}')
        assert await waiting.line() == b'{"return": {}, "id": "late"}\r\n'
        fake.emit("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})
        for client in (r, waiting):
            msg = await client.message()
            assert msg["event"] == "SHUTDOWN" and msg["data"]["reason"] == "host-qmp-quit"
        assert (await asyncio.wait_for(listener.get(), TIMEOUT))["event"] == "SHUTDOWN"
        await asyncio.sleep(0.05)
        assert waiting.unread() == b"" and r.unread() == b"" and listener.empty()
        r.close()
        waiting.close()


async def test_event_line_is_relayed_as_qemu_wrote_it(fake: FakeQemu, proxy: Proxy) -> None:
    r = await Raw.connect(proxy.path)
    await r.negotiate()
    fake.emit("MIGRATION", {"status": "setup"})
    line = await r.line()
    assert line.startswith(b'{"timestamp": {"seconds": ')
    assert line.endswith(b'}, "event": "MIGRATION", "data": {"status": "setup"}}\r\n')
    r.close()


# -- clients going away ----------------------------------------------------------------------------


async def test_vanished_client_unsent_commands_never_reach_qemu(
    fake: FakeQemu, proxy: Proxy
) -> None:
    gate = fake.stall("x-a")
    fake.on("x-b", lambda call: {"b": 1})
    a = await Raw.connect(proxy.path)
    await a.greeting()
    # The negotiation reply stays unread, so closing resets the connection (a vanished
    # client), which is not a half-close: after an EOF every command already received would
    # rightly run and be answered.
    await a.send(
        b'{"execute":"qmp_capabilities"}'
        + b"".join(b'{"execute":"x-a","id":%d}' % i for i in range(30))
    )
    await fake.wait_until(lambda: names(fake).count("x-a") == 7)
    async with qmp_clients(proxy.path, 1) as (b,):
        assert len(proxy.route.clients) == 2
        a.close()
        await proxy.wait(lambda: len(proxy.route.clients) == 1, what="A's session to end")
        gate.set()
        assert await asyncio.wait_for(b.execute("x-b"), TIMEOUT) == {"b": 1}
        await asyncio.sleep(0.05)
        assert await asyncio.wait_for(b.execute("x-b"), TIMEOUT) == {"b": 1}
    assert names(fake).count("x-a") == 7  # the window's worth; the other 23 were dropped
    assert proxy.route.lane.in_flight == 0 and proxy.route.lane.queued == 0


async def test_half_close_answers_everything_then_closes(fake: FakeQemu, proxy: Proxy) -> None:
    fake.inband_delay = 0.01
    r = await Raw.connect(proxy.path)
    await r.negotiate()
    await r.send(b"".join(b'{"execute":"query-status","id":%d}' % i for i in range(3)))
    r.sock.shutdown(socket.SHUT_WR)
    data = await r.eof()
    assert data == b"".join(
        b'{"return": {"status": "prelaunch", "running": false}, "id": %d}\r\n' % i for i in range(3)
    )
    r.close()


# -- upstream loss ---------------------------------------------------------------------------------


async def test_upstream_dies_mid_reply_sessions_end_and_route_reconnects(
    fake: FakeQemu, proxy: Proxy
) -> None:
    kills: list[Received] = []

    def die_once(call: Call) -> Outcome:
        if not kills:
            kills.append(call.msg)
            return Kill(half_line=True)
        return {"status": "prelaunch", "running": False}

    fake.on("query-status", die_once)
    idle = await Raw.connect(proxy.path)
    await idle.negotiate()
    ungreeted_session = await Raw.connect(proxy.path)
    await ungreeted_session.greeting()
    async with qmp_clients(proxy.path, 1) as (q,):
        with pytest.raises(ExecInterruptedError):
            await asyncio.wait_for(q.execute("query-status"), TIMEOUT)
    # Every session ends as if QEMU died: EOF, and no piece of the cut-off line.
    assert await idle.eof() == b""
    assert await ungreeted_session.eof() == b""
    assert kills and kills[0].conn == 1
    await fake.wait_until(lambda: fake.connection_count == 2)
    await proxy.ready()
    assert fake.commands(conn=2)[:2] == ["qmp_capabilities", "query-qmp-schema"]  # re-probed
    async with qmp_clients(proxy.path, 1) as (q,):
        assert await q.execute("query-status") == {"status": "prelaunch", "running": False}
    idle.close()
    ungreeted_session.close()


async def test_clients_wait_ungreeted_while_qemu_serves_someone_else(
    fake: FakeQemu, sockdir: str
) -> None:
    squatter = await Raw.connect(fake.path)
    await squatter.greeting()
    async with running_proxy(fake.path, f"{sockdir}/proxy.sock") as p:
        await p.wait(lambda: p.route.state == Runstate.AWAITING_GREETING, what="awaiting greeting")
        client = await Raw.connect(p.path)
        await asyncio.sleep(0.1)
        assert client.unread() == b""
        assert p.route.state == Runstate.AWAITING_GREETING  # waiting, not reconnecting
        assert fake.connection_count == 1
        squatter.close()
        await client.negotiate()
        await client.send(b'{"execute":"query-status","id":"q"}')
        assert (await client.reply())["id"] == "q"
        assert fake.connection_count == 2
        client.close()


# -- limits ----------------------------------------------------------------------------------------


async def test_slow_reader_is_disconnected_others_stay_responsive(
    fake: FakeQemu, sockdir: str
) -> None:
    backlog = 128 << 10
    async with running_proxy(fake.path, f"{sockdir}/proxy.sock", max_backlog=backlog) as p:
        await p.ready()
        slow = await Raw.connect(p.path)
        await slow.negotiate()
        async with qmp_clients(p.path, 1) as (q,):
            listener = EventListener()
            q.register_listener(listener)
            blob = "x" * 1000
            sent = 0
            for batch in range(40):
                for _ in range(64):
                    fake.emit("MIGRATION", {"status": "active", "blob": blob})
                    sent += 1
                if batch == 20:
                    assert await asyncio.wait_for(q.execute("query-status"), TIMEOUT)
                await asyncio.sleep(0.005)  # QEMU is fast, not infinitely so: let readers read
            await p.wait(lambda: len(p.route.clients) == 1, what="slow reader dropped")
            assert await asyncio.wait_for(q.execute("query-status"), TIMEOUT)
            received = 0
            while received < sent:
                await asyncio.wait_for(listener.get(), TIMEOUT)
                received += 1
            assert listener.empty()
        data = await slow.eof()
        assert 0 < data.count(b'"event"') < sent
        slow.close()


async def test_session_limit_closes_the_extra_connection(fake: FakeQemu, sockdir: str) -> None:
    async with running_proxy(fake.path, f"{sockdir}/proxy.sock", max_sessions=2) as p:
        await p.ready()
        async with qmp_clients(p.path, 2) as (first, second):
            extra = await Raw.connect(p.path)
            assert await extra.eof() == b""  # closed after accept, never greeted
            extra.close()
            await first.disconnect()
            await p.wait(lambda: len(p.route.clients) == 1, what="first session to end")
            again = await Raw.connect(p.path)
            await again.negotiate()
            again.close()
            assert await second.execute("query-status")


async def test_queue_limit_stops_reading_a_client(fake: FakeQemu, sockdir: str) -> None:
    async with running_proxy(fake.path, f"{sockdir}/proxy.sock", max_queued=3) as p:
        await p.ready()
        gate = fake.stall("x-q")
        r = await Raw.connect(p.path)
        await r.negotiate()
        for i in range(8):  # one write each, so each arrives in its own read
            await r.send(b'{"execute":"x-q","id":%d}' % i)
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
        assert names(fake).count("x-q") == 3  # unread commands wait in the socket
        gate.set()
        assert [(await r.reply())["id"] for _ in range(8)] == list(range(8))
        assert names(fake).count("x-q") == 8
        r.close()


async def test_queue_limit_holds_for_commands_arriving_in_one_read(
    fake: FakeQemu, sockdir: str
) -> None:
    """The limit bounds what a client can make the proxy hold, however its bytes are packed.

    A client that writes its pipeline in one ``send`` (as ``qemu.qmp`` does when commands are
    issued together) is read in one chunk; every command in it is still queued.
    """
    async with running_proxy(fake.path, f"{sockdir}/proxy.sock", max_queued=3) as p:
        await p.ready()
        gate = fake.stall("x-q")
        r = await Raw.connect(p.path)
        await r.negotiate()
        await r.send(b"".join(b'{"execute":"x-q","id":%d}' % i for i in range(8)))
        await asyncio.sleep(0.2)
        reached_qemu = names(fake).count("x-q")
        gate.set()
        assert [(await r.reply())["id"] for _ in range(8)] == list(range(8))
        r.close()
        assert reached_qemu == 3, f"{reached_qemu} commands of a max_queued=3 client accepted"


async def test_reloaded_limits_reach_live_sessions(fake: FakeQemu, sockdir: str) -> None:
    """SIGHUP's new limits apply to sessions already open: a raised ``max_queued`` lets a held
    client go on at once, and a lowered ``max_backlog`` drops a live slow reader."""
    async with running_proxy(fake.path, f"{sockdir}/proxy.sock", max_queued=3) as p:
        await p.ready()
        gate = fake.stall("x-q")
        r = await Raw.connect(p.path)
        await r.negotiate()
        await r.send(b"".join(b'{"execute":"x-q","id":%d}' % i for i in range(6)))
        await p.wait(lambda: names(fake).count("x-q") == 3, what="three commands in QEMU")
        await asyncio.sleep(0.05)
        assert names(fake).count("x-q") == 3
        p.route.set_limits(replace(p.route.limits, max_queued=6))  # still within the window
        await p.wait(lambda: names(fake).count("x-q") == 6, what="the held commands sent")
        gate.set()
        assert [(await r.reply())["id"] for _ in range(6)] == list(range(6))

        slow = await Raw.connect(p.path)
        await slow.negotiate()
        p.route.set_limits(replace(p.route.limits, max_backlog=64 << 10))
        sent = 0
        while p.route.clients and sent < 4000:  # events that neither client reads
            for _ in range(16):
                fake.emit("MIGRATION", {"status": "active", "blob": "x" * 1000})
            sent += 16
            await asyncio.sleep(0.002)
        await p.wait(lambda: len(p.route.clients) == 0, what="both slow readers dropped")
        # Dropped once the kernel's buffer and 64 KB more were full, not at 8 MiB (the default).
        assert 0 < (await slow.eof()).count(b'"event"') < sent < 2000
        assert metric_slow(p) == 2
        r.close()
        slow.close()


def metric_slow(p: Proxy) -> int:
    return p.route.metrics.disconnects["slow"]


async def test_stalled_reply_keeps_other_clients_events_flowing(
    fake: FakeQemu, proxy: Proxy
) -> None:
    """A stalled in-band command blocks only the lane, never the event path."""
    gate = fake.stall("query-status")
    r = await Raw.connect(proxy.path)
    await r.negotiate()
    await r.send(b'{"execute":"query-status","id":1}')
    await fake.wait_until(lambda: "query-status" in names(fake))
    fake.emit("STOP")
    assert (await r.message())["event"] == "STOP"
    gate.set()
    assert (await r.reply())["id"] == 1
    r.close()


async def test_quit_event_before_reply_then_reconnect(fake: FakeQemu, proxy: Proxy) -> None:
    """QEMU writes SHUTDOWN before quit's reply, then goes away (``monitor/qmp.c``)."""
    r = await Raw.connect(proxy.path)
    await r.negotiate()
    await r.send(b'{"execute":"quit","id":"bye"}')
    assert (await r.message())["event"] == "SHUTDOWN"
    assert await r.line() == b'{"return": {}, "id": "bye"}\r\n'
    assert await r.eof() == b""
    r.close()
    await fake.wait_until(lambda: fake.connection_count == 2)
    await proxy.ready()


# -- capabilities and descriptors ------------------------------------------------------------------


async def test_upstream_without_oob(sockdir: str) -> None:
    """The greeting offers what both sides support: nothing, if QEMU offers no oob."""
    async with (
        FakeQemu(f"{sockdir}/qemu.sock", capabilities=()) as fake,
        running_proxy(fake.path, f"{sockdir}/proxy.sock") as p,
    ):
        await p.ready()
        assert fake.commands()[0] == "qmp_capabilities"
        assert "arguments" not in fake.received[0]  # nothing to enable
        r = await Raw.connect(p.path)
        assert (await r.greeting())["QMP"]["capabilities"] == []
        await r.send(b'{"execute":"qmp_capabilities","arguments":{"enable":["oob"]},"id":1}')
        assert await r.line() == (
            b'{"id": 1, "error": {"class": "GenericError", '
            b'"desc": "Capability oob not available"}}\r\n'
        )
        r.close()


def _inode(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


async def test_descriptors_reach_qemu_one_batch_at_a_time(fake: FakeQemu, proxy: Proxy) -> None:
    """Two clients' getfd: the second waits while the first is in flight (the descriptor gate,
    docs/design.md, 'Descriptors and the journal'), other commands do not, and each name ends up
    with its own client's descriptor."""
    gate = fake.stall("getfd")
    pipes = [os.pipe(), os.pipe()]
    try:
        async with qmp_clients(proxy.path, 3) as (a, b, c):
            a.send_fd_scm(pipes[0][0])
            first = asyncio.ensure_future(a.execute("getfd", {"fdname": "a"}))
            await fake.wait_until(lambda: "getfd" in names(fake))
            b.send_fd_scm(pipes[1][0])
            second = asyncio.ensure_future(b.execute("getfd", {"fdname": "b"}))
            # C's command is sent (QEMU then runs it after the stalled getfd, in order);
            # B's getfd, and B's command behind it, are not.
            other = asyncio.ensure_future(c.execute("query-status"))
            behind = asyncio.ensure_future(b.execute("query-status"))
            await fake.wait_until(lambda: "query-status" in names(fake))
            await asyncio.sleep(0.05)
            assert names(fake).count("getfd") == 1
            assert names(fake).count("query-status") == 1
            gate.set()
            done = await asyncio.wait_for(asyncio.gather(first, second, other, behind), TIMEOUT)
            assert list(done[:2]) == [{}, {}]
        assert names(fake)[-4:] == ["getfd", "query-status", "getfd", "query-status"]
        assert sorted(fake.named_fds) == ["a", "b"]
        assert _inode(fake.named_fds["a"]) == _inode(pipes[0][0])
        assert _inode(fake.named_fds["b"]) == _inode(pipes[1][0])
        getfds = [m for m in fake.received if m.name == "getfd"]
        assert [len(m.fds) for m in getfds] == [1, 1]  # each in the sendmsg of its command
    finally:
        for r, w in pipes:
            os.close(r)
            os.close(w)
