"""Client input framing by QEMU's own rules (qobject/json-lexer.c, json-streamer.c, json-parser.c).

QMP clients write a JSON stream, not lines: ``qemu.qmp`` sends no newline, messages may be
pretty-printed, several may share one write and one may span many.  QEMU also accepts
single-quoted strings, rejects duplicate keys and invalid modified UTF-8, resynchronises after
control bytes and 0xFF, and answers each fault with a precise, id-less error.  A client talking
through the proxy must see the same, so this module is a faithful re-implementation of the three
QEMU stages, sans-IO (h11 style): ``feed(bytes)`` returns the complete items found so far.

Each complete message comes back parsed.  The proxy never forwards a client's bytes: it writes
what it parsed (``Message.value``) for QEMU to read, so whatever QEMU receives is exactly one
message, the one the proxy checked, even if this module and QEMU ever disagreed about a text.
Faults come back as :class:`ParseError` carrying QEMU's desc.

Costs stay linear however the input is split: the scan position and lexer state are kept between
calls (the h11 ``ReceiveBuffer`` idea), so a message trickled one byte at a time is scanned once.

One deliberate difference: QEMU bounds a message at 64 MiB of tokens and then re-lexes the rest
of the oversized message as new input (an error cascade).  The proxy bounds the bytes it buffers
for one message (``max_message``, default 1 MiB), answers QEMU's ``JSON token size limit
exceeded`` once, and skips to the end of that message.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Final

import orjson

from proxy.qjson import _is_valid_codepoint, decode_lossy, mod_utf8_codepoint

# qobject/json-streamer.c limits, unchanged since 2018.
QEMU_MAX_TOKEN_SIZE: Final = 64 << 20
QEMU_MAX_TOKEN_COUNT: Final = 2 << 20
QEMU_MAX_NESTING: Final = 1 << 10
# The proxy's own bound on one buffered message.  QEMU reads ~200 KB/s, so even this
# takes it seconds; libvirt and qemu.qmp read replies with 10 MiB buffers, commands are far smaller.
DEFAULT_MAX_MESSAGE: Final = 1 << 20

# Token types.
LCURLY, RCURLY, LSQUARE, RSQUARE, COLON, COMMA, STRING, INTEGER, FLOAT, KEYWORD, ERROR = range(11)
_PUNCT = {
    ord("{"): LCURLY,
    ord("}"): RCURLY,
    ord("["): LSQUARE,
    ord("]"): RSQUARE,
    ord(":"): COLON,
    ord(","): COMMA,
}

# Lexer states kept between feeds (only those a token can be suspended in).
_START, _RECOVERY, _DQ, _SQ, _NUMBER, _KEYWORD = range(6)
# Number sub-states (json-lexer.c: IN_SIGN, IN_ZERO, IN_DIGITS, IN_MANTISSA, ...).
_N_SIGN, _N_ZERO, _N_DIGITS, _N_MANT, _N_MANT_DIGITS, _N_EXP_E, _N_EXP_SIGN, _N_EXP_DIGITS = range(
    8
)

_WHITESPACE = re.compile(rb"[ \t\r\n]*")
# Bytes IN_RECOVERY skips: everything but structural characters, control bytes other than tab,
# and the impossible UTF-8 bytes 0xFE/0xFF.
_RECOVERY_SKIP = re.compile(rb"[^\x00-\x08\x0a-\x1f\[\]{}:,\xfe\xff]*")
# A string body: any byte 0x20-0xFD but the quote and backslash, or an escape of such a byte.
# Unrolled with possessive quantifiers: the alternation form keeps a backtracking record per
# byte (about 30 MiB to scan a 256 KiB string), which a client or QEMU could make us pay.
_STRING_BODY = {
    ord('"'): re.compile(rb'[^"\\\x00-\x1f\xfe\xff]*+(?:\\[\x20-\xfd][^"\\\x00-\x1f\xfe\xff]*+)*+'),
    ord("'"): re.compile(rb"[^'\\\x00-\x1f\xfe\xff]*+(?:\\[\x20-\xfd][^'\\\x00-\x1f\xfe\xff]*+)*+"),
}
_KEYWORD_BODY = re.compile(rb"[a-z]*")
_LONE_RUN = re.compile(rb"[\]}:,]*")
_LONE: Final = frozenset({RCURLY, RSQUARE, COLON, COMMA})
# Bytes after which recovery ends at once and which are lexical errors again.
_STRAY_RUN = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\xfe\xff]*")
# How much of an oversized token a stray error quotes (the buffer always keeps at least this).
_STRAY_TAIL: Final = 64
# The fast path's guard: a chunk made only of these bytes (printable ASCII and JSON whitespace,
# without backslash or apostrophe) goes to orjson.  ``bytes.translate`` deleting them leaves
# nothing for such a chunk, several times faster than a regex search.
_FAST_SAFE: Final = bytes(sorted(set(range(0x20, 0x7F)) - {0x27, 0x5C} | {0x09, 0x0A, 0x0D}))
# A number whose integer part is a lone 0 followed by an exponent: RFC 8259 (and orjson) allow
# it, QEMU's lexer does not (IN_ZERO takes only a fraction), so the fast path must not take it.
_ZERO_EXPONENT = re.compile(rb"(?<![0-9.])0[eE]")
_ZERO_E = re.compile(rb"0[eE]")
_DIGITS = frozenset(b"0123456789")


def _end(pattern: re.Pattern[bytes], buf: bytes | bytearray, start: int) -> int:
    """End of a match of a pattern that cannot fail (every body pattern accepts nothing)."""
    match = pattern.match(buf, start)
    assert match is not None
    return match.end()


@dataclass(slots=True)
class Message:
    """A well-formed JSON value and the text it was parsed from.

    ``raw`` runs from the first byte of the value's first token to the last byte of its last
    token.  ``fast`` says orjson parsed it: then ``orjson.dumps`` writes it back exactly (no
    infinities, no nesting beyond orjson's 255 levels), else :func:`proxy.qjson.encode` does.
    """

    raw: bytes
    value: object
    fast: bool = field(default=False, compare=False)  # how it was framed, not what it is


@dataclass(frozen=True, slots=True)
class ParseError:
    """A fault QEMU answers with an id-less ``GenericError``; ``kind`` feeds the metrics."""

    desc: str
    kind: str  # "parse" or "limit"


Item = Message | ParseError
_EXPECTING_VALUE: Final = ParseError("JSON parse error, expecting value", "parse")
# The error of each byte that is a token of its own and a lexical error (batch rules: no position).
_STRAY_DESC: Final = tuple(
    f"JSON parse error, stray '{decode_lossy(bytes([b]))}'" for b in range(256)
)
_STRAY_ERRORS: Final = tuple(ParseError(desc, "parse") for desc in _STRAY_DESC)


# QEMU formats a parser message into a 1 KiB buffer (json-parser.c parse_error: vsnprintf), so
# its text is cut at 1023 bytes; only token texts (an invalid keyword, a stray token) get that long.
_MAX_PARSER_MESSAGE: Final = 1023


def _message(tail: bytes) -> str:
    return "JSON parse error, " + decode_lossy(tail[:_MAX_PARSER_MESSAGE])


class _Fault(Exception):
    """The first parse error of a message: what QEMU's parser says after "JSON parse error, "."""

    def __init__(self, tail: bytes) -> None:
        super().__init__(tail)
        self.tail = tail


class Rules(enum.Enum):
    """How QEMU's JSON streamer and parser treat faults; the lexer is the same in all versions.

    ``BATCH`` (QEMU up to 10.x): the streamer collects a whole message, then parses it; errors
    have no position and a fault after a limit error cascades.  ``PUSH`` (QEMU 11.1): the parser
    takes each token as it comes and an error is sent at once, prefixed ``LINE:COL:`` (bytes
    counted over the connection, see :meth:`Framer._located`), with new wordings; after any
    error the streamer skips to the end of the broken message.
    """

    BATCH = "batch"
    PUSH = "push"


class Framer:
    """Bytes in, :data:`Item` list out, by QEMU's lexer, streamer and parser rules."""

    def __init__(self, max_message: int = DEFAULT_MAX_MESSAGE, rules: Rules = Rules.BATCH) -> None:
        self.max_message = self._fast_limit = 0
        self.set_max_message(max_message)
        self._push = rules is Rules.PUSH
        self._buf = bytearray()
        self._base = 0  # stream offset of _buf[0]
        self._pos = 0  # stream offset of the next unscanned byte
        self._state = _START
        self._tok_start = 0  # stream offset where the token in progress began
        self._quote = 0  # quote byte of the string in progress
        self._num = _N_SIGN
        # Streamer state: the current message's tokens as (type, start, end) stream offsets.
        self._tokens: list[tuple[int, int, int]] = []
        self._braces = 0
        self._brackets = 0
        self._skipping = False  # discarding the rest of an oversized (or, PUSH, broken) message
        # BATCH: the message's parse, run token by token as they arrive, and its first fault.
        self._batch: _Parser | None = None
        self._fault: _Fault | None = None
        self._out: list[Item] = []
        # PUSH only: the parser, where the message began, and the token count of QEMU's limit.
        self._parser = _PushParser()
        self._msg_start = -1
        self._count = 0
        # Positions (PUSH): the next token's column is one too high when the byte before it
        # ended a number, a keyword or error recovery (QEMU re-anchors on that lookahead byte).
        self._shift = False
        self._tok_shift = False
        # A line cursor: newlines in the stream before _lpos, and where the last one ended.
        self._lpos = 0
        self._lines = 0
        self._lstart = 0

    def set_max_message(self, max_message: int) -> None:
        """Bound one buffered message (never above QEMU's own token limit)."""
        self.max_message = min(max_message, QEMU_MAX_TOKEN_SIZE)
        # The most the fast path takes: a message shorter than QEMU's token count cannot exceed it.
        self._fast_limit = min(self.max_message, QEMU_MAX_TOKEN_COUNT)

    @property
    def buffered(self) -> int:
        """Bytes held for a message still in progress (the memory a client can make us keep)."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[Item]:
        """Take more input; return every item it completed, in order."""
        if (
            data
            and not self._buf
            and self._state == _START
            and not self._tokens
            and not self._skipping  # inside an oversized message: nothing is a message
        ):
            used = self._fast(data)
            if used:
                if self._push:
                    self._count_lines(data, used)
                self._pos += used
                self._base += used
                data = data[used:]
        if data:
            self._buf += data
            self._scan()
            self._check_size()
            self._compact()
        out, self._out = self._out, []
        return out

    # -- fast path ---------------------------------------------------------------------------

    def _fast(self, data: bytes) -> int:
        """Frame whole messages of the common, simple kind in C; return the bytes consumed.

        In a chunk of printable ASCII with no backslash, no single quote and no control byte,
        QEMU's rules and RFC 8259 differ in five ways, each sent to the exact path: top-level
        scalars (QEMU waits for the next token), so only a value starting with ``{`` is taken;
        a lone ``0`` with an exponent (``0e5``: QEMU's lexer stops after the ``0``); nesting,
        kept within orjson's 255 written levels, below QEMU's 1024; the token count, bounded
        by the bytes (a message shorter than QEMU's 2 Mi token limit cannot exceed it); and
        duplicate keys, which orjson merges, so quotes are counted.  A message over
        ``max_message`` is left too.  Anything left stops the fast path where it stands; the
        exact path takes the rest, so both always agree.
        """
        if data.translate(None, _FAST_SAFE):
            return 0
        # A search with a literal prefix first (a third of two find() calls' cost: bytes methods
        # parse their arguments from a tuple), the lookbehind only if it finds one.
        if _ZERO_E.search(data) and _ZERO_EXPONENT.search(data):
            return 0
        limit = self._fast_limit
        n = len(data)
        pos = 0
        while True:
            if data[pos] == 0x7B:  # "{"
                start = pos
            else:
                start = _end(_WHITESPACE, data, pos)
                if start == n:
                    return n
                if data[start] != 0x7B:
                    return start
            try:
                # Most chunks hold one message from byte 0: parse the chunk itself, no copy.
                value = orjson.loads(data if start == 0 else memoryview(data)[start:])
                end = n
            except orjson.JSONDecodeError as exc:
                end = start + exc.pos
                if end <= start or end >= n:
                    return start  # nothing parsed, or a message cut off by the read
                try:
                    value = orjson.loads(memoryview(data)[start:end])
                except orjson.JSONDecodeError:
                    return start
            raw = data[start:end].rstrip(b" \t\r\n")
            if len(raw) > limit:
                return start  # the exact path words the error, or counts the tokens
            try:
                written = orjson.dumps(value)
            except orjson.JSONEncodeError:
                return start  # nested deeper than orjson writes (255): the exact path
            # Without backslashes every quote delimits a string, in the text and in orjson's
            # writing of the parsed value: a duplicate key shows as more quotes in the text.
            if raw.count(b'"') != written.count(b'"'):
                return start
            self._out.append(Message(raw, value, True))
            if end == n:
                return n
            pos = end

    # -- lexer -------------------------------------------------------------------------------

    def _scan(self) -> None:
        buf = self._buf
        base = self._base
        end = base + len(buf)
        while self._pos < end:
            state = self._state
            i = self._pos - base
            if state == _START:
                j = _end(_WHITESPACE, buf, i)
                if j > i:
                    self._shift = False
                    i = j
                if i + base >= end:
                    self._pos = end
                    return
                byte = buf[i]
                start = i + base
                self._tok_shift = self._shift
                punct = _PUNCT.get(byte)
                if punct is not None:
                    if punct in _LONE and self._between():
                        # Closers, commas and colons outside any message: each is a message
                        # of its own that QEMU's parser refuses; a run of them, in bulk.
                        j = _end(_LONE_RUN, buf, i)
                        self._lone(start, j - i)
                        self._pos = j + base
                        self._shift = False
                        continue
                    self._pos = start + 1
                    self._token(punct, start, start + 1)
                    self._shift = False
                elif byte == 0x22 or byte == 0x27:  # " or '
                    self._tok_start = start
                    self._quote = byte
                    self._state = _DQ if byte == 0x22 else _SQ
                    self._pos = start + 1
                elif byte in _DIGITS or byte == 0x2D:  # digit or '-'
                    self._tok_start = start
                    self._state = _NUMBER
                    self._num = _N_ZERO if byte == 0x30 else _N_DIGITS if byte != 0x2D else _N_SIGN
                    self._pos = start + 1
                elif 0x61 <= byte <= 0x7A:  # a-z
                    self._tok_start = start
                    self._state = _KEYWORD
                    self._pos = start + 1
                elif self._between():
                    self._pos = self._strays(buf, i) + base
                else:
                    self._pos = start + 1
                    self._error(start, start + 1)
            elif state in (_DQ, _SQ):
                j = _end(_STRING_BODY[self._quote], buf, i)
                if j >= len(buf):
                    self._pos = end
                    return
                byte = buf[j]
                if byte == self._quote:
                    self._state = _START
                    self._pos = j + 1 + base
                    self._token(STRING, self._tok_start, self._pos)
                    self._shift = False
                elif byte == 0x5C:  # backslash: the escaped byte is missing or invalid
                    if j + 1 >= len(buf):
                        self._pos = j + base  # resume at the backslash once more arrives
                        return
                    self._state = _START
                    self._pos = j + 2 + base
                    self._error(self._tok_start, self._pos)
                else:
                    self._state = _START
                    self._pos = j + 1 + base
                    self._error(self._tok_start, self._pos)
            elif state == _KEYWORD:
                j = _end(_KEYWORD_BODY, buf, i)
                if j >= len(buf):
                    self._pos = end
                    return
                self._state = _START
                self._pos = j + base
                self._token(KEYWORD, self._tok_start, self._pos)
                self._shift = True  # ended by a lookahead byte
            elif state == _NUMBER:
                self._scan_number(buf, i)
            else:  # _RECOVERY
                j = _end(_RECOVERY_SKIP, buf, i)
                self._pos = j + base
                if j < len(buf):
                    self._state = _START
                    self._shift = True  # ended by a lookahead byte

    def _between(self) -> bool:
        """No message is in progress: each byte here is judged on its own."""
        if self._skipping:
            return False
        return self._msg_start < 0 if self._push else not self._tokens

    def _lone(self, start: int, count: int) -> None:
        """``count`` closers, commas or colons from ``start``: QEMU's "expecting value" each."""
        if not self._push:
            self._out.extend([_EXPECTING_VALUE] * count)
            return
        line, column = self._line_col(start)
        for k in range(count):
            where = column + (k if k else self._tok_shift)  # only the first can be shifted
            self._out.append(
                ParseError(f"{line}:{where}: JSON parse error, expecting value", "parse")
            )
        self._tok_shift = False

    def _strays(self, buf: bytearray, i: int) -> int:
        """Bytes that start no token, between messages: each is its own lexical error, and the
        recovery after it ends at once if the next byte is a control byte or 0xFE/0xFF.  A run
        of those (a client's garbage, or the control bytes clients resynchronise with) costs
        one error per byte: made here in bulk, with the texts QEMU gives them."""
        j = _end(_STRAY_RUN, buf, i + 1)
        out = self._out
        if self._push:
            # Each after the first ended the recovery of the one before: one column late.
            line, column = self._line_col(i + self._base)
            for k, byte in enumerate(buf[i : j - 1]):
                where = column + (k + 1 if k else self._tok_shift)
                out.append(ParseError(f"{line}:{where}: {_STRAY_DESC[byte]}", "parse"))
            if j - 1 > i:
                self._tok_shift = True
        else:
            for byte in buf[i : j - 1]:
                out.append(_STRAY_ERRORS[byte])
        # The last one is an ordinary error: recovery then skips what follows it.
        self._error(j - 1 + self._base, j + self._base)
        return j

    def _scan_number(self, buf: bytearray, i: int) -> None:
        """json-lexer.c's number states, byte by byte: numbers are short, exactness matters."""
        base = self._base
        n = len(buf)
        num = self._num
        while i < n:
            byte = buf[i]
            digit = byte in _DIGITS
            if num == _N_SIGN:
                num = _N_ZERO if byte == 0x30 else _N_DIGITS if digit else -1
            elif num == _N_ZERO:
                if digit:
                    num = -1
                elif byte == 0x2E:
                    num = _N_MANT
                else:
                    self._number_done(INTEGER, i + base)
                    return
            elif num == _N_DIGITS:
                if byte == 0x2E:
                    num = _N_MANT
                elif byte in b"eE":
                    num = _N_EXP_E
                elif not digit:
                    self._number_done(INTEGER, i + base)
                    return
            elif num == _N_MANT:
                num = _N_MANT_DIGITS if digit else -1
            elif num == _N_MANT_DIGITS:
                if byte in b"eE":
                    num = _N_EXP_E
                elif not digit:
                    self._number_done(FLOAT, i + base)
                    return
            elif num == _N_EXP_E:
                num = _N_EXP_DIGITS if digit else _N_EXP_SIGN if byte in b"+-" else -1
            elif num == _N_EXP_SIGN:
                num = _N_EXP_DIGITS if digit else -1
            elif not digit:  # _N_EXP_DIGITS
                self._number_done(FLOAT, i + base)
                return
            i += 1
            if num < 0:  # the byte that broke the number belongs to the stray token
                self._state = _START
                self._pos = i + base
                self._error(self._tok_start, self._pos)
                return
        self._num = num
        self._pos = n + base

    def _number_done(self, typ: int, end: int) -> None:
        self._state = _START
        self._pos = end
        self._token(typ, self._tok_start, end)
        self._shift = True  # ended by a lookahead byte

    def _error(self, start: int, end: int) -> None:
        """A lexical error: QEMU reports the token so far as stray and enters recovery."""
        first = self._message_start(start)
        over = self._skipping or end - first > self.max_message
        located = start
        if over:
            # The proxy keeps no more than the tail of an oversized message, so it quotes the
            # token's last bytes where QEMU would quote all of it (megabytes): the same text
            # however the input was split into reads.
            start = max(start, end - _STRAY_TAIL)
        text = bytes(self._buf[max(start, self._base) - self._base : end - self._base])
        if over and not self._skipping:
            # The message outgrew the limit before this byte: say so first, as a feed that
            # happened to end between the two would have (replies must not depend on reads).
            self._out.append(ParseError("JSON token size limit exceeded", "limit"))
            self._skipping = self._push  # PUSH: the stray below then ends the skip, unsaid
        self._state = _RECOVERY
        if self._push:
            # "%s" stops at a NUL, before the closing quote.
            self._push_token(ERROR, located, end, b"stray '" + text.split(b"\0", 1)[0] + b"'")
            return
        self._emit_fault(ParseError(f"JSON parse error, stray '{decode_lossy(text)}'", "parse"))

    # -- streamer ----------------------------------------------------------------------------

    def _token(self, typ: int, start: int, end: int) -> None:
        if self._push:
            self._push_token(typ, start, end)
            return
        if typ <= RSQUARE:
            if typ == LCURLY:
                self._braces += 1
            elif typ == RCURLY:
                self._braces -= 1
            elif typ == LSQUARE:
                self._brackets += 1
            else:
                self._brackets -= 1
        if self._skipping:
            if not self._in_progress():
                self._reset()
            return
        tokens = self._tokens
        if end - (tokens[0][1] if tokens else start) > self.max_message:
            # Checked per token, as QEMU checks its own limit, so the verdict cannot depend on
            # where reads end.
            self._skip_oversized()
            if not self._in_progress():
                self._reset()
            return
        if len(tokens) + 1 > QEMU_MAX_TOKEN_COUNT:
            self._emit_fault(ParseError("JSON token count limit exceeded", "limit"))
            return
        if self._braces + self._brackets > QEMU_MAX_NESTING:
            self._emit_fault(ParseError("JSON nesting depth limit exceeded", "limit"))
            return
        tokens.append((typ, start, end))
        if self._in_progress():
            self._advance_parse()
            return
        self._out.append(self._parse())
        self._reset()

    def _push_token(self, typ: int, start: int, end: int, stray: bytes = b"") -> None:
        """QEMU 11.1's streamer (json_message_process_token): each token straight to the
        parser; after an error, tokens are skipped until the broken message's braces and
        brackets balance, a lexical error, or a closer with nothing open."""
        if (
            typ == ERROR
            or (typ == RCURLY and not self._braces)
            or (typ == RSQUARE and not self._brackets)
        ):
            self._braces = self._brackets = 0
            if self._skipping:
                self._push_reset()
                return
        elif typ <= RSQUARE:
            if typ == LCURLY:
                self._braces += 1
            elif typ == LSQUARE:
                self._brackets += 1
            elif typ == RCURLY:
                self._braces -= 1
            else:
                self._brackets -= 1
            if self._skipping:
                if not self._braces and not self._brackets:
                    self._push_reset()
                return
        elif self._skipping:
            return
        if self._msg_start < 0:
            self._msg_start = start
        self._count += 1
        error: ParseError | None = None
        if end - self._msg_start > self.max_message:
            error = ParseError("JSON token size limit exceeded", "limit")
        elif self._count > QEMU_MAX_TOKEN_COUNT:
            error = ParseError("JSON token count limit exceeded", "limit")
        elif self._braces + self._brackets > QEMU_MAX_NESTING:
            error = ParseError("JSON nesting depth limit exceeded", "limit")
        else:
            try:
                if typ == ERROR:
                    raise _Fault(stray)
                text = bytes(self._buf[start - self._base : end - self._base])
                value = self._parser.feed(typ, text)
            except _Fault as fault:
                error = ParseError(self._located(start, fault.tail), "parse")
            else:
                if value is not _NOTHING:
                    raw = bytes(self._buf[self._msg_start - self._base : end - self._base])
                    self._out.append(Message(raw, value))
        if error is not None:
            self._out.append(error)
            self._skipping = True
        if not self._braces and not self._brackets:
            self._push_reset()

    def _push_reset(self) -> None:
        self._parser.reset()
        self._braces = self._brackets = 0
        self._skipping = False
        self._msg_start = -1
        self._count = 0

    def _located(self, start: int, tail: bytes) -> str:
        """``LINE:COL: JSON parse error, ...`` for the token at ``start``: 1-based, in bytes,
        over the whole connection; only LF starts a line."""
        line, column = self._line_col(start)
        return f"{line}:{column + self._tok_shift}: {_message(tail)}"

    def _line_col(self, offset: int) -> tuple[int, int]:
        """The 1-based line and byte column of a stream offset (not before the cursor)."""
        self._advance_lines(offset)
        return self._lines + 1, offset - self._lstart + 1

    def _advance_lines(self, offset: int) -> None:
        """Move the line cursor to ``offset`` over the buffered bytes."""
        lpos = self._lpos
        if offset > lpos:
            seg = self._buf[lpos - self._base : offset - self._base]
            lines = seg.count(b"\n")
            if lines:
                self._lines += lines
                self._lstart = lpos + seg.rfind(b"\n") + 1
            self._lpos = offset

    def _count_lines(self, data: bytes, used: int) -> None:
        """Advance the line cursor over bytes that never enter the buffer (the fast path)."""
        lines = data.count(b"\n", 0, used)
        if lines:
            self._lines += lines
            self._lstart = self._pos + data.rfind(b"\n", 0, used) + 1
        self._lpos = self._pos + used

    def _message_start(self, fallback: int) -> int:
        if self._push:
            return self._msg_start if self._msg_start >= 0 else fallback
        return self._tokens[0][1] if self._tokens else fallback

    def _in_progress(self) -> bool:
        # json-streamer.c: keep collecting while something is open and nothing closed too far;
        # a stray closer hands the malformed message to the parser at once.
        return (
            (self._braces > 0 or self._brackets > 0) and self._braces >= 0 and self._brackets >= 0
        )

    def _emit_fault(self, fault: ParseError) -> None:
        self._out.append(fault)
        self._reset()

    def _reset(self) -> None:
        self._tokens = []
        self._braces = 0
        self._brackets = 0
        self._skipping = False
        self._batch = None
        self._fault = None

    def _check_size(self) -> None:
        """The proxy's message bound: QEMU's error once, then skip to the end of the message."""
        if self._skipping:
            return
        in_token = self._state in (_DQ, _SQ, _NUMBER, _KEYWORD)
        start = self._message_start(self._tok_start if in_token else -1)
        if start < 0:
            return
        if self._pos - start > self.max_message:
            self._skip_oversized()

    def _skip_oversized(self) -> None:
        """QEMU's size error, once; the rest of the message is skipped (BATCH rules)."""
        self._out.append(ParseError("JSON token size limit exceeded", "limit"))
        self._tokens = []
        self._skipping = True
        self._batch = None
        self._fault = None

    def _compact(self) -> None:
        if self._skipping or self._state == _RECOVERY:
            keep = self._pos
        else:
            keep = self._message_start(self._tok_start if self._state != _START else self._pos)
        if self._skipping and self._state != _START:
            keep = min(keep, max(self._tok_start, self._pos - 4096))
        drop = keep - self._base
        if drop > 0:
            if self._push:
                self._advance_lines(keep)  # the cursor must not fall behind the buffer
            del self._buf[:drop]
            self._base = keep

    # -- parser ------------------------------------------------------------------------------

    def _advance_parse(self) -> None:
        """Parse the tokens that arrived, as far as they go.

        QEMU parses a message once its last token is in (json-streamer.c); parsing as the
        tokens come gives the same value or the same first fault (the parser is deterministic
        in token order and only the end can say "premature EOI"), but spreads the work over the
        reads: many large messages completed by their last bytes together would otherwise
        hold the event loop for their whole parse at once.
        """
        if self._fault is not None:
            return  # QEMU reports the first fault, once the message ends
        if self._batch is None:
            self._batch = _Parser(self)
        try:
            self._batch.advance()
        except _Fault as fault:
            self._fault = fault

    def _parse(self) -> Item:
        tokens = self._tokens
        fault = self._fault
        if fault is None:
            try:
                value = (self._batch or _Parser(self)).finish()
            except _Fault as raised:
                fault = raised
        if fault is not None:
            return ParseError(_message(fault.tail), "parse")
        base = self._base
        return Message(bytes(self._buf[tokens[0][1] - base : tokens[-1][2] - base]), value)


@dataclass(slots=True)
class _Frame:
    """An open container: what is being built, the key whose value comes next, and where the
    container itself goes once it closes (``role`` of the enclosing frame)."""

    container: dict[str, object] | list[object]
    role: int
    key: str = ""


# Where a finished value goes: the key of the innermost object, its value, or an array item.
_TOP, _KEY, _VALUE, _ITEM = range(4)


class _Parser:
    """json-parser.c as an explicit-stack machine (nesting reaches 1024: no recursion), fed
    the message's tokens as they arrive.

    It raises at the first fault with QEMU's words, in the order QEMU's recursive descent would
    meet them: a non-string key is parsed in full before it is rejected, and a duplicate key is
    reported only after its value parsed.  :meth:`advance` parses what has arrived and stops
    where it needs a token still to come; :meth:`finish`, at the message's end, completes it
    (a token missing then is "premature EOI").
    """

    __slots__ = ("_run", "final", "framer", "i", "tokens")

    def __init__(self, framer: Framer) -> None:
        self.framer = framer
        self.tokens = framer._tokens
        self.i = 0
        self.final = False
        self._run = self._steps()

    def advance(self) -> None:
        next(self._run)  # a value completes only with its message: this always pauses

    def finish(self) -> object:
        self.final = True
        try:
            next(self._run)
        except StopIteration as done:
            return done.value
        raise AssertionError("the parser paused with no token to come")

    def _steps(self) -> Generator[None, None, object]:
        stack: list[_Frame] = []
        role = _TOP
        tokens = self.tokens
        while True:
            # parse_value(): start one value.
            if self.i >= len(tokens):
                yield from self._next_token()
            typ, start, end = tokens[self.i]
            self.i += 1
            if typ in (LCURLY, LSQUARE):
                container: dict[str, object] | list[object] = {} if typ == LCURLY else []
                if self.i >= len(tokens):
                    yield from self._next_token()
                if tokens[self.i][0] != (RCURLY if typ == LCURLY else RSQUARE):
                    stack.append(_Frame(container, role))
                    role = _KEY if typ == LCURLY else _ITEM
                    continue
                self.i += 1
                value: object = container
            else:
                value = self._scalar(typ, start, end)
            # A value is complete: hand it to its container, closing containers as they end.
            while stack:
                frame = stack[-1]
                target = frame.container
                if role == _KEY:
                    if not isinstance(value, str):
                        raise _Fault(b"key is not a string in object")
                    if self.i >= len(tokens):
                        yield from self._next_token()
                    self.i += 1
                    if tokens[self.i - 1][0] != COLON:
                        raise _Fault(b"missing : in object pair")
                    frame.key = value
                    role = _VALUE
                    break
                if role == _VALUE:
                    assert isinstance(target, dict)
                    if frame.key in target:
                        raise _Fault(b"duplicate key")
                    target[frame.key] = value
                else:  # _ITEM
                    assert isinstance(target, list)
                    target.append(value)
                if self.i >= len(tokens):
                    yield from self._next_token()
                sep = tokens[self.i][0]
                self.i += 1
                if sep == COMMA:
                    if role == _VALUE:
                        role = _KEY
                    break
                if role == _VALUE and sep != RCURLY:
                    raise _Fault(b"expected separator in dict")
                if role == _ITEM and sep != RSQUARE:
                    raise _Fault(b"expected separator in list")
                # The container closed: it is the finished value for its own parent.
                stack.pop()
                value = target
                role = frame.role
            else:
                return value

    def _next_token(self) -> Generator[None, None, None]:
        """Pause until another token arrives; at the message's end there is none to come."""
        while self.i >= len(self.tokens):
            if self.final:
                raise _Fault(b"premature EOI")
            yield

    def _scalar(self, typ: int, start: int, end: int) -> object:
        if typ in (LCURLY, RCURLY, LSQUARE, RSQUARE, COLON, COMMA):
            raise _Fault(b"expecting value")
        framer = self.framer
        base = framer._base
        return _scalar(typ, bytes(framer._buf[start - base : end - base]))


def _scalar(typ: int, text: bytes) -> object:
    """A string, number or keyword token's value (json-parser.c parse_literal, parse_keyword)."""
    if typ == STRING:
        return _decode_string(text)
    if typ == INTEGER:
        number = int(text)
        if -(1 << 63) <= number < (1 << 64):
            return number
        return float(text)
    if typ == FLOAT:
        return float(text)
    if text == b"true":
        return True
    if text == b"false":
        return False
    if text == b"null":
        return None
    raise _Fault(b"invalid keyword '" + text + b"'")


# The push parser's frames: what the innermost open container expects next
# (json-parser.c as of QEMU 11.1, reconstructed from its behaviour).
_OPENED_OBJECT, _OPENED_ARRAY, _EXPECT_KEY, _EXPECT_VALUE, _EXPECT_COLON, _AFTER_VALUE = range(6)
_NOTHING: Final = object()  # no value completed yet


@dataclass(slots=True)
class _PushFrame:
    state: int
    container: dict[str, object] | list[object] | None  # None: a key frame
    key: str = ""


class _PushParser:
    """QEMU 11.1's parser: fed one token at a time, it returns a value once one is complete
    (else :data:`_NOTHING`) and raises at the very token that is wrong."""

    __slots__ = ("stack",)

    def __init__(self) -> None:
        self.stack: list[_PushFrame] = []

    def reset(self) -> None:
        self.stack = []

    def feed(self, typ: int, text: bytes) -> object:
        stack = self.stack
        if not stack:
            return self._value(typ, text)
        top = stack[-1]
        state = top.state
        if state == _OPENED_OBJECT:
            if typ == RCURLY:
                return self._close()
            state = top.state = _EXPECT_KEY
        elif state == _OPENED_ARRAY:
            if typ == RSQUARE:
                return self._close()
            state = top.state = _EXPECT_VALUE
        if state == _EXPECT_KEY:
            if typ != STRING:
                raise _Fault(b"expecting key")
            key = _scalar(STRING, text)
            assert isinstance(key, str)
            stack.append(_PushFrame(_EXPECT_COLON, None, key))
            return _NOTHING
        if state == _EXPECT_COLON:
            if typ != COLON:
                raise _Fault(b"expecting ':'")
            top.state = _EXPECT_VALUE
            return _NOTHING
        if state == _EXPECT_VALUE:
            depth = len(stack)
            value = self._value(typ, text)
            if len(stack) > depth:
                return _NOTHING  # a container opened
            return self._add(top, value)
        # _AFTER_VALUE
        if isinstance(top.container, list):
            if typ == RSQUARE:
                return self._close()
            if typ != COMMA:
                raise _Fault(b"expected ',' or ']'")
            top.state = _EXPECT_VALUE
        else:
            if typ == RCURLY:
                return self._close()
            if typ != COMMA:
                raise _Fault(b"expected ',' or '}'")
            top.state = _EXPECT_KEY
        return _NOTHING

    def _value(self, typ: int, text: bytes) -> object:
        if typ == LCURLY:
            self.stack.append(_PushFrame(_OPENED_OBJECT, {}))
            return _NOTHING
        if typ == LSQUARE:
            self.stack.append(_PushFrame(_OPENED_ARRAY, []))
            return _NOTHING
        if typ in (RCURLY, RSQUARE, COLON, COMMA):
            raise _Fault(b"expecting value")
        return _scalar(typ, text)

    def _close(self) -> object:
        done = self.stack.pop().container
        if not self.stack:
            return done
        return self._add(self.stack[-1], done)

    def _add(self, frame: _PushFrame, value: object) -> object:
        """A value is complete inside ``frame``: a key's (then its object's) or a list's."""
        if frame.container is None:
            self.stack.pop()
            owner = self.stack[-1]
            assert isinstance(owner.container, dict)
            if frame.key in owner.container:
                raise _Fault(b"duplicate key")
            owner.container[frame.key] = value
            owner.state = _AFTER_VALUE
        else:
            assert isinstance(frame.container, list)
            frame.container.append(value)
            frame.state = _AFTER_VALUE
        return _NOTHING


_SIMPLE_ESCAPES = {
    ord('"'): '"',
    ord("'"): "'",
    ord("\\"): "\\",
    ord("/"): "/",
    ord("b"): "\b",
    ord("f"): "\f",
    ord("n"): "\n",
    ord("r"): "\r",
    ord("t"): "\t",
}
_HEX = frozenset(b"0123456789abcdefABCDEF")


def _decode_string(token: bytes) -> str:
    """json-parser.c parse_string(): escapes, surrogate pairs, modified UTF-8, all validated."""
    body = token[1:-1]
    if b"\\" not in body:
        if body.isascii():
            return body.decode("ascii")
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            pass
        else:
            if all(_is_valid_codepoint(ord(c)) for c in text if c > "\ufdcf"):
                return text
    out: list[str] = []
    i = 1
    n = len(token) - 1
    data = token[:n]
    while i < n:
        byte = token[i]
        if byte == 0x5C:
            begin = i
            esc = token[i + 1]
            i += 2
            simple = _SIMPLE_ESCAPES.get(esc)
            if simple is not None:
                out.append(simple)
                continue
            if esc != ord("u"):
                raise _Fault(b"invalid escape sequence in string")
            cp = _hex4(token, i)
            i += 4
            if 0xD800 <= cp <= 0xDBFF and token[i : i + 2] == b"\\u":
                trailing = _hex4(token, i + 2)
                if 0xDC00 <= trailing <= 0xDFFF:
                    cp = 0x10000 + ((cp & 0x3FF) << 10) | (trailing & 0x3FF)
                    i += 6
                else:
                    cp = -1
            if not _is_valid_codepoint(cp):
                shown = token[begin : min(i, len(token))]
                raise _Fault(shown + b" is not a valid Unicode character")
            out.append(chr(cp))
        else:
            cp, end = mod_utf8_codepoint(data, i)
            if cp < 0:
                raise _Fault(b"invalid UTF-8 sequence in string")
            out.append(chr(cp))
            i = end
    return "".join(out)


def _hex4(token: bytes, i: int) -> int:
    digits = token[i : i + 4]
    if len(digits) != 4 or not all(d in _HEX for d in digits):
        return -1
    return int(digits, 16)
