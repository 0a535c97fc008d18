"""A hypothesis state machine over :class:`proxy.session.Session`, driven as the route drives it.

Random interleavings of client bytes (valid commands with random, duplicate or no ids,
negotiation, ``exec-oob``, malformed input, oversized messages, descriptor batches, all in
random chunkings that may cut a message across steps), upstream replies (in-band in FIFO order
per session, as QEMU answers them; ``exec-oob`` in any order), events, half-closes and
disconnects, against a model that knows what QEMU would answer to each message.

The model does not ask the proxy what QEMU would answer.  Every message the machine can write
is a fixed string (:data:`MESSAGES`), so before the machine runs, :func:`record` sends each one
to a real QEMU 7.2 in each monitor state (negotiation mode; negotiated without OOB; with OOB)
and keeps QEMU's reply line byte for byte.  The session must then answer exactly that line
whenever it answers a message itself; a message QEMU did not refuse in its top-level checks
(``qapi/qmp-dispatch.c``: every such error begins ``QMP input``) must instead go upstream, and
the model plays QEMU's part for it.  Two answers cannot be recorded and are stated here instead,
each with its source: a capability a monitor does not offer (every QEMU monitor here offers
``oob``) and the proxy's own ``--max-message`` limit (README, 'Limits').

Invariants:

* every message gets exactly one reply, or its session ended first (disconnect);
* in-band replies leave in request order, each as soon as it and everything before it is
  known (checked at quiescent points: all upstream commands answered);
* a reply the session gives itself is QEMU's recorded reply to that message, byte for byte;
* nothing reaches a client before it negotiated except negotiation-mode replies: ``negotiated``
  turns true only together with the reply that tells the client so, and events (which the
  route sends only to negotiated sessions) never precede that reply;
* parse errors carry no id; local errors carry the client's id as QEMU writes it;
* what goes upstream parses (strict JSON) to the client's message with only the id replaced;
* queued requests never exceed ``max_queued``; while in-band work is outstanding the session
  says so (``queued``/``held``), which is what the route's half-close relies on;
* descriptors a client sent are closed by the session or handed to exactly one ``getfd``.

Sessions are pure (no sockets); descriptor batches are real pipes so leaks show: a pipe whose
read end is closed everywhere makes ``write`` fail with EPIPE.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import socket
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from proxy import replies
from proxy.dialect import Dialect
from proxy.session import Command, Notice, Session
from tests.qemu import QemuProcess

MAX_MESSAGE = 160
RECORDED_VERSION = "7.2"
# In-band ids (raw text as the client writes it -> as QEMU writes it back; checked against the
# recording).  A small pool so duplicates among commands in flight are common.
INBAND_IDS: dict[bytes | None, bytes | None] = {
    None: None,
    b"1": b"1",
    b"7": b"7",
    b'"a"': b'"a"',
    b"'sq'": b'"sq"',
    b"null": b"null",
    b'[1, "x"]': b'[1, "x"]',
    b'{"k": true}': b'{"k": true}',
    b"2.5": b"2.5",
}
# exec-oob ids: another name space, so an at-once error is never mistaken for an in-band one.
OOB_IDS: dict[bytes | None, bytes | None] = {None: None, b'"o1"': b'"o1"', b'"o2"': b'"o2"'}
# Malformed input: QEMU's replies are recorded.
PARSE_INPUTS = [b'{"execute": }', b"}", b"\xff", b'{"a": 1, "a": 2}', b"[1, 2]"]
# Over the session's ``max_message`` (160 here; QEMU's own limit is 64 MiB, so QEMU cannot be
# asked): the proxy answers with QEMU's text for its token size limit (qobject/json-streamer.c)
# and skips the rest of the message (README, 'Limits': ``--max-message``).
OVER_LIMIT = [
    b'{"execute": "x-a", "arguments": {"pad": "' + b"p" * 200 + b'"}}',
    # Over the limit before an inner object that looks like a command: all of it is skipped.
    b'{"execute": "x-a", "arguments": {"pad": "' + b"p" * 140 + b'", "inner": '
    b'{"execute": "x-b", "id": 9}, "more": [{"execute": "x-c"}]}}',
]
OVER_LIMIT_REPLY = (
    b'{"error": {"class": "GenericError", "desc": "JSON token size limit exceeded"}}\r\n'
)
EVENT = b'{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "STOP"}\r\n'
CAPS = b'"execute": "qmp_capabilities", "arguments": {"enable": [%s]}'
# Monitor states a reply is recorded in.
NEGOTIATING, PLAIN, OOB = "negotiating", "negotiated", "negotiated with oob"


def with_id(body: bytes, raw_id: bytes | None) -> bytes:
    """``{body}`` with an id member, first or last (QDict order must not matter)."""
    if raw_id is None:
        return b"{" + body + b"}"
    if len(body) % 2:
        return b'{"id": ' + raw_id + b", " + body + b"}"
    return b"{" + body + b', "id": ' + raw_id + b"}"


def messages() -> dict[str, list[tuple[bytes, bytes | None]]]:
    """Every message the machine writes, by kind: (raw bytes, its id as QEMU writes it back)."""
    ids = list(INBAND_IDS.items())
    out: dict[str, list[tuple[bytes, bytes | None]]] = {
        "cmd": [],
        "caps": [],
        "oob": [],
        "member": [],
        "clash": [],
        "parse": [(raw, None) for raw in PARSE_INPUTS + OVER_LIMIT],
    }
    for name in (b"query-status", b"x-a", b"qmp_capabilities", b"getfd"):
        body = b'"execute": "%s"' % name
        if name == b"getfd":
            body += b', "arguments": {"fdname": "f"}'
        out["cmd"] += [(with_id(body, raw), cid) for raw, cid in ids]
    for enable in (b"", b'"oob"'):
        out["caps"] += [(with_id(CAPS % enable, raw), cid) for raw, cid in ids]
    for name in (b"migrate-pause", b"yank"):
        body = b'"exec-oob": "' + name + b'"'
        out["oob"] += [(with_id(body, raw), cid) for raw, cid in OOB_IDS.items()]
    out["member"] = [(with_id(b'"execute": "x-a", "bogus": 1', raw), cid) for raw, cid in ids]
    # Always with an id: without one, its error would read like an exec-oob's.
    out["clash"] = [
        (with_id(b'"execute": "x-a", "exec-oob": "x-b"', raw), cid)
        for raw, cid in ids
        if raw is not None
    ]
    return out


MESSAGES = messages()
KINDS = ["cmd", "cmd", "cmd", "caps", "oob", "oob", "member", "clash", "parse"]


def parse(data: bytes) -> Any:
    """What a message means, read with Python's strict JSON parser, not the proxy's framer.
    The one non-JSON spelling the machine writes is the single-quoted id ``'sq'``, which QEMU
    reads as the string ``"sq"``."""
    return json.loads(data.replace(b"'sq'", b'"sq"'))


def oob_shaped(value: dict[str, Any]) -> bool:
    """monitor/qmp.c qmp_is_oob(): ``exec-oob`` without ``execute``."""
    return "exec-oob" in value and "execute" not in value


def qemu_error(desc: str, cid: bytes | None, cls: str = "GenericError") -> bytes:
    """An error line laid out as QEMU lays it out (``id`` first); checked against the
    recording, so the replies the model builds itself are written as QEMU would."""
    body = b'"error": {"class": %s, "desc": %s}}\r\n' % (
        json.dumps(cls).encode(),
        json.dumps(desc).encode(),
    )
    return (b"{" if cid is None else b'{"id": ' + cid + b", ") + body


def qemu_return(value: bytes, cid: bytes | None) -> bytes:
    """A success line laid out as QEMU lays it out (``return`` first); checked likewise."""
    return b'{"return": ' + value + (b"" if cid is None else b', "id": ' + cid) + b"}\r\n"


# -- QEMU's replies, recorded ----------------------------------------------------------------


class Monitor:
    """A blocking QMP connection that keeps QEMU's lines as written (with ``\r\n``)."""

    def __init__(self, path: str) -> None:
        deadline = time.monotonic() + 10
        while True:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(10)
            try:
                self.sock.connect(path)
                break
            except ConnectionRefusedError:
                # QEMU's listen backlog is 1: right after a close it may refuse for a moment.
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        self.buf = b""
        self.greeting = self.line()

    def line(self) -> bytes:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(f"QEMU closed the monitor; partial: {self.buf!r}")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line + b"\n"

    def ask(self, raw: bytes) -> bytes:
        """QEMU's reply line to ``raw`` (events, none expected, are passed over)."""
        self.sock.sendall(raw)
        while True:
            line = self.line()
            if not line.startswith(b'{"timestamp": '):
                return line

    def close(self) -> None:
        self.sock.close()


