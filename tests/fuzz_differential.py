"""A differential fuzz target: raw client bytes to real QEMU directly and through ``qmp-proxy``.

    python -m tests.fuzz_differential --seconds 60                    # per version, fresh seeds
    python -m tests.fuzz_differential --seconds 60 --seed 7           # the same cases every time
    python -m tests.fuzz_differential --versions 10.0 --case-seed 123 # one case again
    python -m tests.fuzz_differential --replay case.json --minimise   # shrink a finding

The framer decides where one client message ends; QEMU's lexer decides it too.  Where they
disagree a client can hide a command from the proxy's policy or desynchronise the shared
monitor, so the proxy is checked against QEMU itself, with inputs built to find such a
disagreement.

Set-up, per version: two identical QEMUs (``-M none``, started ``-S`` and then given ``cont``),
one reached directly (A), one (B) through a real ``qmp-proxy`` process with two listeners, an
unrestricted one and a restricted one (``allow = ["query-*"]``, from a TOML file this module
writes).  Between the proxy and QEMU B a passive relay records every byte each way.

Cases (:class:`Gen`): QMP streams built from QEMU's JSON grammar (json-lexer.c): numbers in
every sign, leading-zero, fraction and exponent form (``0E5``, ``0e5``, ``-0e1``, ``00``,
``1.``, ``1e400``, 20- and 400-digit integers), strings in both quote styles with every escape,
valid and not (``\\u`` surrogates, noncharacters, raw invalid UTF-8), keywords and
near-keywords, whitespace and control bytes (0x00-0x1F, 0x7F, 0xFE, 0xFF), nesting up to and
past QEMU's 1024 levels, long tokens, duplicate keys, odd top-level members and ids of every
JSON type; mostly harmless commands (``query-*``, unknown ones, ``qmp_capabilities``) with
side-effect commands (``stop``, ``cont``, ``system_reset``, ``human-monitor-command``)
embedded where a framer that disagrees with QEMU would let them through: inside strings,
after lexical errors, after ``0E5``, after 0xFF, inside nested objects and ids.  Some streams
are then mutated byte-wise, some are plain random bytes.  Each is sent in random chunks, after
negotiation or (sometimes) during it, followed by a parser reset byte and a sentinel command.

Oracles, per case:

1. Differential (unrestricted listener): the same stream to A directly and to B through the
   proxy; the reply lines up to the sentinel's must be equal byte for byte (the greeting and
   negotiation included; event timestamps normalised).  Both VMs are put in the same runstate
   first and must be in the same runstate after.  A mismatch is run twice more: it is a finding
   unless QEMU A itself answered differently between runs (then QEMU is nondeterministic on that
   input, counted as ``flaky``).
2. Policy (restricted listener): the same stream through the restricted listener, with QEMU B
   running, paused or in prelaunch.  What the relay recorded from the proxy since the case
   began is decoded with an independent parser (``json.JSONDecoder.raw_decode`` in a loop: the
   proxy writes strict JSON, one object after another); every message must name a command the
   policy allows (``query-*``, ``qmp_capabilities``); QEMU must have emitted no event, and B's
   ``query-status`` must be unchanged.
3. Both phases: the proxy's upstream bytes decode as strict JSON objects, each with an id;
   every reply QEMU wrote carries one of those ids (an id-less or unknown reply means QEMU read
   the bytes differently from the proxy's intent); the upstream connection was not
   re-established; the proxy (logging at ``warning``) logged nothing; both QEMUs and the proxy
   are still alive.

A finding prints the case (as JSON: the stream in hex and every parameter, for ``--replay``)
and what differed; the run stops after ``--max-findings`` (default 1) and exits 1.  The last
line is the summary, e.g. ``fuzz_differential: 7.2,10.0: 1234 cases in 600 s, 0 findings
(seed 42)``; ``--seconds`` is per version.

Known differences that are not bugs, excluded narrowly:

- Message size: the proxy bounds a client message at 1 MiB (``max_message``), QEMU at 64 MiB.
  Generated streams stay under 640 KiB.
- ``exec-oob`` replies with OOB on: QEMU dispatches a message shaped like ``exec-oob`` (the
  member present, ``execute`` absent) from its I/O thread as soon as it parses it, so its reply
  overtakes in-band replies by thread timing; through the proxy it takes a round trip to QEMU
  and may come after replies the proxy gives itself.  The protocol leaves the order of such
  replies open.  When the session may have OOB on, reply lines carrying the id of such a
  message (generated ``exec-oob`` commands have ids ``"oob-N"``) are compared as a multiset,
  the others in order.
- ``query-qmp-schema`` (the proxy adds ``capabilities`` to ``migrate``/``migrate-incoming`` when
  it backports them) and ``migrate``/``migrate-incoming`` with ``capabilities`` (split by the
  proxy, refused by QEMU): never generated.
- ``quit`` (and anything else that ends QEMU) only ever appears inside a string of a message
  that starts the stream (a lexical error earlier could make QEMU's recovery skip the quote);
  streams that are mutated carry no ``human-monitor-command``.
- QEMU's own abort: with OOB on, QEMU suspends reading a monitor once 7 requests are queued,
  but a byte already read can still complete two (``1}``: a top-level number, then a stray
  brace), and the 9th trips ``assert(mon->qmp_requests->length < QMP_REQ_QUEUE_LEN_MAX)``
  (``1}`` repeated a few thousand times kills QEMU 7.2 and 10.0).  The proxy answers malformed
  input itself and keeps at most 7 in-band commands in flight, so QEMU B is not exposed.  When
  QEMU A dies so, the case still runs on the restricted listener and the health checks (QEMU B
  and the proxy must survive the same stream), is counted, and the harness restarts.

Without OOB, QEMU reads no further input while a command is queued, so it answers a message
shaped like ``exec-oob`` (an error there) strictly in order; the proxy answers it at once,
ahead of replies still due for earlier commands.  That is a proxy bug (reported); until it is
fixed, ``--tolerate-exec-oob-order`` lets a long run look past it (those replies, found by
position, compared as a multiset).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import itertools
import json
import random
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from proxy import qjson, qmp
from proxy.framing import Framer, Message
from tests.fuzz_framer import LEXER_ATOMS
from tests.proxyproc import ProxyProcess
from tests.qemu import QEMU_BINARIES, QemuProcess

SENTINEL_ID = "qp-sentinel"
SENTINEL = b'{"execute":"query-version","id":"qp-sentinel"}'
# During negotiation: answered whether or not the stream completed it.
NEGOTIATION_SENTINEL = b'{"execute":"qmp_capabilities","id":"qp-sentinel"}'
OOB_TAG = b'"id": "oob-'
EVENT = re.compile(rb'\{"timestamp": \{\}, "event": ')
ALLOW = ("query-*",)
MAX_STREAM = 640 << 10  # well under the proxy's 1 MiB max_message
CASE_TIMEOUT = 8.0  # seconds for a sentinel's reply
RUNSTATES = ("running", "paused", "prelaunch")
# QEMU's own bug (see the module docstring): a client with OOB on can make QEMU abort.
QEMU_QUEUE_ABORT = "Assertion `mon->qmp_requests->length < QMP_REQ_QUEUE_LEN_MAX' failed"
TIMESTAMP = re.compile(rb'"timestamp": \{"seconds": -?\d+, "microseconds": -?\d+\}')

# -- the generator ----------------------------------------------------------------------------

SIGNS = ["", "", "", "", "-", "-", "+", "--"]
WHOLES = [
    "0",
    "0",
    "1",
    "9",
    "10",
    "123",
    "00",
    "01",
    "",
    "9223372036854775807",
    "9223372036854775808",
    "18446744073709551615",
    "18446744073709551616",
    "12345678901234567890",
    "9" * 400,
]
FRACTIONS = ["", "", "", "", ".", ".0", ".5", ".05", ".50", "..5", ".e"]
EXPONENTS = [
    "",
    "",
    "",
    "",
    "e",
    "E",
    "e5",
    "E5",
    "e+5",
    "e-5",
    "E-05",
    "e+",
    "e0",
    "e400",
    "e-400",
    "E400",
    "ee5",
    "e5.5",
    "e+-1",
]
SPECIAL_NUMBERS = [
    "0E5",
    "0e5",
    "-0e1",
    "-0E+2",
    "0E-1",
    "00",
    "1.",
    "1e400",
    "-1e400",
    "0.0e5",
    "-0",
    "-0.0",
    "1E+2",
    "4.9e-324",
    "1.7976931348623157e308",
    "2.2250738585072014e-308",
    "0.1",
    "-9223372036854775808",
    "-9223372036854775809",
    "12345678901234567890",
    "-12345678901234567890",
    "1" * 400,
    "0." + "0" * 30 + "1",
]
KEYWORDS = ["true", "false", "null"]
NEAR_KEYWORDS = [
    "nul",
    "nulll",
    "truex",
    "True",
    "tru",
    "fals",
    "falsey",
    "NULL",
    "NaN",
    "Infinity",
    "-Infinity",
    "inf",
    "nan",
    "undefined",
    "t",
    "e",
    "E5",
    "0x10",
    "true1",
    "null_",
]
GOOD_ESCAPES = [
    b'\\"',
    b"\\'",
    b"\\\\",
    b"\\/",
    b"\\b",
    b"\\f",
    b"\\n",
    b"\\r",
    b"\\t",
    b"\\u0041",
    b"\\u00e9",
    b"\\u00E9",
    b"\\u20ac",
    b"\\uD83D\\uDE00",
    b"\\ud83d\\ude00",
    b"\\u0000",
    b"\\u001f",
    b"\\u007f",
    b"\\u0080",
    b"\\uFFFD",
]
ODD_ESCAPES = [
    b"\\uFFFE",
    b"\\uffff",
    b"\\uFDD0",
    b"\\ufdef",
    b"\\uD800",
    b"\\uDC00",
    b"\\uDE00\\uD83D",
    b"\\uD800\\u0041",
    b"\\uD800\\uD800",
    b"\\uDBFF\\uDFFF",
    b"\\uD83F\\uDFFE",
    b"\\x41",
    b"\\a",
    b"\\0",
    b"\\U0041",
    b"\\u12",
    b"\\u12G4",
    b"\\u",
    b"\\ ",
    b"\\e",
    b"\\\xff",
    b"\\'\\'",
]
RAW_TEXT = [
    b"a",
    b"abc",
    b" ",
    b"execute",
    b"stop",
    b"query-status",
    b"{",
    b"}",
    b"[",
    b"]",
    b":",
    b",",
    b"0E5",
    b"id",
    "\u00e9".encode(),
    "\u20ac".encode(),
    "\U0001f600".encode(),
    b"\x7f",
]
ODD_RAW = [
    b"\xef\xbf\xbe",
    b"\xef\xbf\xbf",
    b"\xef\xb7\x90",
    b"\xc0\x80",
    b"\xed\xa0\x80",
    b"\xf4\x90\x80\x80",
    b"\x80",
    b"\xc3",
    b"\xe2\x82",
    b"\xf8\x88\x80\x80\x80",
    b"\xfc\x84\x80\x80\x80\x80",
    b"\xc1\xbf",
    b"\xe0\x80\xaf",
    b"\xfe",
    b"\xff",
    b"\x00",
    b"\x01",
    b"\x09",
    b"\x0a",
    b"\x1f",
]
CONTROLS = [bytes([b]) for b in range(0x20)] + [b"\x7f", b"\xfe", b"\xff"]
WHITESPACE = [b"", b"", b"", b" ", b"\n", b"\r\n", b"\t", b"  \n\t "]
KEYS = ["a", "b", "id", "execute", "arguments", "exec-oob", "", "x y", "\u00e9", "A"]
HARMLESS = [
    "query-status",
    "query-status",
    "query-name",
    "query-version",
    "query-migrate",
    "query-uuid",
    "query-kvm",
    "qmp_capabilities",
    "no-such-command",
    "query-no-such",
    "Query-Status",
    "query-status ",
    "",
    "x" * 300,
    "query-\u00e9",
    "query-status\u0000",
]
CAPABILITIES_ARGS = [
    b'{"enable":["oob"]}',
    b'{"enable":[]}',
    b'{"enable":["x"]}',
    b'{"enable":"oob"}',
    b'{"enable":null}',
    b'{"enable":["oob","oob"]}',
    b'{"enable":[1]}',
    b"{}",
]
# No letter q: no mutation or truncation can make HMP's quit of them.
HMP = [
    "stop",
    "cont",
    "c",
    "system_reset",
    "info status",
    "info version",
    "info name",
    "help stop",
    "nonsense",
    "",
    "info",
]
SIDE_EFFECTS = ["stop", "cont", "system_reset"]
OOB_COMMANDS = [
    ("yank", b'{"instances":[]}'),
    ("migrate-pause", None),
    ("query-status", None),
    ("no-such", None),
]
BREAKERS = [
    b"0E5",
    b"-0E+2",
    b"0E-1",
    b"0e5",
    b"-0e1",
    b"00",
    b"01",
    b"1.",
    b"1.e5",
    b".5",
    b"-",
    b"+1",
    b"1e",
    b"0x1",
    b"\xff",
    b"\xfe",
    b"\x00",
    b"\x01",
    b"\x1f",
    b"\x7f",
    b"'",
    b'"',
    b"\\",
    b"nul",
    b"truex",
    b"True",
    b'"\\x"',
    b"'\\q'",
    b'"\\uD800"',
    b'"\\u12G4"',
    b'"\xc0\x80"',
    b'"\xef\xbf\xbe"',
    b'"\\uFFFE"',
    b"]",
    b"}",
    b",",
    b"::",
    b"[",
    b"{",
    b"/*",
    b"#",
    b'"a\nb"',
    b'"\t"',
    b"1e400",
    b"'a\"b'",
    b'"a\\\\"',
    b"'a\\\\'",
    b"\xc3",
    b"\xed\xa0\x80",
]
# Mutation atoms: the bytes the lexer and the framer treat specially (never a 'q').
ATOMS = [
    *LEXER_ATOMS,
    b"0E5",
    b"0e5",
    b"E",
    b"e",
    b"1.",
    b"1e",
    b"1e+",
    b"1e400",
    b"18446744073709551616",
    b"true",
    b"nul",
    b"nulls",
    b'"id"',
    b'"execute"',
    b'"exec-oob"',
    b'"arguments"',
    b'{"execute":"stop"}',
    b'{"execute":"cont"}',
]
SIGNIFICANT = b"{}[]:,\"'\\ \t\r\n0123456789-+.eEtrufalsn\x00\x01\x1f\x7f\xfe\xff\xc3\xa9"


@dataclass
class Case:
    """One input and how it is delivered; JSON-serialisable for ``--replay``."""

    stream: bytes
    kind: str = "replay"
    negotiate: bytes | None = b'{"execute":"qmp_capabilities"}'  # None: during negotiation
    cuts: list[int] = field(default_factory=list)  # chunk boundaries (offsets into stream)
    pause: float = 0.0  # seconds after the negotiation and after each chunk
    reset: bytes = b"\xff"  # ends whatever token the stream left open, before the sentinel
    state: str = "running"  # both VMs' runstate before the differential run
    restricted_state: str = "running"  # B's runstate before the restricted run

    def chunks(self) -> list[bytes]:
        bounds = sorted({c for c in self.cuts if 0 < c < len(self.stream)})
        edges = [0, *bounds, len(self.stream)]
        return [self.stream[a:b] for a, b in itertools.pairwise(edges) if b > a]

    def to_json(self) -> str:
        data = asdict(self)
        for key in ("stream", "negotiate", "reset"):
            data[key] = None if data[key] is None else data[key].hex()
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> Case:
        data = json.loads(text)
        for key in ("stream", "negotiate", "reset"):
            data[key] = None if data[key] is None else bytes.fromhex(data[key])
        return cls(**data)


class Gen:
    """Builds cases from one :class:`random.Random`: the same seed, the same case."""

    def __init__(self, rnd: random.Random) -> None:
        self.r = rnd
        self.oob_ids = 0
        self.hmp = True  # human-monitor-command allowed (not in streams that get mutated)

    def chance(self, p: float) -> bool:
        return self.r.random() < p

    # tokens

    def ws(self) -> bytes:
        if self.chance(0.01):
            return self.r.choice(CONTROLS)
        return self.r.choice(WHITESPACE)

    def number(self) -> bytes:
        if self.chance(0.35):
            return self.r.choice(SPECIAL_NUMBERS).encode()
        if self.chance(0.5):
            return str(self.r.choice([0, 1, -1, 7, 42, 1 << 31, -(1 << 63), 1 << 64])).encode()
        r = self.r
        return (
            r.choice(SIGNS) + r.choice(WHOLES) + r.choice(FRACTIONS) + r.choice(EXPONENTS)
        ).encode()

    def keyword(self) -> bytes:
        return self.r.choice(NEAR_KEYWORDS if self.chance(0.15) else KEYWORDS).encode()

    def string(self, text: str | bytes | None = None, *, odd: float = 0.12) -> bytes:
        """A string token in either quote style; ``text`` is escaped for it (if given), else
        made of random pieces, some of them invalid (with probability ``odd`` each)."""
        quote = b"'" if self.chance(0.25) else b'"'
        if text is not None:
            raw = text.encode() if isinstance(text, str) else text
            body = self._escape(raw, quote)
            if self.chance(0.5):  # control characters escaped, else raw (a lexical error)
                body = re.sub(rb"[\x00-\x1f]", lambda m: b"\\u%04x" % m[0][0], body)
            return quote + body + quote
        pieces: list[bytes] = []
        for _ in range(self.r.randint(0, 5)):
            roll = self.r.random()
            if roll < odd / 2:
                pieces.append(self.r.choice(ODD_ESCAPES))
            elif roll < odd:
                pieces.append(self.r.choice(ODD_RAW))
            elif roll < 0.45:
                pieces.append(self.r.choice(GOOD_ESCAPES))
            else:
                pieces.append(self._escape(self.r.choice(RAW_TEXT), quote))
        return quote + b"".join(pieces) + quote

    def _escape(self, raw: bytes, quote: bytes) -> bytes:
        out = raw.replace(b"\\", b"\\\\").replace(quote, b"\\" + quote)
        if self.chance(0.1) and out:  # a name spelled with an escape: "\u0073top" is "stop"
            at = self.r.randrange(len(out))
            ch = out[at : at + 1]
            if ch.isalnum() and ch.isascii():
                spelled = b"\\u%04x" % ord(ch) if self.chance(0.5) else b"\\u%04X" % ord(ch)
                out = out[:at] + spelled + out[at + 1 :]
        return out

    def key(self, name: str | None = None) -> bytes:
        return self.string(name if name is not None else self.r.choice(KEYS), odd=0.05)

    def obj(self, members: list[tuple[bytes, bytes]]) -> bytes:
        parts = [self.ws() + k + self.ws() + b":" + self.ws() + v + self.ws() for k, v in members]
        sep = b","
        if self.chance(0.02):
            sep = self.r.choice([b",,", b"", b";", b" , ,"])
        body = sep.join(parts)
        if self.chance(0.02):
            body += b","
        return b"{" + body + b"}"

    def array(self, items: list[bytes]) -> bytes:
        body = b",".join(self.ws() + i + self.ws() for i in items)
        if self.chance(0.02):
            body += b","
        return b"[" + body + b"]"

    def value(self, depth: int = 2) -> bytes:
        roll = self.r.random()
        if roll < 0.3:
            return self.number()
        if roll < 0.55:
            return self.string()
        if roll < 0.7 or depth <= 0:
            return self.keyword()
        if roll < 0.85:
            return self.array([self.value(depth - 1) for _ in range(self.r.randint(0, 3))])
        members = [(self.key(), self.value(depth - 1)) for _ in range(self.r.randint(0, 3))]
        if members and self.chance(0.15):  # a duplicate key
            members.append((members[0][0], self.value(0)))
        return self.obj(members)

    def id_value(self) -> bytes:
        roll = self.r.random()
        if roll < 0.3:
            return str(self.r.randint(-5, 1 << 20)).encode()
        if roll < 0.5:
            return self.string(self.r.choice(["x", "id-1", "", "\u00e9", "a\nb", "\U0001f600"]))
        return self.value(2)

    # messages

    def command(
        self,
        name: str,
        arguments: bytes | None = None,
        *,
        oob: bool = False,
        id_value: bytes | None = None,
        odd: float = 0.06,
    ) -> bytes:
        members = [(self.key("exec-oob" if oob else "execute"), self.string(name, odd=0))]
        if arguments is not None:
            members.append((self.key("arguments"), arguments))
        if id_value is not None:
            members.append((self.key("id"), id_value))
        elif self.chance(0.6):
            members.append((self.key("id"), self.id_value()))
        if self.chance(odd):
            extra = self.r.choice(["foo", "control", "exec-oob", "execute", "arguments", "id"])
            members.append((self.key(extra), self.value(1)))
        if self.chance(0.2):
            self.r.shuffle(members)
        return self.obj(members)

    def arguments(self) -> bytes | None:
        roll = self.r.random()
        if roll < 0.6:
            return None
        if roll < 0.75:
            return b"{}"
        if roll < 0.95:
            return self.obj([(self.key(), self.value(2)) for _ in range(self.r.randint(1, 3))])
        return self.r.choice([b"[]", b"null", b"1", b'"x"', b"true"])

    def harmless(self) -> bytes:
        name = self.r.choice(HARMLESS)
        if name == "qmp_capabilities" and self.chance(0.5):
            return self.command(name, self.r.choice(CAPABILITIES_ARGS))
        return self.command(name, self.arguments())

    def side_effect(self) -> bytes:
        if self.hmp and self.chance(0.3):
            line = self.obj([(self.key("command-line"), self.string(self.r.choice(HMP), odd=0))])
            return self.command("human-monitor-command", line, odd=0.02)
        args = b"{}" if self.chance(0.2) else None
        return self.command(self.r.choice(SIDE_EFFECTS), args, odd=0.02)

    def oob(self) -> bytes:
        name, args = self.r.choice(OOB_COMMANDS)
        self.oob_ids += 1
        return self.command(name, args, oob=True, id_value=b'"oob-%d"' % self.oob_ids, odd=0)

    def deep(self, payload: bytes | None = None) -> bytes:
        depth = self.r.choice([2, 10, 100, 1000, 1021, 1022, 1023, 1024, 1025, 1026, 1100])
        opener, closer = self.r.choice([(b"[", b"]"), (b'{"a":', b"}"), (b"{'a':[", b"]}")])
        if opener == b"{'a':[":
            depth //= 2
        inner = payload if payload is not None else self.value(0)
        close = depth if self.chance(0.7) else self.r.randint(0, depth)
        wrapped = opener * depth + inner + closer * close
        if self.chance(0.5):  # the nesting inside a command's arguments
            return self.command("query-status", self.obj([(self.key("a"), wrapped)]))
        return wrapped

    def long_string(self) -> bytes:
        size = self.r.choice([1000, 4095, 4096, 4097, 65536, 200_000])
        text = self.r.choice([b"a", b"\\n", b"\xc3\xa9", b'\\"'])
        quote = self.r.choice([b'"', b"'"])
        return quote + text * (size // len(text)) + quote

    def smuggle(self) -> bytes:
        """A side-effect command placed where a framer that disagrees with QEMU would miss it
        (or see it where QEMU does not)."""
        payload = self.side_effect()
        breaker = self.r.choice(BREAKERS)
        form = self.r.randrange(14)
        host = self.r.choice(["query-status", "query-name", "query-version"])
        k = self.key
        if form == 0:  # after a breaker inside the arguments
            return self.command(host, self.obj([(k("a"), breaker), (k("b"), payload)]))
        if form == 1:
            return self.command(host, self.obj([(k("a"), self.array([breaker, payload]))]))
        if form == 2:  # the id
            return self.command(host, self.obj([(k("b"), payload)]), id_value=breaker)
        if form == 3:  # top level, after an error
            return self.command(host, self.obj([(k("a"), breaker)])) + self.ws() + payload
        if form == 4:  # inside a string, escaped for its quote style
            return self.command(host, self.obj([(k("s"), self.string(payload, odd=0))]))
        if form == 5:  # single-quoted, raw double quotes inside
            body = payload.replace(b"\\", b"\\\\").replace(b"'", b"\\'")
            return self.command(host, self.obj([(k("s"), b"'" + body + b"'")]))
        if form == 6:  # a backslash at a string's end, then the payload
            tail = self.r.choice([b'"a\\\\"', b'"a\\\\\\"', b"'a\\\\'", b"'a\\\\\\''", b'"\\"'])
            return self.command(host, self.obj([(k("s"), tail + b"," + payload)]))
        if form == 7:
            return self.deep(payload)
        if form == 8:  # a long token first
            return self.command(host, self.obj([(k("s"), self.long_string()), (k("b"), payload)]))
        if form == 9:  # duplicate keys
            return self.r.choice(
                [
                    b'{"execute":"' + host.encode() + b'","execute":"stop"}',
                    b'{"execute":"stop","execute":"' + host.encode() + b'"}',
                    self.command(host, self.obj([(k("x"), b"1"), (k("x"), payload)])),
                ]
            )
        if form == 10:  # a lexical error mid-message, then the payload
            return b'{"execute":"' + host.encode() + b'","arguments":{"a":1' + breaker + payload
        if form == 11:  # an unterminated string, then the payload
            return b'{"execute":"' + host.encode() + b'","arguments":{"s":"abc' + payload
        if form == 12:  # quote styles mixed
            return (
                b"{'execute':'" + host.encode() + b"','arguments':{'a':\"it's\",'b':'say \"hi\"',"
                b"'c':" + payload + b"}}"
            )
        return self.command(host, self.obj([(k("a"), self.obj([(k("b"), payload)]))]))

    def garbage(self) -> bytes:
        size = self.r.randint(1, 200)
        if self.chance(0.5):
            return bytes(self.r.getrandbits(8) for _ in range(size))
        return bytes(self.r.choice(SIGNIFICANT) for _ in range(size))

    def piece(self) -> bytes:
        roll = self.r.random()
        if roll < 0.38:
            return self.harmless()
        if roll < 0.58:
            return self.smuggle()
        if roll < 0.66:
            return self.side_effect()
        if roll < 0.71:
            return self.oob()
        if roll < 0.76:
            return self.value(2)
        if roll < 0.82:
            return self.garbage()[:40]
        if roll < 0.85:
            return self.deep()
        if roll < 0.87:
            return self.command("query-name", self.obj([(self.key("s"), self.long_string())]))
        if roll < 0.93:
            return self.command("qmp_capabilities", self.r.choice([None, *CAPABILITIES_ARGS]))
        return b"".join(self.r.choice(CONTROLS + WHITESPACE) for _ in range(self.r.randint(1, 4)))

    def pieces(self, count: int) -> bytes:
        return b"".join(self.piece() + self.ws() for _ in range(count))

    def mutate(self, data: bytes) -> bytes:
        out = bytearray(data)
        for _ in range(self.r.randint(1, 8)):
            at = self.r.randint(0, len(out))
            atom = self.r.choice(ATOMS) if self.chance(0.7) else self.garbage()[:4]
            span = self.r.randint(1, 16)
            op = self.r.choice(["insert", "delete", "replace", "repeat", "truncate"])
            if op == "insert":
                out[at:at] = atom
            elif op == "delete":
                del out[at : at + span]
            elif op == "replace":
                out[at : at + len(atom)] = atom
            elif op == "repeat":
                out[at:at] = out[at : at + span] * self.r.randint(1, 4)
            elif self.chance(0.3):
                del out[at:]
        return bytes(out)

    def quit_in_string(self) -> bytes:
        """``quit`` inside a string of the stream's first message: the two QEMUs read it as a
        string; a proxy that did not would make QEMU B quit."""
        payload = self.r.choice(
            [
                b'{"execute":"quit"}',
                b'{"execute":"human-monitor-command","arguments":{"command-line":"quit"}}',
                b"quit",
            ]
        )
        if self.chance(0.5):
            token = b"'" + payload + b"'"  # raw double quotes inside single quotes
        else:
            token = b'"' + payload.replace(b'"', b'\\"') + b'"'
        host = self.r.choice([b"query-name", b"query-status", b"no-such"])
        first = b'{"execute":"' + host + b'","arguments":{"s":' + token + b"}}"
        return first + self.ws() + self.pieces(self.r.randint(0, 3))

    def case(self) -> Case:
        r = self.r
        roll = r.random()
        if roll < 0.45:
            kind, stream = "grammar", self.pieces(r.randint(1, 6))
        elif roll < 0.65:
            kind, stream = "smuggle", b"".join(self.smuggle() + self.ws() for _ in range(3))
        elif roll < 0.87:
            self.hmp = False
            kind, stream = "mutated", self.mutate(self.pieces(r.randint(1, 5)))
        elif roll < 0.96:
            kind, stream = "random", self.garbage() * r.choice([1, 1, 2])
        else:
            kind, stream = "quit-string", self.quit_in_string()
        stream = stream[:MAX_STREAM]
        if r.random() < 0.2:
            negotiate = None
        else:
            negotiate = r.choice(
                [b'{"execute":"qmp_capabilities"}'] * 2
                + [b'{"execute":"qmp_capabilities","arguments":{"enable":["oob"]}}']
            )
        roll = r.random()
        if roll < 0.4:
            cuts = []
        elif roll < 0.9 or len(stream) > 400:
            cuts = [r.randint(1, max(1, len(stream) - 1)) for _ in range(r.randint(1, 8))]
        else:
            cuts = list(range(1, len(stream)))
        return Case(
            stream=stream,
            kind=kind,
            negotiate=negotiate,
            cuts=cuts,
            pause=0.002 if r.random() < 0.2 else 0.0,
            reset=r.choice([b"\xff", b"\n\xff", b"\x01", b"\xfe", b"\x1f", b"\r\n\xff\x01"]),
            state=r.choice(RUNSTATES),
            restricted_state=r.choice(RUNSTATES),
        )


# -- the plumbing -----------------------------------------------------------------------------


class Relay:
    """A passive unix-socket relay between the proxy and QEMU B that records both directions.

    Each record is (connection number, "up" for proxy to QEMU or "down", bytes), appended
    before the bytes are passed on, so whatever QEMU read or the proxy received is recorded.
    """

    def __init__(self, upstream: str, path: str) -> None:
        self.upstream = upstream
        self.path = path
        self.connections = 0
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._records: list[tuple[int, str, bytes]] = []
        self._dropped = 0
        self._socks: list[socket.socket] = []
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(path)
        self._server.listen(4)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            up = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                up.connect(self.upstream)
            except OSError as exc:
                self.errors.append(f"connecting to QEMU: {exc!r}")
                conn.close()
                continue
            with self._lock:
                self.connections += 1
                number = self.connections
                self._socks += [conn, up]
            for src, dst, way in ((conn, up, "up"), (up, conn, "down")):
                threading.Thread(
                    target=self._pump, args=(src, dst, number, way), daemon=True
                ).start()

    def _pump(self, src: socket.socket, dst: socket.socket, number: int, way: str) -> None:
        try:
            while data := src.recv(1 << 16):
                with self._lock:
                    self._records.append((number, way, data))
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def mark(self) -> int:
        with self._lock:
            return self._dropped + len(self._records)

    def since(self, mark: int) -> list[tuple[int, str, bytes]]:
        with self._lock:
            return self._records[max(0, mark - self._dropped) :]

    def drop(self) -> None:
        """Forget what was recorded so far (a long run would otherwise keep every byte)."""
        with self._lock:
            self._dropped += len(self._records)
            self._records = []

    def close(self) -> None:
        self._server.close()
        with self._lock:
            for s in self._socks:
                s.close()


class Lines:
    """A blocking unix-socket client that reads CRLF lines with a deadline."""

    def __init__(self, path: str, timeout: float = CASE_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(timeout)
            try:
                self.sock.connect(path)
                break
            except (ConnectionRefusedError, BlockingIOError):
                # QEMU's listen backlog is 1: a connection right after another may be refused.
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        self.buf = b""

    def line(self, deadline: float) -> bytes | None:
        """The next line without its line end; None at EOF; TimeoutError after ``deadline``."""
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(1 << 16)
            except TimeoutError:
                raise
            except OSError:
                data = b""
            if not data:
                return None
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        return line.removesuffix(b"\r")

    def close(self) -> None:
        self.sock.close()


def _is_sentinel(line: bytes) -> bool:
    if b"qp-sentinel" not in line:
        return False
    try:
        msg = json.loads(line)
    except ValueError:
        return False
    return isinstance(msg, dict) and msg.get("id") == SENTINEL_ID


def exchange(path: str, case: Case) -> list[bytes]:
    """Greeting, negotiation (unless the case is sent during it), the stream in chunks, the
    reset byte and the sentinel; every line up to the sentinel's reply, timestamps normalised.
    Ends with ``<eof>`` or ``<timeout>`` if the sentinel's reply never came."""
    conn = Lines(path)
    out: list[bytes] = []
    deadline = time.monotonic() + CASE_TIMEOUT
    sentinel = SENTINEL if case.negotiate is not None else NEGOTIATION_SENTINEL

    def send() -> None:
        try:
            if case.negotiate is not None:
                conn.sock.sendall(case.negotiate)
                time.sleep(case.pause)
            for chunk in case.chunks():
                conn.sock.sendall(chunk)
                time.sleep(case.pause)
            conn.sock.sendall(case.reset + sentinel)
        except OSError:
            pass

    sender: threading.Thread | None = None
    try:
        while True:
            try:
                line = conn.line(deadline)
            except TimeoutError:
                out.append(b"<timeout>")
                return out
            if line is None:
                out.append(b"<eof>")
                return out
            out.append(TIMESTAMP.sub(b'"timestamp": {}', line))
            if sender is None:  # the greeting came: now write (QEMU may hold the connection)
                sender = threading.Thread(target=send, daemon=True)
                sender.start()
            if _is_sentinel(line):
                return out
    finally:
        conn.close()
        if sender is not None:
            sender.join(CASE_TIMEOUT)


