"""Regression tests for what one client could do to the proxy or to the other clients.

Each test replays an attack found by reviewing the proxy as an attacker would, against real
QEMU: smuggling a command past a listener's policy inside a message QEMU's lexer splits
differently from a JSON parser, freezing the command lane, descriptors crossing from one
client to another, forged log lines, label caches, descriptor exhaustion, an unbounded metrics
endpoint.  Where the proxy must answer as QEMU would, the expected bytes come from the same
QEMU, asked directly before the proxy connects to it.

Most tests run the proxy in this event loop (two listeners: one open, one that allows only
``query-*``); the ones about the process itself (CPU, threads, descriptors, its log) run the
real ``python -m proxy``.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import json
import logging
import os
import re
import resource
import shutil
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families

import proxy.route
from proxy import address
from proxy.config import Config, Limits, ListenConfig, RouteConfig
from proxy.policy import Policy
from proxy.server import Server
from tests.aclient import AsyncRaw
from tests.helpers import free_port, wait_route_ready
from tests.proxyproc import REPO, ProxyProcess
from tests.qemu import QemuProcess, RawQMP

# A request whose ``0E5`` ends a JSON parser's number but is a lexical error to QEMU, which then
# resets its parser and reads the object nested under "b" as a command of its own.
SMUGGLE = b'{"execute":"query-status","arguments":{"a":0E5,"b":%s}}'
END = b'{"execute":"query-status","id":"end"}'
RUNNING = {"status": "running", "running": True}


def disabled(command: str) -> dict[str, Any]:
    return {
        "class": "CommandNotFound",
        "desc": f"The command {command} has been disabled for this socket",
    }


# -- the proxy in this event loop ---------------------------------------------------------------


@dataclass
class Served:
    server: Server
    open_sock: str  # every command allowed
    ro_sock: str  # allow = ["query-*"]

    async def client(self, path: str | None = None, oob: bool = False) -> AsyncRaw:
        c = await AsyncRaw.connect(path or self.open_sock)
        await c.negotiate(oob=oob)
        return c


@contextlib.asynccontextmanager
async def serve(
    upstream: str,
    tmp: Path,
    *,
    state_dir: Path | None = None,
    extra: tuple[ListenConfig, ...] = (),
    limits: Limits | None = None,
    ro_max_message: int | None = None,
) -> AsyncIterator[Served]:
    """The proxy in front of ``upstream`` with an open and a read-only listener (whose message
    bound is ``ro_max_message``, None: a restricted listener's default)."""
    open_sock, ro_sock = str(tmp / "open.sock"), str(tmp / "ro.sock")
    listen = (
        ListenConfig(address.parse(open_sock)),
        ListenConfig(
            address.parse(ro_sock), policy=Policy(allow=("query-*",)), max_message=ro_max_message
        ),
        *extra,
    )
    route = RouteConfig("vm", address.parse(upstream), listen)
    config = Config((route,), limits or Limits(), "debug", state_dir=state_dir or tmp)
    server = Server(config, asyncio.get_running_loop())
    server.start()
    try:
        await wait_route_ready(server)
        yield Served(server, open_sock, ro_sock)
    finally:
        await server.stop()


def direct(qemu: QemuProcess, data: bytes, lines: int, negotiate: bool = True) -> list[bytes]:
    """QEMU's own reply lines (events skipped) to ``data``, asked before the proxy connects."""
    with RawQMP(qemu.sock_path) as raw:
        if negotiate:
            raw.negotiate()
        else:
            raw.recv_line()
        raw.send(data)
        out: list[bytes] = []
        while len(out) < lines:
            line = raw.recv_line()
            if not line.startswith(b'{"timestamp"'):  # QEMU writes events so
                out.append(line)
        return out


async def replies_until_end(c: AsyncRaw, timeout: float = 5.0) -> list[bytes]:
    """Reply lines (events skipped, without CRLF) up to the reply to :data:`END`."""
    out: list[bytes] = []
    while True:
        line = (await c.line(timeout)).removesuffix(b"\r\n")
        msg = json.loads(line)
        if "event" in msg:
            continue
        if msg.get("id") == "end":
            assert set(msg["return"]) >= {"status", "running"}, msg
            return out
        out.append(line)


async def status(c: AsyncRaw) -> dict[str, Any]:
    """The VM's run state, through ``c``."""
    reply = await asyncio.wait_for(c.command({"execute": "query-status"}), 5)
    return {k: reply["return"][k] for k in ("status", "running")}


# -- 1. smuggling past a read-only policy ----------------------------------------------------


async def test_smuggled_stop_is_framed_as_qemu_frames_it_and_denied(
    qemu: QemuProcess, short_tmp: Path
) -> None:
    """The message reaches the policy as QEMU would read it: parse errors and a ``stop`` of its
    own, which a ``query-*`` listener refuses; the VM keeps running."""
    message = SMUGGLE % b'{"execute":"stop"}'
    with RawQMP(qemu.sock_path) as raw:
        raw.negotiate()
        assert "return" in raw.command({"execute": "cont"})
    # The same bytes as the proxy's read-only client sends, from the greeting on (QEMU 11.1
    # counts error positions over the connection).
    with RawQMP(qemu.sock_path) as raw:
        raw.recv_line()
        raw.send(b'{"execute":"qmp_capabilities"}')
        assert raw.recv_line() == b'{"return": {}}'
        raw.send(message + END)
        theirs: list[bytes] = []
        while b'"end"' not in (line := raw.recv_line()):
            if not line.startswith(b'{"timestamp"'):
                theirs.append(line)
    with RawQMP(qemu.sock_path) as raw:
        raw.negotiate()
        assert "return" in raw.command({"execute": "cont"})  # QEMU itself did run the stop
    assert theirs.count(b'{"return": {}}') == 1, theirs
    expected = [
        json.dumps({"error": disabled("stop")}).encode() if line == b'{"return": {}}' else line
        for line in theirs
    ]
    async with serve(qemu.sock_path, short_tmp) as s:
        ro, other = await s.client(s.ro_sock), await s.client()
        assert await status(other) == RUNNING
        await ro.send(message + END)
        await asyncio.sleep(0.2)
        assert await status(other) == RUNNING
        assert await replies_until_end(ro) == expected


async def test_smuggled_ids_never_reach_another_client(qemu: QemuProcess, short_tmp: Path) -> None:
    """Smuggled commands carrying the integer ids another client's commands may have upstream
    must never have their replies delivered to that client."""
    inner = b",".join(
        b'"c%d":{"execute":"human-monitor-command","arguments":{"command-line":"info version"},'
        b'"id":%d}' % (n, n)
        for n in range(1, 41)
    )
    message = b'{"execute":"query-status","arguments":{"a":0E5,%s}}' % inner
    async with serve(qemu.sock_path, short_tmp) as s:
        attacker = await s.client(s.ro_sock)
        victim = await s.client()

        async def attack() -> None:
            await attacker.send(message)
            denied: list[dict[str, Any]] = []
            while len(denied) < 40:
                msg = await attacker.reply(5)
                if "id" in msg:
                    denied.append(msg)
            assert denied == [
                {"error": disabled("human-monitor-command"), "id": n} for n in range(1, 41)
            ]

        async def query() -> None:
            for k in range(200):
                reply = await asyncio.wait_for(
                    victim.command({"execute": "query-status", "id": f"v{k}"}), 5
                )
                assert reply.get("id") == f"v{k}", reply
                assert isinstance(reply.get("return"), dict), reply
                assert set(reply["return"]) >= {"status", "running"}, reply

        await asyncio.gather(attack(), query())


# -- 2. one client freezing every client ------------------------------------------------------


async def test_smuggling_messages_do_not_freeze_other_clients(
    qemu: QemuProcess, short_tmp: Path
) -> None:
    """Messages QEMU would answer with id-less errors must not use up the lane's slots."""
    async with serve(qemu.sock_path, short_tmp) as s:
        attacker = await s.client()
        other = await s.client()
        await attacker.send(SMUGGLE % b'{"execute":"query-name"}' * 10 + END)
        await asyncio.sleep(0.3)

        async def twenty() -> None:
            for k in range(20):
                reply = await other.command({"execute": "query-status", "id": k})
                assert reply.get("id") == k and "return" in reply, reply

        await asyncio.wait_for(twenty(), 2.0)
        await replies_until_end(attacker)


# -- 3. a split that fails inside must release the lane ----------------------------------------


async def test_malformed_capability_list_answers_and_frees_the_lane(
    qemu: QemuProcess, short_tmp: Path
) -> None:
    """A capability name that is a list once raised inside the split and kept the lane: every
    client froze.  It gets a patched QEMU's visitor error before anything is sent."""
    async with serve(qemu.sock_path, short_tmp) as s:
        a, b = await s.client(), await s.client()
        before = await a.command({"execute": "query-migrate-capabilities"})
        caps = [{"capability": ["xbzrle"], "state": True}]
        migrate = {
            "execute": "migrate",
            "arguments": {"uri": "exec:cat > /dev/null", "capabilities": caps},
            "id": "m",
        }
        reply = await asyncio.wait_for(a.command(migrate), 5)
        assert reply == {
            "error": {
                "class": "GenericError",
                "desc": "Invalid parameter type for 'capabilities[0].capability', expected: string",
            },
            "id": "m",
        }
        assert "return" in await asyncio.wait_for(b.command({"execute": "query-status"}), 2)
        assert await a.command({"execute": "query-migrate-capabilities"}) == before
        assert await a.command({"execute": "query-migrate"}) == {"return": {}}


async def test_unwritable_journal_answers_and_changes_nothing(
    qemu: QemuProcess, short_tmp: Path
) -> None:
    """The state directory vanishes under a running proxy (a plain file takes its place)."""
    state = short_tmp / "state"
    state.mkdir(mode=0o700)
    async with serve(qemu.sock_path, short_tmp, state_dir=state) as s:
        a, b = await s.client(), await s.client()
        before = await a.command({"execute": "query-migrate-capabilities"})
        shutil.rmtree(state)
        state.write_text("not a directory\n")
        migrate = {
            "execute": "migrate",
            "arguments": {
                "uri": "exec:cat > /dev/null",
                "capabilities": [{"capability": "xbzrle", "state": True}],
            },
            "id": "m",
        }
        reply = await asyncio.wait_for(a.command(migrate), 5)
        assert reply.get("id") == "m", reply
        assert reply["error"]["class"] == "GenericError", reply
        assert reply["error"]["desc"].startswith(
            "qmp-proxy cannot write its crash-safety journal"
        ), reply
        assert "return" in await asyncio.wait_for(b.command({"execute": "query-status"}), 2)
        assert await a.command({"execute": "query-migrate-capabilities"}) == before
        assert await a.command({"execute": "query-migrate"}) == {"return": {}}


# -- 4. descriptor exhaustion ---------------------------------------------------------------


class LimitedProxy(ProxyProcess):
    """``python -m proxy`` under a low ``RLIMIT_NOFILE`` (ProxyProcess cannot set one)."""

    def __init__(self, *args: str, tmp_path: Path, nofile: int) -> None:
        self.args = args
        self.log_path = tmp_path / f"proxy-{os.getpid()}-{time.monotonic_ns()}.log"
        self._log = self.log_path.open("wb")

        def limit() -> None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        self.proc = subprocess.Popen(
            [sys.executable, "-m", "proxy", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._log,
            env=dict(os.environ, PYTHONPATH=str(REPO)),
            preexec_fn=limit,
        )


def cpu_seconds(pid: int) -> float:
    """User plus system time of a process, from /proc/PID/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    after = stat[stat.rindex(")") + 2 :].split()
    return (int(after[11]) + int(after[12])) / os.sysconf("SC_CLK_TCK")


def greeted(path: str, timeout: float = 5.0) -> bytes:
    """The first line a new client of ``path`` reads."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(path)
        data = b""
        while b"\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        return data


def test_descriptor_exhaustion_pauses_accept_instead_of_spinning(
    qemu72: QemuProcess, short_tmp: Path
) -> None:
    """With the descriptor table full, accept() fails at once every time: the listener must
    pause (a few log lines), not spin the event loop, and serve again once descriptors free."""
    sock = str(short_tmp / "p.sock")
    args = (
        *("--upstream", f"unix:{qemu72.sock_path}", "--listen", f"unix:{sock}"),
        *("--max-sessions", "1000", "--state-dir", str(short_tmp)),
    )
    r, w = os.pipe()
    held: list[socket.socket] = []
    with LimitedProxy(*args, tmp_path=short_tmp, nofile=128) as p:
        try:
            p.wait_log("upstream_ready")
            # Sessions that pass descriptor batches and never use them...
            for _ in range(20):
                s = socket.socket(socket.AF_UNIX)
                s.connect(sock)
                held.append(s)
                s.sendmsg(
                    [b" "], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [w] * 16))]
                )
            time.sleep(0.3)
            # ...then plain connections, more than the descriptor table holds.
            for _ in range(150):
                s = socket.socket(socket.AF_UNIX)
                s.setblocking(False)
                try:
                    s.connect(sock)
                except BlockingIOError:
                    s.close()
                    continue
                held.append(s)
            time.sleep(0.5)
            size, cpu = p.log_path.stat().st_size, cpu_seconds(p.proc.pid)
            time.sleep(3.0)
            spent = cpu_seconds(p.proc.pid) - cpu
            grown = p.log_path.read_bytes()[size:].decode(errors="replace")
            assert spent < 0.5, f"{spent:.2f} s of CPU in 3 s of a full descriptor table"
            lines = grown.splitlines()
            assert 1 <= len(lines) <= 8, grown[:2000]
            assert all("event=accept_paused" in line for line in lines), grown[:2000]
        finally:
            for s in held:
                s.close()
            held.clear()
            os.close(r)
            os.close(w)
        deadline = time.monotonic() + 10
        while True:
            try:
                assert b'"QMP"' in greeted(sock, 2.0)
                break
            except (OSError, AssertionError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)


