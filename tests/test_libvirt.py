"""qmp-proxy-qemu as a real libvirt's ``<emulator>``: libvirt 9 (Debian 12) with QEMU 7.2.

No mocks: libvirtd and virtlogd run (tests/libvirt_env.py, in a private mount namespace so the
host keeps its own libvirt state), virsh drives a small TCG domain whose emulator is this venv's
``qmp-proxy-qemu`` console script, and the real QEMU 7.2 behind it lacks ``capabilities`` on
``migrate``, so the backport splits.  QEMU runs as libvirt's QEMU user (libvirt-qemu) with
libvirt's default confinement here (DAC, cgroups, the seccomp sandbox; AppArmor only where the
kernel has it), unless that user cannot reach the venv: then as root (see libvirt_env).

The tests share one domain and run in file order: each leaves it running, the last destroys it.
A failing test's report carries libvirtd's log and the domain logs.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import stat
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final

import pytest

from proxy.emulator import PRIVATE_SOCKET
from tests.libvirt_env import FAILURE_REPORT, REAL_QEMU, WRAPPER, Domain, Libvirt, make_domain

pytestmark = pytest.mark.libvirt

MAIN: Final = "qpt-main"
SLOW_START: Final = 12.0  # seconds: longer than the daemon's client_wait (10 s)


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def libvirt() -> Iterator[Libvirt]:
    with Libvirt() as lv:
        yield lv


@pytest.fixture(autouse=True)
def _libvirt_logs_on_failure(request: pytest.FixtureRequest, libvirt: Libvirt) -> None:
    request.node.stash[FAILURE_REPORT] = libvirt.logs


@pytest.fixture(scope="module")
def vm(libvirt: Libvirt) -> Domain:
    """The shared domain: defined (snapshots keep their metadata), started, left running."""
    dom = make_domain(libvirt, MAIN)
    libvirt.virsh("define", str(dom.xml))
    libvirt.virsh("start", MAIN)
    return dom


# -- helpers -------------------------------------------------------------------------------------


def _run(args: list[str]) -> str:
    done = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, f"{args}: {done.stderr}"
    return done.stdout


def _wait(predicate: Callable[[], bool], timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def qemu_pid(lv: Libvirt, name: str) -> int:
    """QEMU's pid as libvirt knows it (its pidfile)."""
    return int((lv.root / "run" / "qemu" / f"{name}.pid").read_text())


def proxy_pids(name: str) -> list[int]:
    """The wrapper's proxy processes for a domain: the wrapper's argv, but not QEMU (which
    has the same arguments after the exec, under the real binary's name)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if str(WRAPPER).encode() in argv[:2] and f"guest={name},".encode() in b" ".join(argv):
            found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def monitor(lv: Libvirt, name: str, execute: str, **arguments: Any) -> Any:
    """``virsh qemu-monitor-command``: QEMU's return value, through libvirt and the proxy."""
    command: dict[str, Any] = {"execute": execute}
    if arguments:
        command["arguments"] = arguments
    reply = json.loads(lv.virsh("qemu-monitor-command", name, json.dumps(command)))
    assert "return" in reply, reply
    return reply["return"]


def state(lv: Libvirt, name: str) -> str:
    return lv.virsh("domstate", name).strip()