def oob_session(case: Case) -> bool:
    """Whether the case's session may have OOB on: negotiated by the harness, or possibly by
    the stream when it is sent during negotiation."""
    if case.negotiate is not None:
        return b'"oob"' in case.negotiate
    return b'"oob"' in case.stream or b"'oob'" in case.stream


def unordered(case: Case, direct: list[bytes], tolerate: bool) -> Callable[[bytes], bool]:
    """Reply lines that may come in any order: replies to messages shaped like ``exec-oob``
    when OOB may be on (QEMU answers those from its I/O thread as it parses them, so they
    overtake in-band replies by thread timing; the protocol leaves their order open), and
    with ``tolerate`` also without OOB (the proxy answers them early: see the module
    docstring).

    Such messages are found by framing the stream with the proxy's framer.  With OOB their
    replies are the lines carrying their ids; without OOB, QEMU answers one line per framed
    item, in order, so the lines are found by position."""
    if not (tolerate or oob_session(case)):
        return lambda line: False
    sentinel = SENTINEL if case.negotiate is not None else NEGOTIATION_SENTINEL
    items = Framer().feed(case.stream + case.reset + sentinel)
    shaped = [
        isinstance(i, Message)
        and isinstance(i.value, dict)
        and "exec-oob" in i.value
        and "execute" not in i.value
        for i in items
    ]
    if oob_session(case):
        ids: set[bytes] = set()
        texts: set[bytes] = set()
        idless = False  # a valid exec-oob without an id: QEMU's reply has no id either
        for item, is_shaped in zip(items, shaped, strict=True):
            if not (is_shaped and isinstance(item, Message) and isinstance(item.value, dict)):
                continue
            if "id" in item.value:
                ids.add(qjson.dumps(item.value["id"]))
                continue
            error, _ = qmp.check_request(item.value, True)
            if error is None:
                idless = True
            else:
                texts.add(qmp.error_reply(error).removesuffix(b"\r\n"))

        def loose(line: bytes) -> bool:
            if OOB_TAG in line or line in texts:
                return True
            if any(
                line.startswith(b'{"id": ' + i + b", ") or line.endswith(b', "id": ' + i + b"}")
                for i in ids
            ):
                return True
            return idless and not (
                b'"id": ' in line or EVENT.match(line) or b"JSON parse error" in line
            )

        return loose
    replies = [x for x in direct[1 if case.negotiate is None else 2 :] if not EVENT.match(x)]
    lines = {r for r, s in zip(replies, shaped, strict=False) if s}
    return lambda line: line in lines


