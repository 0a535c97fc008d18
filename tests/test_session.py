"""Pure tests of :class:`proxy.session.Session`: one client's virtual monitor, without sockets.

Expected error texts are QEMU's own (docs/protocol.md, 'Connection and greeting', 'Input: how
QEMU frames what a client writes' and 'Commands and replies'; verified on 7.2 and 10.0); where
that document does not quote a case, the comment names the QEMU code that produces it.  Commands
are made by feeding the session the bytes a client would send, never by building them by hand.
"""

from __future__ import annotations

import itertools
import os
import string
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy import qjson
from proxy.framing import Framer, Message
from proxy.session import Command, FdBudget, Notice, NoticeKind, Session
from tests.test_framing_properties import same

Pipes = list[tuple[int, tuple[int, int] | None]]
NOT_OBJECT_ARGS = "QMP input member 'arguments' must be an object"
NEGOTIATION = b"Expecting capabilities negotiation with 'qmp_capabilities'"
MAX_MESSAGE = 1 << 20


def session(offered: tuple[str, ...] = ("oob",), *, enable: list[str] | None = None) -> Session:
    """A fresh session; negotiated (with ``enable``) unless ``enable`` is None."""
    s = Session(1, frozenset(offered), MAX_MESSAGE)
    if enable is not None:
        caps = ", ".join(f'"{c}"' for c in enable)
        out = rx(
            s, b'{"execute": "qmp_capabilities", "arguments": {"enable": [%s]}}' % (caps.encode())
        )
        assert out == [b'{"return": {}}\r\n']
        assert s.negotiated
    return s


def error(desc: str | bytes, cls: str = "GenericError", id_: bytes | None = None) -> bytes:
    """QEMU's error line: ``id`` first when there is one (QDict order, ``qobject/qdict.c``)."""
    if isinstance(desc, str):
        desc = desc.encode()
    body = b'{"class": "%s", "desc": "%s"}' % (cls.encode(), desc)
    if id_ is None:
        return b'{"error": ' + body + b"}\r\n"
    return b'{"id": ' + id_ + b', "error": ' + body + b"}\r\n"


def rx(s: Session, data: bytes, fds: list[int] | None = None) -> list[Command | bytes]:
    """What a read gives the route to write and run (the notices it counts left out)."""
    return [i for i in s.receive(data, fds) if not isinstance(i, Notice)]


def notices(s: Session, data: bytes, fds: list[int] | None = None) -> list[Notice]:
    return [i for i in s.receive(data, fds) if isinstance(i, Notice)]


def only_command(items: list[Command | bytes]) -> Command:
    assert len(items) == 1, items
    cmd = items[0]
    assert isinstance(cmd, Command), cmd
    return cmd


def parse_one(data: bytes) -> Message:
    """What QEMU's parser makes of bytes the proxy sends upstream (must be one object)."""
    items = Framer().feed(data)
    assert len(items) == 1, items
    item = items[0]
    assert isinstance(item, Message), item
    return item


@pytest.fixture
def pipes() -> Iterator[Pipes]:
    """Real descriptors (with their inodes); whatever the test leaves open is closed after."""
    made: Pipes = []
    yield made
    for fd, inode in made:
        # The session closed some, and their numbers may be reused by now: close only ours.
        if _inode(fd) == inode:
            os.close(fd)


def _inode(fd: int) -> tuple[int, int] | None:
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def new_pipe(pipes: Pipes) -> tuple[int, int]:
    r, w = os.pipe()
    pipes.extend((fd, _inode(fd)) for fd in (r, w))
    return r, w


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


# -- negotiation mode ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (
            b'{"execute": "query-status", "id": "x1"}',
            error(NEGOTIATION, "CommandNotFound", b'"x1"'),
        ),
        (b'{"execute": "query-status"}', error(NEGOTIATION, "CommandNotFound")),
        # An unknown command gets the same substitution (monitor_qmp_dispatch).
        (b'{"execute": "nosuch", "id": 7}', error(NEGOTIATION, "CommandNotFound", b"7")),
        # Top-level faults are found before the command table is consulted.
        (
            b'{"execute": "qmp_capabilities", "foo": 1, "id": 2}',
            error("QMP input member 'foo' is unexpected", id_=b"2"),
        ),
    ],
)
def test_before_negotiation_only_qmp_capabilities(data: bytes, expected: bytes) -> None:
    s = session()
    assert rx(s, data) == [expected]
    assert not s.negotiated
    assert s.queued == 0