# -- 5. descriptors crossing between clients --------------------------------------------------


def send_with_fd(c: AsyncRaw, data: bytes, fd: int) -> None:
    """Write ``data`` with ``fd`` attached (SCM_RIGHTS) on the client's connection."""
    transport_sock = c.writer.get_extra_info("socket")
    assert transport_sock is not None
    with socket.socket(fileno=os.dup(transport_sock.fileno())) as sock:
        sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])


def unblock(fifo: Path) -> None:
    """Let a reader blocked opening ``fifo`` go on (nothing happens if none is)."""
    with contextlib.suppress(OSError):
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))


def pipe_inodes(pid: int) -> set[int]:
    """The pipes a process holds, by inode."""
    out: set[int] = set()
    for name in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{name}")
            if target.startswith("pipe:["):
                out.add(int(target[6:-1]))
    return out


async def test_exec_oob_descriptors_never_become_another_clients_getfd(
    qemu72: QemuProcess, short_tmp: Path
) -> None:
    """B's ``getfd x`` waits in QEMU's queue (its main loop is blocked opening a FIFO) while A
    sends ``exec-oob getfd`` with a descriptor: ``x`` must still be B's pipe."""
    assert qemu72.tmpdir is not None
    fifo = qemu72.tmpdir / "block.fifo"
    os.mkfifo(fifo)
    ra, wa = os.pipe()
    rb, wb = os.pipe()
    ino_a, ino_b = os.fstat(wa).st_ino, os.fstat(wb).st_ino
    try:
        async with serve(qemu72.sock_path, short_tmp) as s:
            blocker, b = await s.client(), await s.client()
            a = await s.client(oob=True)
            await blocker.send(
                json.dumps(
                    {
                        "execute": "blockdev-add",
                        "arguments": {
                            "driver": "file",
                            "filename": str(fifo),
                            "node-name": "blocker",
                            "read-only": True,
                            "locking": "off",
                        },
                        "id": "block",
                    }
                ).encode()
            )
            await asyncio.sleep(0.3)
            send_with_fd(b, b'{"execute":"getfd","arguments":{"fdname":"x"},"id":"b"}', wb)
            await asyncio.sleep(0.3)
            send_with_fd(a, b'{"exec-oob":"getfd","arguments":{"fdname":"x"},"id":"a"}', wa)
            reply_a = await a.reply(5)
            assert reply_a.get("id") == "a" and "error" in reply_a, reply_a
            unblock(fifo)  # QEMU's open() returns
            assert (await blocker.reply(5)).get("id") == "block"
            assert await b.reply(5) == {"return": {}, "id": "b"}
            held = pipe_inodes(qemu72.pid)
            assert ino_b in held and ino_a not in held, (ino_a, ino_b, held)
            assert "return" in await b.command({"execute": "closefd", "arguments": {"fdname": "x"}})
            assert ino_b not in pipe_inodes(qemu72.pid)
    finally:
        unblock(fifo)
        for fd in (ra, wa, rb, wb):
            os.close(fd)


