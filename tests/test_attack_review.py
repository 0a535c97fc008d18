"""Findings of an outside attacker's review of the hardened proxy (issues 9-11), against real QEMU.

Each test reproduces one way a client of a restricted listener (``allow = ["query-*"]``, which
the shipped example configuration makes world-writable, ``0666``) can still take something away
from the clients of the open listener: the route's sessions, the process's descriptor budget,
the upstream connection itself, or the command lane's latency.  Each fails on the code it was
written against.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import proxy.server
from proxy.config import Limits
from proxy.session import MAX_CLIENT_MESSAGE, FdBudget
from tests.aclient import AsyncRaw
from tests.qemu import QemuProcess, RawQMP
from tests.test_hardening_clients import serve

# Real QEMU behind the proxy (the marker selects the tests that need the system).
pytestmark = pytest.mark.qemu


def read_only_config(tmp: Path, upstream: str, ro: Path, *open_listens: Path) -> Path:
    """A config file for ``python -m proxy``: a world-writable read-only listener at ``ro`` that
    takes messages as large as any (so the tests reach past the message bound), and open
    listeners."""
    listens = [
        f'{{ address = "unix:{ro}", mode = "0666", allow = ["query-*"],'
        f" max_message = {MAX_CLIENT_MESSAGE} }}",
        *(f'"unix:{path}"' for path in open_listens),
    ]
    config = tmp / "proxy.toml"
    config.write_text(
        f'state_dir = "{tmp}"\ncontrol = ""\n[[route]]\nname = "vm"\n'
        f'upstream = "unix:{upstream}"\nlisten = [{", ".join(listens)}]\n'
    )
    return config


@pytest.fixture(params=["7.2", "10.0"])
def qemu_none(request: pytest.FixtureRequest) -> Iterator[QemuProcess]:
    """QEMU 7.2 and 10.0, ``-M none``, stopped."""
    with QemuProcess(request.param, "-M", "none") as q:
        yield q


def send_with_fds(c: AsyncRaw, data: bytes, fds: list[int]) -> None:
    """Write ``data`` with ``fds`` attached (SCM_RIGHTS) on the client's connection."""
    transport_sock = c.writer.get_extra_info("socket")
    assert transport_sock is not None
    with socket.socket(fileno=os.dup(transport_sock.fileno())) as sock:
        sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])


# -- 1. a read-only listener's clients take every session of the route --------------------------


async def test_read_only_clients_cannot_take_the_open_listeners_sessions(
    qemu_none: QemuProcess, short_tmp: Path
) -> None:
    """``max_sessions`` is one count for the whole route: anyone who can connect to the
    world-writable monitoring socket can open that many idle connections (no idle timeout),
    and the management client on the privileged socket is then closed at once, ungreeted.
    Directly on QEMU a second monitor is unaffected by the first one's clients."""
    limits = Limits(max_sessions=8)
    async with serve(
        qemu_none.sock_path, short_tmp, limits=limits, ro_max_message=MAX_CLIENT_MESSAGE
    ) as s:
        idle = [await AsyncRaw.connect(s.ro_sock) for _ in range(limits.max_sessions)]
        try:
            for c in idle:
                assert "QMP" in await c.message(5)
            manager = await AsyncRaw.connect(s.open_sock)
            try:
                greeting = await manager.message(5)
            except EOFError:
                pytest.fail("the open listener's client was refused: read-only clients hold all")
            assert "QMP" in greeting
            await manager.send(b'{"execute":"qmp_capabilities"}{"execute":"stop","id":1}')
            assert await manager.reply(5) == {"return": {}}
            assert await manager.reply(5) == {"return": {}, "id": 1}
            await manager.close()
        finally:
            for c in idle:
                await c.close()


# -- 2. a read-only listener's clients fill the process's descriptor budget ---------------------


