"""Benchmark 2: CPU per proxied command, against the fast fake QEMU.

The process in the middle (the proxy, the bare relay, socat with its forked children) is
charged its own CPU time over a stretch of pipelined or lockstep commands from 1, 8 and 64
clients; the fake answers at once, so the proxy, not QEMU, is the bottleneck.  Target: at most
30 us per command.
"""

from __future__ import annotations

from typing import Final

from bench.harness import Env, Load, Plan, Report, log, median, pipelined, run_async, table
from tests.qemu import QemuProcess

CPU_TARGET_US: Final = 30.0  # per proxied command, on one core


def measure(env: Env, qemu: QemuProcess, plan: Plan, rep: Report) -> None:
    # One fake process, two sockets: the proxy holds one, the relays use the other.
    fake_sock, fake_sock2 = env.path("fake-cpu"), env.path("fake-cpu")
    fake = env.fake(fake_sock, fake_sock2)
    relay, socat = env.relay(str(fake_sock2)), env.socat(str(fake_sock2))
    cases = [
        ("relay", 1, 16),
        ("socat", 1, 16),
        ("proxy", 1, 16),
        ("proxy", 8, 16),
        ("proxy", 64, 16),
        ("relay", 1, 1),
        ("socat", 1, 1),
        ("proxy", 1, 1),
    ]
    results: dict[tuple[str, int, int], list[Load]] = {}
    with env.proxy(str(fake_sock), "--max-sessions", "256") as proxy:
        middles = {"relay": relay, "socat": socat, "proxy": proxy}
        for path, clients, window in cases:
            child, listen = middles[path]
            pids = {"middle": child.pid, "fake": fake.pid}
            total = plan.cpu_commands if window > 1 else plan.cpu_commands // 4
            for i in range(plan.cpu_repeats):
                log(f"cpu: {path}, {clients} clients, window {window}, {i + 1}/{plan.cpu_repeats}")
                load = run_async(pipelined(listen, clients, total, window, pids))
                results.setdefault((path, clients, window), []).append(load)
    rows: list[list[object]] = []
    worst = 0.0
    for key in cases:
        path, clients, window = key
        loads = results[key]
        us = median([x.us_per_unit("middle") for x in loads])
        floor = median([x.us_per_unit("middle") for x in results[("relay", 1, window)]])
        if path == "proxy" and window > 1:
            worst = max(worst, us)
        mode = f"pipelined, window {window}" if window > 1 else "lockstep"
        rows.append(
            [
                path,
                clients,
                mode,
                us,
                us / floor,
                median([x.cpu["middle"] / x.wall * 100 for x in loads]),
                median([x.rate for x in loads]),
                median([x.us_per_unit("fake") for x in loads]),
                median([x.us_per_unit("load generator") for x in loads]),
            ]
        )
    table(
        "2. CPU per command of the process in the middle, against the fast fake QEMU "
        f"(median of {plan.cpu_repeats} x {plan.cpu_commands:,} commands; lockstep: a quarter)",
        [
            "path",
            "clients",
            "mode",
            "us/cmd",
            "x relay's",
            "CPU %",
            "cmds/s",
            "fake us/cmd",
            "loadgen us/cmd",
        ],
        rows,
    )
    print(
        "  x relay's: over the bare Python relay with one client in the same mode (the relay "
        "and socat serve one client per QEMU)"
    )
    rep.add(
        "2. CPU per command (1/8/64 clients, worst)",
        f"<= {CPU_TARGET_US:.0f} us",
        f"{worst:.1f} us",
        worst <= CPU_TARGET_US,
    )
