"""A fast fake QEMU for the cost benchmarks: the proxy, not the fake, must be what is measured.

``tests/fakeqemu.py`` is a faithful, scriptable fake for fault injection; it frames input with
the proxy's own QEMU-exact framer, which would cost as much as the proxy it serves.  This one
does the least a QMP server can do and stay correct for the proxy's traffic:

* a greeting offering ``oob``; ``qmp_capabilities``; ``query-qmp-schema`` (a small built-in
  schema, or QEMU's own captured with ``--schema FILE``), ``query-name``, ``query-uuid``,
  ``query-status``; every other command answered ``{"return": {}, "id": ID}`` at once;
* input split by counting braces outside strings (the proxy forwards compact JSON objects with no
  newline between them); every reply to one read goes out in one write;
* one client at a time per socket, as QEMU's monitor: a second connection waits, ungreeted, until
  the first leaves;
* events, for the fan-out benchmark: ``x-bench-emit`` with ``{"count": N, "rate": R}`` replies and
  then emits N events at R per second (R = 0: as fast as the reader takes them);
  ``--events N [--event-rate R]`` does the same for every client once it has negotiated;
* any number of sockets from one process (the many-routes memory benchmark).

Usage: ``python bench/fakeqemu.py [--schema FILE] [--events N] [--event-rate R] SOCK [SOCK...]``.
Prints ``ready`` on stdout once every socket listens.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import os
import re
import sys
from collections import deque
from pathlib import Path
from typing import Any, Final, cast

import orjson
import uvloop

CRLF: Final = b"\r\n"
GREETING: Final = (
    b'{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, '
    b'"package": "bench-fake"}, "capabilities": ["oob"]}}\r\n'
)
EVENT: Final = (
    b'{"timestamp": {"seconds": 1700000000, "microseconds": 123456}, '
    b'"event": "JOB_STATUS_CHANGE", "data": {"status": "running", "id": "bench-job"}}\r\n'
)
FLOOD_BATCH: Final = 64  # events per write when emitting as fast as possible

# Enough of QEMU 7.2's introspection for the proxy's probe: migrate's and
# migrate-set-capabilities' argument types, a few commands and events.  Type names are masked as
# numbers, as QEMU masks them.
# fmt: off
SMALL_SCHEMA: Final[list[dict[str, Any]]] = [
    {"name": "qmp_capabilities", "meta-type": "command", "arg-type": "0", "ret-type": "1"},
    {"name": "query-status", "meta-type": "command", "arg-type": "1", "ret-type": "2"},
    {"name": "query-name", "meta-type": "command", "arg-type": "1", "ret-type": "3"},
    {"name": "query-uuid", "meta-type": "command", "arg-type": "1", "ret-type": "4"},
    {"name": "query-qmp-schema", "meta-type": "command", "arg-type": "1", "ret-type": "[5]"},
    {"name": "migrate", "meta-type": "command", "arg-type": "6", "ret-type": "1"},
    {"name": "migrate-set-capabilities", "meta-type": "command", "arg-type": "7",
     "ret-type": "1"},
    {"name": "query-migrate-capabilities", "meta-type": "command", "arg-type": "1",
     "ret-type": "[8]"},
    {"name": "query-migrate", "meta-type": "command", "arg-type": "1", "ret-type": "1"},
    {"name": "JOB_STATUS_CHANGE", "meta-type": "event", "arg-type": "9"},
    {"name": "STOP", "meta-type": "event", "arg-type": "1"},
    {"name": "RESUME", "meta-type": "event", "arg-type": "1"},
    {"name": "0", "meta-type": "object",
     "members": [{"name": "enable", "default": None, "type": "[str]"}]},
    {"name": "1", "meta-type": "object", "members": []},
    {"name": "2", "meta-type": "object", "members": [
        {"name": "running", "type": "bool"}, {"name": "status", "type": "str"}]},
    {"name": "3", "meta-type": "object",
     "members": [{"name": "name", "default": None, "type": "str"}]},
    {"name": "4", "meta-type": "object", "members": [{"name": "UUID", "type": "str"}]},
    {"name": "6", "meta-type": "object", "members": [
        {"name": "uri", "type": "str"}, {"name": "blk", "default": None, "type": "bool"},
        {"name": "detach", "default": None, "type": "bool"}]},
    {"name": "7", "meta-type": "object",
     "members": [{"name": "capabilities", "type": "[8]"}]},
    {"name": "8", "meta-type": "object", "members": [
        {"name": "capability", "type": "str"}, {"name": "state", "type": "bool"}]},
    {"name": "9", "meta-type": "object", "members": [
        {"name": "id", "type": "str"}, {"name": "status", "type": "str"}]},
    {"name": "str", "meta-type": "builtin", "json-type": "string"},
    {"name": "bool", "meta-type": "builtin", "json-type": "boolean"},
]
# fmt: on

# What a command returns, as QEMU writes it; anything not listed returns {}.
CANNED: Final[dict[str, bytes]] = {
    "query-status": b'{"status": "running", "singlestep": false, "running": true}',
    "query-uuid": b'{"UUID": "00000000-0000-0000-0000-000000000000"}',
}

# Outside strings only braces and quotes matter; inside, only the quote and backslash.
_OUTSIDE: Final = re.compile(rb'[{}"]')
_INSIDE: Final = re.compile(rb'["\\]')
_QUOTE, _BACKSLASH, _LBRACE = ord('"'), ord("\\"), ord("{")


class Splitter:
    """Splits a stream of JSON objects by counting braces outside strings.

    Enough for what the proxy forwards (objects, double-quoted strings); the scan position is
    kept across reads so a message split over reads is scanned once.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0
        self._start = 0
        self._depth = 0
        self._in_string = False

    def feed(self, data: bytes) -> list[bytes]:
        buf = self._buf
        buf += data
        out: list[bytes] = []
        pos, depth, in_string, start = self._pos, self._depth, self._in_string, self._start
        end = len(buf)
        while pos < end:
            if in_string:
                m = _INSIDE.search(buf, pos)
                if m is None:
                    pos = end
                    break
                i = m.start()
                if buf[i] == _BACKSLASH:
                    if i + 1 >= end:
                        pos = i  # the escaped byte has not arrived yet
                        break
                    pos = i + 2
                    continue
                in_string = False
                pos = i + 1
                continue
            m = _OUTSIDE.search(buf, pos)
            if m is None:
                pos = end
                break
            i = m.start()
            c = buf[i]
            pos = i + 1
            if c == _QUOTE:
                in_string = True
            elif c == _LBRACE:
                if depth == 0:
                    start = i
                depth += 1
            elif depth > 0:
                depth -= 1
                if depth == 0:
                    out.append(bytes(buf[start:pos]))
        # Drop what is consumed: everything before the message in progress.
        keep = start if depth > 0 else pos
        if keep:
            del buf[:keep]
            pos -= keep
            start = start - keep if depth > 0 else 0
        self._pos, self._depth, self._in_string, self._start = pos, depth, in_string, start
        return out


