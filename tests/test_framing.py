"""Pure tests of proxy.framing: QEMU's JSON lexer, streamer and parser rules, without sockets.

Every expected answer below was checked against real QEMU 7.2 and 10.0 (same answers on both);
tests/test_framing_vs_qemu.py keeps doing that comparison automatically.  The framer must give a
client exactly what QEMU would (docs/protocol.md, 'Input: how QEMU frames what a client
writes'), so these tests pin the descs byte for byte.
"""

from __future__ import annotations

import json
import time
import tracemalloc

import orjson
import pytest

from proxy import qjson
from proxy.framing import QEMU_MAX_NESTING, Framer, Item, Message, ParseError
from tests.test_framing_properties import same


def feed(data: bytes, chunk: int | None = None, framer: Framer | None = None) -> list[Item]:
    """Feed ``data`` whole, or ``chunk`` bytes at a time, and collect every item."""
    framer = framer or Framer()
    if chunk is None:
        return framer.feed(data)
    out: list[Item] = []
    for i in range(0, len(data), chunk):
        out += framer.feed(data[i : i + chunk])
    return out


def perr(what: str) -> ParseError:
    return ParseError(f"JSON parse error, {what}", "parse")


def stray(text: str) -> ParseError:
    return perr(f"stray '{text}'")


def msg(value: object) -> tuple[str, object]:
    return ("msg", value)


def summary(items: list[Item]) -> list[object]:
    """Messages as ("msg", value) so tables need not spell raw bytes; errors stay as they are."""
    return [msg(i.value) if isinstance(i, Message) else i for i in items]


EXPECTING_VALUE = perr("expecting value")
QS = b'{"execute":"query-status"}'


# -- framing ----------------------------------------------------------------------------------


def test_no_newline_needed() -> None:
    [item] = Framer().feed(QS)
    assert item == Message(QS, {"execute": "query-status"})


def test_several_messages_in_one_feed_in_order() -> None:
    data = b'{"execute":"a","id":1}{"execute":"b","id":2} \t\r\n{"execute":"c","id":3}\r\n'
    items = Framer().feed(data)
    values = [{"execute": name, "id": n} for n, name in enumerate("abc", 1)]
    assert [i.value for i in items if isinstance(i, Message)] == values
    assert all(isinstance(i, Message) for i in items)
    second = items[1]
    assert isinstance(second, Message) and second.raw == b'{"execute":"b","id":2}'


def test_one_message_over_many_feeds() -> None:
    data = b'{"execute": "query-status", "arguments": {"x": [1, 2.5, "s", true]}, "id": "z"}'
    framer = Framer()
    for byte in data[:-1]:
        assert framer.feed(bytes([byte])) == []
    [item] = framer.feed(data[-1:])
    assert isinstance(item, Message)
    assert item.raw == data
    assert item.value == json.loads(data)
    assert framer.buffered == 0


def test_pretty_printed_input() -> None:
    value = {"execute": "migrate", "arguments": {"uri": "exec:cat", "list": [1, {"a": None}]}}
    text = json.dumps(value, indent=4).encode()
    [item] = Framer().feed(b"\n  " + text.replace(b"\n", b"\r\n") + b"\r\n")
    assert isinstance(item, Message)
    assert item.value == value
    assert item.raw == text.replace(b"\n", b"\r\n")  # from the first to the last token's byte


def test_whitespace_only_yields_nothing() -> None:
    framer = Framer()
    assert framer.feed(b" \t\r\n" * 100) == []
    assert framer.buffered == 0


@pytest.mark.parametrize(
    ("data", "value"),
    [
        (b"{'execute':'query-status','id':'sq'}", {"execute": "query-status", "id": "sq"}),
        (b"{'execute':'x','id':'it\\'s'}", {"execute": "x", "id": "it's"}),
        (b'{"execute":"x","id":"a\\\'b"}', {"execute": "x", "id": "a'b"}),  # \' in "..." too
        (b"{'execute':'x','id':'say \"hi\"'}", {"execute": "x", "id": 'say "hi"'}),
        (b"{\"execute\":'x','id':\"'\"}", {"execute": "x", "id": "'"}),
    ],
)
def test_single_quoted_strings(data: bytes, value: object) -> None:
    assert summary(Framer().feed(data)) == [msg(value)]


def test_garbage_between_messages_gets_its_own_error() -> None:
    data = QS + b" % " + QS
    assert summary(Framer().feed(data)) == [
        msg({"execute": "query-status"}),
        stray("%"),
        msg({"execute": "query-status"}),
    ]


