"""QEMU's side of a failure, and QEMU's start-up race: tests of the test helpers.

A failing test's report must carry the command line and stderr of each QEMU it had, stopped or
still running, and of no other (tests/conftest.py, ``pytest_runtest_logreport``).  That is
checked on real pytest output: a small test file run by pytest in a subprocess, with this
suite's conftest loaded as a plugin, against real QEMU 7.2, whose stderr gets a known line
from the shell of an ``exec:`` migration (QEMU hands it its own stderr).

QemuProcess's readiness is a greeting, and a QEMU that drops its first client is started again
(tests/qemu.py, ``QemuProcess.start``): checked with a stand-in for QEMU that does what QEMU
10.0 does when it loses its start-up race (closes its listening socket on that client).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests import qemu
from tests.qemu import QemuProcess, QemuRestarted

REPO = Path(__file__).resolve().parent.parent

FAILING = '''
import time

from tests.qemu import QemuProcess, RawQMP


def say(q: QemuProcess, text: str) -> None:
    """QEMU's stderr gets ``text``: the exec: migration's shell writes it there."""
    with RawQMP(q.sock_path) as c:
        c.negotiate()
        c.command({"execute": "migrate", "arguments": {"uri": f"exec:echo {text} >&2"}})
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
        say(q, "SAID-WHILE-RUNNING")
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
        [sys.executable, "-m", "pytest", "-p", "tests.conftest", "-p", "no:cacheprovider",
         "-q", str(tmp_path / "test_tiny.py")],
        cwd=REPO, capture_output=True, text=True, timeout=120,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )  # fmt: skip
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
    assert "QEMU stderr" not in blocks["test_fails_without_qemu"], out


FAKE_QEMU = '''\
#!{python}
"""QEMU after its start-up race on the first launch: takes one client, drops it and closes
its listening socket (later clients are refused).  Later launches greet like QEMU."""
import os, signal, socket, sys
args = sys.argv[1:]
path = args[args.index("-qmp") + 1].split(",")[0].removeprefix("unix:")
counter = os.environ["FAKE_QEMU_LAUNCHES"]
launch = len(open(counter).read()) if os.path.exists(counter) else 0
open(counter, "a").write("x")
listener = socket.socket(socket.AF_UNIX)
listener.bind(path)
listener.listen(1)
client, _ = listener.accept()
if launch == 0:
    print("fake QEMU: dropped its first client", file=sys.stderr, flush=True)
    client.close()
    listener.close()
else:
    print("fake QEMU: greeted", file=sys.stderr, flush=True)
    greeting = b'{{"QMP": {{"version": {{"qemu": {{"major": 7, "minor": 2, "micro": 0}}}}}}}}\\r\\n'
    client.sendall(greeting)
signal.pause()
'''


def test_a_qemu_that_drops_its_first_client_is_started_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = tmp_path / "fake-qemu"
    fake.write_text(FAKE_QEMU.format(python=sys.executable))
    fake.chmod(0o755)
    launches = tmp_path / "launches"
    monkeypatch.setenv("FAKE_QEMU_LAUNCHES", str(launches))
    qemu.forget_stopped()
    with (
        pytest.warns(QemuRestarted, match="dropped its first client") as warned,
        QemuProcess("7.2", binary=str(fake)) as q,
    ):
        assert launches.read_text() == "xx"
        assert "greeted" in q.stderr_text() and "dropped" not in q.stderr_text()
        assert "lost its QMP socket while starting" in str(warned[0].message)
    first, second = qemu.recorded()[-2:]
    assert "dropped its first client" in first.stderr(), first
    assert "greeted" in second.stderr(), second
    assert first.label != second.label and first.argv[0] == second.argv[0] == str(fake)


def test_a_qemu_that_keeps_dropping_fails_the_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = tmp_path / "fake-qemu"
    source = FAKE_QEMU.format(python=sys.executable).replace("if launch == 0:", "if True:")
    fake.write_text(source)
    fake.chmod(0o755)
    monkeypatch.setenv("FAKE_QEMU_LAUNCHES", str(tmp_path / "launches"))
    with (
        pytest.warns(QemuRestarted),
        pytest.raises(RuntimeError, match=r"lost its QMP socket while starting .*, 3 times"),
    ):
        QemuProcess("7.2", binary=str(fake)).start()
    assert (tmp_path / "launches").read_text() == "xxx"
