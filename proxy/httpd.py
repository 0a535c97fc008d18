"""A small HTTP/1.1 server for the metrics and health endpoints, on its own event loop thread.

``http.server.ThreadingHTTPServer`` spends a thread per connection and has no deadlines: 300 idle
connections cost 300 threads (3.5 GB of virtual memory in their stacks), and a client trickling
a byte every few seconds holds its thread for ever.  Here one daemon thread runs an asyncio event
loop; a connection costs a protocol object and one fixed ``max_request`` buffer that the socket
reads into, never a thread and never a buffer that grows with what the client sends.

The server keeps its own thread rather than a place on the proxy's event loop: ``/healthz`` must
answer 503 when that loop is stuck, which it could not do from inside it.

Limits (defaults in brackets):

* ``max_connections`` [64] open at once.  One more evicts a connection that has finished its last
  response and is only lingering, else the one idle (or waiting for its request head) longest,
  else the writer stalled longest: a flood of idle or slow clients cannot lock out a scrape or a
  health check, and the newcomer is always served.  (Only a connect flood faster than
  ``max_connections`` per round trip can evict a client before its request is read; that is a
  job for a firewall.)
* ``request_timeout`` [5 s]: a total deadline from the first byte of a request (from the accept,
  for a connection's first request) to the end of its head.  A slowloris is cut there however it
  paces its bytes; it gets a 408 if it sent anything.
* ``idle_timeout`` [30 s] between the requests of a keep-alive connection (Prometheus keeps its
  connections open between scrapes).
* ``write_timeout`` [10 s] to hand a response to the kernel; a client that does not read is
  reset, which also frees what the kernel still held for it.
* ``max_request`` [8 KiB] of request head, else 431.  No endpoint takes a body, so a request
  announcing one gets 413.  Either closes the connection.
* ``backlog`` [128] for the listen queue; at most ``ACCEPT_BATCH`` accepts per turn of the loop,
  so reading requests interleaves with a connect flood.

After a response that closes the connection, the server shuts down its sending side and reads
and discards what the client still sends for up to ``LINGER_S``, so a client that sent too much
reads its 431 rather than a reset.  Requests on one connection are answered one at a time and
reading pauses while a response is in flight, so pipelining cannot queue work either.

The handler runs on the server's thread, one call at a time, so it must be quick (a handler that
blocks stalls every connection); whatever it raises becomes a 500 and one log line.  Clients are
not logged: what they do is counted in plain integer attributes, bumped on the server's thread
and readable from any.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import re
import socket
import struct
import threading
import urllib.parse
from collections.abc import Callable
from http import HTTPStatus
from typing import Any, Final, NamedTuple, cast

from proxy.logs import fields

log = logging.getLogger("qmp_proxy.httpd")

Handler = Callable[[str], tuple[int, str, bytes]]
"""Path (query string removed) -> (status, content type, body); called on the server's thread."""

LINGER_S: Final = 1.0  # reading and discarding after a closing response
START_TIMEOUT_S: Final = 5.0  # for the thread to begin serving
JOIN_TIMEOUT_S: Final = 5.0  # for the thread to end in close()
ACCEPT_RETRY_S: Final = 0.5  # after accept() failed for want of descriptors or memory
ACCEPT_BATCH: Final = 16  # accepts per turn of the loop, so reads interleave with a connect flood
TEXT: Final = "text/plain; charset=utf-8"

_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_REQUEST_LINE = re.compile(rf"({_TOKEN}) ([\x21-\x7e]+) HTTP/([0-9])\.([0-9])")
_HEADER = re.compile(rf"({_TOKEN}):([\t\x20-\x7e\x80-\xff]*)")
_DIGITS = re.compile(r"[0-9]{1,18}")
_CONTENT_TYPE = re.compile(r"[\x20-\x7e]{1,200}")  # printable ASCII: cannot split the head
_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST, drops the send queue

