"""QEMU's output, sans-IO: bytes into one-message lines, and replies rewritten for clients.

QEMU writes one JSON message per line, ending in ``\\r\\n`` (``monitor_puts`` turns ``\\n``
into ``\\r\\n``), unless the monitor was opened with ``pretty=on``: then every message, from the
greeting on, is indented over many lines.  :class:`OutputReader` splits the first kind into
lines and frames the second by QEMU's own JSON rules, writing each message again as one line,
so the rest of the proxy only ever sees one message per line.  Nothing it is fed is trusted: a
line (or a pretty message) over ``max_line`` bytes, or pretty output that is not a sequence of
JSON objects, is a :class:`Desync`.

The rest is the reply path of a client's command: QEMU answers the proxy's integer id, and the
client must get the same reply under its own id, as QEMU would have written it.  Success and
error replies are spliced (the id swapped in the bytes QEMU wrote, the payload never decoded);
any other layout is written anew.
"""

from __future__ import annotations

from typing import Any, Final

import orjson

from proxy import qjson
from proxy.framing import Framer, Message
from proxy.qmp import CRLF, error_reply, return_reply

# How QEMU writes the members around the id (QDict order puts ``return`` before ``id``, and
# ``id`` before ``error``): these are what splicing looks for.
_SUCCESS_START: Final = b'{"return": '
_ID_MEMBER: Final = b', "id": '
_LINE_END: Final = b"}\r\n"  # 3 bytes: sliced as line[-3:]
_ID_MEMBER_LEN: Final = len(_ID_MEMBER)
# The proxy's ids are below 2**63: at most 19 digits.
_MAX_ID_DIGITS: Final = 20
# Reply payloads from this size on are spliced through a memoryview instead of a copied slice.
_VIEW_FROM: Final = 16 * 1024


class Desync(Exception):
    """QEMU's output cannot be placed: the connection must be dropped."""


class OutputReader:
    """Splits what QEMU writes into lines of one message each.

    ``feed`` returns ``(line, message)`` pairs: ``message`` is None for a line as QEMU wrote
    it (the caller decides whether to parse it), or the parsed message of a pretty-printed one,
    whose line is the proxy's writing of it (with ``before_6_0``'s number writer, set once the
    greeting told the version).
    """

    def __init__(self, max_line: int) -> None:
        self.max_line = max_line
        self.before_6_0 = False
        self._buf = bytearray()
        self._scan = 0  # where the search for the next newline resumes
        self._first = True  # the first line decides: one message per line, or pretty=on
        self._pretty: Framer | None = None

    def whole_line(self, data: bytes) -> bool:
        """Whether ``data`` is exactly one line, to take as it is without :meth:`feed` (the
        common case: nothing buffered, one message per line, one line per read)."""
        if self._buf or self._first or self._pretty is not None:
            return False
        last = len(data) - 1
        return 0 <= data.find(b"\n") == last < self.max_line

    def feed(self, data: bytes) -> list[tuple[bytes, dict[str, Any] | None]]:
        if self.whole_line(data):
            return [(data, None)]  # no copying
        if self._pretty is not None:
            return self._feed_pretty(data)
        return self._lines(data)

    def _lines(self, data: bytes) -> list[tuple[bytes, dict[str, Any] | None]]:
        buf = self._buf
        buf += data
        out: list[tuple[bytes, dict[str, Any] | None]] = []
        start = 0
        while True:
            end = buf.find(b"\n", self._scan)
            if end < 0:
                self._scan = len(buf)
                break
            line = bytes(buf[start : end + 1])
            start = self._scan = end + 1
            if len(line) > self.max_line:
                raise Desync(f"a line of more than {self.max_line} bytes")
            if self._first:
                self._first = False
                if not _whole_message(line):
                    # pretty=on: messages span lines, from the greeting on.
                    rest = bytes(buf)
                    del buf[:]
                    self._scan = 0
                    self._pretty = Framer(max_message=self.max_line)
                    return self._feed_pretty(rest)
            out.append((line, None))
        if start:
            del buf[:start]
            self._scan -= start
        if len(buf) > self.max_line:
            raise Desync(f"a line of more than {self.max_line} bytes")
        return out

    def _feed_pretty(self, data: bytes) -> list[tuple[bytes, dict[str, Any] | None]]:
        assert self._pretty is not None
        out: list[tuple[bytes, dict[str, Any] | None]] = []
        for item in self._pretty.feed(data):
            if not isinstance(item, Message) or not isinstance(item.value, dict):
                raise Desync(f"malformed pretty-printed output: {item!r:.200}")
            out.append((qjson.dumps(item.value, self.before_6_0) + CRLF, item.value))
        return out