async def test_read_only_clients_cannot_exhaust_the_descriptor_budget(
    qemu_none: QemuProcess, short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that may run neither ``getfd`` nor ``add-fd`` can still pass descriptors, and the
    proxy holds each session's latest batch (16) against the process-wide budget (a quarter of
    RLIMIT_NOFILE: 1024 under the shipped unit, 64 sessions x 16).  Once read-only clients fill
    it, the management client's ``getfd`` batch is closed and its ``getfd`` fails.  Here the
    budget is made small (32) so that two read-only sessions fill it."""
    monkeypatch.setattr(proxy.server, "fd_budget", lambda: FdBudget(32))
    r, w = os.pipe()
    try:
        async with serve(qemu_none.sock_path, short_tmp) as s:
            hoarders = [await s.client(s.ro_sock) for _ in range(2)]
            for c in hoarders:
                send_with_fds(c, b'{"execute":"query-status","id":"h"}', [w] * 16)
                assert (await c.reply(5))["id"] == "h"
            manager = await s.client()
            send_with_fds(manager, b'{"execute":"getfd","arguments":{"fdname":"m"},"id":1}', [w])
            assert await manager.reply(5) == {"return": {}, "id": 1}
            for c in [*hoarders, manager]:
                await c.close()
    finally:
        os.close(r)
        os.close(w)


# -- 3. a message QEMU accepts, re-written by the proxy, is one QEMU refuses: desync ------------

# QEMU's token count limit (qobject/json-streamer.c MAX_TOKEN_COUNT).
TOKEN_LIMIT = 2 << 20


def tokens_exactly(limit: int) -> bytes:
    """A ``query-status`` without an id of exactly ``limit`` tokens (QEMU takes up to its limit):
    ``{ "execute" : "query-status" , "arguments" : { "a" : [ 1 , ... , [ ] ] } }``."""
    ones = (limit - 16) // 2  # 11 tokens before the ones, 5 after
    assert 2 * ones + 16 == limit
    return b'{"execute":"query-status","arguments":{"a":[' + b"1," * ones + b"[]]}}"


async def test_largest_message_qemu_accepts_does_not_desync_the_route(
    qemu_none: QemuProcess, short_tmp: Path
) -> None:
    """``max_message`` may be set up to 64 MiB (the configuration says so).  A read-only client
    sends a message of exactly QEMU's 2**21 tokens and no id: QEMU itself takes it and answers
    ``Parameter 'a' is unexpected``.  The proxy checks it, then writes it for QEMU with its own
    ``"id": N`` added, four tokens more: QEMU answers an id-less "JSON token count limit
    exceeded", the proxy takes that as a desync and ends every client's session (and the rest
    of the message, ``1,1,...``, is a stream of top-level values QEMU would queue faster than
    it can suspend its monitor)."""
    message = tokens_exactly(TOKEN_LIMIT)
    # QEMU itself: one message, answered with its own error and nothing else.
    with RawQMP(qemu_none.sock_path, timeout=120) as raw:
        raw.negotiate()
        raw.send(message + b'{"execute":"query-status","id":"end"}')
        first = json.loads(raw.recv_line())
        assert first == {
            "error": {"class": "GenericError", "desc": "Parameter 'a' is unexpected"}
        }, first
        assert json.loads(raw.recv_line()).get("id") == "end"
    async with serve(
        qemu_none.sock_path,
        short_tmp,
        limits=Limits(max_message=4 << 20),
        ro_max_message=MAX_CLIENT_MESSAGE,
    ) as s:
        bystander = await s.client()
        ro = await s.client(s.ro_sock)
        await ro.send(message + b'{"execute":"query-status","id":"end"}')
        first = await ro.reply(120)
        assert "error" in first and "id" not in first, first
        end = await ro.reply(30)
        assert end.get("id") == "end" and "return" in end, end
        assert s.server.routes[0].metrics.desyncs == 0
        reply = await bystander.command({"execute": "query-status", "id": "still-here"})
        assert reply.get("id") == "still-here", reply
        await ro.close()
        await bystander.close()


# -- 4. a read-only client's big messages become every client's latency -------------------------

BIG = 1_000_000  # bytes of one message: under the default max_message (1 MiB)


def big_query() -> bytes:
    """A ``query-status`` QEMU refuses (``Parameter 'a' is unexpected``) after reading all of it:
    QEMU's monitor reads a byte per main-loop turn, about 5-15 us a byte."""
    return b'{"execute":"query-status","arguments":{"a":"' + b"x" * BIG + b'"}}'