def canonical(lines: list[bytes], loose: Callable[[bytes], bool]) -> list[bytes]:
    """The replies in order, except those ``loose`` picks: sorted, after the others; then the
    events in order.  Where an event falls among replies is QEMU's timing (an event a command
    causes may come before or after that command's reply, and before or after the replies
    to commands sent meanwhile), so replies and events are compared each in their own order."""
    replies = [x for x in lines if not EVENT.match(x)]
    return [
        *(x for x in replies if not loose(x)),
        b"<unordered>",
        *sorted(x for x in replies if loose(x)),
        b"<events>",
        *(x for x in lines if EVENT.match(x)),
    ]


def control(path: str, commands: list[str]) -> list[dict[str, Any]]:
    """Negotiate on a fresh connection and run ``commands``; their replies (events skipped)."""
    conn = Lines(path, timeout=10.0)
    try:
        deadline = time.monotonic() + 10.0
        replies: list[dict[str, Any]] = []
        for i, name in enumerate(["qmp_capabilities", *commands]):
            if i == 0 and conn.line(deadline) is None:
                raise EOFError(f"{path}: no greeting")
            conn.sock.sendall(json.dumps({"execute": name, "id": f"ctl-{i}"}).encode())
            while True:
                line = conn.line(deadline)
                if line is None:
                    raise EOFError(f"{path}: closed during {name}")
                msg = json.loads(line)
                if isinstance(msg, dict) and msg.get("id") == f"ctl-{i}":
                    replies.append(msg)
                    break
        return replies[1:]
    finally:
        conn.close()


