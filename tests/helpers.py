"""Small helpers several test modules share (fixtures live in ``conftest.py``)."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import time
from pathlib import Path

from proxy.server import Server
from proxy.upstream import Runstate


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def console_script(name: str = "qmp-proxy") -> Path:
    """The installed console script ``name`` next to this interpreter (fails if it is missing)."""
    path = Path(sys.executable).parent / name
    assert path.is_file() and os.access(path, os.X_OK), (
        f"console script {name!r} not installed next to {sys.executable}: install the package "
        "into this environment (scripts/setup-venv.sh, pip install .) and run pytest with that "
        "environment's python"
    )
    return path


async def wait_route_ready(server: Server, timeout: float = 10.0) -> None:
    """Wait until the server's first route is READY (fails after ``timeout`` seconds)."""
    deadline = time.monotonic() + timeout
    while server.routes[0].state != Runstate.READY:
        assert time.monotonic() < deadline, f"route state {server.routes[0].state}"
        await asyncio.sleep(0.01)
