"""One client's virtual monitor, sans-IO: negotiation, checks, ids, reply order, fd batches.

QEMU gives each monitor its own negotiation state and answers its in-band requests strictly in
order.  The proxy shares one upstream monitor among many clients, so each client's view of a
monitor is rebuilt here: a session answers what QEMU would answer without running anything
(negotiation, malformed input, top-level checks) and hands real commands to the route as
:class:`Command` objects.  Replies, local or from QEMU, leave in the order the requests came;
``exec-oob`` replies may overtake, as in QEMU.

The session never touches a socket: ``receive()`` takes bytes (and descriptors) and returns, in
order, bytes to write now, commands to run and :class:`Notice` items for the route to count and
log; ``complete()`` takes a command's reply and returns what may now be written.
"""

from __future__ import annotations

import contextlib
import enum
import os
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import orjson

from proxy import qjson, qmp
from proxy.dialect import DEFAULT, Dialect
from proxy.framing import QEMU_MAX_TOKEN_COUNT, Framer, Message, ParseError
from proxy.policy import OPEN, Policy, disabled

# Commands that consume the descriptors QEMU's socket chardev holds (monitor/fds.c: getfd and
# add-fd call qemu_chr_fe_get_msgfd()).  The route runs at most one of them at a time.
FD_COMMANDS = frozenset({"getfd", "add-fd"})
# The most a client message may be: the proxy writes it for QEMU with its own ``"id": N``, four
# tokens more than a message without one, and every token is at least a byte, so a message
# framed under this bound stays within QEMU's token count (its token size, 64 MiB, is then far).
MAX_CLIENT_MESSAGE = QEMU_MAX_TOKEN_COUNT - 4


class NoticeKind(enum.Enum):
    """Something about a client's input the route counts (and for some, logs)."""

    PARSE = "parse"  # malformed JSON: QEMU's id-less parse error
    LIMIT = "limit"  # over a size, token or nesting limit
    NOT_OBJECT = "not_object"
    MEMBER = "member"  # a top-level member fault (QMP's dispatch checks)
    DENIED = "denied"  # refused by the listener's policy; ``detail`` is the command name
    FDS_REFUSED = "fds_refused"  # a descriptor batch over the budget; ``detail`` its size


@dataclass(frozen=True, slots=True)
class Notice:
    kind: NoticeKind
    detail: str = ""


# What a request without an "id" member gives for it (a JSON null is an id).
_NO_ID = object()
# One of each detail-less kind: a read of garbage earns thousands.
_NOTICES = {kind: Notice(kind) for kind in NoticeKind}


