"""A hostile QEMU: a raw fake QMP server that misbehaves in every way a socket allows, in front
of a real ``qmp-proxy`` process, while clients work through the proxy.

Per connection the fake draws, from a seeded random generator, a plan: a greeting that is good,
missing, truncated, garbage, the wrong shape or pretty-printed; answers to the proxy's probe
(``qmp_capabilities``, ``query-qmp-schema``, ``query-name``, ``query-uuid``) that are good, of
random shapes, under wrong or missing ids, huge, or cut off; and, once serving, replies with
unknown, missing, string or duplicated ids, replies in any order, split into tiny writes or laid
out oddly, events of odd shapes, lines just under and over ``--max-upstream-line`` (1 MiB here),
output without a newline that never ends, garbage lines, stalls and sudden closes.  Its good
behaviour is real QEMU 7.2's: the greeting, schema (trimmed to what the proxy and the clients
use), ``query-name`` and ``query-uuid`` are captured from a real QEMU at the start.

The properties, checked for ``FUZZ_SECONDS``:

* the proxy never dies and never logs an internal error; its memory stays bounded, and it cuts
  a newline-less stream at about ``max_upstream_line`` instead of buffering it;
* every client command is either answered by a reply that carries its own id and its own
  content (the fake echoes the arguments), or the client is cleanly disconnected (EOF after
  whole lines); never a reply under another client's id, never two lines glued together or a
  line cut short, never an event before negotiation, never a hang;
* once the fake behaves, the route becomes ready and serves.

Desyncs, connect failures by result and what the fake did are counted and printed.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import fcntl
import json
import os
import random
import termios
import time
import traceback
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import free_port
from tests.hostile import RawConn, http_get, metric, parse_line, rss
from tests.proxyproc import ProxyProcess
from tests.qemu import QemuProcess, RawQMP

SEED = 20260
FUZZ_SECONDS = 20.0
CLIENTS = 6
MAX_LINE = 1 << 20  # --max-upstream-line
CLIENT_WAIT = 2.0
# The proxy's default --max-backlog.  (Under it, a client the proxy cuts off as a slow reader
# gets the line in flight cut short; these clients read, so none is.)
MAX_BACKLOG = 8 << 20
# What the proxy may grow by (RSS) over the whole fuzz: what its limits let it hold (a backlog
# per client, a line or two from QEMU in its read buffer, framer and the copies a relay makes)
# and allocator slack.  Buffering a never-ending line (the fake offers up to 64 MiB) exceeds it.
RSS_GROWTH = CLIENTS * MAX_BACKLOG + 4 * MAX_LINE + (24 << 20)
# A newline-less stream must be cut at max_upstream_line; what the fake manages to write before
# the cut also fills the kernel's socket buffers and the proxy's 256 KiB read buffer.
UNTERMINATED_CUT = MAX_LINE + (2 << 20)
ECHO = "x-echo"
# Commands whose schema entries (and the types they reach) the trimmed schema keeps.
KEEP_COMMANDS = {
    "qmp_capabilities",
    "query-qmp-schema",
    "query-name",
    "query-uuid",
    "query-status",
    "query-version",
    "query-migrate",
    "query-migrate-capabilities",
    "migrate",
    "migrate-incoming",
    "migrate-set-capabilities",
    "getfd",
    "closefd",
    "stop",
    "cont",
}
KEEP_EVENTS = {"STOP", "RESUME", "SHUTDOWN", "MIGRATION"}


# -- what real QEMU says ------------------------------------------------------------------------


@dataclass(frozen=True)
class Real:
    greeting: bytes
    schema: list[Any]
    name: Any
    uuid: Any


def trim(schema: list[Any]) -> list[Any]:
    """The entries for KEEP_COMMANDS and KEEP_EVENTS and every type they reach (type names are
    masked as numbers, so any string value naming an entry is a reference)."""
    by_name = {e["name"]: e for e in schema}
    todo = [
        e["name"]
        for e in schema
        if (e["meta-type"] == "command" and e["name"] in KEEP_COMMANDS)
        or (e["meta-type"] == "event" and e["name"] in KEEP_EVENTS)
    ]
    keep: set[str] = set()

    def refs(value: Any) -> Iterator[str]:
        if isinstance(value, str):
            yield value
        elif isinstance(value, list):
            for v in value:
                yield from refs(v)
        elif isinstance(value, dict):
            for v in value.values():
                yield from refs(v)

    while todo:
        name = todo.pop()
        if name in keep:
            continue
        keep.add(name)
        entry = by_name[name]
        todo += [r for r in refs({k: v for k, v in entry.items() if k != "name"}) if r in by_name]
    return [e for e in schema if e["name"] in keep]


@pytest.fixture(scope="module")
def real() -> Real:
    with QemuProcess("7.2", "-M", "none", "-name", "fuzzvm") as q:
        mon = RawQMP(q.sock_path)
        greeting = mon.recv_line() + b"\r\n"
        mon.send(b'{"execute":"qmp_capabilities"}')
        mon.recv_line()
        answers = []
        for command in ("query-qmp-schema", "query-name", "query-uuid"):
            answers.append(mon.command({"execute": command})["return"])
        mon.close()
    return Real(greeting, trim(answers[0]), answers[1], answers[2])


# -- the fake ------------------------------------------------------------------------------------


def dumps(value: Any) -> bytes:
    """As QEMU writes: ``", "`` and ``": "`` separators, ASCII only."""
    return json.dumps(value).encode()


JUNK_SHAPES: list[Any] = [
    None,
    1,
    "x",
    [],
    {},
    [1, 2],
    {"QMP": None},
    [{"name": 1}],
    [{"name": "query-name"}],
    [{"meta-type": "command"}],
    {"name": {"nested": [1, 2]}},
    1e308,
    "\u0000\u001b[2J",
]
BAD_GREETINGS: list[bytes] = [
    b'{"QMP": 1}\r\n',
    b'{"QMP": {"version": {"qemu": {"major": "7", "minor": 2, "micro": 0}}, '
    b'"capabilities": []}}\r\n',
    b'{"QMP": {"version": {"qemu": {"major": 7, "minor": 2}}, "capabilities": []}}\r\n',
    b'{"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}}, '
    b'"capabilities": "oob"}}\r\n',
    b'{"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}}, '
    b'"capabilities": [1]}}\r\n',
    b'{"QMP": {"version": [], "capabilities": []}}\r\n',
    b'{"return": {}}\r\n',
    b"[1, 2, 3]\r\n",
    b'{"event": "STOP"}\r\n',
]
ODD_EVENTS: list[bytes] = [  # relayed as QEMU wrote them
    b'{"event": "X"}\r\n',
    b'{"event": "STOP", "data": {"x": [1, {"y": null}], "z": "\\u0001\\u001b"}}\r\n',
    b'{"timestamp": "bogus", "event": "\\u00dcNICODE"}\r\n',
    b'{"data": 1, "event": "RESUME", "timestamp": {"seconds": -1, "microseconds": 1e99}}\n',
    b'{"event": "STOP", "timestamp": {"seconds": 1, "microseconds": 2}, "id": 5}\r\n',
]
BAD_EVENTS: list[bytes] = [  # desyncs
    b'{"event": 5}\r\n',
    b'{"event": null}\r\n',
    b'{"event": "X", "return": {}}\r\n',
    b'{"event": "X", "error": {}}\r\n',
]


@dataclass
class Plan:
    """What one connection does; drawn from the connection's own seeded generator."""

    greeting: str = "good"
    negotiation: str = "good"
    schema: str = "good"
    identity: str = "good"
    lifetime: float = 10.0
    misbehave_after: int = 1 << 30
    terminal: str = "close"
    flavours: frozenset[str] = frozenset()

    @classmethod
    def draw(cls, rng: random.Random) -> Plan:
        def pick(choices: dict[str, float]) -> str:
            return rng.choices(list(choices), list(choices.values()))[0]

        return cls(
            greeting=pick(
                {"good": 14, "pretty": 2, "none": 1, "truncated": 1, "garbage": 1, "bad": 2}
            ),
            negotiation=pick({"good": 14, "error": 1, "wrong-id": 1, "no-id": 1, "close": 1}),
            schema=pick({"good": 14, "junk": 2, "huge": 1, "close": 1, "split": 2}),
            identity=pick({"good": 14, "junk": 2, "close": 1}),
            lifetime=rng.uniform(0.2, 1.5),
            misbehave_after=rng.choice([0, 1, 3, 10, 40, 1 << 30]),
            terminal=pick(
                {
                    "close": 3,
                    "close-mid-line": 2,
                    "close-unread": 2,
                    "unknown-id": 2,
                    "no-id": 1,
                    "string-id": 1,
                    "duplicate": 1,
                    "old-probe-id": 1,
                    "bad-event": 2,
                    "huge-line": 1,
                    "no-newline": 1,
                    "garbage": 1,
                    "non-object": 1,
                    "second-greeting": 1,
                    "stall": 1,
                }
            ),
            flavours=frozenset(
                f
                for f in ("reorder", "tiny-writes", "odd-layout", "odd-events", "big-event")
                if rng.random() < 0.25
            ),
        )


