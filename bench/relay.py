"""The floor: a minimal byte relay on uvloop, with no parsing at all.

``python bench/relay.py UPSTREAM LISTEN`` listens on the unix socket LISTEN and, for every
client, opens its own connection to the unix socket UPSTREAM and pipes bytes both ways.  It does
the least any Python relay on uvloop can do per message (one ``data_received`` callback and one
``write`` per chunk, asyncio Protocols, no buffering of its own), so what it adds to a round trip
is what no Python proxy can beat.  Flow control: a side whose peer's write buffer is full stops
reading until it drains, so nothing is buffered without bound.  Half-closes are passed on.

Prints ``listening`` on stdout once the socket accepts connections.  Addresses may carry QEMU's
``unix:`` prefix.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from typing import cast

import uvloop


class Pipe(asyncio.Protocol):
    """One side of a relayed connection; ``peer`` is the other side."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: Pipe | None = None
        self.eof = False
        self._early: list[bytes] = []  # what arrives before the two sides are joined

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is None or peer.transport is None:
            self._early.append(data)
            return
        peer.transport.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        peer = self.peer
        if peer is not None and peer.transport is not None:
            if peer.eof:
                peer.transport.close()
                return False
            peer.transport.write_eof()
        return True  # keep our write side open: the peer may still answer

    def connection_lost(self, exc: Exception | None) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None:
            peer.transport.close()

    # Flow control: our transport cannot take more, so stop the side that feeds it.
    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()

    def link(self, peer: Pipe) -> None:
        """Join two sides and pass on what either received before the join."""
        self.peer, peer.peer = peer, self
        for side in (self, peer):
            other = side.peer
            assert other is not None and other.transport is not None
            for data in side._early:
                other.transport.write(data)
            side._early.clear()
            if side.eof:
                other.transport.write_eof()


class ClientSide(Pipe):
    """An accepted client: opens its own upstream connection."""

    def __init__(self, upstream: str) -> None:
        super().__init__()
        self._upstream = upstream

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, upstream = await loop.create_unix_connection(Pipe, self._upstream)
        except OSError:
            if self.transport is not None:
                self.transport.close()
            return
        if self.transport is None or self.transport.is_closing():
            assert upstream.transport is not None
            upstream.transport.close()
            return
        self.link(upstream)


def _path(address: str) -> str:
    return address.removeprefix("unix:")


async def serve(upstream: str, listen: str) -> None:
    loop = asyncio.get_running_loop()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(listen)
    server = await loop.create_unix_server(lambda: ClientSide(upstream), listen)
    print("listening", flush=True)
    async with server:
        await server.serve_forever()


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python bench/relay.py UPSTREAM LISTEN", file=sys.stderr)
        return 2
    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(serve(_path(argv[0]), _path(argv[1])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
