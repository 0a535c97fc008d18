"""Signals, reload, listener security and command policy, with real QEMU 7.2.

Signal tests run the real ``python -m proxy`` and read its log.  A command is kept in flight
across SIGTERM by freezing QEMU with SIGSTOP after the proxy forwarded it: QEMU cannot answer
until SIGCONT, so the proxy must wait for it (its drain) without any fake.  The policy tests run
the proxy in-process from a TOML file.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import grp
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from proxy.config import load
from proxy.server import Server
from tests.aclient import AsyncRaw
from tests.helpers import free_port, wait_route_ready
from tests.proxyproc import REPO, ProxyProcess
from tests.qemu import QemuProcess, RawQMP

CAPS = [{"capability": "xbzrle", "state": True}]


@pytest.fixture(autouse=True)
def _no_systemd_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
        monkeypatch.delenv(var, raising=False)


def config_text(
    short_tmp: Path,
    upstream: str,
    listen: str = "",
    *,
    log_level: str = "info",
    limits: str = "",
    extra_route: str = "",
) -> str:
    listen = listen or f'["{short_tmp / "p.sock"}"]'
    return (
        f'log_level = "{log_level}"\nstate_dir = "{short_tmp}"\n[limits]\n{limits}\n'
        f'[[route]]\nname = "vm1"\nupstream = "unix:{upstream}"\nlisten = {listen}\n{extra_route}'
    )


def start(short_tmp: Path, text: str) -> tuple[ProxyProcess, Path]:
    path = short_tmp / "vm1.toml"
    path.write_text(text)
    return ProxyProcess("--config", str(path), tmp_path=short_tmp), path


def start_failure(short_tmp: Path, text: str, within: float = 10) -> str:
    """Start the proxy with a config it must refuse to serve: its ``start_failed`` log line."""
    p, _ = start(short_tmp, text)
    with p:
        try:
            rc = p.proc.wait(within)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"start-up hangs:\n{p.log()}") from None
        text = p.log()
    assert rc != 0, text
    assert not log_events(text, "listening"), text
    (line,) = log_events(text, "start_failed")
    return line


def greeted(path: Path | str) -> RawQMP:
    client = RawQMP(str(path), timeout=5)
    client.negotiate()
    return client


def refused(path: Path | str) -> bool:
    """Connected, then closed by the proxy without a greeting (False: greeted)."""
    with RawQMP(str(path), timeout=3) as client:
        try:
            line = client.recv_line()
        except EOFError:
            return True
        assert line.startswith(b'{"QMP"'), line
        return False


def log_events(text: str, event: str) -> list[str]:
    return [line for line in text.splitlines() if f" event={event} " in line + " "]


@contextlib.contextmanager
def frozen(qemu: QemuProcess) -> Iterator[None]:
    """QEMU stopped with SIGSTOP: the proxy can send to it but gets no answer."""
    os.kill(qemu.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(qemu.pid, signal.SIGCONT)


# -- SIGTERM / SIGINT ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "request_",
    [
        {"execute": "query-status", "id": "in-flight"},
        {
            "execute": "migrate",
            "arguments": {"uri": "exec:cat > /dev/null", "capabilities": CAPS},
            "id": "in-flight",
        },
    ],
    ids=["query-status", "split-migrate"],
)
def test_sigterm_finishes_command_in_flight(
    short_tmp: Path, qemu72: QemuProcess, request_: dict[str, Any]
) -> None:
    p, _ = start(short_tmp, config_text(short_tmp, qemu72.sock_path))
    with p:
        p.wait_log("event=upstream_ready")
        client = greeted(short_tmp / "p.sock")  # negotiation is the proxy's own: QEMU is not asked
        with frozen(qemu72):
            client.send(json.dumps(request_).encode())
            time.sleep(0.3)  # forwarded to QEMU, which cannot answer
            p.proc.send_signal(signal.SIGTERM)
            p.wait_log("event=stopping")
            # Listeners close first: no new clients during the drain.
            with pytest.raises(OSError), socket.socket(socket.AF_UNIX) as late:
                late.connect(str(short_tmp / "p.sock"))
            time.sleep(0.5)
            assert p.proc.poll() is None, "the proxy exited with a command in flight"
        reply = client.recv_message(timeout=5)
        assert reply.get("id") == "in-flight", reply
        assert "return" in reply, reply
        with pytest.raises(EOFError):
            client.recv_line(timeout=5)
        client.close()
        assert p.proc.wait(10) == 0, p.log()
        text = p.log()
    assert log_events(text, "stopping"), text
    assert log_events(text, "stopped"), text
    ends = log_events(text, "session_end")
    assert len(ends) == 1 and "reason=shutdown" in ends[0], ends
    if request_["execute"] == "migrate":
        (backport,) = log_events(text, "backport")
        assert "outcome=ok" in backport, backport


def test_sigterm_drain_limit(short_tmp: Path, qemu72: QemuProcess) -> None:
    p, _ = start(short_tmp, config_text(short_tmp, qemu72.sock_path, limits="drain = 0.5"))
    with p:
        p.wait_log("event=upstream_ready")
        client = greeted(short_tmp / "p.sock")
        with frozen(qemu72):
            client.send(b'{"execute": "query-status", "id": 1}')
            time.sleep(0.2)
            began = time.monotonic()
            p.proc.send_signal(signal.SIGTERM)
            assert p.proc.wait(5) == 0, p.log()
            took = time.monotonic() - began
            # The reply never came; the client sees the connection end, as if QEMU died.
            with pytest.raises(EOFError):
                client.recv_line(timeout=2)
        client.close()
    assert 0.4 < took < 3, took
    assert log_events(p.log(), "stopped")


def test_sigint_exits_0(short_tmp: Path, qemu72: QemuProcess) -> None:
    p, _ = start(short_tmp, config_text(short_tmp, qemu72.sock_path))
    with p:
        p.wait_log("event=upstream_ready")
        client = greeted(short_tmp / "p.sock")
        assert client.command({"execute": "query-status"})["return"]["status"] == "prelaunch"
        assert p.stop(signal.SIGINT) == 0, p.log()
        with pytest.raises(EOFError):
            client.recv_line(timeout=5)
        client.close()
    text = p.log()
    assert log_events(text, "stopping") and log_events(text, "stopped"), text
    assert not os.path.exists(short_tmp / "p.sock"), "listening socket left behind"


# -- SIGHUP -------------------------------------------------------------------------------------


def test_reload_log_level_and_limits(short_tmp: Path, qemu72: QemuProcess) -> None:
    p, path = start(short_tmp, config_text(short_tmp, qemu72.sock_path, limits="max_sessions = 5"))
    with p:
        p.wait_log("event=upstream_ready")
        a = greeted(short_tmp / "p.sock")
        b = greeted(short_tmp / "p.sock")  # two sessions: allowed by the old limit
        b.close()
        path.write_text(
            config_text(short_tmp, qemu72.sock_path, log_level="debug", limits="max_sessions = 1")
        )
        p.proc.send_signal(signal.SIGHUP)
        text = p.wait_log("event=reloaded")
        (line,) = log_events(text, "reloaded")
        assert "log_level=debug" in line and f"source={path}" in line, line
        assert not log_events(text, "reload_partial"), text
        assert not log_events(text, "reload_failed"), text
        deadline = time.monotonic() + 5
        while "reason=eof" not in "".join(log_events(p.log(), "session_end")):
            assert time.monotonic() < deadline, p.log()
            time.sleep(0.02)
        # a holds the only session the new limit allows.
        assert refused(short_tmp / "p.sock")
        text = p.wait_log("event=session_refused")
        (refusal,) = log_events(text, "session_refused")
        assert "limit=1" in refusal, refusal
        assert a.command({"execute": "query-status"})["return"]["status"] == "prelaunch"
        a.close()
        assert p.stop() == 0, p.log()


def test_reload_log_level_takes_effect(
    short_tmp: Path, qemu72: QemuProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``warning`` silences the per-session info lines; warnings still come."""
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(short_tmp / "notify"))
    notify.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", str(short_tmp / "notify"))
    p, path = start(short_tmp, config_text(short_tmp, qemu72.sock_path))
    try:
        with p:
            p.wait_log("event=upstream_ready")
            greeted(short_tmp / "p.sock").close()
            p.wait_log("event=session_start")
            path.write_text(
                config_text(
                    short_tmp, qemu72.sock_path, log_level="warning", limits="max_sessions = 1"
                )
            )
            p.proc.send_signal(signal.SIGHUP)
            # The reload is done at the READY=1 that follows RELOADING=1 (earlier datagrams
            # are still queued: the start-up READY=1 and STATUS= lines).
            reloading = False
            while True:
                msg = notify.recv(4096).split(b"\n")
                if reloading and b"READY=1" in msg:
                    break
                reloading = reloading or b"RELOADING=1" in msg
            starts = len(log_events(p.log(), "session_start"))
            a = greeted(short_tmp / "p.sock")
            assert refused(short_tmp / "p.sock")
            text = p.wait_log("event=session_refused")
            assert len(log_events(text, "session_start")) == starts, text
            a.close()
            assert p.stop() == 0
    finally:
        notify.close()


