"""The socket layer under uvloop: a peer that resets the connection is still seen to go.

libuv stops polling a socket whose poll reports an error, and uvloop then drops it without a
call to the reader; these tests make the kernel report exactly that and check the stream still
delivers what the peer sent and then its end, on both of the proxy's loops.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

import pytest
import uvloop

from proxy import fdsock
from proxy.fdsock import Stream

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "uvloop": uvloop.new_event_loop,
    "asyncio": asyncio.new_event_loop,
}


def _reset_by_peer(new_loop: Callable[[], asyncio.AbstractEventLoop]) -> tuple[bytes, str]:
    """The peer sends half a line and closes with our data unread: a TCP reset."""
    loop = new_loop()
    try:
        return loop.run_until_complete(_scenario(loop))
    finally:
        loop.close()


async def _scenario(loop: asyncio.AbstractEventLoop) -> tuple[bytes, str]:
    server = socket.create_server(("127.0.0.1", 0))
    ours = socket.create_connection(server.getsockname())
    peer, _ = server.accept()
    server.close()
    received = bytearray()
    ended: asyncio.Future[str] = loop.create_future()

    def end(how: str) -> None:
        if not ended.done():
            ended.set_result(how)

    stream = Stream(
        loop,
        ours,
        lambda data, fds: received.extend(data),
        lambda: end("eof"),
        lambda exc: end(type(exc).__name__),
    )
    stream.resume_reading()
    stream.write(b'{"execute": "query-status"}\n')  # left unread by the peer
    await asyncio.sleep(0.05)
    peer.sendall(b'{"return": {"stat')
    peer.close()  # unread data: the kernel sends a reset, not a FIN
    try:
        how = await asyncio.wait_for(ended, 5)
    finally:
        stream.close()
    return bytes(received), how


@pytest.mark.parametrize("name", sorted(LOOPS))
def test_reset_by_peer_is_seen(name: str) -> None:
    received, how = _reset_by_peer(LOOPS[name])
    assert how in {"ConnectionResetError", "eof"}
    # What arrived before the reset is either delivered whole or lost with the connection,
    # never cut at a place the peer did not send.
    assert b'{"return": {"stat'.startswith(received)


async def _stream_pair(
    loop: asyncio.AbstractEventLoop,
) -> tuple[Stream, socket.socket, list[bytes]]:
    ours, peer = socket.socketpair()
    received: list[bytes] = []
    stream = Stream(
        loop,
        ours,
        lambda data, fds: received.append(data),
        lambda: None,
        lambda exc: None,
    )
    stream.resume_reading()
    peer.setblocking(False)
    return stream, peer, received


def _closing_while_the_peer_writes(new_loop: Callable[[], asyncio.AbstractEventLoop]) -> bytes:
    loop = new_loop()
    try:
        return loop.run_until_complete(_closing_scenario(loop))
    finally:
        loop.close()


async def _closing_scenario(loop: asyncio.AbstractEventLoop) -> bytes:
    """The peer writes far more than the socket holds and reads only once its write is done,
    as a client pipelining big commands does; meanwhile we end the session, owing it more than
    the socket holds too.  Stopping reading now would leave each side waiting for the other."""
    stream, peer, _ = await _stream_pair(loop)
    owed = b"r" * (4 << 20)
    stream.write(owed)
    stream.close_after_flush()
    await asyncio.wait_for(loop.sock_sendall(peer, b"c" * (4 << 20)), 5)
    got = bytearray()
    while chunk := await asyncio.wait_for(loop.sock_recv(peer, 1 << 20), 5):
        got += chunk
    peer.close()
    assert stream.closed
    return bytes(got)


@pytest.mark.parametrize("name", sorted(LOOPS))
def test_a_closing_stream_keeps_reading_so_a_writing_peer_gets_its_replies(name: str) -> None:
    assert _closing_while_the_peer_writes(LOOPS[name]) == b"r" * (4 << 20)


def test_a_peer_that_never_reads_is_closed_after_the_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(fdsock, "FLUSH_DEADLINE", 0.2)
    loop = uvloop.new_event_loop()

    async def scenario() -> bool:
        stream, peer, _ = await _stream_pair(loop)
        stream.write(b"r" * (4 << 20))
        stream.close_after_flush()
        await asyncio.sleep(0.6)
        closed = stream.closed
        peer.close()
        return closed

    try:
        assert loop.run_until_complete(scenario())
    finally:
        loop.close()


def test_overflow_is_reported_after_the_write_never_inside_it() -> None:
    """The slow-reader limit must not re-enter the writer: ``on_overflow`` runs from the loop,
    and every write after the one that crossed the limit is dropped."""
    loop = uvloop.new_event_loop()
    calls: list[str] = []

    async def scenario() -> tuple[list[str], int, bool]:
        ours, peer = socket.socketpair()
        stream = Stream(
            loop,
            ours,
            lambda data, fds: None,
            lambda: None,
            lambda exc: None,
            max_backlog=64 * 1024,
            on_overflow=lambda: calls.append("overflow"),
        )
        for _ in range(64):
            stream.write(b"x" * 16 * 1024)
            calls.append("write")
        during = list(calls)
        queued = stream.backlog
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        overflowed = stream.overflowed
        stream.close()
        peer.close()
        return during, queued, overflowed

    try:
        during, queued, overflowed = loop.run_until_complete(scenario())
    finally:
        loop.close()
    assert during == ["write"] * 64
    assert calls == ["write"] * 64 + ["overflow"]
    assert overflowed
    assert queued <= 64 * 1024 + 16 * 1024  # nothing queued after the limit was crossed
