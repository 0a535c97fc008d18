"""Crash safety of a split against real QEMU: kill the proxy (SIGKILL) or cut it off from QEMU
at each step of the sequence, then check that the next proxy leaves QEMU as the client's command
would have: restored if the migration never started, as requested if it did.

A relay owned by the test sits between the proxy (a real ``qmp-proxy`` process) and QEMU, splits
what the proxy sends with the proxy's own framer, and acts when a chosen command passes.  The
second proxy also talks through a (passive) relay, so it sees the same peer as the first; QEMU's
identity includes the peer's pid.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from proxy.framing import Framer, Message
from proxy.journal import Journal
from tests.aclient import AsyncRaw
from tests.proxyproc import ProxyProcess
from tests.qemu import QemuProcess

REQUESTED = [
    {"capability": "xbzrle", "state": True},
    {"capability": "auto-converge", "state": True},
]


class Relay:
    """Unix-socket relay to QEMU; ``trigger(command) -> action`` decides per proxy command.

    Actions: ``None`` forward; ``"kill"`` SIGKILL the proxy before forwarding; ``"kill-after"``
    forward and SIGKILL the proxy when QEMU's reply comes, before passing it on; ``"cut"`` close
    both connections before forwarding (QEMU lost, proxy alive).
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
                    action = self.trigger(str(item.value.get("execute")))
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
    proxy = ProxyProcess("--upstream", f"unix:{relay_path}", "--listen", f"unix:{listen}",
                         "--state-dir", str(state), "--log-level", "debug",
                         tmp_path=tmp_path)  # fmt: skip
    await asyncio.to_thread(proxy.wait_log, "event=upstream_ready")
    return proxy


STEPS = [
    # (command seen by the relay, action, migration started?)
    ("migrate-set-capabilities", "kill", False),
    ("migrate-set-capabilities", "kill-after", False),
    ("migrate", "kill", False),
    ("migrate", "kill-after", True),
    ("migrate", "cut", False),
]


@pytest.mark.parametrize(("command", "action", "started"), STEPS)
async def test_split_interrupted_at_each_step(
    tmp_path: Path, command: str, action: str, started: bool
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    with QemuProcess("7.2", "-M", "none") as qemu:
        relay = Relay(qemu.sock_path, str(tmp_path / "relay.sock"))
        await relay.start()
        proxies: list[ProxyProcess] = []
        try:
            await _interrupt_and_recover(relay, state, tmp_path, proxies, command, action, started)
        finally:
            for p in proxies:
                await asyncio.to_thread(p.stop)
            await relay.close()


async def _interrupt_and_recover(
    relay: Relay,
    state: Path,
    tmp_path: Path,
    proxies: list[ProxyProcess],
    command: str,
    action: str,
    started: bool,
) -> None:
    listen = tmp_path / "proxy.sock"
    proxy = await start_proxy(relay.path, listen, state, tmp_path)
    proxies.append(proxy)
    relay.proxy_pid = proxy.proc.pid
    before = await capabilities(str(listen))
    assert not before["xbzrle"] and not before["auto-converge"]

    relay.trigger = once(command, action)
    client = await AsyncRaw.connect(str(listen))
    await client.negotiate()
    await client.send(json.dumps({
        "execute": "migrate", "id": "m",
        "arguments": {"uri": "exec:cat > /dev/null", "capabilities": REQUESTED},
    }).encode())  # fmt: skip
    await asyncio.wait_for(relay.fired.wait(), 10)
    journal = Journal(state, "vm", f"unix:{relay.path}").path
    if action != "cut":
        assert await asyncio.to_thread(proxy.proc.wait, 10) == -signal.SIGKILL
        assert journal.exists(), "the pending restore was not journaled"
        await client.close()
        # A new proxy, through the same relay (same peer as before), finds the journal.
        listen = tmp_path / "proxy2.sock"
        proxy = await start_proxy(relay.path, listen, state, tmp_path)
        proxies.append(proxy)
        log = await asyncio.to_thread(proxy.wait_log, "event=journal_")
    else:
        # QEMU was lost mid-sequence: the client's session ends, the route reconnects.
        assert await client.eof() == b""
        log = await asyncio.to_thread(proxy.wait_log, "event=journal_")
    assert not journal.exists()
    after = await capabilities(str(listen))
    if started:
        assert "event=journal_discarded" in log and "migration started" in log, log
        assert after["xbzrle"] and after["auto-converge"]
    else:
        assert "event=journal_restored" in log and "outcome=ok" in log, log
        assert after == before


async def test_journal_of_another_qemu_is_discarded(tmp_path: Path) -> None:
    """A journal left for a QEMU that is gone must never touch a new QEMU at the same path."""
    state = tmp_path / "state"
    state.mkdir()
    with QemuProcess("7.2", "-M", "none") as qemu:
        journal = Journal(state, "vm", f"unix:{qemu.sock_path}").path
        journal.write_text(json.dumps({
            "route": "vm", "command": "migrate", "migration": {},
            "identity": {"upstream": f"unix:{qemu.sock_path}", "version": {}, "name": None,
                         "uuid": None, "pid": 1},
            "restore": [{"capability": "events", "state": True}],
        }))  # fmt: skip
        listen = tmp_path / "proxy.sock"
        proxy = ProxyProcess("--upstream", f"unix:{qemu.sock_path}", "--listen", f"unix:{listen}",
                             "--state-dir", str(state), tmp_path=tmp_path)  # fmt: skip
        try:
            log = proxy.wait_log("event=upstream_ready")
            assert "event=journal_discarded" in log and "another QEMU" in log
            assert not journal.exists()
            assert (await capabilities(str(listen)))["events"] is False
        finally:
            assert proxy.stop() == 0
