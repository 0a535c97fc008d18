"""One client's virtual monitor, sans-IO: negotiation, checks, ids, reply order, fd batches.

QEMU gives each monitor its own negotiation state and answers its in-band requests strictly in
order.  The proxy shares one upstream monitor among many clients, so each client's view of a
monitor is rebuilt here: a session answers what QEMU would answer without running anything
(negotiation, malformed input, top-level checks) and hands real commands to the route as
:class:`Command` objects.  Replies, local or from QEMU, leave in the order the requests came;
``exec-oob`` replies may overtake, as in QEMU.

The session never touches a socket: ``receive()`` takes bytes (and descriptors), returns bytes to
write now and commands to run; ``complete()`` takes a command's reply and returns what may now be
written.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import deque
from dataclasses import dataclass, field

from proxy import qjson, qmp
from proxy.framing import Framer, Message, ParseError
from proxy.policy import OPEN, Policy, disabled

# Commands that consume the descriptors QEMU's socket chardev holds (monitor/fds.c, misc.c).
FD_COMMANDS = frozenset({"getfd", "add-fd"})


@dataclass(eq=False, slots=True)
class Command:
    """A client command on its way to QEMU and back."""

    session: Session
    name: str
    raw: bytes
    id_span: tuple[int, int] | None
    client_id: bytes | None  # the client's id as QEMU would write it back; None: no id at all
    oob: bool
    arguments: dict[str, object] | None
    fds: list[int] = field(default_factory=list)
    reply: bytes | None = None
    upstream_id: int = 0
    exclusive: bool = False  # runs alone on the lane (the backport's split sequence)
    started: float = field(default_factory=time.monotonic)
    sent: float = 0.0

    def wire(self, upstream_id: int) -> bytes:
        """The client's own bytes with only the id replaced (or added) for the upstream."""
        self.upstream_id = upstream_id
        uid = b"%d" % upstream_id
        if self.id_span is not None:
            start, end = self.id_span
            return self.raw[:start] + uid + self.raw[end:]
        return b'{"id": ' + uid + b", " + self.raw[1:]