def test_qmp_capabilities_negotiates_with_and_without_id() -> None:
    s = session()
    assert rx(s, b'{"execute": "qmp_capabilities", "id": "n"}') == [
        b'{"return": {}, "id": "n"}\r\n'
    ]
    assert s.negotiated and not s.oob
    s = session()
    assert rx(s, b'{"execute":"qmp_capabilities","arguments":{"enable":[]}}') == [
        b'{"return": {}}\r\n'
    ]
    assert s.negotiated and not s.oob


def test_second_qmp_capabilities_goes_upstream() -> None:
    """After negotiation the command table is QEMU's: QEMU answers "already complete" itself."""
    s = session(enable=[])
    cmd = only_command(rx(s, b'{"execute": "qmp_capabilities", "id": "again"}'))
    assert cmd.name == "qmp_capabilities"
    assert cmd.client_id == b'"again"'
    assert not cmd.oob
    assert s.queued == 1


@pytest.mark.parametrize(
    ("arguments", "desc"),
    [
        (b'{"enable": ["foo"]}', "Parameter 'null' does not accept value 'foo'"),
        (b'{"enable": "oob"}', "Invalid parameter type for 'enable', expected: array"),
        (b'{"enable": null}', "Invalid parameter type for 'enable', expected: array"),
        (b'{"enable": [], "bogus": 1}', "Parameter 'bogus' is unexpected"),
        # qobject-input-visitor full_name_nth() names a list element "enable[0]".
        (b'{"enable": [1]}', "Invalid parameter type for 'enable[0]', expected: string"),
    ],
)
def test_bad_enable(arguments: bytes, desc: str) -> None:
    s = session()
    data = b'{"execute": "qmp_capabilities", "arguments": ' + arguments + b', "id": 3}'
    assert rx(s, data) == [error(desc, id_=b"3")]
    assert not s.negotiated
    # The session is still in negotiation mode and a correct attempt works.
    assert rx(s, b'{"execute": "qmp_capabilities"}') == [b'{"return": {}}\r\n']


def test_exec_oob_qmp_capabilities_during_negotiation() -> None:
    s = session()
    assert rx(s, b'{"exec-oob": "qmp_capabilities", "id": 1}') == [
        error("QMP input member 'exec-oob' is unexpected", id_=b"1")
    ]
    assert not s.negotiated


def test_enable_oob_not_offered() -> None:
    s = session(offered=())
    data = b'{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}, "id": 1}'
    assert rx(s, data) == [error("Capability oob not available", id_=b"1")]
    assert not s.negotiated


def test_enable_oob_offered() -> None:
    s = session(enable=["oob"])
    assert s.oob


def test_requests_after_negotiation_in_the_same_read() -> None:
    s = session()
    out = rx(
        s,
        b'{"execute":"query-status","id":1}'
        b'{"execute":"qmp_capabilities","id":2}'
        b'{"execute":"query-status","id":3}',
    )
    assert out[:2] == [
        error(NEGOTIATION, "CommandNotFound", b"1"),
        b'{"return": {}, "id": 2}\r\n',
    ]
    assert only_command(out[2:]).client_id == b"3"


# -- top-level checks, per session oob state ----------------------------------------------------


def _tdb_hash(key: bytes) -> int:
    """qobject/qdict.c tdb_hash(), written out again here to check proxy.qjson against."""
    value = (0x238F13AF * len(key)) & 0xFFFFFFFF
    for i, byte in enumerate(key):
        value = (value + (byte << (i * 5 % 24))) & 0xFFFFFFFF
    return (1103515243 * value + 12345) & 0xFFFFFFFF


