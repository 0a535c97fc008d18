"""qmp-proxy benchmarks: one command, a table per benchmark, ratios and a summary.

    python bench/run.py [--quick] [--only latency,cpu,throughput,fanout,memory,migrate]
    python -m bench.run [...]  (from the repository root; the same)

(``python`` with uvloop and orjson: the project's ``.venv/bin/python``.)  ``--quick`` takes about
a minute, the full run a few.  Run as a file, this re-executes itself as ``python -m bench.run``
from the repository root, so that ``bench`` and ``tests`` are ordinary packages (see
``bench/__init__.py`` for why).  ``bench/hotspots.py`` shows where the proxy's CPU goes;
``bench/instructions.py`` counts its instructions per round trip, without noise.

Every figure is measured in the same run against the same baselines:

* a real QEMU 7.2 (``-M none -S``) serves, in turn and in many small interleaved batches, a direct
  connection, a ``socat`` relay, the bare Python relay of ``bench/relay.py`` (uvloop, no parsing:
  the floor no Python proxy can beat) and the proxy.  QEMU serves one client at a time and the
  proxy holds its connection, so the proxy is started for each of its batches and stopped after;
* where QEMU itself would be the bottleneck (CPU per command, event fan-out, memory) the proxy
  runs against ``bench/fakeqemu.py``, which answers at once.

The run prints figures and PASS/MISS against the issue's targets; nothing here asserts timings.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import resource
import shutil
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Final

try:
    from bench import cpu, fanout, latency, memory, migrate, throughput
    from bench.harness import (
        FULL,
        QUICK,
        Env,
        OtherLoad,
        Plan,
        Report,
        capture_schema,
        log,
        machine,
        table,
    )
    from tests.qemu import QEMU_BINARIES, QemuProcess
except ModuleNotFoundError as exc:  # run as a file: bench/ is on the path, its parent is not
    if __package__ or exc.name not in ("bench", "tests"):
        raise
    os.chdir(Path(__file__).resolve().parent.parent)
    os.execv(sys.executable, [sys.executable, "-m", "bench.run", *sys.argv[1:]])

BENCHES: Final[dict[str, Callable[[Env, QemuProcess, Plan, Report], None]]] = {
    "latency": latency.measure,
    "cpu": cpu.measure,
    "throughput": throughput.measure,
    "fanout": fanout.measure,
    "memory": memory.measure,
    "migrate": migrate.measure,
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="qmp-proxy benchmarks")
    p.add_argument("--quick", action="store_true", help="about a minute instead of a few")
    p.add_argument(
        "--no-pin",
        action="store_true",
        help="latency: only the unpinned run (the headline), not the pinned one",
    )
    p.add_argument(
        "--only", default=",".join(BENCHES), help=f"comma-separated subset of {','.join(BENCHES)}"
    )
    args = p.parse_args(argv)
    only = [b.strip() for b in args.only.split(",") if b.strip()]
    unknown = set(only) - set(BENCHES)
    if unknown:
        p.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}")
    plan = dataclasses.replace(QUICK if args.quick else FULL, latency_pinned=not args.no_pin)
    for tool in (QEMU_BINARIES["7.2"], "socat"):
        if shutil.which(tool) is None:
            print(
                f"bench: {tool} is required (scripts/install-qemu.sh installs it)", file=sys.stderr
            )
            return 2
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))

    started = time.monotonic()
    whole_run = OtherLoad()
    machine()
    print(f"  mode: {'quick' if args.quick else 'full'}")
    rep = Report()
    with contextlib.ExitStack() as stack:
        env = Env(stack)
        qemu = stack.enter_context(QemuProcess("7.2", "-M", "none"))
        capture_schema(env, qemu)
        for name, measure in BENCHES.items():
            if name not in only:
                continue
            log(f"{name} ...")
            during = OtherLoad()
            try:
                measure(env, qemu, plan, rep)
            except Exception as exc:  # report it and go on with the other benchmarks
                rep.errors.append(f"{name}: {exc!r}")
                print(f"\n{name}: ERROR {exc!r}")
                traceback.print_exc(file=sys.stderr)
            print(f"  ({during.note()})")
            sys.stdout.flush()

    print("\nSummary")
    table(
        "",
        ["benchmark", "target", "measured", "result"],
        [
            [v.name, v.target, v.measured, "-" if v.ok is None else "PASS" if v.ok else "MISS"]
            for v in rep.verdicts
        ],
    )
    for err in rep.errors:
        print(f"  ERROR {err}")
    print(f"\n  total {time.monotonic() - started:.0f} s; {whole_run.note()}")
    return 1 if rep.errors else 0


if __name__ == "__main__":
    sys.exit(main())
