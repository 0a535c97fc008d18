"""The backport end to end: every installed QEMU (5.2, 7.2, 10.0, 11.1) behind the proxy.

A client sends ``migrate`` / ``migrate-incoming`` with ``capabilities`` as if QEMU had the
proposed patch; the proxy splits it (docs/design.md, 'The split').  These tests check what the
client sees against what real QEMU does: whole save/load workflows, QEMU's exact errors,
capabilities left untouched by every failure, atomicity under load, and the schema the proxy
advertises.

Each proxy gets its own directory (its listening socket and its journal).  QEMU's stderr goes
into every assertion message that involves a migration, as failed loads only explain
themselves there.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import select
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import EventListener, ExecuteError, Message, QMPClient

from tests.aclient import AsyncRaw
from tests.conftest import VERSIONS
from tests.proxyproc import InProcessProxy, ProxyProcess, in_process
from tests.qemu import QemuProcess, RawQMP
from tests.test_crash_safety import group_ended

pytestmark = pytest.mark.qemu  # every test here starts a real QEMU

Caps = list[dict[str, Any]]
TIMEOUT = 10.0


def cap(name: str, state: bool = True) -> dict[str, Any]:
    return {"capability": name, "state": state}


def as_map(caps: Caps) -> dict[str, bool]:
    return {entry["capability"]: entry["state"] for entry in caps}


def subdir(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    path.mkdir(exist_ok=True)
    return path


@contextlib.asynccontextmanager
async def proxied(
    qemu: QemuProcess, tmp_path: Path, name: str = "proxy"
) -> AsyncIterator[InProcessProxy]:
    """The proxy in front of ``qemu``, in its own directory (socket and journal)."""
    async with in_process(qemu.sock_path, subdir(tmp_path, name)) as proxy:
        yield proxy


@contextlib.asynccontextmanager
async def qmp(path: str, name: str = "t") -> AsyncIterator[QMPClient]:
    client = QMPClient(name)
    await asyncio.wait_for(client.connect(path), TIMEOUT)
    try:
        yield client
    finally:
        await client.disconnect()


async def run(client: QMPClient, command: str, arguments: dict[str, Any] | None = None) -> Any:
    return await asyncio.wait_for(client.execute(command, arguments), TIMEOUT)


async def error_of(client: QMPClient, command: str, arguments: dict[str, Any]) -> str:
    try:
        result = await run(client, command, arguments)
    except ExecuteError as exc:
        assert exc.error.error.class_ == "GenericError", exc.error
        return exc.error.error.desc
    raise AssertionError(f"{command} {arguments} succeeded: {result!r}")


async def caps_of(client: QMPClient) -> Caps:
    result: Caps = await run(client, "query-migrate-capabilities")
    return result


async def wait_migration(
    client: QMPClient, qemu: QemuProcess, wanted: str = "completed", timeout: float = TIMEOUT
) -> dict[str, Any]:
    """Poll query-migrate until ``wanted``; a failure shows QEMU's stderr."""
    deadline = time.monotonic() + timeout
    while True:
        info: dict[str, Any] = await run(client, "query-migrate")
        status = info.get("status")
        if status == wanted:
            return info
        if status in ("failed", "cancelled") and status != wanted:
            raise AssertionError(f"migration {status}: {info}\nQEMU stderr:\n{qemu.stderr_text()}")
        if time.monotonic() > deadline:
            raise AssertionError(
                f"migration still {status!r} after {timeout}s\nQEMU stderr:\n{qemu.stderr_text()}"
            )
        await asyncio.sleep(0.01)


def migration_status(event: Message) -> str:
    """The status a MIGRATION event announces."""
    data = event["data"]
    assert isinstance(data, dict), event
    status = data["status"]
    assert isinstance(status, str), event
    return status


@pytest.fixture
def backport_log(caplog: pytest.LogCaptureFixture) -> Callable[[], list[dict[str, str]]]:
    """The proxy's ``event=backport`` log lines so far, as dicts (in-process proxies only)."""
    caplog.set_level(logging.DEBUG)

    def lines() -> list[dict[str, str]]:
        out = []
        for record in caplog.records:
            text = record.getMessage()
            if text.startswith("event=backport "):
                out.append(dict(part.split("=", 1) for part in text.split()[1:]))
        return out

    return lines


# -- every version: save and load with exec:, capabilities on the commands --------------------


