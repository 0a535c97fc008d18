"""The backport: ``capabilities`` on ``migrate``/``migrate-incoming``, as a sans-IO plan.

A QEMU with the proposed patch takes ``capabilities`` on both commands and applies them (with
``migrate-set-capabilities``' own code) just before the migration starts.  Released QEMU rejects
the argument, so the proxy splits the command (DESIGN §5.3), holding the lane so nothing else
reaches QEMU in between:

1. pre-checks QEMU would make before the capabilities apply, answered in QEMU's words with
   nothing changed (a live incoming migration must never see a transient capability change);
2. ``query-migrate-capabilities``: remember the current values;
3. ``migrate-set-capabilities`` with the client's list unchanged (QEMU validates it);
4. the original command without ``capabilities``;
5. if 4 failed: restore the remembered values of the names in the list (all or nothing).

:func:`split` is a generator in the mitmproxy style: it yields :class:`Call` steps, is sent
QEMU's reply to each, and returns an :class:`Outcome`.  The route drives it; this module never
awaits anything, so every path is testable without a QEMU.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

from proxy import qjson
from proxy.schema import Schema

Reply = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Call:
    """Run this command upstream and send the plan QEMU's reply."""

    command: str
    arguments: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Record:
    """Journal the pending restore before the capabilities change (crash safety); the driver
    sends back an empty dict once it is on disk."""

    restore: list[dict[str, Any]]
    migration: Any  # query-migrate's answer before the sequence


Step = Call | Record


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the client gets, and what the metrics and logs record.

    Exactly one of ``error`` (a desc the proxy answers itself, class GenericError) and ``reply``
    (QEMU's own reply message, to pass on under the client's id) is set.
    """

    outcome: str  # ok | precheck_error | caps_error | command_error
    error: str | None = None
    reply: Reply | None = None
    restore: str | None = None  # None (nothing to restore) | "ok" | "failed"
    restore_error: str | None = None


def _desc(reply: Reply) -> str:
    error = reply.get("error")
    return str(error.get("desc")) if isinstance(error, dict) else str(reply)


def prechecks(command: str, arguments: dict[str, Any], schema: Schema) -> str | None:
    """The checks QEMU's argument visitor makes before the command body runs."""
    members = schema.members.get(command, ())
    for name in members:
        if name in schema.required.get(command, ()) and name not in arguments:
            return f"Parameter '{name}' is missing"
    for key in qjson.qdict_order(arguments):
        if key != "capabilities" and key not in members:
            return f"Parameter '{key}' is unexpected"
    return None


def _uri_xor_channels(arguments: dict[str, Any], schema: Schema, command: str) -> str | None:
    if not schema.has_member(command, "channels"):
        return None
    has_uri = "uri" in arguments
    has_channels = bool(arguments.get("channels"))  # an empty list counts as absent
    if has_uri == has_channels:
        return "need either 'uri' or 'channels' argument"
    return None


def restore_list(before: Reply, caps: object) -> list[dict[str, Any]]:
    """The list that puts back the distinct names of ``caps`` as ``before`` had them."""
    old = {
        entry.get("capability"): entry.get("state")
        for entry in before.get("return", [])
        if isinstance(entry, dict)
    }
    if not isinstance(caps, list):
        return []
    names = [e["capability"] for e in caps if isinstance(e, dict) and "capability" in e]
    return [
        {"capability": n, "state": bool(old.get(n, False))}
        for n in dict.fromkeys(names)
        if isinstance(n, str) and n in old
    ]


def split(
    command: str, arguments: dict[str, Any], schema: Schema, journal: bool = False
) -> Generator[Step, Reply, Outcome]:
    """The atomic sequence for one client command carrying ``capabilities``.

    With ``journal``, a :class:`Record` step precedes the capability change.
    """
    migration: Reply | None = None
    error = prechecks(command, arguments, schema)
    if error is None and command == "migrate":
        error = _uri_xor_channels(arguments, schema, command)
    if error is None and command == "migrate-incoming":
        migrate = migration = yield Call("query-migrate")
        if isinstance(migrate.get("return"), dict) and "status" in migrate["return"]:
            error = "The incoming migration has already been started"
        else:
            status = yield Call("query-status")
            state = status.get("return", {}).get("status")
            if state != "inmigrate":
                error = "'-incoming' was not specified on the command line"
            else:
                error = _uri_xor_channels(arguments, schema, command)
    if error is not None:
        return Outcome("precheck_error", error=error)

    caps = arguments["capabilities"]
    before = yield Call("query-migrate-capabilities")
    restore = restore_list(before, caps)
    if journal and restore:
        if migration is None:
            migration = yield Call("query-migrate")
        yield Record(restore, migration.get("return"))
    applied = yield Call("migrate-set-capabilities", {"capabilities": caps})
    if "error" in applied:
        return Outcome("caps_error", reply=applied)

    rest = {k: v for k, v in arguments.items() if k != "capabilities"}
    result = yield Call(command, rest)
    if "error" not in result:
        return Outcome("ok", reply=result)

    # All or nothing: put back what the list changed, then answer with the command's error.
    restored = yield Call("migrate-set-capabilities", {"capabilities": restore})
    if "error" in restored:
        return Outcome("command_error", reply=result, restore="failed",
                       restore_error=_desc(restored))  # fmt: skip
    return Outcome("command_error", reply=result, restore="ok")
