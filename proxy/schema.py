"""What the proxy learns from ``query-qmp-schema`` after each upstream (re)connect.

Type names in the introspected schema are masked as numbers that change with every build, so
nothing is cached across connections: every probe resolves ``migrate``'s and
``migrate-incoming``'s ``arg-type`` afresh and records whether each has a ``capabilities``
member, plus the type of ``migrate-set-capabilities``' own ``capabilities`` member (what the
backport advertises) and the names its ``capability`` enum accepts (what the backport checks a
client's list against).  The command and event names bound the metrics' label sets.

QEMU is not trusted to be well-formed here: entries of an unexpected shape are ignored, and a
schema that says nothing usable about the migrate commands simply turns the backport's checks
off for them (QEMU then judges the command itself).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from proxy import qjson

MIGRATE_COMMANDS = ("migrate", "migrate-incoming")


@dataclass(frozen=True, slots=True)
class Schema:
    commands: frozenset[str] = frozenset()
    events: frozenset[str] = frozenset()
    allow_oob: frozenset[str] = frozenset()
    # Argument member names of migrate and migrate-incoming, in declaration order.
    members: dict[str, tuple[str, ...]] = field(default_factory=dict)
    required: dict[str, frozenset[str]] = field(default_factory=dict)
    member_types: dict[str, dict[str, str]] = field(default_factory=dict)
    arg_types: dict[str, str] = field(default_factory=dict)
    # The type of migrate-set-capabilities' "capabilities" member, e.g. "[123]".
    caps_type: str | None = None
    # The values of MigrationCapability; None if the schema does not show them.
    capability_names: frozenset[str] | None = None

    def native(self, command: str) -> bool:
        """Whether QEMU itself takes ``capabilities`` on this migrate command."""
        return "capabilities" in self.members.get(command, ())

    def has_member(self, command: str, member: str) -> bool:
        return member in self.members.get(command, ())


def _named(entries: list[Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for entry in entries:
        if isinstance(entry, dict) and isinstance(entry.get("name"), str):
            out.setdefault(entry["name"], entry)
    return out


def _members(entry: dict[str, Any] | None) -> list[dict[str, Any]]:
    members = entry.get("members") if entry is not None else None
    if not isinstance(members, list):
        return []
    return [m for m in members if isinstance(m, dict) and isinstance(m.get("name"), str)]


def parse(entries: object) -> Schema:
    """Build a :class:`Schema` from the ``return`` value of ``query-qmp-schema``."""
    if not isinstance(entries, list):
        return Schema()
    by_name = _named(entries)
    commands = {n: e for n, e in by_name.items() if e.get("meta-type") == "command"}
    events = frozenset(n for n, e in by_name.items() if e.get("meta-type") == "event")

    def object_type(name: object) -> dict[str, Any] | None:
        entry = by_name.get(name) if isinstance(name, str) else None
        return entry if entry is not None and entry.get("meta-type") == "object" else None

    def arg_type(command: str) -> dict[str, Any] | None:
        entry = commands.get(command)
        return object_type(entry.get("arg-type")) if entry is not None else None

    members: dict[str, tuple[str, ...]] = {}
    member_types: dict[str, dict[str, str]] = {}
    required: dict[str, frozenset[str]] = {}
    arg_types: dict[str, str] = {}
    for command in MIGRATE_COMMANDS:
        declared = arg_type(command)
        if declared is None:
            continue
        listed = _members(declared)
        members[command] = tuple(m["name"] for m in listed)
        required[command] = frozenset(m["name"] for m in listed if "default" not in m)
        member_types[command] = {m["name"]: str(m.get("type")) for m in listed}
        arg_types[command] = declared["name"]
    caps_type = None
    capability_names = None
    for member in _members(arg_type("migrate-set-capabilities")):
        if member["name"] == "capabilities" and isinstance(member.get("type"), str):
            caps_type = member["type"]
            capability_names = _capability_names(by_name, caps_type, object_type)
    return Schema(
        commands=frozenset(commands),
        events=events,
        allow_oob=frozenset(n for n, e in commands.items() if e.get("allow-oob") is True),
        members=members,
        required=required,
        member_types=member_types,
        arg_types=arg_types,
        caps_type=caps_type,
        capability_names=capability_names,
    )


def _capability_names(
    by_name: dict[str, dict[str, Any]], caps_type: str, object_type: Any
) -> frozenset[str] | None:
    """Follow ``[MigrationCapabilityStatus]`` to the ``capability`` member's enum values."""
    array = by_name.get(caps_type, {})
    status = object_type(array.get("element-type")) if array.get("meta-type") == "array" else None
    for member in _members(status):
        if member["name"] != "capability":
            continue
        kind = member.get("type")
        enum = by_name.get(kind, {}) if isinstance(kind, str) else {}
        values = enum.get("values") if enum.get("meta-type") == "enum" else None
        if isinstance(values, list) and all(isinstance(v, str) for v in values):
            return frozenset(values)
    return None


def capability_member(probed: Schema) -> bytes:
    """The member the backport adds, written as QEMU writes schema members."""
    member = {"name": "capabilities", "default": None, "type": probed.caps_type}
    return qjson.dumps(member)


def advertise(line: bytes, probed: Schema) -> bytes | None:
    """A ``query-qmp-schema`` reply line with ``capabilities`` on migrate's and
    migrate-incoming's argument types, or None when there is nothing to add.

    Managers detect arguments from the schema, so a relayed schema must show what the proxy
    accepts: an optional member typed like ``migrate-set-capabilities``' own.  The member is
    spliced into QEMU's own text, so the reply is byte for byte QEMU's but for that member.
    """
    if probed.caps_type is None:
        return None
    targets = [t for c, t in probed.arg_types.items() if not probed.native(c)]
    if not targets:
        return None
    member = capability_member(probed)
    out = line
    for target in dict.fromkeys(targets):
        at = _members_end(out, target)
        if at is None:
            return None  # not laid out as QEMU lays it out: relay it as it is
        comma = b"" if out[at - 1 : at] == b"[" else b", "
        out = out[:at] + comma + member + out[at:]
    return out


def _members_end(line: bytes, type_name: str) -> int | None:
    """Where the ``members`` array of the object type ``type_name`` closes in QEMU's line.

    QEMU writes an object type as ``{"name": "N", "members": [...], "meta-type": "object"}``
    (QDict order); each member is a flat object of strings, ``null`` and string lists, so the
    array closes at the first ``]`` outside a string and outside a member's own lists.
    """
    head = b'{"name": ' + qjson.dumps(type_name) + b', "members": ['
    start = line.find(head)
    if start < 0 or line.find(head, start + 1) >= 0:
        return None
    i = start + len(head)
    depth = 0
    in_string = False
    n = len(line)
    while i < n:
        byte = line[i]
        if in_string:
            if byte == 0x5C:  # backslash: skip the escaped byte
                i += 1
            elif byte == 0x22:
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte == 0x5B:
            depth += 1
        elif byte == 0x5D:
            if depth == 0:
                return i
            depth -= 1
        i += 1
    return None