@pytest.mark.parametrize("version", VERSIONS)
async def test_save_and_load_with_capabilities_on_the_commands(
    tmp_path: Path, version: str, backport_log: Callable[[], list[dict[str, str]]]
) -> None:
    image = tmp_path / "vm.state"
    caps = [cap("xbzrle"), cap("events")]
    with QemuProcess(version, "-M", "none") as src:
        async with proxied(src, tmp_path, "src") as proxy, qmp(proxy.sock, "src") as client:
            listener = EventListener("MIGRATION")
            with client.listen(listener):
                result = await run(
                    client, "migrate", {"uri": f"exec:cat > {image}", "capabilities": caps}
                )
                assert result == {}
                statuses: list[str] = []
                while statuses[-1:] != ["completed"]:
                    event = await asyncio.wait_for(listener.get(), TIMEOUT)
                    statuses.append(migration_status(event))
            assert statuses[0] == "setup", (statuses, src.stderr_text())
            assert statuses[-1] == "completed"
            assert "failed" not in statuses
            await wait_migration(client, src)
            saved = as_map(await caps_of(client))
            assert saved["xbzrle"] is True
            assert saved["events"] is True
    data = image.read_bytes()
    assert data.startswith(b"QEVM"), data[:16]
    assert backport_log()[-1]["outcome"] == "ok"

    with QemuProcess(version, "-M", "none", "-incoming", "defer") as dst:
        async with proxied(dst, tmp_path, "dst") as proxy, qmp(proxy.sock, "dst") as client:
            listener = EventListener("MIGRATION")
            with client.listen(listener):
                result = await run(
                    client, "migrate-incoming", {"uri": f"exec:cat {image}", "capabilities": caps}
                )
                assert result == {}
                await wait_migration(client, dst)
                seen = [migration_status(e) for e in listener.clear()]
            # The incoming setup event comes whatever the events capability says; with events
            # on (set by the same command) the end of the load is announced too.  On 5.2 the
            # first one is the proxy's probe (no yank there: an unknown URI asks QEMU whether an
            # incoming migration has started, and QEMU announces setup before it parses a URI).
            probe = ["setup"] if version == "5.2" else []
            assert seen == [*probe, "setup", "active", "completed"], (seen, dst.stderr_text())
            loaded = as_map(await caps_of(client))
            assert loaded["xbzrle"] is True
            assert loaded["events"] is True
        assert dst.returncode() is None, dst.stderr_text()
    assert [line["command"] for line in backport_log()] == ["migrate", "migrate-incoming"]
    assert {line["outcome"] for line in backport_log()} == {"ok"}


# -- QEMU 10.0 and later: the snapshot workflow (file: + mapped-ram, one command each) ---------

MAPPED_RAM_VERSIONS = ["10.0", "11.1"]  # mapped-ram, file: and channels came in 9.0


def _target(form: str, path: Path) -> dict[str, Any]:
    if form == "uri":
        return {"uri": f"file:{path}"}
    channel = {
        "channel-type": "main",
        "addr": {"transport": "file", "filename": str(path), "offset": 0},
    }
    return {"channels": [channel]}


@pytest.mark.parametrize("version", MAPPED_RAM_VERSIONS)
@pytest.mark.parametrize("form", ["uri", "channels"])
async def test_snapshot_save_and_load_with_mapped_ram(
    tmp_path: Path, form: str, version: str, backport_log: Callable[[], list[dict[str, str]]]
) -> None:
    blob = os.urandom(64 * 1024)
    blob_path = tmp_path / "blob.bin"
    blob_path.write_bytes(blob)
    image = tmp_path / "snapshot.img"
    out = tmp_path / "ram.out"
    caps = [cap("mapped-ram")]
    loader = f"loader,file={blob_path},addr=0x1000000,force-raw=on"
    with QemuProcess(version, "-M", "pc", "-m", "64", "-device", loader) as src:
        async with proxied(src, tmp_path, "src") as proxy, qmp(proxy.sock, "src") as client:
            arguments = {**_target(form, image), "capabilities": caps}
            assert await run(client, "migrate", arguments) == {}
            await wait_migration(client, src)
            assert as_map(await caps_of(client))["mapped-ram"] is True

    with QemuProcess(version, "-M", "pc", "-m", "64", "-incoming", "defer") as dst:
        async with proxied(dst, tmp_path, "dst") as proxy, qmp(proxy.sock, "dst") as client:
            arguments = {**_target(form, image), "capabilities": caps}
            assert await run(client, "migrate-incoming", arguments) == {}
            await wait_migration(client, dst)
            assert as_map(await caps_of(client))["mapped-ram"] is True
            await run(
                client, "pmemsave", {"val": 0x1000000, "size": len(blob), "filename": str(out)}
            )
        assert dst.returncode() is None, dst.stderr_text()
    assert out.read_bytes() == blob, dst.stderr_text()
    assert [(x["command"], x["outcome"]) for x in backport_log()] == [
        ("migrate", "ok"),
        ("migrate-incoming", "ok"),
    ]


