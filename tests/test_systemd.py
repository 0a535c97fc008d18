"""systemd integration without systemd: the notify and socket-activation protocols, and the units.

The test owns the ``NOTIFY_SOCKET`` datagram socket and the inherited listening socket, and runs
the real ``python -m proxy`` with the environment systemd would give it (sd_notify(3),
sd_listen_fds(3)).  The unit files are checked with ``systemd-analyze verify``.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from proxy import config
from tests.helpers import console_script
from tests.proxyproc import ProxyProcess
from tests.qemu import QemuProcess, RawQMP

REPO = Path(__file__).resolve().parent.parent
UNITS = REPO / "systemd"
SHIPPED = ("qmp-proxy.service", "qmp-proxy@.service", "qmp-proxy@.socket")


class Notify:
    """The service manager's end of sd_notify: a datagram socket that records every message."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + path[1:] if path.startswith("@") else path)
        self.env = path
        self.messages: list[tuple[float, str]] = []

    def _recv(self, timeout: float) -> bool:
        self.sock.settimeout(max(timeout, 0.001))
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return False
        self.messages.append((time.monotonic(), data.decode()))
        return True

    def wait(self, predicate: Callable[[str], bool], what: str, timeout: float = 10.0) -> int:
        """Index of the first message (seen before or arriving now) that matches."""
        deadline = time.monotonic() + timeout
        start = 0
        while True:
            for i in range(start, len(self.messages)):
                if predicate(self.messages[i][1]):
                    return i
            start = len(self.messages)
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {what} from the proxy; got {self.texts()}")
            self._recv(left)

    def wait_after(
        self, index: int, predicate: Callable[[str], bool], what: str, timeout: float = 10.0
    ) -> int:
        """Like :meth:`wait`, for a message after message ``index``."""
        deadline = time.monotonic() + timeout
        while True:
            for i in range(index + 1, len(self.messages)):
                if predicate(self.messages[i][1]):
                    return i
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {what} after #{index}; got {self.texts()}")
            self._recv(left)

    def drain(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self._recv(left)

    def texts(self) -> list[str]:
        return [m for _, m in self.messages]

    def close(self) -> None:
        self.sock.close()
        if not self.env.startswith("@"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.env)


def lines(message: str) -> list[str]:
    return message.split("\n")


def has(line: str) -> Callable[[str], bool]:
    return lambda m: line in lines(m)


def status(fragment: str) -> Callable[[str], bool]:
    return lambda m: any(x.startswith("STATUS=") and fragment in x for x in lines(m))


class Proc(ProxyProcess):
    """A proxy process started the way a service manager would start it (own environment and
    descriptors); log reading comes from :class:`ProxyProcess`."""

    def __init__(
        self,
        argv: list[str],
        tmp: Path,
        env: dict[str, str],
        preexec: Callable[[], None] | None = None,
    ) -> None:
        self.log_path = tmp / f"proxy-{uuid.uuid4().hex[:8]}.log"
        self._log = self.log_path.open("wb")
        full_env = dict(os.environ, PYTHONPATH=str(REPO))
        for var in (
            "NOTIFY_SOCKET",
            "WATCHDOG_USEC",
            "WATCHDOG_PID",
            "LISTEN_FDS",
            "LISTEN_PID",
            "LISTEN_FDNAMES",
        ):
            full_env.pop(var, None)
        full_env.update(env)
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._log,
            env=full_env,
            preexec_fn=preexec,
            close_fds=preexec is None,
        )

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 10.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"proxy did not exit:\n{self.log()}") from None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def write_config(tmp: Path, upstream: str, listen: str) -> Path:
    path = tmp / "vm1.toml"
    path.write_text(
        f'state_dir = "{tmp}"\n'
        f'[[route]]\nname = "vm1"\nupstream = "unix:{upstream}"\nlisten = ["{listen}"]\n'
    )
    return path


def python_proxy(config: Path) -> list[str]:
    return [sys.executable, "-m", "proxy", "--config", str(config)]


# -- sd_notify ----------------------------------------------------------------------------------


