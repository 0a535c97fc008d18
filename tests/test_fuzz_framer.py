"""The framer fuzz target (``tests/fuzz_framer.py``) for a few seconds in CI, and what it found.

The short run uses fresh seeds each time (a fuzzer that replays the same inputs finds nothing
new); a failure logs its batch seed, and ``python -m tests.fuzz_framer --seed N`` replays it.
``FUZZ_SEED=N`` pins the run here.  The regressions below are the fuzzer's findings, at the
sizes the proxy really runs with (``max_message`` 1 MiB, reads of at most ``READ_SIZE``).
"""

from __future__ import annotations

import os

from proxy.fdsock import READ_SIZE
from proxy.framing import DEFAULT_MAX_MESSAGE, Framer, Item, Message, ParseError
from tests import fuzz_framer

LIMIT = ParseError("JSON token size limit exceeded", "limit")


def feed_in_reads(framer: Framer, data: bytes, size: int = READ_SIZE) -> list[Item]:
    items: list[Item] = []
    for at in range(0, len(data), size):
        items += framer.feed(data[at : at + size])
    return items


def test_fuzz_the_framer_for_a_few_seconds() -> None:
    seed = os.environ.get("FUZZ_SEED")
    tried = fuzz_framer.run(5.0, int(seed) if seed else None)
    assert tried >= 200


def test_an_object_inside_an_oversized_message_is_skipped_at_a_read_boundary() -> None:
    """The rest of an oversized message is skipped, even when a read begins with
    an object inside it: that object is no message of its own.  (Framer.feed's orjson fast
    path is taken whenever the buffer is empty at depth 0 of the *lexer*, even while the rest
    of an oversized message is being skipped.)"""
    framer = Framer()
    head = b'{"execute": "x", "arguments": {"pad": "' + b"a" * DEFAULT_MAX_MESSAGE + b'", "y": '
    assert feed_in_reads(framer, head) == [LIMIT]
    inner = b'{"execute": "quit", "id": "smuggled"}}}'
    assert framer.feed(inner) == [], "an object inside the skipped message came out"
    next_ = Message(b'{"execute": "next"}', {"execute": "next"})
    assert framer.feed(b'{"execute": "next"}') == [next_]


def test_the_size_limit_reply_does_not_depend_on_read_boundaries() -> None:
    """An oversized message cut short by a lexical error gets ``JSON token size limit
    exceeded`` only if a read happened to end after the limit and before the error: the
    size is checked at the end of each ``feed()``, not as the message grows (QEMU checks it
    per token, so its replies never depend on how the input was split)."""
    data = (
        b'{"execute": "x", "arguments": {"pad": "'
        + b"a" * (DEFAULT_MAX_MESSAGE * 13 // 10)  # a read ends between the limit and \x01
        + b'\x01"}}{"execute": "next"}'
    )
    in_reads = feed_in_reads(Framer(), data)
    in_one = Framer().feed(data)
    assert in_reads[0] == LIMIT
    assert summary(in_one) == summary(in_reads)


def summary(items: list[Item]) -> list[str]:
    return [i.desc[:40] if isinstance(i, ParseError) else repr(i.raw[:40]) for i in items]