@pytest.mark.parametrize("version", MAPPED_RAM_VERSIONS)
@pytest.mark.parametrize("form", ["uri", "channels"])
def test_snapshot_workflow_without_the_proxy_is_rejected(
    tmp_path: Path, form: str, version: str
) -> None:
    """The same two commands straight to QEMU: its visitor refuses the argument."""
    image = tmp_path / "snapshot.img"
    expected = {"class": "GenericError", "desc": "Parameter 'capabilities' is unexpected"}
    arguments = {**_target(form, image), "capabilities": [cap("mapped-ram")]}
    for extra, command in (((), "migrate"), (("-incoming", "defer"), "migrate-incoming")):
        with QemuProcess(version, "-M", "pc", "-m", "64", *extra) as q, RawQMP(q.sock_path) as c:
            c.negotiate()
            reply = c.command({"execute": command, "arguments": arguments, "id": command})
            assert reply == {"id": command, "error": expected}, q.stderr_text()
            # Rejected before any side effect.
            assert c.command({"execute": "query-migrate"}) == {"return": {}}
            mapped = as_map(c.command({"execute": "query-migrate-capabilities"})["return"])
            assert mapped["mapped-ram"] is False
    assert not image.exists()


# -- every failure leaves the capabilities as they were --------------------------------------

DEFAULT_CAPS = [cap("xbzrle"), cap("events"), cap("auto-converge", False)]
CHANNELS = [
    {
        "channel-type": "main",
        "addr": {"transport": "file", "filename": "/nonexistent/x", "offset": 0},
    }
]


@dataclass(frozen=True)
class Case:
    id: str
    version: str
    command: str
    arguments: dict[str, Any]
    outcome: str  # what the proxy logs: precheck_error | caps_error | command_error
    desc: str | None  # QEMU's exact text; None: whatever QEMU says for the same command itself
    qemu_args: tuple[str, ...] = ()
    caps: Caps = field(default_factory=lambda: list(DEFAULT_CAPS))
    # The same command without capabilities fails in QEMU too, without side effects: the
    # proxy's answer must be QEMU's own.
    same_as_qemu: bool = True
    setup: str | None = None  # incoming:URI | migrated | running


INCOMING = ("-incoming", "defer")
EXEC_NULL = "exec:cat >/dev/null"
NOT_INCOMING = "'-incoming' was not specified on the command line"
NOT_DEFERRED = "For use with '-incoming defer'"  # 5.2's words for the same refusal
STARTED = "The incoming migration has already been started"
NEITHER = "need either 'uri' or 'channels' argument"
URI_VERSIONS = ["5.2", "7.2"]  # uri required, no channels


def not_incoming(version: str) -> str:
    """QEMU's refusal of ``migrate-incoming`` on a VM not started with ``-incoming defer``."""
    return NOT_DEFERRED if version == "5.2" else NOT_INCOMING


def unknown_cap(version: str, name: str) -> str:
    """The visitor's error for a capability name the version lacks (5.2 names only the value)."""
    if version == "5.2":
        return f"Invalid parameter '{name}'"
    return f"Parameter 'capability' does not accept value '{name}'"