def test_notify_lifecycle(short_tmp: Path, qemu72: QemuProcess) -> None:
    notify = Notify(str(short_tmp / "notify"))
    holder = RawQMP(qemu72.sock_path)
    holder.negotiate()  # QEMU's one monitor slot is taken: the proxy will wait for a greeting
    config = write_config(short_tmp, qemu72.sock_path, str(short_tmp / "p.sock"))
    env = {"NOTIFY_SOCKET": notify.env, "WATCHDOG_USEC": "1000000"}
    p = Proc(python_proxy(config), short_tmp, env)
    try:
        ready = notify.wait(has("READY=1"), "READY=1")
        # READY=1 once listeners are bound: the socket exists and takes connections already.
        assert os.path.exists(short_tmp / "p.sock")
        notify.wait(status("vm1: awaiting greeting"), "STATUS= awaiting greeting")
        p.wait_log('state="awaiting greeting"')
        holder.close()
        up = notify.wait(status("vm1: ready"), "STATUS= ready")
        assert up > ready
        assert re.fullmatch(r"STATUS=vm1: ready, 0 clients", notify.texts()[up].split("\n")[-1])

        # The watchdog: every half WATCHDOG_USEC (0.5 s), from the event loop.
        notify.drain(1.3)
        pings = [t for t, m in notify.messages if "WATCHDOG=1" in lines(m)]
        assert len(pings) >= 3, notify.texts()
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        assert max(gaps[-2:]) < 0.9, gaps

        # SIGHUP: RELOADING=1 with MONOTONIC_USEC, then READY=1 again.
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        mark = len(notify.messages) - 1
        p.signal(signal.SIGHUP)
        reloading = notify.wait_after(mark, has("RELOADING=1"), "RELOADING=1")
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        fields = dict(x.split("=", 1) for x in lines(notify.texts()[reloading]))
        assert "MONOTONIC_USEC" in fields, notify.texts()[reloading]
        assert before <= int(fields["MONOTONIC_USEC"]) <= after, (before, fields, after)
        again = notify.wait_after(reloading, has("READY=1"), "READY=1 after reload")
        assert any(x.startswith("STATUS=") for x in lines(notify.texts()[again]))
        p.wait_log("event=reloaded")

        # SIGTERM: STOPPING=1, exit 0.
        mark = len(notify.messages) - 1
        p.signal(signal.SIGTERM)
        notify.wait_after(mark, has("STOPPING=1"), "STOPPING=1")
        assert p.wait() == 0, p.log()
        notify.drain(0.1)
        stopping = next(i for i, m in enumerate(notify.texts()) if "STOPPING=1" in lines(m))
        assert not any("READY=1" in lines(m) for m in notify.texts()[stopping + 1 :]), (
            notify.texts()
        )
    finally:
        holder.close()
        p.close()
        notify.close()


def test_notify_abstract_socket(short_tmp: Path, qemu72: QemuProcess) -> None:
    name = f"@qmp-proxy-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    notify = Notify(name)
    config = write_config(short_tmp, qemu72.sock_path, str(short_tmp / "p.sock"))
    p = Proc(python_proxy(config), short_tmp, {"NOTIFY_SOCKET": name})
    try:
        notify.wait(has("READY=1"), "READY=1 on the abstract socket")
        notify.wait(status("vm1: ready"), "STATUS= ready")
        p.signal(signal.SIGTERM)
        notify.wait(has("STOPPING=1"), "STOPPING=1")
        assert p.wait() == 0, p.log()
        # No WATCHDOG_USEC: no pings.
        assert not any("WATCHDOG=1" in lines(m) for m in notify.texts()), notify.texts()
    finally:
        p.close()
        notify.close()


def test_watchdog_for_another_pid_is_not_ours(short_tmp: Path, qemu72: QemuProcess) -> None:
    notify = Notify(str(short_tmp / "notify"))
    config = write_config(short_tmp, qemu72.sock_path, str(short_tmp / "p.sock"))
    env = {"NOTIFY_SOCKET": notify.env, "WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"}
    p = Proc(python_proxy(config), short_tmp, env)
    try:
        notify.wait(has("READY=1"), "READY=1")
        notify.drain(0.6)
        assert not any("WATCHDOG=1" in lines(m) for m in notify.texts()), notify.texts()
        p.signal(signal.SIGTERM)
        assert p.wait() == 0, p.log()
    finally:
        p.close()
        notify.close()


