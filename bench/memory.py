"""Benchmark 5: memory (VmRSS of the proxy) per idle session and per idle route.

Against the fast fake QEMU: 100, 1,000 and 3,000 negotiated idle sessions on one route, then 1 and
50 routes whose fakes serve QEMU 7.2's own ``query-qmp-schema`` (207 KB) or a small one.
Targets: at most 40 KiB per session and 300 KiB per route beyond the first.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from bench.harness import (
    Env,
    LoadClient,
    Plan,
    Report,
    log,
    open_clients,
    rss_kib,
    run_async,
    settled_rss,
    table,
)
from tests.qemu import QemuProcess

SESSION_TARGET_KIB: Final = 40.0
ROUTE_TARGET_KIB: Final = 300.0


async def hold_sessions(listen: Path, pid: int, steps: Sequence[int]) -> list[tuple[int, int]]:
    """RSS with 0 and then each cumulative number of idle, negotiated sessions."""
    held: list[LoadClient] = []
    await asyncio.sleep(0.5)
    out = [(0, rss_kib(pid))]
    try:
        for target in steps:
            held += await open_clients(listen, target - len(held))
            await asyncio.sleep(0.5)
            out.append((target, rss_kib(pid)))
    finally:
        for c in held:
            c.close()
    return out


def route_rss(env: Env, upstreams: list[Path], listens: list[Path], n: int) -> int:
    """RSS of a proxy serving the first ``n`` routes, once all of them greet clients."""
    toml = "\n".join(
        f'[[route]]\nname = "vm{i}"\nupstream = "unix:{upstreams[i]}"\n'
        f'listen = ["unix:{listens[i]}"]\n'
        for i in range(n)
    )
    with env.proxy_config(toml, listens[:n]) as proxy:
        return settled_rss(proxy.pid, 0.5)


def measure(env: Env, qemu: QemuProcess, plan: Plan, rep: Report) -> None:
    fake_sock = env.path("fake-mem")
    env.fake(fake_sock)
    steps = [100, 1000, 3000]  # 3000: the slope once free memory from start-up is used up
    with env.proxy(str(fake_sock), "--max-sessions", str(steps[-1] + 100)) as (proxy, listen):
        log("memory: idle sessions")
        points: list[tuple[int, int]] = run_async(hold_sessions(listen, proxy.pid, steps))
    rss0 = points[0][1]
    rows: list[list[object]] = []
    for i, (n, kib) in enumerate(points):
        marginal = (kib - points[i - 1][1]) / (n - points[i - 1][0]) if i else None
        rows.append([f"{n:,} idle sessions", kib / 1024, (kib - rss0) / n if n else None, marginal])
    at = dict(points)
    per_session = max((at[1000] - rss0) / 1000, (at[3000] - at[1000]) / 2000)

    routes = 50
    per_route: dict[str, float] = {}
    for kind in ("QEMU 7.2's schema", "small schema"):
        log(f"memory: 1 and {routes} routes, {kind}")
        upstreams = [env.path("fake-route") for _ in range(routes)]
        env.fake(*upstreams, schema=kind != "small schema")
        listens = [env.path("route") for _ in range(routes)]
        one, many = (route_rss(env, upstreams, listens, n) for n in (1, routes))
        per_route[kind] = (many - one) / (routes - 1)
        rows.append([f"1 route, {kind}", one / 1024, None, None])
        rows.append([f"{routes} routes, {kind}", many / 1024, per_route[kind], None])
    table(
        "5. Memory (VmRSS of the proxy) against the fake QEMU; sessions are negotiated and "
        "idle; a route's fake serves QEMU 7.2's own query-qmp-schema (207 KB) or a small one",
        ["state", "RSS MiB", "KiB each", "KiB each, marginal"],
        rows,
    )
    print("  KiB each: over 0 sessions, or over 1 route; marginal: over the row above")
    rep.add(
        "5. memory per idle session",
        f"<= {SESSION_TARGET_KIB:.0f} KiB",
        f"{per_session:.1f} KiB (worst of 0-1000 avg, 1000-3000 slope)",
        per_session <= SESSION_TARGET_KIB,
    )
    real = per_route["QEMU 7.2's schema"]
    rep.add(
        "5. memory per idle route beyond the first",
        f"<= {ROUTE_TARGET_KIB:.0f} KiB",
        f"{real:,.0f} KiB (small schema: {per_route['small schema']:.0f} KiB)",
        real <= ROUTE_TARGET_KIB,
    )
