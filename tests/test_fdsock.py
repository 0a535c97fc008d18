"""The socket layer under uvloop: a peer that resets the connection is still seen to go; writes
go out at once, or at the uncork of a burst; a failed send is reported from the loop.

libuv stops polling a socket whose poll reports an error, and uvloop then drops it without a
call to the reader; the first tests make the kernel report exactly that and check the stream
still delivers what the peer sent and then its end, on both of the proxy's loops.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from collections.abc import Awaitable, Callable

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


def _on_loop(scenario: Callable[[asyncio.AbstractEventLoop], Awaitable[None]]) -> None:
    loop = uvloop.new_event_loop()
    try:
        loop.run_until_complete(scenario(loop))
    finally:
        loop.close()


def _close_pairs(*pairs: tuple[Stream, socket.socket]) -> None:
    for stream, peer in pairs:
        stream.close()
        peer.close()


def test_a_write_with_nothing_queued_is_sent_before_write_returns() -> None:
    async def scenario(loop: asyncio.AbstractEventLoop) -> None:
        stream, peer, _ = await _stream_pair(loop)
        stream.write(b"one")
        assert peer.recv(16) == b"one"  # no trip through the loop
        stream.close()
        peer.close()

    _on_loop(scenario)


def test_a_cork_holds_every_streams_writes_until_uncorked_then_sends_them_in_order() -> None:
    async def scenario(loop: asyncio.AbstractEventLoop) -> None:
        (a, peer_a, _), (b, peer_b, _) = await _stream_pair(loop), await _stream_pair(loop)
        io = fdsock.IoLoop.of(loop)
        io.cork()
        io.cork()  # nested: only the outermost uncork sends
        for i in range(3):
            a.write(b"a%d " % i)
            b.write(b"b%d " % i)
        io.uncork()
        for peer in (peer_a, peer_b):
            with pytest.raises(BlockingIOError):
                peer.recv(64)
        io.uncork()
        assert peer_a.recv(64) == b"a0 a1 a2 "
        assert peer_b.recv(64) == b"b0 b1 b2 "
        a.write(b"after")  # uncorked again: at once
        assert peer_a.recv(64) == b"after"
        _close_pairs((a, peer_a), (b, peer_b))

    _on_loop(scenario)


@pytest.mark.parametrize("corked", [False, True])
def test_a_failed_send_closes_the_stream_and_is_reported_from_the_loop(corked: bool) -> None:
    """Neither a write nor the flush of a cork re-enters its caller through ``on_error``."""
    errors: list[str] = []

    async def scenario(loop: asyncio.AbstractEventLoop) -> None:
        ours, peer = socket.socketpair()
        peer.close()  # every send now fails with EPIPE
        stream = Stream(
            loop, ours, lambda data, fds: None, lambda: None, lambda e: errors.append(repr(e))
        )
        io = fdsock.IoLoop.of(loop)
        if corked:
            io.cork()
        stream.write(b"x")
        stream.write(b"y")  # dropped, or queued behind the first
        if corked:
            io.uncork()
        assert stream.closed and errors == []
        await asyncio.sleep(0)
        assert len(errors) == 1 and "BrokenPipe" in errors[0], errors

    _on_loop(scenario)


class _Spinning(Exception):
    """Raised by the alarm: not an OSError, which a send failure would be taken for."""


def test_an_empty_write_is_dropped_not_queued_for_ever() -> None:
    """An empty segment never leaves a queue (``send`` takes 0 bytes of it): queued, it would
    spin the flush, and the whole loop with it.  Its descriptors are closed: they travel only
    with a byte."""

    def alarm(signum: int, frame: object) -> None:
        raise _Spinning

    async def scenario(loop: asyncio.AbstractEventLoop) -> None:
        stream, peer, _ = await _stream_pair(loop)
        io = fdsock.IoLoop.of(loop)
        r, w = os.pipe()
        io.cork()
        stream.write(b"")
        stream.write(b"", [r])
        stream.write(b"x")
        io.uncork()
        assert peer.recv(16) == b"x"
        with pytest.raises(OSError):
            os.fstat(r)  # closed with its empty segment
        os.close(w)
        stream.close()
        peer.close()

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(5)
    try:
        _on_loop(scenario)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_a_flush_that_raises_at_uncork_leaves_no_other_stream_stuck() -> None:
    async def scenario(loop: asyncio.AbstractEventLoop) -> None:
        (a, peer_a, _), (b, peer_b, _) = await _stream_pair(loop), await _stream_pair(loop)
        io = fdsock.IoLoop.of(loop)

        def broken() -> None:
            raise RuntimeError("a bug")

        io.cork()
        a.write(b"a")
        b.write(b"b")
        a._flush = broken  # type: ignore[method-assign]
        with pytest.raises(RuntimeError):
            io.uncork()
        await asyncio.sleep(0)
        assert peer_b.recv(16) == b"b"
        _close_pairs((a, peer_a), (b, peer_b))

    _on_loop(scenario)
