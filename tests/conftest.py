"""Shared fixtures: real QEMU of each version, and the proxy in front of it."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.proxyproc import InProcessProxy, in_process
from tests.qemu import QemuProcess

VERSIONS = ["5.2", "7.2", "10.0", "11.1"]


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short directory: unix socket paths are limited to 107 bytes, pytest's tmp_path is long."""
    path = Path(tempfile.mkdtemp(prefix="qp-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(params=VERSIONS)
def qemu(request: pytest.FixtureRequest) -> Iterator[QemuProcess]:
    """A stopped (-S), machine-less QEMU of each version; its monitor is the upstream."""
    with QemuProcess(request.param, "-M", "none") as q:
        yield q


@pytest.fixture
async def proxy(qemu: QemuProcess, tmp_path: Path) -> AsyncIterator[InProcessProxy]:
    async with in_process(qemu.sock_path, tmp_path) as p:
        yield p
