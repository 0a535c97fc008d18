"""A route: one QEMU, its upstream session, its lane and the client sessions it serves (asyncio).

This is where the sans-IO pieces meet sockets: client bytes go through a
:class:`~proxy.session.Session`, commands through the :class:`~proxy.lane.Lane` to the
:class:`~proxy.upstream.Upstream`, replies back through the session to the client, events to
every negotiated session.  It also owns the upstream lifecycle: connect, probe, recover a
journaled split, serve, and on loss end every session (clients see what they would see if QEMU
died) and reconnect with capped exponential backoff.

Every callback that enters the route from the event loop is guarded: an unexpected exception
ends only the session that caused it (or, on QEMU's side, drops the QEMU connection as a
desync), is logged once with its traceback and counted; the route's own task never dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import secrets
import socket
import time
from collections.abc import Callable
from typing import Any

from proxy import qmp, replies, schema, splitting
from proxy.address import Address
from proxy.backport import Outcome
from proxy.config import Limits
from proxy.dialect import Dialect
from proxy.fdsock import CLIENT_READ_SIZE, IoLoop, Stream
from proxy.journal import Journal
from proxy.lane import Lane
from proxy.logs import Throttle, failure, fields
from proxy.metrics import DisconnectReason, RouteMetrics
from proxy.policy import OPEN, Policy
from proxy.schema import MIGRATE_COMMANDS
from proxy.session import UNLIMITED_FDS, Command, FdBudget, Notice, NoticeKind, Session
from proxy.upstream import Runstate, Upstream, UpstreamError

log = logging.getLogger("qmp_proxy.route")


# Replies the route does more with than hand on: the schema gets the backport's member, a native
# migrate with capabilities is counted.
_WATCHED_REPLIES = frozenset({"query-qmp-schema", *MIGRATE_COMMANDS})


def _carries_capabilities(cmd: Command) -> bool:
    """A migrate or migrate-incoming with ``capabilities``: what the backport is about."""
    return (
        cmd.name in MIGRATE_COMMANDS
        and cmd.arguments is not None
        and "capabilities" in cmd.arguments
    )


class Backoff:
    """Reconnect delays: ``low`` doubling to ``high``; back to ``low`` once a connection has
    served for ``high`` seconds, so a QEMU that dies right after its probe is not hammered."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self._delay = limits.backoff_min

    def next(self) -> float:
        delay = self._delay
        self._delay = min(delay * 2, self.limits.backoff_max)
        return delay

    def served(self, seconds: float) -> None:
        if seconds >= self.limits.backoff_max:
            self._delay = self.limits.backoff_min


class Client:
    """One accepted connection: its socket stream and, once greeted, its session."""

    def __init__(
        self,
        route: Route,
        sock: socket.socket,
        sid: int,
        listen: str,
        policy: Policy,
        peer: str = "",
        max_message: int | None = None,
    ) -> None:
        self.route = route
        self.sid = sid
        self.listen = listen
        self.policy = policy
        self.max_message = max_message  # the listener's own bound, below the route's
        self.peer = peer
        self.commands = 0  # answered (for the live view)
        # The route's own method, bound in C: no trampoline call per chunk read.
        on_data = functools.partial(route.client_data, self)
        self.stream = Stream(
            route.loop,
            sock,
            on_data,
            self._eof,
            self._error,
            read_size=CLIENT_READ_SIZE,
            max_backlog=route.limits.max_backlog,
            on_overflow=self._overflow,
        )
        self.session: Session | None = None
        self.half_closed = False
        self.paused = False
        self.ended = False
        self.connected_at = time.monotonic()
        self.connected_since = time.time()

    def _eof(self) -> None:
        self.route.guarded(self, self.route.client_eof, self)

    def _error(self, exc: OSError) -> None:
        # A loop callback of its own (a failed send is reported from the loop): guarded too.
        self.route.guarded(self, self.route.end, self, "reset", str(exc))

    def _overflow(self) -> None:
        why = f"output backlog over {self.stream.max_backlog} bytes"
        self.route.guarded(self, self.route.end, self, "slow", why)


