"""A scriptable fake QEMU QMP server, for fault injection and exact-ordering checks.

Real QEMU (``tests/qemu.py``) is the proof that the proxy is indistinguishable from QEMU; this
fake is for what real QEMU cannot be made to do on demand: stall one command while answering
``exec-oob`` at once, die half-way through a reply, flood events, or count how many in-band
commands the proxy has in flight at one moment.  A test that passes only against the fake proves
the proxy handles the scripted situation, not that it matches QEMU.

It speaks QMP the way QEMU's monitor does, in the parts the proxy relies on:

* one client at a time (by default): while a client is connected the listener is not accepted
  from, so a second ``connect()`` succeeds in the kernel backlog but gets no greeting until the
  first client leaves (``chardev/char-socket.c``);
* a greeting, then negotiation mode where only ``qmp_capabilities`` works, with QEMU's error
  texts; no events to a client that has not negotiated;
* input framed as a JSON stream by :class:`proxy.framing.Framer` (clients send no newline);
* in-band requests (and parse errors) answered strictly one after another, in order;
  ``exec-oob`` requests, when the client enabled ``oob``, answered at once even while an
  in-band command is stalled (``monitor/qmp.c: handle_qmp_command``);
* output as QEMU writes it: one message per line, ``": "`` and ``", "`` separators, ASCII,
  ``\\r\\n`` line ends, ``{"return": ..., "id": ...}`` and ``{"id": ..., "error": {...}}``;
* descriptors passed with SCM_RIGHTS kept as QEMU's socket chardev keeps them (the latest batch,
  an older one closed) until ``getfd`` / ``add-fd`` takes one.

Unlike QEMU it never stops reading a client (QEMU suspends a monitor once 8 requests are
queued): :attr:`FakeQemu.max_inband_pending` then shows exactly how many in-band commands the
proxy had outstanding, which is what the proxy's window of 7 must bound.

Scripting: every command goes to a handler (``fake.on(name, handler)``), sync or async, which
returns a JSON value (the ``return``) or one of :class:`Return`, :class:`Error`, :class:`Kill`.
Those can delay the reply, emit events before or after it, or kill the connection (abruptly, or
after half a reply line).  ``fake.stall(name)`` holds a command until the test releases it.

Usage from pytest-asyncio::

    async with FakeQemu(path) as fake:
        ...
        await fake.wait_until(lambda: len(fake.commands()) >= 3)

or as a process: ``python -m tests.fakeqemu /tmp/fake.sock``.

``tcp_host="127.0.0.1"`` serves on a TCP port the kernel picks instead (:attr:`FakeQemu.address`
names it, as ``tcp:HOST:PORT``); ``pretty=True`` writes every message as QEMU's ``pretty=on``
monitor does; :attr:`FakeQemu.greeting_override` gives chosen connections a greeting of the
test's own bytes (a QEMU that is broken, or not QEMU at all).
"""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import copy
import inspect
import json
import os
import socket
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final, Self, TypeAlias

from proxy.framing import Framer, Message, ParseError

DEFAULT_VERSION: Final[dict[str, Any]] = {
    "qemu": {"micro": 2, "minor": 0, "major": 10},
    "package": "fake",
}
CRLF: Final = b"\r\n"
GENERIC_ERROR: Final = "GenericError"
COMMAND_NOT_FOUND: Final = "CommandNotFound"
NEGOTIATION_REQUIRED: Final = "Expecting capabilities negotiation with 'qmp_capabilities'"
NO_FD: Final = "No file descriptor supplied via SCM_RIGHTS"

# A small MigrationCapability set, in QEMU's enum order (qapi/migration.json).
MIGRATION_CAPABILITIES: Final = (
    "xbzrle",
    "auto-converge",
    "events",
    "postcopy-ram",
    "pause-before-switchover",
    "multifd",
)

_READ_SIZE: Final = 256 * 1024
_MAX_FDS: Final = 253  # SCM_MAX_FD
_CMSG_SPACE: Final = socket.CMSG_SPACE(_MAX_FDS * array.array("i").itemsize)


def encode(message: object) -> bytes:
    """One message as QEMU writes it with ``pretty=off``: ASCII, ``": "``/``", "``, CRLF.

    Key order is the dict's insertion order, so callers build dicts in QEMU's order.
    """
    return json.dumps(message, ensure_ascii=True).encode("ascii") + CRLF