def test_reload_route_change_needs_restart(short_tmp: Path, qemu72: QemuProcess) -> None:
    p, path = start(short_tmp, config_text(short_tmp, qemu72.sock_path))
    with p:
        p.wait_log("event=upstream_ready")
        path.write_text(config_text(short_tmp, str(short_tmp / "other-qemu.sock")))
        p.proc.send_signal(signal.SIGHUP)
        text = p.wait_log("event=reload_partial")
        assert "restart" in log_events(text, "reload_partial")[0]
        # Still serving the QEMU it had.
        with greeted(short_tmp / "p.sock") as c:
            assert c.command({"execute": "query-status"})["return"]["status"] == "prelaunch"
        assert "other-qemu" not in "".join(log_events(p.log(), "upstream_connect_failed"))
        assert p.stop() == 0


def test_reload_broken_file_keeps_old_settings(short_tmp: Path, qemu72: QemuProcess) -> None:
    p, path = start(short_tmp, config_text(short_tmp, qemu72.sock_path, limits="max_sessions = 2"))
    with p:
        p.wait_log("event=upstream_ready")
        # A valid limit beside two problems: nothing of the file may apply.
        broken = config_text(
            short_tmp, qemu72.sock_path, limits="max_sessions = 1\nmax_queued = -3"
        )
        path.write_text("colour = 'blue'\n" + broken)
        p.proc.send_signal(signal.SIGHUP)
        text = p.wait_log("keeping the old settings")
        failed = log_events(text, "reload_failed")
        assert len(failed) == 3, failed
        assert any("colour" in line for line in failed), failed
        assert any("limits.max_queued" in line for line in failed), failed
        assert not log_events(text, "reloaded"), text
        a, b = (
            greeted(short_tmp / "p.sock"),
            greeted(short_tmp / "p.sock"),
        )  # max_sessions is still 2
        assert b.command({"execute": "query-status"})["return"]["status"] == "prelaunch"
        assert refused(short_tmp / "p.sock")
        # Not TOML at all.
        path.write_text("[[route]\n")
        p.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 5
        while len(log_events(p.log(), "reload_failed")) < 5:
            assert time.monotonic() < deadline, p.log()
            time.sleep(0.02)
        assert any("not valid TOML" in x for x in log_events(p.log(), "reload_failed"))
        assert a.command({"execute": "query-status"})["return"]["status"] == "prelaunch"
        a.close()
        b.close()
        assert p.proc.poll() is None
        assert p.stop() == 0


