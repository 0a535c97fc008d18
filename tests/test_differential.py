"""Differential: the same raw client bytes to QEMU directly and through qmp-proxy.

For each QEMU version two identical QEMUs run; one is reached directly, the other through a real
``qmp-proxy`` process.  Every corpus stream goes to both on a fresh connection, followed by a
sentinel; everything each side writes, from the greeting up to the sentinel's reply, must be
equal byte for byte, line for line, line ends included (README, 'What "exactly like QEMU"
covers': replies and errors as QEMU writes them, one message per line ending in ``\r\n``).  The
only thing normalised is what two QEMU processes legitimately write differently: the clock
reading in an event's ``timestamp`` (see :func:`normalise`).  The corpus covers negotiation
faults, every dispatch fault of ``qapi/qmp-dispatch.c`` with and without OOB, all the parse cases
and id forms of tests/test_framing.py, pipelined batches, pretty-printed and single-quoted
input, and half-closed input (read to EOF instead of up to a sentinel).

The bytes are read with a socket of this module's own (:class:`Wire`), not
``tests.qemu.RawQMP``, whose lines drop the ``\r``.
"""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Self

import pytest

from tests.proxyproc import ProxyProcess
from tests.qemu import QEMU_BINARIES, QemuProcess
from tests.test_framing import ID_TEXTS, PARSE_CASES

NEGOTIATION_SENTINEL = b'{"execute":"qmp_capabilities","id":"sentinel"}'
SENTINEL = b'{"execute":"query-version","id":"sentinel"}'
PLAIN = b'{"execute":"qmp_capabilities"}'
WITH_OOB = b'{"execute":"qmp_capabilities","arguments":{"enable":["oob"]}}'

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
    ("not-an-object", b"[1] "),
    (
        "negotiate-then-twice",
        b'{"execute":"qmp_capabilities","id":6}{"execute":"qmp_capabilities","id":7}',
    ),
    ("negotiate-oob-twice", b'{"execute":"qmp_capabilities","arguments":{"enable":["oob","oob"]}}'),
    ("negotiate-then-command", b'{"execute":"qmp_capabilities"}{"execute":"query-status","id":8}'),
]

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
    (
        "pipelined",
        b"".join(
            b'{"execute":"query-status","id":%d}{"execute":"no-such-%d","id":%d}' % (i, i, i)
            for i in range(6)
        ),
    ),
    ("crlf-lines", b'{"execute":"query-status","id":"l1"}\r\n{"execute":"query-name"}\r\n'),
    ("garbage-between", b'{"execute":"query-status","id":1} xyz {"execute":"query-name","id":2}'),
    ("resync-0xff", b'{"execute":"query-status","id":"half"\xff{"execute":"query-name","id":3}'),
]


def command_corpus() -> Iterator[tuple[str, bytes]]:
    yield from COMMANDS
    for name, data, _ in PARSE_CASES:
        yield f"parse-{name}", data
    for text in ID_TEXTS:
        yield "id-" + text.decode(errors="replace"), b'{"execute":"query-status","id":%s}' % text


COMMAND_CORPUS = list(command_corpus())


# An event line as QEMU writes it (monitor/qmp.c monitor_qapi_event_emit(): the ``timestamp``
# member first, then ``event``).  Anchored at the start of the line, so a reply that merely
# contains such text is compared as it is.
EVENT_STAMP = re.compile(rb'^\{"timestamp": \{"seconds": -?\d+, "microseconds": -?\d+\}, "event": ')
STAMP = b'{"timestamp": {"seconds": S, "microseconds": U}, "event": '


def normalise(line: bytes) -> bytes:
    """The line as written, except an event's clock reading.

    Two QEMU processes stamp the same event with their own ``g_get_real_time()``, so the
    seconds and microseconds differ between them; nothing else does.  The rest of the event
    line, and every other line (the greeting included: the proxy passes QEMU's on with the
    same capability list), is compared as QEMU and the proxy wrote it.
    """
    return EVENT_STAMP.sub(STAMP, line, count=1)


class Wire:
    """A unix-socket client that keeps every byte the server writes."""

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.buf = b""

    def _more(self) -> bool:
        chunk = self.sock.recv(65536)
        self.buf += chunk
        return bool(chunk)

    def line(self) -> bytes:
        """The next line with its line end, as written."""
        while b"\n" not in self.buf:
            if not self._more():
                raise EOFError(f"closed mid-line: {self.buf[:200]!r}")
        line, _, self.buf = self.buf.partition(b"\n")
        return line + b"\n"

    def lines_to_eof(self) -> list[bytes]:
        """Every line until the server closes, with its line end; a last unfinished line too."""
        while self._more():
            pass
        data, self.buf = self.buf, b""
        *lines, tail = data.split(b"\n")
        return [line + b"\n" for line in lines] + ([tail] if tail else [])

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