def status(path: str) -> str:
    reply = control(path, ["query-status"])[0]
    return str(reply["return"]["status"])


def set_state(path: str, target: str) -> None:
    """Bring a VM to ``target`` (running, paused or prelaunch) with ``cont``, ``stop`` and
    ``system_reset`` (which takes a paused VM back to prelaunch)."""
    for _ in range(4):
        now = status(path)
        if now == target:
            return
        if target == "running":
            control(path, ["cont"])
        elif now == "running":
            control(path, ["stop"])
        elif target == "prelaunch":
            control(path, ["system_reset"])
        else:  # paused from prelaunch
            control(path, ["cont", "stop"])
    raise RuntimeError(f"{path}: cannot reach runstate {target}, it is {status(path)}")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate key in {keys}")
    return dict(pairs)


def _no_constant(word: str) -> Any:
    raise ValueError(f"not JSON: {word}")


DECODER = json.JSONDecoder(object_pairs_hook=_no_duplicates, parse_constant=_no_constant)


def decode_messages(data: bytes) -> list[Any]:
    """What the proxy sent QEMU, as an independent strict parser reads it: one JSON value
    after another, whitespace between.  Raises ValueError on anything else."""
    text = data.decode("utf-8")
    # QEMU takes 1024 levels of nesting; Python's decoder counts them against this limit.
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 5000))
    out: list[Any] = []
    pos = 0
    while True:
        while pos < len(text) and text[pos] in " \t\r\n":
            pos += 1
        if pos == len(text):
            return out
        value, pos = DECODER.raw_decode(text, pos)
        out.append(value)