@dataclass(frozen=True)
class Recording:
    version: tuple[int, int, int]
    replies: dict[str, dict[bytes, bytes]]  # state -> raw message -> QEMU's reply line


def record(version: str = RECORDED_VERSION) -> Recording:
    """Every message of :data:`MESSAGES` (but the oversized ones) to a real QEMU, in each state.

    Negotiation mode: on one connection until a message ends it, then on a new one.  The
    negotiated states: one connection each, one message at a time.  Nothing the messages run
    changes QEMU (``-M none``, stopped; the commands are queries or fail).
    """
    raws = [raw for kind in MESSAGES.values() for raw, _ in kind if raw not in OVER_LIMIT]
    tables: dict[str, dict[bytes, bytes]] = {NEGOTIATING: {}, PLAIN: {}, OOB: {}}
    with QemuProcess(version, "-M", "none") as qemu:
        conn: Monitor | None = None
        for raw in raws:
            conn = conn or Monitor(qemu.sock_path)
            tables[NEGOTIATING][raw] = reply = conn.ask(raw)
            if reply.startswith(b'{"return": '):
                conn.close()
                conn = None
        if conn is not None:
            conn.close()
        for state, caps in [(PLAIN, b"[]"), (OOB, b'["oob"]')]:
            conn = Monitor(qemu.sock_path)
            greeting = json.loads(conn.greeting)["QMP"]
            assert "oob" in greeting["capabilities"], greeting
            negotiate = b'{"execute": "qmp_capabilities", "arguments": {"enable": %s}}' % caps
            assert conn.ask(negotiate) == b'{"return": {}}\r\n'
            for raw in raws:
                tables[state][raw] = conn.ask(raw)
            conn.close()
    v = greeting["version"]["qemu"]
    return Recording((v["major"], v["minor"], v["micro"]), tables)


