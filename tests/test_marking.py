"""The ``qemu`` marker's check (``tests/marking.py``): a test that starts a system program
without the marker fails, however it starts it.

A throw-away test file runs in a pytest of its own with the check loaded.  Its "QEMU" is a
script named like QEMU that would only exit: the check stops it before it runs.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.proxyproc import REPO

CASES = """
import subprocess

import pytest

FAKE = {fake!r}


def start() -> None:
    subprocess.run([FAKE], check=True)


def test_unmarked_starts_qemu() -> None:
    start()


def test_unmarked_swallows_the_error() -> None:
    try:
        start()
    except Exception:
        pass


@pytest.mark.qemu
def test_marked_starts_qemu() -> None:
    start()


@pytest.fixture
def unmarked_fixture() -> None:
    start()


def test_unmarked_through_a_fixture(unmarked_fixture: None) -> None:
    pass


@pytest.fixture(scope="module")
def shared() -> None:
    start()


@pytest.mark.qemu
def test_marked_with_an_unlisted_module_fixture(shared: None) -> None:
    pass


@pytest.fixture
def qemu72() -> None:  # a name tests/marking.py lists: its users are marked
    start()


def test_listed_fixture(qemu72: None) -> None:
    pass


@pytest.mark.libvirt  # a marker that says "the system" too
def test_libvirt_marked() -> None:
    start()


def test_pure() -> None:
    subprocess.run([{python!r}, "-c", "pass"], check=True)
"""

# A module marked as a whole may share a QEMU between its tests through any fixture.
WHOLE = """
import subprocess

import pytest

pytestmark = pytest.mark.qemu


@pytest.fixture(scope="module")
def shared() -> None:
    subprocess.run([{fake!r}], check=True)


def test_whole_first(shared: None) -> None:
    pass


def test_whole_second(shared: None) -> None:
    pass
"""

EXPECTED = {
    "test_unmarked_starts_qemu": "failed",
    "test_unmarked_swallows_the_error": "failed",
    "test_marked_starts_qemu": "passed",
    "test_unmarked_through_a_fixture": "error",
    "test_marked_with_an_unlisted_module_fixture": "error",
    "test_listed_fixture": "passed",
    "test_libvirt_marked": "passed",
    "test_pure": "passed",
    "test_whole_first": "passed",
    "test_whole_second": "passed",
}


# A pytest of its own, with the check loaded and the marker registered as pyproject.toml does.
PYTEST = [sys.executable, "-m", "pytest", "-p", "tests.marking", "-p", "no:cacheprovider"]
OPTIONS = ["-o", "markers=qemu: the system\nlibvirt: libvirtd", "--strict-markers", "-rA", "-q"]


def run(tmp_path: Path, *args: str) -> str:
    argv = [*PYTEST, *OPTIONS, *args, str(tmp_path)]
    result = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120)
    return result.stdout + result.stderr


def test_a_test_that_starts_qemu_without_the_marker_fails(tmp_path: Path) -> None:
    fake = tmp_path / "qemu-system-x86_64"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    (tmp_path / "test_cases.py").write_text(CASES.format(fake=str(fake), python=sys.executable))
    (tmp_path / "test_whole.py").write_text(WHOLE.format(fake=str(fake)))
    out = run(tmp_path)
    outcomes = {
        m.group(2): m.group(1).lower()
        for m in re.finditer(r"^(PASSED|FAILED|ERROR) \S+::(\w+)", out, re.M)
    }
    assert outcomes == EXPECTED, out
    assert "test_unmarked_starts_qemu started qemu-system-x86_64 but has no 'qemu' marker" in out
    assert "module-scoped fixture 'shared' started qemu-system-x86_64" in out
    # The listed fixture marked its user: -m "not qemu" leaves it out (-m qemu is the rest).
    pure = run(tmp_path, "--co", "-m", "not qemu")
    assert "test_listed_fixture" not in pure and "test_pure" in pure, pure
    assert "test_libvirt_marked" not in pure and "test_whole" not in pure, pure