CASES = [
    *(
        Case(f"unexpected-member-{v}", v, "migrate", {"uri": EXEC_NULL, "bogus-arg": 1},
             "precheck_error", "Parameter 'bogus-arg' is unexpected")
        for v in VERSIONS
    ),
    *(
        Case(f"incoming-unexpected-member-{v}", v, "migrate-incoming",
             {"uri": "tcp:127.0.0.1:0", "bogus-arg": 1}, "precheck_error",
             "Parameter 'bogus-arg' is unexpected", INCOMING)
        for v in VERSIONS
    ),
    *(
        Case(f"no-uri-{v}", v, "migrate", {}, "precheck_error", "Parameter 'uri' is missing")
        for v in URI_VERSIONS
    ),
    *(
        Case(f"channels-{v}", v, "migrate", {"channels": CHANNELS}, "precheck_error",
             "Parameter 'uri' is missing")
        for v in URI_VERSIONS
    ),
    *(
        Case(f"{c}-channels-member-{v}", v, c, {"uri": EXEC_NULL, "channels": CHANNELS},
             "precheck_error", "Parameter 'channels' is unexpected", extra)
        for v in URI_VERSIONS
        for c, extra in (("migrate", ()), ("migrate-incoming", INCOMING))
    ),
    *(
        Case(f"incoming-no-uri-{v}", v, "migrate-incoming", {}, "precheck_error",
             "Parameter 'uri' is missing", INCOMING)
        for v in URI_VERSIONS
    ),
    *(
        case
        for v in MAPPED_RAM_VERSIONS
        for case in (
            Case(f"neither-{v}", v, "migrate", {}, "precheck_error", NEITHER),
            Case(f"empty-channels-{v}", v, "migrate", {"channels": []}, "precheck_error",
                 NEITHER),
            Case(f"both-{v}", v, "migrate", {"uri": EXEC_NULL, "channels": CHANNELS},
                 "precheck_error", NEITHER),
            Case(f"incoming-neither-{v}", v, "migrate-incoming", {}, "precheck_error", NEITHER,
                 INCOMING),
        )
    ),
    # 11.1 dropped migrate's deprecated "detach".
    Case("detach-11.1", "11.1", "migrate", {"uri": EXEC_NULL, "detach": True}, "precheck_error",
         "Parameter 'detach' is unexpected"),
    *(
        Case(f"incoming-without-dash-incoming-{v}", v, "migrate-incoming",
             {"uri": "tcp:127.0.0.1:0"}, "precheck_error", not_incoming(v))
        for v in VERSIONS
    ),
    # A VM without -incoming that has migrated out: QEMU still answers NOT_INCOMING (its
    # "once" flag is only cleared by a started incoming migration).
    *(
        Case(f"incoming-after-outgoing-migration-{v}", v, "migrate-incoming",
             {"uri": "tcp:127.0.0.1:0"}, "precheck_error", not_incoming(v), setup="migrated")
        for v in VERSIONS
    ),
    # Started from the command line: waiting on exec:, nothing received.  5.2 has no yank and
    # shows nothing in query-migrate; the proxy's probe gets NOT_DEFERRED, not "unknown
    # migration protocol", so it must count the VM as busy.
    *(
        Case(f"incoming-started-on-command-line-{v}", v, "migrate-incoming",
             {"uri": "tcp:127.0.0.1:0"}, "precheck_error",
             NOT_DEFERRED if v == "5.2" else STARTED, ("-incoming", "exec:sleep 20"))
        for v in VERSIONS
    ),
    # QEMU 7.2's query-migrate shows no status while an incoming migration listens (tcp:
    # only "socket-address") or waits on exec: ({}); 5.2 shows the tcp: one the same way and
    # nothing of the exec: one (its probe must catch it).  The proxy must still refuse before
    # it touches the capabilities of a live incoming migration (the logged outcome says so).
    *(
        Case(f"incoming-twice-{t}-{v}", v, "migrate-incoming", {"uri": "tcp:127.0.0.1:0"},
             "precheck_error", STARTED, INCOMING, [cap("auto-converge", False), cap("xbzrle")],
             setup=f"incoming:{uri}")
        for v in VERSIONS
        for t, uri in (("tcp", "tcp:127.0.0.1:0"), ("exec", "exec:sleep 20"))
    ),
    *(
        # An unknown name: the visitor's error, from the proxy, before anything reaches QEMU.
        Case(f"caps-error-{v}", v, "migrate", {"uri": EXEC_NULL}, "precheck_error",
             unknown_cap(v, "bogus"),
             caps=[cap("xbzrle"), cap("bogus"), cap("auto-converge", False)], same_as_qemu=False)
        for v in VERSIONS
    ),
    *(
        Case(f"incoming-caps-error-{v}", v, "migrate-incoming", {"uri": "tcp:127.0.0.1:0"},
             "precheck_error", unknown_cap(v, "bogus"), INCOMING, [cap("events"), cap("bogus")],
             same_as_qemu=False)
        for v in VERSIONS
    ),
    # A name another version has: the version's own schema decides.
    *(
        Case(f"caps-not-in-{v}-{name}", v, "migrate", {"uri": EXEC_NULL}, "precheck_error",
             unknown_cap(v, name), caps=[cap("events"), cap(name)], same_as_qemu=False)
        for v, name in (("5.2", "mapped-ram"), ("7.2", "mapped-ram"), ("10.0", "block"),
                        ("10.0", "compress"), ("11.1", "zero-blocks"))
    ),
    *(
        Case(f"caps-error-migration-running-{v}", v, "migrate", {"uri": EXEC_NULL}, "caps_error",
             "There's a migration process in progress", same_as_qemu=False, setup="running")
        for v in VERSIONS
    ),
    *(
        Case(f"bad-uri-protocol-{v}", v, "migrate", {"uri": "bogus:x"}, "command_error", None)
        for v in VERSIONS
    ),
    *(
        Case(f"incoming-bad-uri-protocol-{v}", v, "migrate-incoming", {"uri": "bogus:x"},
             "command_error", "unknown migration protocol: bogus:x", INCOMING)
        for v in VERSIONS
    ),
    *(
        Case(f"mapped-ram-needs-seekable-{v}", v, "migrate", {"uri": EXEC_NULL},
             "command_error", "Migration requires seekable transport (e.g. file)",
             caps=[cap("mapped-ram"), cap("events"), cap("auto-converge", False)],
             same_as_qemu=False)
        for v in MAPPED_RAM_VERSIONS
    ),
    *(
        Case(f"migrate-while-waiting-for-incoming-{v}", v, "migrate", {"uri": EXEC_NULL},
             "command_error", "Guest is waiting for an incoming migration", INCOMING)
        for v in VERSIONS
    ),
]  # fmt: skip


