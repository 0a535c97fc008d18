"""Shared fixtures: real QEMU of each version, and the proxy in front of it."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator, Generator, Iterator
from pathlib import Path

import pytest

from tests.libvirt_env import FAILURE_REPORT
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


# -- tests/test_libvirt.py --------------------------------------------------------------------


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "libvirt: drives a real libvirtd (scripts/install-libvirt.sh; root)"
    )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A failing libvirt test's report carries libvirtd's log and the domain logs: what the
    daemon and QEMU said is most of what explains a failure there."""
    report = yield
    logs = item.stash.get(FAILURE_REPORT, None)
    if report.failed and logs is not None:
        report.sections.append(("libvirt logs", logs()))
    return report
