"""Fault injection: the real proxy, in-process, against QEMUs that die, stall or are
held by someone else, and against clients that misbehave in every way a socket allows.

What every test here checks, beyond its own scenario:

* sessions end *cleanly*: a client sees complete reply lines and then EOF, never a piece of a
  line QEMU was cut off in, never a hang;
* nothing leaks: open descriptors of this process (the proxy runs in it) and live asyncio tasks
  are back to their baseline after each fault and after the whole test (the route's own
  long-lived task and the fake's per-connection tasks are part of the running baseline);
* the route comes back: after every death, a new client gets a greeting and its commands work.

Timing is never asserted tightly: "responsive" means a well-behaved client's command was
answered *while* the misbehaving client was still misbehaving, and "nothing reordered" is
checked on ids.  Memory is measured on the proxy's own buffers (``session.buffered``, a
stream's ``backlog``), sampled while the fault runs, and on the process's VmRSS where a whole
buffered message would show.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import random
import resource
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from proxy.fdsock import Stream
from proxy.route import Client, Route
from proxy.upstream import Runstate
from tests.aclient import AsyncRaw
from tests.fakeqemu import Call, FakeQemu, Kill, Outcome, Return, encode
from tests.proxyproc import InProcessProxy, in_process
from tests.qemu import QemuProcess, RawQMP

# Reconnect at once, drain briefly on stop; clients held for a dead upstream wait long enough.
LIMITS: dict[str, Any] = {
    "backoff_min": 0.01,
    "backoff_max": 0.05,
    "drain": 0.2,
    "client_wait": 5.0,
}
TIMEOUT = 10.0
VERSIONS = ["7.2", "10.0"]
STRAY_FF = "JSON parse error, stray '\ufffd'"
LIMIT_EXCEEDED = {"error": {"class": "GenericError", "desc": "JSON token size limit exceeded"}}


# -- leak accounting -------------------------------------------------------------------------------


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def live_tasks() -> set[asyncio.Task[Any]]:
    me = asyncio.current_task()
    return {t for t in asyncio.all_tasks() if t is not me and not t.done()}


def vm_rss() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


async def settle(predicate: Callable[[], bool], timeout: float = TIMEOUT, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        await asyncio.sleep(0.01)


@dataclass(frozen=True)
class Baseline:
    """Open descriptors and live tasks at one moment (counts: the fake's per-connection tasks
    are replaced, not kept, when the proxy reconnects)."""

    fds: int
    tasks: int

    @classmethod
    def take(cls) -> Baseline:
        return cls(fd_count(), len(live_tasks()))

    async def restored(self, what: str, timeout: float = TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while (now := Baseline.take()) != self:
            if time.monotonic() > deadline:
                tasks = sorted(t.get_name() + ":" + repr(t.get_coro()) for t in live_tasks())
                raise AssertionError(f"{what}: leaked: {now} != {self}; tasks {tasks}")
            gc.collect()
            await asyncio.sleep(0.01)


# Clients a test opened: closed before the leak check even when the test failed half-way, so
# a failure is reported once, not again as a leak.
OPENED: list[AsyncRaw] = []


async def connect(path: str) -> AsyncRaw:
    c = await AsyncRaw.connect(path)
    OPENED.append(c)
    return c


@pytest.fixture
async def no_leaks() -> AsyncIterator[None]:
    """Nothing the fake, the proxy and the clients opened outlives the test."""
    gc.collect()
    before = Baseline.take()
    yield
    for c in OPENED:
        await c.close()
    OPENED.clear()
    await before.restored("after the test")


# -- plumbing --------------------------------------------------------------------------------------


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A short directory (sun_path holds 107 bytes; pytest's tmp_path can be longer)."""
    path = tempfile.mkdtemp(prefix="qf-", dir="/tmp")
    yield Path(path)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def fake(no_leaks: None, sockdir: Path) -> AsyncIterator[FakeQemu]:
    async with FakeQemu(str(sockdir / "qemu.sock")) as f:
        f.on("x-echo", lambda call: call.arguments)
        yield f


@pytest.fixture
async def proxy(fake: FakeQemu, sockdir: Path) -> AsyncIterator[InProcessProxy]:
    async with in_process(fake.path, sockdir, **LIMITS) as p:
        yield p


def metric(p: InProcessProxy, name: str, **labels: str) -> float:
    value = p.server.metrics.registry.get_sample_value(name, {"vm": "vm", **labels})
    return 0.0 if value is None else float(value)


def metric_sum(p: InProcessProxy, name: str, **labels: str) -> float:
    """Sum over every series of ``name`` whose labels include ``labels``."""
    total = 0.0
    for family in p.server.metrics.registry.collect():
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


async def client(p: InProcessProxy, oob: bool = False) -> AsyncRaw:
    """A greeted, negotiated client."""
    c = await connect(p.sock)
    c.greeting = await c.message()
    enable = b', "arguments": {"enable": ["oob"]}' if oob else b""
    await c.send(b'{"execute": "qmp_capabilities"' + enable + b"}")
    assert await c.reply() == {"return": {}}
    return c


def echo(tag: str, n: int) -> bytes:
    """A command the fake echoes; its id and payload name the sender and its sequence number,
    so a reply that reached the wrong client, or came twice, or out of order, shows."""
    return json.dumps(
        {"execute": "x-echo", "arguments": {"t": tag, "n": n}, "id": f"{tag}-{n}"}
    ).encode()