def encode_pretty(message: object) -> bytes:
    """One message as QEMU writes it with ``pretty=on``: indented by 4, one member per line.

    QEMU's monitor turns every ``\\n`` it writes into ``\\r\\n``, the ones inside the message too.
    """
    text = json.dumps(message, ensure_ascii=True, indent=4) + "\n"
    return text.replace("\n", "\r\n").encode("ascii")


# -- scripting vocabulary -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Event:
    """An event to emit: ``{"timestamp": ..., "event": name, "data": data}`` (no data: omitted)."""

    name: str
    data: Any = None


@dataclass(frozen=True, slots=True)
class Return:
    """Answer with ``{"return": value}`` after ``delay`` seconds.

    ``close_after`` closes the connection once the reply is written (what ``quit`` looks like).
    """

    value: Any = field(default_factory=dict)
    delay: float = 0.0
    events_before: Sequence[Event] = ()
    events_after: Sequence[Event] = ()
    close_after: bool = False


@dataclass(frozen=True, slots=True)
class Error:
    """Answer with ``{"error": {"class": cls, "desc": desc}}`` after ``delay`` seconds."""

    desc: str
    cls: str = GENERIC_ERROR
    delay: float = 0.0
    events_before: Sequence[Event] = ()
    events_after: Sequence[Event] = ()


@dataclass(frozen=True, slots=True)
class Kill:
    """Do not answer: close the connection, as a crashing QEMU would.

    ``half_line`` first writes the first half of what the reply would have been (no line end),
    so the client sees a message cut off mid-line, then closes.
    """

    half_line: bool = False
    delay: float = 0.0
    events_before: Sequence[Event] = ()


Outcome: TypeAlias = Return | Error | Kill | Any
Handler: TypeAlias = Callable[["Call"], "Outcome | Awaitable[Outcome]"]


class Received(dict[str, Any]):
    """One message the fake read: the parsed object, plus where and how it arrived.

    A ``dict`` so tests can write ``msg["execute"]``; the extra attributes say which connection
    (1-based, in accept order) it came on, its exact bytes, whether it took the out-of-band
    path, and the descriptors that arrived in the same ``recvmsg`` (on the last message that
    read completed).
    """

    __slots__ = ("at", "conn", "fds", "oob", "raw")

    def __init__(self, value: dict[str, Any], conn: int, raw: bytes, oob: bool) -> None:
        super().__init__(value)
        self.conn = conn
        self.raw = raw
        self.oob = oob
        self.fds: list[int] = []
        self.at = time.monotonic()

    @property
    def name(self) -> str | None:
        """The command name, ``execute`` or ``exec-oob``, if it is a string."""
        name = self.get("execute", self.get("exec-oob"))
        return name if isinstance(name, str) else None


@dataclass(slots=True)
class Call:
    """What a handler gets: the command, its connection and the fake (for state and events)."""

    fake: FakeQemu
    conn: Connection
    name: str
    arguments: dict[str, Any]
    msg: Received
    oob: bool

    def emit(self, name: str, data: Any = None) -> int:
        return self.fake.emit(name, data)


# -- schema ---------------------------------------------------------------------------------------


class SchemaBuilder:
    """Builds ``query-qmp-schema`` entries with numeric type names, as QEMU masks them.

    QEMU names every non-builtin type by a number that changes with each build
    (``scripts/qapi/introspect.py``), so the proxy must resolve ``arg-type`` afresh; ``first``
    lets a test shift the numbering to prove that nothing depends on particular numbers.
    """

    def __init__(self, first: int = 0) -> None:
        self.entries: list[dict[str, Any]] = []
        self._next = first
        self.empty = self.object([])
        for name, json_type in (
            ("str", "string"),
            ("int", "int"),
            ("bool", "boolean"),
            ("any", "value"),
        ):
            self.entries.append({"name": name, "meta-type": "builtin", "json-type": json_type})

    def _name(self) -> str:
        name = str(self._next)
        self._next += 1
        return name

    def object(self, members: Iterable[dict[str, Any]]) -> str:
        name = self._name()
        self.entries.append({"name": name, "meta-type": "object", "members": list(members)})
        return name

    def enum(self, values: Iterable[str]) -> str:
        name = self._name()
        values = list(values)
        self.entries.append(
            {
                "name": name,
                "meta-type": "enum",
                "members": [{"name": v} for v in values],
                "values": values,
            }
        )
        return name

    def array(self, element: str) -> str:
        name = f"[{element}]"
        self.entries.append({"name": name, "meta-type": "array", "element-type": element})
        return name

    def command(
        self, name: str, arg_type: str | None = None, ret_type: str | None = None, oob: bool = False
    ) -> None:
        entry: dict[str, Any] = {
            "name": name,
            "meta-type": "command",
            "arg-type": arg_type or self.empty,
            "ret-type": ret_type or self.empty,
        }
        if oob:
            entry["allow-oob"] = True
        self.entries.append(entry)

    def event(self, name: str, arg_type: str | None = None) -> None:
        self.entries.append(
            {"name": name, "meta-type": "event", "arg-type": arg_type or self.empty}
        )


