"""The core proxy against real QEMU, with real clients.

Each test runs on every QEMU version the suite installs (5.2, 7.2, 10.0, 11.1: the ``qemu``
fixture and ``VERSIONS`` are parametrized) with the proxy in-process in front of it.
"""

from __future__ import annotations

import array
import asyncio
import json
import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import QMPClient
from qemu.qmp.legacy import QEMUMonitorProtocol

from proxy import address
from proxy.config import Config, ListenConfig, RouteConfig
from proxy.server import Server
from proxy.session import Command
from proxy.upstream import Runstate
from tests.aclient import AsyncRaw
from tests.conftest import VERSIONS
from tests.helpers import free_port, wait_route_ready
from tests.proxyproc import InProcessProxy, in_process
from tests.qemu import QemuProcess

pytestmark = pytest.mark.qemu  # every test here starts a real QEMU


async def qmp_client(path: str, name: str = "t") -> QMPClient:
    client = QMPClient(name)
    await client.connect(path)
    return client


async def test_two_clients_at_once(qemu: QemuProcess, proxy: InProcessProxy) -> None:
    a = await qmp_client(proxy.sock, "a")
    b = await qmp_client(proxy.sock, "b")
    status, version = await asyncio.gather(a.execute("query-status"), b.execute("query-version"))
    assert isinstance(status, dict) and isinstance(version, dict), (status, version)
    assert status["status"] == "prelaunch"
    assert f"{version['qemu']['major']}.{version['qemu']['minor']}" == qemu.version
    # The same against QEMU directly: the proxy holds QEMU's only monitor slot, so a direct
    # client is queued silently by QEMU and sees no greeting.
    direct = await AsyncRaw.connect(qemu.sock_path)
    await direct.silent(0.5, "QEMU greeted a second client")
    await direct.close()
    await a.disconnect()
    await b.disconnect()


async def test_greeting_is_qemus_with_proxy_capabilities(
    qemu: QemuProcess, proxy: InProcessProxy
) -> None:
    client = await AsyncRaw.connect(proxy.sock)
    line = await client.line()
    greeting = json.loads(line)
    assert greeting["QMP"]["capabilities"] == ["oob"]
    assert greeting["QMP"]["version"]["package"].startswith("Debian")
    await client.close()


async def test_colliding_ids_each_session_gets_its_own_replies_in_order(
    qemu: QemuProcess, proxy: InProcessProxy
) -> None:
    """50 sessions pipeline 8 commands each, every one with id "1"; replies name their command."""

    async def one(n: int) -> None:
        c = await AsyncRaw.connect(proxy.sock)
        await c.negotiate()
        batch = b"".join(
            json.dumps({"execute": f"no-such-{n}-{i}", "id": "1"}).encode()
            if i % 2
            else b'{"execute":"query-status","id":"1"}'
            for i in range(8)
        )
        await c.send(batch)
        for i in range(8):
            reply = await c.reply()
            assert reply["id"] == "1"
            if i % 2:
                assert reply["error"]["desc"] == f"The command no-such-{n}-{i} has not been found"
            else:
                assert reply["return"]["status"] == "prelaunch"
        await c.close()

    await asyncio.gather(*(one(n) for n in range(50)))


async def test_events_reach_every_negotiated_session_once(
    qemu: QemuProcess, proxy: InProcessProxy
) -> None:
    clients = [await AsyncRaw.connect(proxy.sock) for _ in range(5)]
    for c in clients:
        await c.negotiate()
    shy = await AsyncRaw.connect(proxy.sock)
    await shy.message()  # the greeting only: not negotiated, must get no events
    await clients[0].send(b'{"execute":"cont","id":"go"}')
    await clients[0].send(b'{"execute":"stop","id":"halt"}')
    for index, c in enumerate(clients):
        seen: list[Any] = []
        while len([m for m in seen if "event" in m]) < 2 or (index == 0 and len(seen) < 4):
            seen.append(await c.message())
        events = [m["event"] for m in seen if "event" in m]
        assert events == ["RESUME", "STOP"], seen
    # Nothing else arrives for any session (each event exactly once).
    for c in clients:
        await c.send(b'{"execute":"query-status","id":"end"}')
        extra = []
        while (msg := await c.message()).get("id") != "end":
            extra.append(msg)
        assert all("event" not in m for m in extra), extra
        assert msg["return"]["status"] == "paused"
    await shy.silent(0.3, "un-negotiated session got")
    await shy.send(b'{"execute":"qmp_capabilities","id":"late"}')
    assert await shy.message() == {"return": {}, "id": "late"}
    for c in [*clients, shy]:
        await c.close()