async def victim_latency(attacker_path: str, victim_path: str, proxied: bool) -> float:
    """How long a ``query-status`` on ``victim_path`` takes while a client of ``attacker_path``
    has two big messages on their way."""
    attacker = await AsyncRaw.connect(attacker_path)
    victim = await AsyncRaw.connect(victim_path)
    try:
        await attacker.negotiate()
        await victim.negotiate()
        attacker.writer.write(big_query() * 2)  # drained below, while the victim waits
        drained = asyncio.ensure_future(attacker.writer.drain())
        await asyncio.sleep(0.5 if proxied else 0.2)  # QEMU is reading the first one
        start = time.monotonic()
        await victim.send(b'{"execute":"query-status","id":"victim"}')
        reply = await victim.reply(120)
        latency = time.monotonic() - start
        assert reply.get("id") == "victim", reply
        await drained
        for _ in range(2):
            assert "error" in await attacker.reply(120)
        return latency
    finally:
        await attacker.close()
        await victim.close()


async def test_big_read_only_messages_do_not_stall_other_clients(short_tmp: Path) -> None:
    """QEMU gives each monitor its own reader: a client writing megabytes to one monitor does not
    delay a ``query-status`` on another (measured here: well under 0.1 s).  Through the proxy
    every client shares one monitor connection, in order, so a read-only client's two 1 MB
    messages (each refused by QEMU) sat in front of the management client's command: it waited
    for QEMU to read both, 10-40 s on QEMU 7.2, and a client of the read-only socket could keep
    that up for ever (seven such messages fit the lane's window).  A restricted listener now
    bounds one message at 64 KiB by default (``max_message`` of the listener): what a client
    may send QEMU, every other client may wait for (about 10 us a byte)."""
    with QemuProcess("7.2", "-M", "none") as q:
        assert q.tmpdir is not None
        second = str(q.tmpdir / "second.sock")
        with QemuProcess("7.2", "-M", "none", "-qmp", f"unix:{second},server=on,wait=off") as two:
            direct_latency = await victim_latency(second, two.sock_path, proxied=False)
        assert direct_latency < 0.5, direct_latency
        async with serve(q.sock_path, short_tmp) as s:
            proxied_latency = await victim_latency(s.ro_sock, s.open_sock, proxied=True)
        assert proxied_latency < 2.0, (
            f"query-status took {proxied_latency:.1f} s behind a read-only client's two "
            f"1 MB messages ({direct_latency:.3f} s on QEMU with a monitor each)"
        )


# -- 5. crash safety: a journal the proxy writes but refuses to read ----------------------------


async def test_journal_with_a_long_failed_migration_is_still_restored(tmp_path: Path) -> None:
    """The journal keeps ``query-migrate``'s answer from before the split, and QEMU's answer
    after a failed migration quotes the client's URI in ``error-desc`` (here 70 KB).  The
    journal is written whatever its size, but read back only up to 64 KiB: after a crash
    between ``migrate-set-capabilities`` and ``migrate``, the next proxy calls its own journal
    invalid, moves it aside, and leaves QEMU with the capabilities of a migration that never
    ran, which is exactly what the journal is there to prevent."""
    from tests.test_crash_safety import Relay, capabilities, once, split_request, start_proxy

    state = tmp_path / "state"
    state.mkdir()
    with QemuProcess("7.2", "-M", "none") as qemu:
        relay = Relay(qemu.sock_path, str(tmp_path / "relay.sock"))
        await relay.start()
        proxies = []
        try:
            listen = tmp_path / "proxy0.sock"
            first = await start_proxy(relay.path, listen, state, tmp_path)
            proxies.append(first)
            client = await AsyncRaw.connect(str(listen))
            await client.negotiate()
            failed = {"execute": "migrate", "arguments": {"uri": "tcp:" + "a" * 70000 + ":1"}}
            assert "error" in await client.command(failed)
            before = await capabilities(str(listen))
            assert not before["xbzrle"] and not before["auto-converge"]

            relay.proxy_pid = first.proc.pid
            relay.trigger = once("migrate", "kill")  # after the capabilities were set
            await client.send(split_request("migrate", "exec:cat > /dev/null"))
            await asyncio.wait_for(relay.fired.wait(), 10)
            await asyncio.to_thread(first.proc.wait, 10)
            await client.close()

            listen = tmp_path / "proxy1.sock"
            second = await start_proxy(relay.path, listen, state, tmp_path)
            proxies.append(second)
            log = second.log()
            assert "event=journal_invalid" not in log, log
            assert await capabilities(str(listen)) == before
        finally:
            for p in proxies:
                await asyncio.to_thread(p.stop)
            await relay.close()