def test_reload_policy_applies_to_live_sessions(short_tmp: Path, qemu72: QemuProcess) -> None:
    listen = f'[{{ address = "{short_tmp / "p.sock"}" }}]'
    p, path = start(short_tmp, config_text(short_tmp, qemu72.sock_path, listen))
    with p:
        p.wait_log("event=upstream_ready")
        c = greeted(short_tmp / "p.sock")
        assert "return" in c.command({"execute": "query-name"})
        tightened = f'[{{ address = "{short_tmp / "p.sock"}", allow = ["query-status"] }}]'
        path.write_text(config_text(short_tmp, qemu72.sock_path, tightened))
        p.proc.send_signal(signal.SIGHUP)
        p.wait_log("event=reloaded")
        reply = c.command({"execute": "query-name", "id": 3})
        assert reply == {
            "id": 3,
            "error": {
                "class": "CommandNotFound",
                "desc": "The command query-name has been disabled for this socket",
            },
        }, reply
        assert "return" in c.command({"execute": "query-status"})
        c.close()
        assert p.stop() == 0


# -- listener security --------------------------------------------------------------------------


def test_default_socket_mode_0600(short_tmp: Path, qemu72: QemuProcess) -> None:
    sock = short_tmp / "p.sock"
    with ProxyProcess(
        "--upstream",
        qemu72.sock_path,
        "--listen",
        str(sock),
        "--state-dir",
        str(short_tmp),
        tmp_path=short_tmp,
    ) as p:
        p.wait_log("event=listening")
        st = os.stat(sock)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o600, oct(st.st_mode)
        assert st.st_uid == os.getuid()
        assert p.stop() == 0


