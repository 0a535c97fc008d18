"""Differential: the same raw client bytes to QEMU directly and through qmp-proxy.

For each QEMU version two identical QEMUs run; one is reached directly, the other through a real
``qmp-proxy`` process.  Every corpus stream goes to both on a fresh connection, followed by a
sentinel; the replies up to the sentinel's must be equal message for message (parsed, so key
order and spacing do not count; event timestamps aside).  The corpus covers negotiation faults,
every dispatch fault of ``qapi/qmp-dispatch.c`` with and without OOB, all the parse cases and id
forms of tests/test_framing.py, pipelined batches, pretty-printed and single-quoted input, and
half-closed input (read to EOF instead of up to a sentinel).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.proxyproc import ProxyProcess
from tests.qemu import QEMU_BINARIES, QemuProcess, RawQMP
from tests.test_framing import ID_TEXTS, PARSE_CASES

NEGOTIATION_SENTINEL = b'{"execute":"qmp_capabilities","id":"sentinel"}'
SENTINEL = b'{"execute":"query-version","id":"sentinel"}'

# Sent right after the greeting, before negotiation.
NEGOTIATION: list[tuple[str, bytes]] = [
    ("command-before-negotiation", b'{"execute":"query-status","id":1}'),
    ("unknown-before-negotiation", b'{"execute":"no-such"}'),
    ("exec-oob-capabilities", b'{"exec-oob":"qmp_capabilities","id":2}'),
    ("enable-unknown", b'{"execute":"qmp_capabilities","arguments":{"enable":["foo"]},"id":3}'),
    ("enable-not-list", b'{"execute":"qmp_capabilities","arguments":{"enable":"oob"}}'),
    ("enable-not-string", b'{"execute":"qmp_capabilities","arguments":{"enable":[1]}}'),
    ("enable-null", b'{"execute":"qmp_capabilities","arguments":{"enable":null}}'),
    ("extra-argument", b'{"execute":"qmp_capabilities","arguments":{"bogus":1},"id":4}'),
    ("arguments-not-object", b'{"execute":"qmp_capabilities","arguments":[]}'),
    ("unexpected-member", b'{"execute":"qmp_capabilities","foo":1,"id":5}'),
    ("parse-error", b'{"execute":}'),
    ("not-an-object", b'[1] '),
    ("negotiate-then-twice",
     b'{"execute":"qmp_capabilities","id":6}{"execute":"qmp_capabilities","id":7}'),
    ("negotiate-oob-twice", b'{"execute":"qmp_capabilities","arguments":{"enable":["oob","oob"]}}'),
    ("negotiate-then-command",
     b'{"execute":"qmp_capabilities"}{"execute":"query-status","id":8}'),
]  # fmt: skip

# Sent after negotiation (parametrized: with and without OOB enabled).
COMMANDS: list[tuple[str, bytes]] = [
    ("plain", b'{"execute":"query-status","id":1}'),
    ("no-id", b'{"execute":"query-name"}'),
    ("unknown-command", b'{"execute":"no-such","id":"x"}'),
    ("unexpected-member", b'{"execute":"query-status","foo":1,"id":1}'),
    ("lacks-execute", b'{"id":2}'),
    ("execute-not-string", b'{"execute":1,"id":3}'),
    ("arguments-array", b'{"execute":"query-status","arguments":[],"id":4}'),
    ("arguments-null", b'{"execute":"query-status","arguments":null,"id":5}'),
    ("execute-and-exec-oob", b'{"execute":"query-status","exec-oob":"migrate-pause","id":6}'),
    ("exec-oob-only", b'{"exec-oob":"migrate-pause","id":7}'),
    ("exec-oob-not-allowed", b'{"exec-oob":"query-status","id":8}'),
    ("several-faults", b'{"foo":1,"execute":2,"arguments":3,"id":9}'),
    ("capabilities-again", b'{"execute":"qmp_capabilities","id":10}'),
    ("capabilities-again-bad", b'{"execute":"qmp_capabilities","arguments":{"enable":["x"]}}'),
    ("bad-argument", b'{"execute":"query-status","arguments":{"x":1},"id":11}'),
    ("single-quoted", b"{'execute':'query-status','id':'sq'}"),
    ("pretty", b'{\n  "execute": "query-status",\n  "id": "pretty"\n}\n'),
    ("pipelined", b"".join(
        b'{"execute":"query-status","id":%d}{"execute":"no-such-%d","id":%d}' % (i, i, i)
        for i in range(6)
    )),
    ("crlf-lines", b'{"execute":"query-status","id":"l1"}\r\n{"execute":"query-name"}\r\n'),
    ("garbage-between", b'{"execute":"query-status","id":1} xyz {"execute":"query-name","id":2}'),
    ("resync-0xff", b'{"execute":"query-status","id":"half"\xff{"execute":"query-name","id":3}'),
]  # fmt: skip


def command_corpus() -> Iterator[tuple[str, bytes]]:
    yield from COMMANDS
    for name, data, _ in PARSE_CASES:
        yield f"parse-{name}", data
    for text in ID_TEXTS:
        yield "id-" + text.decode(errors="replace"), b'{"execute":"query-status","id":%s}' % text


COMMAND_CORPUS = list(command_corpus())


def normalise(msg: Any) -> Any:
    if isinstance(msg, dict) and "timestamp" in msg:
        msg = dict(msg, timestamp=None)
    return msg


def exchange(path: str, *, negotiate: str | None, stream: bytes, sentinel: bytes) -> list[Any]:
    """Greeting, optional negotiation, the stream, then replies up to the sentinel's."""
    with RawQMP(path) as c:
        c.recv_message()
        if negotiate is not None:
            c.send(negotiate.encode())
            assert c.recv_message().get("return") == {}
        c.send(stream + sentinel)
        out = []
        while True:
            line = c.recv_line()
            try:
                msg = json.loads(line)
            except ValueError:
                out.append(line)  # QEMU writes `inf` ids as a bare word: compare the text
                continue
            if isinstance(msg, dict) and msg.get("id") == "sentinel":
                return out
            out.append(normalise(msg))