async def test_descriptor_of_a_failed_getfd_is_not_taken_by_another_client(
    qemu72: QemuProcess, short_tmp: Path
) -> None:
    """QEMU rejects A's ``getfd`` (no fdname) before taking A's descriptor; B's ``getfd``
    without a descriptor must fail as it does on QEMU, not take A's pipe."""
    expected = direct(qemu72, b'{"execute":"getfd","arguments":{"fdname":"y"},"id":"b"}', 1)
    ra, wa = os.pipe()
    ino_a = os.fstat(wa).st_ino
    try:
        async with serve(qemu72.sock_path, short_tmp) as s:
            a, b = await s.client(), await s.client()
            send_with_fd(a, b'{"execute":"getfd","arguments":{},"id":"a"}', wa)
            reply_a = await a.reply(5)
            assert reply_a["error"]["desc"] == "Parameter 'fdname' is missing", reply_a
            await b.send(b'{"execute":"getfd","arguments":{"fdname":"y"},"id":"b"}')
            assert (await b.line(5)).removesuffix(b"\r\n") == expected[0]
            assert b"No file descriptor supplied via SCM_RIGHTS" in expected[0]
            assert ino_a not in pipe_inodes(qemu72.pid)
    finally:
        os.close(ra)
        os.close(wa)