def _qdict_members(keys: list[str]) -> list[str]:
    """The order QEMU walks a QDict the keys were put into, by building one as qobject/qdict.c
    does: 512 bucket lists, each new entry put at the head of its bucket (QLIST_INSERT_HEAD),
    qdict_first()/qdict_next() going up the buckets.  A key is hashed as QEMU holds it: UTF-8,
    with U+0000 as the bytes C0 80 (qobject/json-parser.c)."""
    buckets: list[list[str]] = [[] for _ in range(512)]
    for key in keys:
        held = key.encode().replace(b"\x00", b"\xc0\x80")
        buckets[_tdb_hash(held) % 512].insert(0, key)
    return [key for bucket in buckets for key in bucket]


# Objects sent to QEMU as a command's id, and the member order QEMU wrote them back in
# (recorded from QEMU 5.2, 7.2, 10.0 and 11.1: the same on all four).  "p" and "ac" share a
# bucket (302), as do "aa" and "aq" (110): inside a bucket the key put in last comes first.
QEMU_MEMBER_ORDERS = [
    (["b", "a"], ["a", "b"]),
    (["execute", "exec-oob", "arguments", "id"], ["exec-oob", "execute", "arguments", "id"]),
    (["p", "ac"], ["ac", "p"]),
    (["ac", "p"], ["p", "ac"]),
    (["aa", "x", "aq", "y"], ["aq", "aa", "x", "y"]),
    (["z", "y", "x", "w", "v", "u", "t"], ["w", "x", "t", "y", "u", "z", "v"]),
    (["\u00e9", "\u0000", "a\u0000b", "\u20ac"], ["\u00e9", "\u0000", "a\u0000b", "\u20ac"]),
]


@pytest.mark.parametrize(("written", "echoed"), QEMU_MEMBER_ORDERS)
def test_qdict_order_is_qemus(written: list[str], echoed: list[str]) -> None:
    """The restatement above, and proxy.qjson, both give the order QEMU wrote."""
    assert _qdict_members(written) == echoed
    assert qjson.qdict_order(written) == echoed


TWO_LETTERS = ["".join(p) for p in itertools.product(string.ascii_lowercase, repeat=2)]


@pytest.mark.parametrize("keys", [TWO_LETTERS, TWO_LETTERS[::-1]], ids=["az", "za"])
def test_qjson_qdict_order_against_the_restatement(keys: list[str]) -> None:
    """676 keys in 512 buckets: many buckets hold several, in both insertion orders."""
    assert qjson.qdict_order(keys) == _qdict_members(keys)
    assert [qjson.tdb_hash(k.encode()) for k in keys] == [_tdb_hash(k.encode()) for k in keys]


@given(st.lists(st.text(max_size=8), unique=True, max_size=40))
def test_qjson_qdict_order_against_the_restatement_any_keys(keys: list[str]) -> None:
    assert qjson.qdict_order(keys) == _qdict_members(keys)


def test_clash_order_follows_qdict_buckets() -> None:
    """qmp_dispatch_check_obj() walks the QDict: lower bucket first (QDICT_BUCKET_MAX 512).

    ``exec-oob`` hashes to a lower bucket than ``execute``, so QEMU meets it first and reports
    ``execute`` as the clashing member whatever order the client wrote them in.
    """
    assert _tdb_hash(b"exec-oob") % 512 < _tdb_hash(b"execute") % 512
    for data in (
        b'{"execute": "query-status", "exec-oob": "yank", "id": 1}',
        b'{"exec-oob": "yank", "execute": "query-status", "id": 1}',
    ):
        s = session(enable=["oob"])
        assert rx(s, data) == [
            error("QMP input member 'execute' clashes with 'exec-oob'", id_=b"1")
        ]


def test_execute_and_exec_oob_without_oob() -> None:
    """Whether OOB is on is the session's own negotiation, not the upstream's (which has oob on)."""
    for data in (
        b'{"execute": "query-status", "exec-oob": "yank", "id": 1}',
        b'{"exec-oob": "yank", "execute": "query-status", "id": 1}',
    ):
        s = session(enable=[])
        assert rx(s, data) == [error("QMP input member 'exec-oob' is unexpected", id_=b"1")]


