"""What a broken or hostile QEMU, a tampered journal or a hostile environment can do to the proxy.

Each test stages one thing an attacker (or plain bad luck) can do from outside the proxy and
checks the proxy's answer as a user would see it: log lines, exit status, what QEMU ends up
with, what a client gets.  The fake QEMU (``tests/fakeqemu.py``) injects what no real QEMU does
on demand (a malformed probe answer, a line that never ends, an odd schema); real QEMU is used
where the behaviour is QEMU's own (an incoming migration under way, capabilities that must not
be reverted) and wherever it costs little.

Journals are planted black-box: under the name the proxy uses (one per route and upstream) and
under the single per-route name proxies used before, so a proxy that reads either is judged.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import resource
import signal
import socket
import stat
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, Final

import pytest

from proxy.framing import Framer, Message
from tests.aclient import AsyncRaw
from tests.fakeqemu import (
    DEFAULT_VERSION,
    Call,
    Error,
    FakeQemu,
    Outcome,
    default_schema,
    encode,
)
from tests.proxyproc import ProxyProcess, in_process
from tests.qemu import QemuProcess, RawQMP
from tests.test_crash_safety import REQUESTED, Relay, capabilities, once, split_request, start_proxy
from tests.test_systemd import Proc, activated, python_proxy

# Reconnect at once: the tests count retries, not seconds.
LIMITS: Final[dict[str, Any]] = {"backoff_min": 0.01, "backoff_max": 0.05, "drain": 0.2}
NOBODY: Final = 65534  # the uid an unprivileged attacker runs as
MiB: Final = 1 << 20
DEFAULT_MAX_UPSTREAM_LINE: Final = 16 * MiB  # the proxy's default --max-upstream-line


def messages(caplog: pytest.LogCaptureFixture, event: str) -> list[str]:
    return [m for r in caplog.records if (m := r.getMessage()).startswith(f"event={event} ")]


def log_lines(text: str, event: str) -> list[str]:
    return [line for line in text.splitlines() if f"event={event} " in line]


async def served(sock: str) -> None:
    """A client gets QEMU's greeting and an answer through the proxy."""
    client = await AsyncRaw.connect(sock)
    try:
        await client.negotiate()
        reply = await client.command({"execute": "query-status", "id": "s"})
        assert reply["id"] == "s" and "status" in reply["return"], reply
    finally:
        await client.close()


# -- a TCP upstream whose name does not resolve at first -------------------------------------------


