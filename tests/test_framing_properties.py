"""Hypothesis properties of proxy.framing that hand-picked cases cannot cover.

Clients split, merge and pretty-print their JSON however they like, and a broken client can
send anything at all.  The framer must give the same answer however the bytes arrive, never
crash, always come back after a 0xFF resync byte, and hand every id back with the value QEMU
would give it (docs/protocol.md, 'Input: how QEMU frames what a client writes' and 'Commands
and replies').
"""

from __future__ import annotations

import json
import math
import random
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy import qjson
from proxy.framing import Framer, Item, Message

SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

INT64_MIN, UINT64_MAX = -(1 << 63), (1 << 64) - 1


def qemu_char(ch: str) -> bool:
    """QEMU rejects Unicode's noncharacters in strings (util/unicode.c); surrogates too."""
    cp = ord(ch)
    return not (0xFDD0 <= cp <= 0xFDEF or (cp & 0xFFFE) == 0xFFFE or 0xD800 <= cp <= 0xDFFF)


TEXT = st.text(st.characters(codec="utf-8").filter(qemu_char), max_size=10)
INTS = st.one_of(
    st.integers(-(1 << 70), 1 << 70),
    st.sampled_from([INT64_MIN - 1, INT64_MIN, (1 << 63) - 1, 1 << 63, UINT64_MAX, 1 << 64]),
    st.integers(-(10**400), 10**400),  # beyond double range: QEMU's strtod gives +-inf
)
FLOATS = st.floats(allow_nan=False, allow_infinity=False)
SCALARS = st.none() | st.booleans() | INTS | FLOATS | TEXT
JSON = st.recursive(
    SCALARS,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(TEXT, kids, max_size=4),
    max_leaves=8,
)
OBJECTS = st.dictionaries(TEXT, JSON, max_size=4)

# (item separator, key separator) pairs, compact to pretty, with every whitespace byte QEMU skips.
SEPARATORS = [(",", ":"), (", ", ": "), (" ,\r\n\t", "\t:\n "), ("\n,", " :")]
BETWEEN = ["", " ", "\r\n", "\n", "\t \r\n  "]


def qemu_value(value: Any) -> Any:
    """The value QEMU builds: integers outside int64/uint64 become doubles (``json-parser.c``)."""
    if isinstance(value, bool) or value is None or isinstance(value, float | str):
        return value
    if isinstance(value, int):
        return value if INT64_MIN <= value <= UINT64_MAX else float(str(value))
    if isinstance(value, list):
        return [qemu_value(v) for v in value]
    return {k: qemu_value(v) for k, v in value.items()}