class Stop(Exception):
    """The connection is over (the proxy closed it, or the plan ends it)."""


@dataclass
class Fake:
    path: str
    real: Real
    good: bool = False  # the final phase: every new connection behaves
    connections: int = 0
    did: Counter[str] = field(default_factory=Counter)
    handlers: set[asyncio.Task[Any]] = field(default_factory=set)
    active: int = 0  # connections being served
    # When the last one ended (at first: when the fake started, so a proxy still starting up
    # is not taken for one that never noticed a connection end).
    last_end: float = field(default_factory=time.monotonic)
    last_note = ""  # the last thing the fake did
    max_unterminated: int = 0
    server: asyncio.AbstractServer | None = None

    async def __aenter__(self) -> Fake:
        self.server = await asyncio.start_unix_server(self._handle, self.path, limit=1 << 20)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        if self.handlers:
            _, late = await asyncio.wait(self.handlers, timeout=5)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.handlers.add(task)
        task.add_done_callback(self.handlers.discard)
        n = self.connections
        self.connections += 1
        self.active += 1
        rng = random.Random(f"{SEED}:{n}")
        plan = Plan() if self.good else Plan.draw(rng)
        conn = FakeConn(self, reader, writer, rng, plan)
        try:
            await conn.run()
        except (Stop, ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1)
            self.active -= 1
            self.last_end = time.monotonic()