# -- 6. connections alone write the log ---------------------------------------------------------


def test_connection_churn_on_the_read_only_socket_cannot_flood_the_log(short_tmp: Path) -> None:
    """Every connection is logged twice (``session_start``, ``session_end``), unthrottled, at the
    default level.  An unprivileged user who may connect to the world-writable monitoring
    socket (and send nothing) wrote about 1 MB of log a second here, 270 bytes per connection:
    a disk filled, or journald's per-service rate limit tripped so that the lines that matter
    (``upstream_desync``, ``backport_restore_failed``) are dropped with the flood.  Policy
    denials and protocol faults already go through a throttle; connections do not."""
    from tests.proxyproc import ProxyProcess

    with QemuProcess("7.2", "-M", "none") as qemu:
        ro = short_tmp / "ro.sock"
        config = read_only_config(short_tmp, qemu.sock_path, ro)
        with ProxyProcess("--config", str(config), tmp_path=short_tmp) as p:
            p.wait_log("upstream_ready")
            size = p.log_path.stat().st_size
            connections = 0
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    try:
                        s.connect(str(ro))
                    except BlockingIOError:  # the listen queue is full: let the proxy catch up
                        time.sleep(0.001)
                        continue
                connections += 1
            while True:  # the proxy catches up
                try:
                    with RawQMP(str(ro)) as c:
                        c.negotiate()
                    break
                except BlockingIOError:
                    time.sleep(0.05)
            grown = p.log_path.stat().st_size - size
    assert grown < 100_000, f"{grown} bytes of log for {connections} connections"


# -- 7. the metrics label cache keeps what clients name ----------------------------------------


def test_denied_command_names_do_not_accumulate_in_memory(short_tmp: Path) -> None:
    """The label caches are bounded in entries (4096), not in bytes, and a command's name is
    as long as a message may be.  Each denied (or unknown) name is kept as a key for ever (until
    the next reconnect to QEMU): 200 denied names of 1 MB from the read-only socket grew the
    proxy by about 450 MB here; 4096 of them are gigabytes, and the OOM killer takes the
    daemon and every route with it.  The id-less error replies (``_idless_error``) and QDict's
    bucket of each key (``qjson._bucket``) are cached the same way: by count, whatever the
    size."""
    from tests.hostile import rss
    from tests.proxyproc import ProxyProcess

    with QemuProcess("7.2", "-M", "none") as qemu:
        ro = short_tmp / "ro.sock"
        config = read_only_config(short_tmp, qemu.sock_path, ro)
        with ProxyProcess("--config", str(config), tmp_path=short_tmp) as p:
            p.wait_log("upstream_ready")
            with RawQMP(str(ro), timeout=60) as c:
                c.negotiate()
                before = rss(p.proc.pid)
                for i in range(200):
                    name = f"{i:06d}" + "x" * 1_000_000
                    reply = c.command({"execute": name})
                    assert reply["error"]["class"] == "CommandNotFound"
                names = rss(p.proc.pid) - before
                # The same with a key of an id: QDict's bucket of every key is cached too.
                before = rss(p.proc.pid)
                for i in range(200):
                    key = f"{i:06d}" + "k" * 500_000
                    ident = {key: 1, key + "2": 2}  # one key alone is not ordered: two
                    reply = c.command({"execute": "query-status", "id": ident})
                    assert "return" in reply
                keys = rss(p.proc.pid) - before
    assert names < 100 << 20, f"the proxy grew by {names >> 20} MiB for 200 denied names"
    assert keys < 100 << 20, f"the proxy grew by {keys >> 20} MiB for 200 ids' keys"