def half_closed(path: str, stream: bytes) -> list[Any]:
    """Greeting, the stream, shut down writing; everything until the server closes."""
    with RawQMP(path) as c:
        c.recv_message()
        c.send(stream)
        c.shutdown_write()
        out = []
        while True:
            try:
                out.append(normalise(c.recv_message()))
            except EOFError:
                return out


@pytest.fixture(scope="module", params=sorted(QEMU_BINARIES))
def pair(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, str]]:
    """(direct QEMU socket, proxy socket in front of an identical QEMU)."""
    tmp: Path = tmp_path_factory.mktemp("diff")
    with (
        QemuProcess(request.param, "-M", "none") as direct,
        QemuProcess(request.param, "-M", "none") as behind,
    ):
        listen = tmp / "p.sock"
        proxy = ProxyProcess("--upstream", f"unix:{behind.sock_path}", "--listen", f"unix:{listen}",
                             "--state-dir", str(tmp), tmp_path=tmp)  # fmt: skip
        try:
            proxy.wait_log("event=upstream_ready")
            yield direct.sock_path, str(listen)
        finally:
            assert proxy.stop() == 0


@pytest.mark.parametrize(("name", "stream"), NEGOTIATION, ids=[n for n, _ in NEGOTIATION])
def test_negotiation(pair: tuple[str, str], name: str, stream: bytes) -> None:
    direct, proxied = (
        exchange(p, negotiate=None, stream=stream, sentinel=NEGOTIATION_SENTINEL) for p in pair
    )
    assert proxied == direct


@pytest.mark.parametrize("oob", [False, True], ids=["plain", "oob"])
@pytest.mark.parametrize(("name", "stream"), COMMAND_CORPUS, ids=[n for n, _ in COMMAND_CORPUS])
def test_commands(pair: tuple[str, str], name: str, stream: bytes, oob: bool) -> None:
    negotiate = (
        '{"execute":"qmp_capabilities","arguments":{"enable":["oob"]}}'
        if oob
        else '{"execute":"qmp_capabilities"}'
    )
    direct, proxied = (
        exchange(p, negotiate=negotiate, stream=stream, sentinel=SENTINEL) for p in pair
    )
    assert proxied == direct


def test_refused_exec_oob_keeps_its_place_without_oob(pair: tuple[str, str]) -> None:
    """Without OOB, QEMU reads nothing more until an in-band request is answered, so the
    exec-oob it refuses comes second.  (With OOB on, QEMU answers it from its I/O thread and
    either order is legal, so that case is not compared.)"""
    stream = b'{"execute":"query-status","id":81}{"exec-oob":"query-status","id":82}'
    direct, proxied = (
        exchange(p, negotiate='{"execute":"qmp_capabilities"}', stream=stream, sentinel=SENTINEL)
        for p in pair
    )
    assert [m.get("id") for m in direct] == [81, 82]
    assert proxied == direct


HALF_CLOSED = [
    ("two-commands", b'{"execute":"qmp_capabilities"}{"execute":"query-status"}'),
    ("with-errors", b'{"execute":"qmp_capabilities"}{"execute":"no-such","id":1}xyz '
                    b'{"execute":"query-status","id":2}'),
    ("before-negotiation", b'{"execute":"query-status","id":1}'),
    ("unfinished-message", b'{"execute":"qmp_capabilities"}{"execute":"query-st'),
]  # fmt: skip


@pytest.mark.parametrize(("name", "stream"), HALF_CLOSED, ids=[n for n, _ in HALF_CLOSED])
def test_half_closed(pair: tuple[str, str], name: str, stream: bytes) -> None:
    direct, proxied = (half_closed(p, stream) for p in pair)
    assert proxied == direct