def check_recording(rec: Recording) -> None:
    """What the machine states by hand agrees with what QEMU wrote: the ids as QEMU writes
    them back (:data:`INBAND_IDS`, :data:`OOB_IDS`), and the layouts of :func:`qemu_error` and
    :func:`qemu_return`, on every recorded error with an id and every empty return."""
    for kind, pool in MESSAGES.items():
        for raw, cid in pool:
            for state, table in rec.replies.items():
                if raw not in table or cid is None:
                    continue
                reply = json.loads(table[raw])
                if "error" in reply:
                    error = reply["error"]
                    expected = qemu_error(error["desc"], cid, error["class"])
                elif reply["return"] == {}:
                    expected = qemu_return(b"{}", cid)
                else:
                    continue
                assert table[raw] == expected, (kind, state, raw, table[raw])


@pytest.fixture(scope="module")
def recording() -> Recording:
    rec = record()
    check_recording(rec)
    return rec


@dataclass(eq=False)
class Ticket:
    """One client message and the reply it is owed."""

    n: int
    raw: bytes
    inband: bool  # in order with the other in-band replies, or at once (exec-oob path)
    reply: bytes | None = None  # known once decided locally or answered upstream
    command: bool = False  # goes upstream
    oob: bool = False  # an exec-oob command
    client_id: bytes | None = None
    name: str = ""
    fds_expected: bool = False
    negotiates: bool = False  # its reply is the one that ends negotiation mode
    emitted: int = 0


@dataclass(eq=False)
class Model:
    """One session and what the model expects of it."""

    s: Session
    offered: frozenset[str]
    max_queued: int
    negotiated: bool = False
    oob: bool = False
    negotiation_seen: bool = False  # the client has its successful negotiation reply
    pending: bytearray = field(default_factory=bytearray)  # written, not yet fed
    fed_to: int = 0  # stream offset fed so far
    # Messages written: (stream offsets of their start and end, bytes, their id as QEMU
    # would echo it).
    ends: deque[tuple[int, int, bytes, bytes | None]] = field(default_factory=deque)
    written: int = 0  # stream offset written so far
    inband: deque[Ticket] = field(default_factory=deque)  # in-band replies owed, in order
    at_once: list[Ticket] = field(default_factory=list)  # at-once replies owed
    to_dispatch: deque[Ticket] = field(default_factory=deque)  # commands not yet out
    upstream: deque[tuple[Ticket, Command]] = field(default_factory=deque)  # in-band, FIFO
    upstream_oob: list[tuple[Ticket, Command]] = field(default_factory=list)
    tickets: list[Ticket] = field(default_factory=list)
    transcript: list[bytes] = field(default_factory=list)
    pipes: list[tuple[int, int]] = field(default_factory=list)  # (read end given, write end)
    fd_batch: int | None = None  # the read end the session should hold
    half_closed: bool = False
    closed: bool = False


