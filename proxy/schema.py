"""What the proxy learns from ``query-qmp-schema`` after each upstream (re)connect (DESIGN §5.1).

Type names in the introspected schema are masked as numbers that change with every build, so
nothing is cached across connections: every probe resolves ``migrate``'s and
``migrate-incoming``'s ``arg-type`` afresh and records whether each has a ``capabilities``
member, plus the type of ``migrate-set-capabilities``' own ``capabilities`` member (what the
backport advertises).  The command and event names bound the metrics' label sets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

MIGRATE_COMMANDS = ("migrate", "migrate-incoming")


@dataclass(frozen=True, slots=True)
class Schema:
    commands: frozenset[str] = frozenset()
    events: frozenset[str] = frozenset()
    allow_oob: frozenset[str] = frozenset()
    # Argument member names of migrate and migrate-incoming, and of their arg types' names.
    members: dict[str, tuple[str, ...]] = field(default_factory=dict)
    required: dict[str, frozenset[str]] = field(default_factory=dict)
    member_types: dict[str, dict[str, str]] = field(default_factory=dict)
    arg_types: dict[str, str] = field(default_factory=dict)
    # The type of migrate-set-capabilities' "capabilities" member, e.g. "[123]".
    caps_type: str | None = None

    def native(self, command: str) -> bool:
        """Whether QEMU itself takes ``capabilities`` on this migrate command."""
        return "capabilities" in self.members.get(command, ())

    def has_member(self, command: str, member: str) -> bool:
        return member in self.members.get(command, ())


def parse(entries: object) -> Schema:
    """Build a :class:`Schema` from the ``return`` value of ``query-qmp-schema``."""
    if not isinstance(entries, list):
        return Schema()
    objects: dict[str, list[dict[str, object]]] = {}
    commands: dict[str, dict[str, object]] = {}
    events: set[str] = set()
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        name = entry.get("name")
        meta = entry.get("meta-type")
        if not isinstance(name, str):
            continue
        if meta == "command":
            commands[name] = entry
        elif meta == "event":
            events.add(name)
        elif meta == "object":
            members = entry.get("members")
            if isinstance(members, list):
                objects[name] = [m for m in members if isinstance(m, dict)]

    def members_of(command: str) -> list[dict[str, object]]:
        entry = commands.get(command)
        arg_type = entry.get("arg-type") if entry else None
        return objects.get(arg_type, []) if isinstance(arg_type, str) else []

    members = {}
    member_types: dict[str, dict[str, str]] = {}
    required = {}
    arg_types = {}
    for command in MIGRATE_COMMANDS:
        if command in commands:
            declared = members_of(command)
            members[command] = tuple(str(m.get("name")) for m in declared)
            required[command] = frozenset(
                str(m.get("name")) for m in declared if "default" not in m
            )
            member_types[command] = {str(m.get("name")): str(m.get("type")) for m in declared}
            arg_type = commands[command].get("arg-type")
            if isinstance(arg_type, str):
                arg_types[command] = arg_type
    caps_type = None
    for member in members_of("migrate-set-capabilities"):
        if member.get("name") == "capabilities" and isinstance(member.get("type"), str):
            caps_type = str(member["type"])
    return Schema(
        commands=frozenset(commands),
        events=frozenset(events),
        allow_oob=frozenset(n for n, e in commands.items() if e.get("allow-oob") is True),
        members=members,
        required=required,
        member_types=member_types,
        arg_types=arg_types,
        caps_type=caps_type,
    )


def advertise(entries: list[Any], probed: Schema) -> list[Any]:
    """Add ``capabilities`` to migrate's and migrate-incoming's argument types (DESIGN §5.5).

    Managers detect arguments from the schema (QMP-NOTES §3.7), so a relayed
    ``query-qmp-schema`` must show what the proxy accepts: an optional member typed like
    ``migrate-set-capabilities``' own.
    """
    if probed.caps_type is None:
        return entries
    targets = {t for c, t in probed.arg_types.items() if not probed.native(c)}
    member = {"name": "capabilities", "default": None, "type": probed.caps_type}
    out = []
    for entry in entries:
        if isinstance(entry, dict) and entry.get("name") in targets and "members" in entry:
            entry = dict(entry, members=[*entry["members"], member])
        out.append(entry)
    return out