@pytest.mark.parametrize(
    ("data", "desc"),
    [
        (b'{"execute": "query-status", "foo": 1, "id": 1}', "QMP input member 'foo' is unexpected"),
        (b'{"id": 1}', "QMP input lacks member 'execute'"),
        (b'{"execute": 1, "id": 1}', "QMP input member 'execute' must be a string"),
        (b'{"execute": "x", "arguments": [], "id": 1}', NOT_OBJECT_ARGS),
        (b'{"execute": "x", "arguments": null, "id": 1}', NOT_OBJECT_ARGS),
    ],
)
def test_top_level_faults_keep_the_id(data: bytes, desc: str) -> None:
    """The id is read before the checks run, so these errors carry it (``qapi/qmp-dispatch.c``)."""
    s = session(enable=[])
    assert rx(s, data) == [error(desc, id_=b"1")]


def test_exec_oob_refused_without_oob_keeps_its_place() -> None:
    """Without OOB, QEMU stops reading after each in-band request until it is answered
    (monitor/qmp.c handle_qmp_command), so an exec-oob it refuses is answered in order: the
    differential fuzz against QEMU 7.2 and 10.0 showed it (the proxy once answered at once)."""
    s = session(enable=[])
    cmd = only_command(rx(s, b'{"execute": "query-status", "id": 1}'))
    assert rx(s, b'{"exec-oob": "yank", "id": 2}{"execute": "bogus", "x": 1, "id": 3}') == []
    assert s.complete(cmd, b"R1\r\n") == [
        b"R1\r\n",
        error("QMP input member 'exec-oob' is unexpected", id_=b"2"),
        error("QMP input member 'x' is unexpected", id_=b"3"),
    ]


def test_exec_oob_refused_with_oob_overtakes() -> None:
    """With OOB on, QEMU answers exec-oob requests, refused ones included, from its I/O thread
    at once, ahead of in-band replies still pending."""
    s = session(enable=["oob"])
    cmd = only_command(rx(s, b'{"execute": "query-status", "id": 1}'))
    out = rx(s, b'{"exec-oob": "query-status", "x": 1, "id": 2}{"execute": "b", "x": 1, "id": 3}')
    assert out == [error("QMP input member 'x' is unexpected", id_=b"2")]
    assert s.complete(cmd, b"R1\r\n") == [
        b"R1\r\n",
        error("QMP input member 'x' is unexpected", id_=b"3"),
    ]


def test_exec_oob_command_from_an_oob_session() -> None:
    s = session(enable=["oob"])
    cmd = only_command(rx(s, b'{"exec-oob": "migrate-pause", "id": "p"}'))
    assert cmd.oob and cmd.name == "migrate-pause" and cmd.client_id == b'"p"'
    assert s.queued == 1  # awaiting its reply, though not in the in-band order
    assert s.complete(cmd, b"P\r\n") == [b"P\r\n"] and s.finished


# -- ids ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("written", "echoed"),
    [
        # QEMU re-serializes the parsed id (``qobject/json-writer.c``) [verified 7.2 and 10.0].
        (b'"libvirt-1"', b'"libvirt-1"'),
        (b"null", b"null"),
        (b"true", b"true"),
        (b"[1, [2]]", b"[1, [2]]"),
        (b"12345678901234567890", b"12345678901234567890"),
        (b"18446744073709551615", b"18446744073709551615"),
        (b"18446744073709551616", b"1.8446744073709552e+19"),
        (b"-9223372036854775809", b"-9.2233720368547758e+18"),
        (b"1.0", b"1"),
        (b"1e3", b"1000"),
        (b"0.1", b"0.10000000000000001"),
        (b"-0.0", b"-0"),
        (b"-0", b"0"),
        (b"1e-7", b"9.9999999999999995e-08"),
        (b"2.5e20", b"2.5e+20"),
        (b"1e400", b"inf"),
        ('"é"'.encode(), b'"\\u00E9"'),
        (b'"\\u001f"', b'"\\u001F"'),
        (b'"\\/"', b'"/"'),
        (b"'single'", b'"single"'),
        (b'{"b": 1, "a": 2}', b'{"a": 2, "b": 1}'),
    ],
)
def test_client_id_is_what_qemu_would_echo(written: bytes, echoed: bytes) -> None:
    s = session(enable=[])
    cmd = only_command(rx(s, b'{"execute": "query-status", "id": ' + written + b"}"))
    assert cmd.client_id == echoed
    # The same id on a locally answered fault comes back identically.
    fault = rx(s, b'{"execute": "query-status", "bad": 0, "id": ' + written + b"}")
    assert s.complete(cmd, b"R\r\n") == [
        b"R\r\n",
        error("QMP input member 'bad' is unexpected", id_=echoed),
    ]
    assert fault == []