# -- 6, 7. answers QEMU gives ---------------------------------------------------------------


async def test_deeply_nested_id_is_written_back_as_qemu_writes_it(
    qemu: QemuProcess, short_tmp: Path
) -> None:
    """QEMU accepts 600 levels of nesting (its limit is 1024); writing such an id back once
    raised RecursionError and lost both replies."""
    data = b'{"execute":"query-status","id":%s}{"execute":"query-name","id":2}' % (
        b"[" * 600 + b"]" * 600
    )
    expected = direct(qemu, data, 2)
    async with serve(qemu.sock_path, short_tmp) as s:
        c = await s.client()
        await c.send(data)
        got = [(await c.line(5)).removesuffix(b"\r\n") for _ in range(2)]
    assert got == expected


async def test_unexpected_negotiation_argument_named_as_qemu_names_it(
    qemu: QemuProcess, short_tmp: Path
) -> None:
    """QEMU names the first unexpected member in its hash table's order, not the client's."""
    data = b'{"execute":"qmp_capabilities","arguments":{"a":1,"b":2},"id":1}'
    expected = direct(qemu, data, 1, negotiate=False)
    assert b"Parameter 'b' is unexpected" in expected[0]
    async with serve(qemu.sock_path, short_tmp) as s:
        c = await AsyncRaw.connect(s.open_sock)
        await c.message()
        await c.send(data)
        assert (await c.line(5)).removesuffix(b"\r\n") == expected[0]