def test_mode_and_group(short_tmp: Path, qemu72: QemuProcess) -> None:
    group = grp.getgrnam("daemon") if "daemon" in {g.gr_name for g in grp.getgrall()} else None
    group = group or grp.getgrgid(65534)
    listen = (
        f'[{{ address = "{short_tmp / "a.sock"}", mode = "0660", group = "{group.gr_name}" }},'
        f' {{ address = "{short_tmp / "b.sock"}", mode = "0640" }}]'
    )
    p, _ = start(short_tmp, config_text(short_tmp, qemu72.sock_path, listen))
    with p:
        p.wait_log(f"listen=unix:{short_tmp / 'b.sock'}")
        a, b = os.stat(short_tmp / "a.sock"), os.stat(short_tmp / "b.sock")
        assert stat.S_IMODE(a.st_mode) == 0o660, oct(a.st_mode)
        assert a.st_gid == group.gr_gid, (a.st_gid, group)
        assert stat.S_IMODE(b.st_mode) == 0o640, oct(b.st_mode)
        assert b.st_gid == os.getgid()
        assert p.stop() == 0


def test_stale_socket_replaced(short_tmp: Path, qemu72: QemuProcess) -> None:
    sock = short_tmp / "p.sock"
    old = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old.bind(str(sock))
    old.close()  # the file stays; nobody listens
    assert stat.S_ISSOCK(os.lstat(sock).st_mode)
    p, _ = start(short_tmp, config_text(short_tmp, qemu72.sock_path))
    with p:
        p.wait_log("event=upstream_ready")
        with greeted(sock) as c:
            assert "return" in c.command({"execute": "query-status"})
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
        assert p.stop() == 0


def test_live_socket_not_stolen(short_tmp: Path, qemu72: QemuProcess) -> None:
    sock = short_tmp / "p.sock"
    owner = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    owner.bind(str(sock))
    owner.listen(4)
    try:
        line = start_failure(short_tmp, config_text(short_tmp, qemu72.sock_path))
        assert str(sock) in line and "another process is listening" in line, line
        # The owner still has its socket: a client reaches it, not the proxy.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(str(sock))
            conn, _ = owner.accept()
            conn.close()
    finally:
        owner.close()


def test_regular_file_not_replaced(short_tmp: Path, qemu72: QemuProcess) -> None:
    path = short_tmp / "p.sock"
    path.write_text("precious\n")
    line = start_failure(short_tmp, config_text(short_tmp, qemu72.sock_path))
    assert "not a socket" in line, line
    assert path.read_text() == "precious\n"


def test_peer_credentials_and_session_end(short_tmp: Path, qemu72: QemuProcess) -> None:
    p, _ = start(short_tmp, config_text(short_tmp, qemu72.sock_path))
    with p:
        p.wait_log("event=upstream_ready")
        with greeted(short_tmp / "p.sock") as c:
            c.command({"execute": "query-status"})
        text = p.wait_log("event=session_end")
        (begin,) = log_events(text, "session_start")
        found = re.search(r"pid=(\d+),uid=(\d+),gid=(\d+)", begin)
        assert found, begin
        assert tuple(map(int, found.groups())) == (os.getpid(), os.getuid(), os.getgid()), begin
        assert "route=vm1" in begin and "session=1" in begin, begin
        assert f"listen=unix:{short_tmp / 'p.sock'}" in begin, begin
        (end,) = log_events(text, "session_end")
        assert "reason=eof" in end and "session=1" in end, end
        assert p.stop() == 0


# -- per-listener policy (in-process, real QEMU) -------------------------------------------------


@contextlib.asynccontextmanager
async def policy_proxy(qemu: QemuProcess, short_tmp: Path, listen: str) -> AsyncIterator[Server]:
    path = short_tmp / "policy.toml"
    path.write_text(config_text(short_tmp, qemu.sock_path, listen))
    cfg = dataclasses.replace(load(path), log_level="debug")
    server = Server(cfg, asyncio.get_running_loop())
    server.start()
    try:
        await wait_route_ready(server)
        yield server
    finally:
        await server.stop()


async def connect(path: Path, oob: bool = False) -> AsyncRaw:
    c = await AsyncRaw.connect(str(path))
    await c.negotiate(oob)
    return c