def test_no_id_is_not_null_id() -> None:
    s = session(enable=[])
    assert only_command(rx(s, b'{"execute": "query-status"}')).client_id is None
    assert only_command(rx(s, b'{"execute": "query-status", "id": null}')).client_id == b"null"


# -- the bytes that go upstream -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("written", "value"),
    [
        (b'{"execute":"query-status","id":"abc"}', {"execute": "query-status", "id": 41}),
        # Single quotes and \' are the client's syntax, not QEMU's data: QEMU gets the string.
        (
            b"{'execute':'human-monitor-command','arguments':{'command-line':'it\\'s'},'id':'sq'}",
            {"execute": "human-monitor-command", "arguments": {"command-line": "it's"}, "id": 41},
        ),
        # Numbers orjson cannot hold reach QEMU as the values QEMU itself would have read.
        (
            b'{"execute":"x","arguments":{"a":1e400,"b":123456789012345678901234567890},"id":1.50}',
            {
                "execute": "x",
                "arguments": {"a": float("inf"), "b": 1.2345678901234568e29},
                "id": 41,
            },
        ),
        # Only the top-level id: an "id" inside arguments is the client's data.
        (
            b'{"id": {"id": 1}, "execute": "x", "arguments": {"id": "keep"}}',
            {"id": 41, "execute": "x", "arguments": {"id": "keep"}},
        ),
        (
            b'{\n  "execute": "query-status",\n  "id": [1,\n 2]\n}',
            {"execute": "query-status", "id": 41},
        ),
        # No id: one is added.
        (b'{"execute":"query-status"}', {"execute": "query-status", "id": 41}),
        (
            b'{ "execute" : "query-status" , "arguments" : { } }',
            {"execute": "query-status", "arguments": {}, "id": 41},
        ),
    ],
)
def test_wire_is_the_parsed_request_under_the_upstream_id(
    written: bytes, value: dict[str, object]
) -> None:
    """QEMU never gets the client's bytes: it gets the proxy's writing of what the proxy
    parsed, so it reads exactly the message the proxy checked, whatever the client wrote."""
    s = session(enable=[])
    cmd = only_command(rx(s, written))
    wire = cmd.wire(41)
    assert cmd.value["id"] == 41
    msg = parse_one(wire)
    assert same(msg.value, value), (wire, msg.value)


def test_wire_of_an_exec_oob_command() -> None:
    s = session(enable=["oob"])
    cmd = only_command(rx(s, b'{"exec-oob":"yank","arguments":{"instances":[]}}'))
    assert cmd.wire(9) == b'{"exec-oob":"yank","arguments":{"instances":[]},"id":9}'


# -- reply order ----------------------------------------------------------------------------------


def test_local_errors_wait_behind_commands_in_flight() -> None:
    s = session(enable=[])
    out = rx(
        s,
        b'{"execute":"a","id":1}'
        b'{"execute":"b","bad":1,"id":2}'
        b'{"execute":"c","id":3}'
        b'{"execute":"d","id":4,"bad":1}',
    )
    a, c = out
    assert isinstance(a, Command) and isinstance(c, Command)
    assert s.queued == 4
    bad = "QMP input member 'bad' is unexpected"
    assert s.complete(a, b"A\r\n") == [b"A\r\n", error(bad, id_=b"2")]
    assert s.queued == 2
    assert s.complete(c, b"C\r\n") == [b"C\r\n", error(bad, id_=b"4")]
    assert s.queued == 0
    # With nothing in flight, a local error goes at once.
    assert rx(s, b'{"execute":"e","bad":1}') == [error("QMP input member 'bad' is unexpected")]