def test_no_notify_socket_is_fine(short_tmp: Path, qemu72: QemuProcess) -> None:
    config = write_config(short_tmp, qemu72.sock_path, str(short_tmp / "p.sock"))
    p = Proc(python_proxy(config), short_tmp, {"NOTIFY_SOCKET": str(short_tmp / "nobody")})
    try:
        p.wait_log("event=upstream_ready")
        with RawQMP(str(short_tmp / "p.sock")) as c:
            c.negotiate()
        p.signal(signal.SIGTERM)
        assert p.wait() == 0, p.log()
    finally:
        p.close()


# -- socket activation --------------------------------------------------------------------------


def activated(listener: socket.socket, names: str = "qmp") -> tuple[list[str], Callable[[], None]]:
    """argv prefix and preexec_fn that hand ``listener`` over as fd 3, as systemd does."""
    fd = listener.fileno()

    def preexec() -> None:
        os.dup2(fd, 3)  # dup2 leaves fd 3 inheritable; every other fd is close-on-exec

    script = f'export LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES={names}; exec "$@"'
    return ["sh", "-c", script, "sh"], preexec


def test_listen_fds_adoption(short_tmp: Path, qemu72: QemuProcess) -> None:
    path = str(short_tmp / "act.qmp")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)
    # A client that connects before the proxy runs is queued by the kernel, not refused.
    early = RawQMP(path)
    config = write_config(short_tmp, qemu72.sock_path, "systemd:qmp")
    prefix, preexec = activated(listener)
    p = Proc(prefix + python_proxy(config), short_tmp, {}, preexec)
    try:
        text = p.wait_log("event=listening")
        assert "listen=systemd:qmp" in text, text
        assert "systemd_socket_unused" not in text
        greeting = early.negotiate()
        assert greeting["QMP"]["version"]["qemu"]["major"] == 7
        assert early.command({"execute": "query-status"})["return"]["status"] == "prelaunch"
        with RawQMP(path) as late:
            late.negotiate()
            assert "return" in late.command({"execute": "query-name"})
        early.close()
        p.signal(signal.SIGTERM)
        assert p.wait() == 0, p.log()
        # The socket belongs to systemd: not unlinked, not shut down; clients keep queueing.
        assert os.path.exists(path)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as queued:
            queued.settimeout(2)
            queued.connect(path)
    finally:
        early.close()
        p.close()
        listener.close()


def test_listen_fds_for_another_pid_are_ignored(short_tmp: Path, qemu72: QemuProcess) -> None:
    config = write_config(short_tmp, qemu72.sock_path, "systemd:qmp")
    env = {"LISTEN_PID": "1", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "qmp"}
    p = Proc(python_proxy(config), short_tmp, env)
    try:
        rc = p.wait()
        assert rc != 0
        text = p.log()
        assert "event=start_failed" in text, text
        assert "qmp" in text.split("event=start_failed", 1)[1].splitlines()[0]
    finally:
        p.close()


def test_listen_fds_wrong_name(short_tmp: Path, qemu72: QemuProcess) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(short_tmp / "act.qmp"))
    listener.listen(4)
    config = write_config(short_tmp, qemu72.sock_path, "systemd:qmp")
    prefix, preexec = activated(listener, names="other")
    p = Proc(prefix + python_proxy(config), short_tmp, {}, preexec)
    try:
        assert p.wait() != 0
        text = p.log()
        assert "event=start_failed" in text, text
        assert "'qmp'" in text
    finally:
        p.close()
        listener.close()


# -- the unit files -----------------------------------------------------------------------------