class QmpClient:
    """A raw QMP client on the proxy's extra listener: another tool beside libvirt."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(30)
        self.sock.connect(str(path))
        self.reader = self.sock.makefile("rb")
        self.events: list[dict[str, Any]] = []
        self.greeting = self._read()
        assert self.command("qmp_capabilities") == {}

    def _read(self) -> dict[str, Any]:
        line = self.reader.readline()
        assert line, "the proxy closed the connection"
        message: dict[str, Any] = json.loads(line)
        return message

    def command(self, execute: str, fds: list[int] | None = None, **arguments: Any) -> Any:
        message: dict[str, Any] = {"execute": execute, "id": execute}
        if arguments:
            message["arguments"] = arguments
        data = json.dumps(message).encode()
        if fds:
            socket.send_fds(self.sock, [data], fds)
        else:
            self.sock.sendall(data)
        while True:
            reply = self._read()
            if "event" in reply:
                self.events.append(reply)
                continue
            assert reply.get("id") == execute, reply
            assert "return" in reply, reply
            return reply["return"]

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


# -- the capability probe ------------------------------------------------------------------------


def _without_paths(xml: str, emulator: str) -> str:
    return xml.replace(f"<path>{emulator}</path>", "<path/>")


# What a capability cache file holds about the binary rather than what QEMU answered.
_VOLATILE: Final = {"emulator", "qemuctime", "qemumoddirmtime", "selfctime"}


def _cache_entry(lv: Libvirt, emulator: str) -> list[str]:
    for path in (lv.root / "cache" / "qemu" / "capabilities").glob("*.xml"):
        root = ET.parse(path).getroot()
        if root.findtext("emulator") == emulator:
            return [ET.tostring(child).decode() for child in root if child.tag not in _VOLATILE]
    raise AssertionError(f"no capability cache entry for {emulator}")


def test_the_capability_probe_sees_the_same_qemu_with_and_without_the_wrapper(
    libvirt: Libvirt,
) -> None:
    """libvirt probes an emulator (``-machine none ... -qmp unix:... -daemonize``) and caches
    what it learns; the wrapper passes probes through untouched, so libvirt must learn the same
    about it as about the real binary: the same domain capabilities, the same cache entry."""
    args = ["--virttype", "qemu", "--arch", "x86_64", "--machine", "pc"]
    real = libvirt.virsh("domcapabilities", "--emulatorbin", REAL_QEMU, *args)
    wrapped = libvirt.virsh("domcapabilities", "--emulatorbin", str(WRAPPER), *args)
    assert "<machine>pc-i440fx-7.2</machine>" in real
    assert _without_paths(wrapped, str(WRAPPER)) == _without_paths(real, REAL_QEMU)
    real_entry = _cache_entry(libvirt, REAL_QEMU)
    wrapped_entry = _cache_entry(libvirt, str(WRAPPER))
    assert len(real_entry) > 100  # flags, machines, CPU models, the QMP schema's answers ...
    assert wrapped_entry == real_entry


# -- the domain ----------------------------------------------------------------------------------


def test_a_domain_starts_with_the_proxy_in_front_of_qemu(libvirt: Libvirt, vm: Domain) -> None:
    assert state(libvirt, MAIN) == "running"
    pid = qemu_pid(libvirt, MAIN)
    # libvirt's pid is QEMU itself (the wrapper exec'd), with its monitor on the private socket.
    assert os.readlink(f"/proc/{pid}/exe") == os.path.realpath(REAL_QEMU)
    domain_dir = libvirt.domain_dir(MAIN)
    private = f"/var/lib/libvirt/qemu/{domain_dir.name}/{PRIVATE_SOCKET}"
    assert f"charmonitor,path={private},".encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    # One proxy, running as QEMU runs (libvirt's user), in QEMU's cgroups.
    proxies = proxy_pids(MAIN)
    assert len(proxies) == 1, proxies
    proxy = proxies[0]
    assert os.stat(f"/proc/{proxy}").st_uid == os.stat(f"/proc/{pid}").st_uid
    if libvirt.qemu_user != "root":
        assert os.stat(f"/proc/{pid}").st_uid != 0
    proxy_cgroups = Path(f"/proc/{proxy}/cgroup").read_text()
    assert "qemu-" in proxy_cgroups and MAIN in proxy_cgroups, proxy_cgroups
    # Its journal lock sits in the domain directory (the default state_dir), which libvirt
    # made for QEMU's user: the split's journal can be written there.
    assert list(domain_dir.glob(f"{MAIN}.*.lock")), sorted(domain_dir.iterdir())
    # The extra listener: the proxy's own socket, only for QEMU's user (and root).
    info = os.stat(vm.listener)
    assert stat.S_ISSOCK(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600
    assert info.st_uid == os.stat(f"/proc/{pid}").st_uid
    # The proxy's log lines are in libvirt's domain log.
    log = libvirt.domain_log(MAIN)
    assert f"event=wrapping route={MAIN} qemu_pid={pid}" in log, log
    assert "event=upstream_ready" in log and "mode=split" in log


def test_qemu_monitor_command_goes_through_the_proxy(libvirt: Libvirt, vm: Domain) -> None:
    assert monitor(libvirt, MAIN, "query-status")["status"] == "running"
    pretty = libvirt.virsh("qemu-monitor-command", MAIN, "--pretty", '{"execute":"query-status"}')
    assert len(pretty.splitlines()) > 3 and json.loads(pretty)["return"]["running"] is True
    assert "running" in libvirt.virsh("qemu-monitor-command", MAIN, "--hmp", "info status")
    # QEMU 7.2's migrate has no "capabilities"; the proxy's schema does, so libvirt's monitor
    # is the proxy's.
    schema = monitor(libvirt, MAIN, "query-qmp-schema")
    migrate = next(e for e in schema if e["name"] == "migrate")
    arg_type = next(e for e in schema if e["name"] == migrate["arg-type"])
    assert "capabilities" in [m["name"] for m in arg_type["members"]]


def test_suspend_resume_and_their_events(libvirt: Libvirt, vm: Domain) -> None:
    """libvirt's lifecycle events (from QEMU's STOP/RESUME relayed by the proxy) and the raw
    QMP events reach virsh's event loops."""
    watchers = [
        subprocess.Popen(
            ["virsh", "-c", libvirt.uri, *args, "--loop", "--timeout", "30"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for args in (["event", "--domain", MAIN, "--all"], ["qemu-monitor-event", MAIN])
    ]
    try:
        time.sleep(1.5)  # both registered
        libvirt.virsh("suspend", MAIN)
        assert state(libvirt, MAIN) == "paused"
        assert monitor(libvirt, MAIN, "query-status")["status"] == "paused"
        libvirt.virsh("resume", MAIN)
        assert state(libvirt, MAIN) == "running"
        time.sleep(1.0)
    finally:
        for watcher in watchers:
            watcher.send_signal(signal.SIGINT)
    lifecycle, raw = (watcher.communicate(timeout=10)[0] for watcher in watchers)
    assert re.search(rf"event 'lifecycle' for domain '?{MAIN}'?: Suspended", lifecycle), lifecycle
    assert re.search(rf"event 'lifecycle' for domain '?{MAIN}'?: Resumed", lifecycle), lifecycle
    assert "event STOP" in raw and "event RESUME" in raw, raw


def test_save_and_restore(libvirt: Libvirt, vm: Domain) -> None:
    """libvirt saves by passing a descriptor (``getfd``) and migrating to ``fd:``, and restores
    into a new QEMU with ``-incoming defer``: both through the proxy, and a new proxy for the
    new QEMU."""
    before = proxy_pids(MAIN)
    saved = libvirt.root / f"{MAIN}.save"
    libvirt.virsh("save", MAIN, str(saved))
    assert state(libvirt, MAIN) == "shut off"
    assert _wait(lambda: not any(alive(p) for p in before)), "the proxy outlived its QEMU"
    libvirt.virsh("restore", str(saved))
    assert state(libvirt, MAIN) == "running"
    after = proxy_pids(MAIN)
    assert len(after) == 1 and after != before
    assert monitor(libvirt, MAIN, "query-status")["status"] == "running"
    saved.unlink()


def test_dump_memory_only(libvirt: Libvirt, vm: Domain) -> None:
    dump = libvirt.root / f"{MAIN}.core"
    libvirt.virsh("dump", MAIN, str(dump), "--memory-only")
    with dump.open("rb") as core:
        assert core.read(4) == b"\x7fELF"
    assert dump.stat().st_size > 64 * 1024 * 1024
    assert state(libvirt, MAIN) == "running"
    dump.unlink()


def test_internal_snapshot_on_qcow2(libvirt: Libvirt, vm: Domain) -> None:
    libvirt.virsh("snapshot-create-as", MAIN, "s1")
    assert libvirt.virsh("snapshot-list", MAIN, "--name").split() == ["s1"]
    # QEMU's own view: the snapshot is in the image (savevm through the proxy's monitor).
    assert "s1" in libvirt.virsh("qemu-monitor-command", MAIN, "--hmp", "info snapshots")
    libvirt.virsh("snapshot-revert", MAIN, "s1", "--running")
    assert state(libvirt, MAIN) == "running"
    libvirt.virsh("snapshot-delete", MAIN, "s1")
    assert libvirt.virsh("snapshot-list", MAIN, "--name").split() == []


def test_disk_hotplug(libvirt: Libvirt, vm: Domain) -> None:
    image = libvirt.root / "hotplug.qcow2"
    _run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "8M"])
    libvirt.virsh(
        "attach-disk",
        MAIN,
        str(image),
        "vdb",
        "--driver",
        "qemu",
        "--subdriver",
        "qcow2",
        "--targetbus",
        "virtio",
        "--live",
    )
    assert "vdb" in libvirt.virsh("domblklist", MAIN)
    blocks = monitor(libvirt, MAIN, "query-block")
    assert str(image) in json.dumps(blocks)


