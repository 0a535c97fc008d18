"""The backport: ``capabilities`` on ``migrate``/``migrate-incoming``, as a sans-IO plan.

A QEMU with the proposed patch takes ``capabilities`` on both commands and applies them (with
``migrate-set-capabilities``' own code) just before the migration starts.  Released QEMU rejects
the argument, so the proxy splits the command, holding the lane so nothing else reaches QEMU in
between:

1. checks: a malformed ``capabilities`` list gets the error a patched QEMU's argument visitor
   would give, at once, with nothing sent; when QEMU is sure to refuse the command before any
   side effect (bad arguments, no ``-incoming``, an incoming migration already started), the
   command goes to QEMU without ``capabilities`` and QEMU's own reply is the answer, with
   nothing changed (a live incoming migration must never see a transient capability change);
2. ``query-migrate-capabilities``: remember the current values;
3. ``migrate-set-capabilities`` with the client's list unchanged (QEMU judges combinations);
4. the original command without ``capabilities``;
5. if 4 failed: restore the remembered values of the names in the list (all or nothing).

:func:`split` is a generator in the mitmproxy style: it yields :class:`Call` steps, is sent
QEMU's reply to each, and returns an :class:`Outcome`.  :func:`never_started` decides, with the
same checks, whether a split cut off by a crash may still be undone.  The driver
(:mod:`proxy.splitting`) runs both; this module never awaits anything, and treats every reply
from QEMU as untrusted data, so every path is testable without a QEMU.
"""

from __future__ import annotations

import hashlib
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any, Final, Literal

import orjson

from proxy import ghash, qjson
from proxy.dialect import DEFAULT, Dialect
from proxy.schema import Schema

Reply = dict[str, Any]
OutcomeKind = Literal["ok", "precheck_error", "caps_error", "command_error", "proxy_error"]
RestoreResult = Literal["ok", "failed"]

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


# A URI no QEMU can start an incoming migration on: asking for it tells whether one has started.
PROBE_URI: Final = "qmp-proxy-probe:"


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

    ``reply`` is QEMU's own reply message (or the proxy's, for a local error), to pass on
    under the client's id.
    """

    outcome: OutcomeKind
    reply: Reply
    restore: RestoreResult | None = None  # None: nothing to restore
    restore_error: str | None = None


def error(desc: str) -> Reply:
    return {"error": {"class": "GenericError", "desc": desc}}


def _desc(reply: Reply) -> str:
    err = reply.get("error")
    return str(err.get("desc")) if isinstance(err, dict) else str(reply)[:200]


def _return(reply: Reply) -> Any:
    return reply.get("return")


# -- what a patched QEMU's argument visitor would say -------------------------------------------

_BUILTIN_TYPES: dict[str, type | tuple[type, ...]] = {"str": str, "bool": bool, "int": int}
_STATUS_MEMBERS: Final = ("capability", "state")


def capabilities_error(caps: object, schema: Schema, dialect: Dialect = DEFAULT) -> str | None:
    """The visitor's error for a malformed ``capabilities`` list, or None.

    The list has ``migrate-set-capabilities``' own type, so a patched QEMU visits it with the
    same code and the same member path (``capabilities[0].state``): qobject-input-visitor.c,
    element by element, ``capability`` then ``state``, then unexpected members in GLib hash
    order.  Combinations of valid capabilities are QEMU's to judge, at step 3.
    """
    if not isinstance(caps, list):
        return "Invalid parameter type for 'capabilities', expected: array"
    names = schema.capability_names
    for index, entry in enumerate(caps):
        where = f"capabilities[{index}]"
        if not isinstance(entry, dict):
            return f"Invalid parameter type for '{where}', expected: object"
        if "capability" not in entry:
            return f"Parameter '{where}.capability' is missing"
        name = entry["capability"]
        if not isinstance(name, str):
            return f"Invalid parameter type for '{where}.capability', expected: string"
        if names is not None and name not in names:
            return dialect.enum_error("capability", name)
        if "state" not in entry:
            return f"Parameter '{where}.state' is missing"
        if type(entry["state"]) is not bool:
            return f"Invalid parameter type for '{where}.state', expected: boolean"
        if len(entry) > 2:
            extra = ghash.first_unexpected(qjson.qdict_order(entry), _STATUS_MEMBERS)
            if extra is not None:
                return f"Parameter '{where}.{extra}' is unexpected"
    return None


def visitor_faults(command: str, arguments: dict[str, Any], schema: Schema) -> tuple[bool, bool]:
    """Whether QEMU's visitor is sure to refuse the other arguments: (a fault in a declared
    member, a member the schema lacks).

    A patched QEMU visits declared members in order, ``capabilities`` (appended) last, then
    rejects unknown members: the first kind comes before a ``capabilities`` fault, the second
    after.  Missing required members and builtin-typed members of the wrong JSON type are
    checked here; deeper faults (inside ``channels``) are left to QEMU at step 4.
    """
    members = schema.members.get(command, ())
    types = schema.member_types.get(command, {})
    declared = any(n in schema.required.get(command, ()) and n not in arguments for n in members)
    unknown = False
    for key, value in arguments.items():
        if key == "capabilities":
            continue
        if key not in members:
            unknown = True
            continue
        kind = types.get(key, "")
        if kind.startswith("[") and not isinstance(value, list):
            declared = True
        expected = _BUILTIN_TYPES.get(kind)
        if expected is not None and (
            not isinstance(value, expected) or (expected is int and isinstance(value, bool))
        ):
            declared = True
    return declared, unknown


def _uri_xor_channels(arguments: dict[str, Any], schema: Schema, command: str) -> bool:
    """QEMU's "need either 'uri' or 'channels' argument" (an empty list counts as absent)."""
    if not schema.has_member(command, "channels"):
        return False
    return ("uri" in arguments) == bool(arguments.get("channels"))


