"""``qmp-proxy-qemu``, libvirt's emulator wrapper, driven as libvirt drives an emulator.

libvirt binds and listens on the monitor socket itself, passes the listening descriptor as
``-chardev socket,id=charmonitor,fd=N,server=on,wait=off`` and connects, possibly before QEMU
runs.  These tests do exactly that with a real QEMU 7.2 behind the wrapper (the tests with real
libvirt are in tests/test_libvirt.py); a fake "QEMU" script that records its argv and
environment shows what the wrapper passes on.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy import emulator, metrics
from proxy.config import ConfigError
from proxy.emulator import Monitor
from tests.qemu import QemuRecord, record

REPO = Path(__file__).resolve().parent.parent
WRAPPER = [sys.executable, "-m", "proxy.emulator"]
QEMU = "/usr/bin/qemu-system-x86_64"
MACHINE = ["-S", "-M", "none", "-nodefaults", "-display", "none"]


# -- the command line -----------------------------------------------------------------------------


def test_split_options_honours_doubled_commas() -> None:
    assert emulator.split_options("socket,id=a,,b,path=/x,,y") == ["socket", "id=a,b", "path=/x,y"]
    assert emulator.split_options("") == [""]


@pytest.mark.parametrize(
    ("args", "found"),
    [
        (["-chardev", "socket,id=charmonitor,fd=23,server=on,wait=off"], Monitor(1, 23)),
        (["-S", "--chardev", "socket,fd=5,id=charmonitor"], Monitor(2, 5)),
        # libvirt's capability probe, and other monitors: not a domain start.
        (["-qmp", "unix:/x/qmp.monitor,server=on,wait=off", "-daemonize"], None),
        (["-chardev", "socket,id=charmonitor,path=/x.sock,server=on,wait=off"], None),
        (["-chardev", "socket,id=other,fd=23,server=on,wait=off"], None),
        (["-chardev", "pty,id=charmonitor"], None),
        (["-chardev"], None),
    ],
)
def test_find_monitor(args: list[str], found: Monitor | None) -> None:
    assert emulator.find_monitor(args) == found


@pytest.mark.parametrize(
    ("args", "name"),
    [
        (["-name", "guest=web,,1,debug-threads=on"], "web,1"),
        (["-name", "db"], "db"),
        (["-M", "none"], "vm"),
    ],
)
def test_domain_name(args: list[str], name: str) -> None:
    assert emulator.domain_name(args) == name


def test_rewrite_changes_only_the_descriptor_and_waits_for_the_proxy() -> None:
    args = ["-name", "guest=a", "-chardev", "socket,id=charmonitor,fd=23,server=on,wait=off"]
    monitor = emulator.find_monitor(args)
    assert monitor is not None
    out = emulator.rewrite_monitor(args, monitor, "/var/lib/x,y/qmp.sock")
    assert out == [
        "-name",
        "guest=a",
        "-chardev",
        "socket,id=charmonitor,path=/var/lib/x,,y/qmp.sock,server=on,wait=on",
    ]


# -- settings -------------------------------------------------------------------------------------


def test_settings_defaults_when_the_default_file_is_absent(tmp_path: Path) -> None:
    settings = emulator.load_settings(tmp_path / "none.toml", "vm", required=False)
    assert settings.qemu == emulator.DEFAULT_QEMU
    assert settings.limits.client_wait == float("inf")  # held until QEMU greets
    with pytest.raises(ConfigError):
        emulator.load_settings(tmp_path / "none.toml", "vm", required=True)


def test_settings_name_the_listeners_and_report_every_problem(tmp_path: Path) -> None:
    path = tmp_path / "qemu.toml"
    path.write_text(
        'qemu = "/opt/q"\nlisten = ["unix:/run/x/{name}.qmp",'
        ' {address = "unix:/run/x/{name}-ro.qmp", allow = ["query-*"]}]\n'
        "[limits]\nmax_queued = 8\n"
    )
    settings = emulator.load_settings(path, "web", required=True)
    assert [str(lc.address) for lc in settings.listen] == [
        "unix:/run/x/web.qmp",
        "unix:/run/x/web-ro.qmp",
    ]
    assert not settings.listen[1].policy.open
    assert settings.limits.max_queued == 8 and settings.limits.client_wait == float("inf")
    path.write_text('qemu = "q"\nbogus = 1\nif_proxy_fails = "maybe"\nlisten = [1]\n')
    with pytest.raises(ConfigError) as err:
        emulator.load_settings(path, "web", required=True)
    text = "\n".join(err.value.problems)
    for key in ("qemu", "bogus", "if_proxy_fails", "listen[0]"):
        assert f": {key}" in text, text


# -- the wrapper, as libvirt runs it --------------------------------------------------------------


class Libvirtish:
    """libvirt's side: a listening monitor socket in a domain directory, the emulator started
    with the descriptor, and a client on the socket."""

    def __init__(self, tmp: Path, config: str, qemu: str = QEMU) -> None:
        self.dir = tmp / "domain-1-t1"
        self.dir.mkdir(mode=0o750)
        self.path = self.dir / "monitor.sock"
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(str(self.path))
        self.listener.listen(1)
        self.config = tmp / "qemu.toml"
        self.config.write_text(f'qemu = "{qemu}"\n' + config)
        self.stderr = tmp / "stderr.txt"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *extra: str) -> subprocess.Popen[bytes]:
        fd = self.listener.fileno()
        args = [
            *WRAPPER,
            "-name",
            "guest=t1,debug-threads=on",
            *MACHINE,
            *extra,
            "-chardev",
            f"socket,id=charmonitor,fd={fd},server=on,wait=off",
            "-mon",
            "chardev=charmonitor,id=monitor,mode=control",
        ]
        env = {"QMP_PROXY_QEMU_CONFIG": str(self.config), "PYTHONPATH": str(REPO)}
        with self.stderr.open("wb") as err:
            self.proc = proc = subprocess.Popen(args, pass_fds=[fd], env=env, stderr=err)
        self.listener.close()  # libvirt keeps no copy either once QEMU has it
        # A failing test's report shows this stderr (the wrapper's and QEMU's): tests/conftest.py.
        label = f"QEMU via qmp-proxy-qemu (pid {proc.pid})"
        record(QemuRecord(label, args, self.log, lambda: proc.poll() is None))
        return self.proc

    def connect(
        self, path: Path | None = None
    ) -> tuple[socket.socket, Iterator[dict[str, object]]]:
        sock = socket.socket(socket.AF_UNIX)
        sock.settimeout(30)
        sock.connect(str(path or self.path))
        reader = sock.makefile("rb")

        def messages() -> Iterator[dict[str, object]]:
            for line in reader:
                yield json.loads(line)

        return sock, messages()

    def log(self) -> str:
        return self.stderr.read_text(errors="replace")

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def _proxies_of(domain: str) -> list[str]:
    out = subprocess.run(["pgrep", "-af", "proxy.emulator"], capture_output=True, text=True)
    return [line for line in out.stdout.splitlines() if domain in line]


def _wait(predicate: object, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(predicate) and predicate():
            return True
        time.sleep(0.05)
    return False


def _negotiate(messages: Iterator[dict[str, object]], sock: socket.socket) -> dict[str, object]:
    greeting = next(messages)
    sock.sendall(b'{"execute":"qmp_capabilities"}')
    assert next(messages) == {"return": {}}
    return greeting


@pytest.mark.qemu
def test_a_domain_start_puts_the_proxy_in_front_of_qemu_under_the_same_pid(
    short_tmp: Path,
) -> None:
    extra = short_tmp / "t1.qmp"
    lv = Libvirtish(short_tmp, f'listen = ["unix:{short_tmp}/{{name}}.qmp"]\n')
    try:
        proc = lv.start()
        sock, messages = lv.connect()  # at once, as libvirt does: QEMU may not be up yet
        greeting = _negotiate(messages, sock)
        assert "QMP" in greeting
        # The pid libvirt started is QEMU's, not a wrapper's.
        assert os.readlink(f"/proc/{proc.pid}/exe") == os.path.realpath(QEMU)
        assert b"charmonitor,path=" in Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        # QEMU holds no copy of libvirt's listener: only the proxy does.
        targets = {
            os.readlink(f"/proc/{proc.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{proc.pid}/fd")
        }
        inode = os.stat(lv.path).st_ino
        assert not any(t == f"socket:[{inode}]" for t in targets)
        sock.sendall(b'{"execute":"query-status","id":"s"}')
        assert next(messages)["id"] == "s"
        # A second client on the extra listener, beside "libvirt", with the backport.
        assert stat.S_IMODE(os.stat(extra).st_mode) == 0o600
        other, other_messages = lv.connect(extra)
        _negotiate(other_messages, other)
        other.sendall(
            b'{"execute":"migrate-set-capabilities","arguments":{"capabilities":'
            b'[{"capability":"events","state":false}]},"id":"c"}'
        )
        assert next(other_messages) == {"return": {}, "id": "c"}
        other.sendall(
            b'{"execute":"migrate","arguments":{"uri":"exec:cat >/dev/null","capabilities":'
            b'[{"capability":"events","state":true}]},"id":"m"}'
        )
        reply = next(m for m in other_messages if "event" not in m)
        assert reply == {"return": {}, "id": "m"}
        assert _proxies_of("t1"), "the proxy runs beside QEMU"
        # QEMU goes: the proxy goes too, and with it the extra listener.
        proc.kill()
        proc.wait(10)
        assert _wait(lambda: not _proxies_of("t1")), lv.log()
        assert _wait(lambda: not extra.exists())
        assert "event=stopped" in lv.log() and 'why="QEMU exited"' in lv.log()
    finally:
        lv.close()


@pytest.mark.qemu
def test_libvirt_is_held_until_a_slow_qemu_greets(short_tmp: Path) -> None:
    """QEMU's own pre-opened socket would hold libvirt for as long as QEMU takes to start;
    the daemon's client_wait (10 s by default) must not cut it short."""
    slow = short_tmp / "slow-qemu"
    slow.write_text(f'#!/bin/sh\nsleep 11\nexec {QEMU} "$@"\n')
    slow.chmod(0o755)
    lv = Libvirtish(short_tmp, "", qemu=str(slow))
    try:
        lv.start()
        started = time.monotonic()
        sock, messages = lv.connect()
        sock.settimeout(40)
        assert "QMP" in _negotiate(messages, sock)
        assert time.monotonic() - started > 10
    finally:
        lv.close()