class Session:
    """The client-facing half of a monitor.  ``offered`` is what the greeting advertised."""

    def __init__(
        self,
        sid: int,
        offered: frozenset[str],
        max_message: int,
        policy: Policy = OPEN,
        max_queued: int = 1 << 30,
    ) -> None:
        self.sid = sid
        self.max_queued = max_queued
        self.offered = offered
        self.policy = policy
        self.negotiated = False
        self.oob = False
        self._framer = Framer(max_message)
        self._order: deque[Command | bytes] = deque()
        self._pending_fds: list[int] = []
        self._oob_pending = 0  # exec-oob commands sent and not yet answered
        # Framed but not yet handled: held while max_queued requests await replies.
        self._unhandled: deque[Message | ParseError] = deque()
        self.parse_errors: list[str] = []  # kinds, drained by the route for metrics
        self.denied: list[str] = []  # command names refused by policy, drained likewise

    def set_limits(self, max_message: int, max_queued: int) -> None:
        """Reloaded limits: they apply to what arrives from now on."""
        self._framer.set_max_message(max_message)
        self.max_queued = max_queued

    @property
    def queued(self) -> int:
        """In-band requests whose replies the client has not been sent yet."""
        return len(self._order)

    @property
    def finished(self) -> bool:
        """Nothing owed to the client: no reply pending, in-band or out-of-band, none held."""
        return not self._order and not self._oob_pending and not self._unhandled

    @property
    def buffered(self) -> int:
        return self._framer.buffered

    @property
    def busy(self) -> bool:
        """Stop reading the client: requests are held, or ``max_queued`` await replies."""
        return bool(self._unhandled) or len(self._order) >= self.max_queued

    @property
    def held(self) -> bool:
        """Requests are waiting for the queue to drain: the client must not be read meanwhile."""
        return bool(self._unhandled)

    def receive(self, data: bytes, fds: list[int] | None = None) -> list[Command | bytes]:
        """Feed client bytes; bytes in the result go to the client now, in that order."""
        if fds:
            # QEMU's socket chardev keeps only the latest batch: a newer one closes the older.
            self._close_fds(self._pending_fds)
            self._pending_fds = list(fds)
        self._unhandled.extend(self._framer.feed(data))
        return self.resume()

    def resume(self) -> list[Command | bytes]:
        """Handle held requests, as long as fewer than ``max_queued`` await replies."""
        out: list[Command | bytes] = []
        unhandled = self._unhandled
        while unhandled and len(self._order) < self.max_queued:
            item = unhandled.popleft()
            if isinstance(item, ParseError):
                self.parse_errors.append(item.kind)
                self._in_band(out, qmp.error_reply(item.desc))
            else:
                self._request(item, out)
        return out

    def _in_band(self, out: list[Command | bytes], reply: bytes) -> None:
        if self._order:
            self._order.append(reply)
        else:
            out.append(reply)

    def _request(self, msg: Message, out: list[Command | bytes]) -> None:
        value = msg.value
        if not isinstance(value, dict):
            self.parse_errors.append("not_object")
            self._in_band(out, qmp.error_reply(qmp.NOT_AN_OBJECT))
            return
        client_id = qjson.dumps(value["id"]) if "id" in value else None
        error, is_oob = qmp.check_request(value, self.oob)
        if error is None:
            name = value["exec-oob" if is_oob else "execute"]
            assert isinstance(name, str)
            arguments = value.get("arguments")
            assert arguments is None or isinstance(arguments, dict)
            if not self.negotiated:
                self._negotiate(name, arguments, client_id, out)
                return
            if not self.policy.permits_request(name, arguments):
                self.denied.append(name)
                self._refuse(value, out, qmp.error_reply(disabled(name), qmp.COMMAND_NOT_FOUND,
                                                         client_id))  # fmt: skip
                return
            cmd = Command(self, name, msg.raw, msg.id_span, client_id, is_oob, arguments)
            if name in FD_COMMANDS and self._pending_fds:
                cmd.fds, self._pending_fds = self._pending_fds, []
            if is_oob:
                self._oob_pending += 1
            else:
                self._order.append(cmd)
            out.append(cmd)
            return
        self.parse_errors.append("member")
        self._refuse(value, out, qmp.error_reply(error, client_id=client_id))

    def _refuse(self, value: dict[str, object], out: list[Command | bytes], reply: bytes) -> None:
        """An error reply to a request that never reaches QEMU."""
        if qmp.is_oob_request(value):
            out.append(reply)  # QEMU answers these at once, from its I/O thread
        else:
            self._in_band(out, reply)

    def _negotiate(
        self,
        name: str,
        arguments: dict[str, object] | None,
        client_id: bytes | None,
        out: list[Command | bytes],
    ) -> None:
        if name != "qmp_capabilities":
            reply = qmp.error_reply(qmp.NEGOTIATION_REQUIRED, qmp.COMMAND_NOT_FOUND, client_id)
        else:
            error, oob = qmp.capabilities_to_enable(arguments, self.offered)
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
        cmd.reply = reply
        ready: list[bytes] = []
        order = self._order
        while order:
            head = order[0]
            if isinstance(head, bytes):
                ready.append(head)
            elif head.reply is not None:
                ready.append(head.reply)
            else:
                break
            order.popleft()
        return ready

    def unsent(self) -> list[Command]:
        """Commands still waiting for a reply (for dropping when the client vanishes)."""
        return [c for c in self._order if isinstance(c, Command) and c.reply is None]

    def close_command_fds(self, cmd: Command) -> None:
        """A command that will never reach QEMU gives back its descriptors."""
        self._close_fds(cmd.fds)
        cmd.fds = []

    def close(self) -> None:
        """Release descriptors the client sent that no command took."""
        self._close_fds(self._pending_fds)
        self._pending_fds = []

    @staticmethod
    def _close_fds(fds: list[int]) -> None:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
