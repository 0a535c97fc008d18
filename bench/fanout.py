"""Benchmark 4: event fan-out from the fast fake QEMU to 1, 10 and 100 negotiated clients.

The fake emits events as fast as the proxy reads them (flood), and then at a fixed rate; the
figures are deliveries per second and the CPU of the process in the middle per event per client.
Figures only, no target.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson

from bench.harness import Env, Load, Plan, Report, log, measured, open_clients, run_async, table
from tests.qemu import QemuProcess


async def fan_out(
    listen: Path, clients: int, count: int, rate: float, pids: dict[str, int]
) -> Load:
    conns = await open_clients(listen, clients)
    try:
        for c in conns:
            c.expect(count)
        conns[0].expect(count + 1)  # the trigger's own reply, then the events
        emit = orjson.dumps(
            {"execute": "x-bench-emit", "arguments": {"count": count, "rate": rate}}
        )

        def start() -> list[asyncio.Future[None]]:
            assert conns[0].transport is not None
            conns[0].transport.write(emit)
            return [c.done for c in conns]

        return await measured(pids, start, count * clients)
    finally:
        for c in conns:
            c.close()


def measure(env: Env, qemu: QemuProcess, plan: Plan, rep: Report) -> None:
    fake_sock, fake_sock2 = env.path("fake-fan"), env.path("fake-fan")
    fake = env.fake(fake_sock, fake_sock2)
    relay, socat = env.relay(str(fake_sock2)), env.socat(str(fake_sock2))
    rows: list[list[object]] = []
    paced_count = int(plan.fan_rate * plan.fan_seconds)
    with env.proxy(str(fake_sock), "--max-sessions", "256") as proxy:
        cases = [
            ("relay", relay, 1),
            ("socat", socat, 1),
            ("proxy", proxy, 1),
            ("proxy", proxy, 10),
            ("proxy", proxy, 100),
        ]
        for path, (child, listen), clients in cases:
            pids = {"middle": child.pid, "fake": fake.pid}
            run_async(fan_out(listen, clients, 2000, 0, pids))  # warm-up
            count = max(2000, plan.fan_deliveries // clients)
            log(f"fan-out: {path}, {clients} clients, {count:,} events as fast as possible")
            flood: Load = run_async(fan_out(listen, clients, count, 0, pids))
            log(f"fan-out: {path}, {clients} clients, {paced_count:,} events at {plan.fan_rate}/s")
            paced: Load = run_async(fan_out(listen, clients, paced_count, plan.fan_rate, pids))
            rows.append(
                [
                    path,
                    clients,
                    count / flood.wall,
                    flood.rate,
                    flood.us_per_unit("middle"),
                    paced.us_per_unit("middle"),
                    paced.cpu["middle"] / paced.wall * 100,
                ]
            )
    table(
        "4. Event fan-out from the fast fake QEMU to negotiated clients (CPU of the process in "
        "the middle)",
        [
            "path",
            "clients",
            "events/s (flood)",
            "deliveries/s",
            "us/event/client (flood)",
            f"us/event/client @{plan.fan_rate}/s",
            f"CPU % @{plan.fan_rate}/s",
        ],
        rows,
    )
    print(
        "  flood: the fake writes events as fast as the proxy reads them; events/s is what every "
        "client received per second"
    )
    last = rows[-1]
    rep.add(
        "4. event fan-out, 100 clients",
        "figures only",
        f"{last[2]:,.0f} events/s, {last[4]:.2f} us/event/client flood, "
        f"{last[5]:.2f} at {plan.fan_rate}/s",
        None,
    )