def test_replies_released_in_request_order() -> None:
    s = session(enable=[])
    a, b, c = rx(s, b'{"execute":"a"}{"execute":"b"}{"execute":"c"}')
    assert isinstance(a, Command) and isinstance(b, Command) and isinstance(c, Command)
    assert s.complete(b, b"B\r\n") == []
    assert s.complete(c, b"C\r\n") == []
    assert s.complete(a, b"A\r\n") == [b"A\r\n", b"B\r\n", b"C\r\n"]
    assert s.finished


def test_exec_oob_replies_are_not_ordered() -> None:
    s = session(enable=["oob"])
    inband = only_command(rx(s, b'{"execute":"query-status","id":1}'))
    oob = only_command(rx(s, b'{"exec-oob":"yank","id":2}'))
    assert s.complete(oob, b"Y\r\n") == [b"Y\r\n"]
    assert s.queued == 1
    assert s.complete(inband, b"Q\r\n") == [b"Q\r\n"]


def test_parse_errors_in_order_and_without_id() -> None:
    s = session(enable=[])
    data = b'{"execute":"a","id":1}{"execute": }{"execute":"b","id":"x","id":"y"}[1]'
    items = s.receive(data)
    kinds = [i.kind for i in items if isinstance(i, Notice)]
    assert kinds == [NoticeKind.PARSE, NoticeKind.PARSE, NoticeKind.NOT_OBJECT]  # for metrics
    cmd = only_command([i for i in items if not isinstance(i, Notice)])
    assert s.queued == 4
    assert s.complete(cmd, b"A\r\n") == [
        b"A\r\n",
        error("JSON parse error, expecting value"),
        error("JSON parse error, duplicate key"),
        error("QMP input must be a JSON object"),
    ]


def test_message_split_across_reads() -> None:
    s = session(enable=[])
    data = b'{"execute": "query-status", "id": "split"}'
    for byte in data[:-1]:
        assert rx(s, bytes([byte])) == []
    cmd = only_command(rx(s, data[-1:]))
    assert cmd.value == {"execute": "query-status", "id": "split"}
    assert cmd.client_id == b'"split"'


# -- descriptors ----------------------------------------------------------------------------------


def test_latest_fd_batch_wins_and_the_older_is_closed(pipes: Pipes) -> None:
    s = session(enable=[])
    r1, w1 = new_pipe(pipes)
    r2, _ = new_pipe(pipes)
    assert rx(s, b" ", [r1, w1]) == []
    assert rx(s, b" ", [r2]) == []
    assert not is_open(r1) and not is_open(w1)
    assert is_open(r2)
    cmd = only_command(rx(s, b'{"execute":"getfd","arguments":{"fdname":"f"}}'))
    assert cmd.fds == [r2]


def test_fds_go_only_to_getfd_and_add_fd(pipes: Pipes) -> None:
    s = session(enable=[])
    r, _ = new_pipe(pipes)
    # libvirt style: the descriptor rides on the same sendmsg as the command after it.
    out = rx(s, b'{"execute":"query-status"}{"execute":"add-fd","arguments":{"fdset-id":1}}', [r])
    status, add_fd = out
    assert isinstance(status, Command) and isinstance(add_fd, Command)
    assert not status.fds
    assert add_fd.fds == [r]
    # Taken: the next fd command gets none.
    getfd = only_command(rx(s, b'{"execute":"getfd","arguments":{"fdname":"f"}}'))
    assert not getfd.fds
    assert is_open(r)


def test_rejected_command_leaves_the_batch_pending(pipes: Pipes) -> None:
    s = session()
    r, _ = new_pipe(pipes)
    out = rx(s, b'{"execute":"getfd","arguments":{"fdname":"f"}}', [r])
    assert out == [error(NEGOTIATION, "CommandNotFound")]
    rx(s, b'{"execute":"qmp_capabilities"}')
    cmd = only_command(rx(s, b'{"execute":"getfd","arguments":{"fdname":"f"}}'))
    assert cmd.fds == [r]