# -- 8. the metrics endpoint's limits ----------------------------------------------------------


def test_idle_metrics_connections_cost_no_threads(qemu72: QemuProcess, short_tmp: Path) -> None:
    """Idle connections to the metrics port once cost a thread each, without a deadline."""
    port = free_port()
    args = (
        *("--upstream", f"unix:{qemu72.sock_path}", "--listen", f"unix:{short_tmp}/p.sock"),
        *("--metrics", f"127.0.0.1:{port}", "--state-dir", str(short_tmp)),
    )
    conns: list[socket.socket] = []
    with ProxyProcess(*args, tmp_path=short_tmp) as p:
        p.wait_log("upstream_ready")
        task = Path(f"/proc/{p.proc.pid}/task")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
            assert r.status == 200
        threads = len(list(task.iterdir()))
        assert threads <= 4, threads
        try:
            for _ in range(300):
                conns.append(socket.create_connection(("127.0.0.1", port), timeout=5))
            time.sleep(0.5)
            assert len(list(task.iterdir())) <= threads, "a thread per idle connection"
            started = time.monotonic()
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
                assert r.status == 200
            assert time.monotonic() - started < 1.0
        finally:
            for c in conns:
                c.close()


# -- 9. huge numbers in a split's other arguments ---------------------------------------------