async def test_long_pipeline_does_not_starve_another_session(
    qemu: QemuProcess, proxy: InProcessProxy
) -> None:
    """Round-robin: B's one command overtakes most of A's 60 queued slow commands.

    Judged by the order the proxy sent the commands to QEMU (recorded at the upstream), not
    by how many of A's replies a client happens to read first, which depends on scheduling."""
    upstream = proxy.route.upstream
    assert upstream is not None
    sent: list[int] = []
    real_send = upstream.send

    def recording_send(cmd: Command) -> None:
        sent.append(cmd.session.sid)
        real_send(cmd)

    upstream.send = recording_send  # type: ignore[method-assign]  # a spy on this instance
    a = await AsyncRaw.connect(proxy.sock)
    b = await AsyncRaw.connect(proxy.sock)
    await a.negotiate()
    await b.negotiate()
    await a.send(b'{"execute":"query-qmp-schema"}' * 60)
    deadline = time.monotonic() + 10
    while len(sent) + proxy.route.lane.queued < 60:  # all of A's are at the proxy
        assert time.monotonic() < deadline, (len(sent), proxy.route.lane.queued)
        await asyncio.sleep(0.001)
    await b.send(b'{"execute":"query-status","id":"b"}')
    assert (await b.reply(timeout=60))["id"] == "b"
    position = next(i for i, sid in enumerate(sent) if sid != sent[0])  # B's, among A's
    # The window (7) was full of A's when B arrived, and A's turn may come once more: B's
    # command is at most the 9th sent.  Without round-robin it would be the 61st.
    assert position <= 8, (position, sent)
    for _ in range(60):
        await a.line(timeout=60)
    await a.close()
    await b.close()


async def test_half_close_with_socat(qemu: QemuProcess, proxy: InProcessProxy) -> None:
    proc = await asyncio.create_subprocess_shell(
        f'printf \'%s\' \'{{"execute":"qmp_capabilities"}}{{"execute":"query-status"}}\''
        f" | socat - UNIX-CONNECT:{proxy.sock}",
        stdout=subprocess.PIPE,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 10)
    lines = out.split(b"\r\n")
    assert json.loads(lines[0])["QMP"]
    assert json.loads(lines[1]) == {"return": {}}
    assert json.loads(lines[2])["return"]["status"] == "prelaunch"
    assert lines[3:] == [b""]


async def test_legacy_sync_client_without_ids(qemu: QemuProcess, proxy: InProcessProxy) -> None:
    """qmp-shell's habit: QEMUMonitorProtocol.cmd_obj sends commands without an id."""

    def run() -> tuple[object, object]:
        mon = QEMUMonitorProtocol(proxy.sock)
        mon.connect()
        try:
            ok = mon.cmd_obj({"execute": "query-status", "arguments": {}})
            bad = mon.cmd_obj({"execute": "no-such", "arguments": {}})
            return ok, bad
        finally:
            mon.close()

    ok, bad = await asyncio.to_thread(run)
    assert ok == {"return": {"status": "prelaunch", "singlestep": False, "running": False}} or (
        isinstance(ok, dict) and ok["return"]["status"] == "prelaunch" and "id" not in ok
    )
    assert bad == {
        "error": {"class": "CommandNotFound", "desc": "The command no-such has not been found"}
    }


async def test_exec_oob_through_the_proxy(qemu: QemuProcess, proxy: InProcessProxy) -> None:
    client = await qmp_client(proxy.sock)
    try:
        await client.execute("migrate-pause", oob=True)
        raise AssertionError("migrate-pause outside postcopy succeeded")
    except Exception as exc:
        assert "migrate-pause is currently only supported during postcopy-active" in str(exc)
    await client.disconnect()