# Connection states.
_HEAD: Final = 0  # waiting for (the rest of) a request head, under request_timeout
_IDLE: Final = 1  # keep-alive, between requests, under idle_timeout
_WRITING: Final = 2  # a response the kernel has not taken yet, under write_timeout
_LINGER: Final = 3  # last response sent, discarding input until EOF or LINGER_S
_CLOSED: Final = 4


class _BadRequest(Exception):
    """A request answered by the server itself: ``status``, and whether to close after it."""

    def __init__(self, status: int, close: bool = True) -> None:
        super().__init__(status)
        self.status = status
        self.close = close


class _Request(NamedTuple):
    method: str
    path: str
    minor: int  # HTTP/1.<minor>
    keep_alive: bool


def _path(target: str) -> str:
    if target.startswith("/"):
        path = target
    elif target[:7].lower() == "http://" or target[:8].lower() == "https://":
        try:
            path = urllib.parse.urlsplit(target).path or "/"
        except ValueError:
            raise _BadRequest(400) from None
    else:
        raise _BadRequest(400)
    return path.partition("?")[0].partition("#")[0]


def _parse(head: bytes) -> _Request:
    """Strict enough that nothing odd reaches the handler or a log line."""
    lines = head.decode("latin-1").split("\n")[:-2]  # the head ends with an empty line
    for i, line in enumerate(lines):
        if line.endswith("\r"):
            line = lines[i] = line[:-1]
        if "\r" in line:
            raise _BadRequest(400)
    first = _REQUEST_LINE.fullmatch(lines[0])
    if first is None:
        raise _BadRequest(400)
    method, target, major, minor = first.groups()
    if major != "1":
        raise _BadRequest(505)
    lengths: set[int] = set()
    tokens: set[str] = set()
    chunked = False
    for line in lines[1:]:
        header = _HEADER.fullmatch(line)
        if header is None:  # also obsolete line folding: a name cannot start with a space
            raise _BadRequest(400)
        name = header.group(1).lower()
        value = header.group(2).strip(" \t")
        if name == "content-length":
            if _DIGITS.fullmatch(value) is None:
                raise _BadRequest(400)
            lengths.add(int(value))
        elif name == "transfer-encoding":
            chunked = True
        elif name == "connection":
            tokens.update(token.strip(" \t").lower() for token in value.split(","))
    if len(lengths) > 1:
        raise _BadRequest(400)
    path = _path(target)
    has_body = chunked or any(lengths)
    if method not in ("GET", "HEAD"):
        raise _BadRequest(405, close=has_body)  # an unread body would be taken for a request
    if has_body:
        raise _BadRequest(413)
    keep_alive = "close" not in tokens and (minor != "0" or "keep-alive" in tokens)
    return _Request(method, path, int(minor), keep_alive)


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


def _printable(text: str, limit: int = 300) -> str:
    """One log line, whatever an exception's message holds."""
    text = text[:limit]
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def _describe(exc: BaseException) -> str:
    return _printable(f"{type(exc).__name__}: {exc}")


def _named(name: str, where: str, exc: OSError) -> OSError:
    """The error with the address in its message, keeping ``errno`` for callers that test it."""
    named = OSError(f"{name} {where}: {exc}")
    named.errno = exc.errno
    return named


