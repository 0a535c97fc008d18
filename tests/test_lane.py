"""Pure tests of :class:`proxy.lane.Lane`: which client command goes to QEMU next.

Commands come from real :class:`~proxy.session.Session` objects fed the bytes a client would
send, so the lane sees exactly what the route gives it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from proxy.lane import WINDOW, Lane
from proxy.session import Command, Session


class Client:
    """A negotiated session and a way to make its commands."""

    def __init__(self, sid: int) -> None:
        self.session = Session(sid, frozenset({"oob"}), 1 << 20)
        assert self.session.receive(b'{"execute":"qmp_capabilities"}') == [b'{"return": {}}\r\n']
        self.n = 0

    def send(self, data: bytes, fds: list[int] | None = None) -> Command:
        items = self.session.receive(data, fds)
        assert len(items) == 1 and isinstance(items[0], Command), items
        return items[0]

    def command(self, name: str = "query-status") -> Command:
        self.n += 1
        return self.send(
            b'{"execute":"%s","id":"s%d-%d"}' % (name.encode(), self.session.sid, self.n)
        )

    def commands(self, count: int) -> list[Command]:
        return [self.command() for _ in range(count)]

    def getfd(self, fd: int) -> Command:
        cmd = self.send(b'{"execute":"getfd","arguments":{"fdname":"f"}}', [fd])
        assert cmd.fds == [fd]
        return cmd


def label(cmds: list[Command]) -> list[str]:
    """Readable form for assertions: the client's id of each command."""
    return [(c.client_id or b"-").decode().strip('"') for c in cmds]


def is_held(lane: Lane) -> bool:
    """``lane.held`` re-read (a plain attribute test would stay narrowed for type checkers)."""
    return lane.held


def submit(lane: Lane, cmds: list[Command]) -> None:
    for cmd in cmds:
        lane.submit(cmd)


@pytest.fixture
def fds() -> Iterator[list[int]]:
    """Two real descriptors for fd-carrying commands (the lane never closes them)."""
    r, w = os.pipe()
    yield [r, w]
    os.close(r)
    os.close(w)


def test_window_is_seven() -> None:
    assert WINDOW == 7
    lane = Lane()
    a = Client(1)
    cmds = a.commands(10)
    submit(lane, cmds)
    first = lane.ready()
    assert first == cmds[:7]
    assert lane.in_flight == 7
    assert lane.ready() == []
    lane.done(first[0])
    assert lane.ready() == [cmds[7]]
    for cmd in first[1:3]:
        lane.done(cmd)
    assert lane.ready() == cmds[8:10]
    assert lane.in_flight == 7
    assert lane.queued == 0


def test_round_robin_one_command_per_turn() -> None:
    lane = Lane(window=100)
    a, b, c = Client(1), Client(2), Client(3)
    submit(lane, a.commands(3))
    submit(lane, b.commands(2))
    submit(lane, c.commands(3))
    turns = ["s1-1", "s2-1", "s3-1", "s1-2", "s2-2", "s3-2", "s1-3", "s3-3"]
    assert label(lane.ready()) == turns


def test_a_late_session_is_not_starved_by_a_long_pipeline() -> None:
    lane = Lane()
    a, b = Client(1), Client(2)
    pipeline = a.commands(60)
    submit(lane, pipeline)
    in_flight = lane.ready()
    assert in_flight == pipeline[:7]
    lonely = b.command()
    lane.submit(lonely)
    sent: list[Command] = []
    # QEMU answers one at a time; B must go within two answers, not after A's 53 others.
    for answered in in_flight[:2]:
        lane.done(answered)
        sent += lane.ready()
    assert lonely in sent
    assert label(sent) == ["s1-8", "s2-1"]


def test_round_robin_with_commands_queued_before_the_first_ready() -> None:
    lane = Lane()
    a, b = Client(1), Client(2)
    submit(lane, a.commands(20))
    submit(lane, b.commands(1))
    assert label(lane.ready()) == ["s1-1", "s2-1", "s1-2", "s1-3", "s1-4", "s1-5", "s1-6"]


def test_exclusive_waits_for_the_window_to_drain_and_holds_the_lane() -> None:
    lane = Lane()
    a, b, c = Client(1), Client(2), Client(3)
    a1, a2 = a.commands(2)
    submit(lane, [a1, a2])
    assert lane.ready() == [a1, a2]
    split = b.command("migrate")
    lane.submit(split, exclusive=True)
    later = c.command()
    lane.submit(later)
    assert lane.ready() == []  # two in flight: wait
    lane.done(a1)
    assert lane.ready() == []
    lane.done(a2)
    assert lane.ready() == [split]
    assert split.exclusive and lane.held
    # Held: nothing starts, however long, until the sequence is over.
    assert lane.ready() == []
    assert lane.ready() == []
    lane.release()
    assert not is_held(lane)
    assert lane.ready() == [later]


