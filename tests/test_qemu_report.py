"""QEMU's side of a failure, and QEMU's start-up race: tests of the test helpers.

A failing test's report must carry the command line and stderr of each QEMU it had, stopped or
still running, and of no other (tests/conftest.py, ``pytest_runtest_logreport``).  That is
checked on real pytest output: a small test file run by pytest in a subprocess, with this
suite's conftest loaded as a plugin, against real QEMU 7.2, whose stderr gets a known line
from the shell of an ``exec:`` migration (QEMU hands it its own stderr).

QemuProcess is QEMU's first QMP client (``wait=on``) and ready once greeted (tests/qemu.py,
``QemuProcess.start``, for QEMU's start-up race that this avoids).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.qemu import QemuProcess, RawQMP

# Real QEMU behind the helpers (the marker selects the tests that need the system).
pytestmark = pytest.mark.qemu

REPO = Path(__file__).resolve().parent.parent

FAILING = '''
import time

import pytest

from tests.qemu import QemuProcess, RawQMP

pytestmark = pytest.mark.qemu  # real QEMU, as the suite's own marking requires


def say(q: QemuProcess, text: str, after: int = 0) -> None:
    """QEMU's stderr gets ``text`` (after ``after`` numbered lines): the exec: migration's
    shell writes it there."""
    uri = f"exec:seq 1 {after} >&2; echo {text} >&2"
    with RawQMP(q.sock_path) as c:
        c.negotiate()
        c.command({"execute": "migrate", "arguments": {"uri": uri}})
    deadline = time.monotonic() + 10
    while text not in q.stderr_text():
        assert time.monotonic() < deadline, q.stderr_text()
        time.sleep(0.01)


def test_passes() -> None:
    with QemuProcess("7.2", "-M", "none", "-name", "passing") as q:
        say(q, "SAID-BY-THE-PASSING-TEST")


def test_fails_after_qemu_stopped() -> None:
    with QemuProcess("7.2", "-M", "none", "-name", "stopped") as q:
        say(q, "SAID-BEFORE-STOPPING")
    raise AssertionError("failed after QEMU stopped")


def test_fails_with_qemu_running() -> None:
    with QemuProcess("7.2", "-M", "none", "-name", "running") as q:
        say(q, "SAID-WHILE-RUNNING", after=1000)
        raise AssertionError("failed with QEMU running")


def test_fails_without_qemu() -> None:
    raise AssertionError("failed without QEMU")
'''


def failure_blocks(output: str) -> dict[str, str]:
    """Each failed test's block of pytest's FAILURES section, by test name."""
    failures = output.split("= FAILURES =", 1)[1].split("short test summary info", 1)[0]
    parts = re.split(r"_{3,} (test_\w+) _{3,}", failures)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def test_a_failing_report_shows_each_of_its_qemus(tmp_path: Path) -> None:
    (tmp_path / "test_tiny.py").write_text(FAILING)
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "tests.conftest",
            "-p",
            "no:cacheprovider",
            "-q",
            str(tmp_path / "test_tiny.py"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    out = run.stdout
    assert run.returncode == 1, out + run.stderr
    assert "1 passed" in out and "3 failed" in out, out
    blocks = failure_blocks(out)
    assert set(blocks) == {
        "test_fails_after_qemu_stopped",
        "test_fails_with_qemu_running",
        "test_fails_without_qemu",
    }, out
    for test, name, said in (
        ("test_fails_after_qemu_stopped", "stopped", "SAID-BEFORE-STOPPING"),
        ("test_fails_with_qemu_running", "running", "SAID-WHILE-RUNNING"),
    ):
        block = blocks[test]
        (section,) = re.findall(r"-+ QEMU stderr: QEMU 7\.2 \(pid \d+\) -+\n(.*)", block, re.S)
        command = section.splitlines()[0]
        assert command.startswith("$ qemu-system-x86_64 -accel tcg "), section
        assert f"-name {name}" in command, section
        assert said in section, section
        assert "SAID-BY-THE-PASSING-TEST" not in block, block
    running = blocks["test_fails_with_qemu_running"]
    assert re.search(r"\(\d+ earlier lines left out\)\n", running), running
    assert "\n1000\nSAID-WHILE-RUNNING\n" in running and "\n1\n" not in running, running
    assert "QEMU stderr" not in blocks["test_fails_without_qemu"], out


@pytest.mark.parametrize("version", ["7.2", "10.0"])
def test_the_helper_is_qemu_s_first_client(version: str) -> None:
    """QEMU accepts the helper itself before its main loop runs (``wait=on``), so no client
    meets QEMU's start-up race (tests/qemu.py, ``QemuProcess.start``); the next is greeted."""
    with QemuProcess(version, "-M", "none") as q, RawQMP(q.sock_path) as c:
        assert "QEMU waiting for connection on" in q.stderr_text(), q.stderr_text()
        assert ",server=on,wait=on" in " ".join(q.argv), q.argv
        assert c.negotiate()["QMP"]["version"]["qemu"]["major"] == int(version.split(".")[0])
