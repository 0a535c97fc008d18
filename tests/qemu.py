"""Real QEMU for tests: start it, talk raw QMP to it, and always clean it up.

The proxy's promise is "indistinguishable from QEMU", so the tests that matter compare against a
real QEMU process rather than against recorded transcripts.  This module keeps that cheap and
safe: one call starts a QEMU with a QMP socket in a private temporary directory, and leaving the
``with`` block kills and reaps it even when a test fails.

A missing binary raises :class:`QemuNotFound` instead of skipping: a test run without QEMU must
not look green.  ``scripts/install-qemu.sh`` installs both versions.

Every QEMU started is recorded (:func:`recorded`), so that a failing test's report shows each
QEMU's command line and stderr (tests/conftest.py).
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Final, Self

QEMU_BINARIES: Final[dict[str, str]] = {
    "5.2": "qemu52-system-x86_64",
    "7.2": "qemu-system-x86_64",
    "10.0": "qemu10-system-x86_64",
    "11.1": "qemu111-system-x86_64",
}

# Arguments every test QEMU gets: TCG so /dev/kvm does not matter, no default devices or display,
# and stopped (-S) so nothing runs until a test asks for it.
_BASE_ARGS: Final = ("-accel", "tcg", "-nodefaults", "-display", "none", "-S")


class QemuNotFound(RuntimeError):
    """The QEMU binary for a version is not installed: the test must fail, not skip."""


@dataclass
class QemuRecord:
    """One QEMU process as a failure report shows it: its command line and its stderr."""

    label: str
    argv: list[str]
    stderr: Callable[[], str]
    running: Callable[[], bool]


_RECORDS: list[QemuRecord] = []


def record(entry: QemuRecord) -> None:
    """Note a QEMU a test started (QemuProcess does; so can a test that starts one itself)."""
    _RECORDS.append(entry)


def recorded() -> list[QemuRecord]:
    """The QEMUs recorded since :func:`forget_stopped`: those still running and those started
    (and perhaps already stopped) since."""
    return list(_RECORDS)


def forget_stopped() -> None:
    """Keep only the QEMUs still running (a module-scoped fixture's serve many tests)."""
    _RECORDS[:] = [entry for entry in _RECORDS if entry.running()]


class QemuProcess:
    """One QEMU process with a QMP unix socket, as a context manager.

    ``QemuProcess("10.0", "-M", "none")`` starts ``qemu10-system-x86_64 -accel tcg -nodefaults
    -display none -S -qmp unix:SOCK,server=on,wait=on -M none`` in a fresh temporary directory,
    with stderr captured to a file there (failed migrations only explain themselves on stderr).
    The socket is ready once QEMU has greeted this helper, its first client: see :meth:`start`.
    """

    def __init__(
        self,
        version: str,
        *extra_args: str,
        binary: str | None = None,
        start_timeout: float = 10.0,
        stop_timeout: float = 5.0,
    ) -> None:
        if binary is None:
            if version not in QEMU_BINARIES:
                raise ValueError(
                    f"unknown QEMU version {version!r}; known: {sorted(QEMU_BINARIES)}"
                )
            binary = QEMU_BINARIES[version]
        self.version = version
        self.binary = binary
        self.extra_args = tuple(extra_args)
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.tmpdir: Path | None = None
        self.sock_path = ""
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr_file: IO[bytes] | None = None
        self._stderr_path: Path | None = None
        self._stderr_final: str | None = None
        self._returncode: int | None = None
        self._pid: int | None = None
        self._entry: QemuRecord | None = None  # the latest start's, in the records

    @property
    def pid(self) -> int:
        """QEMU's pid (the wrapper script execs, so this is QEMU itself); kept after stop()."""
        if self._pid is None:
            raise RuntimeError("QEMU is not started")
        return self._pid

    @property
    def argv(self) -> list[str]:
        """The full command line, for error messages."""
        qmp = f"unix:{self.sock_path},server=on,wait=on"
        return [self.binary, *_BASE_ARGS, "-qmp", qmp, *self.extra_args]

    def start(self) -> Self:
        """Spawn QEMU, be its first QMP client (``wait=on``) and leave once it has greeted.

        QEMU listens on the socket early in its start-up, and its QMP monitor takes the socket
        over later, from its monitor I/O thread.  With ``wait=off``, a client that connects in
        between (the old readiness probe did, and the proxy right after it) can be accepted by
        QEMU's main loop while that thread moves the listener, and under CPU load the two
        threads race: QEMU 10.0 prints ``GLib: g_source_destroy: assertion ... ref_count > 0
        failed`` and closes its listening socket (that client is reset, every later connect
        refused), or aborts in ``tcp_chr_change_state``, or leaves a socket on which the next
        client is never greeted (about 1 start in 1000 under load).  With ``wait=on``, QEMU
        accepts its first client itself, before its main loop runs, and its monitor thread is
        the only one that ever watches the socket afterwards: this probe is that client, and
        the greeting proves the monitor owns the socket.  QEMU writes "QEMU waiting for
        connection on: ..." on its stderr for it.
        """
        path = shutil.which(self.binary)
        if path is None:
            raise QemuNotFound(
                f"QEMU {self.version} binary {self.binary!r} not found on PATH; "
                "run scripts/install-qemu.sh (tests need real QEMU and must not skip)"
            )
        if self._entry is not None:  # started again: its record keeps what the last QEMU said
            said = self.stderr_text()
            self._entry.stderr = lambda: said
            self._stderr_final = self._returncode = None
        self.tmpdir = Path(tempfile.mkdtemp(prefix=f"qemu{self.version}-"))
        self.sock_path = str(self.tmpdir / "qmp.sock")
        self._stderr_path = self.tmpdir / "stderr.txt"
        self._stderr_file = self._stderr_path.open("wb")
        try:
            self._proc = subprocess.Popen(
                [path, *self.argv[1:]],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=self._stderr_file,
                cwd=self.tmpdir,
                start_new_session=True,  # a Ctrl-C on the test run must not hit QEMU first
            )
            self._pid = self._proc.pid
            record(self._record())
            self._wait_for_greeting()
        except BaseException:
            self.stop()
            raise
        return self

    def _record(self) -> QemuRecord:
        proc = self._proc
        self._entry = QemuRecord(
            f"QEMU {self.version} (pid {self.pid})",
            self.argv,
            self.stderr_text,
            lambda: proc is not None and proc.poll() is None,
        )
        return self._entry

    def _wait_for_greeting(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.start_timeout
        while True:
            rc = self._proc.poll()
            if rc is not None:
                raise RuntimeError(
                    f"QEMU {self.version} exited with {rc} before its QMP socket was ready: "
                    f"{self.argv}\nstderr:\n{self.stderr_text()}"
                )
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(
                    f"QEMU {self.version} QMP socket not ready after {self.start_timeout}s: "
                    f"{self.argv}\nstderr:\n{self.stderr_text()}"
                )
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            probe.settimeout(left)
            try:
                try:
                    probe.connect(self.sock_path)
                except (FileNotFoundError, ConnectionRefusedError):
                    time.sleep(0.01)  # not listening yet
                    continue
                self._greeting(probe)
                return  # QEMU sees a client come and go, and serves the next one normally
            finally:
                probe.close()

    def _greeting(self, probe: socket.socket) -> None:
        """Read the greeting line (QEMU runs its start-up meanwhile)."""
        line = b""
        try:
            while not line.endswith(b"\n"):
                chunk = probe.recv(4096)
                if not chunk:
                    raise EOFError(f"closed before its greeting; got {line[:200]!r}")
                line += chunk
        except (EOFError, ConnectionResetError) as exc:
            raise RuntimeError(
                f"QEMU {self.version} dropped its first QMP client ({exc}): {self.argv}\n"
                f"stderr:\n{self.stderr_text()}"
            ) from None
        except TimeoutError:
            raise TimeoutError(
                f"QEMU {self.version} accepted but did not greet in {self.start_timeout}s: "
                f"{self.argv}\nstderr:\n{self.stderr_text()}"
            ) from None
        if not line.startswith(b'{"QMP"'):
            raise RuntimeError(f"QEMU {self.version}: not a QMP greeting: {line[:200]!r}")

    def stderr_text(self) -> str:
        """Everything QEMU wrote to stderr so far (or in total, once stopped)."""
        if self._stderr_final is not None:
            return self._stderr_final
        if self._stderr_path is None or not self._stderr_path.exists():
            return ""
        return self._stderr_path.read_bytes().decode("utf-8", "replace")

    def returncode(self) -> int | None:
        """None while QEMU runs (or before start); its exit status once it has exited."""
        return self._returncode if self._proc is None else self._proc.poll()

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after ``stop_timeout``; always reaps and removes the tmp dir."""
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(self.stop_timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            self._returncode = proc.returncode
        if self._stderr_file is not None:
            self._stderr_file.close()
            self._stderr_file = None
        if self._stderr_final is None and self._stderr_path is not None:
            self._stderr_final = self.stderr_text()
        if self.tmpdir is not None:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            self.tmpdir = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"QemuProcess({self.version!r}, sock={self.sock_path!r})"


class RawQMP:
    """A byte-level QMP client: what goes on the wire is exactly what the test wrote.

    ``qemu.qmp`` cannot send malformed input, split messages or stray bytes, and it hides how QEMU
    frames replies; the framing tests need all of that.  QEMU ends every reply with ``\\r\\n``
    (``monitor/monitor.c``), so one line is one message.
    """

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.timeout = timeout
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        self._sock.connect(path)
        self._buf = b""
        self.greeting: dict[str, Any] | None = None

    def recv_line(self, timeout: float | None = None) -> bytes:
        """One reply line without its ``\\r\\n``, raw (QEMU can write non-JSON such as ``inf``)."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no complete line from QEMU; partial: {self._buf[:200]!r}")
            self._sock.settimeout(left)
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError:
                raise TimeoutError(
                    f"no complete line from QEMU; partial: {self._buf[:200]!r}"
                ) from None
            if not chunk:
                raise EOFError(f"QEMU closed the connection; partial: {self._buf[:200]!r}")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.removesuffix(b"\r")

    def recv_message(self, timeout: float | None = None) -> Any:
        """One reply line, JSON-decoded."""
        return json.loads(self.recv_line(timeout))

    def send(self, data: bytes) -> None:
        """Write bytes as they are: no newline is added."""
        self._sock.sendall(data)

    def negotiate(self) -> dict[str, Any]:
        """Read the greeting and leave negotiation mode; returns the greeting."""
        greeting = self.recv_message()
        if not isinstance(greeting, dict) or "QMP" not in greeting:
            raise AssertionError(f"not a QMP greeting: {greeting!r}")
        self.greeting = greeting
        reply = self.command({"execute": "qmp_capabilities"})
        if reply.get("return") != {}:
            raise AssertionError(f"qmp_capabilities failed: {reply!r}")
        return greeting

    def command(self, obj: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        """Send one command and return its reply; events that arrive first are skipped."""
        self.send(json.dumps(obj).encode())
        while True:
            msg = self.recv_message(timeout)
            if isinstance(msg, dict) and ("return" in msg or "error" in msg):
                return msg

    def shutdown_write(self) -> None:
        """Half-close: QEMU sees end of input but can still answer."""
        self._sock.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


__all__ = [
    "QEMU_BINARIES",
    "QemuNotFound",
    "QemuProcess",
    "QemuRecord",
    "RawQMP",
    "forget_stopped",
    "record",
    "recorded",
]
