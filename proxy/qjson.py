"""QEMU's JSON value model: modified UTF-8, QDict member order, and QEMU's writer and reader.

The proxy answers some messages itself (parse errors, negotiation, dispatch errors) and gives every
reply back with the client's ``id``.  QEMU does not echo ids byte for byte: it parses them into
QObjects and writes them again (docs/protocol.md, 'Commands and replies', 3.3;
``qobject/json-writer.c``).  :func:`dumps` reproduces that writer so a client cannot tell the
proxy's replies from QEMU's: numbers as ``%.17g``, strings as ASCII with upper-case
``\\uXXXX`` escapes, object members in QDict's hash-bucket order.  :func:`encode` goes
the other way: it writes a parsed value so that QEMU's reader rebuilds exactly that value, which
is how every message the proxy sends QEMU is written.

Pure functions only; no I/O.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator

import orjson

# QDict's fixed bucket count (qobject/qdict.c: QDICT_BUCKET_MAX).
_QDICT_BUCKETS = 512
_INT64_MIN = -(1 << 63)
_UINT64_MAX = (1 << 64) - 1


def tdb_hash(key: bytes) -> int:
    """QDict's bucket hash (qobject/qdict.c: tdb_hash), 32-bit unsigned arithmetic."""
    value = (0x238F13AF * len(key)) & 0xFFFFFFFF
    for i, byte in enumerate(key):
        value = (value + (byte << (i * 5 % 24))) & 0xFFFFFFFF
    return (1103515243 * value + 12345) & 0xFFFFFFFF


def qdict_order(keys: Iterable[str]) -> list[str]:
    """Keys in the order QEMU iterates a QDict built by inserting them in the given order.

    Buckets ascend; inside a bucket the entry inserted last comes first (QLIST_INSERT_HEAD).
    This decides both the member order QEMU writes and which top-level member QMP's dispatcher
    checks first, hence which error a message with several faults gets.
    """
    listed = list(keys)
    if len(listed) < 2:
        return listed
    rank = {key: -i for i, key in enumerate(listed)}
    return sorted(listed, key=lambda k: (_bucket(k), rank[k]))


def _bucket(key: str) -> int:
    # Keys come from clients: only short ones are cached (bounded in count and in size).
    if len(key) > 64:
        return _bucket_of(key)
    return _bucket_cached(key)


def _bucket_of(key: str) -> int:
    return tdb_hash(_modified_utf8(key)) % _QDICT_BUCKETS


_bucket_cached = functools.lru_cache(maxsize=4096)(_bucket_of)


def _modified_utf8(text: str) -> bytes:
    """QEMU's in-memory encoding of a string: UTF-8, with U+0000 as the two bytes C0 80."""
    return text.encode("utf-8").replace(b"\x00", b"\xc0\x80")


def _is_valid_codepoint(cp: int) -> bool:
    """util/unicode.c: in range, not a surrogate, not one of Unicode's 66 noncharacters."""
    if cp < 0 or cp > 0x10FFFF:
        return False
    if 0xFDD0 <= cp <= 0xFDEF or (cp & 0xFFFE) == 0xFFFE:
        return False
    return not 0xD800 <= cp <= 0xDFFF


def mod_utf8_codepoint(data: bytes, pos: int) -> tuple[int, int]:
    """Decode one modified UTF-8 sequence at ``pos``: (codepoint or -1, end position).

    Follows util/unicode.c's rules exactly, including where an invalid sequence ends, because
    QEMU replaces each invalid sequence with one U+FFFD when it echoes bytes in an error text.
    """
    n = len(data)
    if pos >= n or data[pos] == 0:
        return -1, pos
    byte = data[pos]
    if byte < 0x80:
        return byte, pos + 1
    if byte >= 0xFE or byte & 0x40 == 0:
        return -1, pos + 1
    if byte & 0x20 == 0:
        length, cp, minimum = 2, byte & 0x1F, 0x80
    elif byte & 0x10 == 0:
        length, cp, minimum = 3, byte & 0x0F, 0x800
    elif byte & 0x08 == 0:
        length, cp, minimum = 4, byte & 0x07, 0x10000
    elif byte & 0x04 == 0:
        length, cp, minimum = 5, byte & 0x03, 0x200000
    else:
        length, cp, minimum = 6, byte & 0x01, 0x4000000
    end = pos + 1
    for _ in range(length - 1):
        if end >= n or data[end] & 0xC0 != 0x80:
            return -1, end
        cp = (cp << 6) | (data[end] & 0x3F)
        end += 1
    if cp < minimum and not (length == 2 and cp == 0):
        return -1, end  # overlong, except "\xC0\x80" for U+0000
    if not _is_valid_codepoint(cp):
        return -1, end
    return cp, end


def decode_lossy(data: bytes) -> str:
    """Bytes to text the way QEMU's writer shows them: each invalid sequence becomes U+FFFD."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    else:
        if "\x00" not in text and all(_is_valid_codepoint(ord(c)) for c in text if c > "\ufdcf"):
            return text
    out: list[str] = []
    pos = 0
    while pos < len(data):
        if data[pos] == 0:
            break  # C strings end here
        cp, end = mod_utf8_codepoint(data, pos)
        out.append("\ufffd" if cp < 0 else chr(cp))
        pos = end
    return "".join(out)


_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\f": "\\f",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
}


def _plain(text: str) -> bool:
    """A string QEMU's writer copies as it is, between quotes."""
    return text.isascii() and text.isprintable() and '"' not in text and "\\" not in text


