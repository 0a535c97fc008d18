"""A real libvirt for tests/test_libvirt.py: virtlogd and libvirtd started by hand, privately.

The tests need the system instance (``qemu:///system``: QEMU runs as libvirt's QEMU user, in a
domain directory under /var/lib/libvirt/qemu, with libvirt's cgroups and seccomp sandbox), but a
test must leave the host as it found it, and a host may run its own libvirt.  So both daemons
run in a private mount namespace in which libvirt's directories (/etc/libvirt, /run/libvirt,
/var/lib/libvirt, /var/cache/libvirt, /var/log/libvirt) are bind mounts of directories below one
temporary directory.  Everything libvirt writes lands there and goes with it: domain
definitions, capability caches, sockets, logs.  /etc/libvirt starts as a copy of the host's, so
libvirt runs with the host's configuration plus the few lines :meth:`Libvirt.start` adds
(where it logs, and which user QEMU runs as when libvirt's user cannot reach the venv).  A
holder process keeps the namespace alive while libvirtd is stopped and started again.

Outside the namespace the tests reach libvirtd through its socket's real path
(``qemu+unix:///system?socket=...``), which is the same driver and daemon as ``qemu:///system``.

Two things the namespace cannot hide are undone by :meth:`Libvirt.close`: the mount points it
had to create on the host (empty directories) and the ``machine`` cgroups libvirt creates.

A missing libvirt, or a libvirtd that does not come up, raises: the tests fail, never skip.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Self

import pytest

# libvirt's directories, and the directory below the private root each is bound to.
LIBVIRT_DIRS: Final = {
    "/etc/libvirt": "etc",
    "/run/libvirt": "run",
    "/var/lib/libvirt": "lib",
    "/var/cache/libvirt": "cache",
    "/var/log/libvirt": "log",
}
QEMU_USER: Final = "libvirt-qemu"
# libvirt's own PATH when started as a service; the tests' PATH may name other QEMUs first.
DAEMON_PATH: Final = "/usr/sbin:/usr/bin:/sbin:/bin"
WRAPPER: Final = Path(sys.executable).with_name("qmp-proxy-qemu")
REAL_QEMU: Final = "/usr/bin/qemu-system-x86_64"


class LibvirtError(RuntimeError):
    """libvirt is missing or did not do what was asked; the message says what and why."""


def _run(args: list[str], timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)


def venv_reachable_by(user: str) -> bool:
    """Whether ``user`` can run this venv's interpreter and import the proxy (a venv below
    /root, or a pyenv Python there, is not)."""
    probe = _run(["runuser", "-u", user, "--", sys.executable, "-c", "import proxy.emulator"])
    return probe.returncode == 0


class Libvirt:
    """virtlogd + libvirtd in a private mount namespace below a temporary directory."""

    def __init__(self) -> None:
        for tool in ("libvirtd", "virtlogd", "virsh", "qemu-img", "unshare", "nsenter"):
            if shutil.which(tool, path=DAEMON_PATH) is None:
                raise LibvirtError(f"{tool} is not installed: run scripts/install-libvirt.sh")
        if not WRAPPER.exists():
            raise LibvirtError(f"{WRAPPER} is missing: run scripts/setup-venv.sh test")
        self.root = Path(tempfile.mkdtemp(prefix="qp-libvirt-"))
        self.root.chmod(0o755)  # QEMU, as libvirt's user, reads configs and images below it
        self.socket = self.root / "run" / "libvirt-sock"
        self.uri = f"qemu+unix:///system?socket={self.socket}"
        self.log = self.root / "libvirtd.log"
        # QEMU runs as libvirt's user when that user can run the wrapper, else as root; either
        # way the wrapper runs as whatever libvirt runs QEMU as.
        self.qemu_user = QEMU_USER if venv_reachable_by(QEMU_USER) else "root"
        self._created_mounts: list[Path] = []
        self._cgroups_before = set(Path("/sys/fs/cgroup").glob("*/machine"))
        self._holder: subprocess.Popen[bytes] | None = None
        self._virtlogd: subprocess.Popen[bytes] | None = None
        self._libvirtd: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Self:
        try:
            self._namespace()
            self._start_virtlogd()
            self.start_libvirtd()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the namespace ----------------------------------------------------------------------------

    def _namespace(self) -> None:
        etc = self.root / "etc"
        if Path("/etc/libvirt").is_dir():
            shutil.copytree("/etc/libvirt", etc, symlinks=True)
        etc.mkdir(exist_ok=True)
        with (etc / "libvirtd.conf").open("a") as conf:
            conf.write(
                "\n# qmp-proxy tests\n"
                f'log_outputs = "2:file:{self.log}"\n'
                'log_filters = "2:qemu 3:*"\n'
            )
        if self.qemu_user == "root":
            with (etc / "qemu.conf").open("a") as conf:
                conf.write("\n# qmp-proxy tests: the venv is out of libvirt-qemu's reach\n")
                conf.write('user = "root"\ngroup = "root"\n')
        binds: list[str] = []
        for target, below in LIBVIRT_DIRS.items():
            source = self.root / below
            source.mkdir(exist_ok=True)
            if not Path(target).exists():
                Path(target).mkdir(parents=True)
                self._created_mounts.append(Path(target))
            binds.append(f"mount --bind {source} {target}")
        # /dev/kvm: libvirt re-probes an emulator at every domain start when the probe (run as
        # root) saw KVM but the QEMU user cannot open /dev/kvm (a root-only node, no udev
        # here).  The domains are TCG; a private node the QEMU user can open keeps the probe
        # result and libvirt's check in agreement.
        if Path("/dev/kvm").exists():
            kvm = Path("/dev/kvm").stat()
            dev = self.root / "dev"
            dev.mkdir()
            binds += [
                f"mount -t tmpfs -o mode=0755 tmpfs {dev}",
                f"mknod -m 0666 {dev}/kvm c {os.major(kvm.st_rdev)} {os.minor(kvm.st_rdev)}",
                f"mount --bind {dev}/kvm /dev/kvm",
            ]
        script = "set -e\n" + "\n".join(binds) + "\necho ready\nexec sleep infinity\n"
        self._holder = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        assert self._holder.stdout is not None
        if self._holder.stdout.readline() != b"ready\n":
            self._holder.kill()
            _, err = self._holder.communicate(timeout=10)
            raise LibvirtError(f"cannot make the private mount namespace: {err.decode()}")

    def _in_namespace(self, args: list[str], log: Path) -> subprocess.Popen[bytes]:
        assert self._holder is not None
        with log.open("ab") as out:
            return subprocess.Popen(
                ["nsenter", f"--mount=/proc/{self._holder.pid}/ns/mnt", "--", *args],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={"PATH": DAEMON_PATH, "LC_ALL": "C"},
                start_new_session=True,
            )

    # -- the daemons ------------------------------------------------------------------------------

    def _start_virtlogd(self) -> None:
        pidfile = self.root / "virtlogd.pid"
        self._virtlogd = self._in_namespace(
            ["virtlogd", "--pid-file", str(pidfile)], self.root / "virtlogd.out"
        )
        self._wait_for(lambda: (self.root / "run" / "virtlogd-sock").exists(), "virtlogd", 30)

    def start_libvirtd(self) -> None:
        """Start libvirtd and wait until it answers (the first start probes QEMU)."""
        self._libvirtd = self._in_namespace(
            [
                "libvirtd",
                "--config",
                str(self.root / "etc" / "libvirtd.conf"),
                "--pid-file",
                str(self.root / "libvirtd.pid"),
            ],
            self.root / "libvirtd.out",
        )
        self._wait_for(lambda: self.virsh_ok("version"), "libvirtd", 120)

    def stop_libvirtd(self) -> None:
        """Stop libvirtd as its service would (SIGTERM); its domains keep running."""
        if self._libvirtd is not None:
            _stop(self._libvirtd, 30)
            self._libvirtd = None

    def libvirtd_pid(self) -> int:
        assert self._libvirtd is not None
        return self._libvirtd.pid

    def _wait_for(self, ready: object, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        proc = self._libvirtd if what == "libvirtd" else self._virtlogd
        while time.monotonic() < deadline:
            if callable(ready) and ready():
                return
            if proc is not None and proc.poll() is not None:
                raise LibvirtError(f"{what} exited with {proc.returncode}:\n{self.logs()}")
            time.sleep(0.1)
        raise LibvirtError(f"{what} did not come up within {timeout:.0f} s:\n{self.logs()}")

    # -- talking to it ----------------------------------------------------------------------------

    def virsh(self, *args: str, timeout: float = 90.0) -> str:
        """``virsh -c URI ARGS``'s stdout; raises with its stderr if it fails."""
        done = _run(["virsh", "-q", "-c", self.uri, *args], timeout)
        if done.returncode != 0:
            raise LibvirtError(
                f"virsh {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}"
            )
        return done.stdout

    def virsh_ok(self, *args: str) -> bool:
        return _run(["virsh", "-q", "-c", self.uri, *args], 30).returncode == 0

    def domain_log(self, name: str) -> str:
        path = self.root / "log" / "qemu" / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else f"(no {path})"

    def domain_dir(self, name: str) -> Path:
        """The running domain's directory (/var/lib/libvirt/qemu/domain-ID-NAME), as seen from
        outside the namespace."""
        found = sorted((self.root / "lib" / "qemu").glob(f"domain-*-{name}"))
        if not found:
            raise LibvirtError(f"no domain directory for {name}")
        return found[-1]

    def logs(self) -> str:
        """The end of libvirtd's log and of every domain log, for a failing test's report."""
        paths = [self.root / "virtlogd.out", self.root / "libvirtd.out", self.log]
        paths += sorted((self.root / "log" / "qemu").glob("*.log"))
        parts = []
        for path in paths:
            if path.exists():
                # QEMU's replies make lines of 100 kB in libvirtd's log.
                lines = [
                    line[:400] for line in path.read_text(errors="replace").splitlines()[-120:]
                ]
                parts.append(f"==== {path} (last {len(lines)} lines)\n" + "\n".join(lines))
        return "\n".join(parts)

    def give_to_qemu(self, path: Path) -> Path:
        """Let libvirt's QEMU user own ``path`` (a directory its sockets go in)."""
        user = pwd.getpwnam(self.qemu_user)
        os.chown(path, user.pw_uid, user.pw_gid)
        return path

    # -- the end ----------------------------------------------------------------------------------

    def close(self) -> None:
        """Destroy what runs, stop both daemons and the namespace, and undo what the host kept."""
        if self._libvirtd is not None and self._libvirtd.poll() is None:
            with contextlib.suppress(LibvirtError, subprocess.TimeoutExpired):
                for name in self.virsh("list", "--name").split():
                    self.virsh_ok("destroy", name)
        self.stop_libvirtd()
        for proc in (self._virtlogd, self._holder):
            if proc is not None:
                _stop(proc, 10)
        for path in reversed(self._created_mounts):
            with contextlib.suppress(OSError):
                path.rmdir()
        for cgroup in set(Path("/sys/fs/cgroup").glob("*/machine")) - self._cgroups_before:
            with contextlib.suppress(OSError):
                cgroup.rmdir()
        shutil.rmtree(self.root, ignore_errors=True)


