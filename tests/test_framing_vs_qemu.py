"""Differential test: the framer against real QEMU 7.2 and 10.0, byte stream by byte stream.

The framer exists so that a client behind the proxy gets exactly QEMU's answers to broken,
split or odd input.  Rather than trusting recorded transcripts, each corpus stream is written
raw to a real QEMU monitor, followed by a sentinel command; QEMU's replies up to the sentinel's
are then lined up with the framer's items for the same bytes:

- a framer ``ParseError``: QEMU answered an id-less error with the same desc;
- a framer ``Message`` that is not an object: QEMU answered ``QMP input must be a JSON object``;
- a framer ``Message`` object: QEMU's reply carries the same id *value* (QEMU re-serializes ids,
  ``qobject/json-writer.c``), or no id when the message had none.

Every stream gets its own connection: closing one resets QEMU's JSON parser, so a stream that
leaves QEMU mid-message (a framer bug) cannot spoil the next case.  One QEMU per version serves
the whole module.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from typing import Any

import pytest

from proxy import qjson
from proxy.dialect import Dialect
from proxy.framing import Framer, Item, Message, ParseError
from tests.qemu import QEMU_BINARIES, QemuProcess, RawQMP
from tests.test_framing import ID_TEXTS, PARSE_CASES

SENTINEL = b'{"execute":"query-version","id":"sentinel"}'
NEGOTIATE = json.dumps({"execute": "qmp_capabilities"}).encode()  # what RawQMP.negotiate sends
QV = b'{"execute":"query-version","id":%s}'
NOT_OBJECT = "QMP input must be a JSON object"
# QEMU prints non-finite doubles with %.17g too: a bare inf/nan, which is not JSON.
NON_FINITE_ID = re.compile(rb'"id": (-?(?:inf|nan))[,}]')


def corpus() -> Iterator[tuple[str, bytes]]:
    """Every stream the framer must answer exactly as QEMU does."""
    # Framing (``qobject/json-streamer.c``, ``qobject/json-lexer.c``).
    yield "no-newline", QV % b'"nn"'
    yield "several-per-write", (QV % b"1") + (QV % b"2") + b" \t\r\n" + (QV % b"3") + b"\r\n"
    pretty = json.dumps({"execute": "query-version", "id": ["p", 1]}, indent=2).encode()
    yield "pretty-printed", pretty.replace(b"\n", b"\r\n")
    yield "single-quotes", b"{'execute':'query-version','id':'it\\'s'}"
    yield "single-quote-escape-in-double", b'{"execute":"query-version","id":"a\\\'b"}'
    yield "double-quote-in-single", b"{'execute':\"query-version\",'id':'say \"x\"'}"
    yield "garbage-between", (QV % b"1") + b" % " + (QV % b"2")
    half = b'{"execute":"query-version","id":"half"'
    yield "ff-resync", half + b"\xff" + (QV % b'"next"')
    yield "ctrl-resync", half + b"\x04" + (QV % b'"next"')
    yield "ff-in-string", b'{"execute":"query-version","id":"ab\xff' + (QV % b'"next"')
    yield "nul-between", (QV % b"1") + b"\x00" + (QV % b"2")
    # Top-level non-objects; scalars are flushed by the sentinel's first token.
    for text in [b"42", b"-1.5e3", b"1.0", b'"str"', b"'sq'", b"true", b"null", b"[1,2]", b"[]"]:
        yield f"top-level-{text.decode()}", text
    # Objects that are not valid commands still get their id back.
    yield "lacks-execute-with-id", b'{"id":5}'
    yield "unexpected-member-with-id", b'{"execute":"query-version","id":"x","foo":1}'
    yield "empty-object", b"{}"
    yield "no-such-command", b'{"execute":"nosuch","id":[1,{"a":2}]}'
    # Parse errors (``qobject/json-parser.c``), the same table the pure tests use.
    for name, data, _expected in PARSE_CASES:
        yield name, data
    yield "list-trailing-comma-then-ff", b'{"a":[1,}\xff'
    # A parser message is cut at 1023 bytes (parse_error's 1 KiB buffer).
    yield "invalid-keyword-over-1023-bytes", b"[" + b"a" * 1100 + b"]"
    yield "invalid-keyword-of-1006-bytes", b"[" + b"a" * 1006 + b"]"
    yield from MORE_LEXER_AND_PARSER
    # Nesting limit and QEMU's cascade after it.
    yield "nesting-1024", b"[" * 1024 + b"]" * 1024
    yield "nesting-1025", b"[" * 1025 + b"]" * 1025
    yield "nesting-1030", b"[" * 1030 + b"]" * 1030
    yield "nesting-1024-objects", b'{"a":' * 1024 + b"1" + b"}" * 1024
    # Ids (``qobject/json-parser.c``, ``qobject/json-writer.c``).
    for name, id_text in ID_CORPUS:
        yield name, QV % id_text


ID_CORPUS: list[tuple[str, bytes]] = [
    *((f"id-{i}", text) for i, text in enumerate(ID_TEXTS)),
    ("id-1e3", b"1e3"),
    ("id-1.0", b"1.0"),
    ("id-0.1", b"0.1"),
    ("id-minus-0", b"-0"),
    ("id-minus-0.0", b"-0.0"),
    ("id-uint64-max", b"18446744073709551615"),
    ("id-2^64", b"18446744073709551616"),
    ("id-int64-min", b"-9223372036854775808"),
    ("id-below-int64", b"-9223372036854775809"),
    ("id-huge-int", b"123456789012345678901234567890"),
    ("id-1e400", b"1e400"),
    ("id-minus-1e400", b"-1e400"),
    ("id-1e-400", b"1e-400"),
    ("id-denormal", b"5e-324"),
    ("id-2.5e20", b"2.5e20"),
    ("id-1e-7", b"1e-7"),
    ("id-e-acute", b'"\xc3\xa9"'),
    ("id-u001f", b'"\\u001f"'),
    ("id-emoji", b'"\xf0\x9f\x98\x80"'),
    ("id-surrogate-pair", b'"\\ud83d\\ude00"'),
    ("id-slash", b'"\\/"'),
    ("id-nul", b'"a\\u0000b"'),
    ("id-modified-utf8-nul", b'"a\xc0\x80b"'),
    ("id-single-quoted", b"'sq\\'id'"),
    ("id-object", b'{"b":1,"a":[null,true,false]}'),
    ("id-object-nul-keys", b'{"\\u0000":1,"a":2,"b":3,"\\u0000\\u0000":5,"x\\u0000":6,"zz":8}'),
    ("id-object-unicode-keys", b'{"\xc3\xa9":1,"e":2,"\\u00e8":3,"\xe2\x82\xac":4}'),
    ("id-nested", b'[[{"id":[]}],{},"",0]'),
]


MORE_LEXER_AND_PARSER: list[tuple[str, bytes]] = [
    ("keywords-in-list", b"[true,false,null]"),
    ("keywords-run-together", b"[truefalse]"),
    ("keyword-then-capital", b"nuLL "),
    ("number-then-letter", b"1a "),
    ("leading-dot", b".5 "),
    ("leading-plus", b"+1 "),
    ("two-dots", b"1.5.3 "),
    ("hex-number", b"0x10 "),
    ("double-zero", b"00 "),
    ("exponent-then-brace", b"1e}"),
    ("long-bad-number", b"-" + b"9" * 300 + b".x"),
    ("numbers-all-forms", b"[1e5,1E5,-0.5e-3,1.5E+3,0.0,-0,10]"),
    ("simple-escapes", b'{"execute":"query-version","id":"\\\\b\\b\\f\\n\\r\\t\\"\\/"}'),
    ("upper-hex-escape", b'"\\u00E9\\uD83D\\uDE00"'),
    ("capital-U-escape", b'"\\U0041"'),
    ("non-hex-escape", b'"\\uZZZZ"'),
    ("max-codepoint-pair", b'"\\udbff\\udfff"'),
    ("min-astral-pair", b'"\\ud800\\udc00"'),
    ("high-high", b'"\\ud800\\ud800"'),
    ("high-then-short", b'"\\ud800\\u12"'),
    ("escape-fffe", b'"\\ufffe"'),
    ("escape-1fffe-pair", b'"\\ud83f\\udffe"'),
    ("raw-del", b'"\x7f" \x7f'),
    ("overlong-2", b'"\xc1\xbf"'),
    ("overlong-3", b'"\xe0\x80\x80"'),
    ("truncated-3", b'"\xe2\x82"'),
    ("raw-astral", b'"\xf0\x9f\x98\x80"'),
    ("raw-10ffff", b'"\xf4\x8f\xbf\xbf"'),
    ("raw-fdd0", b'"\xef\xb7\x90"'),
    ("bad-utf8-in-key", b'{"\xff":1}'),
    ("bad-utf8-single-quoted", b"'\xc3'"),
    ("vertical-tab", b"\x0b"),
    ("form-feed-in-object", b'{"a"\x0c:1}'),
    ("lone-comma", b","),
    ("lone-colon", b":"),
    ("string-then-colon", b'"a":1 '),
    ("empty-key", b'{"execute":"query-version","id":{"":""}}'),
    ("stray-in-list", b"[1,2,%]"),
    ("three-strays", b"%%%"),
    ("recovery-skips-tab-stops-at-newline", b"%a\tb\nnul "),
    ("recovery-skips-quotes", b'%"x"'),
    ("newline-in-string", b'"abc\ndef"'),
    ("deep-missing-value", b'{"a":' * 10 + b"}" * 10),
    ("many-messages", b" ".join(QV % str(i).encode() for i in range(12))),
    ("crlf-terminated", (QV % b'"lv"') + b"\r\n"),
    ("object-in-list-in-object", b'{"execute":"query-version","id":[{"a":[{}]}]}'),
]


CORPUS = list(corpus())
assert len({name for name, _ in CORPUS}) == len(CORPUS), "corpus names must be unique"


@pytest.fixture(scope="module", params=sorted(QEMU_BINARIES))
def shared_qemu(request: pytest.FixtureRequest) -> Iterator[QemuProcess]:
    """One machine-less QEMU per version for the whole module (spawning costs ~50 ms each)."""
    with QemuProcess(request.param, "-M", "none") as q:
        yield q


def exchange(qemu: QemuProcess, stream: bytes) -> tuple[list[bytes], bytes]:
    """QEMU's raw reply lines to ``stream``, and the sentinel's reply line that ended them."""
    with RawQMP(qemu.sock_path, timeout=10) as client:
        client.negotiate()
        client.send(stream + SENTINEL)
        lines: list[bytes] = []
        while True:
            try:
                line = client.recv_line(timeout=5)
            except TimeoutError:
                pytest.fail(
                    f"QEMU {qemu.version} never answered the sentinel (it is still inside a "
                    f"message); replies so far: {lines!r}\nstderr: {qemu.stderr_text()}"
                )
            if line.startswith(b'{"timestamp"'):
                continue  # an event; -M none -S sends none, but never count one as a reply
            if line.endswith(b', "id": "sentinel"}'):
                return lines, line
            lines.append(line)


def show(item: Item) -> str:
    """A short, non-recursive description (a 1024-deep value would break repr())."""
    if isinstance(item, ParseError):
        return f"ParseError({item.desc!r})"
    return f"Message({item.raw[:80]!r}{'...' if len(item.raw) > 80 else ''})"


def same_value(a: Any, b: Any) -> bool:
    """JSON value equality where 1 == 1.0 (QEMU prints 1.0 as 1) but True is not 1.

    QEMU writes doubles with %.17g, which reads back as the very same double, so floats are
    compared exactly: no tolerance is needed and none is allowed.
    """
    if isinstance(a, bool) or isinstance(b, bool) or a is None or b is None:
        return a is b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    if isinstance(a, str) and isinstance(b, str):
        return a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_value(a[k], b[k]) for k in a)
    return False


def check_reply(item: Item, line: bytes, dialect: Dialect) -> None:
    """Assert that QEMU's reply ``line`` is the one ``item`` promises."""
    if isinstance(item, ParseError):
        reply = json.loads(line)
        assert "id" not in reply, "parse errors never carry an id"
        assert reply["error"]["desc"] == item.desc
        return
    value = item.value
    if not isinstance(value, dict):
        reply = json.loads(line)
        assert "id" not in reply
        assert reply["error"]["desc"] == NOT_OBJECT
        return
    non_finite = NON_FINITE_ID.search(line)
    if non_finite:  # 1e400 comes back as the bare word inf, which json.loads rejects
        expected = float(non_finite.group(1).decode())
        got = value.get("id")
        assert isinstance(got, float) and math.isinf(got) and got == expected
        return
    reply = json.loads(line)
    assert ("return" in reply) != ("error" in reply)
    if "id" in value:
        assert "id" in reply, "QEMU echoes the id of every object it parsed"
        # The id as this QEMU's writer prints it (before 6.0, %f loses digits: 1e-7 is 0).
        written = json.loads(qjson.dumps(value["id"], dialect.before_6_0))
        assert same_value(reply["id"], written), (reply["id"], value["id"])
    else:
        assert "id" not in reply
    if set(value) <= {"execute", "id"} and value.get("execute") == "query-version":
        assert "return" in reply