def test_a_second_client_beside_libvirt_gets_the_backport(libvirt: Libvirt, vm: Domain) -> None:
    """Another tool on the extra listener, while libvirt stays attached: ``migrate`` with
    ``capabilities``, which QEMU 7.2 alone refuses, is split by the proxy; libvirt takes the
    foreign migration's events and still works."""
    client = QmpClient(vm.listener)
    try:
        assert client.greeting["QMP"]["version"]["qemu"]["minor"] == 2
        assert client.command("query-status")["status"] == "running"
        target = libvirt.root / "migrated.bin"
        with target.open("wb") as out:
            client.command("getfd", fds=[out.fileno()], fdname="mig")
        client.command(
            "migrate", uri="fd:mig", capabilities=[{"capability": "xbzrle", "state": True}]
        )
        assert _wait(lambda: client.command("query-migrate").get("status") == "completed", 60)
        caps = {c["capability"]: c["state"] for c in client.command("query-migrate-capabilities")}
        assert caps["xbzrle"] is True  # set by the split's migrate-set-capabilities
        assert target.stat().st_size > 100_000  # a migration stream (zero pages are small)
        # The migration stopped the guest (postmigrate); libvirt saw it and can go on.
        assert _wait(lambda: state(libvirt, MAIN) == "paused")
        libvirt.virsh("resume", MAIN)
        assert state(libvirt, MAIN) == "running"
        assert monitor(libvirt, MAIN, "query-status")["status"] == "running"
        client.command(
            "migrate-set-capabilities", capabilities=[{"capability": "xbzrle", "state": False}]
        )
        target.unlink()
    finally:
        client.close()
    log = libvirt.domain_log(MAIN)
    assert "listen=unix:" in log and "event=session_start" in log


