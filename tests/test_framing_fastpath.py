"""The framer's fast path (orjson on clean ASCII chunks) must agree with the exact path always.

A trailing control byte sends a whole chunk down the exact path (QEMU's rules, byte by byte),
so the same stream framed both ways must give the same items, except that stray byte's error.
Streams are built as text so they can hold what generated objects cannot: duplicate keys, nested
and structured ids, numbers in every form QEMU's lexer knows or refuses (sign, leading zeros,
fraction, exponent: ``0e5`` is RFC 8259 but not QEMU), keywords and near-keywords, deep
nesting, top-level scalars and garbage.  The exact path itself is checked against real QEMU by
tests/test_framing_vs_qemu.py and the differential fuzz target.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.framing import Framer, Message, ParseError, Rules

KEYS = st.sampled_from(['"id"', '"execute"', '"arguments"', '"a"', '"b"', '""', '"x y"'])
# Numbers from the pieces of QEMU's number grammar (json-lexer.c), valid and invalid combined.
NUMBERS = st.one_of(
    st.builds(
        lambda sign, whole, frac, exp: sign + whole + frac + exp,
        st.sampled_from(["", "-", "+", "--"]),
        st.sampled_from(["0", "00", "01", "1", "9", "10", "123", "", "18446744073709551616"]),
        st.sampled_from(["", ".", ".0", ".5", ".05", ".50", "..5"]),
        st.sampled_from(
            [
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
                "ee5",
                "e5.5",
            ]
        ),
    ),
    st.sampled_from(
        [
            "0",
            "-0",
            "0e5",
            "0E5",
            "-0e1",
            "0.0e5",
            "1e3",
            "1E+2",
            "18446744073709551615",
            "-9223372036854775809",
            "123456789012345678901234567890",
            "1e308",
            "0.1",
        ]
    ),
)
KEYWORDS = st.sampled_from(["true", "false", "null", "nul", "truex", "True", "e", "inf", "nan"])
STRINGS = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0x7E, exclude_characters='"\\'), max_size=8
).map(lambda t: f'"{t}"')
WS = st.sampled_from(["", " ", "\r\n", "\t", "  \n "])


def values(depth: int) -> st.SearchStrategy[str]:
    scalars = st.one_of(NUMBERS, STRINGS, KEYWORDS)
    if depth <= 0:
        return scalars
    inner = values(depth - 1)
    arrays = st.lists(inner, max_size=3).map(lambda xs: "[" + ",".join(xs) + "]")
    objects = st.lists(st.tuples(KEYS, WS, inner), max_size=4).map(
        lambda ms: "{" + ",".join(f"{k}{w}:{w}{v}" for k, w, v in ms) + "}"
    )
    return st.one_of(scalars, arrays, objects)


MESSAGES = st.one_of(
    values(3).filter(lambda v: v.startswith("{")),
    values(3),
    st.sampled_from(["[" * 1025 + "]" * 1025, "{" * 3 + "}", "]", "x", "42 "]),
    # Objects nested exactly at QEMU's limit (1024) and one over it.
    st.sampled_from([1023, 1024]).map(lambda d: '{"a":' + "[" * d + "]" * d + "}"),
)


@settings(max_examples=1500, deadline=None)
@given(st.lists(st.tuples(MESSAGES, WS), min_size=1, max_size=6))
def test_fast_path_agrees_with_exact_path(parts: list[tuple[str, str]]) -> None:
    data = "".join(m + w for m, w in parts).encode()
    fast = Framer().feed(data)
    exact = Framer().feed(data + b"\x01")
    # The control byte is a stray error of its own, or ends a token left incomplete (``0.``).
    last = exact[-1]
    assert isinstance(last, ParseError) and last.desc.endswith("\x01'"), last
    # It is also the lookahead that completes a trailing keyword or number, so the exact path
    # may have one item more just before its stray error; otherwise they are equal.
    assert fast in (exact[:-1], exact[:-2]), (fast, exact)
    assert fast == exact[:-1] or not data.rstrip().endswith(b"}")


def test_fast_path_counts_duplicate_keys() -> None:
    items = Framer().feed(b'{"execute":"a","execute":"b"}')
    assert items == [ParseError("JSON parse error, duplicate key", "parse")]


@pytest.mark.parametrize(
    ("number", "resets"),
    [(b"0E5", True), (b"-0E+2", True), (b"0e5", False), (b"-0e1", False), (b"0e-7", False)],
)
def test_a_zero_with_an_exponent_is_not_one_message(number: bytes, resets: bool) -> None:
    """QEMU's lexer ends a lone 0 before an exponent.  An ``E`` then starts no token: a lexical
    error resets the parser and the rest is new input, so what looked like one query-status
    hides a top-level stop (the smuggling found by the attacker's review).  An ``e`` starts a
    keyword: one malformed message.  Either way the framer must see it as QEMU does."""
    data = b'{"execute":"query-status","arguments":{"a":%s,"b":{"execute":"stop"}}}' % number
    items = Framer().feed(data)
    messages = [i.value for i in items if isinstance(i, Message)]
    assert ({"execute": "stop"} in messages) == resets
    assert not any(isinstance(m, dict) and m.get("execute") == "query-status" for m in messages)
    assert items == Framer().feed(data + b"\x01")[:-1]


def test_a_zero_with_a_fraction_and_exponent_is_one_message() -> None:
    [item] = Framer().feed(b'{"execute":"x","arguments":{"a":0.0e5,"b":10e2}}')
    assert isinstance(item, Message) and item.fast
    assert item.value == {"execute": "x", "arguments": {"a": 0.0, "b": 1000.0}}


# What an attacker sends to earn many errors per read: runs of stray bytes, of closers, commas
# and colons, mixed with valid commands, half tokens and newlines (which move QEMU 11.1's
# error positions).
GARBAGE = st.lists(
    st.one_of(
        st.binary(max_size=6).map(lambda b: bytes(x % 0x20 for x in b)),
        st.lists(st.sampled_from([b"\xfe", b"\xff", b"\x00", b"\x1f"]), max_size=6).map(b"".join),
        st.lists(st.sampled_from([b"]", b"}", b":", b","]), max_size=6).map(b"".join),
        st.sampled_from([b"\n", b"\r\n", b" ", b"x", b"'", b'"', b"[", b"{", b"1", b"tru", b"e"]),
        st.just(b'{"execute": "query-status", "id": 7}'),
    ),
    max_size=12,
).map(b"".join)


@settings(max_examples=1500, deadline=None)
@given(GARBAGE, st.sampled_from(list(Rules)))
def test_bulk_garbage_paths_agree_with_byte_by_byte(data: bytes, rules: Rules) -> None:
    """Runs of garbage are answered in bulk only when they arrive together; fed one byte at a
    time, every byte takes the exact path.  Both must give the same items, in both dialects."""
    whole = Framer(rules=rules).feed(data)
    framer = Framer(rules=rules)
    one_by_one = [item for k in range(len(data)) for item in framer.feed(data[k : k + 1])]
    assert whole == one_by_one