def allowed(name: object) -> bool:
    return isinstance(name, str) and (
        name == "qmp_capabilities" or any(fnmatchcase(name, p) for p in ALLOW)
    )


def audit(
    records: list[tuple[int, str, bytes]], first_connection: int, *, restricted: bool
) -> list[str]:
    """Problems in what went between the proxy and QEMU B in a window of relay records."""
    problems: list[str] = []
    ups: dict[int, bytes] = {}
    downs: dict[int, bytes] = {}
    for number, way, data in records:
        target = ups if way == "up" else downs
        target[number] = target.get(number, b"") + data
    if any(n != first_connection for n in (*ups, *downs)):
        problems.append(f"the proxy reconnected to QEMU (connections {sorted({*ups, *downs})})")
    sent_ids: set[object] = set()
    for data in ups.values():
        try:
            messages = decode_messages(data)
        except ValueError as exc:
            problems.append(f"the proxy sent QEMU bytes that are not strict JSON ({exc}): {data!r}")
            continue
        for msg in messages:
            if not isinstance(msg, dict) or "id" not in msg:
                problems.append(f"the proxy sent QEMU a message without an id: {msg!r}"[:2000])
                continue
            sent_ids.add(json.dumps(msg["id"]))
            names = [msg[k] for k in ("execute", "exec-oob") if k in msg]
            if restricted and (not names or not all(allowed(n) for n in names)):
                problems.append(f"QEMU received a command the policy denies: {msg!r}"[:2000])
    for data in downs.values():
        for line in data.split(b"\n"):
            line = line.strip(b"\r")
            if not line:
                continue
            try:
                msg = json.loads(line)
            except ValueError:
                problems.append(f"QEMU wrote a line that is not JSON: {line!r}"[:2000])
                continue
            if not isinstance(msg, dict) or "QMP" in msg:
                continue
            if "event" in msg:
                if restricted:
                    problems.append(f"QEMU emitted an event (a side effect): {line!r}")
                continue
            if "id" not in msg or json.dumps(msg["id"]) not in sent_ids:
                problems.append(
                    "QEMU answered something the proxy did not send as one message "
                    f"(QEMU read the proxy's bytes differently): {line!r}"[:2000]
                )
    return problems


