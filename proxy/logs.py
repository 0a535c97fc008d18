"""Structured logs: one line per event, ``key=value``, with route, session and upstream ids.

Operators grep and ship these lines, so a client must never be able to shape them: every value
is truncated to :data:`MAX_VALUE` characters and quoted with every control, non-printable and
quoting character escaped, so one value is always one token on one line (a ``\\r`` in a
command name cannot forge a line).  Events a client can cause at will (policy denials, refused
descriptor batches, its own protocol faults) go through a :class:`Throttle`.
"""

from __future__ import annotations

import logging
import sys
import time
import traceback
from typing import Final

MAX_VALUE: Final = 200
_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:/@+,[]")


def _escape(ch: str) -> str:
    if ch == "\\" or ch == '"':
        return "\\" + ch
    if ch.isprintable():
        return ch
    code = ord(ch)
    return (
        f"\\x{code:02x}"
        if code < 0x100
        else f"\\u{code:04x}"
        if code < 0x10000
        else (f"\\U{code:08x}")
    )


def _value(value: object) -> str:
    text = str(value)
    if len(text) > MAX_VALUE:
        text = f"{text[:MAX_VALUE]}...({len(text)} chars)"
    if text and all(c in _SAFE for c in text):
        return text
    return '"' + "".join(c if c in _SAFE else _escape(c) for c in text) + '"'


def fields(event: str, **kv: object) -> str:
    parts = [f"event={event}"]
    parts.extend(f"{k}={_value(v)}" for k, v in kv.items() if v is not None)
    return " ".join(parts)


def failure(logger: logging.Logger, event: str, exc: BaseException, **kv: object) -> None:
    """An unexpected exception, with its traceback, as one escaped line (never a multi-line
    block a reader or a log shipper could take for other events)."""
    trace = "".join(traceback.format_exception(exc))[-4000:]
    body = "".join(c if c in _SAFE or c == " " else _escape(c) for c in trace)
    logger.error(fields(event, error=repr(exc), **kv) + f' traceback="{body}"')


class Throttle:
    """At most ``burst`` lines per ``period`` seconds; then one line saying how many were not
    written.  Per route, so one noisy client cannot fill the disk or hide other routes' lines."""

    def __init__(self, logger: logging.Logger, burst: int = 20, period: float = 10.0) -> None:
        self._log = logger
        self.burst = burst
        self.period = period
        self._window = 0.0
        self._count = 0
        self.suppressed = 0

    def allow(self) -> bool:
        now = time.monotonic()
        if now - self._window >= self.period:
            if self._count > self.burst:
                self._log.warning(
                    fields("log_suppressed", lines=self._count - self.burst, seconds=self.period)
                )
            self._window = now
            self._count = 0
        self._count += 1
        if self._count > self.burst:
            self.suppressed += 1
            return False
        return True


def setup(level: str) -> None:
    """Log to stderr (journald adds its own timestamps; containers collect stderr)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def set_level(level: str) -> None:
    logging.getLogger().setLevel(level.upper())