class FdBudget:
    """Descriptors the proxy holds for clients, counted across every session of the process.

    A client passes descriptors before the command that uses them, and the proxy keeps them
    until then, so without a bound clients could fill the process's descriptor table and
    starve every accept.  The route makes one budget from ``RLIMIT_NOFILE``.
    """

    __slots__ = ("held", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    def take(self, count: int) -> bool:
        if self.held + count > self.limit:
            return False
        self.held += count
        return True

    def give(self, count: int) -> None:
        self.held -= count


UNLIMITED_FDS = FdBudget(1 << 30)


class Command:
    """A client command on its way to QEMU and back.

    Hand-written rather than a dataclass: one is made per command, and the dataclass'
    ``__init__`` (with a fresh list for every command's descriptors) cost more than the rest of
    the session's bookkeeping for it (``bench/instructions.py``).  Every attribute is set here,
    in slots: CPython 3.11 reads an attribute that falls back to a class default the slow way.
    """

    __slots__ = (
        "arguments",
        "carried_fds",
        "client_id",
        "exclusive",
        "fast",
        "fd_command",
        "fds",
        "name",
        "oob",
        "reply",
        "sent",
        "session",
        "started",
        "value",
    )

    def __init__(
        self,
        session: Session,
        name: str,
        value: dict[str, object],
        fast: bool,
        client_id: bytes | None,
        oob: bool,
        arguments: dict[str, object] | None,
    ) -> None:
        self.session = session
        self.name = name
        self.value = value  # the parsed request; its "id" becomes the upstream id
        self.fast = fast  # orjson parsed it, so orjson writes it back exactly
        self.client_id = client_id  # the client's id as QEMU writes it back; None: no id at all
        self.oob = oob
        self.arguments = arguments
        self.fds: Sequence[int] = ()
        self.fd_command = False  # consumes QEMU's pending descriptors: one at a time per route
        self.carried_fds = False  # went upstream with descriptors
        self.reply: bytes | None = None
        self.exclusive = False  # runs alone on the lane (the backport's split sequence)
        self.started = time.monotonic()
        self.sent = 0.0

    def wire(self, upstream_id: int) -> bytes:
        """The request as the proxy parsed it, under the upstream id, written for QEMU to read.

        Never the client's own bytes: QEMU receives exactly the one message the proxy checked.
        """
        value = self.value
        value["id"] = upstream_id
        return orjson.dumps(value) if self.fast else qjson.encode(value)


class Session:
    """The client-facing half of a monitor.  ``offered`` is what the greeting advertised."""

    def __init__(
        self,
        sid: int,
        offered: frozenset[str],
        max_message: int,
        *,
        policy: Policy = OPEN,
        max_queued: int = 1 << 30,
        max_held: int = 1 << 62,
        fd_budget: FdBudget = UNLIMITED_FDS,
        dialect: Dialect = DEFAULT,
    ) -> None:
        self.sid = sid
        self.dialect = dialect
        self._before_6_0 = dialect.before_6_0
        # Bytes of the proxy's own replies waiting in order behind a command QEMU has not
        # answered: over ``max_held``, the client is not read until they can leave.
        self._held_bytes = 0
        self.offered = offered
        self.policy = policy
        self.negotiated = False
        self.oob = False
        self._framer = Framer(rules=dialect.json_rules)
        self.set_limits(max_message, max_queued, max_held)
        self._order: deque[Command | bytes] = deque()
        self._budget = fd_budget
        self._pending_fds: list[int] = []
        self._oob_pending = 0  # exec-oob commands sent and not yet answered
        # Framed but not yet handled: held while max_queued requests await replies.
        self._unhandled: deque[Message | ParseError] = deque()

    def set_limits(self, max_message: int, max_queued: int, max_held: int = 1 << 62) -> None:
        """Reloaded limits: they apply to what arrives from now on."""
        self._framer.set_max_message(min(max_message, MAX_CLIENT_MESSAGE))
        self.max_queued = max_queued
        self.max_held = max_held

    @property
    def queued(self) -> int:
        """Requests whose replies the client has not been sent yet (``exec-oob`` included)."""
        return len(self._order) + self._oob_pending

    @property
    def finished(self) -> bool:
        """Nothing owed to the client: no reply pending, in-band or out-of-band, none held."""
        return not self._order and not self._oob_pending and not self._unhandled

    @property
    def buffered(self) -> int:
        return self._framer.buffered

    def busy(self) -> bool:
        """Stop reading the client: requests are held, or ``max_queued`` await replies (or
        ``max_held`` bytes of replies wait behind them).  A method, not a property: the route
        asks after every read, and CPython 3.11 calls a property the slow way."""
        # self._full(), inlined: the call costs ~600 instructions per round trip (measured).
        return (
            bool(self._unhandled)
            or len(self._order) + self._oob_pending >= self.max_queued
            or self._held_bytes > self.max_held
        )

    def _full(self) -> bool:
        """``max_queued`` await replies, or ``max_held`` bytes of replies wait behind them."""
        return (
            len(self._order) + self._oob_pending >= self.max_queued
            or self._held_bytes > self.max_held
        )

    def held(self) -> bool:
        """Requests are waiting for the queue to drain: the client must not be read meanwhile.
        (A method: the route asks after every reply.)"""
        return bool(self._unhandled)

    @property
    def pending_fds(self) -> int:
        """Descriptors the client passed that no command has taken yet."""
        return len(self._pending_fds)

    def receive(self, data: bytes, fds: list[int] | None = None) -> list[Command | bytes | Notice]:
        """Feed client bytes; bytes in the result go to the client now, in that order."""
        out: list[Command | bytes | Notice] = []
        if fds:
            # QEMU's socket chardev keeps only the latest batch: a newer one closes the older.
            self._drop_pending_fds()
            if not self._may_take_fds():
                # No command of this listener can ever use them: they must not hold the
                # process's budget against the clients that can.
                _close_all(fds)
            elif self._budget.take(len(fds)):
                self._pending_fds = list(fds)
            else:
                _close_all(fds)
                out.append(Notice(NoticeKind.FDS_REFUSED, str(len(fds))))
        items = self._framer.feed(data)
        unhandled = self._unhandled
        if unhandled:  # requests are held already: these wait behind them
            unhandled.extend(items)
            out.extend(self.resume())
            return out
        max_queued = self.max_queued
        order = self._order
        rest = iter(items)  # not enumerate(): it costs more than the usual one item's handling
        for item in rest:
            # self._full(), inlined
            if len(order) + self._oob_pending >= max_queued or self._held_bytes > self.max_held:
                unhandled.append(item)
                unhandled.extend(rest)
                break
            if type(item) is Message:  # the common case, without a call more
                self._request(item, out)
            else:
                self._item(item, out)
        return out

    def _may_take_fds(self) -> bool:
        policy = self.policy
        return policy.open or any(policy.permits(name) for name in FD_COMMANDS)

    def resume(self) -> list[Command | bytes | Notice]:
        """Handle held requests, as long as fewer than ``max_queued`` await replies."""
        out: list[Command | bytes | Notice] = []
        unhandled = self._unhandled
        while unhandled and not self._full():
            self._item(unhandled.popleft(), out)
        return out

    def _item(self, item: Message | ParseError, out: list[Command | bytes | Notice]) -> None:
        if isinstance(item, ParseError):
            out.append(_NOTICES[NoticeKind(item.kind)])
            self._in_band(out, qmp.error_reply(item.desc))
        else:
            self._request(item, out)

    def _in_band(self, out: list[Command | bytes | Notice], reply: bytes) -> None:
        if self._order:
            self._order.append(reply)
            self._held_bytes += len(reply)
        else:
            out.append(reply)

    def _request(self, msg: Message, out: list[Command | bytes | Notice]) -> None:
        value = msg.value
        if not isinstance(value, dict):
            out.append(_NOTICES[NoticeKind.NOT_OBJECT])
            self._in_band(out, qmp.error_reply(qmp.NOT_AN_OBJECT))
            return
        uid = value.get("id", _NO_ID)  # one lookup: null is an id too
        client_id = None if uid is _NO_ID else qjson.dumps(uid, self._before_6_0)
        error, is_oob = qmp.check_request(value, self.oob)
        if error is not None:
            out.append(_NOTICES[NoticeKind.MEMBER])
            self._refuse(value, out, qmp.error_reply(error, client_id=client_id))
            return
        name = value["exec-oob" if is_oob else "execute"]
        assert isinstance(name, str)
        arguments = value.get("arguments")
        assert arguments is None or isinstance(arguments, dict)
        if not self.negotiated:
            self._negotiate(name, arguments, client_id, out)
            return
        policy = self.policy
        if not policy.open and not policy.permits_request(name, arguments):
            out.append(Notice(NoticeKind.DENIED, name))
            reply = qmp.error_reply(disabled(name), qmp.COMMAND_NOT_FOUND, client_id)
            self._refuse(value, out, reply)
            return
        cmd = Command(self, name, value, msg.fast, client_id, is_oob, arguments)
        if is_oob:
            # exec-oob never carries descriptors (QEMU refuses getfd/add-fd out of band before
            # taking one): the batch stays pending for this client, as it would in QEMU.
            self._oob_pending += 1
        else:
            if name in FD_COMMANDS:
                cmd.fd_command = True
                cmd.fds, self._pending_fds = self._pending_fds, []
            self._order.append(cmd)
        out.append(cmd)

    def _refuse(
        self, value: dict[str, object], out: list[Command | bytes | Notice], reply: bytes
    ) -> None:
        """An error reply to a request that never reaches QEMU.

        With OOB enabled, QEMU answers an exec-oob-shaped request at once from its I/O thread;
        without it, QEMU reads nothing more until the in-band request before it is answered
        (monitor/qmp.c handle_qmp_command suspends the monitor), so the reply keeps its place.
        """
        if self.oob and qmp.is_oob_request(value):
            out.append(reply)
        else:
            self._in_band(out, reply)

    def _negotiate(
        self,
        name: str,
        arguments: dict[str, object] | None,
        client_id: bytes | None,
        out: list[Command | bytes | Notice],
    ) -> None:
        if name != "qmp_capabilities":
            reply = qmp.error_reply(qmp.NEGOTIATION_REQUIRED, qmp.COMMAND_NOT_FOUND, client_id)
        else:
            error, oob = qmp.capabilities_to_enable(arguments, self.offered, self.dialect)
            if error is None:
                reply = qmp.return_reply(client_id)
                self.negotiated = True
                self.oob = oob
            else:
                reply = qmp.error_reply(error, client_id=client_id)
        self._in_band(out, reply)

    def complete(self, cmd: Command, reply: bytes) -> list[bytes]:
        """QEMU answered ``cmd``; return the replies that may now go out, in order."""
        if cmd.oob:
            self._oob_pending -= 1
            return [reply]
        order = self._order
        if len(order) == 1 and order[0] is cmd:
            order.popleft()  # the usual case: the only request owed, answered
            return [reply]
        cmd.reply = reply
        ready: list[bytes] = []
        while order:
            head = order[0]
            if isinstance(head, bytes):
                ready.append(head)
                self._held_bytes -= len(head)
            elif head.reply is not None:
                ready.append(head.reply)
            else:
                break
            order.popleft()
        return ready

    def hand_over_fds(self, cmd: Command) -> list[int]:
        """The command's descriptors leave the budget: the caller sends (and closes) them."""
        fds = list(cmd.fds)
        cmd.fds = ()
        self._budget.give(len(fds))
        cmd.carried_fds = bool(fds)
        return fds

    def close_command_fds(self, cmd: Command) -> None:
        """A command that will never reach QEMU gives back its descriptors."""
        _close_all(self.hand_over_fds(cmd))

    def close(self) -> None:
        """Release descriptors the client sent that no command took."""
        self._drop_pending_fds()

    def _drop_pending_fds(self) -> None:
        fds, self._pending_fds = self._pending_fds, []
        self._budget.give(len(fds))
        _close_all(fds)


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