def _stop(proc: subprocess.Popen[bytes], timeout: float) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


# -- a domain -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Domain:
    name: str
    xml: Path
    listener: Path  # the proxy's extra listener, for clients other than libvirt


def make_domain(
    lv: Libvirt, name: str, *, qemu: str = REAL_QEMU, emulator: Path = WRAPPER, disk: bool = True
) -> Domain:
    """A 64 MiB TCG PC (no OS, a 16 MiB qcow2 disk) whose emulator is the wrapper, with its
    own wrapper settings: ``qemu`` the real binary, one extra listener."""
    sockets = lv.root / "sockets"
    if not sockets.exists():
        sockets.mkdir()
        lv.give_to_qemu(sockets)
    config = lv.root / f"{name}.toml"
    config.write_text(f'qemu = "{qemu}"\nlisten = ["unix:{sockets}/{{name}}.qmp"]\n')
    disk_xml = ""
    if disk:
        image = lv.root / f"{name}.qcow2"
        made = _run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "16M"])
        if made.returncode != 0:
            raise LibvirtError(f"qemu-img create {image}: {made.stderr}")
        disk_xml = f"""
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{image}'/>
      <target dev='vda' bus='virtio'/>
    </disk>"""
    xml = lv.root / f"{name}.xml"
    xml.write_text(f"""<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{name}</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <features><acpi/></features>
  <devices>
    <emulator>{emulator}</emulator>{disk_xml}
    <video><model type='none'/></video>
    <memballoon model='none'/>
  </devices>
  <qemu:commandline>
    <qemu:env name='QMP_PROXY_QEMU_CONFIG' value='{config}'/>
  </qemu:commandline>
</domain>
""")
    return Domain(name, xml, sockets / f"{name}.qmp")


# A failing test's extra report section: tests/conftest.py appends what this returns.
FAILURE_REPORT: Final = pytest.StashKey[Callable[[], str]]()