def disabled(command: str, client_id: str) -> bytes:
    return (
        b'{"id": "' + client_id.encode() + b'", "error": {"class": "CommandNotFound", '
        b'"desc": "The command ' + command.encode() + b' has been disabled for this socket"}}\r\n'
    )


async def no_event(c: AsyncRaw, name: str, seconds: float = 0.3) -> None:
    with contextlib.suppress(TimeoutError):
        while True:
            msg = await c.message(timeout=seconds)
            assert msg.get("event") != name, msg


async def test_read_only_listener(short_tmp: Path, qemu72: QemuProcess) -> None:
    ro_sock = short_tmp / "ro.sock"
    listen = f'["{short_tmp / "rw.sock"}", {{ address = "{ro_sock}", allow = ["query-*"] }}]'
    async with policy_proxy(qemu72, short_tmp, listen):
        ro = await connect(short_tmp / "ro.sock", oob=True)  # qmp_capabilities is always allowed
        rw = await connect(short_tmp / "rw.sock")
        status = await ro.command({"execute": "query-status"})
        assert status["return"]["status"] == "prelaunch"

        await ro.send(b'{"execute": "stop", "id": "x-1"}')
        assert await ro.line() == disabled("stop", "x-1")
        assert (await rw.command({"execute": "query-status"}))["return"]["status"] == "prelaunch"

        # Something `stop` would change: run the VM, then the denied stop must not pause it.
        assert await rw.command({"execute": "cont"}) == {"return": {}}
        await ro.send(b'{"execute": "stop", "id": "x-2"}')
        line = await ro.line()
        while b'"event"' in line:  # RESUME from the cont
            line = await ro.line()
        assert line == disabled("stop", "x-2")
        await no_event(rw, "STOP")
        assert (await rw.command({"execute": "query-status"}))["return"]["status"] == "running"

        # exec-oob is policed alike.
        await ro.send(b'{"exec-oob": "migrate-pause", "id": "p"}')
        assert await ro.line() == disabled("migrate-pause", "p")
        await ro.send(
            b'{"execute": "human-monitor-command", "arguments": '
            b'{"command-line": "stop"}, "id": "h"}'
        )
        assert await ro.line() == disabled("human-monitor-command", "h")
        assert (await rw.command({"execute": "query-status"}))["return"]["status"] == "running"

        # qmp_capabilities again is QEMU's "already complete", not a policy denial.
        reply = await ro.command({"execute": "qmp_capabilities", "id": "c"})
        assert reply == {
            "id": "c",
            "error": {
                "class": "CommandNotFound",
                "desc": "Capabilities negotiation is already complete, command ignored",
            },
        }, reply
        # A split would run migrate-set-capabilities, which this socket may not run.
        await ro.send(
            json.dumps(
                {
                    "execute": "migrate",
                    "id": "m",
                    "arguments": {"uri": "exec:cat", "capabilities": CAPS},
                }
            ).encode()
        )
        assert await ro.line() == disabled("migrate", "m")
        # The open listener is unaffected.
        assert await rw.command({"execute": "stop"}) == {"return": {}}
        await ro.close()
        await rw.close()


async def test_deny_set_capabilities_denies_migrate_with_capabilities(
    short_tmp: Path, qemu72: QemuProcess
) -> None:
    listen = f'[{{ address = "{short_tmp / "p.sock"}", deny = ["migrate-set-capabilities"] }}]'
    async with policy_proxy(qemu72, short_tmp, listen):
        c = await connect(short_tmp / "p.sock")
        await c.send(
            b'{"execute": "migrate-set-capabilities", "id": "s", "arguments": '
            b'{"capabilities": [{"capability": "xbzrle", "state": true}]}}'
        )
        assert await c.line() == disabled("migrate-set-capabilities", "s")

        request = {
            "execute": "migrate",
            "id": "m",
            "arguments": {"uri": "exec:cat > /dev/null", "capabilities": CAPS},
        }
        await c.send(json.dumps(request).encode())
        assert await c.line() == disabled("migrate", "m")
        request = {
            "execute": "migrate-incoming",
            "id": "i",
            "arguments": {"uri": "tcp:127.0.0.1:1", "capabilities": CAPS},
        }
        await c.send(json.dumps(request).encode())
        assert await c.line() == disabled("migrate-incoming", "i")
        caps = await c.command({"execute": "query-migrate-capabilities"})
        assert {x["capability"]: x["state"] for x in caps["return"]}["xbzrle"] is False

        # Without capabilities, migrate is allowed: QEMU itself rejects the bad URI.
        reply = await c.command(
            {"execute": "migrate", "id": "plain", "arguments": {"uri": "bogus:x"}}
        )
        assert reply["id"] == "plain"
        assert reply["error"]["class"] == "GenericError", reply
        assert reply["error"]["desc"] == "Parameter 'uri' expects a valid migration protocol"
        assert "disabled" not in reply["error"]["desc"]
        await c.close()