class Route:
    """Everything served by one upstream QEMU."""

    def __init__(
        self,
        name: str,
        upstream: Address,
        limits: Limits,
        loop: asyncio.AbstractEventLoop,
        metrics: RouteMetrics,
        *,
        journal: Journal,
        backport: bool = True,
        on_state: Callable[[], None] | None = None,
        probe_lock: asyncio.Lock | None = None,
        fd_budget: FdBudget = UNLIMITED_FDS,
    ) -> None:
        self.name = name
        self.address = upstream
        self.limits = limits
        self.loop = loop
        self._io = IoLoop.of(loop)
        self.metrics = metrics
        self.journal = journal
        self.backport = backport
        self.probe_lock = probe_lock
        self.fd_budget = fd_budget
        self._on_state = on_state
        self.lane = Lane()
        self.clients: dict[int, Client] = {}
        self.upstream: Upstream | None = None
        self.state = Runstate.DOWN
        self.restore_failures = 0
        self.mode = ""  # what the backport does with the QEMU now behind it (live view)
        self._failures = 0  # connection attempts failed in a row
        self._failure_result: str | None = None
        self.dialect = Dialect()
        self._greeting = b""
        self._offered: frozenset[str] = frozenset()
        self._next_sid = 0
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._splitting: asyncio.Task[None] | None = None
        self._connections = 0
        self._throttle = Throttle(log)
        # Sessions' start and end lines: anyone who may connect can cause them at will.
        self._session_log = Throttle(log, burst=100)

    # -- upstream lifecycle ------------------------------------------------------------------

    def start(self) -> None:
        self._task = self.loop.create_task(self._run(), name=f"route-{self.name}")

    async def _run(self) -> None:
        """Connect, serve, reconnect: forever, whatever QEMU or the proxy's own code does."""
        backoff = Backoff(self.limits)
        while not self._stopping:
            try:
                served = await self._serve_once()
            except Exception as exc:  # a bug: never let it end the route
                self.metrics.internal_error()
                failure(log, "route_internal_error", exc, route=self.name)
                if self.upstream is not None:
                    self.upstream.close(f"internal error: {exc!r}")
                served = 0.0
            backoff.served(served)
            await asyncio.sleep(backoff.next())

    async def _serve_once(self) -> float:
        """One connection to QEMU, from connect to loss; returns how long it served."""
        self._connections += 1
        up = Upstream(
            self.loop,
            self.address,
            route=self.name,
            on_event=self._event,
            on_reply=self._reply,
            on_state=self._set_state,
            metrics=self.metrics,
            probe_lock=self.probe_lock,
            max_line=self.limits.max_upstream_line,
            upstream_sid=self._connections,
        )
        self.upstream = up
        try:
            await up.connect()
            self.dialect = up.dialect
            await splitting.recover(self.journal, up, self.metrics)
        except UpstreamError as exc:
            up.close(str(exc))
            self.metrics.connect(exc.result)
            self._connect_failed(exc)
            return 0.0
        self.metrics.connect("ok")
        up.set_ready()
        self._ready(up)
        served_from = time.monotonic()
        why = await up.lost
        self._upstream_lost(up, why)
        return time.monotonic() - served_from

    def _connect_failed(self, exc: UpstreamError) -> None:
        """A QEMU that stays away is logged when the failure starts or changes, then at the
        1st, 2nd, 4th, 8th... attempt with the count: not a line per retry for ever."""
        self._failures += 1
        n = self._failures
        changed = exc.result != self._failure_result
        self._failure_result = exc.result
        if changed or n & (n - 1) == 0:
            log.warning(
                fields(
                    "upstream_connect_failed",
                    route=self.name,
                    upstream=str(self.address),
                    result=exc.result,
                    why=str(exc),
                    attempts=n,
                )
            )

    def _ready(self, up: Upstream) -> None:
        native = all(up.schema.native(c) for c in MIGRATE_COMMANDS)
        mode = "native" if native else "split"
        self.mode = mode if self.backport else "off"
        log.info(
            fields(
                "upstream_ready",
                route=self.name,
                upstream=str(self.address),
                upstream_id=up.upstream_sid,
                qemu=up.qemu,
                oob=up.oob,
                mode=mode,
                after_attempts=self._failures or None,
            )
        )
        self._failures, self._failure_result = 0, None
        self.metrics.probed(up.schema.commands, up.schema.events, up.qemu, mode)
        self.metrics.up = 1
        self._offered = frozenset({"oob"}) if up.oob else frozenset()
        self._greeting = qmp.greeting(up.greeting_line, sorted(self._offered))
        for client in list(self.clients.values()):
            if client.session is None:
                self.guarded(client, self._greet, client)

    def _set_state(self, state: Runstate) -> None:
        if state != self.state:
            self.state = state
            # While QEMU stays away, connecting/down cycles are told by the failure lines.
            if not (self._failures and state in (Runstate.CONNECTING, Runstate.DOWN)):
                log.info(fields("upstream_state", route=self.name, state=state.value))
            self._report()

    def _report(self) -> None:
        """Something STATUS= shows changed (state, client count, failed restores)."""
        if self._on_state is not None:
            self._on_state()

    def _upstream_lost(self, up: Upstream, why: str) -> None:
        log.warning(fields("upstream_lost", route=self.name, upstream_id=up.upstream_sid, why=why))
        self.metrics.up = 0
        for cmd in self.lane.reset():
            self._drop(cmd)
        for cmd in up.pending_commands():
            self.metrics.command(cmd.name, "dropped")
        for client in list(self.clients.values()):
            if client.session is not None:
                self.end(client, "upstream_lost", flush=True)

    async def stop(self) -> None:
        """Stop serving: end every session and the upstream connection."""
        self._stopping = True
        for client in list(self.clients.values()):
            self.end(client, "shutdown", flush=True)
        if self.upstream is not None:
            self.upstream.close("proxy shutting down")
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.journal.unlock()

    def in_flight(self) -> int:
        """How many splits and client sessions are still owed replies (the shutdown drain
        waits for zero); a count of sessions, not of commands."""
        busy = self._splitting is not None and not self._splitting.done()
        return busy + sum(not c.session.finished for c in self.clients.values() if c.session)

    # -- clients -----------------------------------------------------------------------------

    def guarded(self, client: Client, function: Callable[..., Any], *args: Any) -> None:
        """Run a client's callback; an unexpected exception ends that client only."""
        try:
            function(*args)
        except Exception as exc:
            self._client_failed(client, exc)

    def _client_failed(self, client: Client, exc: Exception) -> None:
        self.metrics.internal_error()
        if self._throttle.allow():
            failure(log, "session_internal_error", exc, route=self.name, session=client.sid)
        with contextlib.suppress(Exception):
            self.end(client, "error", repr(exc))

    def accept(
        self,
        sock: socket.socket,
        peer: str,
        listen: str,
        policy: Policy = OPEN,
        *,
        max_message: int | None = None,
    ) -> None:
        self._next_sid += 1
        sid = self._next_sid
        self.metrics.connections += 1
        # Per listener: clients of one socket (a world-writable monitoring one) must not be
        # able to take the sessions of another (the manager's).
        held = sum(1 for c in self.clients.values() if c.listen == listen)
        if held >= self.limits.max_sessions or self._stopping:
            why = "shutting down" if self._stopping else "session limit"
            if self._throttle.allow():
                log.warning(
                    fields(
                        "session_refused",
                        route=self.name,
                        session=sid,
                        peer=peer,
                        why=why,
                        limit=self.limits.max_sessions,
                    )
                )
            self.metrics.disconnect("limit")
            sock.close()
            return
        client = Client(self, sock, sid, listen, policy, peer, max_message)
        self.clients[sid] = client
        self.metrics.sessions = len(self.clients)
        self._report()
        if self._session_log.allow():
            log.info(
                fields(
                    "session_start",
                    route=self.name,
                    session=sid,
                    peer=peer,
                    listen=listen,
                    policy=None if policy.open else "restricted",
                )
            )
        if self.state == Runstate.READY:
            self._greet(client)
        elif math.isfinite(self.limits.client_wait):  # inf: held until QEMU greets
            self.loop.call_later(
                self.limits.client_wait, self.guarded, client, self._wait_expired, client
            )

    def set_limits(self, limits: Limits) -> None:
        """Reloaded limits apply to the live sessions too, as policies do."""
        self.limits = limits
        for client in list(self.clients.values()):
            client.stream.max_backlog = limits.max_backlog
            session = client.session
            if session is not None and not client.ended:
                session.set_limits(self._max_message(client), limits.max_queued, limits.max_backlog)
                if session.held():
                    self.guarded(client, self._handle, client, session, session.resume())
                else:
                    self.guarded(client, self._settle, client, session)

    def set_policy(self, listen: str, policy: Policy, max_message: int | None = None) -> None:
        """A reloaded policy (and message bound) applies to the listener's live sessions too."""
        limits = self.limits
        for client in self.clients.values():
            if client.listen == listen:
                client.policy = policy
                client.max_message = max_message
                if client.session is not None:
                    client.session.policy = policy
                    client.session.set_limits(
                        self._max_message(client), limits.max_queued, limits.max_backlog
                    )

    def _max_message(self, client: Client) -> int:
        bound = client.max_message
        limit = self.limits.max_message
        return limit if bound is None else min(bound, limit)

    def _wait_expired(self, client: Client) -> None:
        if client.session is None and not client.ended:
            self.end(client, "limit", "upstream not ready within client_wait")

    def _greet(self, client: Client) -> None:
        client.session = Session(
            client.sid,
            self._offered,
            self._max_message(client),
            policy=client.policy,
            max_queued=self.limits.max_queued,
            max_held=self.limits.max_backlog,
            fd_budget=self.fd_budget,
            dialect=self.dialect,
        )
        self._write(client, self._greeting)
        client.stream.resume_reading()

    def _write(self, client: Client, data: bytes) -> None:
        self.metrics.client_out += len(data)
        client.stream.write(data)

    def client_data(self, client: Client, data: bytes, fds: list[int]) -> None:
        try:
            session = client.session
            assert session is not None
            self.metrics.client_in += len(data)
            items = session.receive(data, fds)
            if len(items) <= 1:
                self._handle(client, session, items)
                return
            # A pipelined batch, or garbage earning many error replies: what it makes the
            # proxy write leaves in one send per socket.
            self._io.cork()
            try:
                self._handle(client, session, items)
            finally:
                self._io.uncork()
        except Exception as exc:
            self._client_failed(client, exc)

    def _handle(
        self, client: Client, session: Session, items: list[Command | bytes | Notice]
    ) -> None:
        up = self.upstream
        if up is not None and not up.ready:
            up = None  # in-band commands wait in the lane
        queued = False
        rest = iter(items)  # not enumerate(): it costs more than the usual one item's handling
        for item in rest:
            if type(item) is Command:  # the commonest item first
                if item.oob:
                    if up is not None:
                        up.send(item)
                elif item.name in MIGRATE_COMMANDS and self._splits(item):
                    self.lane.submit(item, exclusive=True)
                    queued = True
                elif up is not None and self.lane.start(item):
                    self.metrics.lane_wait.zeros += 1  # it never queued
                    up.send(item)
                else:
                    self.lane.submit(item)
                    queued = True
            elif isinstance(item, bytes):
                self._write(client, item)
                if client.stream.overflowed:
                    # One read of garbage can earn thousands of error replies: the backlog is
                    # policed per reply (by the stream, which ends the session soon after), and
                    # what was not yet handled is dropped.
                    for dropped in rest:
                        if isinstance(dropped, Command):
                            session.close_command_fds(dropped)
                    return
            else:
                assert isinstance(item, Notice)
                self._notice(client, item)
        if queued:
            self._pump()
        if client.paused or client.half_closed or session.busy():
            self._settle(client, session)

    def _notice(self, client: Client, notice: Notice) -> None:
        kind = notice.kind
        if kind is NoticeKind.DENIED:
            self.metrics.denial(notice.detail)
            if self._throttle.allow():
                log.info(
                    fields(
                        "policy_denied", route=self.name, session=client.sid, command=notice.detail
                    )
                )
        elif kind is NoticeKind.FDS_REFUSED:
            self.metrics.fd_refused()
            if self._throttle.allow():
                log.warning(
                    fields(
                        "fd_batch_refused",
                        route=self.name,
                        session=client.sid,
                        count=notice.detail,
                        held=self.fd_budget.held,
                        limit=self.fd_budget.limit,
                    )
                )
        else:
            self.metrics.protocol_error(kind.value)

    def _settle(self, client: Client, session: Session) -> None:
        """Pause or resume reading; finish a half-closed session."""
        if session.busy():
            if not client.paused:
                client.paused = True
                client.stream.pause_reading()
        elif client.paused:
            client.paused = False
            if not client.half_closed:
                client.stream.resume_reading()
        if client.half_closed and session.finished:
            self.end(client, "eof", flush=True)

    def client_eof(self, client: Client) -> None:
        """Half-close: answer everything already received, then close."""
        client.half_closed = True
        log.debug(fields("session_half_closed", route=self.name, session=client.sid))
        session = client.session
        if session is None or session.finished:
            self.end(client, "eof", flush=True)

    def end(
        self, client: Client, reason: DisconnectReason, why: str | None = None, flush: bool = False
    ) -> None:
        if client.ended:
            return
        client.ended = True
        self.clients.pop(client.sid, None)
        session = client.session
        if session is not None:
            for cmd in self.lane.drop_session(client.sid):
                self._drop(cmd)
            session.close()
        if flush:
            client.stream.close_after_flush()
        else:
            client.stream.close()
        self.metrics.sessions = len(self.clients)
        self.metrics.disconnect(reason)
        self._report()
        if not self._session_log.allow():
            return
        seconds = round(time.monotonic() - client.connected_at, 3)
        log.info(
            fields(
                "session_end",
                route=self.name,
                session=client.sid,
                reason=reason,
                why=why,
                seconds=seconds,
            )
        )

    def _drop(self, cmd: Command) -> None:
        """A command that will never reach QEMU: its descriptors back, counted as dropped."""
        cmd.session.close_command_fds(cmd)
        self.metrics.command(cmd.name, "dropped")

    # -- lane and upstream traffic -------------------------------------------------------------

    def _splits(self, cmd: Command) -> bool:
        """Whether this command needs the backport's split sequence."""
        up = self.upstream
        return (
            self.backport
            and _carries_capabilities(cmd)
            and up is not None
            and not up.schema.native(cmd.name)
        )

    def _pump(self) -> None:
        up = self.upstream
        if not self.lane.waiting or up is None or not up.ready:
            return
        for cmd in self.lane.ready():
            self._start(cmd, up)

    def _start(self, cmd: Command, up: Upstream) -> None:
        cmd.sent = time.monotonic()
        self.metrics.lane_wait.observe(cmd.sent - cmd.started)
        if cmd.exclusive:
            self._splitting = self.loop.create_task(self._split(cmd, up))
        else:
            up.send(cmd)

    async def _split(self, cmd: Command, up: Upstream) -> None:
        """Run the backport's plan while holding the lane; answer the client exactly once.

        Whatever happens inside, the lane is released.  A failure of the proxy's own code is
        answered with a ``GenericError``, logged and counted, and the journal's recovery then
        decides, by the proven checks, whether QEMU must be put back as it was.
        """
        assert cmd.arguments is not None
        outcome: Outcome | None = None
        try:
            outcome = await splitting.run_split(
                cmd.name, cmd.arguments, up, self.journal, self.dialect
            )
        except UpstreamError as exc:
            # The route's loss handling ends the sessions and empties the lane.
            log.error(
                fields(
                    "backport_interrupted",
                    route=self.name,
                    session=cmd.session.sid,
                    command=cmd.name,
                    why=str(exc),
                )
            )
            self.metrics.command(cmd.name, "dropped")
            return
        except Exception as exc:
            self.metrics.internal_error()
            failure(
                log,
                "backport_internal_error",
                exc,
                route=self.name,
                session=cmd.session.sid,
                command=cmd.name,
            )
            outcome = Outcome(
                "proxy_error",
                {
                    "error": {
                        "class": "GenericError",
                        "desc": "qmp-proxy internal error; the capabilities are restored "
                        "if the migration did not start",
                    }
                },
            )
            await self._recover_after_error(up)
        finally:
            if up is self.upstream and not up.lost.done():
                self.lane.release()
        self._finish_split(cmd, up, outcome)

    async def _recover_after_error(self, up: Upstream) -> None:
        try:
            await splitting.recover(self.journal, up, self.metrics)
        except Exception as exc:  # QEMU lost, or another failure: reconnect and recover then
            failure(log, "backport_recovery_failed", exc, route=self.name)
            up.close(f"recovery after an internal error failed: {exc!r}")

    def _finish_split(self, cmd: Command, up: Upstream, outcome: Outcome) -> None:
        log.info(
            fields(
                "backport",
                route=self.name,
                session=cmd.session.sid,
                upstream_id=up.upstream_sid,
                command=cmd.name,
                mode="split",
                outcome=outcome.outcome,
                restore=outcome.restore,
                ms=round((time.monotonic() - cmd.sent) * 1000, 1),
            )
        )
        self.metrics.backport(cmd.name, "split", outcome.outcome)
        if outcome.restore is not None:
            self.metrics.restore(outcome.restore)
        if outcome.restore == "failed":
            self.restore_failures += 1
            log.error(
                fields(
                    "backport_restore_failed",
                    route=self.name,
                    command=cmd.name,
                    why=outcome.restore_error,
                )
            )
            self._report()
        reply = replies.reply_for(outcome.reply, cmd.client_id, self.dialect.before_6_0)
        self._deliver(cmd, reply, "return" in outcome.reply)
        self._pump()

    def _reply(self, cmd: Command, data: bytes, ok: bool) -> None:
        """QEMU's reply to a client command, already under the client's id."""
        # A command that carried descriptors and failed may have failed before QEMU took them:
        # clear them out of QEMU's monitor before any other descriptor command runs.
        scrub = cmd.carried_fds and not ok
        queued = not cmd.oob and self.lane.done(cmd, scrub)  # scrub: hold_fd_gate
        up = self.upstream
        if cmd.name not in _WATCHED_REPLIES or up is None:
            pass  # nearly every reply: one lookup
        elif cmd.name == "query-qmp-schema":
            if ok and self.backport:
                data = schema.advertise(data, up.schema) or data
        elif _carries_capabilities(cmd) and up.schema.native(cmd.name):
            self.metrics.backport(cmd.name, "native", "ok" if ok else "command_error")
        self._deliver(cmd, data, ok)
        if scrub and up is not None:
            self.loop.create_task(self._scrub_fds(up))
        if queued:
            self._pump()

    async def _scrub_fds(self, up: Upstream) -> None:
        """Take whatever descriptor a failed command left in QEMU's monitor, and close it."""
        name = f"qmp-proxy-scrub-{secrets.token_hex(8)}"
        self.lane.reserve()
        try:
            taken = await up.call("getfd", {"fdname": name})
            if "return" in taken:
                log.info(
                    fields(
                        "fd_scrubbed",
                        route=self.name,
                        why="a failed descriptor command left it in QEMU",
                    )
                )
                await up.call("closefd", {"fdname": name})
        except UpstreamError:
            return  # lost: the lane was reset with everything else
        except Exception as exc:
            # The gate must never stay closed: start afresh, as after losing QEMU.
            self.metrics.internal_error()
            failure(log, "fd_scrub_internal_error", exc, route=self.name)
            up.close(f"internal error while clearing a descriptor: {exc!r}")
            return
        if up is self.upstream:
            self.lane.unreserve()
            self.lane.open_fd_gate()
            self._pump()

    def _deliver(self, cmd: Command, data: bytes, ok: bool) -> None:
        """Hand a reply to its session (if the client is still there) and write what is due."""
        seconds = time.monotonic() - cmd.started
        client = self.clients.get(cmd.session.sid)
        if client is None or client.ended:
            self.metrics.answered(cmd.name, "dropped", seconds)
            return
        self.metrics.answered(cmd.name, "return" if ok else "error", seconds)
        client.commands += 1
        try:
            session = cmd.session
            stream = client.stream
            for out in session.complete(cmd, data):
                self.metrics.client_out += len(out)
                stream.write(out)
            if stream.overflowed:
                return  # over the backlog limit: the session is about to end
            if client.paused or client.half_closed:
                # Held requests always pause their client (every _handle ends in _settle), so
                # a client reading on has none: the usual reply costs no question more.
                if session.held():
                    self._handle(client, session, session.resume())
                else:
                    self._settle(client, session)  # a reply can lift a pause or end a half-close
        except Exception as exc:
            self._client_failed(client, exc)

    def _event(self, line: bytes, msg: dict[str, Any]) -> None:
        self.metrics.event(msg["event"])
        for client in list(self.clients.values()):
            session = client.session
            if session is not None and session.negotiated and not client.ended:
                self.guarded(client, self._write, client, line)