async def test_tcp_upstream_name_resolution_failure_is_retried(
    short_tmp: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A host name that fails to resolve (DNS not up yet at boot) is a failed connect like any
    other: logged, retried with backoff, and the route comes up once the name resolves.  It
    must never end the route's task, which would leave the proxy up but serving no one."""
    caplog.set_level(logging.DEBUG)
    loop = asyncio.get_running_loop()
    real = loop.getaddrinfo
    host = "qemu-host.invalid"
    lookups: list[str] = []

    async def flaky(name: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        lookups.append(str(name))
        if name == host:
            if len(lookups) <= 2:
                raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
            name = "127.0.0.1"
        return await real(name, port, *args, **kwargs)

    monkeypatch.setattr(loop, "getaddrinfo", flaky)
    async with FakeQemu("", tcp_host="127.0.0.1") as fake:
        upstream = f"tcp:{host}:{fake.port}"
        async with in_process(upstream, short_tmp, ready=False, **LIMITS) as proxy:
            await proxy.wait_ready(timeout=5)
            failed = messages(caplog, "upstream_connect_failed")
            assert len(failed) == 2, failed
            assert all("result=error" in m and host in m for m in failed), failed
            assert lookups.count(host) == 3, lookups
            await served(proxy.sock)
            assert fake.connection_count == 1


# -- one malformed answer while connecting ---------------------------------------------------------

BAD_TIMES: Final = 2  # the fake misbehaves on this many connections, then behaves


def _greeting(qmp: Any) -> Callable[[FakeQemu], None]:
    def install(fake: FakeQemu) -> None:
        line = encode({"QMP": qmp})
        fake.greeting_override = lambda number: line if number <= BAD_TIMES else None

    return install


def _answer(command: str, bad: Outcome) -> Callable[[FakeQemu], None]:
    def install(fake: FakeQemu) -> None:
        inner = fake.handlers[command]

        def handler(call: Call) -> Outcome:
            return bad if call.conn.number <= BAD_TIMES else inner(call)

        fake.on(command, handler)

    return install


BAD_PROBES: Final[dict[str, Callable[[FakeQemu], None]]] = {
    "query-name returns a list": _answer("query-name", ["vm1"]),
    "query-uuid returns a string": _answer("query-uuid", "00000000"),
    "greeting without version": _greeting({"capabilities": ["oob"]}),
    "greeting QMP is not an object": _greeting(["oob"]),
    "greeting capabilities is a number": _greeting({"version": DEFAULT_VERSION, "capabilities": 5}),
    "query-qmp-schema is not a list": _answer("query-qmp-schema", {"name": "migrate"}),
    "qmp_capabilities fails": _answer("qmp_capabilities", Error("Capability oob not available")),
}


@pytest.mark.parametrize("case", BAD_PROBES)
async def test_malformed_probe_answer_is_retried(
    short_tmp: Path, caplog: pytest.LogCaptureFixture, case: str
) -> None:
    """QEMU's answers while the proxy connects are type-checked: one malformed answer is a
    protocol error on that connection (QEMU's monitor is released, the route retries), never
    an exception that ends the route for good or a half-probed QEMU served to clients."""
    caplog.set_level(logging.DEBUG)
    async with FakeQemu(str(short_tmp / "q.sock")) as fake:
        BAD_PROBES[case](fake)
        async with in_process(fake.address, short_tmp, ready=False, **LIMITS) as proxy:
            await proxy.wait_ready(timeout=5)
            failed = messages(caplog, "upstream_connect_failed")
            assert len(failed) == BAD_TIMES, failed
            assert all("result=protocol_error" in m for m in failed), failed
            # Each bad connection was closed by the proxy (with one client at a time, the fake
            # only accepts the next one once the previous is gone).
            assert fake.connection_count == BAD_TIMES + 1
            assert list(fake.connections) == [BAD_TIMES + 1]
            await served(proxy.sock)


# -- a schema of an unexpected shape ---------------------------------------------------------------


def _odd_schema(kind: str) -> list[dict[str, Any]]:
    """QEMU's schema with migrate's argument type bent out of shape, and padded to ~1 MB so
    the reply spans many reads (the path where a half-handled line stays buffered)."""
    entries = default_schema()
    by_name = {e["name"]: e for e in entries}
    command = by_name["migrate"]
    arg = by_name[command["arg-type"]]
    if kind == "members is a number":
        arg["members"] = 5
    elif kind == "members is a string":
        arg["members"] = "uri"
    elif kind == "members is an object":
        arg["members"] = {"name": "uri", "type": "str"}
    elif kind == "arg-type names no entry":
        entries.remove(arg)
    elif kind == "arg-type is not a string":
        command["arg-type"] = 7
    elif kind == "members with non-string names":
        arg["members"] = [{"name": 5, "type": "str"}, {"type": "str"}, "uri", None]
    else:
        raise AssertionError(kind)
    entries.extend(
        {"name": f"PADDING_EVENT_{i:05}", "meta-type": "event", "arg-type": "0"}
        for i in range(14000)
    )
    return entries


ODD_SCHEMAS: Final = [
    "members is a number",
    "members is a string",
    "members is an object",
    "arg-type names no entry",
    "arg-type is not a string",
    "members with non-string names",
]


def _advertised(member: object) -> bool:
    return isinstance(member, dict) and member.get("name") == "capabilities" and "default" in member


def _without_advertised(entries: list[Any]) -> list[Any]:
    """The schema as QEMU sent it: drop the optional ``capabilities`` members the proxy
    advertises (``migrate-set-capabilities``' own is required: it stays)."""
    out = []
    for entry in entries:
        members = entry.get("members")
        if entry.get("meta-type") == "object" and isinstance(members, list):
            kept = [m for m in members if not _advertised(m)]
            entry = dict(entry, members=kept)
        out.append(entry)
    return out


@pytest.mark.parametrize("kind", ODD_SCHEMAS)
async def test_odd_schema_shape_keeps_replies_apart(short_tmp: Path, kind: str) -> None:
    """Rewriting ``query-qmp-schema`` replies (to advertise the backport) must cope with any
    shape QEMU's schema has: an exception half-way through a reply must never leave QEMU's
    output half-consumed, where the next client's reply would be glued to this one's."""
    schema = _odd_schema(kind)
    fake = FakeQemu(str(short_tmp / "q.sock"), schema=schema, validate_arguments=False)
    async with fake, in_process(fake.address, short_tmp, **LIMITS) as proxy:
        a = await AsyncRaw.connect(proxy.sock)
        b = await AsyncRaw.connect(proxy.sock)
        try:
            await a.negotiate()
            await b.negotiate()
            await a.send(b'{"execute": "query-qmp-schema", "id": "a"}')
            await b.send(b'{"execute": "query-status", "id": "b"}')
            reply_a = json.loads(await a.line())
            reply_b = json.loads(await b.line())
            assert reply_b == {"return": {"status": "prelaunch", "running": False}, "id": "b"}
            assert reply_a["id"] == "a" and set(reply_a) == {"return", "id"}
            assert _without_advertised(reply_a["return"]) == schema
            await a.silent(0.2, "a second line for client A")
            await b.silent(0.01, "a second line for client B")
            # The route goes on with the same QEMU connection: nothing was dropped.
            again = await a.command({"execute": "query-status", "id": "a2"})
            assert again["id"] == "a2"
            assert fake.connection_count == 1
        finally:
            await a.close()
            await b.close()


# -- crash recovery under a live incoming migration ------------------------------------------------


class CuttingRelay(Relay):
    """The crash-safety relay with actions taken once QEMU has *answered* the command:
    ``"kill-after"`` SIGKILLs the proxy, ``"cut-after"`` drops both connections (QEMU lost
    to a live proxy); either way the proxy never sees the reply."""

    async def _serve(self, preader: asyncio.StreamReader, pwriter: asyncio.StreamWriter) -> None:
        qreader, qwriter = await asyncio.open_unix_connection(self.qemu_sock, limit=16 << 20)
        self._conns += [pwriter, qwriter]
        on_reply: dict[object, str] = {}

        async def down() -> None:  # QEMU -> proxy
            while line := await qreader.readline():
                msg = json.loads(line)
                action = on_reply.get(msg.get("id")) if isinstance(msg, dict) else None
                if action is not None:
                    if action == "kill-after":
                        os.kill(self.proxy_pid, signal.SIGKILL)
                    qwriter.close()
                    pwriter.close()
                    self.fired.set()
                    return
                pwriter.write(line)
            pwriter.close()

        task = asyncio.ensure_future(down())
        framer = Framer()
        try:
            while data := await preader.read(65536):
                for item in framer.feed(data):
                    assert isinstance(item, Message) and isinstance(item.value, dict)
                    action = self.trigger(str(item.value.get("execute")))
                    if action is not None:
                        on_reply[item.value.get("id")] = action
                    qwriter.write(item.raw)
        except ConnectionError:
            pass
        finally:
            qwriter.close()
            pwriter.close()
            task.cancel()


def kill_descendants(pid: int) -> None:
    """End what QEMU spawned for an ``exec:`` migration (it outlives QEMU otherwise)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    todo, found = [pid], []
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    for child in found:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)


def journal_files(state: Path) -> list[Path]:
    return sorted(p for p in state.iterdir() if p.name.endswith(".json"))


@pytest.mark.qemu
@pytest.mark.parametrize("action", ["kill-after", "cut-after"])
@pytest.mark.parametrize("version", ["7.2", "10.0"])
async def test_recovery_never_reverts_a_live_incoming_migration(
    tmp_path: Path, version: str, action: str
) -> None:
    """A proxy cut off right after ``migrate-incoming`` reached QEMU must leave the client's
    capabilities alone: the incoming migration is listening and owns them.  QEMU 7.2 still
    answers ``query-migrate`` with ``{}`` then, exactly as before the command, so only the
    ``migration`` yank instance shows it; reverting would change a live migration."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    with QemuProcess(version, "-M", "none", "-incoming", "defer") as qemu:
        relay = CuttingRelay(qemu.sock_path, str(tmp_path / "relay.sock"))
        await relay.start()
        proxies: list[ProxyProcess] = []
        try:
            listen = tmp_path / "proxy.sock"
            proxy = await start_proxy(relay.path, listen, state, tmp_path)
            proxies.append(proxy)
            relay.proxy_pid = proxy.proc.pid
            before = await capabilities(str(listen))
            assert not before["xbzrle"] and not before["auto-converge"]

            relay.trigger = once("migrate-incoming", action)
            client = await AsyncRaw.connect(str(listen))
            await client.negotiate()
            await client.send(split_request("migrate-incoming", "exec:sleep 30"))
            await asyncio.wait_for(relay.fired.wait(), 10)
            if action == "kill-after":
                assert await asyncio.to_thread(proxy.proc.wait, 10) == -signal.SIGKILL
                assert journal_files(state), "the pending restore was not journaled"
                await client.close()
                listen = tmp_path / "proxy2.sock"
                proxy = await start_proxy(relay.path, listen, state, tmp_path)
                proxies.append(proxy)
            else:
                # QEMU was lost mid-sequence: the session ends with no reply (events only).
                rest = await client.eof()
                assert all("event" in json.loads(x) for x in rest.splitlines()), rest
                await asyncio.to_thread(proxy.wait_log, "upstream_id=2")
            log = await asyncio.to_thread(proxy.wait_log, "event=journal_")
            assert "event=journal_discarded" in log and "migration started" in log, log
            assert "event=journal_restored" not in log, log
            assert journal_files(state) == []
            after = await capabilities(str(listen))
            assert after["xbzrle"] and after["auto-converge"], after
        finally:
            kill_descendants(qemu.pid)
            for p in proxies:
                await asyncio.to_thread(p.stop)
            await relay.close()


# -- the state directory and the journal are not trusted -------------------------------------------


def journal_paths(state: Path, upstream: str, route: str = "vm") -> tuple[Path, Path]:
    """Where the proxy keeps ``route``'s journal for ``upstream``, and the per-route name
    proxies used before (planted there too, so a proxy reading either is judged)."""
    digest = hashlib.sha256(upstream.encode()).hexdigest()[:16]
    return state / f"{route}.{digest}.journal.json", state / f"{route}.split-journal.json"


def start_failures(proxy: ProxyProcess, timeout: float = 10.0) -> list[str]:
    """The proxy must exit 1 at once; returns its ``start_failed`` lines."""
    try:
        rc = proxy.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the proxy started:\n{proxy.log()}") from None
    text = proxy.log()
    assert rc == 1, text
    return log_lines(text, "start_failed")


def _group_writable(state: Path, tmp: Path) -> None:
    state.mkdir()
    state.chmod(0o770)


def _world_writable(state: Path, tmp: Path) -> None:
    state.mkdir()
    state.chmod(0o1777)


def _owned_by_nobody(state: Path, tmp: Path) -> None:
    tmp.chmod(0o711)  # that user may reach the directory, as under /run
    state.mkdir(mode=0o700)
    os.chown(state, NOBODY, NOBODY)
    # What that user can then do: plant a journal for the proxy (often root) to apply.
    subprocess.run(
        ["/bin/sh", "-c", 'printf "{}" > "$1"', "sh", str(state / "vm.split-journal.json")],
        user=NOBODY,
        group=NOBODY,
        cwd="/",
        check=True,
        timeout=30,
    )


def _symlink(state: Path, tmp: Path) -> None:
    real = tmp / "real-state"
    real.mkdir(mode=0o700)
    state.symlink_to(real)


BAD_STATE_DIRS: Final[dict[str, Callable[[Path, Path], None]]] = {
    "group-writable": _group_writable,
    "world-writable": _world_writable,
    "owned by uid 65534": _owned_by_nobody,
    "a symlink": _symlink,
}


@pytest.mark.parametrize("case", BAD_STATE_DIRS)
def test_untrusted_state_dir_refused_at_start(short_tmp: Path, case: str) -> None:
    """Whoever can write the state directory can make the proxy change a VM (a planted
    journal) or overwrite a file (a planted symlink): such a directory stops the start."""
    state = short_tmp / "state"
    BAD_STATE_DIRS[case](state, short_tmp)
    proxy = ProxyProcess(
        "--upstream",
        f"unix:{short_tmp}/none.sock",
        "--listen",
        f"unix:{short_tmp}/p.sock",
        "--state-dir",
        str(state),
        tmp_path=short_tmp,
    )
    with proxy:
        failed = start_failures(proxy)
        assert len(failed) == 1, proxy.log()
        assert "state_dir" in failed[0] and str(state) in failed[0], failed
    if case == "owned by uid 65534":
        # The planted file is still there, untouched (nothing read, nothing removed).
        assert (state / "vm.split-journal.json").read_text() == "{}"


def qemu_identity(qemu: QemuProcess) -> dict[str, Any]:
    """What the proxy records about a QEMU it reaches directly on ``qemu.sock_path``."""
    with RawQMP(qemu.sock_path) as c:
        greeting = c.negotiate()
        uuid = c.command({"execute": "query-uuid"})["return"]["UUID"]
        name = c.command({"execute": "query-name"})["return"].get("name")
    return {
        "upstream": f"unix:{qemu.sock_path}",
        "version": greeting["QMP"]["version"],
        "name": name,
        "uuid": uuid,
        "pid": qemu.pid,
    }


def journal_entry(identity: dict[str, Any]) -> dict[str, Any]:
    """A well-formed journal: ``migrate`` never ran, so restore ``events`` (to true)."""
    return {
        "route": "vm",
        "identity": identity,
        "restore": [{"capability": "events", "state": True}],
        "migration": {},
        "command": "migrate",
    }


Planter = Callable[[Path, dict[str, Any], Path], None]


def _json(change: Callable[[dict[str, Any]], None]) -> Planter:
    def plant(path: Path, entry: dict[str, Any], outside: Path) -> None:
        change(entry)
        path.write_text(json.dumps(entry))

    return plant


def _not_json(path: Path, entry: dict[str, Any], outside: Path) -> None:
    path.write_bytes(json.dumps(entry).encode()[:-20])


def _directory(path: Path, entry: dict[str, Any], outside: Path) -> None:
    path.mkdir()
    (path / "journal.json").write_text(json.dumps(entry))


def _symlink_out(path: Path, entry: dict[str, Any], outside: Path) -> None:
    target = outside / f"{path.name}.target"
    target.write_text(json.dumps(entry))
    path.symlink_to(target)


def _foreign_owner(path: Path, entry: dict[str, Any], outside: Path) -> None:
    path.write_text(json.dumps(entry))
    os.chown(path, NOBODY, NOBODY)


def _fifo(path: Path, entry: dict[str, Any], outside: Path) -> None:
    os.mkfifo(path, 0o600)  # reading it would wait for a writer that never comes


def _oversized(path: Path, entry: dict[str, Any], outside: Path) -> None:
    path.write_text(json.dumps(entry) + " " * MiB)  # valid JSON, but no journal is that big


BAD_JOURNALS: Final[dict[str, Planter]] = {
    "restore holds non-objects": _json(lambda e: e["restore"].extend([1, "events", None])),
    "restore names an unknown capability": _json(
        lambda e: e["restore"].append({"capability": "no-such-capability", "state": True})
    ),
    "restore is not a list": _json(lambda e: e.update(restore={"capability": "events"})),
    "restore item with an extra key": _json(lambda e: e["restore"][0].update(note="x")),
    "restore state is not a boolean": _json(lambda e: e["restore"][0].update(state=1)),
    "entry with an extra key": _json(lambda e: e.update(extra=True)),
    "not JSON": _not_json,
    "a directory": _directory,
    "a symlink to a file outside": _symlink_out,
    "owned by uid 65534": _foreign_owner,
    "a FIFO": _fifo,
    "1 MiB": _oversized,
}


@dataclasses.dataclass
class Planted:
    """What a proxy started on a planted journal did: its log, the capabilities a client then
    reads, and the path the proxy keeps the journal at."""

    log: str
    caps: dict[str, bool]
    journal: Path
    identity: dict[str, Any]


async def _with_planted_journal(tmp: Path, plant: Planter | None) -> Planted:
    """Plant a journal for a fresh QEMU 7.2 (``plant`` None: well-formed) and run a proxy."""
    state = tmp / "state"
    state.mkdir(mode=0o700)
    outside = tmp / "outside"
    outside.mkdir()
    with QemuProcess("7.2", "-M", "none") as qemu:
        identity = qemu_identity(qemu)
        current, legacy = journal_paths(state, identity["upstream"])
        legacy_identity = {k: v for k, v in identity.items() if k != "upstream"}
        for path, ident in ((current, identity), (legacy, legacy_identity)):
            entry = journal_entry(ident)
            if plant is None:
                path.write_text(json.dumps(entry))
            else:
                plant(path, entry, outside)
        listen = tmp / "p.sock"
        proxy = ProxyProcess(
            "--upstream",
            identity["upstream"],
            "--listen",
            f"unix:{listen}",
            "--state-dir",
            str(state),
            tmp_path=tmp,
        )
        with proxy:
            await asyncio.to_thread(proxy.wait_log, "event=upstream_ready")
            caps = await capabilities(str(listen))
            await served(str(listen))
            return Planted(proxy.log(), caps, current, identity)


@pytest.mark.qemu
async def test_journal_with_valid_shape_and_identity_is_applied(short_tmp: Path) -> None:
    """The control for the cases below: the same planted file, well-formed, for the same
    QEMU, whose migration never started, *is* applied (that is crash recovery working; the
    defence against planting is the directory's ownership)."""
    run = await _with_planted_journal(short_tmp, None)
    assert "event=journal_restored" in run.log and "outcome=ok" in run.log, run.log
    assert run.caps["events"] is True


@pytest.mark.qemu
@pytest.mark.parametrize("case", BAD_JOURNALS)
async def test_invalid_journal_is_moved_aside_never_applied(short_tmp: Path, case: str) -> None:
    """A journal the proxy could not have written (bad shape, not JSON, not a regular file,
    a symlink, another user's file) is never applied: it is moved aside for the operator and
    reported, and the route serves as usual."""
    plant = BAD_JOURNALS[case]
    run = await _with_planted_journal(short_tmp, plant)
    assert "event=journal_invalid" in run.log, run.log
    assert "event=journal_restored" not in run.log, run.log
    assert run.caps["events"] is False, "the planted restore was applied"
    assert not os.path.lexists(run.journal), f"{run.journal} is still there:\n{run.log}"
    aside = [p.name for p in (short_tmp / "state").iterdir() if ".invalid-" in p.name]
    assert len(aside) == 1, aside
    if plant is _symlink_out:  # the symlink was moved, its target left alone
        target = short_tmp / "outside" / f"{run.journal.name}.target"
        assert json.loads(target.read_text()) == journal_entry(run.identity)


# -- two proxies, one state directory --------------------------------------------------------------


@pytest.mark.qemu
async def test_proxies_on_different_upstreams_keep_separate_journals(tmp_path: Path) -> None:
    """Two proxies started alike (no --name, so both routes are "vm") on one state directory,
    each in front of its own QEMU, both killed mid-split: each QEMU gets its own restore.
    With one shared journal file, the second write replaced the first and one QEMU was left
    half-configured."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    with contextlib.ExitStack() as stack:
        qemus = [stack.enter_context(QemuProcess("7.2", "-M", "none")) for _ in range(2)]
        relays = [
            CuttingRelay(q.sock_path, str(tmp_path / f"relay{i}.sock")) for i, q in enumerate(qemus)
        ]
        for relay in relays:
            await relay.start()
        proxies: list[ProxyProcess] = []
        try:
            for i, relay in enumerate(relays):
                listen = tmp_path / f"p{i}.sock"
                proxy = await start_proxy(relay.path, listen, state, tmp_path)
                proxies.append(proxy)
                relay.proxy_pid = proxy.proc.pid
                relay.trigger = once("migrate-set-capabilities", "kill-after")
                client = await AsyncRaw.connect(str(listen))
                await client.negotiate()
                await client.send(split_request("migrate", "exec:cat > /dev/null"))
                await asyncio.wait_for(relay.fired.wait(), 10)
                assert await asyncio.to_thread(proxy.proc.wait, 10) == -signal.SIGKILL
                await client.close()
            # Both QEMUs now have the client's capabilities set, and nothing else happened.
            for q in qemus:
                with RawQMP(q.sock_path) as raw:
                    raw.negotiate()
                    caps = raw.command({"execute": "query-migrate-capabilities"})["return"]
                    assert {c["capability"]: c["state"] for c in caps}["xbzrle"] is True
            assert len(journal_files(state)) == 2, journal_files(state)
            for i, relay in enumerate(relays):
                listen = tmp_path / f"q{i}.sock"
                proxy = await start_proxy(relay.path, listen, state, tmp_path)
                proxies.append(proxy)
                log = await asyncio.to_thread(proxy.wait_log, "event=journal_")
                assert "event=journal_restored" in log and "outcome=ok" in log, log
                after = await capabilities(str(listen))
                assert not after["xbzrle"] and not after["auto-converge"], (i, after)
            assert journal_files(state) == []
        finally:
            for p in proxies:
                await asyncio.to_thread(p.stop)
            for relay in relays:
                await relay.close()


@pytest.mark.qemu
def test_second_proxy_on_same_upstream_refused(short_tmp: Path) -> None:
    """Two proxies for the same route and upstream would share one journal (each removing the
    other's pending restore): the second refuses to start, naming the lock.  A clean stop
    removes the lock file, and a new proxy starts."""
    state = short_tmp / "state"
    state.mkdir(mode=0o700)
    with QemuProcess("7.2", "-M", "none") as qemu:

        def proxy(n: int) -> ProxyProcess:
            return ProxyProcess(
                "--upstream",
                f"unix:{qemu.sock_path}",
                "--listen",
                f"unix:{short_tmp}/p{n}.sock",
                "--state-dir",
                str(state),
                tmp_path=short_tmp,
            )

        with proxy(1) as first:
            first.wait_log("event=upstream_ready")
            with proxy(2) as second:
                failed = start_failures(second)
                assert len(failed) == 1, second.log()
                assert "lock" in failed[0] and str(state) in failed[0], failed
            with RawQMP(f"{short_tmp}/p1.sock") as c:  # the first is unaffected
                c.negotiate()
            assert first.stop() == 0, first.log()
        assert [p.name for p in state.iterdir() if p.name.endswith(".lock")] == []
        with proxy(3) as third:
            third.wait_log("event=upstream_ready")
            with RawQMP(f"{short_tmp}/p3.sock") as c:
                c.negotiate()
            assert third.stop() == 0, third.log()


# -- output that never ends a line -----------------------------------------------------------------

FLOOD: Final = 48 * MiB  # well over the default line limit, under QEMU's 64 MiB token limit


def proc_status(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no {key} for {pid}")


@contextlib.asynccontextmanager
async def flooded_proxy(
    tmp: Path, pretty: bool, limit: int | None
) -> AsyncIterator[tuple[FakeQemu, ProxyProcess]]:
    flags = () if limit is None else ("--max-upstream-line", str(limit))
    async with FakeQemu(str(tmp / "q.sock"), pretty=pretty) as fake:
        proxy = ProxyProcess(
            "--upstream",
            fake.address,
            "--listen",
            f"unix:{tmp}/p.sock",
            "--state-dir",
            str(tmp),
            *flags,
            tmp_path=tmp,
        )
        try:
            await asyncio.to_thread(proxy.wait_log, "event=upstream_ready")
            yield fake, proxy
        finally:
            await asyncio.to_thread(proxy.stop)


async def _flood(fake: FakeQemu, head: bytes) -> None:
    """After the probe, QEMU writes ``head`` and then FLOOD bytes that never end it."""
    conn = fake.current
    assert conn is not None and conn.number == 1
    conn.write(head)
    chunk = b"a" * MiB
    sent = 0
    while sent < FLOOD and not conn.closed:
        conn.write(chunk)
        sent += len(chunk)
        await fake.wait_until(lambda: conn.closed or conn.unsent == 0, timeout=20)


HEADS: Final = {
    "line": b'{"event": "FLOOD", "data": {"text": "',
    # pretty=on: the greeting and every answer span lines; this message never ends.
    "pretty": b'{\r\n    "event": "FLOOD",\r\n    "data": {\r\n        "text": "',
}


@pytest.mark.parametrize("limit", [None, 4 * MiB], ids=["default-limit", "limit-4MiB"])
@pytest.mark.parametrize("form", HEADS)
async def test_endless_output_is_bounded(short_tmp: Path, form: str, limit: int | None) -> None:
    """A QEMU (or whatever answers on its socket) that writes without ever ending a message
    must not make the proxy buffer it all: past the line limit the connection is dropped as a
    desync, the route reconnects, and the memory the proxy took stays near that limit.  The
    pretty-printed form (QEMU's ``pretty=on``) is bounded by the same limit."""
    async with flooded_proxy(short_tmp, form == "pretty", limit) as (fake, proxy):
        pid = proxy.proc.pid
        before = proc_status(pid, "VmRSS")
        await _flood(fake, HEADS[form])
        grown = proc_status(pid, "VmHWM") - before
        bound = (limit or DEFAULT_MAX_UPSTREAM_LINE) + 10 * MiB
        assert grown <= bound, f"grew by {grown / MiB:.1f} MiB"
        log = await asyncio.to_thread(proxy.wait_log, "event=upstream_desync")
        assert "route=vm" in log_lines(log, "upstream_desync")[0]
        await fake.wait_until(lambda: fake.connection_count >= 2, timeout=10)
        await asyncio.to_thread(proxy.wait_log, "upstream_id=2")
        await served(f"{short_tmp}/p.sock")


# -- the journal write never follows a symlink -----------------------------------------------------


@pytest.mark.qemu
async def test_journal_write_never_follows_symlinks(short_tmp: Path) -> None:
    """Symlinks at the journal's path and at names its temporary file might have (the fixed
    name used before; guesses of the random one used now) point at a file outside the state
    directory: a split writes and removes its journal without ever touching that file."""
    state = short_tmp / "state"
    state.mkdir(mode=0o700)
    victim = short_tmp / "victim"
    victim.write_text("precious\n")
    with QemuProcess("7.2", "-M", "none") as qemu:
        upstream = f"unix:{qemu.sock_path}"
        listen = str(short_tmp / "p.sock")
        proxy = ProxyProcess(
            "--upstream",
            upstream,
            "--listen",
            f"unix:{listen}",
            "--state-dir",
            str(state),
            tmp_path=short_tmp,
        )
        with proxy:
            await asyncio.to_thread(proxy.wait_log, "event=upstream_ready")
            current, legacy = journal_paths(state, upstream)
            stem = current.name.removesuffix(".journal.json")
            planted = [current, legacy, legacy.with_suffix(".tmp")]
            planted += [state / f".{stem}.{i:016x}.tmp" for i in range(4)]
            for path in planted:
                path.symlink_to(victim)
            client = await AsyncRaw.connect(listen)
            try:
                await client.negotiate()
                reply = await client.command(
                    {
                        "execute": "migrate",
                        "id": "m",
                        "arguments": {"uri": "exec:cat > /dev/null", "capabilities": REQUESTED},
                    }
                )
                assert reply == {"return": {}, "id": "m"}, reply
            finally:
                await client.close()
            assert victim.read_text() == "precious\n"
            # The journal was written in place of the symlink, then removed.
            assert not os.path.lexists(current)
            assert "event=journal_write_failed" not in proxy.log()
            assert proxy.stop() == 0, proxy.log()


# -- sockets handed over by systemd ----------------------------------------------------------------


def activation_config(tmp: Path, upstream: str, listener: str) -> Path:
    state = tmp / "state"
    state.mkdir(mode=0o700, exist_ok=True)
    path = tmp / "act.toml"
    path.write_text(
        f'state_dir = "{state}"\n'
        f'[[route]]\nname = "vm1"\nupstream = "{upstream}"\nlisten = [{listener}]\n'
    )
    return path


@contextlib.contextmanager
def activated_proxy(tmp: Path, sock: socket.socket, config: Path) -> Iterator[Proc]:
    prefix, preexec = activated(sock)
    proc = Proc(prefix + python_proxy(config), tmp, {}, preexec)
    try:
        yield proc
    finally:
        proc.close()


def test_inherited_socket_that_is_not_listening_fails_at_once(short_tmp: Path) -> None:
    """A socket unit with ``Accept=yes`` passes a connected socket, not a listener: the proxy
    says so in one line and exits, instead of polling a socket whose accept() fails forever."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(short_tmp / "act.qmp"))
    server.listen(1)
    connected = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    connected.connect(str(short_tmp / "act.qmp"))
    config = activation_config(short_tmp, f"unix:{short_tmp}/none.sock", '"systemd:qmp"')
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    try:
        with activated_proxy(short_tmp, connected, config) as proc:
            rc = proc.wait(timeout=10)
            elapsed = time.monotonic() - started
            text = proc.log()
            assert rc == 1, text
            failed = log_lines(text, "start_failed")
            assert len(failed) == 1 and "not a listening socket" in failed[0], text
            assert "systemd:qmp" in failed[0], failed
            assert len(text.splitlines()) <= 3, text
        cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (
            cpu_after.ru_stime - cpu_before.ru_stime
        )
        assert cpu < 5.0 and elapsed < 10, (cpu, elapsed)
    finally:
        connected.close()
        server.close()


def tcp_listener(host: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((host, 0))
    sock.listen(8)
    return sock


def unix_listener(path: Path, mode: int) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    os.chmod(path, mode)
    sock.listen(8)
    return sock


REFUSED_INHERITED: Final[dict[str, tuple[str, str]]] = {
    # case: (what is handed over, what the refusal names)
    "tcp on 0.0.0.0": ("tcp", "allow_remote"),
    "unix socket of mode 0666": ("unix", "0666"),
}


@pytest.mark.parametrize("case", REFUSED_INHERITED)
def test_inherited_socket_open_to_others_refused(short_tmp: Path, case: str) -> None:
    """``allow_remote`` and the socket mode protect inherited listeners too: a TCP socket on
    a non-loopback address, or a unix socket anyone may connect to, is refused at start unless
    the listener's configuration accepts it."""
    kind, named = REFUSED_INHERITED[case]
    sock = tcp_listener("0.0.0.0") if kind == "tcp" else unix_listener(short_tmp / "act.qmp", 0o666)
    config = activation_config(short_tmp, f"unix:{short_tmp}/none.sock", '"systemd:qmp"')
    try:
        with activated_proxy(short_tmp, sock, config) as proc:
            rc = proc.wait(timeout=10)
            text = proc.log()
            assert rc == 1, text
            failed = log_lines(text, "start_failed")
            assert len(failed) == 1 and named in failed[0] and "systemd:qmp" in failed[0], text
    finally:
        sock.close()


ACCEPTED_INHERITED: Final[dict[str, tuple[str, str]]] = {
    # case: (what is handed over, the listener's configuration)
    "tcp on 0.0.0.0 with allow_remote": (
        "0.0.0.0",
        '{ address = "systemd:qmp", allow_remote = true }',
    ),
    "tcp on 127.0.0.1": ("127.0.0.1", '"systemd:qmp"'),
    "unix 0666 with mode 0660": ("unix", '{ address = "systemd:qmp", mode = "0660" }'),
}


@pytest.mark.qemu
@pytest.mark.parametrize("case", ACCEPTED_INHERITED)
def test_inherited_socket_accepted_as_configured(short_tmp: Path, case: str) -> None:
    """What the configuration accepts is served: a remote-capable TCP listener when
    ``allow_remote`` says so, a loopback one always, and a unix socket whose ``mode`` the
    configuration sets (the proxy applies it)."""
    host, listener = ACCEPTED_INHERITED[case]
    path = short_tmp / "act.qmp"
    sock = unix_listener(path, 0o666) if host == "unix" else tcp_listener(host)
    with QemuProcess("7.2", "-M", "none") as qemu:
        config = activation_config(short_tmp, f"unix:{qemu.sock_path}", listener)
        try:
            with activated_proxy(short_tmp, sock, config) as proc:
                proc.wait_log("event=upstream_ready")
                if host == "unix":
                    assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
                    with RawQMP(str(path)) as c:
                        c.negotiate()
                else:
                    port = sock.getsockname()[1]
                    with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
                        c.settimeout(10)
                        assert b'"QMP"' in c.recv(4096)
                proc.signal(signal.SIGTERM)
                assert proc.wait() == 0, proc.log()
        finally:
            sock.close()