def _recorder(path: Path, record: Path) -> Path:
    """A stand-in for QEMU that writes its argv and environment as JSON, then exits 0."""
    path.write_text(
        f"#!{sys.executable}\nimport json, os, sys\n"
        f"record = {{'argv': sys.argv[1:], 'env': dict(os.environ)}}\n"
        f"json.dump(record, open({str(record)!r}, 'w'))\n"
    )
    path.chmod(0o755)
    return path


def test_a_capability_probe_runs_qemu_exactly_as_asked(short_tmp: Path) -> None:
    record = short_tmp / "record.json"
    fake = _recorder(short_tmp / "qemu", record)
    config = short_tmp / "qemu.toml"
    config.write_text(f'qemu = "{fake}"\n')
    args = [
        "-S",
        "-no-user-config",
        "-nodefaults",
        "-nographic",
        "-machine",
        "none,accel=tcg",
        "-qmp",
        f"unix:{short_tmp}/qmp.monitor,server=on,wait=off",
        "-pidfile",
        f"{short_tmp}/qmp.pid",
        "-daemonize",
        "arg with,, commas",
    ]
    env = {"QMP_PROXY_QEMU_CONFIG": str(config), "PYTHONPATH": str(REPO), "LC_ALL": "C", "X": "1"}
    done = subprocess.run([*WRAPPER, *args], env=env, capture_output=True, timeout=30)
    assert done.returncode == 0, done.stderr
    seen = json.loads(record.read_text())
    assert seen["argv"] == args
    assert {k: v for k, v in seen["env"].items() if k in env} == env