def test_reload_keeps_command_line_overrides(short_tmp: Path, qemu72: QemuProcess) -> None:
    """Flags override the file (README); a SIGHUP re-reading the file must not drop them."""
    path = short_tmp / "vm1.toml"
    path.write_text(config_text(short_tmp, qemu72.sock_path))  # no max_sessions: the default, 64
    with ProxyProcess("--config", str(path), "--max-sessions", "1", tmp_path=short_tmp) as p:
        p.wait_log("event=upstream_ready")
        a = greeted(short_tmp / "p.sock")
        assert refused(short_tmp / "p.sock"), "--max-sessions 1 not applied"
        p.proc.send_signal(signal.SIGHUP)  # the file is unchanged
        p.wait_log("event=reloaded")
        try:
            assert refused(short_tmp / "p.sock"), "--max-sessions 1 was dropped by the reload"
        finally:
            a.close()
        assert p.stop() == 0


def test_reload_unchanged_file_with_flags_needs_no_restart(
    short_tmp: Path, qemu72: QemuProcess
) -> None:
    """The Dockerfile runs ``--config FILE --metrics 0.0.0.0:9740``: a reload of an unchanged
    file must not claim that metrics (or listeners) changed and need a restart."""
    path = short_tmp / "vm1.toml"
    path.write_text(config_text(short_tmp, qemu72.sock_path))
    port = free_port()
    with ProxyProcess(
        "--config", str(path), "--metrics", f"127.0.0.1:{port}", tmp_path=short_tmp
    ) as p:
        p.wait_log("event=upstream_ready")
        p.proc.send_signal(signal.SIGHUP)
        text = p.wait_log("event=reloaded")
        assert not log_events(text, "reload_partial"), text
        assert p.stop() == 0


def test_unreachable_live_socket_not_stolen(short_tmp: Path, qemu72: QemuProcess) -> None:
    """A socket the proxy may not connect to (EACCES) is not known to be stale: keep it.

    Only ECONNREFUSED proves nobody listens.  As root, the proxy runs without
    CAP_DAC_OVERRIDE so that a mode-0000 socket refuses it, as another user's would.
    """
    sock = short_tmp / "p.sock"
    owner = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    owner.bind(str(sock))
    owner.listen(4)
    os.chmod(sock, 0)
    inode = os.stat(sock).st_ino
    libc = ctypes.CDLL(None, use_errno=True)

    def without_dac_override() -> None:
        for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
            if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
                raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")

    path = short_tmp / "vm1.toml"
    path.write_text(config_text(short_tmp, qemu72.sock_path))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    log = short_tmp / "proxy.log"
    with log.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "proxy", "--config", str(path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=env,
            preexec_fn=without_dac_override if os.geteuid() == 0 else None,
        )
        try:
            deadline = time.monotonic() + 5
            while proc.poll() is None and "event=listening" not in log.read_text():
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.02)
            stolen = os.path.exists(sock) and os.stat(sock).st_ino != inode
            assert not stolen and os.path.exists(sock), (
                f"the proxy replaced a live socket it could not probe:\n{log.read_text()}"
            )
            assert proc.wait(5) != 0
            assert log_events(log.read_text(), "start_failed"), log.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            owner.close()


def test_busy_live_socket_does_not_hang_start(short_tmp: Path, qemu72: QemuProcess) -> None:
    """A live owner whose accept queue is full (a wedged process) must not hang start-up."""
    sock = short_tmp / "p.sock"
    owner = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    owner.bind(str(sock))
    owner.listen(0)
    queued = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    queued.connect(str(sock))  # fills the queue; nobody accepts
    try:
        # start_failure fails the test if start-up hangs probing the busy live socket.
        line = start_failure(short_tmp, config_text(short_tmp, qemu72.sock_path), within=3)
        assert str(sock) in line, line
        assert os.path.exists(sock)
    finally:
        queued.close()
        owner.close()
