"""Non-blocking socket I/O with SCM_RIGHTS, driven by ``loop.add_reader``/``add_writer``.

asyncio's and uvloop's stream transports cannot carry file descriptors (uvloop's transport
sockets refuse ``recvmsg``), and QMP clients pass descriptors: libvirt in the same ``sendmsg`` as
``getfd``, ``qemu.qmp`` with a lone space byte before it.  So every proxy socket, unix or TCP,
client or upstream, is a raw non-blocking socket served here.  TCP simply never carries
descriptors.

A write with nothing queued ahead of it is sent at once, by the caller's own system call, as
uvloop's transports do: a lockstep round trip's two writes cost no queue, no loop handle and no
flush pass.  What the kernel does not take, and every write behind it, is queued and joined into
one ``send`` per wake-up, except a segment carrying descriptors, which always goes alone so the
descriptors arrive with exactly that command's bytes.  A send that fails closes the stream and
is reported from the loop, never from inside a write or a flush.  A caller about to write a burst
(a read of many events, many replies, a pipelined batch of commands, or thousands of error
replies to one read of garbage) corks the :class:`IoLoop` first: every stream's writes then
leave in one system call per stream when it uncorks.  What the streams of one event loop
share (the cork and the reset watch) is an :class:`IoLoop`.

A peer that resets the connection (it closed with data we sent still unread) makes ``poll``
report an error; libuv then stops polling the socket and uvloop drops it without calling the
reader, so data the peer sent just before is read and the end never is: a vanished client or
QEMU would go unnoticed for ever.  So every stream is also watched for errors alone by an epoll
of the :class:`IoLoop`'s own, and a stream with an error is read to its end by hand.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno
import os
import select
import socket
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from typing import Final

# Bytes per read: QEMU's largest reply lines (its schema, about 236 KB) in a few reads.  Every read
# makes a fresh bytes object of this size, which the kernel's count then shrinks: below glibc's
# mmap threshold (128 KiB) that is a heap allocation, above it an mmap, an mremap and a munmap per
# read (most of a lockstep round trip's system time, when reads were 256 KiB).  Clients get what
# QEMU's own chardev reads (4 KiB): each byte of garbage can earn an error reply, so a read's
# worth of work must stay small for the loop to serve everyone else in between.
READ_SIZE: Final = 64 * 1024
CLIENT_READ_SIZE: Final = 4 * 1024
# The most descriptors one read takes, as QEMU's own socket reads (io/channel-socket.c,
# SOCKET_MAX_FDS = 16): the kernel discards the rest of a larger batch.  It also bounds what one
# client message can make the proxy hold.
MAX_FDS: Final = 16
_CMSG_SPACE: Final = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)
_RETRY: Final = (BlockingIOError, InterruptedError)
# How long a closing stream waits for its peer to take what is still queued for it.
FLUSH_DEADLINE: Final = 5.0
# Plain ints: enum.Flag arithmetic on every read costs more than the read's own bookkeeping.
_MSG_CMSG_CLOEXEC: Final = int(socket.MSG_CMSG_CLOEXEC)


class IoLoop:
    """What the streams of one event loop share: the cork and the reset watch (see the module
    docstring)."""

    __slots__ = ("__weakref__", "_corked", "_epoll", "_loop", "_watched", "corked")

    _of: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, IoLoop] = weakref.WeakKeyDictionary()

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.corked = 0  # cork() depth
        self._corked: list[Stream] = []  # streams written while corked, flushed by uncork()
        self._epoll: select.epoll | None = None
        self._watched: dict[int, Stream] = {}

    def cork(self) -> None:
        """Hold every stream's writes until the matching :meth:`uncork`, which sends each
        stream's in one system call: for a burst (a read of many events or replies, a
        pipelined batch of commands), where sending each write at once would cost a system call
        per write, and the reader a wake-up per write."""
        self.corked += 1

    def uncork(self) -> None:
        self.corked -= 1
        if self.corked or not self._corked:
            return
        streams, self._corked = self._corked, []
        for index, stream in enumerate(streams):
            try:
                stream._flush()
            except BaseException:
                for rest in streams[index + 1 :]:  # never left queued with no flush to come
                    self._loop.call_soon(rest._flush)
                raise

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> IoLoop:
        io = cls._of.get(loop)
        if io is None:
            io = cls._of[loop] = cls(loop)
        return io

    def watch(self, stream: Stream) -> None:
        """Tell ``stream`` when its socket reports an error (one shot: the stream then ends)."""
        if self._epoll is None:
            self._epoll = select.epoll()
            self._loop.add_reader(self._epoll.fileno(), self._errors)
        # No event asked for: epoll always reports EPOLLERR and EPOLLHUP, once.
        self._epoll.register(stream.fileno, select.EPOLLONESHOT)
        self._watched[stream.fileno] = stream

    def unwatch(self, stream: Stream) -> None:
        if self._watched.pop(stream.fileno, None) is None or self._epoll is None:
            return
        with contextlib.suppress(OSError):
            self._epoll.unregister(stream.fileno)
        if not self._watched:  # the last stream is gone: so is the epoll, descriptor and all
            self._loop.remove_reader(self._epoll.fileno())
            self._epoll.close()
            self._epoll = None

    def _errors(self) -> None:
        assert self._epoll is not None
        for fd, events in self._epoll.poll(0, 64):
            stream = self._watched.get(fd)
            # A hang-up alone is the peer's ordinary close: the reader sees that end itself.
            if stream is not None and events & select.EPOLLERR:
                stream._reset()


class Stream:
    """One connected socket.  Callbacks run on the event loop, never concurrently.

    ``on_data(data, fds)`` gets every chunk read (``fds`` only on unix sockets), ``on_eof()`` the
    peer's half-close, ``on_error(exc)`` a fatal socket error.  ``backlog`` counts bytes queued
    beyond the segment being written; a :meth:`write` that takes it over ``max_backlog`` (the
    slow-reader limit) sets ``overflowed``, drops every later write, and schedules
    ``on_overflow()``: never from inside the write, so no caller is re-entered mid-write.  The
    limit costs one comparison per write.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        on_data: Callable[[bytes, list[int]], None],
        on_eof: Callable[[], None],
        on_error: Callable[[OSError], None],
        *,
        receive_fds: bool = True,
        read_size: int = READ_SIZE,
        max_backlog: int | None = None,
        on_overflow: Callable[[], None] | None = None,
    ) -> None:
        self.max_backlog = max_backlog if max_backlog is not None else 1 << 62
        self._on_overflow = on_overflow
        self._io = IoLoop.of(loop)
        self._read_size = read_size
        sock.setblocking(False)
        self._loop = loop
        self._sock = sock
        self._fd = self.fileno = sock.fileno()
        unix = receive_fds and sock.family == socket.AF_UNIX
        self._read = self._read_fds if unix else self._read_plain
        self._on_data = on_data
        self._on_eof = on_eof
        self._on_error = on_error
        self._out: deque[tuple[bytes, tuple[int, ...]]] = deque()  # (data, fds to send with)
        self._out_bytes = 0
        self._reading = False
        self._pending = False  # bytes queued: a flush is scheduled or the writer is registered
        self._writing = False  # the writer is registered: the kernel buffer was full
        self._shut_wr = False
        self._write_closed = False  # closed, or shutting down once drained: writes are dropped
        self._deadline: asyncio.TimerHandle | None = None  # for close_after_flush
        self.overflowed = False
        self.closed = False
        self._io.watch(self)

    @property
    def backlog(self) -> int:
        if not self._out:
            return 0
        return self._out_bytes - len(self._out[0][0])

    def resume_reading(self) -> None:
        if not self._reading and not self.closed:
            self._reading = True
            self._loop.add_reader(self._fd, self._read)

    def pause_reading(self) -> None:
        if self._reading:
            self._reading = False
            if not self.closed:
                self._loop.remove_reader(self._fd)

    def _read_fds(self) -> None:
        """A read of a unix socket whose peer may pass descriptors: only ``recvmsg`` takes them
        (a plain read discards them), at about twice a plain read's cost."""
        try:
            # A batch over MAX_FDS arrives truncated (MSG_CTRUNC): the first ones are kept, as
            # QEMU keeps them.
            data, ancdata, _, _ = self._sock.recvmsg(
                self._read_size, _CMSG_SPACE, _MSG_CMSG_CLOEXEC
            )
        except _RETRY:
            return
        except OSError as exc:
            self._fail(exc)
            return
        if data:
            self._on_data(data, _fds_from(ancdata) if ancdata else [])
        else:
            self._ended(_fds_from(ancdata))

    def _read_plain(self) -> None:
        try:
            data = os.read(self._fd, self._read_size)
        except _RETRY:
            return
        except OSError as exc:
            self._fail(exc)
            return
        if data:
            self._on_data(data, [])
        else:
            self._ended([])

    def _ended(self, fds: list[int]) -> None:
        _close_all(fds)
        self.pause_reading()
        self._on_eof()

    def write(self, data: bytes, fds: list[int] | None = None) -> None:
        """Send one message (and descriptors that travel with its first byte), or queue it."""
        if self._pending or fds or self._write_closed or self._io.corked:
            self._queue(data, fds)
            return
        try:
            sent = os.write(self._fd, data)
        except _RETRY:
            sent = 0
        except OSError as exc:
            self._fail_later(exc)
            return
        if sent != len(data):  # the kernel buffer is full: the rest waits until it drains
            self._out.append((data[sent:], ()))
            self._out_bytes = len(data) - sent
            self._pending = self._writing = True
            self._loop.add_writer(self._fd, self._flush)

    def _queue(self, data: bytes, fds: list[int] | None) -> None:
        if self._write_closed or not data:
            # Nothing to send (an empty segment would never leave the queue, and descriptors
            # travel only with a byte): its descriptors are closed.
            _close_all(fds or ())
            return
        self._out.append((data, tuple(fds) if fds else ()))
        self._out_bytes += len(data)
        if not self._pending:
            self._pending = True
            io = self._io
            if io.corked:
                io._corked.append(self)
            else:
                self._loop.call_soon(self._flush)
        if self._out_bytes > self.max_backlog and self.backlog > self.max_backlog:
            self.overflowed = True
            self._write_closed = True
            if self._on_overflow is not None:
                self._loop.call_soon(self._on_overflow)

    def _flush(self) -> None:
        if self.closed:
            return
        out = self._out
        if not self._send_queued():
            return
        if not out:
            self._drained()
        elif not self._writing:
            self._writing = True
            self._loop.add_writer(self._fd, self._flush)

    def _drained(self) -> None:
        """Everything queued is sent: stop watching for writability, finish a shutdown."""
        self._pending = False
        if self._writing:
            self._writing = False
            self._loop.remove_writer(self._fd)
        if self._shut_wr:
            self.close()

    def _send_queued(self) -> bool:
        """Send segments until the queue is empty or the socket is full; False if it failed."""
        out = self._out
        while out:
            data, fds = out[0]
            try:
                if fds:
                    sent = self._sock.sendmsg(
                        [data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                    )
                    _close_all(fds)  # the peer has its own copies now
                    out[0] = (data, ())
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
                self._fail_later(exc)
                return False
            self._out_bytes -= sent
            partial = False
            while sent:
                head = out[0][0]
                if len(head) > sent:
                    out[0] = (head[sent:], ())
                    partial = True
                    break
                sent -= len(head)
                out.popleft()
            if partial:
                break  # the kernel buffer is full: wait until the socket is writable
        return True

    def close_after_flush(self) -> None:
        """Send what is queued, then close (the end of a session that is owed replies, such as
        a half-closed one).

        Meanwhile whatever the peer sends is read and dropped: a client blocked writing to us
        does not read what we owe it until its write completes, so if we stopped reading, each
        would wait for the other for ever.  A peer that has not taken everything within
        ``FLUSH_DEADLINE`` seconds is closed anyway.
        """
        self._on_data = _drop
        self._on_eof = _ignore
        self._shut_wr = True
        self._write_closed = True
        if not self._pending:
            self.close()
            return
        self.resume_reading()
        self._deadline = self._loop.call_later(FLUSH_DEADLINE, self.close)

    def close(self) -> None:
        if self.closed:
            return
        self.pause_reading()
        if self._writing:
            self._loop.remove_writer(self._fd)
            self._writing = False
        self.closed = True
        self._write_closed = True
        if self._deadline is not None:
            self._deadline.cancel()
        for _, fds in self._out:
            _close_all(fds)
        self._out.clear()
        self._out_bytes = 0
        self._pending = False
        self._io.unwatch(self)
        self._sock.close()

    def _reset(self) -> None:
        """The socket reported an error (the peer reset the connection): uvloop may no longer
        poll it, so read what the peer sent before, then take the error, here and now."""
        for _ in range(64):  # bounded: a reset socket has at most its receive buffer left
            if self.closed or not self._reading:
                break
            self._read()
        if not self.closed:  # nothing queued for it can be sent now either
            self._fail(ConnectionResetError(errno.ECONNRESET, os.strerror(errno.ECONNRESET)))

    def _fail(self, exc: OSError) -> None:
        self.close()
        self._on_error(exc)

    def _fail_later(self, exc: OSError) -> None:
        """A send failed: close now (nothing more is read or sent) and report it from the loop,
        never from inside the write or the flush a caller is in."""
        self.close()
        self._loop.call_soon(self._on_error, exc)


def _drop(data: bytes, fds: list[int]) -> None:
    _close_all(fds)


def _ignore() -> None:
    pass


def _fds_from(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(payload[: len(payload) - (len(payload) % arr.itemsize)])
            fds.extend(arr)
    return fds


def _close_all(fds: Iterable[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