def optional(name: str, type_: str) -> dict[str, Any]:
    """An optional member, as introspection shows it (``"default": null``)."""
    return {"name": name, "default": None, "type": type_}


def required(name: str, type_: str) -> dict[str, Any]:
    return {"name": name, "type": type_}


def default_schema(migrate_capabilities: bool = False, first: int = 0) -> list[dict[str, Any]]:
    """A minimal schema with the commands the proxy and its tests touch.

    ``migrate_capabilities`` gives ``migrate`` and ``migrate-incoming`` the proposed optional
    ``capabilities`` member (a QEMU with the patch, ``mode=native``); without it they look like
    QEMU 10.0's (``mode=split``).
    """
    b = SchemaBuilder(first)
    cap_enum = b.enum(MIGRATION_CAPABILITIES)
    cap_status = b.object([required("capability", cap_enum), required("state", "bool")])
    cap_list = b.array(cap_status)

    qmp_cap = b.enum(["oob"])
    b.command("qmp_capabilities", b.object([optional("enable", b.array(qmp_cap))]))

    run_state = b.enum(["prelaunch", "running", "paused", "inmigrate", "postmigrate", "shutdown"])
    status = b.object([required("status", run_state), required("running", "bool")])
    b.command("query-status", ret_type=status)

    triple = b.object([required(n, "int") for n in ("micro", "minor", "major")])
    b.command(
        "query-version",
        ret_type=b.object([required("qemu", triple), required("package", "str")]),
    )
    b.command("query-qmp-schema", ret_type=b.array(b.object([required("name", "str")])))
    b.command("query-name", ret_type=b.object([optional("name", "str")]))
    b.command("query-uuid", ret_type=b.object([required("UUID", "str")]))

    channel = b.object([required("channel-type", b.enum(["main", "cpr"])), required("addr", "any")])
    channels = b.array(channel)
    caps_member = [optional("capabilities", cap_list)] if migrate_capabilities else []
    migrate_args = [
        optional("uri", "str"),
        optional("channels", channels),
        optional("detach", "bool"),
        optional("resume", "bool"),
        *caps_member,
    ]
    b.command("migrate", b.object(migrate_args))
    incoming_args = [
        optional("uri", "str"),
        optional("channels", channels),
        optional("exit-on-error", "bool"),
        *caps_member,
    ]
    b.command("migrate-incoming", b.object(incoming_args))
    b.command("migrate-set-capabilities", b.object([required("capabilities", cap_list)]))
    b.command("query-migrate-capabilities", ret_type=cap_list)
    b.command("query-migrate", ret_type=b.object([optional("status", "str")]))
    b.command("migrate-pause", oob=True)
    yank_instance = b.object([required("type", b.enum(["block-node", "chardev", "migration"]))])
    b.command("yank", b.object([required("instances", b.array(yank_instance))]), oob=True)
    b.command("getfd", b.object([required("fdname", "str")]))
    b.command(
        "add-fd",
        b.object([optional("fdset-id", "int"), optional("opaque", "str")]),
        b.object([required("fdset-id", "int"), required("fd", "int")]),
    )
    b.command("quit")

    b.event("SHUTDOWN", b.object([required("guest", "bool"), required("reason", "str")]))
    b.event("STOP")
    b.event("RESUME")
    b.event("MIGRATION", b.object([required("status", "str")]))
    return b.entries


def arg_members(schema: list[dict[str, Any]], command: str) -> list[str] | None:
    """The argument member names of ``command`` by resolving its ``arg-type`` (None: no such)."""
    by_name = {e["name"]: e for e in schema}
    entry = by_name.get(command)
    if entry is None or entry.get("meta-type") != "command":
        return None
    arg_type = by_name.get(entry.get("arg-type", ""), {})
    return [m["name"] for m in arg_type.get("members", [])]


# -- the server -----------------------------------------------------------------------------------


