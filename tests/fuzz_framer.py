"""A fuzz target for :class:`proxy.framing.Framer`, the parser every client byte goes through.

    python -m tests.fuzz_framer --seconds 60                # a minute, fresh seeds each run
    python -m tests.fuzz_framer --seconds 60 --seed 7       # the same inputs every time
    python -m tests.fuzz_framer --max-message 1048576       # only under the default limit

Inputs are QMP-like messages (compact, pretty, single-quoted, with ids of every JSON type),
concatenated, then mutated (bytes inserted, deleted, replaced or repeated, with a bias to the
bytes the lexer cares about: quotes, backslashes, braces, control bytes, 0xFE/0xFF, broken
UTF-8) or replaced by plain random bytes, under a random ``max_message`` (small ones reach the
size limit), fed whole and in random chunks.  For every input:

1. the framer never raises;
2. chunking does not matter: the items are the same fed whole or chunked;
3. it buffers at most ``max_message`` (or 4 KiB of a token it is skipping, if that is more)
   plus the chunk just fed;
4. every :class:`Message`'s own bytes, framed alone, give the same ``Message`` (value and
   ``id`` position);
5. it always comes back: a control byte and then a valid message yield that message.

Hypothesis shrinks a failure to a small input and prints it; a run ends at the first failure
(exit status 1) or when the time is up (exit status 0).  ``tests/test_fuzz_framer.py`` runs
the same target for a few seconds in CI.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from proxy.framing import DEFAULT_MAX_MESSAGE, Framer, Item, Message
from tests.test_framing_properties import single_quoted

# Bytes and fragments the lexer, streamer and parser treat specially (shared with
# tests/fuzz_differential.py, which adds its own after them: the order keeps seeds' cases).
LEXER_ATOMS = [
    b"{",
    b"}",
    b"[",
    b"]",
    b":",
    b",",
    b'"',
    b"'",
    b"\\",
    b"\\'",
    b'\\"',
    b"\\u",
    b"\\u00",
    b"\\ud800",
    b"\\udc00",
    b"\\uD83D\\uDE00",
    b"\\u0000",
    b"\x00",
    b"\x01",
    b"\x1f",
    b"\t",
    b"\r\n",
    b" ",
    b"\xff",
    b"\xfe",
    b"\xc3",
    b"\xa9",
    b"\xc0\x80",
    b"\xed\xa0\x80",
    b"\xf4\x90\x80\x80",
    b"\xef\xbf\xbe",
    b"-",
    b"0",
    b"-0",
    b"00",
]
ATOMS = [
    *LEXER_ATOMS,
    b"1.",
    b"1e",
    b"1e+",
    b"1e400",
    b"18446744073709551616",
    b"true",
    b"nul",
    b"nulls",
    b"NaN",
    b"Infinity",
    b'"id"',
    b'"execute"',
    b'"exec-oob"',
    b'"arguments"',
    b"/*",
]
RESYNC_MESSAGE = b'{"id":7,"a":1}'  # fits the smallest max_message
RESYNCED = Framer().feed(RESYNC_MESSAGE)[0]
# While it skips the rest of an oversized message, the framer keeps up to this much of the token
# in progress (to quote it, should it turn out to be a stray token): with a max_message below
# it, this is the bound.
SKIP_WINDOW = 4096
BYTEWISE = [-1]  # cuts meaning "one byte at a time"
MAX_MESSAGES = [16, 48, 64, 128, 512, 4096, DEFAULT_MAX_MESSAGE]

_text = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=8)
_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(1 << 70), 1 << 70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | _text
)
_values = st.recursive(
    _scalars,
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(_text, kids, max_size=3),
    max_leaves=6,
)
_messages = st.fixed_dictionaries(
    {"execute": st.sampled_from(["qmp_capabilities", "query-status", "migrate", "x"])},
    optional={"arguments": st.dictionaries(_text, _values, max_size=3), "id": _values},
)


def _dump(value: Any, rnd: random.Random, item_sep: str, key_sep: str) -> str:
    if isinstance(value, str):
        return single_quoted(value) if rnd.random() < 0.3 else json.dumps(value)
    if isinstance(value, dict):
        members = (
            _dump(k, rnd, item_sep, key_sep) + key_sep + _dump(v, rnd, item_sep, key_sep)
            for k, v in value.items()
        )
        return "{" + item_sep.join(members) + "}"
    if isinstance(value, list):
        return "[" + item_sep.join(_dump(v, rnd, item_sep, key_sep) for v in value) + "]"
    return json.dumps(value)


def _serialize(value: Any, rnd: random.Random) -> bytes:
    if rnd.random() < 0.3:
        text = json.dumps(value, indent=rnd.choice([None, 2]), ensure_ascii=rnd.random() < 0.5)
    else:
        item_sep, key_sep = rnd.choice([(",", ":"), (", ", ": "), (" ,\r\n\t", "\t:\n ")])
        text = _dump(value, rnd, item_sep, key_sep)
    return text.encode("utf-8", "surrogatepass")


@st.composite
def streams(draw: st.DrawFn) -> bytes:
    """A client's byte stream: messages, mutated, or junk."""
    shape = draw(st.sampled_from(["messages", "mutated", "mutated", "random", "deep"]))
    if shape == "random":
        return draw(st.binary(max_size=600))
    if shape == "deep":
        depth = draw(st.integers(1, 1100))
        opener, closer = draw(st.sampled_from([(b"[", b"]"), (b'{"a":', b"}")]))
        inner = b"1" if opener != b"[" else b""
        cut = draw(st.integers(0, depth))
        return opener * depth + inner + closer * cut + draw(st.binary(max_size=8))
    rnd = draw(st.randoms(use_true_random=False))
    messages = draw(st.lists(_messages, min_size=1, max_size=5))
    stream = b"".join(
        rnd.choice([b"", b" ", b"\n", b"\r\n\t"]) + _serialize(m, rnd) for m in messages
    )
    if draw(st.booleans()):  # a long string, for the size limit
        stream += b'{"execute": "x", "arguments": {"blob": "%s"}}' % (
            b"a" * draw(st.integers(0, 5000))
        )
    if shape == "mutated":
        mutated = bytearray(stream)
        for _ in range(draw(st.integers(1, 8))):
            at = draw(st.integers(0, len(mutated)))
            op = draw(st.sampled_from(["insert", "delete", "replace", "repeat", "truncate"]))
            atom = draw(st.sampled_from(ATOMS) | st.binary(min_size=1, max_size=4))
            span = draw(st.integers(1, 16))
            if op == "insert":
                mutated[at:at] = atom
            elif op == "delete":
                del mutated[at : at + span]
            elif op == "replace":
                mutated[at : at + len(atom)] = atom
            elif op == "repeat":
                mutated[at:at] = mutated[at : at + span] * draw(st.integers(1, 4))
            else:
                del mutated[at:]
        stream = bytes(mutated)
    return stream