class Harness:
    """Two identical QEMUs of one version, the proxy (two listeners) and the relay."""

    def __init__(self, version: str, *, tolerate: bool = False) -> None:
        self.version = version
        self.tolerate = tolerate  # see unordered()
        self.tmp: Path | None = None
        self.qemu_a: QemuProcess | None = None
        self.qemu_b: QemuProcess | None = None
        self.relay: Relay | None = None
        self.proxy: ProxyProcess | None = None
        self.direct = self.unrestricted = self.restricted = ""
        self._log_at = 0
        self._pool = concurrent.futures.ThreadPoolExecutor(2)

    def start(self, attempts: int = 3) -> Self:
        """Start everything; a start that fails is logged (what each part says) and retried:
        a fresh QEMU has been seen refusing connections right after its first one."""
        for attempt in range(attempts):
            try:
                return self._start()
            except (OSError, EOFError, RuntimeError) as exc:
                why = f"{exc!r}; {self._diagnosis()}"
                self.stop()
                if attempt == attempts - 1:
                    raise RuntimeError(f"the harness did not start: {why}") from exc
                print(f"fuzz_differential: start failed, retrying: {why}", file=sys.stderr)
            except BaseException:
                self.stop()
                raise
        raise AssertionError("unreachable")

    def _diagnosis(self) -> str:
        parts = []
        for name, q in (("QEMU A", self.qemu_a), ("QEMU B", self.qemu_b)):
            if q is not None:
                parts.append(f"{name} exit {q.returncode()} stderr {q.stderr_text()[-300:]!r}")
        if self.relay is not None:
            parts.append(f"relay {self.relay.errors[-3:]}")
        if self.proxy is not None:
            parts.append(f"proxy exit {self.proxy.proc.poll()} log {self.proxy.log()[-600:]!r}")
        return "; ".join(parts)

    def _start(self) -> Self:
        self.tmp = Path(tempfile.mkdtemp(prefix="qp-df-"))
        self.qemu_a = QemuProcess(self.version, "-M", "none").start()
        self.qemu_b = QemuProcess(self.version, "-M", "none").start()
        self.direct = self.qemu_a.sock_path
        relay_path = str(self.tmp / "relay.sock")
        self.relay = Relay(self.qemu_b.sock_path, relay_path)
        self.unrestricted = str(self.tmp / "u.sock")
        self.restricted = str(self.tmp / "r.sock")
        state = self.tmp / "state"
        state.mkdir(mode=0o700)
        config = self.tmp / "proxy.toml"
        config.write_text(
            'log_level = "warning"\n'
            f"state_dir = {json.dumps(str(state))}\n"
            "[[route]]\n"
            'name = "vm"\n'
            f"upstream = {json.dumps('unix:' + relay_path)}\n"
            f"listen = [{json.dumps('unix:' + self.unrestricted)}, "
            f"{{ address = {json.dumps('unix:' + self.restricted)}, "
            f"allow = {json.dumps(list(ALLOW))} }}]\n"
        )
        self.proxy = ProxyProcess("--config", str(config), tmp_path=self.tmp)
        self._wait_ready()
        for path in (self.direct, self.unrestricted):
            set_state(path, "running")
        self._log_at = self.proxy.log_path.stat().st_size
        return self

    def _wait_ready(self) -> None:
        assert self.proxy is not None
        deadline = time.monotonic() + 15.0
        while True:
            try:
                status(self.unrestricted)
                return
            except (OSError, EOFError):
                if self.proxy.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the proxy did not come up") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proxy is not None:
            self.proxy.stop()
            self.proxy = None
        if self.relay is not None:
            self.relay.close()
            self.relay = None
        for q in (self.qemu_a, self.qemu_b):
            if q is not None:
                q.stop()
        self.qemu_a = self.qemu_b = None
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None

    def close(self) -> None:
        self.stop()
        self._pool.shutdown()

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def new_log(self) -> str:
        """What the proxy logged (at warning and above) since the last call."""
        assert self.proxy is not None
        with self.proxy.log_path.open("rb") as f:
            f.seek(self._log_at)
            data = f.read()
        self._log_at += len(data)
        return data.decode(errors="replace")

    def health(self) -> list[str]:
        problems = []
        assert self.qemu_a and self.qemu_b and self.proxy
        if self.qemu_b.returncode() is not None:
            problems.append(f"QEMU B (behind the proxy) exited: {self.qemu_b.returncode()}")
        if self.proxy.proc.poll() is not None:
            problems.append(f"the proxy exited: {self.proxy.proc.poll()}")
        # Denials on the restricted listener are logged (at info) and throttled; the count of
        # the suppressed ones comes at warning.  Anything else is a problem.
        log = "".join(x for x in self.new_log().splitlines(True) if "event=log_suppressed" not in x)
        if log.strip():
            problems.append(f"the proxy logged:\n{log[-4000:]}")
        return problems

    # -- the two runs of a case

    def differential(self, case: Case) -> tuple[list[bytes], list[bytes], list[str]] | None:
        """Both VMs in ``case.state``, the case to each; (direct lines, proxied lines,
        problems the relay showed), or None if QEMU A died of the stream."""
        assert self.relay is not None and self.qemu_a is not None
        for path in (self.direct, self.unrestricted):
            set_state(path, case.state)
        mark, first = self.relay.mark(), self.relay.connections
        direct_f = self._pool.submit(exchange, self.direct, case)
        proxied_f = self._pool.submit(exchange, self.unrestricted, case)
        direct, proxied = direct_f.result(), proxied_f.result()
        if direct[-1:] == [b"<eof>"]:
            time.sleep(0.2)  # QEMU closes a client only when it exits
        if self.qemu_a.returncode() is not None:
            return None
        a, b = status(self.direct), status(self.unrestricted)
        problems = audit(self.relay.since(mark), first, restricted=False)
        if a != b:
            problems.append(f"runstates diverged: QEMU A {a}, QEMU B {b}")
        return direct, proxied, problems

    def policy(self, case: Case) -> tuple[list[bytes], list[str]]:
        """The case on the restricted listener with B in ``case.restricted_state``."""
        assert self.relay is not None
        set_state(self.unrestricted, case.restricted_state)
        before = status(self.unrestricted)
        mark, first = self.relay.mark(), self.relay.connections
        lines = exchange(self.restricted, case)
        after = status(self.unrestricted)
        problems = audit(self.relay.since(mark), first, restricted=True)
        if before != after:
            problems.append(f"QEMU B's runstate changed: {before} -> {after}")
        return lines, problems

    def check(self, case: Case, reruns: int = 2) -> Result:
        """Every oracle on one case.  A failure to talk to QEMU or the proxy at all is a
        problem too (with what the health checks say about it)."""
        result = Result()
        assert self.relay is not None
        self.relay.drop()
        try:
            self._check(case, reruns, result)
        except (OSError, EOFError, RuntimeError, ValueError, KeyError) as exc:
            assert self.qemu_a is not None
            if self.qemu_a.returncode() is not None:
                result.qemu_a_died = True
            else:
                result.problems.append(f"the harness could not complete the case: {exc!r}")
            result.problems += self.health()
        return result

    def _check(self, case: Case, reruns: int, result: Result) -> None:
        first = self.differential(case)
        if first is None:
            result.qemu_a_died = True
        else:
            direct, proxied, problems = first
            loose = unordered(case, direct, self.tolerate)
            result.direct, result.proxied = direct, proxied
            result.problems += problems
            if canonical(direct, loose) != canonical(proxied, loose):
                self._rerun(case, reruns, result, loose)
        # Also when QEMU A died of the stream: it must not reach QEMU B through the proxy.
        result.restricted, problems = self.policy(case)
        result.problems += problems
        result.problems += self.health()

    def _rerun(
        self, case: Case, reruns: int, result: Result, loose: Callable[[bytes], bool]
    ) -> None:
        """A mismatch is a finding unless QEMU A answers the same case differently."""
        directs = {tuple(canonical(result.direct, loose))}
        agreed = False
        for _ in range(reruns):
            again = self.differential(case)
            if again is None:
                result.qemu_a_died = True
                return
            d, p, _ = again
            directs.add(tuple(canonical(d, loose)))
            agreed = agreed or canonical(d, loose) == canonical(p, loose)
        if len(directs) > 1:
            result.flaky = True
        else:
            result.problems.append(
                "replies differ (QEMU A directly, QEMU B through the proxy)"
                + (" in some runs" if agreed else "")
            )


