"""Crash safety of a split against real QEMU: kill the proxy (SIGKILL) or cut it off from QEMU
at each step of the sequence, then check that the next proxy leaves QEMU as the client's command
would have: restored if the migration never started, as requested if it did.  Both commands, on
every installed QEMU: recovery of ``migrate-incoming`` asks QEMU whether an incoming migration
started, through the yank instance from 6.0 on and through the probe on 5.2.

A relay owned by the test sits between the proxy (a real ``qmp-proxy`` process) and QEMU, splits
what the proxy sends with the proxy's own framer, and acts when a chosen command passes.  The
second proxy also talks through a (passive) relay, so it sees the same peer as the first; QEMU's
identity includes the peer's pid.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from proxy.backport import PROBE_URI
from proxy.framing import Framer, Message
from proxy.journal import Journal
from tests.aclient import AsyncRaw
from tests.conftest import VERSIONS
from tests.proxyproc import ProxyProcess
from tests.qemu import QemuProcess

pytestmark = pytest.mark.qemu  # every test here starts a real QEMU

REQUESTED = [
    {"capability": "xbzrle", "state": True},
    {"capability": "auto-converge", "state": True},
]


class Relay:
    """Unix-socket relay to QEMU; ``trigger(command) -> action`` decides per proxy command.

    Actions: ``None`` forward; ``"kill"`` SIGKILL the proxy before forwarding; ``"kill-after"``
    forward and SIGKILL the proxy when QEMU's reply comes, before passing it on; ``"cut"`` close
    both connections before forwarding (QEMU lost, proxy alive).  The 5.2 pre-check's probe (a
    ``migrate-incoming`` too, which changes nothing worth a crash) is never a trigger.
    """

    def __init__(self, qemu_sock: str, path: str) -> None:
        self.qemu_sock = qemu_sock
        self.path = path
        self.trigger: Callable[[str], str | None] = lambda _: None
        self.proxy_pid = 0
        self.fired = asyncio.Event()
        self._server: asyncio.base_events.Server | None = None
        self._conns: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._serve, self.path)

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for w in self._conns:
            w.close()

    async def _serve(self, preader: asyncio.StreamReader, pwriter: asyncio.StreamWriter) -> None:
        qreader, qwriter = await asyncio.open_unix_connection(self.qemu_sock, limit=16 << 20)
        self._conns += [pwriter, qwriter]
        kill_on_reply: set[object] = set()

        async def down() -> None:  # QEMU -> proxy
            while line := await qreader.readline():
                msg = json.loads(line)
                if isinstance(msg, dict) and msg.get("id") in kill_on_reply:
                    os.kill(self.proxy_pid, signal.SIGKILL)
                    self.fired.set()
                    qwriter.close()
                    return
                pwriter.write(line)
            pwriter.close()

        task = asyncio.ensure_future(down())
        framer = Framer()
        try:
            while data := await preader.read(65536):
                for item in framer.feed(data):
                    assert isinstance(item, Message) and isinstance(item.value, dict)
                    msg = item.value
                    action = None if is_probe(msg) else self.trigger(str(msg.get("execute")))
                    if action == "kill":
                        os.kill(self.proxy_pid, signal.SIGKILL)
                        self.fired.set()
                        return
                    if action == "cut":
                        self.trigger = lambda _: None
                        self.fired.set()
                        return
                    if action == "kill-after":
                        kill_on_reply.add(item.value.get("id"))
                    qwriter.write(item.raw)
        finally:
            qwriter.close()
            pwriter.close()
            task.cancel()


def is_probe(msg: dict[str, Any]) -> bool:
    """The proxy's question to QEMU 5.2 whether an incoming migration has started."""
    arguments = msg.get("arguments")
    return isinstance(arguments, dict) and arguments.get("uri") == PROBE_URI


@contextlib.contextmanager
def group_ended(qemu: QemuProcess) -> Iterator[None]:
    """On leaving, end QEMU with what it spawned: the shell of an ``exec:`` migration outlives
    QEMU, in QEMU's process group (QemuProcess starts QEMU in a session of its own)."""
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(qemu.pid, signal.SIGKILL)


def split_request(command: str, uri: str) -> bytes:
    """A ``migrate`` or ``migrate-incoming`` with :data:`REQUESTED`, id ``"m"``: what the proxy
    splits, as a client writes it."""
    msg = {"execute": command, "id": "m", "arguments": {"uri": uri, "capabilities": REQUESTED}}
    return json.dumps(msg).encode()


def once(command: str, action: str) -> Callable[[str], str | None]:
    fired = False

    def trigger(name: str) -> str | None:
        nonlocal fired
        if name == command and not fired:
            fired = True
            return action
        return None

    return trigger


async def capabilities(sock: str) -> dict[str, bool]:
    c = await AsyncRaw.connect(sock)
    await c.negotiate()
    reply = await c.command({"execute": "query-migrate-capabilities"})
    await c.close()
    return {e["capability"]: e["state"] for e in reply["return"]}


async def start_proxy(relay_path: str, listen: Path, state: Path, tmp_path: Path) -> ProxyProcess:
    proxy = ProxyProcess(
        "--upstream",
        f"unix:{relay_path}",
        "--listen",
        f"unix:{listen}",
        "--state-dir",
        str(state),
        "--log-level",
        "debug",
        tmp_path=tmp_path,
    )
    await asyncio.to_thread(proxy.wait_log, "event=upstream_ready")
    return proxy


def steps(command: str) -> list[tuple[str, str, bool]]:
    """(command seen by the relay, action, migration started?), in an order one QEMU can take:
    an interruption before the migration starts is undone, so the next step begins from the
    same capabilities; the one that starts the migration comes last."""
    return [
        ("migrate-set-capabilities", "kill", False),
        ("migrate-set-capabilities", "kill-after", False),
        (command, "kill", False),
        (command, "cut", False),
        (command, "kill-after", True),
    ]