def _quote(text: str) -> str:
    """qobject/json-writer.c quoted_str(): ASCII output, upper-case escapes, '/' unescaped."""
    if _plain(text):
        return f'"{text}"'
    out = ['"']
    for ch in text:
        cp = ord(ch)
        escape = _ESCAPES.get(ch)
        if escape is not None:
            out.append(escape)
        elif 0xD800 <= cp <= 0xDFFF:
            out.append("\\uFFFD")
        elif cp > 0xFFFF:
            cp -= 0x10000
            out.append(f"\\u{0xD800 + (cp >> 10):04X}\\u{0xDC00 + (cp & 0x3FF):04X}")
        elif cp < 0x20 or cp >= 0x7F:
            out.append(f"\\u{cp:04X}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _number(value: int | float) -> str:
    if isinstance(value, int) and _INT64_MIN <= value <= _UINT64_MAX:
        return str(value)
    return f"{float(value):.17g}"


def _number_before_6_0(value: int | float) -> str:
    """QEMU before 6.0 printed doubles with ``%f`` and trimmed trailing zeros and the point
    (qobject/qnum.c qnum_to_string), so ``1e-7`` came back as ``0``."""
    if isinstance(value, int) and _INT64_MIN <= value <= _UINT64_MAX:
        return str(value)
    text = f"{float(value):f}"
    if "." in text:
        text = text.rstrip("0").removesuffix(".")
    return text


def _keyword(value: object) -> str | None:
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    return None


def _written_scalar(value: object) -> str:
    """A scalar as QEMU's writer prints it (qobject/json-writer.c)."""
    word = _keyword(value)
    if word is not None:
        return word
    if isinstance(value, int | float):
        return _number(value)
    if isinstance(value, str):
        return _quote(value)
    raise TypeError(f"not a JSON value: {type(value).__name__}")


def _written_scalar_before_6_0(value: object) -> str:
    if isinstance(value, float):
        return _number_before_6_0(value)
    return _written_scalar(value)


def _read_scalar(value: object) -> str:
    """A scalar as text QEMU's reader turns back into the same QObject.

    Floats stay float tokens (QEMU's writer would print ``1.0`` as ``1``, an integer to its
    reader) and an infinity, which QEMU's reader makes of ``1e400``, is written as an exponent
    no double can hold: there is no JSON word for it.
    """
    word = _keyword(value)
    if word is not None:
        return word
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != value:
            raise ValueError("NaN has no JSON form")  # QEMU's reader cannot make one either
        if value in (_INF, -_INF):
            return "1e999" if value > 0 else "-1e999"
        return repr(value)
    if isinstance(value, str):
        return orjson.dumps(value).decode()
    raise TypeError(f"not a JSON value: {type(value).__name__}")


_INF = float("inf")
_Children = Iterator[tuple[str | None, object]]


def _serialize(
    value: object,
    scalar: Callable[[object], str],
    keys: Callable[[dict[str, object]], Iterable[str]],
    key_text: Callable[[str], str],
    comma: str,
    colon: str,
) -> str:
    """Write a value with an explicit stack: QEMU nests up to 1024 levels, deeper than Python's
    recursion allows a recursive writer to go safely."""
    out: list[str] = []
    stack: list[tuple[_Children, str]] = []
    first = True
    node = value
    while True:
        if isinstance(node, dict) and node:
            out.append("{")
            stack.append((iter([(k, node[k]) for k in keys(node)]), "}"))
            first = True
        elif isinstance(node, list) and node:
            out.append("[")
            stack.append((iter([(None, v) for v in node]), "]"))
            first = True
        else:
            out.append(
                "{}" if isinstance(node, dict) else "[]" if isinstance(node, list) else scalar(node)
            )
            first = False
        while stack:
            children, closer = stack[-1]
            child = next(children, None)
            if child is None:
                out.append(closer)
                stack.pop()
                first = False
                continue
            if not first:
                out.append(comma)
            key, node = child
            if key is not None:
                out.append(key_text(key))
                out.append(colon)
            break
        else:
            return "".join(out)


def dumps(value: object, before_6_0: bool = False) -> bytes:
    """Serialize as QEMU writes (pretty=off): ``": "`` and ``", "`` separators, QDict order.

    This is what clients see of values the proxy writes for them, such as their ids;
    ``before_6_0`` writes doubles as QEMU 5.2 and older did.
    """
    # Ids are nearly always a small integer or a plain string: no need for the general writer.
    if type(value) is int and _INT64_MIN <= value <= _UINT64_MAX:
        return b"%d" % value
    if type(value) is str and _plain(value):
        return b'"%s"' % value.encode()
    scalar = _written_scalar_before_6_0 if before_6_0 else _written_scalar
    return _serialize(value, scalar, qdict_order, _quote, ", ", ": ").encode("ascii")


def encode(value: object) -> bytes:
    """Serialize for QEMU to read: its reader rebuilds exactly ``value``, members in this order.

    Everything the proxy sends QEMU is written by the proxy from a parsed value, so what QEMU
    reads is always one message, the one the proxy checked.  Values the orjson fast path parsed
    go through orjson itself (see :mod:`proxy.framing`); this writer takes the rest: deep
    nesting, infinities, and the proxy's own commands built from client values.
    """
    return _serialize(value, _read_scalar, _insertion_order, _read_key, ",", ":").encode()


def _insertion_order(value: dict[str, object]) -> Iterable[str]:
    return value


def _read_key(key: str) -> str:
    return orjson.dumps(key).decode()
