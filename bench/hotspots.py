"""Where the proxy spends its CPU: py-spy samples of the proxy under a benchmark's load.

    python bench/hotspots.py [pipelined|lockstep|fanout] [--seconds 6] [--top 18] [--blocking]

Starts the fast fake QEMU and the proxy, attaches ``py-spy record`` to the proxy process
(non-blocking unless ``--blocking``: the proxy is not paused) while this process drives the
load, and prints the functions with the most samples: *self* (the frame on top of the stack)
and *inclusive* (anywhere on it), plus samples per module.  Native time (system calls, uvloop's
C code) shows up on the Python frame that called it.  Scenarios: ``pipelined`` (benchmark 2:
8 clients, window 16), ``lockstep`` (one client, one command at a time: the per-message path of
benchmark 1 without QEMU), ``fanout`` (benchmark 4: events flooded to 100 clients).  Needs
``pip install py-spy``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

try:
    from bench import harness
    from bench.fanout import fan_out
except ModuleNotFoundError as exc:  # run as a file: see bench/__init__.py
    if __package__ or exc.name not in ("bench", "tests"):
        raise
    os.chdir(Path(__file__).resolve().parent.parent)
    os.execv(sys.executable, [sys.executable, "-m", "bench.hotspots", *sys.argv[1:]])

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def _short(file: str) -> str:
    for marker in ("/proxy/", "/site-packages/", "/lib/python3"):
        if marker in file:
            return file[file.index(marker) + 1 :]
    return file


async def _load(listen: Path, scenario: str, until: float) -> int:
    done = 0
    while time.monotonic() < until:
        if scenario == "fanout":
            load = await fan_out(listen, 100, 3000, 0, {})
        elif scenario == "lockstep":
            load = await harness.pipelined(listen, 1, 3000, 1, {})
        else:
            load = await harness.pipelined(listen, 8, 20000, 16, {})
        done += load.units
    return done


def summarize(raw: Path, top: int) -> None:
    self_counts: collections.Counter[str] = collections.Counter()
    incl_counts: collections.Counter[str] = collections.Counter()
    modules: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        frames = []
        for frame in stack.split(";"):
            m = _FRAME.match(frame)
            if m is not None and m["file"].endswith(".py"):
                frames.append((m["func"], _short(m["file"])))
        if not frames:
            continue
        total += count
        func, file = frames[-1]
        self_counts[f"{func} ({file})"] += count
        modules[file] += count
        for name in {f"{f} ({fl})" for f, fl in frames}:
            incl_counts[name] += count
    if not total:
        print("no samples")
        return
    for title, counter in (("self", self_counts), ("inclusive", incl_counts)):
        print(f"\ntop {top} by {title} samples ({total} samples on CPU)")
        for name, n in counter.most_common(top):
            print(f"  {n / total:6.1%}  {name}")
    print(f"\nself samples by module ({total})")
    for name, n in modules.most_common(top):
        print(f"  {n / total:6.1%}  {name}")


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description="py-spy profile of the proxy under load")
    p.add_argument(
        "scenario", nargs="?", default="pipelined", choices=["pipelined", "lockstep", "fanout"]
    )
    p.add_argument("--seconds", type=float, default=6.0)
    p.add_argument("--top", type=int, default=18)
    p.add_argument(
        "--blocking",
        action="store_true",
        help="pause the proxy for each sample (exact stacks, some overhead)",
    )
    args = p.parse_args(argv)
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        print("profile: py-spy not found (pip install py-spy)", file=sys.stderr)
        return 2
    with contextlib.ExitStack() as stack:
        env = harness.Env(stack)
        fake_sock = env.path("fake")
        env.fake(fake_sock, schema=False)
        with env.proxy(str(fake_sock), "--max-sessions", "256") as (proxy, listen):
            raw = env.work / "pyspy.txt"
            argv = [
                spy,
                "record",
                "--pid",
                str(proxy.pid),
                "--format",
                "raw",
                "--rate",
                "1000",
                "--duration",
                str(int(args.seconds)),
                "-o",
                str(raw),
            ]
            if not args.blocking:
                argv.append("--nonblocking")
            recorder = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            time.sleep(0.5)  # let py-spy attach
            until = time.monotonic() + args.seconds - 0.5
            done = harness.run_async(_load(listen, args.scenario, until))
            _, err = recorder.communicate(timeout=60)
            if recorder.returncode != 0 or not raw.exists():
                print(f"py-spy failed: {err.decode(errors='replace')}", file=sys.stderr)
                return 1
        print(f"scenario {args.scenario}: {done:,} commands/deliveries while sampling")
        summarize(raw, args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