async def test_quit_delivers_shutdown_and_reply_before_close(
    qemu: QemuProcess, proxy: InProcessProxy
) -> None:
    other = await AsyncRaw.connect(proxy.sock)
    await other.negotiate()
    c = await AsyncRaw.connect(proxy.sock)
    await c.negotiate()
    await c.send(b'{"execute":"quit","id":"bye"}')
    rest = await c.eof()
    messages = [json.loads(x) for x in rest.split(b"\r\n") if x]
    assert [m.get("event") for m in messages if "event" in m] == ["SHUTDOWN"]
    assert {"return": {}, "id": "bye"} in messages
    assert json.loads((await other.eof()).split(b"\r\n")[0])["event"] == "SHUTDOWN"


async def test_client_waits_while_qemu_monitor_is_held(qemu: QemuProcess, tmp_path: Path) -> None:
    """Another client owns QEMU's monitor: the route shows awaiting greeting, then takes over."""
    holder = await AsyncRaw.connect(qemu.sock_path)
    await holder.negotiate()
    async with in_process(qemu.sock_path, tmp_path, ready=False) as proxy:
        await proxy.wait_state(Runstate.AWAITING_GREETING)
        waiting = await AsyncRaw.connect(proxy.sock)
        await waiting.silent(0.3, "greeted while QEMU was held")
        await holder.close()
        await proxy.wait_ready()
        await waiting.negotiate()
        assert (await waiting.command({"execute": "query-status"}))["return"]["running"] is False
        await waiting.close()


async def test_upstream_loss_ends_sessions(qemu: QemuProcess, proxy: InProcessProxy) -> None:
    c = await AsyncRaw.connect(proxy.sock)
    await c.negotiate()
    os.kill(qemu.pid, 9)
    assert await c.eof() == b""
    await proxy.wait_state(Runstate.DOWN)
    assert not proxy.route.clients


async def test_oversized_message_gets_qemus_error_and_session_continues(
    qemu: QemuProcess, tmp_path: Path
) -> None:
    async with in_process(qemu.sock_path, tmp_path, max_message=64 * 1024) as proxy:
        c = await AsyncRaw.connect(proxy.sock)
        await c.negotiate()
        big = b'{"execute":"query-status","arguments":{"x":"' + b"a" * 200_000 + b'"}}'
        await c.send(big + b'{"execute":"query-status","id":"after"}')
        assert await c.message() == {
            "error": {"class": "GenericError", "desc": "JSON token size limit exceeded"}
        }
        assert (await c.message())["id"] == "after"
        assert proxy.route.clients[1].session is not None
        assert proxy.route.clients[1].session.buffered < 64 * 1024
        await c.close()


def _send_with_fd(sock: socket.socket, data: bytes, fd: int) -> None:
    sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])


@pytest.mark.parametrize("version", VERSIONS)
async def test_fd_passing_both_habits_and_migrate_to_fd(version: str, tmp_path: Path) -> None:
    """libvirt sends the fd with getfd; qemu.qmp sends it first with a space byte.  Then QEMU
    migrates into the client's pipe through the proxy."""
    with QemuProcess(version, "-M", "none") as qemu:
        async with in_process(qemu.sock_path, tmp_path) as proxy:
            # qemu.qmp habit
            client = await qmp_client(proxy.sock)
            r1, w1 = os.pipe()
            client.send_fd_scm(w1)
            os.close(w1)
            await client.execute("getfd", {"fdname": "mig"})
            await client.execute("migrate", {"uri": "fd:mig"})
            data = await asyncio.wait_for(asyncio.to_thread(os.read, r1, 4), 10)
            assert data == b"QEVM"
            os.close(r1)
            await client.disconnect()
            # libvirt habit: the descriptor in the same sendmsg as getfd
            raw = socket.socket(socket.AF_UNIX)
            raw.setblocking(False)
            loop = asyncio.get_running_loop()
            await loop.sock_connect(raw, proxy.sock)
            reader, writer = await asyncio.open_unix_connection(sock=raw)
            c = AsyncRaw(reader, writer)
            await c.negotiate()
            r2, w2 = os.pipe()
            _send_with_fd(raw, b'{"execute":"getfd","arguments":{"fdname":"lv"},"id":"g"}\r\n', w2)
            os.close(w2)
            assert await c.reply() == {"return": {}, "id": "g"}
            assert (await c.command({"execute": "closefd", "arguments": {"fdname": "lv"}})) == {
                "return": {}
            }
            os.close(r2)
            await c.close()