# migrate-incoming: "exec:sleep" waits without data, so the migration started but stays
# pending; on 5.2 only the probe can tell (nothing shows in query-migrate).
TARGETS = {
    "migrate": ("exec:cat > /dev/null", ()),
    "migrate-incoming": ("exec:sleep 20", ("-incoming", "defer")),
}


@pytest.mark.parametrize("command", ["migrate", "migrate-incoming"])
@pytest.mark.parametrize("version", VERSIONS)
async def test_split_interrupted_at_each_step(tmp_path: Path, version: str, command: str) -> None:
    """Each step on a fresh proxy; the proxy that recovers serves the next step, so one QEMU
    and one relay serve them all."""
    state = tmp_path / "state"
    state.mkdir()
    uri, qemu_args = TARGETS[command]
    with QemuProcess(version, "-M", "none", *qemu_args) as qemu, group_ended(qemu):
        relay = Relay(qemu.sock_path, str(tmp_path / "relay.sock"))
        await relay.start()
        proxies: list[tuple[ProxyProcess, Path]] = []
        try:
            listen = tmp_path / "proxy0.sock"
            proxies.append((await start_proxy(relay.path, listen, state, tmp_path), listen))
            for step in steps(command):
                await _interrupt_and_recover(
                    relay, state, tmp_path, proxies, version, command, uri, *step
                )
            assert qemu.returncode() is None, qemu.stderr_text()
        finally:
            for p, _ in proxies:
                await asyncio.to_thread(p.stop)
            await relay.close()


async def wait_logged(proxy: ProxyProcess, needle: str, count: int, timeout: float = 10) -> str:
    """The log once ``needle`` occurs ``count`` times in it."""
    deadline = time.monotonic() + timeout
    while (text := proxy.log()).count(needle) < count:
        assert proxy.proc.poll() is None and time.monotonic() < deadline, (needle, count, text)
        await asyncio.sleep(0.02)
    return text


async def _interrupt_and_recover(
    relay: Relay,
    state: Path,
    tmp_path: Path,
    proxies: list[tuple[ProxyProcess, Path]],
    version: str,
    client_command: str,
    uri: str,
    command: str,
    action: str,
    started: bool,
) -> None:
    proxy, listen = proxies[-1]
    where = f"{command} {action}"
    probed = client_command == "migrate-incoming" and version == "5.2"
    relay.proxy_pid = proxy.proc.pid
    before = await capabilities(str(listen))
    assert not before["xbzrle"] and not before["auto-converge"], where

    journaled = proxy.log().count("event=journal_")
    relay.fired.clear()
    relay.trigger = once(command, action)
    client = await AsyncRaw.connect(str(listen))
    await client.negotiate()
    await client.send(split_request(client_command, uri))
    await asyncio.wait_for(relay.fired.wait(), 10)
    journal = Journal(state, "vm", f"unix:{relay.path}").path
    if action != "cut":
        assert await asyncio.to_thread(proxy.proc.wait, 10) == -signal.SIGKILL, where
        assert journal.exists(), f"{where}: the pending restore was not journaled"
        await client.close()
        # A new proxy, through the same relay (same peer as before), finds the journal.
        listen = tmp_path / f"proxy{len(proxies)}.sock"
        proxy = await start_proxy(relay.path, listen, state, tmp_path)
        proxies.append((proxy, listen))
        log = await wait_logged(proxy, "event=journal_", 1)
    else:
        # QEMU was lost mid-sequence: the client's session ends, the route reconnects.  No
        # reply; on 5.2 the pre-check's probe made QEMU announce a setup before the cut.
        rest = [json.loads(line) for line in (await client.eof()).splitlines()]
        assert [(m.get("event"), m.get("data")) for m in rest] == (
            [("MIGRATION", {"status": "setup"})] if probed else []
        ), (where, rest)
        log = await wait_logged(proxy, "event=journal_", journaled + 1)
    assert not journal.exists(), where
    after = await capabilities(str(listen))
    last = log[log.rindex("event=journal_") :].splitlines()[0]
    if started:
        assert "event=journal_discarded" in last and "migration started" in last, (where, log)
        assert after["xbzrle"] and after["auto-converge"], where
    else:
        assert "event=journal_restored" in last and "outcome=ok" in last, (where, log)
        assert after == before, where


async def test_journal_of_another_qemu_is_discarded(tmp_path: Path) -> None:
    """A journal left for a QEMU that is gone must never touch a new QEMU at the same path."""
    state = tmp_path / "state"
    state.mkdir()
    with QemuProcess("7.2", "-M", "none") as qemu:
        journal = Journal(state, "vm", f"unix:{qemu.sock_path}").path
        journal.write_text(
            json.dumps(
                {
                    "route": "vm",
                    "command": "migrate",
                    "migration": {},
                    "identity": {
                        "upstream": f"unix:{qemu.sock_path}",
                        "version": {},
                        "name": None,
                        "uuid": None,
                        "pid": 1,
                    },
                    "restore": [{"capability": "events", "state": True}],
                }
            )
        )
        listen = tmp_path / "proxy.sock"
        proxy = ProxyProcess(
            "--upstream",
            f"unix:{qemu.sock_path}",
            "--listen",
            f"unix:{listen}",
            "--state-dir",
            str(state),
            tmp_path=tmp_path,
        )
        try:
            log = proxy.wait_log("event=upstream_ready")
            assert "event=journal_discarded" in log and "another QEMU" in log
            assert not journal.exists()
            assert (await capabilities(str(listen)))["events"] is False
        finally:
            assert proxy.stop() == 0
