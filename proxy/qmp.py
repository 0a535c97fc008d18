"""QMP's message rules and QEMU's exact error texts (qapi/qmp-dispatch.c, monitor/qmp*.c).

Everything a client session answers by itself lives here: the greeting, capabilities negotiation
and the top-level checks of a command.  Each check runs in the order QEMU runs it, members in
QDict order, so a message with several faults gets the error QEMU would pick.
Pure functions; no I/O.
"""

from __future__ import annotations

import functools
from typing import Final

import orjson

from proxy import ghash, qjson
from proxy.dialect import DEFAULT, Dialect

GENERIC_ERROR: Final = "GenericError"
COMMAND_NOT_FOUND: Final = "CommandNotFound"
CRLF: Final = b"\r\n"

NEGOTIATION_REQUIRED: Final = "Expecting capabilities negotiation with 'qmp_capabilities'"
NOT_AN_OBJECT: Final = "QMP input must be a JSON object"
# The QMPCapability enum of every released QEMU (qapi/control.json).
QMP_CAPABILITIES: Final = frozenset({"oob"})


def error_reply(desc: str, cls: str = GENERIC_ERROR, client_id: bytes | None = None) -> bytes:
    """An error response as QEMU writes it: ``id`` first when there is one, then ``error``."""
    if client_id is None:
        return _idless_error(desc, cls)
    return b'{"id": ' + client_id + b', "error": ' + _error_body(desc, cls) + b"}" + CRLF


def _error_body(desc: str, cls: str) -> bytes:
    return b'{"class": ' + qjson.dumps(cls) + b', "desc": ' + qjson.dumps(desc) + b"}"


def _idless_error(desc: str, cls: str) -> bytes:
    """Parse errors come by the thousand from one read of garbage, nearly all alike: short
    ones are cached (their texts can hold a client's bytes: bounded in count and in size)."""
    if len(desc) > 256:
        return _idless_error_text(desc, cls)
    return _idless_error_cached(desc, cls)


def _idless_error_text(desc: str, cls: str) -> bytes:
    return b'{"error": ' + _error_body(desc, cls) + b"}" + CRLF


_idless_error_cached = functools.lru_cache(maxsize=1024)(_idless_error_text)


def return_reply(client_id: bytes | None, value: bytes = b"{}") -> bytes:
    """A success response as QEMU writes it: ``return`` first, then ``id``.  Joined, not
    chained: ``value`` may be a large reply, copied once."""
    if client_id is None:
        return b"".join((b'{"return": ', value, b"}\r\n"))
    return b"".join((b'{"return": ', value, b', "id": ', client_id, b"}\r\n"))


def greeting(upstream_line: bytes, capabilities: list[str]) -> bytes:
    """The proxy's greeting: QEMU's own greeting line, with the capabilities both sides offer.

    QEMU's version object is passed on byte for byte; only the capability list is replaced.
    """
    caps = b"[" + b", ".join(qjson.dumps(c) for c in capabilities) + b"]"
    marker = b', "capabilities": ['
    at = upstream_line.rfind(marker)
    if at >= 0 and upstream_line.endswith(b"]}}\r\n"):
        return upstream_line[: at + len(marker) - 1] + caps + b"}}" + CRLF
    version = orjson.loads(upstream_line)["QMP"]["version"]
    return (
        b'{"QMP": {"version": '
        + orjson.dumps(version)
        + b', "capabilities": '
        + caps
        + b"}}"
        + CRLF
    )


_ALLOWED: Final = frozenset({"execute", "arguments", "id"})
_EMPTY: Final[dict[str, object]] = {}


def is_oob_request(msg: dict[str, object]) -> bool:
    """monitor/qmp.c qmp_is_oob(): such requests skip the in-band queue even when invalid."""
    return "exec-oob" in msg and "execute" not in msg


def check_request(msg: dict[str, object], allow_oob: bool) -> tuple[str | None, bool]:
    """qmp_dispatch_check_obj(): (error desc or None, whether the command is ``exec-oob``)."""
    # The common, valid request: member order only decides *which* error, so skip it.
    if (
        type(msg.get("execute")) is str
        and _ALLOWED.issuperset(msg)
        and type(msg.get("arguments", _EMPTY)) is dict
    ):
        return None, False
    exec_key: str | None = None
    for key in qjson.qdict_order(msg):
        value = msg[key]
        if key == "execute" or (key == "exec-oob" and allow_oob):
            if not isinstance(value, str):
                return f"QMP input member '{key}' must be a string", False
            if exec_key is not None:
                return f"QMP input member '{key}' clashes with '{exec_key}'", False
            exec_key = key
        elif key == "arguments":
            if not isinstance(value, dict):
                return "QMP input member 'arguments' must be an object", False
        elif key != "id":
            return f"QMP input member '{key}' is unexpected", False
    if exec_key is None:
        return "QMP input lacks member 'execute'", False
    return None, exec_key == "exec-oob"


def capabilities_to_enable(
    arguments: object, offered: frozenset[str], dialect: Dialect = DEFAULT
) -> tuple[str | None, bool]:
    """Check ``qmp_capabilities`` arguments as QEMU's visitor and qmp_caps_accept() do.

    Returns (error desc or None, whether ``oob`` is enabled).  Unknown enum values name the
    member ``null`` (QEMU 6.0 on): the input visitor has no name for list elements.  An
    unexpected member is the first one GLib's hash table yields, as in the visitor.
    """
    if arguments is None:
        return None, False
    assert isinstance(arguments, dict)
    enable = arguments.get("enable")
    requested: list[str] = []
    if "enable" in arguments:
        if not isinstance(enable, list):
            return "Invalid parameter type for 'enable', expected: array", False
        for index, name in enumerate(enable):
            if not isinstance(name, str):
                return f"Invalid parameter type for 'enable[{index}]', expected: string", False
            if name not in QMP_CAPABILITIES:
                return dialect.enum_error(None, name), False
            requested.append(name)
    if len(arguments) > ("enable" in arguments):
        extra = ghash.first_unexpected(qjson.qdict_order(arguments), ("enable",))
        if extra is not None:
            return f"Parameter '{extra}' is unexpected", False
    unavailable = [name for name in requested if name not in offered]
    if unavailable:
        return f"Capability {', '.join(unavailable)} not available", False
    return None, "oob" in requested
