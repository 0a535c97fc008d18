"""Benchmark 6: ``migrate`` with capabilities, split by the proxy, against real QEMU 7.2.

Time to the reply of a ``migrate`` that carries ``capabilities`` (the proxy splits it into
``migrate-set-capabilities`` and ``migrate``, with its journal in between) against the client
sending both commands itself, through the proxy and directly.  Figures only, no target.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Final

from bench.harness import Env, LineClient, Plan, Report, log, median, p99, table
from tests.qemu import QemuProcess

MIGRATE_URI: Final = "exec:cat > /dev/null"
MIGRATE_CAPS: Final = [{"capability": "events", "state": True}]


def settle_migration(c: LineClient) -> None:
    """Wait for the last migration to end and resume the VM (QEMU refuses to migrate a VM
    paused by a finished migration); untimed."""
    deadline = time.monotonic() + 10
    while c.call("query-migrate").get("status") not in (None, "completed", "failed"):
        if time.monotonic() > deadline:
            raise TimeoutError("migration did not finish")
        time.sleep(0.0005)
    if c.call("query-status")["status"] == "postmigrate":
        c.call("cont")


class StillCleaningUp(RuntimeError):
    """QEMU reports a migration completed slightly before it has unregistered it (its yank
    instance); a migrate in that window fails with "duplicate yank instance"."""


def timed_migrate(c: LineClient, split: bool) -> float:
    """Microseconds until the reply to a migrate that starts a migration; a sample that hits
    QEMU's clean-up window is discarded and taken again."""
    for _ in range(50):
        settle_migration(c)
        t0 = time.perf_counter_ns()
        try:
            if split:
                c.call("migrate", {"uri": MIGRATE_URI, "capabilities": MIGRATE_CAPS})
            else:
                c.call("migrate-set-capabilities", {"capabilities": MIGRATE_CAPS})
                c.call("migrate", {"uri": MIGRATE_URI})
        except RuntimeError as exc:
            # Both come from QEMU finishing its clean-up just after it reported "completed":
            # the yank instance is still registered, or the VM only now becomes postmigrate.
            if not any(t in str(exc) for t in ("duplicate yank instance", "paused due to")):
                raise
            time.sleep(0.005)
            continue
        return (time.perf_counter_ns() - t0) / 1000
    raise StillCleaningUp("QEMU kept refusing to start a migration (duplicate yank instance)")


def measure(env: Env, qemu: QemuProcess, plan: Plan, rep: Report) -> None:
    upstream = qemu.sock_path
    times: dict[str, list[float]] = {"split": [], "two": [], "direct": []}
    for r in range(plan.migrate_rounds):
        log(f"migrate round {r + 1}/{plan.migrate_rounds}")
        with env.proxy(upstream) as (_, listen), LineClient(listen) as c:
            c.negotiate()
            timed_migrate(c, True)  # warm-up: the first migration sets QEMU up
            for i in range(plan.migrate_samples):
                for split in (True, False) if i % 2 else (False, True):
                    times["split" if split else "two"].append(timed_migrate(c, split))
            settle_migration(c)
        with LineClient(Path(upstream)) as c:
            c.negotiate()
            for _ in range(plan.migrate_samples):
                times["direct"].append(timed_migrate(c, False))
            settle_migration(c)
    rows = [
        ["proxy: migrate + capabilities (split)", median(times["split"]), p99(times["split"])],
        ["proxy: migrate-set-capabilities, then migrate", median(times["two"]), p99(times["two"])],
        [
            "direct: migrate-set-capabilities, then migrate",
            median(times["direct"]),
            p99(times["direct"]),
        ],
    ]
    ratio = median(times["split"]) / median(times["two"])
    table(
        f"6. migrate with capabilities, real QEMU (-M none, uri {MIGRATE_URI!r}; reply "
        f"received, us; {plan.migrate_rounds} rounds x {plan.migrate_samples} per variant)",
        ["what the client does", "median", "p99"],
        rows,
    )
    print(
        f"  split / two commands through the proxy: {ratio:.2f}x; split / two commands "
        f"direct: {median(times['split']) / median(times['direct']):.2f}x "
        "(the split runs query-migrate-capabilities, query-migrate, a journal write with "
        "fsync, migrate-set-capabilities and migrate)"
    )
    rep.add("6. split migrate / two commands (proxy)", "figures only", f"{ratio:.2f}x", None)
