"""The live view: ``qmp-proxy status`` against a real daemon in front of real QEMU 7.2."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.proxyproc import REPO, ProxyProcess
from tests.qemu import QemuProcess


def _status(control: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", "status", "--control", f"unix:{control}", *extra],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def _client(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(10)
    sock.connect(str(path))
    reader = sock.makefile("rb")
    reader.readline()
    sock.sendall(b'{"execute":"qmp_capabilities"}{"execute":"query-status","id":1}')
    reader.readline()
    reader.readline()
    return sock


@pytest.mark.qemu
def test_status_shows_routes_and_sessions(short_tmp: Path) -> None:
    control = short_tmp / "control.sock"
    listen = short_tmp / "proxy.sock"
    with QemuProcess("7.2", "-M", "none") as qemu:
        args = [
            "--upstream",
            f"unix:{qemu.sock_path}",
            "--listen",
            f"unix:{listen}",
            "--name",
            "vm1",
            "--state-dir",
            str(short_tmp),
            "--control",
            f"unix:{control}",
        ]
        with ProxyProcess(*args, tmp_path=short_tmp) as proxy:
            proxy.wait_log("event=upstream_ready")
            assert stat.S_IMODE(os.stat(control).st_mode) == 0o600
            clients = [_client(listen), _client(listen)]
            done = _status(control, "--json")
            assert done.returncode == 0, done.stderr
            [route] = json.loads(done.stdout)["routes"]
            assert route["route"] == "vm1" and route["state"] == "ready"
            assert route["qemu"].startswith("7.2.") and route["mode"] == "split"
            assert len(route["sessions"]) == 2
            session = route["sessions"][0]
            assert session["peer"] == f"pid={os.getpid()},uid={os.getuid()},gid={os.getgid()}"
            assert session["listener"] == f"unix:{listen}"
            assert session["commands_done"] == 1 and session["in_flight"] == 0
            assert session["negotiated"] is True and session["since"] <= time.time()
            table = _status(control)
            assert table.returncode == 0 and "route vm1: ready, QEMU 7.2." in table.stdout
            for c in clients:
                c.close()
        assert not control.exists(), "the daemon removes its control socket when it stops"


def test_status_of_no_daemon_says_so(short_tmp: Path) -> None:
    done = _status(short_tmp / "absent.sock")
    assert done.returncode == 1
    assert "absent.sock" in done.stderr and "No such file" in done.stderr


def test_a_control_socket_asked_for_must_bind_and_a_failed_start_leaves_nothing(
    short_tmp: Path,
) -> None:
    listen = short_tmp / "proxy.sock"
    args = [
        "--upstream",
        f"unix:{short_tmp}/q.sock",
        "--listen",
        f"unix:{listen}",
        "--state-dir",
        str(short_tmp),
        "--control",
        "unix:/nonexistent/dir/control.sock",
    ]
    with ProxyProcess(*args, tmp_path=short_tmp) as proxy:
        assert proxy.proc.wait(20) == 1
        assert (
            "event=start_failed" in proxy.log() and "/nonexistent/dir/control.sock" in proxy.log()
        )
    assert not listen.exists(), "the listener it had made is removed"


def test_the_default_control_place_only_warns(short_tmp: Path) -> None:
    """Not installed as a service, the default directory may be missing: the daemon runs."""
    listen = short_tmp / "proxy.sock"
    env_dir = short_tmp / "missing" / "runtime"
    args = [
        "--upstream",
        f"unix:{short_tmp}/q.sock",
        "--listen",
        f"unix:{listen}",
        "--state-dir",
        str(short_tmp),
    ]
    os.environ["RUNTIME_DIRECTORY"] = str(env_dir)
    try:
        with ProxyProcess(*args, tmp_path=short_tmp) as proxy:
            proxy.wait_log("event=control_unavailable")
            assert proxy.proc.poll() is None
    finally:
        del os.environ["RUNTIME_DIRECTORY"]