class FakeConn:
    def __init__(
        self,
        fake: Fake,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        rng: random.Random,
        plan: Plan,
    ) -> None:
        self.fake = fake
        self.reader = reader
        self.writer = writer
        self.rng = rng
        self.plan = plan
        self.buf = ""
        self.decoder = json.JSONDecoder()
        self.served = 0
        self.ids_seen: list[int] = []
        self.final = fake.good  # a connection of the final phase: good for ever

    def note(self, what: str) -> None:
        self.fake.did[what] += 1
        self.fake.last_note = what

    async def write(self, data: bytes) -> None:
        if "tiny-writes" in self.plan.flavours and len(data) < 4096:
            for i in range(0, len(data), 7):
                self.writer.write(data[i : i + 7])
                await self.writer.drain()
                await asyncio.sleep(0)
        else:
            self.writer.write(data)
            await self.writer.drain()

    async def command(self, timeout: float) -> dict[str, Any]:
        """The proxy's next command (it writes JSON objects back to back)."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.buf.lstrip()
            if text:
                try:
                    value, end = self.decoder.raw_decode(text)
                except ValueError:
                    pass
                else:
                    self.buf = text[end:]
                    assert isinstance(value, dict), value
                    if isinstance(value.get("id"), int):
                        self.ids_seen.append(value["id"])
                    return value
            left = deadline - time.monotonic()
            if left <= 0:
                raise Stop("lifetime over")
            try:
                chunk = await asyncio.wait_for(self.reader.read(65536), left)
            except TimeoutError:
                raise Stop("lifetime over") from None
            if not chunk:
                raise Stop("the proxy closed the connection")
            self.buf += chunk.decode()

    def pending(self) -> bool:
        return bool(self.buf.strip())

    async def run(self) -> None:
        await self.greet()
        end = time.monotonic() + self.plan.lifetime
        while True:
            cmd = await self.command(3600 if self.final else max(0.0, end - time.monotonic()))
            batch = [cmd]
            while "reorder" in self.plan.flavours and self.pending():
                batch.append(await self.command(1))
            if len(batch) > 1:
                self.rng.shuffle(batch)
                self.note("reordered")
            for c in batch:
                await self.answer(c)

    async def greet(self) -> None:
        how = self.plan.greeting
        self.note(f"greeting:{how}")
        greeting = self.fake.real.greeting
        if how == "good":
            await self.write(greeting)
        elif how == "pretty":  # a pretty=on monitor: the proxy frames the rest by QEMU's rules
            await self.write(json.dumps(json.loads(greeting), indent=4).encode() + b"\r\n")
        elif how == "none":
            await asyncio.sleep(self.rng.uniform(0, 0.3))
            raise Stop()
        elif how == "truncated":
            await self.write(greeting[: self.rng.randrange(1, len(greeting) - 2)])
            raise Stop()
        elif how == "garbage":
            await self.write(bytes(self.rng.randrange(256) for _ in range(200)) + b"\r\n")
            await asyncio.sleep(0.2)
            raise Stop()
        else:
            await self.write(self.rng.choice(BAD_GREETINGS))
            await asyncio.sleep(0.2)
            raise Stop()

    def reply(self, cmd: dict[str, Any], value: Any) -> bytes:
        return b'{"return": ' + dumps(value) + b', "id": ' + dumps(cmd.get("id")) + b"}\r\n"

    async def probe_answer(self, cmd: dict[str, Any], how: str, good: Any) -> None:
        self.note(f"{cmd['execute']}:{how}")
        if how == "good":
            await self.write(self.reply(cmd, good))
        elif how == "junk":
            await self.write(self.reply(cmd, self.rng.choice(JUNK_SHAPES)))
        elif how == "error":
            err = {"class": "GenericError", "desc": "fuzz"}
            await self.write(b'{"id": ' + dumps(cmd["id"]) + b', "error": ' + dumps(err) + b"}\r\n")
        elif how == "wrong-id":
            await self.write(b'{"return": {}, "id": ' + dumps(self.rng.getrandbits(62)) + b"}\r\n")
        elif how == "no-id":
            await self.write(b'{"return": {}}\r\n')
        elif how == "huge":
            await self.write(self.reply(cmd, ["x" * (MAX_LINE + 1000)]))
        elif how == "split":  # the schema line in many small writes: legal
            line = self.reply(cmd, good)
            step = self.rng.randrange(1000, 50000)
            for i in range(0, len(line), step):
                self.writer.write(line[i : i + step])
                await self.writer.drain()
                await asyncio.sleep(0)
        else:
            raise Stop()

    async def answer(self, cmd: dict[str, Any]) -> None:
        name = cmd.get("execute", cmd.get("exec-oob"))
        real = self.fake.real
        if name == "qmp_capabilities":
            await self.probe_answer(cmd, self.plan.negotiation, {})
        elif name == "query-qmp-schema":
            await self.probe_answer(cmd, self.plan.schema, real.schema)
        elif name == "query-name":
            await self.probe_answer(cmd, self.plan.identity, real.name)
        elif name == "query-uuid":
            await self.probe_answer(cmd, self.plan.identity, real.uuid)
        elif self.served >= self.plan.misbehave_after:
            await self.terminal(cmd)
        else:
            await self.serve(cmd, name)

    async def serve(self, cmd: dict[str, Any], name: Any) -> None:
        """A client command, answered as QEMU would (x-echo returns its arguments)."""
        self.served += 1
        flavours = self.plan.flavours
        if "odd-events" in flavours and self.rng.random() < 0.3:
            await self.write(self.rng.choice(ODD_EVENTS))
            self.note("odd-event")
        if "big-event" in flavours and self.rng.random() < 0.1:
            data = {"blob": "b" * (MAX_LINE - 200)}
            await self.write(b'{"event": "BIG", "data": ' + dumps(data) + b"}\r\n")
            self.note("big-event")
        if name != ECHO:
            err = {"class": "CommandNotFound", "desc": f"The command {name} has not been found"}
            await self.write(
                b'{"id": ' + dumps(cmd.get("id")) + b', "error": ' + dumps(err) + b"}\r\n"
            )
            return
        args = cmd.get("arguments", {})
        uid = dumps(cmd["id"])
        if "odd-layout" in flavours:
            layouts = [
                b'{"id": ' + uid + b', "return": ' + dumps(args) + b"}\r\n",
                b'{"return":'
                + json.dumps(args, separators=(",", ":")).encode()
                + b',"id":'
                + uid
                + b"}\n",
                b'{"return": ' + dumps(args) + b', "id": ' + uid + b" }\r\n",
                b'{"return": ' + dumps(args) + b', "id": ' + uid + b', "extra": [1]}\r\n',
                b'{"id": ' + uid + b', "error": {"class": "GenericError", "desc": "fuzz"}}\r\n',
            ]
            await self.write(self.rng.choice(layouts))
            self.note("odd-layout")
        else:
            await self.write(self.reply(cmd, args))

    async def terminal(self, cmd: dict[str, Any]) -> None:
        """The misbehaviour this connection ends with."""
        how = self.plan.terminal
        self.note(f"terminal:{how}")
        uid = dumps(cmd.get("id"))
        line = self.reply(cmd, cmd.get("arguments", {}))
        if how == "close":
            raise Stop()
        if how == "close-mid-line":
            await self.write(line[: self.rng.randrange(1, len(line) - 1)])
            raise Stop()
        if how == "close-unread":
            await self.close_unread(line)
        if how == "unknown-id":
            await self.write(b'{"return": {}, "id": ' + dumps(self.rng.getrandbits(62)) + b"}\r\n")
        elif how == "no-id":
            await self.write(b'{"return": {}}\r\n')
        elif how == "string-id":
            await self.write(b'{"return": {}, "id": "' + uid + b'"}\r\n')
        elif how == "duplicate":
            await self.write(line + line)
        elif how == "old-probe-id":
            await self.write(b'{"return": {}, "id": ' + dumps(self.ids_seen[0]) + b"}\r\n")
        elif how == "bad-event":
            await self.write(self.rng.choice(BAD_EVENTS))
        elif how == "huge-line":
            await self.write(self.reply(cmd, {"blob": "h" * (MAX_LINE + 10)}))
        elif how == "no-newline":
            await self.unterminated()
        elif how == "garbage":
            await self.write(bytes(self.rng.randrange(32, 127) for _ in range(100)) + b"\r\n")
        elif how == "non-object":
            await self.write(b"[1, 2, 3]\r\n")
        elif how == "second-greeting":
            await self.write(self.fake.real.greeting)
        else:  # stall, then go
            await asyncio.sleep(self.rng.uniform(0.2, 1.0))
            raise Stop()
        await asyncio.sleep(0.5)  # the proxy should drop the connection now
        raise Stop()

    async def close_unread(self, line: bytes) -> None:
        """Half a reply, then a close that leaves the proxy's next commands unread: the proxy
        finds data and a reset (ECONNRESET, EPOLLERR) on its socket at once."""
        transport = self.writer.transport
        assert isinstance(transport, asyncio.Transport)
        transport.pause_reading()
        sock = transport.get_extra_info("socket")
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            if _unread(sock.fileno()):
                break
            await asyncio.sleep(0.005)
        await self.write(line[: len(line) // 2])
        raise Stop()

    async def unterminated(self) -> None:
        """Output without a newline, until the proxy hangs up (or 64 MiB)."""
        chunk = b"{" + b'"k": "' + b"n" * 65536
        sent = 0
        try:
            while sent < (64 << 20):
                self.writer.write(chunk)
                await asyncio.wait_for(self.writer.drain(), 5)
                sent += len(chunk)
        finally:
            self.fake.max_unterminated = max(self.fake.max_unterminated, sent)


def _unread(fd: int) -> int:
    """Bytes waiting in a socket's receive queue (FIONREAD)."""
    buf = array.array("i", [0])
    fcntl.ioctl(fd, termios.FIONREAD, buf)
    return buf[0]


