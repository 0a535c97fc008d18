"""Structured logs: one line per event, ``key=value``, with route, session and upstream ids.

Three forms, one set of fields: ``text`` (a timestamp, the level, then ``event=... k=v``),
``journal`` (what journald wants: no timestamp of our own, the syslog priority as a ``<3>``
prefix so ``journalctl -p err`` works; chosen by itself when stderr is journald's stream,
``$JOURNAL_STREAM``) and ``json`` (one object per line for log shippers).

Operators grep and ship these lines, so a client must never be able to shape them: every value
is truncated to :data:`MAX_VALUE` characters and quoted with every control, non-printable and
quoting character escaped, so one value is always one token on one line (a ``\\r`` in a
command name cannot forge a line).  Events a client can cause at will (policy denials, refused
descriptor batches, its own protocol faults) go through a :class:`Throttle`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import traceback
from typing import Final, Literal

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


class Event(str):
    """An event's ``key=value`` line, which also keeps its fields for the JSON form."""

    __slots__ = ("data",)
    data: dict[str, object]


def fields(event: str, **kv: object) -> Event:
    parts = [f"event={event}"]
    parts.extend(f"{k}={_value(v)}" for k, v in kv.items() if v is not None)
    line = Event(" ".join(parts))
    line.data = {"event": event, **{k: v for k, v in kv.items() if v is not None}}
    return line


def failure(logger: logging.Logger, event: str, exc: BaseException, **kv: object) -> None:
    """An unexpected exception, with its traceback, as one escaped line (never a multi-line
    block a reader or a log shipper could take for other events)."""
    trace = "".join(traceback.format_exception(exc))[-4000:]
    body = "".join(c if c in _SAFE or c == " " else _escape(c) for c in trace)
    line = fields(event, error=repr(exc), **kv)
    full = Event(f'{line} traceback="{body}"')
    full.data = {**line.data, "traceback": trace}
    logger.error(full)


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


LogFormat = Literal["auto", "text", "journal", "json"]
LOG_FORMATS: Final = ("auto", "text", "journal", "json")
# syslog priorities (sd-daemon(3)): what journald reads from a "<N>" prefix.
_PRIORITY: Final = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3}


class JournalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        priority = _PRIORITY.get(record.levelno, 2 if record.levelno > logging.ERROR else 6)
        return f"<{priority}>{record.getMessage()}"


class JsonFormatter(logging.Formatter):
    """One JSON object per event: time, level, then the event's own fields (values as given,
    cut at :data:`MAX_VALUE` characters like the text form; JSON escapes the rest)."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.msg
        data = message.data if isinstance(message, Event) else {"message": record.getMessage()}
        out: dict[str, object] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
            "level": record.levelname.lower(),
        }
        for key, value in data.items():
            if not isinstance(value, int | float):  # bool is an int
                value = str(value)
                if len(value) > MAX_VALUE and key != "traceback":
                    value = f"{value[:MAX_VALUE]}...({len(value)} chars)"
            out[key] = value
        return json.dumps(out, ensure_ascii=True)


def under_journald() -> bool:
    """stderr is journald's stream (``$JOURNAL_STREAM`` is its device:inode)."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return expected == f"{st.st_dev}:{st.st_ino}"


def setup(level: str, form: LogFormat = "auto") -> None:
    """Log to stderr, in the form that fits where it goes."""
    if form == "auto":
        form = "journal" if under_journald() else "text"
    handler = logging.StreamHandler(sys.stderr)
    formatter: logging.Formatter
    if form == "journal":
        formatter = JournalFormatter()
    elif form == "json":
        formatter = JsonFormatter()
    else:
        formatter = logging.Formatter("%(asctime)s %(levelname)s %(message)s")
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def set_level(level: str) -> None:
    logging.getLogger().setLevel(level.upper())
