"""The proxy's one QMP session with QEMU for a route (asyncio).

Layered like ``qemu.qmp``: a :class:`Runstate` the rest of the proxy can read, a reader that
turns QEMU's output into messages, and one place (:meth:`Upstream._lost`) where every way of
losing QEMU ends up.  QEMU's monitor takes one client at a time, and a second connection is
accepted by the kernel but never greeted until the first leaves: that wait is the
``awaiting greeting`` state, and the proxy keeps waiting in it rather than reconnecting, which
would lose its place in QEMU's queue.

Replies are matched by the integer ids the proxy assigns; QEMU echoes integers verbatim.  The
proxy's own commands (negotiation, probe, the backport's steps) and client commands share the
id space.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import socket
from collections.abc import Callable
from typing import Any

import orjson

from proxy import qjson, schema
from proxy.address import Address
from proxy.fdsock import Stream
from proxy.framing import Framer, Message
from proxy.logs import fields
from proxy.metrics import RouteMetrics
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

    def __init__(self, message: str, result: str = "error") -> None:
        super().__init__(message)
        self.result = result


class Upstream:
    """One connection to QEMU.  A new instance per connection attempt."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        address: Address,
        route: str,
        on_event: Callable[[bytes, dict[str, Any]], None],
        on_reply: Callable[[Command, bytes, dict[str, Any] | None], None],
        on_state: Callable[[Runstate], None],
        metrics: RouteMetrics,
        probe_lock: asyncio.Lock | None = None,
    ) -> None:
        self._metrics = metrics
        self._probe_lock = probe_lock or asyncio.Lock()
        self._loop = loop
        self.address = address
        self.route = route
        self._on_event = on_event
        self._on_reply = on_reply
        self._on_state = on_state
        self.state = Runstate.DOWN
        self._stream: Stream | None = None
        self._buf = bytearray()
        self._scan = 0
        self._pretty: Framer | None = None  # set when QEMU writes pretty=on, multi-line output
        self._pending: dict[int, Command | asyncio.Future[dict[str, Any]]] = {}
        self._next_id = 0
        self._greeting: asyncio.Future[dict[str, Any]] = loop.create_future()
        self.lost: asyncio.Future[str] = loop.create_future()
        self.greeting: dict[str, Any] = {}
        self.greeting_line = b""
        self.oob = False
        self.schema = schema.Schema()
        self.upstream_sid = 0
        self.identity: dict[str, Any] = {}
        self._pid: int | None = None  # QEMU's pid, from SO_PEERCRED on unix sockets

    def _set_state(self, state: Runstate) -> None:
        self.state = state
        self._on_state(state)

    async def connect(self) -> None:
        """Connect, take the greeting, negotiate (with oob if offered) and probe the schema."""
        self._set_state(Runstate.CONNECTING)
        if self.address.kind == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            target: Any = self.address.path
        else:
            infos = await self._loop.getaddrinfo(
                self.address.host, self.address.port, type=socket.SOCK_STREAM
            )
            family, _, _, _, target = infos[0]
            sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await self._loop.sock_connect(sock, target)
        except OSError as exc:
            sock.close()
            result = (
                "refused"
                if isinstance(exc, ConnectionRefusedError | FileNotFoundError)
                else "error"
            )
            self._set_state(Runstate.DOWN)
            raise UpstreamError(f"connect {self.address}: {exc.strerror or exc}", result) from exc
        if sock.family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        else:
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
            self._pid = int.from_bytes(creds[:4], "little")
        # QEMU never passes descriptors on QMP: read with plain recv().
        self._stream = Stream(self._loop, sock, self._data, self._eof, self._error, False)
        self._stream.resume_reading()
        self._set_state(Runstate.AWAITING_GREETING)
        try:
            greeting = await self._wait(self._greeting)
        except UpstreamError as exc:
            raise UpstreamError(str(exc), "no_greeting") from None
        self.greeting = greeting
        offered = greeting["QMP"].get("capabilities", [])
        self._set_state(Runstate.NEGOTIATING)
        self.oob = "oob" in offered
        enable = {"enable": ["oob"]} if self.oob else {}
        reply = await self.call("qmp_capabilities", enable or None)
        if "return" not in reply:
            raise UpstreamError(f"negotiation refused: {reply.get('error')}")
        # One route at a time: a 236 KB schema is ~1.5 MB of Python objects while it is parsed,
        # and memory the allocator once gave out stays with the process.
        async with self._probe_lock:
            self.schema = schema.parse((await self.call("query-qmp-schema")).get("return"))
        name = (await self.call("query-name")).get("return", {}).get("name")
        uuid = (await self.call("query-uuid")).get("return", {}).get("UUID")
        self.identity = {"version": self.version, "name": name, "uuid": uuid, "pid": self._pid}
        log.debug(fields("upstream_probed", route=self.route, commands=len(self.schema.commands),
                         events=len(self.schema.events), oob=self.oob, pid=self._pid,
                         native=",".join(c for c in schema.MIGRATE_COMMANDS
                                         if self.schema.native(c)) or None))  # fmt: skip

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

    @property
    def version(self) -> dict[str, Any]:
        version: dict[str, Any] = self.greeting.get("QMP", {}).get("version", {})
        return version

    async def call(self, command: str, arguments: dict[str, Any] | None = None) -> dict[str, Any]:
        """Run one of the proxy's own commands and return QEMU's reply message."""
        uid = self._next_id = self._next_id + 1
        msg: dict[str, Any] = {"execute": command}
        if arguments is not None:
            msg["arguments"] = arguments
        future: asyncio.Future[dict[str, Any]] = self._loop.create_future()
        self._pending[uid] = future
        # QEMU's own writer: client values (big numbers, any string) reach QEMU as it reads them.
        self._write(qjson.dumps(msg)[:-1] + b', "id": %d}' % uid, [])
        return await self._wait(future)

    def send(self, cmd: Command) -> None:
        """Send a client command; its reply comes back through ``on_reply``."""
        uid = self._next_id = self._next_id + 1
        self._pending[uid] = cmd
        self._write(cmd.wire(uid), cmd.fds)
        cmd.fds = []  # the stream closes them once they are sent

    def _write(self, data: bytes, fds: list[int]) -> None:
        stream = self._stream
        if stream is None or self.lost.done():
            raise UpstreamError("QEMU connection is closed")
        self._metrics.upstream_out += len(data)
        stream.write(data, fds)

    # -- bottom half -------------------------------------------------------------------------

    def _data(self, data: bytes, fds: list[int]) -> None:
        self._metrics.upstream_in += len(data)
        if self._pretty is not None:
            self._feed_pretty(data)
            return
        if not self._buf and data.find(b"\n") == len(data) - 1:
            self._line(data)  # the common case, exactly one whole line: no copying
            return
        buf = self._buf
        buf += data
        start = 0
        while True:
            end = buf.find(b"\n", self._scan)
            if end < 0:
                self._scan = len(buf)
                break
            line = bytes(buf[start : end + 1])
            start = end + 1
            self._scan = start
            if not self._line(line):
                rest = bytes(buf[start:])
                del buf[:]
                self._scan = 0
                self._feed_pretty(rest)
                return
        if start:
            del buf[:start]
            self._scan -= start

    def _line(self, line: bytes) -> bool:
        """One line of QEMU output; False if it is not a whole message (pretty=on output)."""
        if line.startswith(b'{"return": ') and self._returned(line):
            return True
        try:
            msg = orjson.loads(line)
        except orjson.JSONDecodeError:
            # pretty=on: messages span lines.  From here on, frame by QEMU's own rules.
            self._pretty = Framer(max_message=1 << 30)
            self._feed_pretty(line)
            return False
        if not line.endswith(b"\r\n"):
            line = line.rstrip(b"\n") + b"\r\n"
        self._message(line, msg)
        return True

    def _returned(self, line: bytes) -> bool:
        """Hand on a ``{"return": ..., "id": N}`` line answering a client command, unparsed.

        QEMU writes a success reply's members as ``return`` then ``id`` (QDict order), so the
        line's last member is the top-level id: the client gets its reply spliced without the
        payload (up to hundreds of KB) ever being decoded.
        """
        at = line.rfind(b', "id": ')
        uid = line[at + 8 : -3]
        if at < 0 or not uid.isdigit() or not line.endswith(b"}\r\n"):
            return False
        waiter = self._pending.get(int(uid))
        if type(waiter) is not Command:
            return False
        del self._pending[waiter.upstream_id]
        self._on_reply(waiter, line, None)
        return True

    def _feed_pretty(self, data: bytes) -> None:
        assert self._pretty is not None
        for item in self._pretty.feed(data):
            if isinstance(item, Message) and isinstance(item.value, dict):
                self._message(qjson.dumps(item.value) + b"\r\n", item.value)
            else:
                log.error(fields("upstream_garbage", route=self.route, item=repr(item)[:200]))

    def _message(self, line: bytes, msg: dict[str, Any]) -> None:
        uid = msg.get("id")
        waiter = self._pending.pop(uid, None) if type(uid) is int else None
        if type(waiter) is Command:
            self._on_reply(waiter, line, msg)  # the hot path: a reply to a client's command
            return
        if "event" in msg:
            self._on_event(line, msg)
            return
        if "QMP" in msg and not self._greeting.done():
            self.greeting_line = line
            self._greeting.set_result(msg)
            return
        if waiter is None:
            # QEMU answers without our id only if we sent it malformed input: a proxy bug.
            log.error(
                fields(
                    "upstream_unmatched", route=self.route, line=line[:300].decode(errors="replace")
                )
            )
            return
        assert isinstance(waiter, asyncio.Future)
        if not waiter.done():
            waiter.set_result(msg)

    def _eof(self) -> None:
        self._lost("QEMU closed the connection")

    def _error(self, exc: OSError) -> None:
        self._lost(f"socket error: {exc}")

    def _lost(self, why: str) -> None:
        if self.lost.done():
            return
        self.lost.set_result(why)
        if self._stream is not None:
            self._stream.close()
        self._set_state(Runstate.DOWN)

    def close(self, why: str = "closed by the proxy") -> None:
        self._lost(why)

    def pending_commands(self) -> list[Command]:
        """Client commands QEMU never answered (on loss)."""
        return [w for w in self._pending.values() if isinstance(w, Command)]