def test_a_proxy_that_cannot_start_keeps_qemu_from_starting(short_tmp: Path) -> None:
    record = short_tmp / "record.json"
    fake = _recorder(short_tmp / "qemu", record)
    # A listener in a directory that does not exist: the proxy cannot bind it.
    lv = Libvirtish(short_tmp, 'listen = ["unix:/nonexistent/dir/{name}.qmp"]\n', qemu=str(fake))
    try:
        proc = lv.start()
        assert proc.wait(30) == 1
        assert "qmp-proxy-qemu: the proxy could not start:" in lv.log()
        assert "/nonexistent/dir/t1.qmp" in lv.log()
        assert not record.exists()
    finally:
        lv.close()


def test_broken_settings_are_reported_and_qemu_does_not_start(short_tmp: Path) -> None:
    record = short_tmp / "record.json"
    fake = _recorder(short_tmp / "qemu", record)
    lv = Libvirtish(short_tmp, "backport = 3\n", qemu=str(fake))
    try:
        proc = lv.start()
        assert proc.wait(30) == 1
        assert "backport: must be true or false" in lv.log()
        assert "QEMU not started" in lv.log()
        assert not record.exists()
    finally:
        lv.close()


@pytest.mark.qemu
def test_run_qemu_alone_when_asked(short_tmp: Path) -> None:
    """``if_proxy_fails = "run-qemu-alone"``: QEMU gets libvirt's descriptor itself."""
    lv = Libvirtish(
        short_tmp,
        'if_proxy_fails = "run-qemu-alone"\nlisten = ["unix:/nonexistent/dir/{name}.qmp"]\n',
    )
    try:
        proc = lv.start()
        sock, messages = lv.connect()
        assert "QMP" in _negotiate(messages, sock)
        assert b"charmonitor,fd=" in Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        assert "starting QEMU without it" in lv.log()
    finally:
        lv.close()