class Connection:
    """One accepted client: its socket, negotiation state and in-band queue."""

    def __init__(self, fake: FakeQemu, sock: socket.socket, number: int) -> None:
        self.fake = fake
        self.number = number
        self.sock = sock
        self.negotiated = False
        self.oob = False
        self.closed = False
        self.done: asyncio.Future[None] = fake.loop.create_future()
        self.pending_fds: list[int] = []  # the chardev's latest batch, until a command takes it
        self._framer = Framer(max_message=1 << 30)
        self._inband: asyncio.Queue[Received | bytes] = asyncio.Queue()
        self._out = bytearray()
        self._writing = False
        self._close_when_flushed = False
        self._tasks: set[asyncio.Task[None]] = set()
        sock.setblocking(False)

    @property
    def unsent(self) -> int:
        """Bytes written but not yet taken by the peer (the kernel buffer was full)."""
        return len(self._out)

    def start(self) -> None:
        self.write(self.fake.greeting_for(self.number))
        self._spawn(self._inband_loop())
        self.fake.loop.add_reader(self.sock.fileno(), self._readable)

    def _spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- input --

    def _readable(self) -> None:
        try:
            data, ancdata, _, _ = self.sock.recvmsg(_READ_SIZE, _CMSG_SPACE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close()
            return
        fds: list[int] = []
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                arr = array.array("i")
                arr.frombytes(payload[: len(payload) - len(payload) % arr.itemsize])
                fds.extend(arr)
        if fds:
            # QEMU's socket chardev keeps only the latest batch; a newer one closes the older.
            _close_fds(self.pending_fds)
            self.pending_fds = fds
            self.fake.fd_batches.append((self.number, list(fds)))
        if not data:
            self.close()
            return
        last: Received | None = None
        for item in self._framer.feed(data):
            if isinstance(item, ParseError):
                self.fake.parse_errors.append(item.desc)
                error = {"class": GENERIC_ERROR, "desc": item.desc}
                self._queue_inband(self.fake.encode({"error": error}))
            else:
                last = self._message(item) or last
        if fds and last is not None:
            last.fds = list(fds)
        self.fake._changed()

    def _message(self, item: Message) -> Received | None:
        value = item.value
        if not isinstance(value, dict):
            self.fake.parse_errors.append("QMP input must be a JSON object")
            error = {"class": GENERIC_ERROR, "desc": "QMP input must be a JSON object"}
            self._queue_inband(self.fake.encode({"error": error}))
            return None
        # qmp_is_oob(): such requests skip the queue even when the client did not enable oob.
        oob = "exec-oob" in value and "execute" not in value
        msg = Received(value, self.number, item.raw, oob)
        self.fake.received.append(msg)
        if oob:
            self._spawn(self._dispatch(msg))
        else:
            self._queue_inband(msg)
        return msg

    def _queue_inband(self, item: Received | bytes) -> None:
        self.fake.inband_pending += 1
        self.fake.max_inband_pending = max(self.fake.max_inband_pending, self.fake.inband_pending)
        self._inband.put_nowait(item)

    async def _inband_loop(self) -> None:
        """QEMU's dispatcher: one in-band request at a time, in the order they were read."""
        while not self.closed:
            item = await self._inband.get()
            try:
                if isinstance(item, bytes):
                    self.write(item)
                else:
                    if self.fake.inband_delay:
                        await asyncio.sleep(self.fake.inband_delay)
                    await self._dispatch(item)
            finally:
                self.fake.inband_pending -= 1
                self.fake._changed()

    async def _dispatch(self, msg: Received) -> None:
        outcome = await self.fake._run(self, msg)
        if self.closed:
            return
        if isinstance(outcome, Kill):
            if outcome.delay:
                await asyncio.sleep(outcome.delay)
            for event in outcome.events_before:
                self.fake._emit_to(self, event)
            if outcome.half_line:
                line = self.fake.encode(_reply_body({}, msg))
                self.write(line[: len(line) // 2])
                self.close_after_flush()
            else:
                self.close()
            return
        if outcome.delay:
            await asyncio.sleep(outcome.delay)
            if self.is_closed():  # killed meanwhile
                return
        for event in outcome.events_before:
            self.fake._emit_to(self, event)
        if isinstance(outcome, Error):
            self.write(self.fake.encode(_error_body(outcome.desc, outcome.cls, msg)))
        else:
            self.write(self.fake.encode(_reply_body(outcome.value, msg)))
        for event in outcome.events_after:
            self.fake._emit_to(self, event)
        if isinstance(outcome, Return) and outcome.close_after:
            self.close_after_flush()

    # -- output --

    def write(self, data: bytes) -> None:
        if self.closed or self._close_when_flushed:
            return
        self._out += data
        if not self._writing:
            self._flush()

    def _flush(self) -> None:
        while self._out:
            try:
                sent = self.sock.send(self._out)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self.close()
                return
            del self._out[:sent]
        if self._out and not self._writing:
            self._writing = True
            self.fake.loop.add_writer(self.sock.fileno(), self._flush)
        elif not self._out and self._writing:
            self._writing = False
            self.fake.loop.remove_writer(self.sock.fileno())
        if not self._out and self._close_when_flushed:
            self.close()

    def close_after_flush(self) -> None:
        self._close_when_flushed = True
        if not self._out:
            self.close()

    def close(self) -> None:
        """Drop the connection at once (unwritten output is lost), as a dying QEMU would."""
        if self.closed:
            return
        self.closed = True
        loop = self.fake.loop
        loop.remove_reader(self.sock.fileno())
        if self._writing:
            loop.remove_writer(self.sock.fileno())
        self.sock.close()
        _close_fds(self.pending_fds)
        self.pending_fds = []
        current = asyncio.current_task()
        for task in list(self._tasks):
            if task is not current:
                task.cancel()
        if not self.done.done():
            self.done.set_result(None)
        self.fake._changed()

    def is_closed(self) -> bool:
        return self.closed

    def take_fd(self) -> int | None:
        """qemu_chr_fe_get_msgfd(): the first descriptor of the batch; the rest are closed."""
        if not self.pending_fds:
            return None
        fd, rest = self.pending_fds[0], self.pending_fds[1:]
        _close_fds(rest)
        self.pending_fds = []
        return fd


def _reply_body(value: Any, msg: dict[str, Any]) -> dict[str, Any]:
    body: dict[str, Any] = {"return": value}
    if "id" in msg:
        body["id"] = msg["id"]
    return body


def _error_body(desc: str, cls: str, msg: dict[str, Any] | None) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if msg is not None and "id" in msg:
        body["id"] = msg["id"]
    body["error"] = {"class": cls, "desc": desc}
    return body


def _close_fds(fds: Iterable[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


class FakeQemu:
    """A fake QEMU monitor on a unix socket.  See the module docstring for what it mimics.

    ``one_client=False`` serves every connection at once (no QEMU does that; useful only to
    test the proxy against a server that would let it connect twice).  ``tcp_host`` listens on
    that host and a port the kernel picks (``path`` is then unused): a ``-qmp tcp:...`` QEMU.
    ``pretty`` writes every message as a ``pretty=on`` monitor does, on several lines.
    """

    def __init__(
        self,
        path: str,
        *,
        version: dict[str, Any] | None = None,
        capabilities: Sequence[str] = ("oob",),
        schema: list[dict[str, Any]] | None = None,
        one_client: bool = True,
        status: str = "prelaunch",
        name: str | None = None,
        uuid: str = "00000000-0000-0000-0000-000000000000",
        validate_arguments: bool = True,
        tcp_host: str | None = None,
        pretty: bool = False,
    ) -> None:
        self.path = path
        self.tcp_host = tcp_host
        self.port = 0  # the TCP port, once started with tcp_host
        self.pretty = pretty
        # Connection number (1-based) -> the bytes to greet it with instead of the greeting;
        # None from it: the normal greeting.  For a QEMU whose greeting is malformed.
        self.greeting_override: Callable[[int], bytes | None] | None = None
        self.version = copy.deepcopy(version if version is not None else DEFAULT_VERSION)
        self.capabilities = list(capabilities)
        self.schema = schema if schema is not None else default_schema()
        self.one_client = one_client
        self.validate_arguments = validate_arguments
        self._loop: asyncio.AbstractEventLoop | None = None

        # What happened, for assertions.
        self.received: list[Received] = []
        self.parse_errors: list[str] = []
        self.fd_batches: list[tuple[int, list[int]]] = []
        self.connections: dict[int, Connection] = {}
        self.connection_count = 0
        self.inband_pending = 0
        self.max_inband_pending = 0
        # Seconds every in-band command takes before its handler runs (a busy main loop).
        self.inband_delay = 0.0

        # Emulated VM state the default handlers keep.
        self.status = status
        self.name = name  # -name
        self.uuid = uuid  # -uuid (all zeros when not given, as in QEMU)
        self.migration_caps = dict.fromkeys(MIGRATION_CAPABILITIES, False)
        self.migration_status: str | None = None
        self.incoming_started = False
        self.named_fds: dict[str, int] = {}
        self.fdsets: dict[int, list[int]] = {}

        self.handlers: dict[str, Handler] = {
            "qmp_capabilities": self._qmp_capabilities,
            "query-status": self._query_status,
            "query-version": lambda call: copy.deepcopy(self.version),
            "query-qmp-schema": lambda call: self.schema,
            "query-name": lambda call: {} if self.name is None else {"name": self.name},
            "query-uuid": lambda call: {"UUID": self.uuid},
            "migrate": self._migrate,
            "migrate-incoming": self._migrate_incoming,
            "migrate-set-capabilities": self._migrate_set_capabilities,
            "query-migrate-capabilities": self._query_migrate_capabilities,
            "query-migrate": self._query_migrate,
            "migrate-pause": self._migrate_pause,
            "yank": lambda call: {},
            "getfd": self._getfd,
            "add-fd": self._add_fd,
            "quit": self._quit,
        }

        self._listener: socket.socket | None = None
        self._serve_task: asyncio.Task[None] | None = None
        self._change = asyncio.Event()

    # -- lifecycle --

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError("fake QEMU is not started")
        return self._loop

    @property
    def address(self) -> str:
        """The address a proxy's ``--upstream`` names: ``unix:PATH`` or ``tcp:HOST:PORT``."""
        if self.tcp_host is not None:
            return f"tcp:{self.tcp_host}:{self.port}"
        return f"unix:{self.path}"

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self.tcp_host is not None:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.tcp_host, 0))
            self.port = sock.getsockname()[1]
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(self.path)
        sock.listen(16)
        sock.setblocking(False)
        self._listener = sock
        self._serve_task = self.loop.create_task(self._serve(), name="fakeqemu-accept")

    async def stop(self) -> None:
        if self._serve_task is not None:
            self._serve_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._serve_task
        for conn in list(self.connections.values()):
            conn.close()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            if self.tcp_host is None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
        _close_fds(self.named_fds.values())
        self.named_fds.clear()
        _close_fds(fd for fds in self.fdsets.values() for fd in fds)
        self.fdsets.clear()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def _serve(self) -> None:
        assert self._listener is not None
        while True:
            sock, _ = await self.loop.sock_accept(self._listener)
            self.connection_count += 1
            conn = Connection(self, sock, self.connection_count)
            self.connections[conn.number] = conn
            conn.done.add_done_callback(self._forget(conn.number))
            conn.start()
            self._changed()
            if self.one_client:
                # QEMU takes its listener out of the poll set while a client is connected.
                await conn.done

    def _forget(self, number: int) -> Callable[[asyncio.Future[None]], None]:
        def forget(_: asyncio.Future[None]) -> None:
            self.connections.pop(number, None)

        return forget

    # -- scripting --

    def on(self, name: str, handler: Handler) -> Handler | None:
        """Install ``handler`` for ``name``; returns the one it replaces (to wrap it)."""
        old = self.handlers.get(name)
        self.handlers[name] = handler
        return old

    def stall(self, name: str) -> asyncio.Event:
        """Hold every ``name`` command until the returned event is set, then run it as before."""
        gate = asyncio.Event()
        inner = self.handlers.get(name)

        async def stalled(call: Call) -> Outcome:
            await gate.wait()
            if inner is None:
                return {}
            result = inner(call)
            return await result if inspect.isawaitable(result) else result

        self.on(name, stalled)
        return gate

    def encode(self, message: object) -> bytes:
        """One message as this monitor writes it (``pretty=on`` or not)."""
        return encode_pretty(message) if self.pretty else encode(message)

    def greeting_line(self) -> bytes:
        return self.encode({"QMP": {"version": self.version, "capabilities": self.capabilities}})

    def greeting_for(self, number: int) -> bytes:
        """What connection ``number`` is greeted with: the override's bytes, if it has some."""
        if self.greeting_override is not None:
            raw = self.greeting_override(number)
            if raw is not None:
                return raw
        return self.greeting_line()

    def emit(self, name: str, data: Any = None) -> int:
        """Send an event to every negotiated client now; returns how many got it.

        Like QEMU, a client still in negotiation mode gets nothing.
        """
        sent = 0
        for conn in list(self.connections.values()):
            if self._emit_to(conn, Event(name, data)):
                sent += 1
        return sent

    def _emit_to(self, conn: Connection, event: Event) -> bool:
        if conn.closed or not conn.negotiated:
            return False
        now = time.time()
        message: dict[str, Any] = {
            "timestamp": {"seconds": int(now), "microseconds": int(now * 1e6) % 1_000_000},
            "event": event.name,
        }
        if event.data is not None:
            message["data"] = event.data
        conn.write(self.encode(message))
        return True

    def kill(self, half_line: bytes | None = None) -> None:
        """Drop every connection now; with ``half_line``, write those bytes first."""
        for conn in list(self.connections.values()):
            if half_line is not None:
                conn.write(half_line)
                conn.close_after_flush()
            else:
                conn.close()

    def reset_counters(self) -> None:
        self.max_inband_pending = self.inband_pending

    def commands(self, conn: int | None = None) -> list[str]:
        """Names of the commands received so far (on one connection, if given), in order."""
        return [m.name or "" for m in self.received if conn is None or m.conn == conn]

    @property
    def current(self) -> Connection | None:
        """The connection being served (the newest one, when several are)."""
        return self.connections[max(self.connections)] if self.connections else None

    def _changed(self) -> None:
        self._change.set()
        self._change = asyncio.Event()

    async def wait_until(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        """Wait until ``predicate()`` holds, re-checked whenever the fake's state changes."""
        deadline = self.loop.time() + timeout
        while not predicate():
            remaining = deadline - self.loop.time()
            if remaining <= 0:
                raise TimeoutError("fake QEMU: condition not reached in time")
            change = self._change
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(change.wait(), min(remaining, 0.05))

    # -- dispatch --

    async def _run(self, conn: Connection, msg: Received) -> Return | Error | Kill:
        """qmp_dispatch(): top-level checks, command lookup, arguments, then the handler."""
        allow_oob = conn.oob
        exec_key: str | None = None
        for key, value in msg.items():
            if key == "execute" or (key == "exec-oob" and allow_oob):
                if not isinstance(value, str):
                    return Error(f"QMP input member '{key}' must be a string")
                if exec_key is not None:
                    return Error(f"QMP input member '{key}' clashes with '{exec_key}'")
                exec_key = key
            elif key == "arguments":
                if not isinstance(value, dict):
                    return Error("QMP input member 'arguments' must be an object")
            elif key != "id":
                return Error(f"QMP input member '{key}' is unexpected")
        if exec_key is None:
            return Error("QMP input lacks member 'execute'")
        name: str = msg[exec_key]
        oob = exec_key == "exec-oob"
        arguments: dict[str, Any] = msg.get("arguments", {})
        if not conn.negotiated and name != "qmp_capabilities":
            return Error(NEGOTIATION_REQUIRED, COMMAND_NOT_FOUND)
        if conn.negotiated and name == "qmp_capabilities":
            return Error(
                "Capabilities negotiation is already complete, command ignored", COMMAND_NOT_FOUND
            )
        entry = self._schema_command(name)
        handler = self.handlers.get(name)
        if handler is None and entry is None:
            return Error(f"The command {name} has not been found", COMMAND_NOT_FOUND)
        if oob and not (entry or {}).get("allow-oob", False):
            return Error(f"The command {name} does not support OOB")
        if self.validate_arguments and entry is not None:
            problem = self._check_arguments(entry, arguments)
            if problem is not None:
                return Error(problem)
        if handler is None:
            return Return({})
        result = handler(Call(self, conn, name, arguments, msg, oob))
        if inspect.isawaitable(result):
            result = await result
        if isinstance(result, Return | Error | Kill):
            return result
        return Return({} if result is None else result)

    def _schema_command(self, name: str) -> dict[str, Any] | None:
        for entry in self.schema:
            if entry.get("name") == name and entry.get("meta-type") == "command":
                return entry
        return None

    def _check_arguments(self, entry: dict[str, Any], arguments: dict[str, Any]) -> str | None:
        """The input visitor's top-level checks: required members first, then unexpected ones."""
        members: list[dict[str, Any]] = []
        for candidate in self.schema:
            if candidate.get("name") == entry.get("arg-type"):
                members = candidate.get("members", [])
                break
        names = {m["name"] for m in members}
        for member in members:
            if "default" not in member and member["name"] not in arguments:
                return f"Parameter '{member['name']}' is missing"
        for key in arguments:
            if key not in names:
                return f"Parameter '{key}' is unexpected"
        return None

    # -- default handlers --

    def _qmp_capabilities(self, call: Call) -> Outcome:
        enable = call.arguments.get("enable", [])
        if not isinstance(enable, list):
            return Error("Invalid parameter type for 'enable', expected: array")
        for index, name in enumerate(enable):
            if not isinstance(name, str):
                return Error(f"Invalid parameter type for 'enable[{index}]', expected: string")
            if name != "oob":
                return Error(f"Parameter 'null' does not accept value '{name}'")
        missing = [name for name in enable if name not in self.capabilities]
        if missing:
            return Error(f"Capability {', '.join(missing)} not available")
        call.conn.negotiated = True
        call.conn.oob = "oob" in enable
        return Return({})

    def _query_status(self, call: Call) -> Outcome:
        return {"status": self.status, "running": self.status == "running"}

    def _migrate(self, call: Call) -> Outcome:
        args = call.arguments
        if ("uri" in args) == bool(args.get("channels")):
            return Error("need either 'uri' or 'channels' argument")
        if self.migration_status in ("setup", "active"):
            return Error("There's a migration process in progress")
        # A migration to nowhere: set up, then fail at once, as QEMU does for a refused URI.
        self.migration_status = "failed"
        return Return(
            {},
            events_before=[Event("MIGRATION", {"status": "setup"})],
            events_after=[Event("MIGRATION", {"status": "failed"})],
        )

    def _migrate_incoming(self, call: Call) -> Outcome:
        if self.status != "inmigrate":
            return Error("'-incoming' was not specified on the command line")
        if self.incoming_started:
            return Error("The incoming migration has already been started")
        self.incoming_started = True
        self.migration_status = "setup"
        return Return({}, events_after=[Event("MIGRATION", {"status": "setup"})])

    def _migrate_set_capabilities(self, call: Call) -> Outcome:
        caps = call.arguments.get("capabilities")
        if not isinstance(caps, list):
            return Error("Invalid parameter type for 'capabilities', expected: array")
        changes: dict[str, bool] = {}
        for index, item in enumerate(caps):
            where = f"capabilities[{index}]"
            if not isinstance(item, dict):
                return Error(f"Invalid parameter type for '{where}', expected: object")
            if "capability" not in item:
                return Error(f"Parameter '{where}.capability' is missing")
            cap = item["capability"]
            if not isinstance(cap, str):
                return Error(f"Invalid parameter type for '{where}.capability', expected: string")
            if cap not in self.migration_caps:
                return Error(f"Parameter 'capability' does not accept value '{cap}'")
            if "state" not in item:
                return Error(f"Parameter '{where}.state' is missing")
            if not isinstance(item["state"], bool):
                return Error(f"Invalid parameter type for '{where}.state', expected: boolean")
            for key in item:
                if key not in ("capability", "state"):
                    return Error(f"Parameter '{where}.{key}' is unexpected")
            changes[cap] = item["state"]
        if self.migration_status in ("setup", "active"):
            return Error("There's a migration process in progress")
        self.migration_caps.update(changes)
        return Return({})

    def _query_migrate_capabilities(self, call: Call) -> Outcome:
        return [{"capability": name, "state": on} for name, on in self.migration_caps.items()]

    def _query_migrate(self, call: Call) -> Outcome:
        return {} if self.migration_status is None else {"status": self.migration_status}

    def _migrate_pause(self, call: Call) -> Outcome:
        return Error(
            "migrate-pause is currently only supported during postcopy-active or "
            "postcopy-recover state"
        )

    def _getfd(self, call: Call) -> Outcome:
        fd = call.conn.take_fd()
        if fd is None:
            return Error(NO_FD)
        name = call.arguments["fdname"]
        old = self.named_fds.pop(name, None)
        if old is not None:
            _close_fds([old])
        self.named_fds[name] = fd
        return Return({})

    def _add_fd(self, call: Call) -> Outcome:
        fd = call.conn.take_fd()
        if fd is None:
            return Error(NO_FD)
        fdset = call.arguments.get("fdset-id")
        if not isinstance(fdset, int):
            fdset = max(self.fdsets, default=-1) + 1
        self.fdsets.setdefault(fdset, []).append(fd)
        return {"fdset-id": fdset, "fd": fd}

    def _quit(self, call: Call) -> Outcome:
        shutdown = Event("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})
        return Return({}, events_before=[shutdown], close_after=True)


async def _main(path: str, migrate_capabilities: bool) -> None:
    async with FakeQemu(path, schema=default_schema(migrate_capabilities)):
        await asyncio.Event().wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Serve a fake QEMU QMP monitor on a unix socket.")
    parser.add_argument("path")
    parser.add_argument("--migrate-capabilities", action="store_true")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_main(args.path, args.migrate_capabilities))