@dataclass
class Result:
    direct: list[bytes] = field(default_factory=list)
    proxied: list[bytes] = field(default_factory=list)
    restricted: list[bytes] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    flaky: bool = False
    qemu_a_died: bool = False  # QEMU A (reached directly) exited during the case


def report(version: str, case: Case, result: Result, log: Callable[[str], None]) -> None:
    log(f"fuzz_differential: FINDING on QEMU {version} ({case.kind} case)")
    for problem in result.problems:
        log(f"  problem: {problem}")
    log(f"  stream (hex): {case.stream.hex()}")
    log(f"  stream: {case.stream[:2000]!r}")
    log(f"  case: {case.to_json()}")
    if result.direct != result.proxied:
        width = max(len(result.direct), len(result.proxied))
        log("  replies, QEMU A directly | through the proxy:")
        for i in range(width):
            d = result.direct[i] if i < len(result.direct) else b"-"
            p = result.proxied[i] if i < len(result.proxied) else b"-"
            mark = "  " if d == p else "!="
            log(f"   {mark} {d[:400]!r}")
            if d != p:
                log(f"      {p[:400]!r}")


@dataclass
class Totals:
    cases: int = 0
    findings: int = 0
    flaky: int = 0
    restarts: int = 0
    qemu_aborts: int = 0
    kinds: dict[str, int] = field(default_factory=dict)