def test_libvirtd_restart_with_the_domain_running(libvirt: Libvirt, vm: Domain) -> None:
    """libvirtd going away closes its monitor connection; the proxy must not take that for
    anything but a client leaving, and libvirt reconnects to the same proxy on restart."""
    pid = qemu_pid(libvirt, MAIN)
    proxies = proxy_pids(MAIN)
    sessions = libvirt.domain_log(MAIN).count("event=session_start")
    libvirt.stop_libvirtd()
    time.sleep(0.5)
    assert alive(pid) and all(alive(p) for p in proxies)
    libvirt.start_libvirtd()
    assert state(libvirt, MAIN) == "running"
    assert monitor(libvirt, MAIN, "query-status")["status"] == "running"
    assert qemu_pid(libvirt, MAIN) == pid and proxy_pids(MAIN) == proxies
    assert libvirt.domain_log(MAIN).count("event=session_start") > sessions


def test_a_slow_qemu_start_is_held_as_qemus_own_socket_would(libvirt: Libvirt) -> None:
    """libvirt connects before QEMU runs; the proxy holds it however long QEMU takes (the
    daemon's client_wait, 10 s, made ``virsh start`` fail at 15 s)."""
    slow = libvirt.root / "slow-qemu"
    slow.write_text(f'#!/bin/sh\nsleep {SLOW_START:.0f}\nexec {REAL_QEMU} "$@"\n')
    slow.chmod(0o755)
    dom = make_domain(libvirt, "qpt-slow", qemu=str(slow), disk=False)
    started = time.monotonic()
    libvirt.virsh("create", str(dom.xml))
    assert time.monotonic() - started > SLOW_START
    assert state(libvirt, dom.name) == "running"
    assert monitor(libvirt, dom.name, "query-status")["status"] == "running"
    libvirt.virsh("destroy", dom.name)


def test_a_proxy_killed_takes_its_domain_down_never_half_working(libvirt: Libvirt) -> None:
    """libvirt takes an EOF on the monitor for QEMU's death and stops the domain: a QEMU whose
    proxy died is not left running without a monitor."""
    dom = make_domain(libvirt, "qpt-orphan", disk=False)
    libvirt.virsh("create", str(dom.xml))
    pid = qemu_pid(libvirt, dom.name)
    (proxy,) = proxy_pids(dom.name)
    os.kill(proxy, signal.SIGKILL)
    assert _wait(lambda: not alive(pid)), "QEMU outlived its proxy"
    assert _wait(lambda: dom.name not in libvirt.virsh("list", "--all", "--name").split())


def test_destroy_takes_the_proxy_and_its_listener(libvirt: Libvirt, vm: Domain) -> None:
    pid = qemu_pid(libvirt, MAIN)
    proxies = proxy_pids(MAIN)
    assert proxies and vm.listener.exists()
    libvirt.virsh("destroy", MAIN)
    assert _wait(lambda: not alive(pid))
    assert _wait(lambda: not any(alive(p) for p in proxies)), libvirt.domain_log(MAIN)
    assert _wait(lambda: not vm.listener.exists())
    assert 'event=stopped why="QEMU exited"' in libvirt.domain_log(MAIN)
    libvirt.virsh("undefine", MAIN, "--snapshots-metadata")