async def exactly_one_reply(
    c: AsyncRaw, command: str, arguments: dict[str, Any], cid: str
) -> tuple[dict[str, Any], Caps]:
    """Send a command with a sentinel pipelined behind it; the session must get exactly one
    reply, under ``cid``, before the sentinel's.  Returns it and the sentinel's capabilities."""
    msg = {"execute": command, "arguments": arguments, "id": cid}
    await c.send(json.dumps(msg).encode())
    await c.send(b'{"execute":"query-migrate-capabilities","id":"sentinel"}')
    replies: list[dict[str, Any]] = []
    while not replies or replies[-1].get("id") != "sentinel":
        message = await c.message()
        if "event" not in message:
            replies.append(message)
    assert [r.get("id") for r in replies] == [cid, "sentinel"], replies
    # Nothing more for this session afterwards either.
    await c.send(b'{"execute":"query-status","id":"last"}')
    while (message := await c.message()).get("id") != "last":
        assert "event" in message, message
    return replies[0], replies[1]["return"]


async def _ok(c: AsyncRaw, command: str, arguments: dict[str, Any] | None = None) -> Any:
    msg: dict[str, Any] = {"execute": command}
    if arguments is not None:
        msg["arguments"] = arguments
    reply = await c.command(msg)
    assert "return" in reply, (command, reply)
    return reply["return"]


async def _status(c: AsyncRaw) -> str | None:
    status: str | None = (await _ok(c, "query-migrate")).get("status")
    return status


