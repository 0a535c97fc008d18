"""Crash safety of a split: the pending restore, on disk while the capabilities may be half-set.

Between ``migrate-set-capabilities`` and the migrate command's reply, a proxy killed with
SIGKILL (or cut off from QEMU) would leave QEMU with the client's capabilities set although the
command may never have run: QEMU half-configured.  So before that step the split writes a
journal entry: which route, which QEMU (its upstream address, version, name, UUID and, on unix
sockets, its pid from SO_PEERCRED), the values to restore, and ``query-migrate``'s answer before
the sequence.  It is removed when the sequence ends.  On the next connection to the same QEMU,
recovery (:mod:`proxy.splitting`) applies the restore only if the migration provably never
started.

The journal can make the proxy change a VM, so it must only ever undo what this proxy did:

* it lives in a directory owned by the proxy's user and writable by no one else
  (:func:`check_directory`; otherwise the proxy refuses to start);
* one file per route and upstream, locked (``flock``) for the life of the process, so a second
  proxy cannot share it;
* written through an exclusive, no-follow temporary file renamed into place; read no-follow;
* its content is validated before use; a file that fails is moved aside and reported, never
  applied, never fatal.

Plain file I/O; no asyncio.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import secrets
import stat
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Final

import orjson

from proxy.schema import MIGRATE_COMMANDS

# A journal is a few hundred bytes; anything far larger was not written by this proxy.
MAX_SIZE: Final = 64 << 10
_IDENTITY_KEYS: Final = {"upstream", "version", "name", "uuid", "pid"}


class JournalError(Exception):
    """The state directory or a journal cannot be used; the message is one line for the user."""


class JournalInvalid(Exception):
    """A journal file that this proxy could not have written: never applied."""


@dataclass(frozen=True, slots=True)
class Entry:
    route: str
    identity: dict[str, Any]
    restore: list[dict[str, Any]]  # migrate-set-capabilities' list that undoes the client's
    migration: Any  # query-migrate's return value before the sequence
    command: str


def check_directory(path: Path) -> None:
    """Create the state directory (0700) if missing, and refuse one others could write into.

    Anyone who can write there could plant a journal that makes the proxy (often root) change
    a VM, or a symlink that makes it overwrite a file.
    """
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = os.lstat(path)
    except OSError as exc:
        raise JournalError(f"state_dir {path}: {exc.strerror or exc}") from None
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise JournalError(f"state_dir {path}: not a directory (a symlink is refused too)")
    if info.st_uid != os.geteuid():
        raise JournalError(
            f"state_dir {path}: owned by uid {info.st_uid}, not by this process (uid "
            f"{os.geteuid()})"
        )
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise JournalError(
            f"state_dir {path}: writable by group or others (mode {stat.S_IMODE(info.st_mode):04o})"
        )
    if not os.access(path, os.W_OK | os.X_OK):
        raise JournalError(f"state_dir {path}: not writable by this process")


class Journal:
    """One route's pending restore, in ``state_dir``; call :meth:`lock` before anything else."""

    def __init__(self, directory: Path, route: str, upstream: str) -> None:
        # The upstream is part of the name: two routes named alike (two proxies started without
        # --name) never share a file.
        digest = hashlib.sha256(upstream.encode()).hexdigest()[:16]
        self.directory = directory
        self.route = route
        self.stem = f"{route}.{digest}"
        self.path = directory / f"{self.stem}.journal.json"
        self.lock_path = directory / f"{self.stem}.lock"
        self._lock_fd: int | None = None

    def lock(self) -> None:
        """Take the route's lock for the life of the process; raises :class:`JournalError`."""
        path = self.lock_path
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            except OSError as exc:
                raise JournalError(f"journal lock {path}: {exc.strerror or exc}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise JournalError(
                    f"journal lock {path}: held by another qmp-proxy (pid {holder}) serving "
                    f"route {self.route} for the same upstream"
                ) from None
            if _same_file(fd, path):
                break
            os.close(fd)  # unlinked by its last holder meanwhile: lock the new file instead
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def unlock(self) -> None:
        """Release the lock and remove its file (still locked, so no one else holds it)."""
        if self._lock_fd is not None:
            if _same_file(self._lock_fd, self.lock_path):
                with contextlib.suppress(OSError):
                    os.unlink(self.lock_path)
            os.close(self._lock_fd)
            self._lock_fd = None

    def write(self, entry: Entry) -> None:
        """Atomically replace the journal; raises OSError (the split must then not start)."""
        data = orjson.dumps(asdict(entry))
        if len(data) > MAX_SIZE:  # read() would refuse it: the split must not start
            raise OSError(errno.EFBIG, f"a {len(data)}-byte entry")
        tmp = self.directory / f".{self.stem}.{secrets.token_hex(8)}.tmp"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(tmp, flags, 0o600)
        try:
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        _sync_dir(self.directory)

    def read(self) -> Entry | None:
        """The entry on disk, None if there is none; raises :class:`JournalInvalid`."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise JournalInvalid(f"cannot open: {exc.strerror or exc}") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise JournalInvalid("not a regular file")
            if info.st_uid != os.geteuid():
                raise JournalInvalid(f"owned by uid {info.st_uid}")
            if info.st_size > MAX_SIZE:
                raise JournalInvalid(f"{info.st_size} bytes")
            data = os.read(fd, MAX_SIZE + 1)
        finally:
            os.close(fd)
        try:
            raw = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise JournalInvalid("not JSON") from None
        return _validated(raw, self.route)

    def quarantine(self) -> Path | None:
        """Move an invalid journal aside (kept for the operator); returns where it went."""
        aside = self.directory / f"{self.stem}.invalid-{time.strftime('%Y%m%dT%H%M%S')}"
        try:
            os.replace(self.path, aside)
        except OSError:
            self.remove()
            return None
        _sync_dir(self.directory)
        return aside

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError, IsADirectoryError):
            self.path.unlink()
        _sync_dir(self.directory)


_ENTRY_KEYS: Final = frozenset(f.name for f in fields(Entry))


def _validated(raw: object, route: str) -> Entry:
    """An :class:`Entry` from what was on disk, or :class:`JournalInvalid` saying why not."""
    if not isinstance(raw, dict) or set(raw) != _ENTRY_KEYS:
        raise JournalInvalid("not a journal entry")
    if raw["route"] != route:
        raise JournalInvalid(f"written for route {str(raw['route'])[:64]!r}")
    identity = raw["identity"]
    if not isinstance(identity, dict) or set(identity) != _IDENTITY_KEYS:
        raise JournalInvalid("identity is malformed")
    if raw["command"] not in MIGRATE_COMMANDS:
        raise JournalInvalid("command is not migrate or migrate-incoming")
    restore = raw["restore"]
    if (
        not isinstance(restore, list)
        or not 0 < len(restore) <= 256
        or not all(
            isinstance(e, dict)
            and set(e) == {"capability", "state"}
            and isinstance(e["capability"], str)
            and type(e["state"]) is bool
            for e in restore
        )
    ):
        raise JournalInvalid("restore is not a list of capability/state pairs")
    return Entry(route, identity, restore, raw["migration"], raw["command"])


def _same_file(fd: int, path: Path) -> bool:
    try:
        held, named = os.fstat(fd), os.lstat(path)
    except OSError:
        return False
    return (held.st_dev, held.st_ino) == (named.st_dev, named.st_ino)


def _sync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