def is_sentinel_reply(line: bytes) -> bool:
    try:
        msg = json.loads(line)
    except ValueError:
        return False  # QEMU writes an ``inf`` id as a bare word: such a line is no sentinel
    return isinstance(msg, dict) and msg.get("id") == "sentinel"


def exchange(path: str, *, negotiate: bytes | None, stream: bytes, sentinel: bytes) -> list[bytes]:
    """Every line from the greeting up to and including the sentinel's reply, as written."""
    with Wire(path) as c:
        out = [c.line()]  # the greeting
        if negotiate is not None:
            c.sock.sendall(negotiate)
            out.append(c.line())
        c.sock.sendall(stream + sentinel)
        while True:
            out.append(normalise(c.line()))
            if is_sentinel_reply(out[-1]):
                return out


def half_closed(path: str, stream: bytes) -> list[bytes]:
    """Greeting, the stream, shut down writing; every line until the server closes, as written."""
    with Wire(path) as c:
        out = [c.line()]  # the greeting
        c.sock.sendall(stream)
        c.sock.shutdown(socket.SHUT_WR)
        return out + [normalise(line) for line in c.lines_to_eof()]


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
        proxy = ProxyProcess(
            "--upstream",
            f"unix:{behind.sock_path}",
            "--listen",
            f"unix:{listen}",
            "--state-dir",
            str(tmp),
            tmp_path=tmp,
        )
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
    negotiate = WITH_OOB if oob else PLAIN
    direct, proxied = (
        exchange(p, negotiate=negotiate, stream=stream, sentinel=SENTINEL) for p in pair
    )
    assert proxied == direct


def test_refused_exec_oob_keeps_its_place_without_oob(pair: tuple[str, str]) -> None:
    """Without OOB, QEMU reads nothing more until an in-band request is answered, so the
    exec-oob it refuses comes second.  (With OOB on, QEMU answers it from its I/O thread and
    either order is legal, so that case is not compared.)"""
    stream = b'{"execute":"query-status","id":81}{"exec-oob":"query-status","id":82}'
    direct, proxied = (exchange(p, negotiate=PLAIN, stream=stream, sentinel=SENTINEL) for p in pair)
    assert [json.loads(line).get("id") for line in direct[2:-1]] == [81, 82]
    assert proxied == direct


HALF_CLOSED = [
    ("two-commands", b'{"execute":"qmp_capabilities"}{"execute":"query-status"}'),
    (
        "with-errors",
        b'{"execute":"qmp_capabilities"}{"execute":"no-such","id":1}xyz '
        b'{"execute":"query-status","id":2}',
    ),
    ("before-negotiation", b'{"execute":"query-status","id":1}'),
    ("unfinished-message", b'{"execute":"qmp_capabilities"}{"execute":"query-st'),
]


@pytest.mark.parametrize(("name", "stream"), HALF_CLOSED, ids=[n for n, _ in HALF_CLOSED])
def test_half_closed(pair: tuple[str, str], name: str, stream: bytes) -> None:
    direct, proxied = (half_closed(p, stream) for p in pair)
    assert proxied == direct


def test_normalise_spares_everything_but_an_event_clock() -> None:
    """The comparison above is only as strict as :func:`normalise` leaves it."""
    event = b'{"timestamp": {"seconds": %d, "microseconds": %d}, "event": "STOP"}\r\n'
    assert normalise(event % (1, 2)) == normalise(event % (1700000000, 999999))
    for qemu, other in [
        (b'{"return": {}, "id": 1}\r\n', b'{"id": 1, "return": {}}\r\n'),
        (b'{"return": {}, "id": 1}\r\n', b'{"return": {},  "id": 1}\r\n'),
        (b'{"return": {}, "id": 1}\r\n', b'{"return": {}, "id": 1}\n'),
        (event % (1, 2), b'{"event": "STOP", "timestamp": {"seconds": 1, "microseconds": 2}}\r\n'),
        (
            b'{"id": "{\\"timestamp\\": {\\"seconds\\": 1", "return": {}}\r\n',
            b'{"id": "{\\"timestamp\\": {\\"seconds\\": 2", "return": {}}\r\n',
        ),
    ]:
        assert normalise(qemu) != normalise(other)
