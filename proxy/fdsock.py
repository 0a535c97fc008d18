"""Non-blocking socket I/O with SCM_RIGHTS, driven by ``loop.add_reader``/``add_writer``.

asyncio's and uvloop's stream transports cannot carry file descriptors (uvloop's transport
sockets refuse ``recvmsg``), and QMP clients pass descriptors: libvirt in the same ``sendmsg`` as
``getfd``, ``qemu.qmp`` with a lone space byte before it.  So every proxy socket, unix or TCP,
client or upstream, is a raw non-blocking socket served here.  TCP simply never carries
descriptors.

Writes made during one loop iteration are joined into one ``sendmsg`` (one syscall per wake-up,
not per message), except a segment carrying descriptors, which always goes alone so the
descriptors arrive with exactly that command's bytes.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import os
import socket
from collections import deque
from collections.abc import Callable
from typing import Final

# Bytes per read: enough for QEMU's largest reply lines in a few reads; clients get less, so one
# read of garbage (each byte can earn an error reply) stays a bounded burst.
READ_SIZE: Final = 256 * 1024
CLIENT_READ_SIZE: Final = 64 * 1024
# SCM_MAX_FD in the kernel: the most descriptors one message can carry.
_MAX_FDS: Final = 253
_CMSG_SPACE: Final = socket.CMSG_SPACE(_MAX_FDS * array.array("i").itemsize)
_RETRY: Final = (BlockingIOError, InterruptedError)
# Plain ints: enum.Flag arithmetic on every read costs more than the read's own bookkeeping.
_MSG_CTRUNC: Final = int(socket.MSG_CTRUNC)
_MSG_CMSG_CLOEXEC: Final = int(socket.MSG_CMSG_CLOEXEC)


class Stream:
    """One connected socket.  Callbacks run on the event loop, never concurrently.

    ``on_data(data, fds)`` gets every chunk read (``fds`` only on unix sockets), ``on_eof()`` the
    peer's half-close, ``on_error(exc)`` a fatal socket error.  ``backlog`` counts bytes queued
    beyond the segment being written, for the slow-reader limit.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        on_data: Callable[[bytes, list[int]], None],
        on_eof: Callable[[], None],
        on_error: Callable[[OSError], None],
        receive_fds: bool = True,
        read_size: int = READ_SIZE,
    ) -> None:
        self._read_size = read_size
        sock.setblocking(False)
        self._loop = loop
        self._sock = sock
        self._fd = sock.fileno()
        # recvmsg() costs more than recv(); only unix peers that may pass descriptors need it.
        self._unix = receive_fds and sock.family == socket.AF_UNIX
        self._on_data = on_data
        self._on_eof = on_eof
        self._on_error = on_error
        self._out: deque[tuple[bytes, list[int]]] = deque()  # (data, fds to send with it)
        self._out_bytes = 0
        self._reading = False
        self._writing = False
        self._flush_scheduled = False
        self._shut_wr = False
        self.closed = False

    @property
    def backlog(self) -> int:
        if not self._out:
            return 0
        return self._out_bytes - len(self._out[0][0])

    def resume_reading(self) -> None:
        if not self._reading and not self.closed:
            self._reading = True
            self._loop.add_reader(self._fd, self._read_ready)

    def pause_reading(self) -> None:
        if self._reading:
            self._reading = False
            if not self.closed:
                self._loop.remove_reader(self._fd)

    def _read_ready(self) -> None:
        try:
            if self._unix:
                data, ancdata, flags, _ = self._sock.recvmsg(
                    self._read_size, _CMSG_SPACE, _MSG_CMSG_CLOEXEC
                )
                fds = _fds_from(ancdata)
                if flags & _MSG_CTRUNC:
                    # Some descriptors were lost in the kernel; never hand on a partial batch.
                    _close_all(fds)
                    fds = []
            else:
                data = self._sock.recv(self._read_size)
                fds = []
        except _RETRY:
            return
        except OSError as exc:
            self._fail(exc)
            return
        if not data:
            _close_all(fds)
            self.pause_reading()
            self._on_eof()
            return
        self._on_data(data, fds)

    def write(self, data: bytes, fds: list[int] | None = None) -> None:
        """Queue one message (and descriptors that travel with its first byte)."""
        if self.closed or self._shut_wr:
            _close_all(fds or [])
            return
        self._out.append((data, list(fds) if fds else []))
        self._out_bytes += len(data)
        if not self._writing and not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self.closed:
            return
        out = self._out
        while out:
            data, fds = out[0]
            try:
                if fds:
                    sent = self._sock.sendmsg(
                        [data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                    )
                    _close_all(fds)  # the peer has its own copies now
                    out[0] = (data, [])
                else:
                    if len(out) > 1:
                        chunks = []
                        for chunk, chunk_fds in out:
                            if chunk_fds:
                                break
                            chunks.append(chunk)
                        data = b"".join(chunks)
                    sent = self._sock.send(data)
            except _RETRY:
                break
            except OSError as exc:
                self._fail(exc)
                return
            self._out_bytes -= sent
            partial = False
            while sent:
                head = out[0][0]
                if len(head) > sent:
                    out[0] = (head[sent:], [])
                    partial = True
                    break
                sent -= len(head)
                out.popleft()
            if partial:
                break  # the kernel buffer is full: wait until the socket is writable
        if out and not self._writing:
            self._writing = True
            self._loop.add_writer(self._fd, self._flush)
        elif not out and self._writing:
            self._writing = False
            self._loop.remove_writer(self._fd)
        if not out and self._shut_wr:
            self.close()

    def close_after_flush(self) -> None:
        """Send what is queued, then shut down the write side (the reply to a half-close)."""
        self._shut_wr = True
        if not self._out and not self._flush_scheduled:
            self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.pause_reading()
        if self._writing:
            self._loop.remove_writer(self._fd)
            self._writing = False
        self.closed = True
        for _, fds in self._out:
            _close_all(fds)
        self._out.clear()
        self._out_bytes = 0
        self._sock.close()

    def _fail(self, exc: OSError) -> None:
        self.close()
        self._on_error(exc)


def _fds_from(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(payload[: len(payload) - (len(payload) % arr.itemsize)])
            fds.extend(arr)
    return fds


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
