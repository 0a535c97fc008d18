"""The backport against a recording fake QEMU: exact ordering under contention, native mode.

Real QEMU proves the workflows (tests/test_backport_qemu.py); the fake records every command in
the order it arrives, which is what shows that no foreign command ever lands inside a split
sequence, and lets a schema *with* the ``capabilities`` member stand in for a patched QEMU.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.aclient import AsyncRaw
from tests.fakeqemu import FakeQemu, Return, default_schema
from tests.proxyproc import InProcessProxy, in_process

SPLIT_CAPS = [{"capability": "xbzrle", "state": True}, {"capability": "events", "state": True}]


@pytest.fixture
async def fake(short_tmp: Path) -> AsyncIterator[FakeQemu]:
    async with FakeQemu(str(short_tmp / "q.sock")) as f:
        f.on("migrate", lambda call: {})  # every migrate succeeds at once, none stays running
        yield f


@pytest.fixture
async def proxy(fake: FakeQemu, short_tmp: Path) -> AsyncIterator[InProcessProxy]:
    async with in_process(fake.path, short_tmp) as p:
        yield p


async def client(proxy: InProcessProxy, oob: bool = False) -> AsyncRaw:
    c = await AsyncRaw.connect(proxy.sock)
    await c.message()
    enable = b',"arguments":{"enable":["oob"]}' if oob else b""
    await c.send(b'{"execute":"qmp_capabilities"' + enable + b"}")
    assert await c.reply() == {"return": {}}
    return c


async def test_no_foreign_command_inside_any_split_under_contention(
    fake: FakeQemu, proxy: InProcessProxy
) -> None:
    stop = asyncio.Event()

    async def hammer(n: int) -> int:
        c = await client(proxy)
        sent = 0
        while not stop.is_set():
            state = sent % 2 == 0
            cap = "auto-converge" if n % 2 else "release-ram"
            await c.send(
                json.dumps(
                    {
                        "execute": "migrate-set-capabilities",
                        "id": f"h{n}-{sent}",
                        "arguments": {"capabilities": [{"capability": cap, "state": state}]},
                    }
                ).encode()
                + b'{"execute":"query-status"}'
            )
            await c.reply()
            await c.reply()
            sent += 2
        await c.close()
        return sent

    hammers = [asyncio.ensure_future(hammer(n)) for n in range(20)]
    migrator = await client(proxy)
    for i in range(15):
        reply = await migrator.command(
            {
                "execute": "migrate",
                "id": i,
                "arguments": {"uri": "exec:cat > /dev/null", "capabilities": SPLIT_CAPS},
            }
        )
        assert reply == {"return": {}, "id": i}
    stop.set()
    assert sum(await asyncio.gather(*hammers)) > 100  # the contention was real

    names = fake.commands()
    starts = [i for i, n in enumerate(names) if n == "query-migrate-capabilities"]
    assert len(starts) == 15
    for i in starts:
        # The split's own steps, back to back: remember, journal's look, set, run.
        window = fake.received[i : i + 4]
        assert [m.name for m in window] == [
            "query-migrate-capabilities",
            "query-migrate",
            "migrate-set-capabilities",
            "migrate",
        ], [m.name for m in window]
        assert window[2]["arguments"] == {"capabilities": SPLIT_CAPS}
        assert window[3]["arguments"] == {"uri": "exec:cat > /dev/null"}
    await migrator.close()


async def test_exec_oob_flows_while_a_split_holds_the_lane(
    fake: FakeQemu, proxy: InProcessProxy
) -> None:
    release = fake.stall("migrate")
    migrator = await client(proxy)
    other = await client(proxy, oob=True)
    await migrator.send(
        json.dumps(
            {
                "execute": "migrate",
                "id": "m",
                "arguments": {"uri": "exec:cat > /dev/null", "capabilities": SPLIT_CAPS},
            }
        ).encode()
    )
    await fake.wait_until(lambda: "migrate" in fake.commands())
    await other.send(b'{"execute":"query-status","id":"inband"}')
    await other.send(b'{"exec-oob":"yank","arguments":{"instances":[]},"id":"oob"}')
    assert await other.reply() == {"return": {}, "id": "oob"}  # overtakes the held lane
    assert "query-status" not in fake.commands()[fake.commands().index("migrate") :]
    release.set()
    assert await migrator.reply() == {"return": {}, "id": "m"}
    assert (await other.reply())["id"] == "inband"
    for c in (migrator, other):
        await c.close()


def _without_id(raw: bytes) -> dict[str, Any]:
    value: dict[str, Any] = json.loads(raw)
    value.pop("id", None)
    return value


async def test_native_qemu_gets_the_command_untouched(short_tmp: Path) -> None:
    schema = default_schema(migrate_capabilities=True)
    async with FakeQemu(str(short_tmp / "q.sock"), schema=schema) as fake:
        fake.on("migrate", lambda call: Return({}))
        async with in_process(fake.path, short_tmp) as proxy:
            c = await client(proxy)
            sent = (
                b'{"execute":"migrate","arguments":{"uri":"exec:cat > /dev/null",'
                b'"capabilities":[{"capability":"xbzrle","state":true}]},"id":"n"}'
            )
            before = len(fake.received)
            await c.send(sent)
            assert await c.reply() == {"return": {}, "id": "n"}
            arrived = fake.received[before:]
            assert [m.name for m in arrived] == ["migrate"]  # one command, no split
            # The client's own bytes, only the id replaced.
            assert _without_id(arrived[0].raw) == _without_id(sent)
            assert (
                arrived[0].raw.replace(
                    b'"id":%s' % json.dumps(arrived[0]["id"]).encode(), b'"id":"n"'
                )
                == sent
            )
            # The schema is relayed as QEMU sent it.
            reply = await c.command({"execute": "query-qmp-schema", "id": "s"})
            assert reply["return"] == json.loads(json.dumps(fake.schema))
            await c.close()
