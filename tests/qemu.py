"""Real QEMU for tests: start it, talk raw QMP to it, and always clean it up.

The proxy's promise is "indistinguishable from QEMU", so the tests that matter compare against a
real QEMU process rather than against recorded transcripts.  This module keeps that cheap and
safe: one call starts a QEMU with a QMP socket in a private temporary directory, and leaving the
``with`` block kills and reaps it even when a test fails.

A missing binary raises :class:`QemuNotFound` instead of skipping: a test run without QEMU must
not look green.  ``scripts/install-qemu.sh`` installs both versions.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import tempfile
import time
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


class QemuProcess:
    """One QEMU process with a QMP unix socket, as a context manager.

    ``QemuProcess("10.0", "-M", "none")`` starts ``qemu10-system-x86_64 -accel tcg -nodefaults
    -display none -S -qmp unix:SOCK,server=on,wait=off -M none`` in a fresh temporary directory,
    with stderr captured to a file there (failed migrations only explain themselves on stderr).
    The socket is ready once ``connect()`` succeeds; the file alone may exist before QEMU listens.
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

    @property
    def pid(self) -> int:
        """QEMU's pid (the wrapper script execs, so this is QEMU itself); kept after stop()."""
        if self._pid is None:
            raise RuntimeError("QEMU is not started")
        return self._pid

    @property
    def argv(self) -> list[str]:
        """The full command line, for error messages."""
        qmp = f"unix:{self.sock_path},server=on,wait=off"
        return [self.binary, *_BASE_ARGS, "-qmp", qmp, *self.extra_args]

    def start(self) -> Self:
        """Spawn QEMU and wait until its QMP socket accepts connections."""
        path = shutil.which(self.binary)
        if path is None:
            raise QemuNotFound(
                f"QEMU {self.version} binary {self.binary!r} not found on PATH; "
                "run scripts/install-qemu.sh (tests need real QEMU and must not skip)"
            )
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
            self._wait_for_socket()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_for_socket(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.start_timeout
        while True:
            rc = self._proc.poll()
            if rc is not None:
                raise RuntimeError(
                    f"QEMU {self.version} exited with {rc} before its QMP socket was ready: "
                    f"{self.argv}\nstderr:\n{self.stderr_text()}"
                )
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(self.sock_path)
                return  # QEMU sees a client come and go, and serves the next one normally
            except (FileNotFoundError, ConnectionRefusedError):
                pass
            finally:
                probe.close()
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"QEMU {self.version} QMP socket not ready after {self.start_timeout}s: "
                    f"{self.argv}\nstderr:\n{self.stderr_text()}"
                )
            time.sleep(0.01)

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


__all__ = ["QEMU_BINARIES", "QemuNotFound", "QemuProcess", "RawQMP"]