def dialect_of(qemu: QemuProcess) -> Dialect:
    major, minor = (int(p) for p in qemu.version.split("."))
    return Dialect((major, minor, 0))


def framer_for(qemu: QemuProcess) -> Framer:
    """A framer with the version's rules, fed what the test client sent before the stream (its
    negotiation): QEMU 11.1 counts error positions over the whole connection."""
    framer = Framer(rules=dialect_of(qemu).json_rules)
    framer.feed(NEGOTIATE)
    return framer


@pytest.mark.parametrize("stream", [pytest.param(s, id=n) for n, s in CORPUS])
def test_framer_answers_like_qemu(shared_qemu: QemuProcess, stream: bytes) -> None:
    lines, _sentinel = exchange(shared_qemu, stream)
    items = framer_for(shared_qemu).feed(stream + SENTINEL)
    assert items and isinstance(items[-1], Message) and items[-1].raw == SENTINEL, (
        f"the framer is still inside a message where QEMU is not: {[show(i) for i in items[-3:]]}"
    )
    items = items[:-1]
    listing = side_by_side(items, lines)
    count = f"{len(items)} framer items, {len(lines)} QEMU replies"
    assert len(items) == len(lines), f"{count}:\n{listing}"
    for index, (item, line) in enumerate(zip(items, lines, strict=True)):
        try:
            check_reply(item, line, dialect_of(shared_qemu))
        except AssertionError as exc:
            raise AssertionError(f"item {index} differs: {exc}\n{listing}") from None