@pytest.mark.qemu
def test_metrics_are_published_for_one_host_wide_scrape(short_tmp: Path) -> None:
    published = short_tmp / "metrics"
    published.mkdir()
    lv = Libvirtish(short_tmp, f'metrics_dir = "{published}"\n')
    try:
        lv.start()
        sock, messages = lv.connect()
        _negotiate(messages, sock)
        sock.sendall(b'{"execute":"query-status","id":"s"}')
        next(messages)
        assert _wait(lambda: (published / "t1.prom").exists())
        families = {f.name: f for f in metrics.gathered(published)}
        assert families["qmp_proxy_upstream_up"].samples[0].labels == {"vm": "t1"}
        assert "qmp_proxy_build_info" not in families  # process-wide: the daemon's own
        merged = list(metrics._merge([], metrics.gathered(published)))
        assert len({f.name for f in merged}) == len(merged)
    finally:
        lv.close()
    assert _wait(lambda: not (published / "t1.prom").exists()), "removed when QEMU goes"


async def test_the_daemon_merges_published_domains_into_one_valid_exposition(
    short_tmp: Path,
) -> None:
    """Families of the same name from the daemon and from every wrapped domain become one
    family each (Prometheus refuses a repeated HELP/TYPE or series)."""
    import asyncio

    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    published = short_tmp / "metrics"
    published.mkdir()
    writers = []
    for vm in ("dom1", "dom2"):
        other = metrics.Metrics()
        other.route(vm).commands[("query-status", "return")] = 3
        writers.append(asyncio.create_task(other.publish(published / f"{vm}.prom", 0.05)))
    await asyncio.sleep(0.2)
    daemon = metrics.Metrics()
    daemon.route("vm1").commands[("query-status", "return")] = 1
    daemon.gather_dir = published
    text = generate_latest(daemon.registry).decode()
    assert (
        sum(line.startswith("# HELP qmp_proxy_commands_total ") for line in text.splitlines()) == 1
    )
    families = {f.name: f for f in text_string_to_metric_families(text)}
    vms = {s.labels["vm"] for s in families["qmp_proxy_commands"].samples}
    assert vms == {"vm1", "dom1", "dom2"}
    for task in writers:
        task.cancel()
    await asyncio.gather(*writers, return_exceptions=True)
    assert not list(published.glob("*.prom"))


def test_the_example_settings_parse_and_document_every_key() -> None:
    path = REPO / "config" / "qemu.toml"
    emulator.load_settings(path, "vm", required=True)
    text = path.read_text()
    for key in emulator._KEYS:
        assert f"\n{key} =" in text or f"\n# {key} =" in text or f"[{key}]" in text, key
