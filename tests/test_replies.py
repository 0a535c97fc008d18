"""QEMU's output side, without sockets: ``proxy.replies``.

The reader must give the same lines however QEMU's output is cut into reads, refuse what could
grow without bound, and turn pretty-printed output into one line per message.  The splicing of
ids must give the client exactly what writing the parsed reply anew gives (that is what QEMU
would have written under the client's id), for every reply shape QEMU writes.
"""

from __future__ import annotations

import random
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy import qjson
from proxy.replies import Desync, OutputReader, reply_for, restore_id, splice_success, success_id

GREETING = (
    b'{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": ""},'
    b' "capabilities": ["oob"]}}\r\n'
)
PRETTY_GREETING = b"""{
    "QMP": {
        "version": {
            "qemu": {
                "micro": 0,
                "minor": 2,
                "major": 5
            },
            "package": ""
        },
        "capabilities": [
            "oob"
        ]
    }
}
"""

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=8,
)
IDS = st.integers(10**6, 10**12)
CLIENT_IDS = st.one_of(st.none(), JSON.map(qjson.dumps))


def _line(msg: dict[str, Any]) -> bytes:
    """A message as QEMU writes it: QDict member order, ``": "`` and ``", "``, CRLF."""
    return qjson.dumps(msg) + b"\r\n"


def _read(reader: OutputReader, data: bytes, cuts: list[int]) -> list[tuple[bytes, Any]]:
    out: list[tuple[bytes, Any]] = []
    start = 0
    for cut in [*sorted(cuts), len(data)]:
        out += reader.feed(data[start:cut])
        start = cut
    return out


@settings(max_examples=300, deadline=None)
@given(st.lists(JSON, max_size=6), st.lists(st.integers(0, 4000), max_size=8))
def test_any_cutting_into_reads_gives_the_same_lines(values: list[Any], cuts: list[int]) -> None:
    lines = [_line({"return": v, "id": n}) for n, v in enumerate(values)]
    data = GREETING + b"".join(lines)
    got = _read(OutputReader(1 << 20), data, [c for c in cuts if c <= len(data)])
    assert got == [(GREETING, None), *((line, None) for line in lines)]


def test_a_line_over_the_limit_is_a_desync_complete_or_not() -> None:
    reader = OutputReader(100)
    assert reader.feed(GREETING[:60]) == []
    with pytest.raises(Desync):
        reader.feed(GREETING[60:])  # the greeting is 121 bytes
    reader = OutputReader(1000)
    reader.feed(GREETING)
    reader.feed(b"x" * 999)
    with pytest.raises(Desync):
        reader.feed(b"x" * 2)  # no newline yet, and already over the limit
    reader = OutputReader(1000)
    reader.feed(GREETING)
    with pytest.raises(Desync):
        reader.feed(b'{"return": "' + b"y" * 1000 + b'"}\r\n')  # the one-line fast path too


def test_pretty_output_becomes_one_line_per_message() -> None:
    reader = OutputReader(1 << 20)
    reply = b'{\n    "return": {\n        "a": 0.1\n    },\n    "id": 7\n}\n'
    cuts = sorted(random.Random(5).sample(range(1, len(PRETTY_GREETING) + len(reply)), 9))
    got = _read(reader, PRETTY_GREETING + reply, cuts)
    # Each message is the proxy's writing of what it parsed, as QEMU writes compact lines.
    assert [msg for _, msg in got] == [
        orjson.loads(PRETTY_GREETING),
        {"return": {"a": 0.1}, "id": 7},
    ]
    assert [line for line, _ in got] == [qjson.dumps(msg) + b"\r\n" for _, msg in got]
    assert got[1][0] == b'{"return": {"a": 0.10000000000000001}, "id": 7}\r\n'


def test_pretty_output_from_qemu_before_6_0_keeps_its_number_writer() -> None:
    reader = OutputReader(1 << 20)
    reader.feed(PRETTY_GREETING)
    reader.before_6_0 = True  # what the upstream sets once the greeting said 5.2
    [(line, _)] = reader.feed(b'{\n    "return": {\n        "a": 0.1\n    },\n    "id": 7\n}\n')
    assert line == b'{"return": {"a": 0.1}, "id": 7}\r\n'


@pytest.mark.parametrize(
    "garbage", [b"not json at all\n", b"[1,\n2]\n", b"{\n\x01}\n", b'{"a":\n1}}\n']
)
def test_pretty_output_that_is_not_objects_is_a_desync(garbage: bytes) -> None:
    with pytest.raises(Desync):
        OutputReader(1 << 20).feed(garbage)


