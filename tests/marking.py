"""The ``qemu`` marker: which tests need the system, kept honest (loaded by ``conftest.py``).

``pytest -m "not qemu"`` runs the pure tests alone: no QEMU, no other installed program, only
this Python and the project.  ``pytest -m qemu`` runs the rest; together they are the whole
suite.  "Needs the system" means the test starts a real QEMU or another program that
``scripts/`` installs or the machine must provide (:data:`SYSTEM_PROGRAMS`).

A test is marked

* by hand: ``@pytest.mark.qemu``, or ``pytestmark = pytest.mark.qemu`` for a whole module;
* automatically, when it uses a fixture of :data:`SYSTEM_FIXTURES`, directly or through other
  fixtures (``proxy`` uses ``qemu``, so a test asking for ``proxy`` is marked), or carries a
  marker of :data:`SYSTEM_MARKERS` (``libvirt``).

A missing marker fails loudly.  An audit hook sees every program this process starts; one of
:data:`SYSTEM_PROGRAMS` started while an unmarked test runs (its fixtures included) fails it,
as does one started by a fixture that outlives a test (module or session scope) but is not in
:data:`SYSTEM_FIXTURES` nor in a module or class marked as a whole: later tests would use its
QEMU without starting anything.  Programs
started by a program the test started (``qmp-proxy-qemu`` starting QEMU, say) are not seen:
tests that do that are marked by hand (``tests/test_emulator.py``).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Generator
from pathlib import Path

import pytest

MARKER = "qemu"

# Fixtures that start QEMU, by the module they are defined in ("conftest.py": every module).
# A test using one, directly or through other fixtures, gets the marker.
SYSTEM_FIXTURES: dict[str, frozenset[str]] = {
    "conftest.py": frozenset({"qemu", "qemu72"}),
    "test_deb.py": frozenset({"deb", "installed"}),
    "test_differential.py": frozenset({"pair"}),
    "test_framing_vs_qemu.py": frozenset({"shared_qemu"}),
    "test_ghash.py": frozenset({"qemu_vm"}),
    "test_hostile_qemu.py": frozenset({"real"}),
    "test_session_stateful.py": frozenset({"recording"}),
}

# Markers that say a test needs the system too: a test with one gets the marker.
SYSTEM_MARKERS: frozenset[str] = frozenset({"libvirt"})

# What "the system" is: QEMU of any version (``qemu-system-x86_64``, ``qemu52-system-x86_64``,
# ...), Prometheus and promtool, libvirt, the package tools, containers, systemd-analyze, socat.
SYSTEM_PROGRAMS = re.compile(
    r"qemu\d*-system-.*|prometheus|promtool|virsh|libvirtd|virtqemud|apt|apt-get|dpkg|dpkg-.*"
    r"|docker|podman|buildah|systemd-analyze|socat"
)

# Audit events that start a program, and the index of the program's path in their arguments.
_SPAWN_EVENTS = {"subprocess.Popen": 0, "os.posix_spawn": 0, "os.exec": 0, "os.spawn": 1}


class MissingMarker(RuntimeError):
    """A test without the ``qemu`` marker started a system program."""


_running: pytest.Item | None = None  # the test being set up, run or torn down
_fixture: list[pytest.FixtureDef[object]] = []  # the fixtures being set up, innermost last
_violations: dict[str, list[str]] = {}  # node id -> what it started without the marker


def _listed(item: pytest.Item) -> frozenset[str]:
    """The names of :data:`SYSTEM_FIXTURES` that count for ``item``'s module."""
    return SYSTEM_FIXTURES["conftest.py"] | SYSTEM_FIXTURES.get(Path(item.path).name, frozenset())


def _marked_whole(item: pytest.Item, scope: str) -> bool:
    """Whether every test that can share a fixture of ``scope`` with ``item`` is marked."""
    kinds: dict[str, type[pytest.Collector]] = {
        "class": pytest.Class,
        "module": pytest.Module,
    }
    node = item.getparent(kinds[scope]) if scope in kinds else None
    return node is not None and any(node.get_closest_marker(m) for m in {MARKER, *SYSTEM_MARKERS})


def _program(event: str, args: tuple[object, ...]) -> str | None:
    """The system program an audit event starts, or None."""
    index = _SPAWN_EVENTS.get(event)
    if index is None or len(args) <= index:
        return None
    path = args[index]
    if isinstance(path, bytes):
        path = path.decode(errors="replace")
    if not isinstance(path, str):
        return None
    name = Path(path).name
    return name if SYSTEM_PROGRAMS.fullmatch(name) else None


def _audit(event: str, args: tuple[object, ...]) -> None:
    if event not in _SPAWN_EVENTS:
        return
    item = _running
    program = _program(event, args)
    if item is None or program is None:
        return
    problem = None
    if item.get_closest_marker(MARKER) is None:
        problem = (
            f"{item.nodeid} started {program} but has no '{MARKER}' marker: mark it "
            f"@pytest.mark.{MARKER} (or list its fixture in tests/marking.py SYSTEM_FIXTURES)"
        )
    elif _fixture and _fixture[-1].scope != "function":
        fixture = _fixture[-1]
        if fixture.argname not in _listed(item) and not _marked_whole(item, fixture.scope):
            problem = (
                f"{fixture.scope}-scoped fixture {fixture.argname!r} started {program}: the "
                f"tests that reuse it start nothing themselves, so list it in tests/marking.py "
                f"SYSTEM_FIXTURES to mark them all"
            )
    if problem is not None:
        _violations.setdefault(item.nodeid, []).append(problem)
        raise MissingMarker(problem)


sys.addaudithook(_audit)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker(MARKER) is not None:
            continue
        fixtures = getattr(item, "fixturenames", ())
        markers = {m.name for m in item.iter_markers()}
        if _listed(item).intersection(fixtures) or SYSTEM_MARKERS & markers:
            item.add_marker(MARKER)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Generator[None, object, object]:
    global _running
    _running = item
    try:
        return (yield)
    finally:
        _running = None


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(fixturedef: pytest.FixtureDef[object]) -> Generator[None, object, object]:
    _fixture.append(fixturedef)
    try:
        return (yield)
    finally:
        _fixture.pop()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Fail a test whose marker problem was swallowed on the way (an ``except Exception``)."""
    report = yield
    problems = _violations.get(item.nodeid)
    if problems and report.passed and call.when == "call":
        report.outcome = "failed"
        report.longrepr = "\n".join(problems)
    if call.when == "teardown":
        _violations.pop(item.nodeid, None)
    return report