# -- 8. replies held in order behind a slow command ---------------------------------------------


async def test_replies_held_behind_a_slow_command_are_bounded(short_tmp: Path) -> None:
    """Replies leave in the order the requests came, so the proxy's own answers (a denial, a
    parse error) wait in the session behind a command QEMU has not answered yet.  Those bytes
    counted against nothing: not ``max_backlog`` (not written yet), and ``max_queued`` bounds
    their number, not their size.  A read-only client sends a ``query-status`` that QEMU does
    not answer yet (a real QEMU takes seconds to read a 1 MB one; the fake holds it, so the
    test does not depend on how fast this QEMU reads) and then 60 denied 1 MB names: each
    denial quotes the name, and the proxy took and held all of them, 60 MB for one session
    (64 sessions of the read-only socket: gigabytes).  Now it stops reading the client once
    the held replies pass ``max_backlog`` (8 MiB), until they leave."""
    from tests.fakeqemu import FakeQemu

    upstream = str(short_tmp / "fake.sock")
    async with FakeQemu(upstream) as fake:
        gate = fake.stall("query-status")
        async with serve(upstream, short_tmp, ro_max_message=MAX_CLIENT_MESSAGE) as s:
            reader, writer = await asyncio.open_unix_connection(s.ro_sock, limit=1 << 24)
            await reader.readline()
            writer.write(b'{"execute":"qmp_capabilities"}')
            await reader.readline()
            writer.write(b'{"execute":"query-status"}')
            total = 60 * (BIG + 16)
            writer.write(
                b"".join(b'{"execute":"' + b"%06d" % i + b"y" * BIG + b'"}' for i in range(60))
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(writer.drain(), 3.0)
            # What the proxy took from the client: all it sent, but what is still queued here
            # and what the kernel's socket buffers hold (far below a MiB on a unix socket).
            taken = total - writer.transport.get_write_buffer_size()
            writer.close()
            gate.set()
    assert taken < 16 << 20, f"the proxy took {taken >> 20} MiB it can only hold as replies"


# -- 9. a message's whole parse happens in the callback of its last byte -----------------------


def test_messages_completed_together_do_not_freeze_the_event_loop(short_tmp: Path) -> None:
    """Reads are 4 KiB so that one read's work stays small, but under QEMU's batch rules the
    framer parses a message only when its last token arrives: all of a 1 MB message's 500,000
    tokens in the callback of its last byte (about 0.5-1 s here).  Eight read-only clients
    each send all but the last byte of such a message, then the last bytes together: the one
    event loop that serves every route is blocked for all eight parses at once, and a
    ``query-status`` on the manager's socket waits seconds (64 sessions: over a minute, past
    ``/healthz``'s 5 s and the shipped unit's ``WatchdogSec=20s``)."""
    from tests.proxyproc import ProxyProcess

    message = b'{"execute":"x","arguments":{"a":[' + b"1," * 499_990 + b"1]}}"
    with QemuProcess("7.2", "-M", "none") as qemu:
        ro, rw = short_tmp / "ro.sock", short_tmp / "rw.sock"
        config = read_only_config(short_tmp, qemu.sock_path, ro, rw)
        with ProxyProcess("--config", str(config), tmp_path=short_tmp) as p:
            p.wait_log("upstream_ready")
            attackers = [RawQMP(str(ro), timeout=300) for _ in range(8)]
            try:
                for c in attackers:
                    c.negotiate()
                    c.send(message[:-1])
                with RawQMP(str(rw), timeout=300) as manager:
                    manager.negotiate()
                    # The proxy has taken every byte but the last ones once the manager is
                    # served after them.
                    assert "return" in manager.command({"execute": "query-status"})
                    for c in attackers:
                        c.send(message[-1:])
                    time.sleep(0.05)
                    start = time.monotonic()
                    assert "return" in manager.command({"execute": "query-status"})
                    latency = time.monotonic() - start
            finally:
                for c in attackers:
                    c.close()
    assert latency < 2.0, f"query-status took {latency:.1f} s while the proxy parsed 8 messages"