def check_status(msg: dict[str, Any], id_: str | int) -> None:
    """A real QEMU's query-status reply (7.2 adds ``singlestep``)."""
    assert msg.get("id") == id_ and msg.get("return", {}).get("status") == "prelaunch", (id_, msg)


def check_echo(msg: dict[str, Any], tag: str, n: int) -> None:
    assert msg == {"return": {"t": tag, "n": n}, "id": f"{tag}-{n}"}, (tag, n, msg)


async def until_eof(c: AsyncRaw, timeout: float = TIMEOUT) -> list[dict[str, Any]]:
    """Everything the proxy still sends, then EOF: complete CRLF lines only."""
    data = await asyncio.wait_for(c.reader.read(), timeout)
    assert data == b"" or data.endswith(b"\r\n"), (
        f"a cut-off line reached the client: {data[-80:]!r}"
    )
    return [json.loads(line) for line in data.splitlines()]


def newest_client(route: Route) -> Client:
    return route.clients[max(route.clients)]


def watch_backlog(stream: Stream) -> list[int]:
    """Record the peak of ``stream.backlog`` after every write (an observer on the instance)."""
    peak = [0]
    write = stream.write

    def observed(data: bytes, fds: list[int] | None = None) -> None:
        write(data, fds)
        peak[0] = max(peak[0], stream.backlog)

    stream.write = observed  # type: ignore[method-assign]  # a spy on this instance
    return peak


async def responsive(c: AsyncRaw, busy: Callable[[], bool], tag: str) -> int:
    """A well-behaved client (negotiated before the fault began) sends commands one after
    another while ``busy()`` holds; then it leaves.

    Returns how many were answered while the fault was still going on (the callers assert at
    least one: the bound on latency is "answered before the misbehaviour is over").
    """
    answered = 0
    n = 0
    try:
        while busy():
            await c.send(echo(tag, n))
            msg = await c.reply()
            check_echo(msg, tag, n)
            n += 1
            if busy():
                answered += 1
            await asyncio.sleep(0.005)
    finally:
        await c.close()
    return answered


async def ready_again(p: InProcessProxy, fake: FakeQemu, connections: int) -> None:
    await settle(lambda: fake.connection_count >= connections, what="the route to reconnect")
    await p.wait_ready()
    c = await client(p)
    await c.send(echo("again", 1))
    check_echo(await c.reply(), "again", 1)
    await c.close()


# -- upstream deaths -------------------------------------------------------------------------------