@pytest.mark.parametrize("reset", [b"\xff", b"\x04", b"\x1b", b"\x00", b"\xfe"])
def test_control_byte_or_ff_resynchronises(reset: bytes) -> None:
    half = b'{"execute":"query-status","id":"half"'
    # QEMU shows 0xFE/0xFF as U+FFFD, and a NUL ends the C string that quotes the token.
    shown = "\ufffd" if reset in (b"\xff", b"\xfe") else reset.decode().strip("\x00")
    items = Framer().feed(half + reset + b'{"execute":"query-status","id":"next"}')
    assert summary(items) == [stray(shown), msg({"execute": "query-status", "id": "next"})]


def test_ff_inside_a_string_resynchronises() -> None:
    items = Framer().feed(b'{"execute":"x","id":"ab\xff{"execute":"y"}')
    assert summary(items) == [stray('"ab\ufffd'), msg({"execute": "y"})]


def test_top_level_scalar_is_flushed_by_the_next_token() -> None:
    framer = Framer()
    assert framer.feed(b"42") == []  # a number needs a lookahead byte, as in QEMU's lexer
    assert summary(framer.feed(QS)) == [msg(42), msg({"execute": "query-status"})]
    assert framer.feed(b"true") == []
    assert summary(framer.feed(b"\n")) == [msg(True)]
    assert summary(framer.feed(b'"s"')) == [msg("s")]  # a string ends at its quote
    assert summary(framer.feed(b"[1]")) == [msg([1])]


# -- parse errors, as QEMU 7.2 and 10.0 answer them -------------------------------------------