def same(a: Any, b: Any) -> bool:
    """Equality that also tells 1 from 1.0 and True, and 0.0 from -0.0."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return a == b and math.copysign(1, a) == math.copysign(1, b)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    return bool(a == b)


def quote(text: str, rnd: random.Random) -> str:
    """A string in double quotes (json.dumps) or in QEMU's single quotes with ``\\'``."""
    if rnd.random() < 0.6:
        return json.dumps(text, ensure_ascii=rnd.random() < 0.5)
    return single_quoted(text)


def single_quoted(text: str) -> str:
    """QEMU's single-quoted string extension, with ``\\'`` for the quote itself."""
    out = []
    for ch in text:
        if ch in "'\\":
            out.append("\\" + ch)
        elif ord(ch) < 0x20:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)  # a raw '"' is fine inside single quotes
    return "'" + "".join(out) + "'"


def dump(value: Any, rnd: random.Random, seps: tuple[str, str]) -> str:
    if isinstance(value, str):
        return quote(value, rnd)
    if isinstance(value, dict):
        members = (dump(k, rnd, seps) + seps[1] + dump(v, rnd, seps) for k, v in value.items())
        return "{" + seps[0].join(members) + "}"
    if isinstance(value, list):
        return "[" + seps[0].join(dump(v, rnd, seps) for v in value) + "]"
    return json.dumps(value)


def serialize(value: dict[str, Any], rnd: random.Random) -> bytes:
    """One message, as some client might write it."""
    if rnd.random() < 0.4:  # a plain json.dumps client, maybe pretty-printing
        indent = rnd.choice([None, 0, 2, "\t"])
        seps = rnd.choice(SEPARATORS[:2])
        text = json.dumps(value, indent=indent, separators=seps, ensure_ascii=rnd.random() < 0.5)
    else:
        text = dump(value, rnd, rnd.choice(SEPARATORS))
    return text.encode("utf-8")


def stream_of(messages: list[dict[str, Any]], rnd: random.Random) -> bytes:
    return b"".join(rnd.choice(BETWEEN).encode() + serialize(m, rnd) for m in messages)


def feed_chunks(data: bytes, cuts: list[int], framer: Framer | None = None) -> list[Item]:
    framer = framer or Framer()
    out: list[Item] = []
    last = 0
    for cut in [*sorted(set(cuts)), len(data)]:
        out += framer.feed(data[last:cut])
        last = cut
    return out


def cut_points(data: st.DataObject, size: int) -> list[int]:
    if data.draw(st.booleans(), label="byte at a time"):
        return list(range(size))
    return data.draw(st.lists(st.integers(0, size), max_size=20), label="cuts")


# -- (a) chunking does not matter --------------------------------------------------------------


@SETTINGS
@given(st.lists(OBJECTS, min_size=1, max_size=4), st.randoms(use_true_random=False), st.data())
def test_any_chunking_gives_the_same_items(
    messages: list[dict[str, Any]], rnd: random.Random, data: st.DataObject
) -> None:
    stream = stream_of(messages, rnd)
    whole = Framer().feed(stream)
    assert len(whole) == len(messages)
    for item, original in zip(whole, messages, strict=True):
        assert isinstance(item, Message)
        assert same(item.value, qemu_value(original))
    assert feed_chunks(stream, cut_points(data, len(stream))) == whole


# -- (b) arbitrary damage never raises, and 0xFF always resynchronises -------------------------

NASTY = [bytes([b]) for b in range(0x20)] + [
    bytes([b]) for b in b"\xff\xfe\x80\xc3\xed\"'\\{}[]:,u0-e.tnf "
]
RESYNC_MESSAGE = b'{"execute":"query-status","id":"after-resync"}'


@SETTINGS
@given(st.lists(OBJECTS, max_size=3), st.randoms(use_true_random=False), st.data())
def test_mutations_never_raise_and_ff_resyncs(
    messages: list[dict[str, Any]], rnd: random.Random, data: st.DataObject
) -> None:
    stream = bytearray(stream_of(messages, rnd))
    for _ in range(data.draw(st.integers(1, 6), label="mutations")):
        at = data.draw(st.integers(0, len(stream)), label="at")
        if data.draw(st.booleans(), label="cut?") and stream:
            stream[at : at + data.draw(st.integers(1, 20), label="cut length")] = b""
        else:
            noise = data.draw(st.lists(st.sampled_from(NASTY), min_size=1, max_size=8))
            stream[at:at] = b"".join(noise)
    if data.draw(st.booleans(), label="truncate?"):  # a client that gave up mid-message
        del stream[data.draw(st.integers(0, len(stream)), label="truncate at") :]
    damaged = bytes(stream)

    whole_framer = Framer()
    whole = whole_framer.feed(damaged)
    chunked_framer = Framer()
    chunked = feed_chunks(damaged, cut_points(data, len(damaged)), chunked_framer)
    assert chunked == whole

    for framer in (whole_framer, chunked_framer):
        tail = framer.feed(b"\xff" + RESYNC_MESSAGE)
        assert tail, "the 0xFF resync byte produced nothing"
        last = tail[-1]
        assert isinstance(last, Message) and last.raw == RESYNC_MESSAGE
        assert framer.buffered == 0


# -- (c) ids come back with QEMU's value, and what QEMU receives is that value --------------


@SETTINGS
@given(JSON, st.randoms(use_true_random=False))
def test_every_id_value_round_trips(id_value: Any, rnd: random.Random) -> None:
    seps = rnd.choice(SEPARATORS[:2])
    id_text = json.dumps(id_value, separators=seps, ensure_ascii=rnd.random() < 0.5).encode()
    data = b'{"execute":"query-version","id":' + id_text + b"}"
    if rnd.random() < 0.5:
        data = b'{"id":' + id_text + b', "execute":"query-version"}'

    [item] = Framer().feed(data)
    assert isinstance(item, Message) and isinstance(item.value, dict)
    expected = qemu_value(id_value)
    assert same(item.value["id"], expected)

    # What the proxy writes QEMU reads back as the same value (QEMU's types: int vs float).
    wire = orjson.dumps(item.value) if item.fast else qjson.encode(item.value)
    [again] = Framer().feed(wire)
    assert isinstance(again, Message) and same(again.value, item.value)