def test_close_releases_pending_and_command_fds(pipes: Pipes) -> None:
    s = session(enable=[])
    r1, w1 = new_pipe(pipes)
    cmd = only_command(rx(s, b'{"execute":"getfd","arguments":{"fdname":"f"}}', [r1]))
    r2, _ = new_pipe(pipes)
    rx(s, b" ", [r2])
    s.close_command_fds(cmd)
    assert not is_open(r1) and not cmd.fds
    assert is_open(r2)
    s.close()
    assert not is_open(r2)
    assert is_open(w1)  # never handed to the session


def test_exec_oob_never_carries_descriptors(pipes: Pipes) -> None:
    """QEMU refuses getfd out of band before taking a descriptor, so the batch stays pending
    for this client; it must never reach QEMU with a command that will not take it."""
    s = session(enable=["oob"])
    r, _ = new_pipe(pipes)
    oob = only_command(rx(s, b'{"exec-oob":"getfd","arguments":{"fdname":"f"}}', [r]))
    assert oob.oob and not oob.fds and not oob.fd_command
    assert s.pending_fds == 1
    cmd = only_command(rx(s, b'{"execute":"getfd","arguments":{"fdname":"f"}}'))
    assert cmd.fds == [r] and cmd.fd_command


def test_every_descriptor_command_is_marked_for_the_fd_gate() -> None:
    s = session(enable=[])
    for name in (b"getfd", b"add-fd"):
        assert only_command(rx(s, b'{"execute":"%s"}' % name)).fd_command
    assert not only_command(rx(s, b'{"execute":"closefd"}')).fd_command


def test_a_batch_over_the_budget_is_closed_with_the_older_one(pipes: Pipes) -> None:
    budget = FdBudget(3)
    s = Session(1, frozenset(), MAX_MESSAGE, fd_budget=budget)
    rx(s, b'{"execute":"qmp_capabilities"}')
    r1, w1 = new_pipe(pipes)
    assert notices(s, b" ", [r1, w1]) == []
    assert budget.held == 2
    r2, w2 = new_pipe(pipes)
    r3, w3 = new_pipe(pipes)
    assert notices(s, b" ", [r2, w2, r3, w3]) == [Notice(NoticeKind.FDS_REFUSED, "4")]
    assert budget.held == 0
    assert not any(is_open(fd) for fd in (r1, w1, r2, w2, r3, w3))
    assert s.pending_fds == 0


def test_descriptors_leave_the_budget_when_handed_over_or_closed(pipes: Pipes) -> None:
    budget = FdBudget(8)
    s = Session(1, frozenset(), MAX_MESSAGE, fd_budget=budget)
    rx(s, b'{"execute":"qmp_capabilities"}')
    r, w = new_pipe(pipes)
    cmd = only_command(rx(s, b'{"execute":"getfd","arguments":{"fdname":"f"}}', [r, w]))
    assert budget.held == 2
    assert s.hand_over_fds(cmd) == [r, w] and cmd.carried_fds
    assert budget.held == 0
    r2, _ = new_pipe(pipes)
    rx(s, b" ", [r2])
    s.close()
    assert budget.held == 0 and not is_open(r2)


def test_exec_oob_in_flight_counts_toward_max_queued() -> None:
    s = Session(1, frozenset({"oob"}), MAX_MESSAGE, max_queued=2)
    rx(s, b'{"execute":"qmp_capabilities","arguments":{"enable":["oob"]}}')
    a = only_command(rx(s, b'{"exec-oob":"yank"}'))
    assert (s.busy(), s.queued) == (False, 1)  # (a tuple: a bare `not s.busy()` would narrow it)
    only_command(rx(s, b'{"exec-oob":"yank"}'))
    assert s.busy()  # the proxy stops reading: a client cannot pile up exec-oob without bound
    assert rx(s, b'{"exec-oob":"yank"}') == []  # held, not handled
    assert s.complete(a, b"Y\r\n") == [b"Y\r\n"]
    assert only_command([i for i in s.resume() if not isinstance(i, Notice)]).oob
