"""The route's in-band lane: which client command goes to QEMU next, sans-IO.

QEMU runs a monitor's in-band commands one after another and stops *reading* the monitor once 7
are queued and another arrives (monitor/qmp.c handle_qmp_command, QMP_REQ_QUEUE_LEN_MAX = 8).
A stopped monitor cannot read ``exec-oob`` either, so the lane keeps at most :data:`WINDOW`
in-band commands in flight.  Sessions are served round-robin, one command each turn, as QEMU
serves its own monitors, so one client's long pipeline cannot starve the others.

Two gates close the lane for a while:

* an *exclusive* command (the backport's split sequence) waits until nothing is in flight and
  then owns the lane until :meth:`Lane.release`; nothing else starts meanwhile;
* a descriptor command (``getfd``, ``add-fd``, with or without descriptors of its own) waits
  while another is in flight: QEMU keeps one pending batch per monitor and, with OOB on, reads
  ahead, so a second command in its window would take or replace the first one's descriptors.
  After a failed command that carried descriptors the route keeps this gate closed until it
  has cleared whatever QEMU did not take (:meth:`Lane.done` with ``hold_fd_gate``).
"""

from __future__ import annotations

from collections import deque
from typing import Final

from proxy.session import Command

# One below QEMU's queue length of 8 (monitor/qmp.c handle_qmp_command: the monitor is suspended
# once the queue is full), so QEMU never stops reading exec-oob commands.
WINDOW: Final = 7


class Lane:
    def __init__(self, window: int = WINDOW) -> None:
        self.window = window
        self.in_flight = 0
        self._queues: dict[int, deque[Command]] = {}
        self._turns: deque[int] = deque()  # sessions with queued commands, in turn order
        self._held = False
        self._fd_cmd: Command | None = None

    @property
    def held(self) -> bool:
        return self._held

    @property
    def waiting(self) -> bool:
        """Some command is queued (it may still have to wait for the window or a gate)."""
        return bool(self._turns)

    @property
    def queued(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def start(self, cmd: Command) -> bool:
        """Start a plain command at once if it would be the next :meth:`ready` returns anyway
        (nothing queued, window open, no gate): the common, unloaded case skips the queue."""
        if self._turns or self._held or self.in_flight >= self.window or cmd.fd_command:
            return False
        self.in_flight += 1
        return True

    def submit(self, cmd: Command, exclusive: bool = False) -> None:
        """Queue an in-band command behind its session's earlier ones."""
        cmd.exclusive = exclusive
        sid = cmd.session.sid
        queue = self._queues.get(sid)
        if queue is None:
            queue = self._queues[sid] = deque()
        if not queue:
            self._turns.append(sid)
        queue.append(cmd)

    def ready(self) -> list[Command]:
        """Commands to send now, in order.  An exclusive one, if returned, comes last and alone
        holds the lane: its sender must call :meth:`release` when its sequence is over."""
        out: list[Command] = []
        turns = self._turns
        blocked = 0  # sessions passed over because their head waits for the fd gate
        gate = self._fd_cmd is not None
        while turns and not self._held and self.in_flight < self.window and blocked < len(turns):
            sid = turns[0]
            queue = self._queues[sid]
            cmd = queue[0]
            if cmd.exclusive:
                if self.in_flight:
                    break  # let the window drain; nothing may overtake the sequence
                self._take(sid, queue)
                self._held = True
                out.append(cmd)
                break
            if cmd.fd_command and gate:
                turns.rotate(-1)
                blocked += 1
                continue
            self._take(sid, queue)
            blocked = 0
            if cmd.fd_command:
                self._fd_cmd = cmd
                gate = True
            self.in_flight += 1
            out.append(cmd)
        return out

    def _take(self, sid: int, queue: deque[Command]) -> None:
        queue.popleft()
        self._turns.popleft()
        if queue:
            self._turns.append(sid)
        else:
            del self._queues[sid]

    def done(self, cmd: Command, hold_fd_gate: bool = False) -> bool:
        """QEMU answered an in-band command that :meth:`ready` handed out.  Returns whether
        commands are queued (the caller's cue to call :meth:`ready`).  ``hold_fd_gate`` keeps
        descriptor commands waiting after this one, until :meth:`open_fd_gate`."""
        if not cmd.exclusive:  # an exclusive one holds the lane instead (see :meth:`release`)
            self.in_flight -= 1
            if cmd is self._fd_cmd and not hold_fd_gate:
                self._fd_cmd = None
        return bool(self._turns)

    def open_fd_gate(self) -> bool:
        """The descriptor a failed command left in QEMU is cleared; returns :meth:`done`'s cue."""
        self._fd_cmd = None
        return bool(self._turns)

    def reserve(self) -> None:
        """One of the proxy's own in-band commands is in flight: it counts in the window."""
        self.in_flight += 1

    def unreserve(self) -> bool:
        """That command was answered; returns :meth:`done`'s cue."""
        self.in_flight -= 1
        return bool(self._turns)

    def release(self) -> None:
        """The exclusive sequence is over."""
        self._held = False

    def drop_session(self, sid: int) -> list[Command]:
        """Forget a vanished session's queued commands; they never reach QEMU."""
        queue = self._queues.pop(sid, None)
        if not queue:
            return []
        self._turns.remove(sid)
        return list(queue)

    def reset(self) -> list[Command]:
        """The upstream is gone: empty the lane, returning what never went out."""
        dropped = [cmd for queue in self._queues.values() for cmd in queue]
        self._queues.clear()
        self._turns.clear()
        self.in_flight = 0
        self._held = False
        self._fd_cmd = None
        return dropped