def test_a_first_line_that_is_one_message_is_not_pretty() -> None:
    reader = OutputReader(1 << 20)
    reader.feed(GREETING)
    assert reader.feed(b"oops\r\n") == [(b"oops\r\n", None)]  # the caller's desync, not pretty


@pytest.mark.parametrize(
    ("line", "uid"),
    [
        (b'{"return": {}, "id": 2305843009213693952}\r\n', 2305843009213693952),
        (b'{"return": {"id": 5}, "id": 6}\r\n', 6),
        (b'{"return": {}, "id": "6"}\r\n', None),  # not the proxy's: a string
        (b'{"return": {}, "id": -6}\r\n', None),
        (b'{"return": {}, "id": 6}\n', None),  # not as QEMU ends lines: parsed instead
        (b'{"return": {}}\r\n', None),
        (b'{"id": 6, "error": {"class": "GenericError", "desc": "x"}}\r\n', None),
        (b'{"return": {}, "id": 123456789012345678901}\r\n', None),  # longer than any of ours
        (b'{"timestamp": {}, "event": "STOP", "id": 6}\r\n', None),
    ],
)
def test_success_id(line: bytes, uid: int | None) -> None:
    found = success_id(line)
    if uid is None:
        assert found is None
    else:
        assert found == (uid, len(line) - len(b', "id": %d}\r\n' % uid))


@settings(max_examples=500, deadline=None)
@given(JSON, IDS)
def test_success_id_is_the_top_level_id_whatever_the_payload(value: Any, uid: int) -> None:
    line = _line({"return": value, "id": uid})
    assert success_id(line) == (uid, len(line) - len(b', "id": %d}\r\n' % uid))


@settings(max_examples=500, deadline=None)
@given(JSON, IDS, CLIENT_IDS)
def test_splicing_a_success_line_where_success_id_found_it_equals_writing_it_anew(
    value: Any, uid: int, client_id: bytes | None
) -> None:
    """The upstream's hot path: success_id's offset, then splice_success."""
    line = _line({"return": value, "id": uid})
    found = success_id(line)
    assert found is not None
    assert splice_success(line, found[1], client_id) == reply_for({"return": value}, client_id)


@settings(max_examples=500, deadline=None)
@given(
    st.one_of(
        JSON.map(lambda v: {"return": v}),
        st.tuples(st.text(max_size=6), st.text(max_size=12)).map(
            lambda cd: {"error": {"class": cd[0], "desc": cd[1]}}
        ),
    ),
    IDS,
    CLIENT_IDS,
)
def test_splicing_equals_writing_the_reply_anew(
    reply: dict[str, Any], uid: int, client_id: bytes | None
) -> None:
    line = _line({**reply, "id": uid})
    spliced = restore_id(line, uid, client_id, None)
    assert spliced == reply_for({**reply, "id": uid}, client_id)


@pytest.mark.parametrize("size", [0, 16 * 1024 - 20, 16 * 1024, 300 * 1024])
@pytest.mark.parametrize("client_id", [None, b'"c"', b"7"])
def test_splicing_copies_small_payloads_and_views_large_ones_alike(
    size: int, client_id: bytes | None
) -> None:
    value = {"data": "x" * size}
    line = _line({"return": value, "id": 1234567})
    found = success_id(line)
    assert found is not None
    assert splice_success(line, found[1], client_id) == reply_for({"return": value}, client_id)


def test_an_unusual_layout_is_written_anew() -> None:
    msg = {"id": 9, "return": {}, "extra": 1}
    line = b'{"extra": 1, "return": {}, "id": 9}\r\n'
    assert restore_id(line, 10, b'"c"', msg) == reply_for(msg, b'"c"')


def test_whole_line_is_only_one_complete_line_after_the_first() -> None:
    reader = OutputReader(256)
    line = b'{"return": {}, "id": 7}\r\n'
    assert not reader.whole_line(GREETING)  # the first line decides pretty or not
    reader.feed(GREETING)
    assert reader.whole_line(line)
    assert not reader.whole_line(line + line)
    assert not reader.whole_line(line[:-1])
    assert not reader.whole_line(b'{"return": "' + b"x" * 256 + b'", "id": 7}\r\n')  # max_line
    reader.feed(line[:5])
    assert not reader.whole_line(line)  # something is buffered