async def _wait_status(c: AsyncRaw, qemu: QemuProcess, wanted: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while (status := await _status(c)) != wanted:
        assert time.monotonic() < deadline, (status, qemu.stderr_text())
        await asyncio.sleep(0.01)


async def _setup(case: Case, c: AsyncRaw, qemu: QemuProcess) -> None:
    if case.setup is None:
        return
    if case.setup.startswith("incoming:"):
        uri = case.setup.removeprefix("incoming:")
        first = {"uri": uri, "capabilities": [cap("events"), cap("xbzrle")]}
        assert await _ok(c, "migrate-incoming", first) == {}
    elif case.setup == "migrated":
        assert await _ok(c, "migrate", {"uri": EXEC_NULL}) == {}
        await _wait_status(c, qemu, "completed")
    elif case.setup == "running":
        await _ok(c, "migrate-set-capabilities", {"capabilities": [cap("pause-before-switchover")]})
        assert await _ok(c, "migrate", {"uri": EXEC_NULL}) == {}
        await _wait_status(c, qemu, "pre-switchover")
    else:
        raise AssertionError(case.setup)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
async def test_failure_leaves_capabilities_unchanged(
    case: Case, tmp_path: Path, backport_log: Callable[[], list[dict[str, str]]]
) -> None:
    # group_ended: the exec:sleep of a waiting incoming migration would outlive QEMU.
    with QemuProcess(case.version, "-M", "none", *case.qemu_args) as qemu, group_ended(qemu):
        async with proxied(qemu, tmp_path) as proxy:
            c = await AsyncRaw.connect(proxy.sock)
            await c.negotiate()
            # A non-default baseline, so a restore has something other than "off" to restore.
            await _ok(c, "migrate-set-capabilities", {"capabilities": [cap("auto-converge")]})
            await _setup(case, c, qemu)
            before = await _ok(c, "query-migrate-capabilities")
            status_before = await _status(c)
            logged = len(backport_log())

            arguments = {**case.arguments, "capabilities": case.caps}
            reply, after = await exactly_one_reply(c, case.command, arguments, f"case-{case.id}")

            why = f"{reply}\nQEMU stderr:\n{qemu.stderr_text()}"
            assert set(reply) == {"id", "error"}, why
            assert reply["error"]["class"] == "GenericError", why
            if case.desc is not None:
                assert reply["error"]["desc"] == case.desc, why
            assert after == before, why
            if case.outcome != "command_error":
                assert await _status(c) == status_before, why  # nothing was started

            if case.same_as_qemu:
                own = await c.command(
                    {"execute": case.command, "arguments": case.arguments, "id": "own"}
                )
                assert own == {"id": "own", "error": reply["error"]}, (reply, own)
                assert await _ok(c, "query-migrate-capabilities") == before

            lines = backport_log()[logged:]
            assert len(lines) == 1, lines
            assert lines[0]["outcome"] == case.outcome, lines
            assert lines[0].get("restore") == ("ok" if case.outcome == "command_error" else None)
            if case.setup == "running":
                await _ok(c, "migrate_cancel")
                await _wait_status(c, qemu, "cancelled")
            await c.close()
        assert qemu.returncode() is None, qemu.stderr_text()


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("command", ["migrate", "migrate-incoming"])
async def test_several_unexpected_members_name_the_one_qemu_names(
    tmp_path: Path, version: str, command: str
) -> None:
    """QEMU's visitor reports the first leftover key of a GHashTable, not of the QDict."""
    extra = INCOMING if command == "migrate-incoming" else ()
    with QemuProcess(version, "-M", "none", *extra) as qemu:
        async with proxied(qemu, tmp_path) as proxy, qmp(proxy.sock) as client:
            for keys in (("a", "b"), ("zzz", "aaa", "extra-b"), ("foo", "bar", "baz", "qux")):
                arguments: dict[str, Any] = {"uri": "tcp:127.0.0.1:0", **dict.fromkeys(keys, 1)}
                qemus = await error_of(client, command, arguments)
                ours = await error_of(client, command, {**arguments, "capabilities": []})
                assert ours == qemus, keys


MALFORMED_LISTS: list[Any] = [
    "xbzrle",
    [1],
    [{}],
    [{"state": True}],
    [{"capability": 1, "state": True}],
    [{"capability": "bogus", "state": True}],
    [{"capability": "xbzrle"}],
    [{"capability": "xbzrle", "state": 1}],
    [{"capability": "xbzrle", "state": True, "extra": 1}],
    [{"capability": "xbzrle", "state": True, "zzz": 1, "aaa": 2, "extra-b": 3}],
    [{"capability": "xbzrle", "state": True}, {"capability": "events"}],
]


async def test_malformed_capabilities_get_the_versions_own_words(
    qemu: QemuProcess, proxy: InProcessProxy
) -> None:
    """A patched QEMU visits ``capabilities`` with migrate-set-capabilities' own type and path:
    each version's answer to that command (relayed as is) is the answer for both commands."""
    async with qmp(proxy.sock) as client:
        before = await caps_of(client)
        for caps in MALFORMED_LISTS:
            qemus = await error_of(client, "migrate-set-capabilities", {"capabilities": caps})
            for command in ("migrate", "migrate-incoming"):
                arguments = {"uri": EXEC_NULL, "capabilities": caps}
                assert await error_of(client, command, arguments) == qemus, (caps, command)
        assert await caps_of(client) == before
        assert await run(client, "query-migrate") == {}


# -- the reply itself: as QEMU writes it -------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
async def test_split_success_reply_bytes_are_qemus(tmp_path: Path, version: str) -> None:
    """QEMU writes a success reply as ``{"return": {}, "id": ...}``; so must the split, whose
    reply is QEMU's reply to the command without ``capabilities``, byte for byte (docs/design.md,
    'The split', step 5)."""
    command = {"execute": "migrate", "arguments": {"uri": EXEC_NULL}, "id": "m1"}
    with QemuProcess(version, "-M", "none") as direct, RawQMP(direct.sock_path) as raw:
        raw.negotiate()
        raw.send(json.dumps(command).encode())
        reference = raw.recv_line()  # no events: the events capability is off
    assert reference == b'{"return": {}, "id": "m1"}'
    with QemuProcess(version, "-M", "none") as qemu:
        async with proxied(qemu, tmp_path) as proxy:
            c = await AsyncRaw.connect(proxy.sock)
            await c.negotiate()
            split = {**command, "arguments": {"uri": EXEC_NULL, "capabilities": [cap("xbzrle")]}}
            await c.send(json.dumps(split).encode())
            line = await c.line()
            await c.close()
    assert line == reference + b"\r\n"


# -- --backport=off, and discoverability ------------------------------------------------------


async def test_backport_off_passes_capabilities_to_qemu(qemu: QemuProcess, tmp_path: Path) -> None:
    listen = tmp_path / "off.sock"
    with ProxyProcess(
        "--upstream",
        f"unix:{qemu.sock_path}",
        "--listen",
        f"unix:{listen}",
        "--backport",
        "off",
        "--state-dir",
        str(subdir(tmp_path, "state")),
        tmp_path=tmp_path,
    ) as proxy:
        proxy.wait_log("event=upstream_ready")
        async with qmp(str(listen)) as client:
            for command in ("migrate", "migrate-incoming"):
                arguments = {"uri": EXEC_NULL, "capabilities": [cap("xbzrle")]}
                desc = await error_of(client, command, arguments)
                assert desc == "Parameter 'capabilities' is unexpected", proxy.log()
            assert as_map(await caps_of(client))["xbzrle"] is False
            entries = await run(client, "query-qmp-schema")
            assert _capabilities_members(entries) == {"migrate": None, "migrate-incoming": None}
        assert "event=backport " not in proxy.log()


def _capabilities_members(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """The ``capabilities`` member of migrate's and migrate-incoming's argument type."""
    by_name = {e["name"]: e for e in entries}
    found = {}
    for command in ("migrate", "migrate-incoming"):
        members = by_name[by_name[command]["arg-type"]]["members"]
        found[command] = next((m for m in members if m["name"] == "capabilities"), None)
    return found


def _set_caps_type(entries: list[dict[str, Any]]) -> str:
    by_name = {e["name"]: e for e in entries}
    members = by_name[by_name["migrate-set-capabilities"]["arg-type"]]["members"]
    member = next(m for m in members if m["name"] == "capabilities")
    assert "default" not in member  # required there
    type_name: str = member["type"]
    assert by_name[type_name]["meta-type"] == "array"
    return type_name


async def test_schema_advertises_capabilities(qemu: QemuProcess, tmp_path: Path) -> None:
    with RawQMP(qemu.sock_path) as raw:  # QEMU's own schema first, then through the proxy
        raw.negotiate()
        direct = raw.command({"execute": "query-qmp-schema"})["return"]
    assert _capabilities_members(direct) == {"migrate": None, "migrate-incoming": None}
    async with proxied(qemu, tmp_path) as proxy, qmp(proxy.sock) as client:
        relayed = await run(client, "query-qmp-schema")
    member = {"name": "capabilities", "default": None, "type": _set_caps_type(direct)}
    assert _capabilities_members(relayed) == {"migrate": member, "migrate-incoming": member}
    # Apart from that member, the schema is QEMU's, entry for entry.
    assert len(relayed) == len(direct)
    arg_types = {e["arg-type"] for e in direct if e["name"] in ("migrate", "migrate-incoming")}
    for ours, qemus in zip(relayed, direct, strict=True):
        if ours["name"] in arg_types:
            assert ours == {**qemus, "members": [*qemus["members"], member]}
        else:
            assert ours == qemus


# -- atomicity under load --------------------------------------------------------------------


def _more_than(counts: list[int]) -> Callable[[], bool]:
    """True once every counter has moved past its value now."""
    base = list(counts)
    return lambda: all(now > then for now, then in zip(counts, base, strict=True))


async def test_no_other_command_runs_between_set_and_migrate(
    qemu: QemuProcess, proxy: InProcessProxy
) -> None:
    """20 sessions toggle xbzrle/auto-converge as fast as they can while one session migrates
    with capabilities.  pause-before-switchover holds the migration in pre-switchover, where
    QEMU refuses every migrate-set-capabilities, so the values read then are those in force
    when the migration started: exactly the requested ones.  Five rounds, with the requested
    values flipped each time."""
    stop = asyncio.Event()
    accepted = [0] * 20
    refused = [0] * 20

    async def hammer(n: int) -> None:
        async with qmp(proxy.sock, f"hammer{n}") as c:
            state = n % 2 == 0
            while not stop.is_set():
                state = not state
                toggle = [cap("xbzrle", state), cap("auto-converge", not state)]
                try:
                    await run(c, "migrate-set-capabilities", {"capabilities": toggle})
                    accepted[n] += 1
                except ExecuteError as exc:
                    assert str(exc) == "There's a migration process in progress"
                    refused[n] += 1
                await run(c, "query-status")

    async def until(condition: Callable[[], bool], what: object) -> None:
        deadline = time.monotonic() + TIMEOUT
        while not condition():
            assert time.monotonic() < deadline, what
            await asyncio.sleep(0.002)

    hammers = [asyncio.ensure_future(hammer(n)) for n in range(20)]
    try:
        async with qmp(proxy.sock, "migrator") as client:
            for round_ in range(5):
                flip = round_ % 2 == 0
                requested = [
                    cap("xbzrle", flip),
                    cap("auto-converge", not flip),
                    cap("events"),
                    cap("pause-before-switchover"),
                ]
                # Every hammer is busy setting capabilities again (accepted, not refused).
                await until(_more_than(accepted), accepted)
                arguments = {"uri": EXEC_NULL, "capabilities": requested}
                assert await run(client, "migrate", arguments) == {}
                await wait_migration(client, qemu, "pre-switchover")
                await until(_more_than(refused), refused)
                got = as_map(await caps_of(client))
                assert {c["capability"]: got[c["capability"]] for c in requested} == as_map(
                    requested
                ), f"round {round_}"
                assert await run(client, "migrate_cancel") == {}
                await wait_migration(client, qemu, "cancelled")
                # 7.2 leaves a -S guest in postmigrate after the cancel, where it refuses to
                # migrate again ("Can't migrate the vm that was paused ..."): cont, stop.
                await run(client, "cont")
                await run(client, "stop")
            stop.set()
            await asyncio.wait_for(asyncio.gather(*hammers), TIMEOUT)
    finally:
        stop.set()
        for task in hammers:
            task.cancel()
        await asyncio.gather(*hammers, return_exceptions=True)


# -- a client that goes away mid-sequence -----------------------------------------------------


def _send_split_and_vanish(path: str, image: Path, how: str) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(TIMEOUT)
    sock.connect(path)
    buf = b""
    while b"\n" not in buf:
        buf += sock.recv(65536)
    migrate = {
        "execute": "migrate",
        "id": "gone",
        "arguments": {"uri": f"exec:cat > {image}", "capabilities": [cap("xbzrle"), cap("events")]},
    }
    sock.sendall(b'{"execute":"qmp_capabilities"}' + json.dumps(migrate).encode())
    if how == "reset":
        # Leave the qmp_capabilities reply unread: closing a unix socket with unread data makes
        # the proxy's next read fail with ECONNRESET while the sequence is running.
        readable, _, _ = select.select([sock], [], [], TIMEOUT)
        assert readable
    sock.close()


@pytest.mark.parametrize("how", ["close", "reset"])
async def test_client_disconnect_does_not_cut_the_sequence(
    tmp_path: Path,
    how: str,
    caplog: pytest.LogCaptureFixture,
    backport_log: Callable[[], list[dict[str, str]]],
) -> None:
    image = tmp_path / "vm.state"
    with QemuProcess("7.2", "-M", "none") as qemu:
        async with proxied(qemu, tmp_path) as proxy:
            await asyncio.to_thread(_send_split_and_vanish, proxy.sock, image, how)
            async with qmp(proxy.sock, "observer") as observer:
                await wait_migration(observer, qemu)
                got = as_map(await caps_of(observer))
                assert (got["xbzrle"], got["events"]) == (True, True)
            assert [(x["command"], x["outcome"]) for x in backport_log()] == [("migrate", "ok")]
            # The session ended (write or read error) while the sequence was still running.
            order = [
                m
                for m in (r.getMessage() for r in caplog.records)
                if m.startswith(("event=session_end ", "event=backport "))
            ]
            assert order[0].startswith("event=session_end ") and " session=1 " in order[0], order
            assert "reason=reset" in order[0], order
            assert order[1].startswith("event=backport "), order
    assert image.read_bytes().startswith(b"QEVM")


# -- libvirt's fd: pattern ---------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
async def test_migrate_to_fd_with_capabilities(tmp_path: Path, version: str) -> None:
    with QemuProcess(version, "-M", "none") as qemu:
        async with proxied(qemu, tmp_path) as proxy, qmp(proxy.sock) as client:
            r, w = os.pipe()
            try:
                client.send_fd_scm(w)
                os.close(w)
                w = -1
                assert await run(client, "getfd", {"fdname": "mig"}) == {}
                arguments = {"uri": "fd:mig", "capabilities": [cap("xbzrle"), cap("events")]}
                assert await run(client, "migrate", arguments) == {}
                head = await asyncio.wait_for(asyncio.to_thread(os.read, r, 4), TIMEOUT)
                assert head == b"QEVM", qemu.stderr_text()
                await wait_migration(client, qemu)
                got = as_map(await caps_of(client))
                assert (got["xbzrle"], got["events"]) == (True, True)
            finally:
                os.close(r)
                if w >= 0:
                    os.close(w)