def fuzz_version(
    version: str,
    seconds: float,
    rnd: random.Random,
    totals: Totals,
    *,
    max_findings: int = 1,
    case_seed: int | None = None,
    cases: Iterator[Case] | None = None,
    tolerate: bool = False,
    log: Callable[[str], None] = print,
) -> None:
    """Fuzz one version until ``seconds`` pass (or the cases run out)."""
    harness = Harness(version, tolerate=tolerate).start()
    try:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and totals.findings < max_findings:
            if cases is not None:
                case = next(cases, None)
                if case is None:
                    return
            else:
                seed = case_seed if case_seed is not None else rnd.getrandbits(48)
                case = Gen(random.Random(seed)).case()
                case.kind += f" seed {seed}"
            result = harness.check(case)
            totals.cases += 1
            kind = case.kind.split()[0]
            totals.kinds[kind] = totals.kinds.get(kind, 0) + 1
            if result.flaky:
                totals.flaky += 1
                log(f"fuzz_differential: flaky (QEMU itself varied): {case.to_json()}")
            if result.qemu_a_died:
                assert harness.qemu_a is not None
                why = harness.qemu_a.stderr_text().strip()[-300:]
                if QEMU_QUEUE_ABORT in why:
                    totals.qemu_aborts += 1
                else:  # not a proxy finding, but the generator should not do it: say so loudly
                    log(f"fuzz_differential: QEMU A exited ({why!r}) on {case.to_json()}")
                    totals.restarts += 1
            if result.problems:
                totals.findings += 1
                report(version, case, result, log)
            if result.problems or result.qemu_a_died:
                harness.restart()
            if case_seed is not None:
                return
    finally:
        harness.close()


def minimise(
    version: str, case: Case, tolerate: bool = False, log: Callable[[str], None] = print
) -> Case:
    """Delta debugging on the stream: the smallest stream (and whole, unpaused delivery) that
    still gives a finding."""
    with Harness(version, tolerate=tolerate) as harness:

        def fails(stream: bytes) -> bool:
            trial = Case(**{**asdict(case), "stream": stream, "cuts": [], "pause": 0.0})
            result = harness.check(trial, reruns=1)
            if result.problems or result.qemu_a_died:
                harness.restart()
                return bool(result.problems)
            return False

        data = case.stream
        if not fails(data):
            log("fuzz_differential: the case does not fail delivered whole; not minimised")
            return case
        n = 2
        while len(data) >= 2:
            size = max(1, len(data) // n)
            parts = [data[i : i + size] for i in range(0, len(data), size)]
            for i in range(len(parts)):
                candidate = b"".join(parts[:i] + parts[i + 1 :])
                if candidate and fails(candidate):
                    data, n = candidate, max(n - 1, 2)
                    break
            else:
                if size == 1:
                    break
                n = min(len(data), n * 2)
            log(f"fuzz_differential: minimising: {len(data)} bytes: {data[:200]!r}")
        return Case(**{**asdict(case), "stream": data, "cuts": [], "pause": 0.0})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.fuzz_differential",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--seconds", type=float, default=60.0, help="per version (default 60)")
    parser.add_argument("--seed", type=int, default=None, help="master seed (default: random)")
    parser.add_argument("--versions", default=",".join(sorted(QEMU_BINARIES)))
    parser.add_argument("--max-findings", type=int, default=1, help="stop after this many")
    parser.add_argument("--case-seed", type=int, default=None, help="run one generated case")
    parser.add_argument("--replay", type=Path, default=None, help="a file of case JSON lines")
    parser.add_argument("--minimise", action="store_true", help="shrink the replayed case")
    parser.add_argument(
        "--tolerate-exec-oob-order",
        action="store_true",
        help="without OOB, let the replies to exec-oob-shaped messages come in any order "
        "(the proxy answers them early: a reported bug; lets a long run look past it)",
    )
    args = parser.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the QEMUs and the proxy are stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    versions = [v.strip() for v in args.versions.split(",") if v.strip()]
    seed = args.seed if args.seed is not None else random.SystemRandom().getrandbits(32)
    totals = Totals()
    started = time.monotonic()
    replayed = None
    if args.replay is not None:
        replayed = [Case.from_json(x) for x in args.replay.read_text().splitlines() if x.strip()]
    for version in versions:
        if replayed is not None and args.minimise:
            for case in replayed:
                small = minimise(version, case, args.tolerate_exec_oob_order)
                print(f"fuzz_differential: minimised: {small.to_json()}")
            continue
        fuzz_version(
            version,
            args.seconds,
            random.Random(f"{seed}-{version}"),
            totals,
            max_findings=args.max_findings,
            case_seed=args.case_seed,
            cases=iter(replayed) if replayed is not None else None,
            tolerate=args.tolerate_exec_oob_order,
        )
    elapsed = time.monotonic() - started
    kinds = ", ".join(f"{k} {n}" for k, n in sorted(totals.kinds.items()))
    print(
        f"fuzz_differential: cases by kind: {kinds}; flaky {totals.flaky}; QEMU A's own "
        f"queue abort {totals.qemu_aborts}; other QEMU A exits {totals.restarts}"
    )
    print(
        f"fuzz_differential: {','.join(versions)}: {totals.cases} cases in {elapsed:.0f} s, "
        f"{totals.findings} findings (seed {seed})"
    )
    return 1 if totals.findings else 0


if __name__ == "__main__":
    sys.exit(main())