@pytest.mark.qemu
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze is not None, (
        "systemd-analyze is not installed; it is needed to verify systemd/*.service and "
        "*.socket (Debian: apt-get install systemd; .ci/run installs it)"
    )
    script = console_script()
    units = tmp_path / "units"
    units.mkdir()
    for unit in SHIPPED:
        text = (UNITS / unit).read_text()
        if unit.endswith(".service"):
            # As shipped the units start the Debian package's /usr/bin/qmp-proxy, which is not
            # installed here (tests/test_deb.py verifies the installed units unchanged): that
            # one path, and nothing else, becomes this environment's console script.
            text, n = re.subn(
                r"^ExecStart=/usr/bin/qmp-proxy ", f"ExecStart={script} ", text, count=1, flags=re.M
            )
            assert n == 1, f"{unit}: ExecStart= is not /usr/bin/qmp-proxy (the package's)"
        (units / unit).write_text(text)
    instances = [
        str(units / "qmp-proxy.service"),
        str(units / "qmp-proxy@vm1.service"),
        str(units / "qmp-proxy@vm1.socket"),
    ]
    # --man=no: Documentation= names man:qmp-proxy(8), which only the package installs (the
    # installed units are verified with their man page in tests/test_deb.py).
    result = subprocess.run(
        [analyze, "verify", "--man=no", *instances],
        capture_output=True,
        text=True,
        cwd=units,
        timeout=60,
        env=dict(os.environ, SYSTEMD_LOG_COLOR="0", SYSTEMD_PAGER=""),
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"systemd-analyze verify failed:\n{output}"
    # Warnings (unknown settings, bad values) do not change the exit status; they are faults too.
    about_ours = [line for line in output.splitlines() if "qmp-proxy" in line]
    assert about_ours == [], f"systemd-analyze verify complained:\n{output}"


def unit_settings(name: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for raw in (UNITS / name).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        out.setdefault(key.strip(), []).append(value.strip())
    return out


def test_unit_contract() -> None:
    service = unit_settings("qmp-proxy@.service")
    sock = unit_settings("qmp-proxy@.socket")
    assert service["Type"] == ["notify"]
    assert service["NotifyAccess"] == ["main"]
    assert any("-HUP" in v and "$MAINPID" in v for v in service["ExecReload"]), service
    assert "WatchdogSec" in service
    exec_start = service["ExecStart"][0].split()
    assert Path(exec_start[0]).name == "qmp-proxy", exec_start
    assert exec_start[1:] == ["--config", "/etc/qmp-proxy/%i.toml"], exec_start
    # The drain (5 s by default) must end before systemd's stop timeout kills the process.
    timeout = service["TimeoutStopSec"][0]
    assert timeout.endswith("s") and float(timeout[:-1]) > 5, timeout
    assert service["Requires"] == ["qmp-proxy@%i.socket"]
    # OPERATIONS: no PartOf= on the socket (a service restart would drop queued clients);
    # the service adopts the socket by FileDescriptorName= (config listens on "systemd:qmp").
    assert "PartOf" not in sock
    assert sock["FileDescriptorName"] == ["qmp"]
    assert sock["Accept"] == ["no"]
    assert sock["ListenStream"] == ["/run/qmp-proxy/%i.qmp"]
    # The listening socket lives outside the service's RuntimeDirectory (systemd #8635).
    runtime = service["RuntimeDirectory"][0]
    assert not sock["ListenStream"][0].startswith(f"/run/{runtime}/"), runtime


def test_units_shipped_are_the_ones_verified() -> None:
    assert sorted(p.name for p in UNITS.iterdir()) == sorted(SHIPPED)


def test_daemon_unit_is_the_template_for_many_routes(monkeypatch: pytest.MonkeyPatch) -> None:
    """qmp-proxy.service runs every route of one file, with the per-VM unit's hardening.

    Its [Service] section is the template's but for where the config and the runtime directory
    are, so a hardening or timeout change made to one unit and not the other fails here.
    """
    daemon = unit_settings("qmp-proxy.service")
    template = unit_settings("qmp-proxy@.service")
    assert daemon["ExecStart"] == ["/usr/bin/qmp-proxy --config /etc/qmp-proxy/qmp-proxy.toml"]
    # $RUNTIME_DIRECTORY is /run/qmp-proxy: the default control socket (qmp-proxy status with no
    # --control finds it there) and state_dir; listeners may be created only there.
    assert daemon["RuntimeDirectory"] == ["qmp-proxy"]
    assert daemon["RuntimeDirectoryMode"] == ["0755"]
    monkeypatch.delenv("RUNTIME_DIRECTORY", raising=False)  # as for a shell's qmp-proxy status
    assert config.default_control().address.path == "/run/qmp-proxy/control.sock"
    # The crash-safety journal outlives a crash and the restart after it, in both units.
    assert daemon["RuntimeDirectoryPreserve"] == template["RuntimeDirectoryPreserve"] == ["yes"]
    assert "Requires" not in daemon and not any("%" in v for vs in daemon.values() for v in vs)
    differ = {
        "ExecStart",
        "RuntimeDirectory",
        "RuntimeDirectoryMode",
        "Description",
        "Requires",
        "After",
        "Documentation",
    }
    same = {k: v for k, v in daemon.items() if k not in differ}
    assert same == {k: v for k, v in template.items() if k not in differ}