def restore_list(before: Reply, caps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The list that puts back the distinct names of ``caps`` as ``before`` had them.

    ``caps`` passed :func:`capabilities_error`; ``before`` is QEMU's answer, of any shape.
    """
    current = _return(before)
    old: dict[str, bool] = {}
    if isinstance(current, list):
        for entry in current:
            if isinstance(entry, dict):
                name, state = entry.get("capability"), entry.get("state")
                if isinstance(name, str) and isinstance(state, bool):
                    old[name] = state
    names = dict.fromkeys(e["capability"] for e in caps)
    return [{"capability": n, "state": old[n]} for n in names if n in old]


# -- the checks QEMU makes before a migration starts --------------------------------------------


def _incoming_busy(schema: Schema) -> Generator[Call, Reply, tuple[bool, Reply]]:
    """Whether QEMU would refuse ``migrate-incoming`` now: (busy, query-migrate's reply).

    It refuses when the VM is not waiting for an incoming migration (never started with
    ``-incoming``, or already migrated) and when one has already been started.  QEMU 7.2 shows
    no status in ``query-migrate`` while an incoming migration listens; its yank instance
    tells (at the destination nothing else registers a ``migration`` one).
    """
    status = _return((yield Call("query-status")))
    if not isinstance(status, dict) or status.get("status") != "inmigrate":
        return True, {}
    migration = yield Call("query-migrate")
    info = _return(migration)
    if not isinstance(info, dict) or "status" in info:
        return True, migration
    if "query-yank" in schema.commands:
        instances = _return((yield Call("query-yank")))
        if not isinstance(instances, list) or any(
            isinstance(i, dict) and i.get("type") == "migration" for i in instances
        ):
            return True, migration
        return False, migration
    # Before 6.0 there is no yank: a listening socket shows in query-migrate (socket-address),
    # but an exec: or fd: migration that has received nothing shows nowhere.  QEMU answers a
    # migrate-incoming it cannot start with "already been started" if one was, and with
    # "unknown migration protocol" otherwise, changing nothing but sending a MIGRATION setup
    # event (migration/migration.c qmp_migrate_incoming, qemu_start_incoming_migration).
    if info:
        return True, migration
    probe = yield Call("migrate-incoming", {"uri": PROBE_URI})
    err = probe.get("error")
    desc = err.get("desc") if isinstance(err, dict) else None
    return not (isinstance(desc, str) and desc.startswith("unknown migration protocol")), migration


def split(
    command: str,
    arguments: dict[str, Any],
    schema: Schema,
    dialect: Dialect = DEFAULT,
    journal: bool = True,
) -> Generator[Step, Reply, Outcome]:
    """The atomic sequence for one client command carrying ``capabilities``.

    With ``journal``, a :class:`Record` step precedes the capability change.
    """
    rest = {k: v for k, v in arguments.items() if k != "capabilities"}
    caps = arguments["capabilities"]
    declared, unknown = visitor_faults(command, arguments, schema)
    if not declared:
        fault = capabilities_error(caps, schema, dialect)
        if fault is not None:
            return Outcome("precheck_error", error(fault))
    migration: Reply | None = None
    rejected = declared or unknown or _uri_xor_channels(arguments, schema, command)
    if not rejected and command == "migrate-incoming":
        rejected, migration = yield from _incoming_busy(schema)
    if rejected:
        # QEMU refuses this before any side effect: let it, without the capabilities, so the
        # client gets QEMU's exact words and nothing changes.
        reply = yield Call(command, rest)
        return Outcome("precheck_error" if "error" in reply else "ok", reply)

    assert isinstance(caps, list)
    before = yield Call("query-migrate-capabilities")
    restore = restore_list(before, caps)
    if journal and restore:
        if migration is None:
            migration = yield Call("query-migrate")
        yield Record(restore, _return(migration))
    applied = yield Call("migrate-set-capabilities", {"capabilities": caps})
    if "return" not in applied:
        return Outcome("caps_error", applied if "error" in applied else error(_desc(applied)))

    result = yield Call(command, rest)
    if "return" in result:
        return Outcome("ok", result)

    # All or nothing: put back what the list changed, then answer with the command's error.
    restored = yield Call("migrate-set-capabilities", {"capabilities": restore})
    if "return" not in restored:
        return Outcome("command_error", result, "failed", _desc(restored))
    return Outcome("command_error", result, "ok")


# query-migrate's answer as the journal keeps it: as it is, or (over this size: a failed
# migration's ``error-desc`` quotes the client's URI) as a digest, so that any journal the proxy
# writes is one it reads back (journal.MAX_SIZE).
_JOURNAL_FORM_MAX: Final = 4096


def journal_form(migration: Any) -> Any:
    """What the journal records of query-migrate's answer: equal for equal answers."""
    text = orjson.dumps(migration, option=orjson.OPT_SORT_KEYS)
    if len(text) <= _JOURNAL_FORM_MAX:
        return migration
    return {"qmp-proxy-sha256": hashlib.sha256(text).hexdigest()}


def never_started(
    command: str, migration_before: Any, schema: Schema
) -> Generator[Call, Reply, bool]:
    """After a crash mid-split: whether the migrate command provably never took effect.

    ``query-migrate`` must answer exactly as before the split (a migration that started, even
    one that already completed, changes it), and for ``migrate-incoming`` the checks of the
    pre-check must still pass: QEMU still waiting, no incoming migration listening.
    """
    if command == "migrate-incoming":
        busy, migration = yield from _incoming_busy(schema)
        if busy:
            return False
    else:
        migration = yield Call("query-migrate")
    return "return" in migration and journal_form(_return(migration)) == migration_before