PARSE_CASES: list[tuple[str, bytes, list[object]]] = [
    ("missing-value", b'{ "execute": }', [EXPECTING_VALUE]),
    ("trailing-comma", b'{"execute":"query-status",}', [EXPECTING_VALUE]),
    ("stray-rcurly", b"}", [EXPECTING_VALUE]),
    ("stray-rsquare", b"]", [EXPECTING_VALUE]),
    ("stray-then-expecting-value", b'{"execute":"query-status" % }', [stray("%"), EXPECTING_VALUE]),
    ("invalid-keyword", b"nul ", [perr("invalid keyword 'nul'")]),
    ("invalid-keyword-long", b"truex ", [perr("invalid keyword 'truex'")]),
    ("keyword-in-object", b'{"execute":"x","id":nope}', [perr("invalid keyword 'nope'")]),
    ("capital-True", b"True ", [stray("T")]),
    ("NaN", b"NaN ", [stray("N")]),
    ("Infinity", b"Infinity ", [stray("I")]),
    ("comment", b"/* c */", [stray("/")]),
    ("control-byte", b"\x01", [stray("\x01")]),
    ("nul-byte", b"\x00", [stray("")]),
    ("ff-byte", b"\xff", [stray("\ufffd")]),
    ("fe-byte", b"\xfe", [stray("\ufffd")]),
    ("continuation-byte", b"\x80", [stray("\ufffd")]),
    ("utf8-outside-string", b"\xc3\xa9", [stray("\ufffd")]),
    ("raw-tab-in-string", b'"tab\t"', [stray('"tab\t')]),
    ("escape-then-recovery-stops-at-bracket", b"\x1b[A", [stray("\x1b"), stray("A")]),
    ("bad-utf8", b'"\xc3\x28"', [perr("invalid UTF-8 sequence in string")]),
    ("utf8-surrogate", b'"\xed\xa0\x80"', [perr("invalid UTF-8 sequence in string")]),
    ("utf8-noncharacter", b'"\xef\xbf\xbf"', [perr("invalid UTF-8 sequence in string")]),
    ("utf8-beyond-10ffff", b'"\xf4\x90\x80\x80"', [perr("invalid UTF-8 sequence in string")]),
    ("utf8-5-bytes", b'"\xf8\x88\x80\x80\x80"', [perr("invalid UTF-8 sequence in string")]),
    ("modified-utf8-nul", b'"\xc0\x80"', [msg("\x00")]),
    ("escaped-nul", b'"\\u0000"', [msg("\x00")]),
    ("escape-noncharacter", b'"\\uffff"', [perr("\\uffff is not a valid Unicode character")]),
    ("escape-fdd0", b'"\\uFDD0"', [perr("\\uFDD0 is not a valid Unicode character")]),
    ("lone-high-surrogate", b'"\\ud800"', [perr("\\ud800 is not a valid Unicode character")]),
    ("high-surrogate-text", b'"\\ud800x"', [perr("\\ud800 is not a valid Unicode character")]),
    ("high-then-bmp", b'"\\ud800\\u0041"', [perr("\\ud800 is not a valid Unicode character")]),
    ("lone-low-surrogate", b'"\\udc00"', [perr("\\udc00 is not a valid Unicode character")]),
    ("surrogate-pair", b'"\\ud83d\\ude00"', [msg("\U0001f600")]),
    ("short-escape", b'"\\u12"', [perr('\\u12" is not a valid Unicode character')]),
    ("short-escape-space", b'"\\u12 "', [perr('\\u12 " is not a valid Unicode character')]),
    ("invalid-escape", b'"\\x"', [perr("invalid escape sequence in string")]),
    ("duplicate-key-depth-1", b'{"execute":"x","id":"a","id":"b"}', [perr("duplicate key")]),
    ("duplicate-key-deeper", b'{"a":{"b":1,"b":2}}', [perr("duplicate key")]),
    ("duplicate-key-in-array", b'{"a":[{"k":1,"k":1}]}', [perr("duplicate key")]),
    ("list-trailing-comma", b'{"a":[1,}]', [EXPECTING_VALUE]),
    ("object-as-key", b'{{"a":1}:2}', [perr("key is not a string in object")]),
    ("number-as-key", b"{1:2}", [perr("key is not a string in object")]),
    ("missing-colon", b'{"a" ]', [perr("missing : in object pair")]),
    ("dict-separator", b'{"a":1]', [perr("expected separator in dict")]),
    ("list-separator", b"[1 2]", [perr("expected separator in list")]),
    ("extra-rcurly", b'{"a":1}}', [msg({"a": 1}), EXPECTING_VALUE]),
    ("curly-then-square", b"{]", [EXPECTING_VALUE]),
    ("crossed", b"[{]}", [EXPECTING_VALUE]),
    ("leading-zero", b"01 ", [stray("01")]),
    ("dot-no-digits", b"1. ", [stray("1. ")]),
    ("exponent-no-digits", b"1e+ ", [stray("1e+ ")]),
    ("lone-minus", b"- ", [stray("- ")]),
    ("minus-leading-zero", b"-01 ", [stray("-01")]),
    ("dot-then-brace", b"1.}", [stray("1.}")]),
    ("zero-exponent", b"0e5 ", [msg(0), perr("invalid keyword 'e'"), msg(5)]),
    ("numbers", b"[0, -0, 1.5, -2e3, 1E+2, 0.0e-1]", [msg([0, 0, 1.5, -2000.0, 100.0, 0.0])]),
    # json-streamer.c hands the tokens to the parser as soon as either count goes negative:
    ("bracket-then-rcurly", b"[}]", [EXPECTING_VALUE, EXPECTING_VALUE]),
    ("list-then-rcurly", b"[1}]", [perr("expected separator in list"), EXPECTING_VALUE]),
    (
        "rcurly-in-list-does-not-swallow-next-command",
        b'[}{"execute":"query-version","id":1}]',
        [EXPECTING_VALUE, msg({"execute": "query-version", "id": 1}), EXPECTING_VALUE],
    ),
]


@pytest.mark.parametrize(
    ("data", "expected"), [pytest.param(d, e, id=n) for n, d, e in PARSE_CASES]
)
def test_parse_errors_match_qemu(data: bytes, expected: list[object]) -> None:
    assert summary(Framer().feed(data)) == expected
    # The answer must not depend on how the bytes arrive.
    assert summary(feed(data, chunk=1)) == expected


def test_parse_error_kinds() -> None:
    [error] = Framer().feed(b"}")
    assert isinstance(error, ParseError) and error.kind == "parse"


def test_next_message_after_every_parse_error_is_fine() -> None:
    for _name, data, expected in PARSE_CASES:
        items = Framer().feed(data + b"\xff" + QS)
        assert summary(items)[-1] == msg({"execute": "query-status"}), _name
        assert len(items) >= len(expected)


# -- what the proxy writes for QEMU ---------------------------------------------------------

ID_TEXTS = [
    b'"abc"',
    b'"a\\"b\\u00e9"',
    b"'it\\'s'",
    b"'say \"x\"'",
    b"12",
    b"-1.5e3",
    b"18446744073709551616",
    b'{"x": [1, {"id": 2}], "id": "inner"}',
    b'[1, "id", []]',
    b"[]",
    b"{}",
    b"null",
    b"true",
    b"false",
    b'"\xc3\xa9\xf0\x9f\x98\x80"',
]


def written_for_qemu(item: Message) -> bytes:
    """What the proxy sends QEMU for a parsed message (see Command.wire)."""
    return orjson.dumps(item.value) if item.fast else qjson.encode(item.value)


