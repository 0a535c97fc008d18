"""Benchmark 1: what the proxy adds to one client's round trip, against what a bare relay adds.

One client, no pipelining: ``query-status`` round trips through each path (direct, socat, the
bare relay of ``bench/relay.py``, the proxy) against real QEMU 7.2, and then against the fast
fake QEMU.  A path's *added* latency is its median minus the direct connection's median in the
same round, then the median over rounds, so drift between rounds cancels out.  Target: the proxy
adds at most 1.25x what the bare relay adds.

Two placements, measured in the same rounds (each round runs both, in shuffled order, and every
path in shuffled order within each):

* **unpinned**, the headline: processes run where the scheduler puts them, as deployed.  A
  round trip is then a chain of wake-ups that may cross CPUs, and in a VM a cross-CPU wake-up
  (an IPI to a halted vCPU) costs tens of microseconds that come and go with the machine's
  other load, so this figure is the one that counts and also the noisier one;
* **pinned**: this process, QEMU's threads, socat, the relay and the proxy all on one CPU.
  Every path pays only its own work and context switches: a steadier figure for comparing
  changes to the proxy, not what a deployment sees.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Final

from bench.harness import Env, Plan, Report, log, median, p99, round_trips, table, tree
from tests.qemu import QemuProcess

LATENCY_RATIO_TARGET: Final = 1.25  # proxy's added latency / bare relay's, unpinned
PATHS: Final = ("direct", "socat", "relay", "proxy")
UNPINNED: Final = "unpinned"
PINNED: Final = "pinned"


def pin_cpu() -> int | None:
    """The CPU the pinned placement uses, or None when there is only one to run on."""
    allowed = os.sched_getaffinity(0)
    return max(allowed) if len(allowed) >= 2 else None


@contextlib.contextmanager
def pinned(pids: Sequence[int], cpu: int) -> Iterator[None]:
    """Run this process, what it starts meanwhile, and every thread of ``pids`` and of their
    descendants, on ``cpu``; put back each one's affinity after."""
    allowed = os.sched_getaffinity(0)
    tids: list[int] = []
    for pid in pids:
        for p in tree(pid):
            with contextlib.suppress(OSError):
                tids += (int(t) for t in os.listdir(f"/proc/{p}/task"))
    saved: dict[int, set[int]] = {}
    for tid in tids:
        with contextlib.suppress(OSError):
            saved[tid] = os.sched_getaffinity(tid)
    os.sched_setaffinity(0, {cpu})
    for tid in saved:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(tid, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, allowed)
        for tid, mask in saved.items():
            with contextlib.suppress(OSError):
                os.sched_setaffinity(tid, mask)


Batches = list[dict[str, list[float]]]  # per round: path -> round trips (us)


def run_rounds(
    env: Env,
    upstream: str,
    server_pid: int,
    rounds: int,
    plan: Plan,
    what: str,
    modes: Sequence[str],
    cpu: int | None,
) -> dict[str, Batches]:
    """Round trips through each path in each placement, interleaved round by round."""
    socat, socat_path = env.socat(upstream)
    relay, relay_path = env.relay(upstream)
    fixed = {"direct": Path(upstream), "socat": socat_path, "relay": relay_path}
    long_lived = [server_pid, socat.pid, relay.pid]
    out: dict[str, Batches] = {m: [] for m in modes}
    rng = random.Random(5)
    for r in range(rounds):
        log(f"latency against {what}: round {r + 1}/{rounds}")
        for mode in rng.sample(list(modes), len(modes)):
            batch: dict[str, list[float]] = {}
            with (
                pinned(long_lived, cpu)
                if mode == PINNED and cpu is not None
                else contextlib.nullcontext()
            ):
                for p in rng.sample(PATHS, len(PATHS)):
                    if p == "proxy":  # started (on the pinned CPU, if pinned) for its batch only
                        with env.proxy(upstream) as (_, listen):
                            batch[p] = round_trips(
                                listen, plan.latency_samples, plan.latency_warmup
                            )
                    else:
                        batch[p] = round_trips(fixed[p], plan.latency_samples, plan.latency_warmup)
            out[mode].append(batch)
    return out


def added_latency(batches: Batches) -> dict[str, float]:
    """Each path's added latency over direct (us): paired by round, then the median of rounds."""
    return {p: median([median(b[p]) - median(b["direct"]) for b in batches]) for p in PATHS}


def ratio(added: dict[str, float], p: str, base: str) -> float | None:
    # Below 2 us the base is within noise and a ratio to it means nothing.
    return added[p] / added[base] if p != "direct" and added[base] >= 2.0 else None