class Listener:
    """One QMP socket: one client served at a time, the others wait ungreeted."""

    def __init__(self, schema_body: bytes, events: int, event_rate: float) -> None:
        self.schema_body = schema_body
        self.events = events
        self.event_rate = event_rate
        self.active: Monitor | None = None
        self.waiting: deque[Monitor] = deque()

    def arrived(self, monitor: Monitor) -> None:
        if self.active is None:
            self.active = monitor
            monitor.start()
        else:
            self.waiting.append(monitor)

    def left(self, monitor: Monitor) -> None:
        if self.active is monitor:
            self.active = None
            while self.waiting:
                nxt = self.waiting.popleft()
                if not nxt.closed:
                    self.active = nxt
                    nxt.start()
                    break
        else:
            with contextlib.suppress(ValueError):
                self.waiting.remove(monitor)


class Monitor(asyncio.Protocol):
    """One client connection."""

    def __init__(self, listener: Listener) -> None:
        self.listener = listener
        self.transport: asyncio.Transport | None = None
        self.splitter = Splitter()
        self.negotiated = False
        self.closed = False
        self._paused = False
        self._drained: asyncio.Future[None] | None = None
        self._emitters: set[asyncio.Task[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.pause_reading()
        self.listener.arrived(self)

    def start(self) -> None:
        assert self.transport is not None
        self.transport.write(GREETING)
        self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        replies = [self._answer(raw) for raw in self.splitter.feed(data)]
        if replies:
            self.transport.write(b"".join(replies))

    def _answer(self, raw: bytes) -> bytes:
        try:
            msg = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return b'{"error": {"class": "GenericError", "desc": "JSON parse error"}}\r\n'
        name = msg.get("execute") or msg.get("exec-oob")
        if name == "qmp_capabilities":
            body = b"{}"
            if not self.negotiated:
                self.negotiated = True
                if self.listener.events:
                    self._emit(self.listener.events, self.listener.event_rate)
        elif name == "query-qmp-schema":
            body = self.listener.schema_body
        elif name == "x-bench-emit":
            args = msg.get("arguments") or {}
            self._emit(int(args.get("count", 1000)), float(args.get("rate", 0)))
            body = b"{}"
        else:
            body = CANNED.get(name, b"{}")
        if "id" in msg:
            return b'{"return": ' + body + b', "id": ' + orjson.dumps(msg["id"]) + b"}" + CRLF
        return b'{"return": ' + body + b"}" + CRLF

    # -- events --------------------------------------------------------------------------------

    def _emit(self, count: int, rate: float) -> None:
        task = asyncio.get_running_loop().create_task(self._emitter(count, rate))
        self._emitters.add(task)
        task.add_done_callback(self._emitters.discard)

    async def _emitter(self, count: int, rate: float) -> None:
        await asyncio.sleep(0)  # let the reply that asked for the events go out first
        loop = asyncio.get_running_loop()
        sent = 0
        if rate <= 0:
            batch = EVENT * FLOOD_BATCH
            while sent < count and not self.closed:
                n = min(FLOOD_BATCH, count - sent)
                self._write(batch if n == FLOOD_BATCH else EVENT * n)
                sent += n
                if self._paused:
                    self._drained = loop.create_future()
                    await self._drained
                elif sent % (FLOOD_BATCH * 16) == 0:
                    await asyncio.sleep(0)
            return
        t0 = loop.time()
        while sent < count and not self.closed:
            due = min(count, int((loop.time() - t0) * rate) + 1)
            if due > sent:
                self._write(EVENT * (due - sent))
                sent = due
            await asyncio.sleep(max(0.0, sent / rate - (loop.time() - t0)))

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        for task in list(self._emitters):
            task.cancel()
        self.resume_writing()
        self.listener.left(self)


async def serve(paths: list[str], schema: list[Any], events: int, event_rate: float) -> None:
    loop = asyncio.get_running_loop()
    body = orjson.dumps(schema)
    servers = []
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        listener = Listener(body, events, event_rate)
        servers.append(
            await loop.create_unix_server(functools.partial(Monitor, listener), path, backlog=1024)
        )
    print("ready", flush=True)
    await asyncio.gather(*(s.serve_forever() for s in servers))


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("sockets", nargs="+", metavar="SOCK", help="unix socket paths to serve")
    p.add_argument("--schema", type=Path, help="JSON file: query-qmp-schema's return value")
    p.add_argument("--events", type=int, default=0, help="events to emit after negotiation")
    p.add_argument("--event-rate", type=float, default=0.0, help="events/s (0: flood)")
    args = p.parse_args(argv)
    schema = orjson.loads(args.schema.read_bytes()) if args.schema else SMALL_SCHEMA
    paths = [s.removeprefix("unix:") for s in args.sockets]
    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(serve(paths, schema, args.events, args.event_rate))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