class SessionMachine(RuleBasedStateMachine):
    recording: ClassVar[Recording]  # set by the test, from the fixture

    def __init__(self) -> None:
        super().__init__()
        self.dialect = Dialect(self.recording.version)
        self.models: list[Model] = []
        self.next_ticket = 0
        self.next_uid = 1000

    # -- helpers -----------------------------------------------------------------------------

    @staticmethod
    def pick(data: st.DataObject, models: list[Model]) -> Model | None:
        """One of ``models`` (rules have no preconditions: a rule with nothing to act on is a
        no-op, which keeps hypothesis from aborting examples while it looks for one)."""
        return data.draw(st.sampled_from(models)) if models else None

    def live(self) -> list[Model]:
        return [m for m in self.models if not m.closed]

    def writable(self) -> list[Model]:
        return [m for m in self.models if not m.closed and not m.half_closed]

    def register(self, m: Model, raw: bytes, cid: bytes | None) -> Ticket:
        """A message whose last byte the session has now been fed: decide what it is owed,
        in stream order, from the negotiation state the earlier messages left."""
        self.next_ticket += 1
        t = Ticket(self.next_ticket, raw, inband=True)
        m.tickets.append(t)
        if raw in OVER_LIMIT:
            t.reply = OVER_LIMIT_REPLY
            m.inband.append(t)
            return t
        state = OOB if m.oob else PLAIN if m.negotiated else NEGOTIATING
        qemu = self.recording.replies[state][raw]  # what QEMU wrote, in this state
        if raw in PARSE_INPUTS:
            t.reply = qemu
            m.inband.append(t)
            return t
        value = parse(raw)
        assert isinstance(value, dict)
        t.client_id = cid
        answer = json.loads(qemu)
        if not m.negotiated:
            # Negotiation is each client's own: the session answers everything meanwhile.
            t.reply = qemu
            enable = value.get("arguments", {}).get("enable", [])
            if "return" in answer and "oob" in enable and "oob" not in m.offered:
                # monitor/qmp-cmds-control.c qmp_caps_accept(), after every other check; no
                # QEMU here offers a monitor without oob, so this one reply is stated.
                t.reply = qemu_error("Capability oob not available", cid)
            elif "return" in answer:
                t.negotiates = True
                m.negotiated = True
                m.oob = "oob" in enable
            m.inband.append(t)
            return t
        # QEMU answers an exec-oob-shaped message from its I/O thread when OOB is on, so its
        # reply may overtake; otherwise in order (monitor/qmp.c handle_qmp_command()).
        at_once = m.oob and oob_shaped(value)
        if "error" in answer and answer["error"]["desc"].startswith("QMP input"):
            t.reply = qemu  # refused before any command runs: the session answers
            t.inband = not at_once
            (m.inband if t.inband else m.at_once).append(t)
            return t
        t.command = True
        t.oob = at_once
        t.inband = not at_once
        t.name = value["exec-oob" if at_once else "execute"]
        t.fds_expected = t.name == "getfd" and not t.oob  # exec-oob never carries them
        (m.inband if t.inband else m.at_once).append(t)
        m.to_dispatch.append(t)
        return t

    def feed(self, m: Model, size: int, cuts: list[int]) -> None:
        """Feed the next ``size`` written bytes in the chunks ``cuts`` makes."""
        data = bytes(m.pending[:size])
        del m.pending[:size]
        bounds = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
        for a, b in itertools.pairwise(bounds):
            chunk = data[a:b]
            m.fed_to += len(chunk)
            # Messages that end inside this chunk are owed their replies from now on; one
            # over the size limit as soon as that many of its bytes are in.
            while m.ends and (m.ends[0][1] <= m.fed_to or m.fed_to - m.ends[0][0] > MAX_MESSAGE):
                _, _, raw, cid = m.ends.popleft()
                self.register(m, raw, cid)
            self.output(m, m.s.receive(chunk))

    def output(self, m: Model, items: list[Command | bytes | Notice]) -> None:
        """What the session hands the route: replies to write, commands to send upstream."""
        for item in items:
            if isinstance(item, Command):
                self.dispatch(m, item)
            elif isinstance(item, bytes):
                self.emit(m, item)
        assert m.s.queued <= m.max_queued

    def emit(self, m: Model, data: bytes) -> None:
        assert data.endswith(b"\r\n") and data.count(b"\r\n") == 1, data
        m.transcript.append(data)
        for t in m.at_once:
            if t.reply == data and not t.emitted and not t.command:
                t.emitted += 1
                m.at_once.remove(t)
                return
        assert m.inband, f"an unexpected reply {data!r}"
        head = m.inband.popleft()
        assert head.reply is not None, f"{data!r} went out before the reply to {head.raw!r}"
        assert data == head.reply, (data, head.raw, head.reply)
        head.emitted += 1
        if head.negotiates:
            m.negotiation_seen = True
        if head.raw in PARSE_INPUTS or head.raw in OVER_LIMIT:
            assert b'"id"' not in data  # parse errors never carry an id

    def dispatch(self, m: Model, cmd: Command) -> None:
        assert m.to_dispatch, f"an unexpected command {cmd.value!r}"
        t = m.to_dispatch.popleft()
        assert cmd.value == parse(t.raw) and cmd.name == t.name and cmd.oob == t.oob
        assert cmd.client_id == t.client_id
        if t.fds_expected and m.fd_batch is not None:
            assert cmd.fds == [m.fd_batch]
            m.fd_batch = None
        else:
            assert not cmd.fds
        for fd in m.s.hand_over_fds(cmd):  # the route's stream closes them once sent
            os.close(fd)
        self.next_uid += 1
        sent = json.loads(cmd.wire(self.next_uid))  # strict JSON: what QEMU reads
        original = parse(t.raw)
        assert sent == {**original, "id": self.next_uid}, (sent, original)
        (m.upstream_oob if cmd.oob else m.upstream).append((t, cmd))

    def answer(self, m: Model, t: Ticket, cmd: Command, error: bool) -> None:
        uid = cmd.value["id"]  # the upstream id Command.wire wrote
        assert isinstance(uid, int)
        if error:
            line = qemu_error(f"e{t.n}", b"%d" % uid)
            t.reply = qemu_error(f"e{t.n}", t.client_id)
            msg: dict[str, Any] = {"id": uid, "error": {"class": "GenericError", "desc": f"e{t.n}"}}
        else:
            line = qemu_return(b'{"t": %d}' % t.n, b"%d" % uid)
            t.reply = qemu_return(b'{"t": %d}' % t.n, t.client_id)
            msg = {"return": {"t": t.n}, "id": uid}
        data = replies.restore_id(line, uid, cmd.client_id, msg)  # as the route does
        assert data == t.reply, (data, t.reply)
        if t.oob:
            m.at_once.remove(t)
            out = m.s.complete(cmd, data)
            assert out == [data]  # exec-oob replies go at once
            t.emitted += 1
            m.transcript.append(data)
        else:
            for line_out in m.s.complete(cmd, data):
                self.emit(m, line_out)
        # The route then lets held requests through.
        self.output(m, m.s.resume() if m.s.held() else [])

    def check_pipes(self, m: Model, open_batch: int | None) -> None:
        """Every pipe is closed at its read end, except the batch the session still holds
        (the newest pipe, when ``open_batch`` is set: descriptor numbers are reused)."""
        for index, (r, w) in enumerate(m.pipes):
            try:
                os.write(w, b"x")
                broken = False
            except BrokenPipeError:
                broken = True
            held = open_batch is not None and index == len(m.pipes) - 1
            assert broken != held, f"pipe {index} (read end {r}): broken={broken}"

    def settle(self, m: Model) -> None:
        """Answer everything upstream (as QEMU would), until nothing is outstanding."""
        while m.upstream or m.upstream_oob:
            if m.upstream_oob:
                t, cmd = m.upstream_oob.pop(0)
                self.answer(m, t, cmd, error=False)
            else:
                t, cmd = m.upstream.popleft()
                self.answer(m, t, cmd, error=False)
        assert not m.s.held() and m.s.queued == 0
        for t in m.tickets:
            assert t.emitted == 1, f"{t.raw!r} got {t.emitted} replies"
        assert not m.inband and not m.at_once and not m.to_dispatch

    def end(self, m: Model) -> None:
        """The route ends the session (``Route.end``): it releases the descriptors it holds."""
        m.s.close()
        m.closed = True
        m.fd_batch = None
        self.check_pipes(m, None)
        for _, w in m.pipes:
            os.close(w)
        m.pipes.clear()

    # -- rules -------------------------------------------------------------------------------

    @initialize(
        oob_offered=st.booleans(),
        max_queued=st.integers(1, 5),
        negotiate=st.sampled_from([0, 1, 2, 2]),
    )
    def first_session(self, oob_offered: bool, max_queued: int, negotiate: int) -> None:
        self.open_session(oob_offered, max_queued, negotiate)

    @rule(
        oob_offered=st.booleans(),
        max_queued=st.integers(1, 5),
        negotiate=st.sampled_from([0, 1, 2, 2]),
    )
    def open_session(self, oob_offered: bool, max_queued: int, negotiate: int) -> None:
        """A greeted client; most negotiate at once (with oob, when offered, or without)."""
        if len(self.live()) >= 2:
            return
        offered = frozenset({"oob"}) if oob_offered else frozenset()
        s = Session(
            len(self.models) + 1, offered, MAX_MESSAGE, max_queued=max_queued, dialect=self.dialect
        )
        m = Model(s, offered, max_queued)
        self.models.append(m)
        if negotiate:
            enable = b'"oob"' if negotiate == 2 and oob_offered else b""
            self.write(m, with_id(CAPS % enable, None), None, b"")
            self.feed(m, len(m.pending), [])

    def write(self, m: Model, raw: bytes, cid: bytes | None, separator: bytes) -> None:
        """The client writes a message (the session is fed it later, in pieces)."""
        m.pending += raw + separator
        m.written += len(raw) + len(separator)
        end = m.written - len(separator)
        m.ends.append((end - len(raw), end, raw, cid))

    @rule(
        data=st.data(),
        kind=st.sampled_from(KINDS),
        size=st.integers(0, 400),
        cuts=st.lists(st.integers(0, 400), max_size=4),
    )
    def client_writes(self, data: st.DataObject, kind: str, size: int, cuts: list[int]) -> None:
        m = self.pick(data, self.writable())
        if m is None:
            return
        raw, cid = data.draw(st.sampled_from(MESSAGES[kind]))
        self.write(m, raw, cid, data.draw(st.sampled_from([b"", b" ", b"\r\n", b"\t\n "])))
        if data.draw(st.booleans()):  # each object in a write of its own
            cuts = cuts + [i for i, byte in enumerate(m.pending) if byte == ord("{")]
        self.feed(m, min(size, len(m.pending)), cuts)

    @rule(data=st.data(), cuts=st.lists(st.integers(0, 400), max_size=4))
    def client_writes_the_rest(self, data: st.DataObject, cuts: list[int]) -> None:
        m = self.pick(data, [m for m in self.writable() if m.pending])
        if m is None:
            return
        self.feed(m, len(m.pending), cuts)

    @rule(data=st.data())
    def client_sends_a_descriptor(self, data: st.DataObject) -> None:
        """``qemu.qmp``'s ``send_fd_scm()``: a lone space byte carrying the batch."""
        m = self.pick(data, [m for m in self.writable() if not m.pending])
        if m is None:
            return
        r, w = os.pipe()
        m.pipes.append((r, w))
        self.output(m, m.s.receive(b" ", [r]))
        m.fed_to += 1
        m.written += 1
        m.fd_batch = r
        self.check_pipes(m, r)  # the older batch was closed at once

    @rule(data=st.data(), error=st.booleans())
    def qemu_answers_in_band(self, data: st.DataObject, error: bool) -> None:
        m = self.pick(data, [m for m in self.live() if m.upstream])
        if m is None:
            return
        t, cmd = m.upstream.popleft()
        self.answer(m, t, cmd, error)

    @rule(data=st.data(), error=st.booleans())
    def qemu_answers_exec_oob(self, data: st.DataObject, error: bool) -> None:
        m = self.pick(data, [m for m in self.live() if m.upstream_oob])
        if m is None:
            return
        t, cmd = m.upstream_oob.pop(data.draw(st.integers(0, len(m.upstream_oob) - 1)))
        self.answer(m, t, cmd, error)

    @rule()
    def qemu_emits_an_event(self) -> None:
        for m in self.live():
            if m.s.negotiated:  # Route._event
                assert m.negotiation_seen, "an event would reach a client before it negotiated"
                m.transcript.append(EVENT)

    @rule(data=st.data(), now=st.integers(0, 3))
    def client_half_closes(self, data: st.DataObject, now: int) -> None:
        """Read-EOF: whatever is unsent stays unsent (a message cut off by the EOF is lost)."""
        m = self.pick(data, self.writable())
        if now or m is None:
            return  # rarer than the other rules, or few sessions would see much traffic
        m.half_closed = True
        m.pending.clear()
        m.ends.clear()

    @rule(data=st.data())
    def half_closed_session_finishes(self, data: st.DataObject) -> None:
        """QEMU answers everything; then the session has nothing left and the route ends it."""
        m = self.pick(data, [m for m in self.live() if m.half_closed])
        if m is None:
            return
        self.settle(m)
        self.end(m)

    @rule(data=st.data(), now=st.integers(0, 3))
    def client_disconnects(self, data: st.DataObject, now: int) -> None:
        """The client vanishes: replies still to come are dropped by the route."""
        m = self.pick(data, self.live())
        if now or m is None:
            return
        self.end(m)

    @rule(data=st.data())
    def quiescent(self, data: st.DataObject) -> None:
        """With every message fed and every command answered, every message has its reply."""
        m = self.pick(data, self.writable())
        if m is None:
            return
        self.feed(m, len(m.pending), [])
        self.settle(m)

    # -- invariants --------------------------------------------------------------------------

    @invariant()
    def negotiation_state_matches(self) -> None:
        for m in self.live():
            assert m.s.negotiated == m.negotiated
            assert m.s.oob == m.oob
            if m.s.negotiated:
                assert m.negotiation_seen or any(t.negotiates for t in m.inband)

    @invariant()
    def outstanding_work_shows(self) -> None:
        """The route ends a half-closed session once it is ``finished``: that must mean no
        reply at all is still owed (in-band, exec-oob, or for a request held unread)."""
        for m in self.live():
            # (A message not complete yet is no request: at EOF it is dropped, as by QEMU.)
            owed = bool(m.inband or m.at_once)
            assert m.s.finished == (not owed), (
                m.s.finished,
                [t.raw for t in [*m.inband, *m.at_once]],
            )
            if m.s.queued == 0 and not m.s.held():
                assert not m.inband, [t.raw for t in m.inband]
            assert m.s.queued <= m.max_queued

    @invariant()
    def no_event_before_the_negotiation_reply(self) -> None:
        for m in self.live():
            if EVENT in m.transcript:
                first = m.transcript.index(EVENT)
                assert any(line.startswith(b'{"return": {}') for line in m.transcript[:first])

    def teardown(self) -> None:
        for m in self.models:
            if not m.closed:
                if not m.half_closed:
                    self.feed(m, len(m.pending), [])
                self.settle(m)
                self.end(m)
            for _, w in m.pipes:
                with contextlib.suppress(OSError):
                    os.close(w)


