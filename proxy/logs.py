"""Structured logs: one line per event, ``key=value``, with route, session and upstream ids.

Operators grep and ship these lines; a fixed ``event=`` first and shell-safe values keep them
machine-readable without a JSON log format.
"""

from __future__ import annotations

import logging
import sys

_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:/@+,[]")


def _value(value: object) -> str:
    text = str(value)
    if text and all(c in _SAFE for c in text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def fields(event: str, **kv: object) -> str:
    parts = [f"event={event}"]
    parts.extend(f"{k}={_value(v)}" for k, v in kv.items() if v is not None)
    return " ".join(parts)


def setup(level: str) -> None:
    """Log to stderr (journald adds its own timestamps; containers collect stderr)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def set_level(level: str) -> None:
    logging.getLogger().setLevel(level.upper())