@pytest.mark.parametrize("uri", [b"1e400", b"1" + b"0" * 399], ids=["1e400", "400digits"])
async def test_huge_number_uri_gets_qemus_type_error(
    qemu: QemuProcess, short_tmp: Path, uri: bytes
) -> None:
    """A number JSON parsers cannot hold as QEMU does (an infinite or huge double) in a split's
    other arguments once froze every client; it gets QEMU's own answer to the same member."""
    plain = b'{"execute":"migrate","arguments":{"uri":%s},"id":"m"}' % uri
    expected = direct(qemu, plain, 1)
    assert b"Invalid parameter type for 'uri', expected: string" in expected[0]
    split = (
        b'{"execute":"migrate","arguments":{"uri":%s,'
        b'"capabilities":[{"capability":"xbzrle","state":true}]},"id":"m"}' % uri
    )
    async with serve(qemu.sock_path, short_tmp) as s:
        a, b = await s.client(), await s.client()
        before = await a.command({"execute": "query-migrate-capabilities"})
        await a.send(split)
        assert (await a.line(5)).removesuffix(b"\r\n") == expected[0]
        assert "return" in await asyncio.wait_for(b.command({"execute": "query-status"}), 2)
        assert await a.command({"execute": "query-migrate-capabilities"}) == before


# -- 10. log injection --------------------------------------------------------------------------

_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) (.*)")
_TOKEN = re.compile(r'([a-z_]+)=("(?:[^"\\\x00-\x1f\x7f]|\\.)*"|[A-Za-z0-9\-_.:/@+,\[\]]+)( |$)')


def log_keys(line: str) -> list[str] | None:
    """The keys of a ``key=value ...`` log line, or None if it is not one."""
    match = _LINE.fullmatch(line)
    if match is None:
        return None
    body, keys, at = match.group(2), [], 0
    while at < len(body):
        token = _TOKEN.match(body, at)
        if token is None:
            return None
        keys.append(token.group(1))
        at = token.end()
    return keys


def test_denied_command_names_cannot_forge_or_flood_log_lines(
    qemu72: QemuProcess, short_tmp: Path
) -> None:
    """A denied command's name is logged: a carriage return in it once started a line of the
    client's choosing, and a huge name was logged whole, each time."""
    ro = short_tmp / "ro.sock"
    config = short_tmp / "proxy.toml"
    config.write_text(
        f'state_dir = "{short_tmp}"\n[[route]]\nname = "vm"\n'
        f'upstream = "unix:{qemu72.sock_path}"\n'
        f'listen = [{{ address = "unix:{ro}", allow = ["query-*"] }}]\n'
    )
    forged = (
        "x\r2030-01-01 00:00:00,000 ERROR event=backport_restore_failed route=vm why=forged"
        "\n2030-01-01 00:00:00,000 ERROR event=backport_restore_failed route=vm"
    )
    with ProxyProcess("--config", str(config), tmp_path=short_tmp) as p:
        p.wait_log("upstream_ready")
        with RawQMP(str(ro)) as c:
            c.negotiate()
            reply = c.command({"execute": forged})
            assert reply["error"]["class"] == "CommandNotFound", reply
            p.wait_log("policy_denied")
            size = p.log_path.stat().st_size
            name = "a" * (512 << 10)
            for _ in range(40):
                assert "error" in c.command({"execute": name})
            c.command({"execute": "query-status"})
        grown = p.log_path.stat().st_size - size
        text = p.log()
    lines = text.splitlines()  # \r ends a line for a terminal and for many log readers
    assert not any(" event=backport_restore_failed" in line.split('"')[0] for line in lines)
    for line in lines:
        keys = log_keys(line)
        assert keys is not None and keys[0] == "event", repr(line[:300])
        assert keys.count("event") == 1, repr(line[:300])
    assert grown < 100_000, f"{grown} bytes of log for 40 denied commands"


# -- 11. metric label caches ----------------------------------------------------------------