SETTINGS = settings(
    max_examples=200,
    stateful_step_count=50,
    deadline=None,
    report_multiple_bugs=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


def test_session_against_recorded_qemu(recording: Recording) -> None:
    class Machine(SessionMachine):
        pass

    Machine.recording = recording
    run_state_machine_as_test(Machine, settings=SETTINGS)


def test_the_recording_covers_every_state_and_message(recording: Recording) -> None:
    """The model reads a reply for every message it writes, in each state; and the recording
    holds what the model relies on: QEMU refuses the malformed kinds in its top-level checks
    in every state, and lets the well-formed commands through once negotiated."""
    raws = {raw for pool in MESSAGES.values() for raw, _ in pool if raw not in OVER_LIMIT}
    for state in (NEGOTIATING, PLAIN, OOB):
        assert set(recording.replies[state]) == raws
        for raw, _ in MESSAGES["member"] + MESSAGES["clash"]:
            assert b'"desc": "QMP input member ' in recording.replies[state][raw]
        for raw, _ in MESSAGES["oob"]:
            refused = b'"desc": "QMP input member \'exec-oob\' is unexpected"'
            assert (refused in recording.replies[state][raw]) == (state != OOB)
    for raw, _ in MESSAGES["cmd"]:
        assert b'"desc": "QMP input' not in recording.replies[PLAIN][raw]
