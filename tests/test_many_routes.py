"""Many VMs in one process: a route whose QEMU is down, hung or dying does not affect the others.

One server, three routes: ``good`` in front of a healthy QEMU 7.2, ``hung`` in front of a socket
that accepts connections but never greets (a QEMU whose monitor is held, or wedged), and
``dying`` in front of a QEMU that is killed while ``good`` is busy.  A client of ``good`` keeps a
steady stream of commands going through all of it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from pathlib import Path

import pytest

from proxy import address
from proxy.config import Config, Limits, ListenConfig, RouteConfig
from proxy.server import Server
from proxy.upstream import Runstate
from tests.aclient import AsyncRaw
from tests.qemu import QemuProcess

pytestmark = pytest.mark.qemu  # every test here starts a real QEMU


def route(name: str, upstream: str, listen: Path) -> RouteConfig:
    return RouteConfig(name, address.parse(upstream), (ListenConfig(address.parse(str(listen))),))


async def wait_for(predicate: object, timeout: float = 10.0) -> None:
    assert callable(predicate)
    for _ in range(int(timeout / 0.02)):
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not reached")


async def test_one_route_down_hung_or_dying_leaves_the_others_serving(short_tmp: Path) -> None:
    hung_path = str(short_tmp / "hung.sock")
    hung = socket.socket(socket.AF_UNIX)
    hung.bind(hung_path)
    hung.listen(8)  # never accepted: connect() succeeds, no greeting ever comes
    try:
        with (
            QemuProcess("7.2", "-M", "none") as good_qemu,
            QemuProcess("7.2", "-M", "none") as dying_qemu,
        ):
            config = Config(
                (
                    route("good", good_qemu.sock_path, short_tmp / "good.sock"),
                    route("hung", hung_path, short_tmp / "hung-proxy.sock"),
                    route("dying", dying_qemu.sock_path, short_tmp / "dying-proxy.sock"),
                    route("down", str(short_tmp / "nothing.sock"), short_tmp / "down-proxy.sock"),
                ),
                Limits(client_wait=0.5, backoff_max=0.2),
                state_dir=short_tmp,
            )
            server = Server(config, asyncio.get_running_loop())
            server.start()
            try:
                good, hung_route, dying, down = server.routes
                await wait_for(lambda: good.state == dying.state == Runstate.READY)
                await wait_for(lambda: hung_route.state == Runstate.AWAITING_GREETING)
                assert server.not_ready() == {
                    "hung": "awaiting greeting",
                    "down": down.state.value,
                }
                client = await AsyncRaw.connect(str(short_tmp / "good.sock"))
                await client.negotiate()
                dying_client = await AsyncRaw.connect(str(short_tmp / "dying-proxy.sock"))
                await dying_client.negotiate()
                # A client of the hung route is held ungreeted, then closed after client_wait.
                waiting = await AsyncRaw.connect(str(short_tmp / "hung-proxy.sock"))

                answered = 0
                for i in range(60):
                    if i == 20:
                        os.kill(dying_qemu.pid, signal.SIGKILL)
                    reply = await client.command({"execute": "query-status", "id": i})
                    assert reply["id"] == i and reply["return"]["status"] == "prelaunch"
                    answered += 1
                    await asyncio.sleep(0.005)
                assert answered == 60
                assert await dying_client.eof() == b""  # the dying route's session ended
                assert await waiting.eof() == b""  # never greeted, closed after client_wait
                assert good.state == Runstate.READY
                assert hung_route.state == Runstate.AWAITING_GREETING
                assert dying.state != Runstate.READY
                await client.close()
            finally:
                await server.stop()
    finally:
        hung.close()