def feed_chunked(framer: Framer, data: bytes, cuts: list[int]) -> list[Item]:
    """Feed ``data`` in the pieces ``cuts`` makes (offsets, taken modulo the length, or
    :data:`BYTEWISE`), checking the buffer bound after each."""
    items: list[Item] = []
    last = 0
    if cuts == BYTEWISE:
        cuts = list(range(len(data)))
    for cut in [*sorted({c % (len(data) + 1) for c in cuts}), len(data)]:
        chunk = data[last:cut]
        items += framer.feed(chunk)
        bound = max(framer.max_message, SKIP_WINDOW) + len(chunk)
        assert framer.buffered <= bound, (
            f"buffered {framer.buffered} > max(max_message {framer.max_message}, "
            f"{SKIP_WINDOW}) + chunk {len(chunk)}"
        )
        last = cut
    return items


def check(data: bytes, cuts: list[int], max_message: int) -> None:
    """The properties, for one input."""
    whole = Framer(max_message).feed(data)
    framer = Framer(max_message)
    chunked = feed_chunked(framer, data, cuts)
    assert chunked == whole, f"chunking changed the items:\n whole:   {whole}\n chunked: {chunked}"
    for item in whole:
        if isinstance(item, Message):
            alone = Framer(max_message).feed(item.raw + b"\n")
            assert alone == [item], (item, alone)
    # Whatever state the stream left: a control byte, then a valid message, and it is back.
    after = feed_chunked(framer, b"\x01" + RESYNC_MESSAGE, cuts)
    assert after and after[-1] == RESYNCED, after


def target(batch_seed: int, batch: int, max_messages: list[int]) -> Callable[[], None]:
    """The hypothesis test for one batch of ``batch`` inputs."""

    @settings(
        max_examples=batch,
        deadline=None,
        database=None,
        phases=[Phase.generate, Phase.shrink],
        suppress_health_check=list(HealthCheck),
    )
    @seed(batch_seed)
    @given(
        data=streams(),
        cuts=st.lists(st.integers(0, 1 << 16), max_size=12) | st.just(BYTEWISE),
        max_message=st.sampled_from(max_messages),
    )
    def fuzz(data: bytes, cuts: list[int], max_message: int) -> None:
        check(data, cuts, max_message)

    return fuzz


def run(
    seconds: float,
    first_seed: int | None = None,
    batch: int = 200,
    max_messages: list[int] | None = None,
    log: Callable[[str], None] = print,
) -> int:
    """Fuzz until ``seconds`` have passed; returns how many inputs were tried.

    Each batch has its own seed (logged on failure: ``--seed`` with it reruns that batch
    first); the first failure raises, after hypothesis shrank it.
    """
    rnd = random.Random(first_seed)
    deadline = time.monotonic() + seconds
    tried = 0
    while time.monotonic() < deadline:
        batch_seed = first_seed if tried == 0 and first_seed is not None else rnd.getrandbits(32)
        try:
            target(batch_seed, batch, max_messages or MAX_MESSAGES)()
        except BaseException:
            log(f"fuzz_framer: failure in the batch with --seed {batch_seed}")
            raise
        tried += batch
    return tried


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.fuzz_framer",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--seconds", type=float, default=60.0, help="time budget (default 60)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the first batch")
    parser.add_argument(
        "--max-message",
        type=int,
        action="append",
        help=f"a max_message to fuzz under (repeatable; default {MAX_MESSAGES})",
    )
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        tried = run(args.seconds, args.seed, max_messages=args.max_message)
    except Exception as exc:
        # Hypothesis attaches the shrunk input to the exception as notes.
        traceback.print_exception(exc)
        print(f"fuzz_framer: FAILED: {type(exc).__name__}", file=sys.stderr)
        return 1
    print(f"fuzz_framer: {tried} inputs in {time.monotonic() - started:.1f} s, no failure")
    return 0


if __name__ == "__main__":
    sys.exit(main())