async def test_concurrent_add_fd_gets_each_session_its_own_descriptor(
    qemu: QemuProcess, proxy: InProcessProxy
) -> None:
    async def add(opaque: str) -> tuple[int, int]:
        raw = socket.socket(socket.AF_UNIX)
        raw.setblocking(False)
        await asyncio.get_running_loop().sock_connect(raw, proxy.sock)
        reader, writer = await asyncio.open_unix_connection(sock=raw)
        c = AsyncRaw(reader, writer)
        await c.negotiate()
        r, w = os.pipe()
        inode = os.fstat(r).st_ino
        msg = json.dumps({"execute": "add-fd", "arguments": {"opaque": opaque}, "id": opaque})
        _send_with_fd(raw, msg.encode(), r)
        os.close(r)
        reply = await c.reply()
        assert reply["id"] == opaque, reply
        await c.close()
        os.close(w)
        return reply["return"]["fd"], inode

    results = await asyncio.gather(*(add(f"session-{i}") for i in range(4)))
    client = await qmp_client(proxy.sock)
    fdsets = await client.execute("query-fdsets")
    await client.disconnect()
    assert isinstance(fdsets, list), fdsets
    by_opaque = {fd["opaque"]: fd["fd"] for s in fdsets for fd in s["fds"]}
    for i, (qemu_fd, inode) in enumerate(results):
        assert by_opaque[f"session-{i}"] == qemu_fd
        target = os.readlink(f"/proc/{qemu.pid}/fd/{qemu_fd}")
        assert target == f"pipe:[{inode}]", (target, inode)


@pytest.mark.parametrize("version", VERSIONS)
async def test_pretty_printing_qemu_is_relayed_one_message_per_line(
    version: str, tmp_path: Path
) -> None:
    """A monitor with pretty=on writes multi-line JSON; clients still get one line each."""
    pretty = str(tmp_path / "pretty.sock")
    chardev = f"socket,id=pm,path={pretty},server=on,wait=off"
    with QemuProcess(
        version, "-M", "none", "-chardev", chardev, "-mon", "chardev=pm,mode=control,pretty=on"
    ):
        async with in_process(pretty, tmp_path) as proxy:
            c = await AsyncRaw.connect(proxy.sock)
            greeting = json.loads(await c.line())
            assert greeting["QMP"]["version"]["qemu"]["major"] == int(version.split(".")[0])
            await c.send(b'{"execute":"qmp_capabilities","id":"n"}')
            assert json.loads(await c.line()) == {"return": {}, "id": "n"}
            await c.send(b'{"execute":"cont","id":"go"}')
            lines = [json.loads(await c.line()) for _ in range(2)]
            assert {"return": {}, "id": "go"} in lines
            assert any(m.get("event") == "RESUME" for m in lines)
            await c.send(b'{"execute":"query-qmp-schema","id":"s"}')
            reply = json.loads(await c.line())
            assert reply["id"] == "s" and len(reply["return"]) > 500  # 885 entries on 5.2
            await c.close()


async def test_tcp_upstream_and_tcp_listener(tmp_path: Path) -> None:
    qemu_port, proxy_port = free_port(), free_port()
    qmp = f"tcp:127.0.0.1:{qemu_port},server=on,wait=off"
    with QemuProcess("7.2", "-M", "none", "-qmp", qmp):
        route = RouteConfig(
            "vm",
            address.parse(f"tcp:127.0.0.1:{qemu_port}"),
            (ListenConfig(address.parse(f"tcp:127.0.0.1:{proxy_port}")),),
        )
        server = Server(Config((route,), state_dir=tmp_path), asyncio.get_running_loop())
        server.start()  # QEMU's TCP listener may lag: the route retries with backoff
        try:
            await wait_route_ready(server)
            client = QMPClient("tcp")
            await client.connect(("127.0.0.1", proxy_port))
            status = await client.execute("query-status")
            assert isinstance(status, dict) and status["status"] == "prelaunch", status
            await client.disconnect()
        finally:
            await server.stop()
