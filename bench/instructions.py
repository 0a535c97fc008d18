"""User-space instructions the proxy executes per round trip, counted by callgrind: no noise.

    python bench/instructions.py [--samples 2000,12000]

Wall-clock figures on a shared 2-vCPU VM move by several percent from run to run, more than a
typical optimisation of the hot path gains; ``valgrind --tool=callgrind`` counts instructions,
which are the same on every run for the same code and input.  This starts the fast fake QEMU,
then, for each sample count, the proxy (and the bare relay of ``bench/relay.py`` for
comparison) under callgrind, drives that many lockstep ``query-status`` round trips through it
with the latency benchmark's client, stops it and reads callgrind's total.  The difference
between two sample counts, over the difference in round trips, is the per-round-trip cost with
start-up and the schema probe taken out.

Only user space is counted: system calls, which are most of what the relay costs, are not.  The
figure tracks the proxy's own work (framing, checks, ids, routing, metrics, its Python I/O
layer), not its latency; ``bench/run.py`` measures that.  Needs valgrind.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import sys
import time
from pathlib import Path

try:
    from bench import harness
except ModuleNotFoundError as exc:  # run as a file: see bench/__init__.py
    if __package__ or exc.name not in ("bench", "tests"):
        raise
    os.chdir(Path(__file__).resolve().parent.parent)
    os.execv(sys.executable, [sys.executable, "-m", "bench.instructions", *sys.argv[1:]])

_TOTAL = re.compile(r"^(?:summary|totals): (\d+)", re.MULTILINE)


def instructions(env: harness.Env, name: str, argv: list[str], listen: Path, samples: int) -> int:
    """Total instructions of one process that served ``samples`` round trips and then stopped."""
    out = env.work / f"callgrind-{name}-{samples}.out"
    grind = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *argv]
    with env.child(name, grind) as child:
        harness.wait_greeting(listen, child, timeout=300.0)
        harness.round_trips(listen, samples, 0)
    match = _TOTAL.search(out.read_text())
    if match is None:
        raise RuntimeError(f"no total in {out}")
    return int(match.group(1))


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description="instructions per proxied round trip (callgrind)")
    p.add_argument("--samples", default="2000,12000", help="two round-trip counts, low,high")
    args = p.parse_args(argv)
    low, high = (int(x) for x in args.samples.split(","))
    if shutil.which("valgrind") is None:
        print("instructions: valgrind not found (apt-get install valgrind)", file=sys.stderr)
        return 2
    with contextlib.ExitStack() as stack:
        env = harness.Env(stack)
        fake = env.path("fake")
        env.fake(fake, schema=False)
        per_trip: dict[str, float] = {}
        for name in ("proxy", "relay"):
            totals = []
            for samples in (low, high):
                listen = env.path(name)
                if name == "proxy":
                    cmd = env.proxy_argv(str(fake), listen)
                else:
                    cmd = harness.relay_argv(str(fake), listen)
                started = time.monotonic()
                totals.append(instructions(env, name, cmd, listen, samples))
                harness.log(f"{name}: {samples} round trips in {time.monotonic() - started:.0f} s")
            per_trip[name] = (totals[1] - totals[0]) / (high - low)
        harness.table(
            f"User-space instructions per query-status round trip (callgrind; {high} - {low} "
            "round trips)",
            ["process", "instructions"],
            [[name, n] for name, n in per_trip.items()],
        )
        print(
            f"  proxy / relay: {per_trip['proxy'] / per_trip['relay']:.1f}x (user space only: the "
            "relay's cost is mostly system calls, which are not counted)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