# -- clients -------------------------------------------------------------------------------------


@dataclass
class Clients:
    """Clients that pipeline x-echo commands through the proxy and check every line they get."""

    path: str
    running: bool = True
    failures: list[str] = field(default_factory=list)
    stats: Counter[str] = field(default_factory=Counter)

    def fail(self, what: str) -> None:
        if len(self.failures) < 100:
            self.failures.append(what[:1000])

    async def loop(self, name: str, seed: int) -> None:
        rng = random.Random(seed)
        k = 0
        while self.running:
            try:
                k = await self.session(name, rng, k)
            except AssertionError as exc:
                self.fail(f"{name}: {exc}")
            except (ConnectionError, TimeoutError) as exc:
                tb = traceback.extract_tb(exc.__traceback__)
                here = [frame.line for frame in tb if frame.filename == __file__]
                self.fail(f"{name}: {exc!r} at {here[-1] if here else '?'}")
            await asyncio.sleep(rng.uniform(0, 0.05))

    async def session(self, name: str, rng: random.Random, k: int) -> int:
        """One connection, until EOF or the fuzz ends."""
        conn = await RawConn.connect(self.path)
        try:
            return await self.converse(conn, name, rng, k)
        except (ConnectionResetError, BrokenPipeError):
            # The proxy closed while our last bytes were still unread in its socket (the route
            # lost QEMU): the kernel reports that as a reset, after every whole line the proxy
            # wrote (a cut line would have shown as a line without CRLF).
            self.stats["reset"] += 1
            return k
        finally:
            conn.close()

    async def converse(self, conn: RawConn, name: str, rng: random.Random, k: int) -> int:
        """Negotiate, then batches of commands, each answered under its own id or cut by EOF."""
        greeting = await conn.message(CLIENT_WAIT + 5)
        if greeting is None:
            self.stats["no-greeting"] += 1
            return k
        assert "QMP" in greeting, greeting
        await asyncio.wait_for(conn.send(b'{"execute":"qmp_capabilities","id":"neg"}'), 10)
        msg = await conn.message(10)
        if msg is None:
            self.stats["eof-negotiating"] += 1
            return k
        assert msg == {"return": {}, "id": "neg"}, f"before negotiation: {msg}"
        self.stats["negotiated"] += 1
        while self.running:
            outstanding: dict[str, Any] = {}
            data = b""
            for _ in range(rng.randint(1, 6)):
                k += 1
                args = {"c": name, "n": k, "pad": "p" * rng.choice([0, 10, 1000, 100000])}
                outstanding[f"{name}-{k}"] = args
                data += dumps({"execute": ECHO, "arguments": args, "id": f"{name}-{k}"})
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                # The proxy may have ended the session (read on); it must never stop reading
                # a client for good.
                await asyncio.wait_for(conn.send(data), 10)
            while outstanding:
                # The fake's connections live 1.5 s at most and its stalls 1 s: 10 s without
                # a line and without EOF is a hang.
                try:
                    line = await conn.line(10)
                except TimeoutError:
                    raise AssertionError(f"{name}: no reply and no EOF for 10 s") from None
                if line is None:
                    self.stats["eof"] += 1
                    self.stats["unanswered"] += len(outstanding)
                    return k
                msg = parse_line(line)
                if "event" in msg:
                    self.stats["events"] += 1
                    continue
                id_ = msg.get("id")
                assert id_ in outstanding, f"{name}: a reply not to its own command: {line[:300]!r}"
                args = outstanding.pop(id_)
                if "return" in msg:
                    assert msg["return"] == args, f"{name}: wrong content: {line[:300]!r}"
                    self.stats["answered"] += 1
                else:
                    assert msg["error"] == {"class": "GenericError", "desc": "fuzz"}, msg
                    self.stats["answered-error"] += 1
        return k