async def test_upstream_dies_before_the_greeting(no_leaks: None, sockdir: Path) -> None:
    """A QEMU that accepts and dies before greeting, again and again: the route retries (as
    ``no_greeting``), a client that came meanwhile is held, then greeted once a QEMU greets."""
    path = str(sockdir / "qemu.sock")
    deaths = 0

    async def die(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal deaths
        deaths += 1
        await asyncio.sleep(0.02)  # the proxy is awaiting the greeting now
        writer.transport.abort()

    dying = await asyncio.start_unix_server(die, path)
    async with in_process(path, sockdir, ready=False, **LIMITS) as p:
        await settle(lambda: deaths >= 3, what="three deaths before the greeting")
        held = await connect(p.sock)
        await settle(lambda: deaths >= 5, what="two more deaths with a client held")
        assert len(p.route.clients) == 1 and newest_client(p.route).session is None
        dying.close()
        await dying.wait_closed()
        assert metric(p, "qmp_proxy_upstream_connects_total", result="no_greeting") >= 4
        assert metric(p, "qmp_proxy_upstream_up") == 0
        async with FakeQemu(path) as fake:
            fake.on("x-echo", lambda call: call.arguments)
            await p.wait_ready()
            assert "QMP" in await held.message()  # greeted only now
            await held.send(b'{"execute":"qmp_capabilities"}' + echo("held", 1))
            assert await held.reply() == {"return": {}}
            check_echo(await held.reply(), "held", 1)
            await held.close()
            await ready_again(p, fake, 1)


@pytest.mark.parametrize("how", ["abrupt", "half-line"])
async def test_upstream_dies_during_the_schema_probe(
    fake: FakeQemu, sockdir: Path, how: str
) -> None:
    kills: list[int] = []

    def schema(call: Call) -> Outcome:
        if kills:
            return fake.schema
        kills.append(call.conn.number)
        if how == "half-line":
            line = encode({"return": fake.schema, "id": call.msg["id"]})
            call.conn.write(line[: len(line) // 2])
            call.conn.close_after_flush()
        return Kill()

    fake.on("query-qmp-schema", schema)
    async with in_process(fake.path, sockdir, ready=False, **LIMITS) as p:
        held = await connect(p.sock)  # connects during the first, doomed probe
        await p.wait_ready()
        assert kills == [1] and fake.connection_count == 2
        assert fake.commands(conn=2)[:2] == ["qmp_capabilities", "query-qmp-schema"]
        assert metric(p, "qmp_proxy_upstream_connects_total", result="error") == 1
        assert metric(p, "qmp_proxy_upstream_connects_total", result="ok") == 1
        assert "QMP" in await held.message()
        await held.send(b'{"execute":"qmp_capabilities"}' + echo("held", 1))
        assert await held.reply() == {"return": {}}
        check_echo(await held.reply(), "held", 1)
        await held.close()
        await ready_again(p, fake, 2)


async def test_upstream_dies_mid_reply(fake: FakeQemu, proxy: InProcessProxy) -> None:
    """Half a reply line, then nothing: the sessions end with complete lines only."""
    running = Baseline.take()
    cut = False

    def half(call: Call) -> Outcome:
        nonlocal cut
        if cut:
            return call.arguments
        cut = True
        return Kill(half_line=True)

    fake.on("x-cut", half)
    victim = await client(proxy)
    behind = await client(proxy)
    idle = await client(proxy)
    await behind.send(echo("behind", 0))
    check_echo(await behind.reply(), "behind", 0)
    await victim.send(b'{"execute":"x-cut","id":"cut"}' + echo("victim", 1))
    await behind.send(echo("behind", 1))
    assert await until_eof(victim) == []
    assert await until_eof(behind) == []
    assert await until_eof(idle) == []
    for c in (victim, behind, idle):
        await c.close()
    await ready_again(proxy, fake, 2)
    await settle(lambda: not proxy.route.clients, what="every session to end")
    await running.restored("after the reconnect")


@pytest.mark.parametrize(
    "step", ["query-migrate-capabilities", "query-migrate", "migrate-set-capabilities", "migrate"]
)
async def test_upstream_dies_between_the_steps_of_a_split(
    fake: FakeQemu, proxy: InProcessProxy, step: str
) -> None:
    """Kill the connection when the split's ``step`` arrives (every command it runs, journal
    included): the session ends without a reply, a session waiting behind the held lane ends
    too, the lane is free after the reconnect, and the journal left QEMU as it was."""
    running = Baseline.take()
    behind_queued = asyncio.Event()
    inner = fake.handlers[step]
    killed: list[str] = []

    async def die_once(call: Call) -> Outcome:
        if killed:
            result = inner(call)
            return await result if isinstance(result, Awaitable) else result
        killed.append(call.name)
        await behind_queued.wait()
        return Kill()

    fake.on(step, die_once)
    splitter = await client(proxy)
    behind = await client(proxy)
    caps = b'[{"capability": "xbzrle", "state": true}]'
    await splitter.send(
        b'{"execute": "migrate", "arguments": {"uri": "exec:true", "capabilities": %s}, '
        b'"id": "split"}' % caps
    )
    await settle(lambda: proxy.route.lane.held, what="the split to hold the lane")
    await behind.send(echo("behind", 1))
    await settle(lambda: proxy.route.lane.queued == 1, what="a command waiting behind the split")
    behind_queued.set()
    assert await until_eof(splitter) == []
    assert await until_eof(behind) == []
    await splitter.close()
    await behind.close()
    assert killed == [step]
    await ready_again(proxy, fake, 2)
    assert not proxy.route.lane.held
    assert proxy.route.lane.in_flight == 0 and proxy.route.lane.queued == 0
    # The capability was never set, or the journal put it back after the reconnect.
    restored = "migrate-set-capabilities" in fake.commands(conn=2)
    assert restored == (step in ("migrate-set-capabilities", "migrate"))
    assert fake.migration_caps["xbzrle"] is False
    assert proxy.route.journal is not None and not proxy.route.journal.path.exists()
    # The lane is whole again: another split runs from start to end.
    again = await client(proxy)
    await again.send(
        b'{"execute": "migrate", "arguments": {"uri": "exec:true", "capabilities": %s}, '
        b'"id": "again"}' % caps
    )
    assert await again.reply() == {"return": {}, "id": "again"}
    assert fake.migration_caps.get("xbzrle") is True  # mypy keeps [...] narrowed to False
    await again.close()
    await running.restored("after the reconnect")


@pytest.mark.parametrize("how", ["abrupt", "half-line"])
async def test_upstream_dies_with_fifty_sessions_in_flight(
    fake: FakeQemu, proxy: InProcessProxy, how: str
) -> None:
    running = Baseline.take()
    fake.inband_delay = 0.001  # QEMU is busy: commands queue in the window and the lane
    sessions, per = 50, 12
    clients = [await client(proxy) for _ in range(sessions)]
    for i, c in enumerate(clients):
        await c.send(b"".join(echo(f"s{i}", n) for n in range(per)))
    await fake.wait_until(lambda: len(fake.commands(conn=1)) >= 150, timeout=TIMEOUT)
    assert proxy.route.lane.in_flight > 0 and proxy.route.lane.queued > 0
    fake.kill(half_line=b'{"return": {"t": "s1' if how == "half-line" else None)
    seen = 0
    for i, c in enumerate(clients):
        replies = await until_eof(c)
        for n, msg in enumerate(replies):  # a prefix of what it asked, in order, then EOF
            check_echo(msg, f"s{i}", n)
        seen += len(replies)
        await c.close()
    assert 0 < seen < sessions * per
    assert metric_sum(proxy, "qmp_proxy_commands_total", outcome="return") == seen
    assert metric_sum(proxy, "qmp_proxy_commands_total", outcome="dropped") == (
        sessions * per - seen
    )
    assert metric(proxy, "qmp_proxy_client_disconnects_total", reason="upstream_lost") == sessions
    await ready_again(proxy, fake, 2)
    lane = proxy.route.lane
    assert (lane.in_flight, lane.queued, lane.held) == (0, 0, False)
    await running.restored("after the reconnect")


# -- stalls and a monitor held by someone else ----------------------------------------------------


async def test_upstream_stall_queues_without_timeouts_or_reordering(
    fake: FakeQemu, proxy: InProcessProxy
) -> None:
    """QEMU's main loop stops for a while (as after an ``exec:`` migration): in-band commands
    queue behind the stalled one, exec-oob and negotiation are still answered, and afterwards
    every command gets its own reply, in order, with nothing timed out or reconnected."""
    stall = 2.0
    fake.on("x-stall", lambda call: Return({"stalled": True}, delay=stall))
    fake.reset_counters()
    clients = [await client(proxy) for _ in range(4)]
    started = time.monotonic()
    await clients[0].send(b'{"execute":"x-stall","id":"stall"}')
    await fake.wait_until(lambda: "x-stall" in fake.commands())
    for i, c in enumerate(clients):
        await c.send(b"".join(echo(f"c{i}", n) for n in range(25)))
    # During the stall: a new client is greeted and negotiated, exec-oob overtakes.
    late = await client(proxy, oob=True)
    await late.send(b'{"exec-oob": "yank", "arguments": {"instances": []}, "id": "oob"}')
    assert await late.reply() == {"return": {}, "id": "oob"}
    assert time.monotonic() - started < stall
    states = set()
    while time.monotonic() - started < stall * 0.9:
        states.add(proxy.route.state)
        await asyncio.sleep(0.05)
    assert states == {Runstate.READY}
    assert await clients[0].reply() == {"return": {"stalled": True}, "id": "stall"}
    assert time.monotonic() - started >= stall
    for i, c in enumerate(clients):
        for n in range(25):
            check_echo(await c.reply(), f"c{i}", n)
    for c in [*clients, late]:
        await c.close()
    assert fake.connection_count == 1
    assert metric(proxy, "qmp_proxy_upstream_connects_total", result="ok") == 1
    assert fake.max_inband_pending <= 7
    assert metric_sum(proxy, "qmp_proxy_commands_total", outcome="return") == 1 + 100 + 1


@pytest.mark.qemu
@pytest.mark.parametrize("version", VERSIONS)
async def test_real_qemu_stall_queues_without_timeouts_or_reordering(
    no_leaks: None, sockdir: Path, version: str
) -> None:
    """The same with a real QEMU stopped by SIGSTOP: nothing reads its monitor meanwhile."""
    with QemuProcess(version, "-M", "none") as q:
        async with in_process(q.sock_path, sockdir, **LIMITS) as p:
            clients = [await client(p) for _ in range(3)]
            os.kill(q.pid, signal.SIGSTOP)
            try:
                for i, c in enumerate(clients):
                    await c.send(
                        b"".join(
                            b'{"execute":"query-status","id":"c%d-%d"}' % (i, n) for n in range(10)
                        )
                    )
                await asyncio.sleep(1.5)
                assert p.route.state == Runstate.READY
            finally:
                os.kill(q.pid, signal.SIGCONT)
            for i, c in enumerate(clients):
                for n in range(10):
                    check_status(await c.reply(), f"c{i}-{n}")
                await c.close()
            assert metric(p, "qmp_proxy_upstream_connects_total", result="ok") == 1


async def test_monitor_held_by_another_client(fake: FakeQemu, sockdir: Path) -> None:
    squatter = await connect(fake.path)
    await squatter.message()
    async with in_process(fake.path, sockdir, ready=False, **LIMITS) as p:
        await p.wait_state(Runstate.AWAITING_GREETING)
        assert p.server.not_ready() == {"vm": "awaiting greeting"}
        assert metric(p, "qmp_proxy_upstream_up") == 0
        waiting = await connect(p.sock)
        await asyncio.sleep(0.3)
        assert p.route.state == Runstate.AWAITING_GREETING  # waiting in QEMU's queue, not retrying
        assert fake.connection_count == 1
        assert (
            sum(
                metric(p, "qmp_proxy_upstream_connects_total", result=r)
                for r in ("ok", "refused", "no_greeting", "error")
            )
            == 0
        )
        with pytest.raises(TimeoutError):
            await waiting.line(timeout=0.05)
        await squatter.close()
        await p.wait_ready()
        assert p.server.not_ready() == {}
        assert "QMP" in await waiting.message()
        await waiting.send(b'{"execute":"qmp_capabilities"}' + echo("w", 1))
        assert await waiting.reply() == {"return": {}}
        check_echo(await waiting.reply(), "w", 1)
        await waiting.close()


@pytest.mark.qemu
@pytest.mark.parametrize("version", VERSIONS)
async def test_real_qemu_monitor_held_by_another_client(
    no_leaks: None, sockdir: Path, version: str
) -> None:
    with QemuProcess(version, "-M", "none") as q:
        squatter = RawQMP(q.sock_path)
        squatter.negotiate()
        async with in_process(q.sock_path, sockdir, ready=False, **LIMITS) as p:
            await p.wait_state(Runstate.AWAITING_GREETING)
            assert p.server.not_ready() == {"vm": "awaiting greeting"}
            waiting = await connect(p.sock)
            await asyncio.sleep(0.3)
            assert p.route.state == Runstate.AWAITING_GREETING
            with pytest.raises(TimeoutError):
                await waiting.line(timeout=0.05)
            check_status(squatter.command({"execute": "query-status", "id": 0}), 0)
            squatter.close()
            await p.wait_ready()
            assert "QMP" in await waiting.message()
            await waiting.send(b'{"execute":"qmp_capabilities"}{"execute":"query-status","id":1}')
            assert await waiting.reply() == {"return": {}}
            check_status(await waiting.reply(), 1)
            await waiting.close()


@pytest.mark.qemu
@pytest.mark.parametrize("version", VERSIONS)
async def test_real_qemu_killed_with_sessions_in_flight(
    no_leaks: None, sockdir: Path, version: str
) -> None:
    """SIGKILL a real QEMU under 50 pipelining sessions; a new QEMU comes up at the same path
    (a symlink the test repoints): the sessions end cleanly, the route serves the new one."""
    link = sockdir / "qmp.sock"
    with QemuProcess(version, "-M", "none") as first:
        os.symlink(first.sock_path, link)
        async with in_process(str(link), sockdir, **LIMITS) as p:
            running = Baseline.take()
            clients = [await client(p) for _ in range(50)]
            for i, c in enumerate(clients):
                await c.send(
                    b"".join(
                        b'{"execute":"query-status","id":"c%d-%d"}' % (i, n) for n in range(20)
                    )
                )
            await settle(lambda: metric_sum(p, "qmp_proxy_commands_total") >= 100)
            os.kill(first.pid, signal.SIGKILL)
            seen = 0
            for i, c in enumerate(clients):
                replies = await until_eof(c)
                for n, msg in enumerate(replies):
                    check_status(msg, f"c{i}-{n}")
                seen += len(replies)
                await c.close()
            assert seen < 50 * 20
            await p.wait_state(Runstate.DOWN)
            first.stop()
            with QemuProcess(version, "-M", "none") as second:
                os.unlink(link)
                os.symlink(second.sock_path, link)
                await p.wait_ready()
                c = await client(p)
                await c.send(b'{"execute":"query-status","id":"new"}')
                check_status(await c.reply(), "new")
                await c.close()
                await running.restored("after the new QEMU")
            await p.wait_state(Runstate.DOWN)


# -- half-close ------------------------------------------------------------------------------------


@pytest.mark.qemu
@pytest.mark.parametrize("version", VERSIONS)
async def test_half_close_with_exec_oob_in_flight_still_answers_it(
    no_leaks: None, sockdir: Path, version: str
) -> None:
    """After a client's read-EOF every command already received is run and answered, then the
    session closes.  QEMU answers an exec-oob received before the EOF (``printf ... | socat``
    gets it); the proxy must too, not close as soon as no *in-band* command is left."""
    data = (
        b'{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}'
        b'{"exec-oob": "query-yank", "id": "oob"}'
    )

    def direct(path: str) -> list[dict[str, Any]]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(TIMEOUT)
            sock.connect(path)
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            out = b""
            while chunk := sock.recv(65536):
                out += chunk
            return [json.loads(line) for line in out.splitlines()][1:]  # after the greeting

    with QemuProcess(version, "-M", "none") as q:
        expected = await asyncio.to_thread(direct, q.sock_path)
        assert [m.get("id") for m in expected] == [None, "oob"]
        async with in_process(q.sock_path, sockdir, **LIMITS) as p:
            c = await connect(p.sock)
            await c.message()
            await c.send(data)
            c.writer.write_eof()
            got = await until_eof(c)
            await c.close()
            assert got == expected, "the exec-oob reply was dropped at the client's half-close"


# -- client misbehaviour ---------------------------------------------------------------------------


async def read_until_id(c: AsyncRaw, id_: str) -> list[dict[str, Any]]:
    """Every message up to and including the reply with ``id_``."""
    out = []
    while True:
        msg = await c.message()
        out.append(msg)
        if msg.get("id") == id_:
            return out


async def test_garbage_gets_errors_and_the_session_goes_on(
    fake: FakeQemu, proxy: InProcessProxy
) -> None:
    rnd = random.Random(5)
    garbage = bytes(rnd.randrange(256) for _ in range(64 << 10))
    bad = await client(proxy)
    sending = True

    async def spew() -> None:
        nonlocal sending
        for at in range(0, len(garbage), 4096):
            await bad.send(garbage[at : at + 4096])
            await asyncio.sleep(0.002)
        # A control character resets QEMU's parser (qmp-spec); then a command works.
        await bad.send(b"\x01" + echo("after", 1))
        sending = False

    probe = await client(proxy)
    spewing = asyncio.ensure_future(spew())
    answered = await responsive(probe, lambda: sending, "probe")
    await spewing
    replies = await read_until_id(bad, "after-1")
    check_echo(replies[-1], "after", 1)
    assert len(replies) > 100
    assert all(set(m) == {"error"} for m in replies[:-1])  # QEMU's parse errors carry no id
    assert answered >= 1
    assert metric(proxy, "qmp_proxy_protocol_errors_total", kind="parse") >= 100
    await bad.close()


async def test_0xff_storm(fake: FakeQemu, proxy: InProcessProxy) -> None:
    """Every 0xFF is a lexical error of its own in QEMU: one id-less error each, in order,
    and a concurrent client is answered while the storm lasts."""
    storm = 64 << 10
    bad = await client(proxy)
    peak = watch_backlog(newest_client(proxy.route).stream)
    errors = 0
    storming = True

    async def spew() -> None:
        for _ in range(storm // 4096):
            await bad.send(b"\xff" * 4096)
            await asyncio.sleep(0.001)
        await bad.send(echo("after", 1))

    async def count() -> None:
        nonlocal errors, storming
        stray = {"error": {"class": "GenericError", "desc": STRAY_FF}}
        while (msg := await bad.message()) == stray:
            errors += 1
        check_echo(msg, "after", 1)
        storming = False

    probe = await client(proxy)
    tasks = [asyncio.ensure_future(spew()), asyncio.ensure_future(count())]
    answered = await responsive(probe, lambda: storming, "probe")
    await asyncio.wait_for(asyncio.gather(*tasks), TIMEOUT)
    assert errors == storm
    assert answered >= 1
    # A reading client's backlog stays well under the slow-reader limit.
    assert peak[0] < 8 << 20
    await bad.close()


async def test_0xff_storm_from_a_client_that_never_reads_stays_within_the_backlog_limit(
    fake: FakeQemu, sockdir: Path
) -> None:
    """A session's output backlog is bounded (``max_backlog``, docs/design.md, 'Budgets'); a
    client that does not read is disconnected as slow.  Each 0xFF byte makes an ~80-byte error
    reply, so one client read of 0xFF bytes (CLIENT_READ_SIZE = 4 KiB) turns into ~330 KB of
    replies; the limit must hold however the replies were caused, not only once a whole read's
    replies are queued."""
    limit = 1 << 20
    async with in_process(fake.path, sockdir, max_backlog=limit, **LIMITS) as p:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_connect(sock, p.sock)
        await settle(lambda: bool(p.route.clients))
        session_client = newest_client(p.route)
        peak = watch_backlog(session_client.stream)
        await loop.sock_sendall(sock, b'{"execute":"qmp_capabilities"}')
        with contextlib.suppress(OSError):
            for _ in range(16):
                await loop.sock_sendall(sock, b"\xff" * (64 << 10))
                if session_client.ended:
                    break
        await settle(lambda: session_client.ended, what="the slow reader to be dropped")
        sock.close()
        assert metric(p, "qmp_proxy_client_disconnects_total", reason="slow") == 1
        reply = len(encode({"error": {"class": "GenericError", "desc": STRAY_FF}}))
        assert peak[0] <= limit + reply, (
            f"the session's output backlog reached {peak[0]} bytes "
            f"({peak[0] / limit:.1f} x max_backlog={limit}) before the slow reader was dropped"
        )


async def test_hundred_mib_message(fake: FakeQemu, proxy: InProcessProxy) -> None:
    """QEMU's limit error once, the rest of the message skipped while it streams in, the next
    message works; the proxy never buffers more than ~max_message for it."""
    chunk = b"a" * (1 << 20)
    total = 100
    bad = await client(proxy)
    session = newest_client(proxy.route).session
    assert session is not None
    buffered: list[int] = []
    rss_start = vm_rss()
    rss_peak = rss_start
    sent_chunks = 0
    limit_at: int | None = None

    async def stream() -> None:
        nonlocal sent_chunks, rss_peak
        await bad.send(b'{"execute": "x-big", "arguments": {"blob": "')
        for _ in range(total):
            await bad.send(chunk)
            sent_chunks += 1
            buffered.append(session.buffered)
            rss_peak = max(rss_peak, vm_rss())
        await bad.send(b'"}, "id": "big"}' + echo("next", 1))

    async def read() -> list[dict[str, Any]]:
        nonlocal limit_at
        first = await bad.message(timeout=60)
        limit_at = sent_chunks
        return [first, *await read_until_id(bad, "next-1")]

    probe = await client(proxy)
    streaming = asyncio.ensure_future(stream())
    reading = asyncio.ensure_future(read())
    answered = await responsive(probe, lambda: not streaming.done(), "probe")
    await asyncio.wait_for(streaming, 60)
    replies = await asyncio.wait_for(reading, TIMEOUT)
    assert replies[0] == LIMIT_EXCEEDED
    assert len(replies) == 2
    check_echo(replies[1], "next", 1)
    assert limit_at is not None and limit_at < total // 2  # answered while it still streamed
    assert "x-big" not in fake.commands()
    assert max(buffered) < 2 << 20, max(buffered)
    assert rss_peak - rss_start < 64 << 20, (rss_start, rss_peak)
    assert answered >= 1
    await bad.close()


async def test_nothing_inside_an_oversized_message_reaches_qemu(
    fake: FakeQemu, proxy: InProcessProxy
) -> None:
    """The rest of an oversized message is skipped, whatever it contains and however it is
    split into writes: an object inside it that looks like a command is not one.

    Here the client's write boundary falls just before such an inner object, after the proxy
    had already answered the size error and was skipping to the message's end."""
    bad = await client(proxy)
    head = b'{"execute": "x-big", "arguments": {"pad": "' + b"a" * (1100 << 10) + b'", "inner": '
    await bad.send(head)
    assert await bad.message() == LIMIT_EXCEEDED
    sent = len(head) + len(b'{"execute": "qmp_capabilities"}')
    await settle(
        lambda: metric(proxy, "qmp_proxy_bytes_total", peer="client", direction="in") >= sent,
        what="the proxy to read the whole head",
    )
    await bad.send(b'{"execute": "x-echo", "arguments": {"t": "smuggled", "n": 1}}}}')
    await bad.send(echo("next", 1))
    replies = await read_until_id(bad, "next-1")
    check_echo(replies[-1], "next", 1)
    smuggled = [m for m in fake.received if m.get("arguments", {}).get("t") == "smuggled"]
    assert smuggled == [], f"a command inside the oversized message reached QEMU: {smuggled}"
    assert replies[:-1] == [], replies
    await bad.close()


@pytest.mark.parametrize("shape", ["arrays", "objects"])
async def test_deep_nesting(fake: FakeQemu, proxy: InProcessProxy, shape: str) -> None:
    depth = 2000
    if shape == "arrays":
        data = b"[" * depth + b"]" * depth
    else:
        data = b'{"a": ' * depth + b"1" + b"}" * depth
    bad = await client(proxy)
    await bad.send(data + echo("after", 1))
    replies = await read_until_id(bad, "after-1")
    check_echo(replies[-1], "after", 1)
    assert replies[0] == {
        "error": {"class": "GenericError", "desc": "JSON nesting depth limit exceeded"}
    }
    assert all(set(m) == {"error"} for m in replies[:-1])
    c = await client(proxy)
    await c.send(echo("other", 1))
    check_echo(await c.reply(), "other", 1)
    await c.close()
    await bad.close()


@pytest.mark.qemu
@pytest.mark.parametrize("version", VERSIONS)
async def test_misbehaviour_gets_qemus_own_replies(
    no_leaks: None, sockdir: Path, version: str
) -> None:
    """The same abuse sent to a real QEMU directly and through the proxy: the same replies."""
    rnd = random.Random(7)
    inputs = {
        "arrays": b"[" * 2000 + b"]" * 2000,
        "objects": b'{"a": ' * 2000 + b"1" + b"}" * 2000,
        "0xff": b"\xff" * 500,
        "garbage": bytes(rnd.randrange(256) for _ in range(2000)),
    }
    end = b'\x01{"execute": "query-status", "id": "end"}'

    def direct(path: str, data: bytes) -> list[bytes]:
        with RawQMP(path) as raw:
            raw.negotiate()
            raw.send(data + end)
            lines = []
            while not (line := raw.recv_line()).endswith(b'"id": "end"}'):
                lines.append(line + b"\r\n")
            return lines

    with QemuProcess(version, "-M", "none") as q:
        expected = {
            name: await asyncio.to_thread(direct, q.sock_path, data)
            for name, data in inputs.items()
        }
        async with in_process(q.sock_path, sockdir, **LIMITS) as p:
            for name, data in inputs.items():
                c = await client(p)
                await c.send(data + end)
                lines = []
                while not (line := await c.line()).endswith(b'"id": "end"}\r\n'):
                    lines.append(line)
                await c.close()
                assert lines == expected[name], name
                assert len(lines) >= (500 if name == "0xff" else 2), name


async def test_one_byte_every_10ms(fake: FakeQemu, proxy: InProcessProxy) -> None:
    slow = await client(proxy)
    message = echo("slow", 1)
    dribbling = True

    async def dribble() -> None:
        nonlocal dribbling
        for byte in message:
            await slow.send(bytes([byte]))
            await asyncio.sleep(0.01)
        dribbling = False

    probe = await client(proxy)
    task = asyncio.ensure_future(dribble())
    answered = await responsive(probe, lambda: dribbling, "probe")
    await task
    check_echo(await slow.reply(), "slow", 1)
    assert answered >= 3
    assert newest_client(proxy.route).session is not None
    await slow.close()


async def test_connect_and_vanish_a_thousand_times(fake: FakeQemu, proxy: InProcessProxy) -> None:
    running = Baseline.take()
    loop = asyncio.get_running_loop()
    connections = metric(proxy, "qmp_proxy_client_connections_total")
    vanishing = True

    async def vanish(n: int) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, proxy.sock)
            kind = n % 4
            if kind == 1:
                await loop.sock_recv(sock, 4096)  # the greeting
            elif kind == 2:
                await loop.sock_sendall(sock, b'{"execute": "qmp_capabil')
            elif kind == 3:
                await loop.sock_sendall(sock, b'{"execute":"qmp_capabilities"}' + echo("gone", n))
        finally:
            sock.close()

    async def storm() -> None:
        nonlocal vanishing
        for batch in range(20):
            await asyncio.gather(*(vanish(batch * 50 + i) for i in range(50)))
        vanishing = False

    probe = await client(proxy)
    task = asyncio.ensure_future(storm())
    answered = await responsive(probe, lambda: vanishing, "probe")
    await task
    assert answered >= 1
    await settle(lambda: not proxy.route.clients, what="every vanished session to end")
    assert metric(proxy, "qmp_proxy_client_connections_total") - connections == 1001
    ended = sum(
        metric(proxy, "qmp_proxy_client_disconnects_total", reason=r)
        for r in ("eof", "reset", "slow", "limit", "upstream_lost", "shutdown")
    )
    assert ended == 1001
    assert metric(proxy, "qmp_proxy_client_sessions") == 0
    await running.restored("after a thousand vanished clients")
    c = await client(proxy)
    await c.send(echo("after", 1))
    check_echo(await c.reply(), "after", 1)
    await c.close()


async def test_client_that_never_reads_while_events_flood(fake: FakeQemu, sockdir: Path) -> None:
    limit = 1 << 20
    async with in_process(fake.path, sockdir, max_backlog=limit, **LIMITS) as p:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await loop.sock_connect(sock, p.sock)
        await settle(lambda: bool(p.route.clients))
        sleeper = newest_client(p.route)
        peak = watch_backlog(sleeper.stream)
        await loop.sock_sendall(sock, b'{"execute":"qmp_capabilities"}')
        await settle(lambda: sleeper.session is not None and sleeper.session.negotiated)
        reader = await client(p)
        blob = "x" * 4000
        sent = 0
        events = 0
        answered_during = 0
        for batch in range(60):
            for _ in range(20):
                fake.emit("MIGRATION", {"status": "active", "blob": blob})
                sent += 1
            if batch % 10 == 5:
                await reader.send(echo("reader", batch))
                while "event" in (msg := await reader.message()):
                    events += 1
                check_echo(msg, "reader", batch)
                answered_during += 1
            await asyncio.sleep(0.002)
        await settle(lambda: sleeper.ended, what="the non-reader to be dropped")
        while events < sent:
            msg = await reader.message()
            assert msg.get("event") == "MIGRATION", msg
            events += 1
        assert answered_during == 6
        event = {
            "timestamp": {"seconds": 0, "microseconds": 0},
            "event": "MIGRATION",
            "data": {"status": "active", "blob": blob},
        }
        line = len(encode(event)) + 40
        assert peak[0] <= limit + line
        assert metric(p, "qmp_proxy_client_disconnects_total", reason="slow") == 1
        sock.close()
        await reader.close()


# -- a thousand sessions ---------------------------------------------------------------------------


async def test_a_thousand_sessions_in_waves(fake: FakeQemu, sockdir: Path) -> None:
    """1000 sessions at once, in waves: connect, negotiate, get an event, send commands whose
    ids and payloads name the wave, client and sequence (pipelined or one at a time), leave
    (half-close, vanish, or close).  Every reply comes back to its own client, in order, once,
    and the proxy's counters agree with what the clients saw."""
    sessions, waves, per = 1000, 3, 6
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 4 * sessions + 256
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] >= need
    async with in_process(fake.path, sockdir, max_sessions=sessions + 10, **LIMITS) as p:
        running = Baseline.take()
        sent_bytes = 0
        received_bytes = 0
        replies = 0
        events = 0
        concurrent: list[int] = []
        # Unix connect() fails with EAGAIN once the listen backlog (128) is full, and the proxy
        # accepts from this same loop: keep fewer connections than that between connect and
        # greeting.
        connecting = asyncio.Semaphore(64)

        async def session(wave: int, n: int, all_in: asyncio.Event, arrived: list[int]) -> None:
            nonlocal sent_bytes, received_bytes, replies, events
            async with connecting:
                c = await AsyncRaw.connect(p.sock)
                greeting = await c.line()
            received_bytes += len(greeting)
            hello = b'{"execute":"qmp_capabilities","id":%d}' % n
            await c.send(hello)
            sent_bytes += len(hello)
            line = await c.line()
            received_bytes += len(line)
            assert json.loads(line) == {"return": {}, "id": n}
            arrived[0] += 1
            if arrived[0] == sessions:
                # Everyone is negotiated: one event for all, ahead of any reply (it leaves QEMU
                # before any of the commands below arrive there).
                concurrent.append(len(p.route.clients))
                assert fake.emit("MIGRATION", {"status": f"wave{wave}"}) == 1
                all_in.set()
            await all_in.wait()
            tag = f"w{wave}c{n}"
            mode = n % 6
            got = []
            if mode < 3:  # pipelined
                data = b"".join(echo(tag, s) for s in range(per))
                await c.send(data)
                sent_bytes += len(data)
            if mode == 0:
                c.writer.write_eof()  # half-close: every reply still comes, then EOF
                rest = await asyncio.wait_for(c.reader.read(), TIMEOUT)
                received_bytes += len(rest)
                got = [json.loads(x) for x in rest.splitlines()]
            else:
                for s in range(-1, per):  # the event, then one reply per command
                    if mode >= 3 and s >= 0:  # one at a time
                        data = echo(tag, s)
                        await c.send(data)
                        sent_bytes += len(data)
                    line = await c.line()
                    received_bytes += len(line)
                    got.append(json.loads(line))
            assert got[0]["event"] == "MIGRATION" and got[0]["data"] == {"status": f"wave{wave}"}
            events += 1
            assert len(got) == per + 1, (tag, got)
            for s, msg in enumerate(got[1:]):
                check_echo(msg, tag, s)
            replies += len(got) - 1
            if mode % 2:
                c.writer.transport.abort()  # vanish
            await c.close()

        for wave in range(waves):
            all_in = asyncio.Event()
            arrived = [0]
            await asyncio.wait_for(
                asyncio.gather(*(session(wave, n, all_in, arrived) for n in range(sessions))),
                60,
            )
            await settle(lambda: not p.route.clients, what=f"wave {wave} to leave")

        total = sessions * waves
        assert concurrent == [sessions] * waves
        assert replies == total * per and events == total
        assert metric(p, "qmp_proxy_client_connections_total") == total
        assert metric_sum(p, "qmp_proxy_client_disconnects_total") == total
        assert metric(p, "qmp_proxy_client_sessions") == 0
        assert metric_sum(p, "qmp_proxy_commands_total", outcome="return") == total * per
        assert metric_sum(p, "qmp_proxy_commands_total", outcome="dropped") == 0
        assert metric_sum(p, "qmp_proxy_commands_total", outcome="error") == 0
        assert metric(p, "qmp_proxy_events_total", event="MIGRATION") == waves
        assert metric(p, "qmp_proxy_bytes_total", peer="client", direction="in") == sent_bytes
        assert metric(p, "qmp_proxy_bytes_total", peer="client", direction="out") == received_bytes
        assert fake.commands().count("x-echo") == total * per
        await running.restored("after the waves")
