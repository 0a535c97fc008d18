"""Per-listener command policy: which commands a socket's clients may run.

QMP has no authentication; a QMP socket is root over the VM.  An operator who wants, say, a
read-only monitoring socket gives that listener ``allow = ["query-*"]``.  Patterns are shell
globs matched against the command name, the same for ``execute`` and ``exec-oob``.  A denied
command is answered as QEMU answers a disabled one and never reaches QEMU.  The backport's
split runs commands on the client's behalf; it is allowed only if the client may run each of
them itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fnmatch import fnmatchcase

from proxy.backport import SPLIT_RUNS


@dataclass(frozen=True, slots=True)
class Policy:
    allow: tuple[str, ...] | None = None  # None: everything not denied
    deny: tuple[str, ...] = ()
    # Nothing is denied: worked out once, it is read for every command.
    open: bool = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "open", self.allow is None and not self.deny)

    def permits(self, command: str) -> bool:
        if command == "qmp_capabilities":
            return True  # negotiation is part of the protocol, never a policy matter
        if any(fnmatchcase(command, p) for p in self.deny):
            return False
        return self.allow is None or any(fnmatchcase(command, p) for p in self.allow)

    def permits_request(self, command: str, arguments: dict[str, object] | None) -> bool:
        """The command, and for a migrate carrying capabilities, all a split would run."""
        if self.open:
            return True
        if not self.permits(command):
            return False
        if arguments is not None and "capabilities" in arguments:
            return all(self.permits(c) for c in SPLIT_RUNS.get(command, ()))
        return True


def disabled(command: str) -> str:
    return f"The command {command} has been disabled for this socket"


OPEN = Policy()
