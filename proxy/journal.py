"""Crash safety of a split: the pending restore, on disk while the capabilities may be half-set.

Between ``migrate-set-capabilities`` and the migrate command's reply, a proxy killed with
SIGKILL (or cut off from QEMU) would leave QEMU with the client's capabilities set although the
command may never have run: QEMU half-configured.  So before that step the split writes a
journal entry: which route, which QEMU (version, name, UUID and, on unix sockets, its pid from
SO_PEERCRED), the values to restore, and ``query-migrate``'s answer before the sequence.  It is
removed when the sequence ends.  When the proxy (re)connects and finds an entry for the route:

* a different QEMU: the entry is stale, removed;
* the same QEMU and ``query-migrate`` answers exactly as recorded: the migrate command never took
  effect, so the restore is applied, then the entry removed;
* the same QEMU, anything else: the migration started (it owns the capabilities now), removed.

Comparing the whole ``query-migrate`` answer, not just its status, tells a new migration that
completed apart from an old completed one (their timings and counters differ).

Plain file I/O, atomic by rename; no asyncio.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import orjson


@dataclass(frozen=True, slots=True)
class Entry:
    route: str
    identity: dict[str, Any]
    restore: list[dict[str, Any]]  # migrate-set-capabilities' list that undoes the client's
    migration: Any  # query-migrate's return value before the sequence
    command: str


class Journal:
    """One file per route in the state directory."""

    def __init__(self, directory: Path, route: str) -> None:
        self.path = directory / f"{route}.split-journal.json"

    def write(self, entry: Entry) -> None:
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, orjson.dumps(asdict(entry)))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        _sync_dir(self.path.parent)

    def read(self) -> Entry | None:
        try:
            data = orjson.loads(self.path.read_bytes())
            return Entry(**data)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError):
            # Unreadable: nothing safe can be done with it; the caller logs and removes it.
            return Entry(route="", identity={}, restore=[], migration=None, command="")

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        _sync_dir(self.path.parent)


def _sync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
