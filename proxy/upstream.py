"""The proxy's one QMP session with QEMU for a route (asyncio).

Layered like ``qemu.qmp``: a :class:`Runstate` the rest of the proxy can read, a reader that
turns QEMU's output into messages, and one place (:meth:`Upstream._lost`) where every way of
losing QEMU ends up.  QEMU's monitor takes one client at a time, and a second connection is
accepted by the kernel but never greeted until the first leaves: that wait is the
``awaiting greeting`` state, and the proxy keeps waiting in it rather than reconnecting, which
would lose its place in QEMU's queue.

QEMU is an untrusted peer here: everything it sends is type-checked before use, a line longer
than ``max_line`` is a protocol error, and a message the proxy cannot place (a reply to an id it
never used, a reply without an id, anything that is neither a reply, an event nor the greeting)
is a *desync*.  A desync is never resolved by a guess: the connection is dropped, the route's
sessions end as if QEMU had restarted, and the route reconnects.

Replies are matched by the integer ids the proxy assigns; QEMU echoes integers verbatim.  The
ids start at a random seven-digit value per connection and count up.  Clients never see them
and cannot send QEMU an id of their own (QEMU only receives the proxy's writing of what it
parsed), so they are a second line of defence; a longer id would cost every command dearly:
QEMU's monitor reads its input a byte per poll (``monitor_can_read``), about 2 us per byte
here, so a 19-digit id cost 35 us per round trip, a seven-digit one costs 12.  A wrong id is
a desync, never a misdelivery.  The proxy's own commands (negotiation, probe, the backport's
steps) and client commands share the id space.  A client command's reply is handed on under
the client's own id (``on_reply(command, reply, ok)``): the id goes back as it came, here.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import secrets
import socket
from collections.abc import Callable
from typing import Any

import orjson

from proxy import qjson, schema
from proxy.address import Address
from proxy.config import DEFAULT_MAX_UPSTREAM_LINE
from proxy.dialect import Dialect
from proxy.fdsock import IoLoop, Stream
from proxy.logs import fields
from proxy.metrics import ConnectResult, RouteMetrics
from proxy.replies import Desync, OutputReader, restore_id, splice_success, success_id
from proxy.session import Command

log = logging.getLogger("qmp_proxy.upstream")


class Runstate(enum.Enum):
    DOWN = "down"
    CONNECTING = "connecting"
    AWAITING_GREETING = "awaiting greeting"
    NEGOTIATING = "negotiating"
    READY = "ready"


class UpstreamError(Exception):
    """QEMU could not be reached, or misbehaved; carries the metrics ``result`` label."""

    def __init__(self, message: str, result: ConnectResult = "error") -> None:
        super().__init__(message)
        self.result = result


def _protocol(what: str) -> UpstreamError:
    return UpstreamError(f"protocol error: {what}", "protocol_error")


class Upstream:
    """One connection to QEMU.  A new instance per connection attempt."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        address: Address,
        *,
        route: str,
        on_event: Callable[[bytes, dict[str, Any]], None],
        on_reply: Callable[[Command, bytes, bool], None],
        on_state: Callable[[Runstate], None],
        metrics: RouteMetrics,
        probe_lock: asyncio.Lock | None = None,
        max_line: int = DEFAULT_MAX_UPSTREAM_LINE,
        upstream_sid: int = 0,
    ) -> None:
        self._metrics = metrics
        self._probe_lock = probe_lock or asyncio.Lock()
        self._loop = loop
        self._io = IoLoop.of(loop)
        self.address = address
        self.route = route
        self._on_event = on_event
        self._on_reply = on_reply
        self._on_state = on_state
        self.max_line = max_line
        self.upstream_sid = upstream_sid
        self.state = Runstate.DOWN
        self.ready = False  # state is READY
        self._stream: Stream | None = None
        self._reader = OutputReader(max_line)
        self._pending: dict[int, Command | asyncio.Future[dict[str, Any]]] = {}
        self._next_id = secrets.randbelow(9 * 10**6) + 10**6  # seven digits: see the docstring
        self._greeting: asyncio.Future[dict[str, Any]] = loop.create_future()
        self.lost: asyncio.Future[str] = loop.create_future()
        self.greeting_line = b""
        self.version: dict[str, Any] = {}
        self.qemu = ""  # "major.minor.micro"
        self.dialect = Dialect()
        self.oob = False
        self.schema = schema.Schema()
        self.identity: dict[str, Any] = {}
        self._pid: int | None = None  # QEMU's pid, from SO_PEERCRED on unix sockets

    def _set_state(self, state: Runstate) -> None:
        self.state = state
        # Read for every command: a plain attribute (an enum member is a class attribute, which
        # CPython 3.11 looks up the slow way).
        self.ready = state is Runstate.READY
        self._on_state(state)

    async def connect(self) -> None:
        """Connect, take the greeting, negotiate (with oob if offered) and probe the schema.

        Raises :class:`UpstreamError` for every way this can fail, QEMU's own misbehaviour
        included; the caller closes the connection and tries again later.
        """
        self._set_state(Runstate.CONNECTING)
        sock = await self._open()
        # QEMU never passes descriptors on QMP: read with plain recv().
        self._stream = Stream(
            self._loop, sock, self._data, self._eof, self._error, receive_fds=False
        )
        self._stream.resume_reading()
        self._set_state(Runstate.AWAITING_GREETING)
        try:
            greeting = await self._wait(self._greeting)
        except UpstreamError as exc:
            raise UpstreamError(str(exc), "no_greeting") from None
        self._take_greeting(greeting)
        self._set_state(Runstate.NEGOTIATING)
        reply = await self.call("qmp_capabilities", {"enable": ["oob"]} if self.oob else None)
        if "return" not in reply:
            raise _protocol(f"negotiation refused: {str(reply.get('error'))[:200]}")
        # One route at a time: a 236 KB schema is ~1.5 MB of Python objects while it is parsed,
        # and memory the allocator once gave out stays with the process.
        async with self._probe_lock:
            entries = _returned(await self.call("query-qmp-schema"), list, "query-qmp-schema")
            self.schema = schema.parse(entries)
        if not self.schema.commands:
            raise _protocol("query-qmp-schema names no command")
        name = _returned(await self.call("query-name"), dict, "query-name").get("name")
        uuid = _returned(await self.call("query-uuid"), dict, "query-uuid").get("UUID")
        self.identity = {
            "upstream": str(self.address),
            "version": self.version,
            "name": name if isinstance(name, str) else None,
            "uuid": uuid if isinstance(uuid, str) else None,
            "pid": self._pid,
        }
        log.debug(
            fields(
                "upstream_probed",
                route=self.route,
                commands=len(self.schema.commands),
                events=len(self.schema.events),
                oob=self.oob,
                pid=self._pid,
                native=",".join(c for c in schema.MIGRATE_COMMANDS if self.schema.native(c))
                or None,
            )
        )

    async def _open(self) -> socket.socket:
        address = self.address
        try:
            if address.kind == "unix":
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                target: Any = address.path
            else:
                infos = await self._loop.getaddrinfo(
                    address.host, address.port, type=socket.SOCK_STREAM
                )
                family, _, _, _, target = infos[0]
                sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as exc:  # name resolution (socket.gaierror) included
            self._set_state(Runstate.DOWN)
            raise UpstreamError(f"connect {address}: {exc.strerror or exc}") from exc
        sock.setblocking(False)
        try:
            await self._loop.sock_connect(sock, target)
            if sock.family == socket.AF_UNIX:
                creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
                self._pid = int.from_bytes(creds[:4], "little")
            else:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:
            sock.close()
            refused = isinstance(exc, ConnectionRefusedError | FileNotFoundError)
            self._set_state(Runstate.DOWN)
            raise UpstreamError(
                f"connect {address}: {exc.strerror or exc}", "refused" if refused else "error"
            ) from exc
        return sock

    def _take_greeting(self, greeting: dict[str, Any]) -> None:
        """Check the greeting's shape: the proxy relays its version and reads its capabilities."""
        qmp = greeting.get("QMP")
        if not isinstance(qmp, dict):
            raise _protocol("greeting: 'QMP' is not an object")
        version = qmp.get("version")
        triple = version.get("qemu") if isinstance(version, dict) else None
        parts = [triple.get(k) for k in ("major", "minor", "micro")] if triple else []
        if not isinstance(triple, dict):
            parts = []
        if len(parts) != 3 or not all(type(p) is int for p in parts):
            raise _protocol("greeting: no version.qemu major/minor/micro")
        offered = qmp.get("capabilities")
        if not isinstance(offered, list) or not all(isinstance(c, str) for c in offered):
            raise _protocol("greeting: 'capabilities' is not a list of names")
        assert isinstance(version, dict)
        self.version = version
        self.qemu = "{}.{}.{}".format(*parts)
        self.dialect = Dialect((parts[0], parts[1], parts[2]))
        self._reader.before_6_0 = self.dialect.before_6_0
        self.oob = "oob" in offered

    def set_ready(self) -> None:
        """The route finished its own start-up work (journal recovery): serve clients."""
        self._set_state(Runstate.READY)

    async def _wait(self, future: asyncio.Future[dict[str, Any]]) -> dict[str, Any]:
        waiters: list[asyncio.Future[Any]] = [future, self.lost]
        done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        if future in done:
            return future.result()
        future.cancel()
        raise UpstreamError(f"lost QEMU: {self.lost.result()}")

    async def call(self, command: str, arguments: dict[str, Any] | None = None) -> dict[str, Any]:
        """Run one of the proxy's own commands and return QEMU's reply message."""
        uid = self._next_id = self._next_id + 1
        msg: dict[str, Any] = {"execute": command}
        if arguments is not None:
            msg["arguments"] = arguments
        msg["id"] = uid
        future: asyncio.Future[dict[str, Any]] = self._loop.create_future()
        self._pending[uid] = future
        # Written for QEMU's reader: client values (big numbers, any string, infinities) reach
        # QEMU as the values the proxy parsed.
        self._write(qjson.encode(msg), [])
        return await self._wait(future)

    def send(self, cmd: Command) -> None:
        """Send a client command; its reply, under the client's id, comes back through
        ``on_reply``."""
        uid = self._next_id = self._next_id + 1
        self._pending[uid] = cmd
        if cmd.fds:
            # The stream closes the descriptors once sent.
            self._write(cmd.wire(uid), cmd.session.hand_over_fds(cmd))
            return
        data = cmd.wire(uid)
        stream = self._stream  # self._write(data, []), without a call more per command
        if stream is None:
            raise UpstreamError("QEMU connection is closed")
        self._metrics.upstream_out += len(data)
        stream.write(data)

    def _write(self, data: bytes, fds: list[int]) -> None:
        stream = self._stream
        if stream is None:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            raise UpstreamError("QEMU connection is closed")
        self._metrics.upstream_out += len(data)
        stream.write(data, fds)

    # -- bottom half -------------------------------------------------------------------------

    def _data(self, data: bytes, fds: list[int]) -> None:
        """Every byte QEMU sends; nothing raised here may escape into the event loop."""
        self._metrics.upstream_in += len(data)
        try:
            reader = self._reader
            if reader.whole_line(data):  # the common case, without a list of one
                self._line(data)
                return
            # Several messages: their replies and events leave in one send per client.
            self._io.cork()
            try:
                for line, msg in reader.feed(data):
                    if self.lost.done():
                        return
                    if msg is None:
                        self._line(line)
                    else:
                        self._message(line, msg)
            finally:
                self._io.uncork()
        except Desync as exc:
            self._desync(str(exc))
        except Exception as exc:  # a bug or a shape nothing checked: never a half-read buffer
            log.exception(fields("upstream_internal_error", route=self.route, why=repr(exc)))
            self._metrics.internal_error()
            self._desync(f"internal error while reading QEMU's output: {exc!r}")

    def _line(self, line: bytes) -> None:
        """One line of QEMU output, one message."""
        found = success_id(line)
        if found is not None:
            uid, at = found
            waiter = self._pending.pop(uid, None)
            if type(waiter) is Command:  # the hot path: passed on unparsed
                self._on_reply(waiter, splice_success(line, at, waiter.client_id), True)
                return
            if waiter is not None:
                self._pending[uid] = waiter  # one of the proxy's own: _message takes it
        try:
            msg = orjson.loads(line)
        except orjson.JSONDecodeError:
            raise Desync("output that is not one JSON message per line") from None
        if not isinstance(msg, dict):
            raise Desync("a message that is not a JSON object")
        if not line.endswith(b"\r\n"):
            line = line.rstrip(b"\n") + b"\r\n"
        self._message(line, msg)

    def _message(self, line: bytes, msg: dict[str, Any]) -> None:
        uid = msg.get("id")
        waiter = self._pending.pop(uid, None) if type(uid) is int else None
        if type(waiter) is Command:
            assert type(uid) is int
            data = restore_id(line, uid, waiter.client_id, msg, self.dialect.before_6_0)
            self._on_reply(waiter, data, "return" in msg)
            return
        if waiter is not None:
            assert isinstance(waiter, asyncio.Future)
            if not waiter.done():
                waiter.set_result(msg)
            return
        if not self._greeting.done():
            if "QMP" not in msg:
                raise Desync("the first message is not a greeting")
            self.greeting_line = line
            self._greeting.set_result(msg)
            return
        if isinstance(msg.get("event"), str) and "return" not in msg and "error" not in msg:
            self._on_event(line, msg)
            return
        # A reply to an id nobody waits for, or without an id: the proxy never sends QEMU
        # malformed input, so QEMU and the proxy no longer agree on what is in flight.
        raise Desync(f"unmatched message: {line[:200].decode(errors='replace')!r}")

    def _desync(self, why: str) -> None:
        if self.lost.done():
            return
        self._metrics.desync()
        log.error(
            fields("upstream_desync", route=self.route, upstream_id=self.upstream_sid, why=why)
        )
        self._lost(f"desync: {why}")

    def _eof(self) -> None:
        self._lost("QEMU closed the connection")

    def _error(self, exc: OSError) -> None:
        self._lost(f"socket error: {exc}")

    def _lost(self, why: str) -> None:
        if self.lost.done():
            return
        self.lost.set_result(why)
        stream, self._stream = self._stream, None  # nothing is written once QEMU is lost
        if stream is not None:
            stream.close()
        self._set_state(Runstate.DOWN)

    def close(self, why: str = "closed by the proxy") -> None:
        self._lost(why)

    def pending_commands(self) -> list[Command]:
        """Client commands QEMU never answered (on loss)."""
        return [w for w in self._pending.values() if isinstance(w, Command)]


def _returned(reply: dict[str, Any], kind: type, command: str) -> Any:
    """The ``return`` value of a probe command, of the type QEMU documents, or a protocol error."""
    value = reply.get("return")
    if not isinstance(value, kind):
        raise _protocol(f"{command} answered {str(reply)[:200]}")
    return value