@pytest.mark.parametrize("id_text", ID_TEXTS)
@pytest.mark.parametrize(
    "template",
    [
        b'{"execute":"query-status","id":%s}',
        b'{"id":%s,"execute":"query-status"}',
        b'{ "execute" : "query-status" ,\r\n\t"id"  :  %s  ,"arguments":{"id":0}}',
        b"{'arguments':{'id':'no'},'id':%s,'execute':'x'}",
        b'{"execute":"x","arguments":{"a":1e400,"b":-0.0,"c":1.0,"d":"\\u0000"},"id":%s}',
    ],
)
def test_what_qemu_receives_parses_back_to_the_same_single_message(
    template: bytes, id_text: bytes
) -> None:
    data = template % id_text
    [item] = Framer().feed(data)
    assert isinstance(item, Message)
    wire = written_for_qemu(item)
    [again] = Framer().feed(wire)  # by QEMU's rules: exactly one message ...
    assert isinstance(again, Message)
    assert same(again.value, item.value), (wire, item.value)  # ... with the same value


def test_both_writers_keep_member_order_and_number_types() -> None:
    [item] = Framer().feed(b'{"b":1,"a":1.0,"c":{"z":0,"y":18446744073709551615}}')
    assert isinstance(item, Message) and item.fast
    assert orjson.dumps(item.value) == qjson.encode(item.value)
    assert qjson.encode(item.value) == b'{"b":1,"a":1.0,"c":{"z":0,"y":18446744073709551615}}'


# -- nesting limit ---------------------------------------------------------------------------


def test_nesting_1024_is_accepted() -> None:
    depth = QEMU_MAX_NESTING
    assert depth == 1024
    [item] = Framer().feed(b"[" * depth + b"]" * depth)
    assert isinstance(item, Message)
    value = item.value
    for _ in range(depth - 1):
        assert isinstance(value, list) and len(value) == 1
        value = value[0]
    assert value == []


def test_nesting_1024_mixed_objects_and_arrays_is_accepted() -> None:
    data = b'{"a":[' * 512 + b"1" + b"]}" * 512
    [item] = Framer().feed(data)
    assert isinstance(item, Message)


def test_nesting_1025_fails_with_qemus_cascade() -> None:
    # The 1025th '[' trips the limit and the message is dropped; each of the 1025 ']' left
    # over is then a message of its own, answered "expecting value" (as QEMU does).
    items = Framer().feed(b"[" * 1025 + b"]" * 1025)
    assert items[0] == ParseError("JSON nesting depth limit exceeded", "limit")
    assert items[1:] == [EXPECTING_VALUE] * 1025
    assert len(items) == 1026


def test_nesting_1030_leaves_a_short_list_then_the_cascade() -> None:
    items = Framer().feed(b"[" * 1030 + b"]" * 1030)
    assert items[0] == ParseError("JSON nesting depth limit exceeded", "limit")
    assert summary(items[1:2]) == [msg([[[[[]]]]])]  # the 5 '[' after the limit, closed
    assert items[2:] == [EXPECTING_VALUE] * 1025
    assert len(items) == 1027


def test_nesting_limit_then_next_message_is_fine() -> None:
    items = Framer().feed(b'{"a":' * 1025 + b"\xff" + QS)
    first = items[0]
    assert isinstance(first, ParseError) and first.desc == "JSON nesting depth limit exceeded"
    assert summary(items)[-1] == msg({"execute": "query-status"})


# -- the proxy's own message bound -------------------------------------------------------------

LIMIT = ParseError("JSON token size limit exceeded", "limit")


def big_message(size: int) -> bytes:
    """A command of exactly ``size`` bytes whose padding hides structure inside strings."""
    head = b'{"execute":"x","arguments":{"a":[1,{"b":"}]{["}],"s":"'
    tail = b'"},"id":"big"}'
    return head + b"y" * (size - len(head) - len(tail)) + tail


@pytest.mark.parametrize("chunk", [1, 7, 100, 4096])
def test_max_message_one_error_then_the_rest_is_skipped(chunk: int) -> None:
    data = big_message(5000) + b"\r\n" + QS
    items = feed(data, chunk=chunk, framer=Framer(max_message=1000))
    assert summary(items) == [LIMIT, msg({"execute": "query-status"})]