def round_ratios(batches: Batches) -> list[float]:
    """proxy added / relay added in each round where the relay's added latency is not noise."""
    out = []
    for b in batches:
        direct = median(b["direct"])
        relay = median(b["relay"]) - direct
        if relay >= 2.0:
            out.append((median(b["proxy"]) - direct) / relay)
    return out


def shown(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}x"


def report_table(by_mode: dict[str, Batches], plan: Plan, what: str) -> dict[str, dict[str, float]]:
    """Prints one table for all placements; returns each placement's added latencies."""
    rows: list[list[object]] = []
    added_by_mode: dict[str, dict[str, float]] = {}
    for mode, batches in by_mode.items():
        pooled = {p: [x for b in batches for x in b[p]] for p in PATHS}
        med = {p: median(pooled[p]) for p in PATHS}
        tail = {p: p99(pooled[p]) for p in PATHS}
        added = added_by_mode[mode] = added_latency(batches)
        for p in PATHS:
            other = p != "direct"
            rows.append(
                [
                    mode if p == "direct" else "",
                    p,
                    med[p],
                    tail[p],
                    added[p] if other else None,
                    tail[p] - tail["direct"] if other else None,
                    ratio(added, p, "relay"),
                    ratio(added, p, "socat"),
                ]
            )
    rounds = len(next(iter(by_mode.values())))
    table(
        f"1. query-status round trip against {what}, one client, no pipelining "
        f"({rounds} rounds, each running every placement and path in shuffled order, "
        f"{plan.latency_samples} round trips per batch; us)",
        ["placement", "path", "median", "p99", "added", "added p99", "x relay's", "x socat's"],
        rows,
    )
    for mode, added in added_by_mode.items():
        spread = round_ratios(by_mode[mode])
        quartiles = (
            "; per-round proxy/relay quartiles "
            + " / ".join(f"{q:.2f}" for q in _quartiles(spread))
            + f" ({len(spread)} rounds)"
            if len(spread) >= 4
            else ""
        )
        print(
            f"  {mode}: proxy adds {added['proxy']:.1f} us, bare relay {added['relay']:.1f}, "
            f"socat {added['socat']:.1f}: proxy/relay {shown(ratio(added, 'proxy', 'relay'))}"
            f"{quartiles}"
        )
    return added_by_mode


def _quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    ordered = sorted(values)
    n = len(ordered) - 1
    return ordered[round(n / 4)], median(ordered), ordered[round(3 * n / 4)]


def measure(env: Env, qemu: QemuProcess, plan: Plan, rep: Report) -> None:
    cpu = pin_cpu() if plan.latency_pinned else None
    modes = (UNPINNED, PINNED) if cpu is not None else (UNPINNED,)
    real_runs = run_rounds(
        env, qemu.sock_path, qemu.pid, plan.latency_rounds, plan, "real QEMU 7.2", modes, cpu
    )
    real = report_table(real_runs, plan, "real QEMU 7.2")
    fake_sock = env.path("fake-lat")
    fake_child = env.fake(fake_sock)
    fake_runs = run_rounds(
        env,
        str(fake_sock),
        fake_child.pid,
        max(4, plan.latency_rounds // 2),
        plan,
        "the fast fake QEMU",
        modes,
        cpu,
    )
    fake = report_table(fake_runs, plan, "the fast fake QEMU")
    print(
        "  added: median over rounds of (path's median - direct's median in the same round);"
        " '-': base within noise; the fake answers at once, so QEMU's own jitter is absent"
    )
    print("  unpinned (the headline): every process runs where the scheduler puts it, as deployed")
    if cpu is not None:
        print(
            f"  pinned: this client, QEMU's threads (or the fake), socat, the relay and the "
            f"proxy all on CPU {cpu}: steadier, no cross-CPU wake-ups"
        )
    elif plan.latency_pinned:
        print("  pinned: not run, this process may use only one CPU")
    else:
        print("  pinned: not run (--no-pin)")

    def measured(mode: str) -> tuple[float | None, str]:
        vs_relay = ratio(real[mode], "proxy", "relay")
        return vs_relay, (
            f"{shown(vs_relay)} ({real[mode]['proxy']:.1f} vs {real[mode]['relay']:.1f} us; "
            f"vs socat {shown(ratio(real[mode], 'proxy', 'socat'))}; "
            f"fake QEMU: {shown(ratio(fake[mode], 'proxy', 'relay'))})"
        )

    vs_relay, text = measured(UNPINNED)
    rep.add(
        "1. latency, unpinned: proxy added / relay added",
        f"<= {LATENCY_RATIO_TARGET}",
        text,
        vs_relay is not None and vs_relay <= LATENCY_RATIO_TARGET,
    )
    if PINNED in real:
        rep.add(
            "1. latency, pinned to one CPU (steadier)", "figures only", measured(PINNED)[1], None
        )
