"""Benchmark 1: what the proxy adds to one client's round trip, against what a bare relay adds.

One client, no pipelining: ``query-status`` round trips through each path (direct, socat, the
bare relay of ``bench/relay.py``, the proxy), in interleaved batches in shuffled order, against
real QEMU 7.2 and then the fast fake QEMU.  A path's *added* latency is its median minus the
direct connection's median in the same round, then the median over rounds, so drift between
rounds cancels out.  Target: the proxy adds at most 1.25x what the bare relay adds.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Final

from bench.harness import Env, Plan, Report, log, median, p99, round_trips, table
from tests.qemu import QemuProcess

LATENCY_RATIO_TARGET: Final = 1.25  # proxy's added latency / bare relay's


@contextlib.contextmanager
def pinned(pids: Sequence[int]) -> Iterator[int | None]:
    """Run this process, what it starts meanwhile and every thread of ``pids`` on one CPU.

    A one-client round trip is a chain of wake-ups; left to the scheduler, a chain spread over
    CPUs pays a cross-CPU wake-up per hop, which in a VM (an IPI to a halted vCPU) costs tens of
    microseconds and comes and goes with the rest of the machine's load.  On one CPU every path
    pays only its own work and context switches.  Yields the CPU (None: not pinned).
    """
    allowed = os.sched_getaffinity(0)
    if len(allowed) < 2:
        yield None
        return
    cpu = max(allowed)
    tids = [int(t) for pid in pids for t in os.listdir(f"/proc/{pid}/task")]
    saved = {tid: os.sched_getaffinity(tid) for tid in tids}
    os.sched_setaffinity(0, {cpu})
    for tid in tids:
        os.sched_setaffinity(tid, {cpu})
    try:
        yield cpu
    finally:
        os.sched_setaffinity(0, allowed)
        for tid, mask in saved.items():
            with contextlib.suppress(OSError):
                os.sched_setaffinity(tid, mask)


def latency_table(env: Env, upstream: str, rounds: int, plan: Plan, what: str) -> dict[str, float]:
    """Round trips through each path in interleaved rounds; prints the table, returns each
    path's added latency over direct (us)."""
    fixed = {"direct": Path(upstream), "socat": env.socat(upstream)[1],
             "relay": env.relay(upstream)[1]}  # fmt: skip
    paths = ["direct", "socat", "relay", "proxy"]
    batches: list[dict[str, list[float]]] = []
    rng = random.Random(5)
    for r in range(rounds):
        log(f"latency against {what}: round {r + 1}/{rounds}")
        order = paths[:]
        rng.shuffle(order)
        batch: dict[str, list[float]] = {}
        for p in order:
            if p == "proxy":
                with env.proxy(upstream) as (_, listen):
                    batch[p] = round_trips(listen, plan.latency_samples, plan.latency_warmup)
            else:
                batch[p] = round_trips(fixed[p], plan.latency_samples, plan.latency_warmup)
        batches.append(batch)
    pooled = {p: [x for b in batches for x in b[p]] for p in paths}
    med = {p: median(pooled[p]) for p in paths}
    tail = {p: p99(pooled[p]) for p in paths}
    # Added latency is paired by round (a path's median minus direct's median in the same round),
    # then the median over rounds: drift between rounds cancels out.
    added = {p: median([median(b[p]) - median(b["direct"]) for b in batches]) for p in paths}
    added99 = {p: tail[p] - tail["direct"] for p in paths}
    rows = [[p, med[p], tail[p], added[p] if p != "direct" else None,
             added99[p] if p != "direct" else None, ratio(added, p, "relay"),
             ratio(added, p, "socat")] for p in paths]  # fmt: skip
    table(f"1. query-status round trip against {what}, one client, no pipelining "
          f"({rounds} interleaved rounds x {plan.latency_samples} per path, us)",
          ["path", "median", "p99", "added", "added p99", "x relay's", "x socat's"],
          rows)  # fmt: skip
    print(f"  proxy adds {added['proxy']:.1f} us; bare Python relay adds {added['relay']:.1f} us;"
          f" socat adds {added['socat']:.1f} us")  # fmt: skip
    return added


def ratio(added: dict[str, float], p: str, base: str) -> float | None:
    # Below 2 us the base is within noise and a ratio to it means nothing.
    return added[p] / added[base] if p != "direct" and added[base] >= 2.0 else None


def measure(env: Env, qemu: QemuProcess, plan: Plan, rep: Report) -> None:
    with pinned([qemu.pid]) if plan.latency_pin else contextlib.nullcontext(None) as cpu:
        real = latency_table(env, qemu.sock_path, plan.latency_rounds, plan, "real QEMU 7.2")
        fake_sock = env.path("fake-lat")
        env.fake(fake_sock)
        fake = latency_table(env, str(fake_sock), max(4, plan.latency_rounds // 2), plan,
                             "the fast fake QEMU")  # fmt: skip
    print(
        "  added: median over rounds of (path's median - direct's median in the same round);"
        " '-': base within noise; the fake answers at once, so QEMU's own jitter is absent"
    )
    if cpu is not None:
        print(f"  every process of these paths (client, relays, proxy, QEMU's threads) ran on CPU "
              f"{cpu}; --no-pin lets the scheduler place them")  # fmt: skip
    else:
        print("  not pinned: processes ran wherever the scheduler put them")
    vs_relay, vs_socat = ratio(real, "proxy", "relay"), ratio(real, "proxy", "socat")
    fake_vs_relay = ratio(fake, "proxy", "relay")

    def shown(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.2f}x"

    rep.add(
        "1. latency: proxy added / relay added",
        f"<= {LATENCY_RATIO_TARGET}",
        f"{shown(vs_relay)} (vs socat {shown(vs_socat)}; fake QEMU: {shown(fake_vs_relay)})",
        vs_relay is not None and vs_relay <= LATENCY_RATIO_TARGET,
    )