def side_by_side(items: list[Item], lines: list[bytes], limit: int = 12) -> str:
    """The first answers of both, aligned, for failure messages."""
    rows = []
    for i in range(min(max(len(items), len(lines)), limit)):
        ours = show(items[i]) if i < len(items) else "-"
        theirs = repr(lines[i])[:140] if i < len(lines) else "-"
        rows.append(f"  {i:4}: framer {ours:60} qemu {theirs}")
    return "\n".join(rows)


@pytest.mark.parametrize("id_text", [pytest.param(t, id=n) for n, t in ID_CORPUS])
def test_qjson_writes_ids_as_qemu_does(shared_qemu: QemuProcess, id_text: bytes) -> None:
    """The proxy answers some messages itself: its id bytes must be QEMU's (qjson.dumps)."""
    [line], sentinel = exchange(shared_qemu, QV % id_text)
    prefix = sentinel.removesuffix(b', "id": "sentinel"}') + b', "id": '
    assert line.startswith(prefix) and line.endswith(b"}"), line
    qemu_id = line[len(prefix) : -1]
    [item] = Framer().feed(QV % id_text)
    assert isinstance(item, Message) and isinstance(item.value, dict)
    ours = qjson.dumps(item.value["id"], dialect_of(shared_qemu).before_6_0)
    assert ours == qemu_id, f"qjson wrote {ours!r}, QEMU wrote {qemu_id!r}"