def _whole_message(line: bytes) -> bool:
    try:
        orjson.loads(line)
    except orjson.JSONDecodeError:
        return False
    return True


def success_id(line: bytes) -> tuple[int, int] | None:
    """The proxy's id in a ``{"return": ..., "id": N}`` line, and where its member starts, read
    without parsing the line.

    QEMU writes a success reply's members as ``return`` then ``id``, so the line's last member
    is the top-level id: the reply (up to hundreds of KB) is passed on without being decoded.
    None if the line is not of that shape (the caller then parses it).
    """
    if line[-3:] != _LINE_END or not line.startswith(_SUCCESS_START):
        return None
    at = line.rfind(_ID_MEMBER)
    if at < 0:
        return None
    digits = line[at + _ID_MEMBER_LEN : -3]
    if len(digits) > _MAX_ID_DIGITS or not digits.isdigit():
        return None
    return int(digits), at


def splice_success(line: bytes, at: int, client_id: bytes | None) -> bytes:
    """A success line :func:`success_id` read, rewritten with the client's id (or none): its id
    member, from ``at`` on, is replaced.  A large payload is copied once, through a view; a
    small one is sliced, which costs a quarter of making the view."""
    head = line[:at] if at < _VIEW_FROM else memoryview(line)[:at]
    if client_id is None:
        return b"".join((head, _LINE_END))
    return b"".join((head, _ID_MEMBER, client_id, _LINE_END))


def restore_id(
    line: bytes,
    upstream_id: int,
    client_id: bytes | None,
    msg: dict[str, object] | None,
    before_6_0: bool = False,
) -> bytes:
    """QEMU's reply to the proxy's id, rewritten with the client's id (or none) by splicing.

    QEMU writes ``{"return": ..., "id": N}`` and ``{"id": N, "error": ...}``; both are spliced
    without re-encoding the (possibly 236 KB) payload, and copied once: a chain of ``+`` would
    copy it at every step.  Any other layout is rebuilt (``msg`` is the parsed line, or None if
    the caller did not parse it).
    """
    suffix = b', "id": %d}\r\n' % upstream_id  # _ID_MEMBER, the id, _LINE_END
    if line.endswith(suffix):
        return splice_success(line, len(line) - len(suffix), client_id)
    prefix = b'{"id": %d, ' % upstream_id
    if line.startswith(prefix):
        rest = memoryview(line)[len(prefix) :]
        if client_id is None:
            return b"".join((b"{", rest))
        return b"".join((b'{"id": ', client_id, b", ", rest))
    return reply_for(msg if msg is not None else orjson.loads(line), client_id, before_6_0)


def reply_for(msg: dict[str, object], client_id: bytes | None, before_6_0: bool = False) -> bytes:
    """A reply message from QEMU, written for the client as QEMU writes replies."""
    if "return" in msg:
        return return_reply(client_id, qjson.dumps(msg["return"], before_6_0))
    error = msg.get("error")
    if isinstance(error, dict) and set(error) == {"class", "desc"}:
        return error_reply(str(error["desc"]), str(error["class"]), client_id)
    body = qjson.dumps({k: v for k, v in msg.items() if k != "id"}, before_6_0)
    if client_id is None:
        return body + CRLF
    return b'{"id": ' + client_id + b", " + body[1:] + CRLF
