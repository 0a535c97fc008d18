"""Run the proxy for tests: in-process (fast, inspectable) or as a real ``qmp-proxy`` process.

In-process runs share the test's event loop with the clients, which is what most tests want:
no start-up cost and direct access to the route's state.  Tests of the command line, signals and
logs run the real entry point in a subprocess, exactly as an operator would.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from proxy import address
from proxy.config import Config, Limits, ListenConfig, RouteConfig
from proxy.route import Route
from proxy.server import Server
from proxy.upstream import Runstate

REPO = Path(__file__).resolve().parent.parent


class InProcessProxy:
    def __init__(self, server: Server, listen: list[str]) -> None:
        self.server = server
        self.listen = listen

    @property
    def sock(self) -> str:
        return self.listen[0]

    @property
    def route(self) -> Route:
        return self.server.routes[0]

    async def wait_ready(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while self.route.state != Runstate.READY:
            if time.monotonic() > deadline:
                raise TimeoutError(f"route not ready, state {self.route.state}")
            await asyncio.sleep(0.01)

    async def wait_state(self, state: Runstate, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while self.route.state != state:
            if time.monotonic() > deadline:
                raise TimeoutError(f"route state {self.route.state}, wanted {state}")
            await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def in_process(
    upstream: str, tmp_path: Path, *, listeners: int = 1, ready: bool = True, **limits: Any
) -> AsyncIterator[InProcessProxy]:
    """Serve ``upstream`` on fresh unix sockets in ``tmp_path`` from this event loop."""
    listen = [str(tmp_path / f"proxy{i}.sock") for i in range(listeners)]
    listens = tuple(ListenConfig(address.parse(p)) for p in listen)
    route = RouteConfig("vm", address.parse(upstream), listens)
    config = Config((route,), replace(Limits(), **limits), "debug", state_dir=tmp_path)
    server = Server(config, asyncio.get_running_loop())
    server.start()
    proxy = InProcessProxy(server, listen)
    try:
        if ready:
            await proxy.wait_ready()
        yield proxy
    finally:
        await server.stop()


class ProxyProcess:
    """``python -m proxy ARGS`` with stderr captured, for CLI, log and signal tests."""

    def __init__(self, *args: str, tmp_path: Path) -> None:
        self.args = args
        self.log_path = tmp_path / f"proxy-{os.getpid()}-{time.monotonic_ns()}.log"
        self._log = self.log_path.open("wb")
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "proxy", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._log,
            env=env,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, needle: str, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while needle not in (text := self.log()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{needle!r} not logged (rc={self.proc.poll()}):\n{text}")
            time.sleep(0.02)
        return text

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self._log.close()

    def __enter__(self) -> ProxyProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
