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

# The "qemu" marker (tests that need the system) and the check that no such test lacks it.
pytest_plugins = ["tests.marking"]


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
def qemu72() -> Iterator[QemuProcess]:
    """One stopped, machine-less QEMU 7.2, for tests that need a real QEMU but not every version."""
    with QemuProcess("7.2", "-M", "none") as q:
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


# -- QEMU's side of a failure -------------------------------------------------------------------
# A test that fails with QEMU behind it often fails because of what QEMU did (a refused
# migration, an assertion, a socket it closed), and QEMU says so only on its stderr.  Each
# failing report gets a section per QEMU the test had (started during it, or still running from
# a wider fixture): that QEMU's command line and stderr.  (Imports stay inside the hooks so this
# block stands alone at the end of the file.)


QEMU_STDERR_LINES = 300  # the last lines of each QEMU's stderr a report shows


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Iterator[None]:
    """From here on, the records are this test's QEMUs and the ones still running."""
    from tests import qemu as records

    records.forget_stopped()
    yield


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Before any reporter reads a failed setup, call or teardown: add QEMU's sections."""
    import shlex

    from tests import qemu as records

    if report.failed:
        for entry in records.recorded():
            lines = (entry.stderr() or "(nothing)\n").splitlines(keepends=True)
            if len(lines) > QEMU_STDERR_LINES:  # a traced QEMU writes a line per command
                left_out = f"({len(lines) - QEMU_STDERR_LINES} earlier lines left out)\n"
                lines = [left_out, *lines[-QEMU_STDERR_LINES:]]
            command = f"$ {shlex.join(entry.argv)}\n"
            report.sections.append((f"QEMU stderr: {entry.label}", command + "".join(lines)))
