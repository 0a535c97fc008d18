"""The backport: ``capabilities`` on ``migrate``/``migrate-incoming``, as a sans-IO plan.

A QEMU with the proposed patch takes ``capabilities`` on both commands and applies them (with
``migrate-set-capabilities``' own code) just before the migration starts.  Released QEMU rejects
the argument, so the proxy splits the command (DESIGN §5.3), holding the lane so nothing else
reaches QEMU in between:

1. pre-checks: when QEMU is sure to refuse the command before any side effect (bad arguments,
   no ``-incoming``, an incoming migration already started), the command goes to QEMU without
   ``capabilities`` and QEMU's own reply is the answer, with nothing changed (a live incoming
   migration must never see a transient capability change);
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
from typing import Any, Final

from proxy.schema import Schema

Reply = dict[str, Any]

# Every command split() may run for a client's command besides that command itself (the
# journal's query-migrate included): a listener's policy must allow the client each of them.
SPLIT_RUNS: Final = {
    "migrate": ("query-migrate-capabilities", "query-migrate", "migrate-set-capabilities"),
    "migrate-incoming": (
        "query-status",
        "query-migrate",
        "query-yank",
        "query-migrate-capabilities",
        "migrate-set-capabilities",
    ),
}


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

    ``reply`` is QEMU's own reply message, to pass on under the client's id.
    """

    outcome: str  # ok | precheck_error | caps_error | command_error
    reply: Reply
    restore: str | None = None  # None (nothing to restore) | "ok" | "failed"
    restore_error: str | None = None


def _desc(reply: Reply) -> str:
    error = reply.get("error")
    return str(error.get("desc")) if isinstance(error, dict) else str(reply)


_BUILTIN_TYPES: dict[str, type | tuple[type, ...]] = {"str": str, "bool": bool, "int": int}


def rejected_by_visitor(command: str, arguments: dict[str, Any], schema: Schema) -> bool:
    """Whether QEMU's argument visitor is sure to refuse the command without ``capabilities``.

    Missing required members, members the schema lacks, and builtin-typed members of the wrong
    JSON type all fail in the visitor, before the command body runs.
    """
    members = schema.members.get(command, ())
    if any(n in schema.required.get(command, ()) and n not in arguments for n in members):
        return True
    types = schema.member_types.get(command, {})
    for key, value in arguments.items():
        if key == "capabilities":
            continue
        if key not in members:
            return True
        kind = types.get(key, "")
        if kind.startswith("[") and not isinstance(value, list):
            return True
        expected = _BUILTIN_TYPES.get(kind)
        if expected is not None and (
            not isinstance(value, expected) or (expected is int and isinstance(value, bool))
        ):
            return True
    return False


def _uri_xor_channels(arguments: dict[str, Any], schema: Schema, command: str) -> bool:
    """QEMU's "need either 'uri' or 'channels' argument" (an empty list counts as absent)."""
    if not schema.has_member(command, "channels"):
        return False
    return ("uri" in arguments) == bool(arguments.get("channels"))


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
    rejected = rejected_by_visitor(command, arguments, schema)
    if not rejected and command == "migrate":
        rejected = _uri_xor_channels(arguments, schema, command)
    if not rejected and command == "migrate-incoming":
        status = yield Call("query-status")
        if status.get("return", {}).get("status") != "inmigrate":
            rejected = True  # QEMU refuses: never started with -incoming, or already migrated
        else:
            migration = yield Call("query-migrate")
            rejected = "status" in (migration.get("return") or {})
            if not rejected and "query-yank" in schema.commands:
                # QEMU 7.2 shows no status while an incoming migration waits or runs; its yank
                # instance tells (at the destination nothing else registers one).
                yank = yield Call("query-yank")
                rejected = any(
                    isinstance(i, dict) and i.get("type") == "migration"
                    for i in yank.get("return", [])
                )
            rejected = rejected or _uri_xor_channels(arguments, schema, command)
    if rejected:
        # QEMU refuses this before any side effect: let it, without the capabilities, so the
        # client gets QEMU's exact words and nothing changes.
        reply = yield Call(command, {k: v for k, v in arguments.items() if k != "capabilities"})
        return Outcome("precheck_error" if "error" in reply else "ok", reply)

    caps = arguments["capabilities"]
    before = yield Call("query-migrate-capabilities")
    restore = restore_list(before, caps)
    if journal and restore:
        if migration is None:
            migration = yield Call("query-migrate")
        yield Record(restore, migration.get("return"))
    applied = yield Call("migrate-set-capabilities", {"capabilities": caps})
    if "error" in applied:
        return Outcome("caps_error", applied)

    rest = {k: v for k, v in arguments.items() if k != "capabilities"}
    result = yield Call(command, rest)
    if "error" not in result:
        return Outcome("ok", result)

    # All or nothing: put back what the list changed, then answer with the command's error.
    restored = yield Call("migrate-set-capabilities", {"capabilities": restore})
    if "error" in restored:
        return Outcome("command_error", result, "failed", _desc(restored))
    return Outcome("command_error", result, "ok")