def test_max_message_skips_a_huge_string_with_bounded_memory() -> None:
    max_message, chunk = 64 << 10, 8192
    framer = Framer(max_message=max_message)
    out = framer.feed(b'{"execute":"x","arguments":{"s":"')
    peak = 0
    for _ in range(1280):  # 10 MiB of string body
        out += framer.feed(b"}{][:," * (chunk // 6) + b"ab")
        peak = max(peak, framer.buffered)
    out += framer.feed(b'"}}' + QS)
    assert summary(out) == [LIMIT, msg({"execute": "query-status"})]
    assert peak <= max_message + 2 * chunk
    assert framer.buffered == 0


def test_max_message_skips_many_small_tokens() -> None:
    framer = Framer(max_message=4096)
    out = framer.feed(b'{"execute":"x","arguments":{"l":[')
    for _ in range(1000):
        out += framer.feed(b'1,"a",{"b":[true,null]},' * 10)
    out += framer.feed(b"2]}}" + QS)
    assert summary(out) == [LIMIT, msg({"execute": "query-status"})]


def test_max_message_does_not_affect_messages_within_it() -> None:
    data = big_message(1000) * 3
    assert all(isinstance(i, Message) for i in feed(data, chunk=1, framer=Framer(1000)))
    assert len(feed(data, framer=Framer(1000))) == 3


def test_max_message_verdict_does_not_depend_on_chunking() -> None:
    # A message over the bound must be refused however it arrives: the same client write must
    # not reach QEMU or not depending on how TCP happened to segment it.
    data = big_message(5000) + QS
    expected = [LIMIT, msg({"execute": "query-status"})]
    assert summary(feed(data, chunk=100, framer=Framer(max_message=1000))) == expected
    assert summary(feed(data, framer=Framer(max_message=1000))) == expected


@pytest.mark.parametrize("chunk", [None, 1])
@pytest.mark.parametrize("excess", [-1, 0, 1, 2])
def test_max_message_boundary(chunk: int | None, excess: int) -> None:
    bound = 1000
    items = feed(big_message(bound + excess), chunk=chunk, framer=Framer(max_message=bound))
    if excess <= 0:
        assert [type(i) for i in items] == [Message]
    else:
        assert items == [LIMIT]


# -- cost ------------------------------------------------------------------------------------


def sample_message(size: int) -> bytes:
    """A command of about ``size`` bytes mixing every token kind, a long string included."""
    parts = [b'{"execute":"x","arguments":{"s":"' + b'q\\"\xc3\xa9' * (size // 20) + b'","l":[']
    parts.append(b",".join(b'{"k%d":[-1.5e3,true,null,"v"]}' % i for i in range(size // 45)))
    parts.append(b']},"id":12345}')
    return b"".join(parts)


def byte_at_a_time_seconds(data: bytes, budget: float = float("inf")) -> float:
    """Best CPU time of 3 byte-at-a-time runs; fails early once a run exceeds ``budget``."""
    best = float("inf")
    for _ in range(3):
        framer = Framer()
        items: list[Item] = []
        started = time.process_time()
        for i in range(len(data)):
            items += framer.feed(data[i : i + 1])
            if i & 0xFFF == 0 and time.process_time() - started > budget:
                raise AssertionError(f"over {budget:.2f}s after {i} of {len(data)} bytes")
        best = min(best, time.process_time() - started)
        assert [type(i) for i in items] == [Message]
    return best


def test_byte_at_a_time_feeding_is_linear() -> None:
    small, large = sample_message(50_000), sample_message(200_000)
    assert 180_000 < len(large) < 220_000 and 3.5 < len(large) / len(small) < 4.5
    small_time = byte_at_a_time_seconds(small)
    # Linear is about 4x; rescanning the message on every feed would be ~16x and more.
    # Generous for noisy machines, and a quadratic framer fails fast instead of running long.
    limit = 8
    large_time = byte_at_a_time_seconds(large, budget=limit * small_time + 0.05)
    ratio = large_time / small_time
    assert ratio < limit, f"200 KB took {ratio:.1f}x the time of 50 KB fed byte by byte"


@pytest.mark.parametrize("quote", [b'"', b"'"])
def test_scanning_a_long_string_holds_no_memory_per_byte(quote: bytes) -> None:
    """A string body is scanned by one regex; written as an alternation, Python's engine kept a
    backtracking record per byte (about 30 MiB for one 256 KiB read), which any client (and a
    pretty-printing QEMU) could make the proxy pay on every read."""
    framer = Framer(max_message=16 << 20)
    framer.feed(b'{"execute": "x", "arguments": {"text": ' + quote + b"\\n")  # not the fast path
    tracemalloc.start()
    try:
        framer.feed(b"a\\tb" * (64 << 10))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"{peak >> 20} MiB to scan 256 KiB of string"