def test_nothing_overtakes_a_pending_exclusive() -> None:
    lane = Lane()
    a, b = Client(1), Client(2)
    pipeline = a.commands(10)
    submit(lane, pipeline)
    in_flight = lane.ready()
    split = b.command("migrate-incoming")
    lane.submit(split, exclusive=True)
    after = a.commands(3)
    submit(lane, after)
    # Each answer would free a slot; A may use its turn once, then B's exclusive blocks the lane.
    sent: list[Command] = []
    outstanding = list(in_flight)
    while outstanding and split not in sent:
        lane.done(outstanding.pop(0))  # QEMU answers in order
        got = lane.ready()
        sent += got
        outstanding += [cmd for cmd in got if not cmd.exclusive]
    assert sent[-1] is split
    assert lane.in_flight == 0
    assert label(sent[:-1]) == ["s1-8"]  # the turn A had before B's command arrived
    assert not any(cmd in sent for cmd in after)


def test_exclusive_alone_goes_at_once_and_comes_last() -> None:
    lane = Lane()
    a, b = Client(1), Client(2)
    split = b.command("migrate")
    lane.submit(split, exclusive=True)
    x = a.command()
    lane.submit(x)
    assert lane.ready() == [split]
    lane.release()
    assert lane.ready() == [x]


def test_second_fd_command_waits_but_others_proceed(fds: list[int]) -> None:
    lane = Lane()
    a, b, c = Client(1), Client(2), Client(3)
    first = a.getfd(fds[0])
    lane.submit(first)
    assert lane.ready() == [first]
    second = b.getfd(fds[1])
    behind = b.command()  # B's FIFO: must not overtake its own getfd
    other = c.command()
    submit(lane, [second, behind, other])
    assert lane.ready() == [other]
    assert lane.ready() == []
    lane.done(first)
    assert lane.ready() == [second, behind]
    assert lane.in_flight == 3


def test_fd_gate_reopens_for_the_same_session(fds: list[int]) -> None:
    lane = Lane()
    a = Client(1)
    first = a.getfd(fds[0])
    second = a.getfd(fds[1])
    submit(lane, [first, second])
    assert lane.ready() == [first]
    lane.done(first)
    assert lane.ready() == [second]


def test_drop_session_forgets_only_its_queue() -> None:
    lane = Lane(window=2)
    a, b = Client(1), Client(2)
    submit(lane, a.commands(5))
    submit(lane, b.commands(2))
    sent = lane.ready()
    assert label(sent) == ["s1-1", "s2-1"]
    dropped = lane.drop_session(1)
    assert label(dropped) == ["s1-2", "s1-3", "s1-4", "s1-5"]
    assert lane.drop_session(1) == []
    assert lane.drop_session(99) == []
    for cmd in sent:
        lane.done(cmd)  # in-flight commands of a dropped session still complete
    assert label(lane.ready()) == ["s2-2"]
    assert lane.queued == 0


def test_reset_empties_everything(fds: list[int]) -> None:
    lane = Lane()
    a, b, c = Client(1), Client(2), Client(3)
    fd_cmd = a.getfd(fds[0])
    lane.submit(fd_cmd)
    submit(lane, a.commands(8))
    assert len(lane.ready()) == 7
    split = b.command("migrate")
    lane.submit(split, exclusive=True)
    dropped = lane.reset()
    assert len(dropped) == 3 and split in dropped
    assert lane.in_flight == 0 and lane.queued == 0 and not lane.held
    # A fresh upstream: a full window again, and the fd gate is open.
    fresh = c.getfd(fds[1])
    lane.submit(fresh)
    more = c.commands(7)
    submit(lane, more)
    assert lane.ready() == [fresh, *more[:6]]


def test_reset_releases_a_held_lane() -> None:
    lane = Lane()
    split = Client(1).command("migrate")
    lane.submit(split, exclusive=True)
    assert lane.ready() == [split] and lane.held
    assert lane.reset() == []
    assert not is_held(lane)
    x = Client(2).command()
    lane.submit(x)
    assert lane.ready() == [x]


def test_start_skips_the_queue_only_when_ready_would_return_the_command_anyway(
    fds: list[int],
) -> None:
    lane = Lane(window=2)
    a, b = Client(1), Client(2)
    first, second, third = a.commands(3)
    assert lane.start(first) and lane.in_flight == 1
    assert lane.start(second) and lane.in_flight == 2
    assert not lane.start(third), "the window is full"
    lane.submit(third)
    lane.done(first)
    assert not lane.start(b.command()), "a queued command goes first"
    assert lane.ready() == [third]
    lane.done(second)
    lane.done(third)
    assert not lane.start(b.getfd(fds[0])), "descriptors go through the fd gate"
    held = Lane()
    cmd = a.command()
    held.submit(cmd, exclusive=True)
    assert held.ready() == [cmd] and is_held(held)
    assert not held.start(b.command()), "nothing starts while a split holds the lane"