class HttpServer:
    """GET and HEAD for ``handler`` on ``host:port``, served from one daemon thread."""

    name = "metrics"  # names the server in bind errors

    def __init__(
        self,
        host: str,
        port: int,
        handler: Handler,
        *,
        max_connections: int = 64,
        request_timeout: float = 5.0,
        idle_timeout: float = 30.0,
        write_timeout: float = 10.0,
        max_request: int = 8192,
        backlog: int = 128,
    ) -> None:
        if max_connections < 1 or backlog < 1 or max_request < 64:
            raise ValueError("max_connections and backlog must be >= 1, max_request >= 64")
        if min(request_timeout, idle_timeout, write_timeout) <= 0:
            raise ValueError("timeouts must be > 0")
        self.host = host
        self.port = port
        self.handler = handler
        self.max_connections = max_connections
        self.request_timeout = request_timeout
        self.idle_timeout = idle_timeout
        self.write_timeout = write_timeout
        self.max_request = max_request
        self.backlog = backlog
        # Counters, for export: written on the server's thread only.
        self.accepted = 0  # connections
        self.evicted = 0  # connections closed to make room for a new one
        self.timed_out = 0  # request heads and responses that missed their deadline
        self.idle_closed = 0  # keep-alive connections closed after idle_timeout
        self.bad_requests = 0  # answered 400, 405, 413, 431 or 505 by the server
        self.requests = 0  # requests passed to the handler
        self.handler_errors = 0  # handler calls that raised (answered 500)
        # Open connections by eviction preference; each dict is ordered oldest first.
        self._lingering: dict[_Connection, None] = {}
        self._waiting: dict[_Connection, None] = {}
        self._writing: dict[_Connection, None] = {}
        self._address = (host, port)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._start_error: BaseException | None = None
        self._closing = False
        self._accepting: set[asyncio.Task[None]] = set()  # accepted, not yet connection_made()
        self._accept_retry: asyncio.TimerHandle | None = None

    @property
    def address(self) -> tuple[str, int]:
        return self._address

    @property
    def connections(self) -> int:
        """Open now (readable from any thread)."""
        return len(self._lingering) + len(self._waiting) + len(self._writing)

    def _where(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def start(self) -> None:
        """Bind and listen in the calling thread, so a bad address fails here, then serve."""
        if self._thread is not None:
            raise RuntimeError("HttpServer.start() called twice")
        sock = self._bind()
        name = sock.getsockname()
        self._address = (str(name[0]), int(name[1]))
        loop = asyncio.new_event_loop()
        ready = threading.Event()
        self._loop = loop
        self._thread = threading.Thread(
            target=self._run, args=(loop, sock, ready), name="httpd", daemon=True
        )
        self._thread.start()
        ready.wait(START_TIMEOUT_S)
        if self._start_error is not None or not ready.is_set():
            self.close()
            why = self._start_error or "timed out starting"
            raise OSError(f"{self.name} {self._where()}: {why}")

    def _bind(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as exc:
            raise _named(self.name, self._where(), exc) from exc
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
            sock.listen(self.backlog)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise _named(self.name, self._where(), exc) from exc
        return sock

    def close(self) -> None:
        """Stop serving, close every connection and the listener, join the thread (bounded)."""
        thread, loop, stop = self._thread, self._loop, self._stop
        if thread is None or loop is None:
            return
        if stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop has already ended
                loop.call_soon_threadsafe(stop.set)
        if thread is threading.current_thread():
            return  # from the handler: the loop ends once the handler returns
        thread.join(JOIN_TIMEOUT_S)
        if thread.is_alive():
            log.warning(fields("http_close_timeout", address=self._where()))

    # The server's thread.

    def _run(
        self, loop: asyncio.AbstractEventLoop, sock: socket.socket, ready: threading.Event
    ) -> None:
        asyncio.set_event_loop(loop)
        loop.set_exception_handler(_loop_error)
        try:
            loop.run_until_complete(self._serve(loop, sock, ready))
        except Exception as exc:
            log.error(fields("http_server_failed", error=_describe(exc)))
        finally:
            ready.set()
            sock.close()
            loop.close()

    async def _serve(
        self, loop: asyncio.AbstractEventLoop, sock: socket.socket, ready: threading.Event
    ) -> None:
        """Accept until close(), then end every connection.

        The accept loop is ours, not ``loop.create_server()``'s: asyncio 3.11 leaks a connection
        accepted just before its server closes (the transport asserts the server is open, and
        the socket is left to the garbage collector).
        """
        self._stop = asyncio.Event()
        try:
            loop.add_reader(sock.fileno(), self._accept, loop, sock)
        except Exception as exc:
            self._start_error = exc
            return
        finally:
            ready.set()
        try:
            await self._stop.wait()
        finally:
            self._closing = True
            if self._accept_retry is not None:
                self._accept_retry.cancel()
            loop.remove_reader(sock.fileno())
            sock.close()  # the kernel resets connections not accepted yet
            # An accepted connection reaches connection_made() (which aborts it now) within a
            # few turns of the loop; the others are aborted here.
            for _ in range(5):
                await asyncio.sleep(0)
            for conn in [*self._lingering, *self._waiting, *self._writing]:
                conn.abort()
            for task in self._accepting:
                task.cancel()
            await asyncio.gather(*self._accepting, return_exceptions=True)
            for _ in range(3):  # connection_lost() callbacks
                await asyncio.sleep(0)

    def _accept(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
        if self._closing:
            return
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM):
                    continue  # that one connection failed before it was accepted
                # Out of descriptors or memory: pause rather than spin on a ready listener.
                log.error(fields("http_accept_failed", error=_describe(exc)))
                loop.remove_reader(sock.fileno())
                self._accept_retry = loop.call_later(
                    ACCEPT_RETRY_S, loop.add_reader, sock.fileno(), self._accept, loop, sock
                )
                return
            task = loop.create_task(self._connect(loop, conn))
            self._accepting.add(task)
            task.add_done_callback(self._accepting.discard)

    async def _connect(self, loop: asyncio.AbstractEventLoop, conn: socket.socket) -> None:
        try:
            await loop.connect_accepted_socket(lambda: _Connection(self, loop), conn)
        except asyncio.CancelledError:
            conn.close()
            raise
        except Exception as exc:  # e.g. reset before its transport was made
            conn.close()
            log.debug(fields("http_connect_failed", error=_describe(exc)))

    def _admit(self, conn: _Connection) -> None:
        self.accepted += 1
        if self.connections >= self.max_connections:
            for group in (self._lingering, self._waiting, self._writing):
                if group:
                    self.evicted += 1
                    next(iter(group)).abort()
                    break

    def _call(self, path: str) -> tuple[int, str, bytes]:
        self.requests += 1
        try:
            result: object = self.handler(path)
            if not isinstance(result, tuple) or len(result) != 3:
                raise TypeError(f"handler returned {_printable(repr(result), 80)}")
            status, ctype, body = result
            if type(status) is not int or not 200 <= status <= 599:
                raise TypeError(f"handler returned status {_printable(repr(status), 80)}")
            if not isinstance(ctype, str) or _CONTENT_TYPE.fullmatch(ctype) is None:
                raise TypeError(f"handler returned content type {_printable(repr(ctype), 80)}")
            if not isinstance(body, bytes):
                raise TypeError(f"handler returned a body of type {type(body).__name__}")
            return status, ctype, body
        except Exception as exc:
            self.handler_errors += 1
            log.error(fields("http_handler_error", path=path[:200], error=_describe(exc)))
            return 500, TEXT, b"internal server error\n"


def _loop_error(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """asyncio's own reports (a socket error it did not expect), as one line each."""
    exc = context.get("exception")
    log.error(
        fields(
            "http_loop_error",
            message=_printable(str(context.get("message", ""))),
            error=_describe(exc) if isinstance(exc, BaseException) else None,
        )
    )


class _Connection(asyncio.BufferedProtocol):
    """One client: reads into a fixed buffer, answers one request at a time."""

    __slots__ = (
        "_buf",
        "_close_after",
        "_group",
        "_length",
        "_line_start",
        "_loop",
        "_overflow",
        "_peer_eof",
        "_reading",
        "_scanned",
        "_server",
        "_state",
        "_timer",
        "_transport",
        "_view",
    )

    def __init__(self, server: HttpServer, loop: asyncio.AbstractEventLoop) -> None:
        self._server = server
        self._loop = loop
        self._buf = bytearray(server.max_request)
        self._view = memoryview(self._buf)
        self._length = 0  # bytes of _buf holding input
        self._scanned = 0  # of those, searched for the end of the head
        self._line_start = 0  # where the line being searched began
        self._state = _HEAD
        self._group: dict[_Connection, None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._transport: asyncio.Transport | None = None
        self._reading = True
        self._close_after = False
        self._peer_eof = False
        self._overflow = False

    # asyncio's callbacks: none may raise, whatever the client did.

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        try:
            if self._server._closing:
                self.abort()
                return
            self._transport.set_write_buffer_limits(high=0)  # resume_writing() = all sent
            self._server._admit(self)
            self._move(self._server._waiting)
            self._arm(self._server.request_timeout, self._head_late)
        except Exception as exc:
            self._fail(exc)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._state == _LINGER:
            return self._view  # discarded
        if self._length >= len(self._buf):  # not expected: a full buffer is answered at once
            self._overflow = True
            return self._view
        return self._view[self._length :]

    def buffer_updated(self, nbytes: int) -> None:
        try:
            if self._state == _LINGER:
                return
            if self._overflow:
                self._length = 0
                self._reject(431)
                return
            self._length += nbytes
            if self._state == _IDLE:
                self._state = _HEAD
                self._arm(self._server.request_timeout, self._head_late)
            if self._state == _HEAD:
                self._process()
        except Exception as exc:
            self._fail(exc)

    def eof_received(self) -> bool:
        self._peer_eof = True
        # Still owed a response: keep the transport open to send it, then close.
        return self._state == _WRITING

    def resume_writing(self) -> None:
        # Called from inside the transport's write callback: act outside it.
        self._loop.call_soon(self._after_write)

    def connection_lost(self, exc: Exception | None) -> None:
        self._state = _CLOSED
        self._leave()

    # Requests.

    def _process(self) -> None:
        """Answer the request at the start of the buffer, if its head is complete."""
        end = self._head_end()
        if end is None:
            if self._length >= len(self._buf):
                self._reject(431)
            return
        head = bytes(self._view[:end])
        self._shift(end)
        server = self._server
        try:
            request = _parse(head)
        except _BadRequest as bad:
            server.bad_requests += 1
            self._error(bad.status, bad.close)
            return
        status, ctype, body = server._call(request.path)
        self._send(
            status,
            ctype,
            body,
            head_only=request.method == "HEAD",
            close=not request.keep_alive,
            keep_alive=request.keep_alive and request.minor == 0,
        )

    def _head_end(self) -> int | None:
        buf = self._buf
        if self._scanned == 0:  # empty lines before a request line are allowed
            skip = 0
            while skip < self._length and buf[skip] in b"\r\n":
                skip += 1
            self._shift(skip)
        while True:
            i = buf.find(b"\n", self._scanned, self._length)
            if i < 0:
                self._scanned = self._length
                return None
            start = self._line_start
            self._scanned = self._line_start = i + 1
            if i == start or (i == start + 1 and buf[start] == 0x0D):
                return i + 1

    def _shift(self, n: int) -> None:
        """Drop the first ``n`` bytes of input (a copy: the two ranges may overlap)."""
        if n:
            rest = self._length - n
            self._buf[:rest] = bytes(self._view[n : self._length])
            self._length = rest
            self._scanned = self._line_start = 0

    def _reject(self, status: int) -> None:
        self._server.bad_requests += 1
        self._error(status, True)

    def _error(self, status: int, close: bool) -> None:
        extra = ("Allow: GET, HEAD",) if status == 405 else ()
        body = f"{status} {_phrase(status)}\n".encode()
        self._send(status, TEXT, body, close=close, extra=extra)

    def _send(
        self,
        status: int,
        ctype: str,
        body: bytes,
        *,
        head_only: bool = False,
        close: bool = False,
        keep_alive: bool = False,
        extra: tuple[str, ...] = (),
    ) -> None:
        lines = [
            f"HTTP/1.1 {status} {_phrase(status)}",
            f"Content-Type: {ctype}",
            f"Content-Length: {len(body)}",
            *extra,
        ]
        if close:
            lines.append("Connection: close")
        elif keep_alive:
            lines.append("Connection: keep-alive")  # HTTP/1.0 asked for it
        data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        if not head_only:
            data += body
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        self._close_after = close
        transport.write(data)
        if transport.get_write_buffer_size():
            self._state = _WRITING
            self._move(self._server._writing)
            self._read(False)
            self._arm(self._server.write_timeout, self._write_late)
        else:
            self._sent()

    def _after_write(self) -> None:
        try:
            transport = self._transport
            if self._state == _WRITING and transport and not transport.get_write_buffer_size():
                self._sent()
        except Exception as exc:
            self._fail(exc)

    def _sent(self) -> None:
        """The kernel has the whole response: close, or wait for the next request."""
        server = self._server
        if self._close_after:
            if self._peer_eof:
                self._close()
            else:
                self._linger()
        elif self._length:  # pipelined: answer it on a later turn of the loop, not recursively
            self._state = _HEAD
            self._move(server._waiting)
            self._read(False)
            self._arm(server.request_timeout, self._head_late)
            self._loop.call_soon(self._next)
        elif self._peer_eof:
            self._close()
        else:
            self._state = _IDLE
            self._move(server._waiting)
            self._read(True)
            self._arm(server.idle_timeout, self._idle_late)

    def _next(self) -> None:
        try:
            if self._state != _HEAD:
                return
            self._process()
            if self._state == _HEAD:  # incomplete: read the rest
                if self._peer_eof:
                    self._close()
                else:
                    self._read(True)
        except Exception as exc:
            self._fail(exc)

    def _linger(self) -> None:
        self._state = _LINGER
        self._move(self._server._lingering)
        self._length = 0
        self._arm(LINGER_S, self._close)  # a FIN after what the kernel still holds to send
        transport = self._transport
        if transport is not None and transport.can_write_eof():
            try:
                transport.write_eof()
            except OSError:
                self.abort()
                return
        self._read(True)

    # Deadlines.

    def _arm(self, delay: float, callback: Callable[[], None]) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_later(delay, self._guarded, callback)

    def _guarded(self, callback: Callable[[], None]) -> None:
        self._timer = None
        try:
            callback()
        except Exception as exc:
            self._fail(exc)

    def _head_late(self) -> None:
        if self._state != _HEAD:
            return
        self._server.timed_out += 1
        if self._length:
            self._error(408, True)
        else:
            self._close()

    def _idle_late(self) -> None:
        if self._state == _IDLE:
            self._server.idle_closed += 1
            self._close()

    def _write_late(self) -> None:
        if self._state == _WRITING:
            self._server.timed_out += 1
            self.abort()

    # Plumbing.

    def _read(self, on: bool) -> None:
        transport = self._transport
        if on == self._reading or transport is None or transport.is_closing():
            return
        self._reading = on
        if on:
            transport.resume_reading()
        else:
            transport.pause_reading()

    def _move(self, group: dict[_Connection, None]) -> None:
        """To the end of ``group``: the dicts' order is the eviction order."""
        if self._group is not None:
            self._group.pop(self, None)
        group[self] = None
        self._group = group

    def _leave(self) -> None:
        if self._group is not None:
            self._group.pop(self, None)
            self._group = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _close(self) -> None:
        self._state = _CLOSED
        self._leave()
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        """Close now with a reset: drops whatever the kernel still holds to send."""
        self._state = _CLOSED
        self._leave()
        transport = self._transport
        if transport is None:
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError, AttributeError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
        transport.abort()

    def _fail(self, exc: Exception) -> None:
        """A bug here, not the client's doing: one line, and drop only this connection."""
        log.error(fields("http_internal_error", error=_describe(exc)))
        with contextlib.suppress(Exception):
            self.abort()