# -- the test ------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def running(real: Real, tmp: Path) -> AsyncIterator[tuple[Fake, ProxyProcess, int]]:
    port = free_port()
    async with Fake(str(tmp / "qemu.sock"), real) as fake:
        proxy = ProxyProcess(
            "--upstream",
            f"unix:{fake.path}",
            "--listen",
            f"unix:{tmp / 'proxy.sock'}",
            "--state-dir",
            str(tmp),
            "--metrics",
            f"127.0.0.1:{port}",
            "--max-upstream-line",
            str(MAX_LINE),
            "--client-wait",
            str(CLIENT_WAIT),
            "--backoff-min",
            "0.01",
            "--backoff-max",
            "0.05",
            "--max-sessions",
            "64",
            tmp_path=tmp,
        )
        with proxy:
            yield fake, proxy, port


async def test_hostile_qemu(real: Real, short_tmp: Path) -> None:
    assert real.schema, "no schema captured"
    async with running(real, short_tmp) as (fake, proxy, port):
        pid = proxy.proc.pid
        await asyncio.sleep(0.3)
        rss_start = rss(pid)
        clients = Clients(str(short_tmp / "proxy.sock"))
        tasks = [asyncio.ensure_future(clients.loop(f"c{i}", SEED + i)) for i in range(CLIENTS)]
        rss_max = rss_start
        deadline = time.monotonic() + FUZZ_SECONDS
        while time.monotonic() < deadline:
            assert proxy.proc.poll() is None, f"the proxy died:\n{proxy.log()[-5000:]}"
            # The fake hangs up within seconds of every connection and the proxy reconnects
            # within its backoff (50 ms): a proxy that does not come back never saw QEMU go.
            if fake.active == 0 and time.monotonic() - fake.last_end > 5:
                status, body = await http_get(port, "/readyz")
                raise AssertionError(
                    f"QEMU's connection {fake.connections - 1} ended ({fake.last_note}) 5 s"
                    f" ago and the proxy never noticed: /readyz {status} {body}; the proxy still"
                    f" holds {len(os.listdir(f'/proc/{pid}/fd'))} descriptors;"
                    f" log:\n{proxy.log()[-1500:]}"
                )
            rss_max = max(rss_max, rss(pid))
            await asyncio.sleep(0.1)
        # The fake behaves from its next connection on; the clients keep going meanwhile.  The
        # proxy has one connection at a time, so a new one means the last bad one is gone.
        fake.good = True
        good_from = fake.connections
        ready_by = time.monotonic() + 10
        while fake.connections == good_from or (await http_get(port, "/readyz"))[0] != 200:
            assert time.monotonic() < ready_by, f"never ready again:\n{proxy.log()[-3000:]}"
            await asyncio.sleep(0.05)
        await asyncio.sleep(2.0)
        clients.running = False
        await asyncio.wait_for(asyncio.gather(*tasks), 30)

        # A well-behaved QEMU is served: fresh clients, every command answered.
        final = Clients(str(short_tmp / "proxy.sock"))
        finals = [asyncio.ensure_future(final.loop(f"f{i}", i)) for i in range(3)]
        await asyncio.sleep(1.5)
        final.running = False
        await asyncio.wait_for(asyncio.gather(*finals), 30)

        assert proxy.proc.poll() is None, f"the proxy died:\n{proxy.log()[-5000:]}"
        rss_max = max(rss_max, rss(pid))
        _, text = await http_get(port, "/metrics")
        desyncs = metric(text, "qmp_proxy_upstream_desyncs_total")
        results = {
            r: metric(text, "qmp_proxy_upstream_connects_total", result=r)
            for r in ("ok", "refused", "no_greeting", "protocol_error", "error")
        }
        log = proxy.log()
        summary = (
            f"seed {SEED}: {fake.connections} fake connections ({good_from} before it behaved);"
            f" desyncs {desyncs:.0f}; connects {results}; clients {dict(clients.stats)};"
            f" final {dict(final.stats)}; proxy RSS {rss_start >> 20} -> max {rss_max >> 20} MiB;"
            f" longest unterminated output accepted {fake.max_unterminated} bytes;"
            f" fake did {dict(sorted(fake.did.items()))}"
        )
        print(summary)
        problems = [f"client: {f}" for f in clients.failures + final.failures]
        if metric(text, "qmp_proxy_internal_errors_total") != 0 or "internal_error" in log:
            problems.append(
                "internal errors: " + str([x for x in log.splitlines() if "internal" in x][:3])
            )
        if "Traceback" in log:
            problems.append("a traceback in the log")
        if desyncs == 0 or results["protocol_error"] == 0 or results["ok"] < 5:
            problems.append("the fuzz did not exercise desyncs, probe failures and recoveries")
        if rss_max - rss_start > RSS_GROWTH:
            problems.append(f"proxy RSS grew by {(rss_max - rss_start) >> 20} MiB")
        if fake.max_unterminated > UNTERMINATED_CUT:
            problems.append(f"a newline-less stream was read to {fake.max_unterminated} bytes")
        if final.stats["answered"] < 30 or set(final.stats) != {"negotiated", "answered"}:
            problems.append(f"a behaving QEMU was not served: {dict(final.stats)}")
        if clients.stats["answered"] < 100:
            problems.append("the clients were hardly ever served during the fuzz")
        assert not problems, summary + "\n" + "\n".join(problems)