def samples(server: Server, name: str) -> list[tuple[dict[str, str], float]]:
    """One metric's samples, scraped from the route's registry as /metrics would be."""
    text = prometheus_client.generate_latest(server.metrics.registry).decode()
    return [
        (s.labels, s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    ]


async def test_command_names_do_not_change_how_events_are_counted(
    qemu: QemuProcess, short_tmp: Path
) -> None:
    """Command and event names once shared one label cache: a bogus command ``STOP`` made
    real STOP events count as ``other``, and a RESUME event made ``RESUME`` a command label."""
    async with serve(qemu.sock_path, short_tmp) as s:
        c = await s.client()
        assert (await c.command({"execute": "STOP"}))["error"]["class"] == "CommandNotFound"
        assert "return" in await c.command({"execute": "cont"})
        assert "return" in await c.command({"execute": "stop"})
        assert (await c.command({"execute": "RESUME"}))["error"]["class"] == "CommandNotFound"
        deadline = time.monotonic() + 5
        while True:
            events = {
                labels["event"]: value
                for labels, value in samples(s.server, "qmp_proxy_events_total")
            }
            if events.get("STOP") == events.get("RESUME") == 1 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        assert events.get("STOP") == 1 and events.get("RESUME") == 1, events
        assert "other" not in events, events
        commands = samples(s.server, "qmp_proxy_commands_total")
        assert not [labels for labels, _ in commands if labels["command"] in ("STOP", "RESUME")]
        other = sum(v for labels, v in commands if labels["command"] == "other")
        assert other == 2, commands


# -- 12. a TCP connection reset before accept() ----------------------------------------------


async def test_connection_reset_before_accept_is_ignored(
    qemu72: QemuProcess, short_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A connection reset while still in the listen queue is the peer's business: no error,
    no traceback, and the connections queued behind it are served."""
    caplog.set_level(logging.INFO)
    port = free_port()
    tcp = (ListenConfig(address.parse(f"tcp:127.0.0.1:{port}")),)
    async with serve(qemu72.sock_path, short_tmp, extra=tcp) as s:
        caplog.clear()
        # No await until every connection is queued: the proxy accepts them in one batch.
        doomed = [socket.create_connection(("127.0.0.1", port)) for _ in range(5)]
        normal = socket.create_connection(("127.0.0.1", port))
        more = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        for sock in doomed + more:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
        normal.setblocking(False)
        reader, writer = await asyncio.open_connection(sock=normal)
        try:
            greeting = await asyncio.wait_for(reader.readline(), 5)
            assert b'"QMP"' in greeting, greeting
            writer.write(b'{"execute":"qmp_capabilities"}')
            assert await asyncio.wait_for(reader.readline(), 5) == b'{"return": {}}\r\n'
        finally:
            writer.close()
        await asyncio.sleep(0.2)
        assert (await status(await s.client()))["status"] == "prelaunch"
    bad = [
        f"{r.name} {r.levelname} {r.getMessage()[:300]}"
        for r in caplog.records
        if r.levelno >= logging.ERROR or r.exc_info
    ]
    assert bad == []


# -- 13. the relayed schema ---------------------------------------------------------------------


async def test_relayed_schema_is_qemus_text_plus_the_capabilities_member(
    qemu: QemuProcess, short_tmp: Path
) -> None:
    """Managers may compare or cache the schema text: it must stay QEMU's, not re-encoded."""
    ask = b'{"execute":"query-qmp-schema","id":"s"}'
    theirs = direct(qemu, ask, 1)[0]
    async with serve(qemu.sock_path, short_tmp) as s:
        c = await s.client()
        await c.send(ask)
        ours = (await c.line(5)).removesuffix(b"\r\n")
    added = re.compile(rb', \{"name": "capabilities", "default": null, "type": "\[[^"\]]+\]"\}')
    assert len(added.findall(ours)) == 2, "migrate and migrate-incoming"
    assert added.sub(b"", ours) == theirs


async def test_a_failure_while_ending_a_reset_client_stays_in_that_session(
    qemu72: QemuProcess, short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A socket error reaches the route from the loop (a failed send is reported there): an
    exception while ending that session is counted and ends it, never escaping into the loop."""
    async with serve(qemu72.sock_path, short_tmp) as p:
        route = p.server.routes[0]
        c = await p.client()
        (client,) = route.clients.values()
        end = proxy.route.Route.end
        calls: list[str] = []

        def failing_end(self: proxy.route.Route, *args: Any, **kwargs: Any) -> None:
            calls.append(args[1])
            if len(calls) == 1:
                raise RuntimeError("a bug while ending")
            end(self, *args, **kwargs)

        monkeypatch.setattr(proxy.route.Route, "end", failing_end)
        errors = route.metrics.internal_errors
        client.stream._on_error(ConnectionResetError(104, "reset"))  # what the loop calls
        assert calls == ["reset", "error"]
        assert client.ended and route.metrics.internal_errors == errors + 1
        await c.close()
