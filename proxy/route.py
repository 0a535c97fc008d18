"""A route: one QEMU, its upstream session, its lane and the client sessions it serves (asyncio).

This is the only place where the sans-IO pieces meet sockets: client bytes go through a
:class:`~proxy.session.Session`, commands through the :class:`~proxy.lane.Lane` to the
:class:`~proxy.upstream.Upstream`, replies back through the session to the client, events to
every negotiated session.  It also owns the upstream lifecycle: connect, probe, serve, and on
loss end every session (clients see what they would see if QEMU died) and reconnect with capped
exponential backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from proxy import backport, qmp, schema
from proxy.address import Address
from proxy.config import Limits
from proxy.fdsock import CLIENT_READ_SIZE, Stream
from proxy.journal import Entry, Journal
from proxy.lane import Lane
from proxy.logs import fields
from proxy.metrics import RouteMetrics
from proxy.policy import OPEN, Policy
from proxy.schema import MIGRATE_COMMANDS
from proxy.session import Command, Session
from proxy.upstream import Runstate, Upstream, UpstreamError

log = logging.getLogger("qmp_proxy.route")


def _carries_capabilities(cmd: Command) -> bool:
    """A migrate or migrate-incoming with ``capabilities``: what the backport is about."""
    return (
        cmd.name in MIGRATE_COMMANDS
        and cmd.arguments is not None
        and "capabilities" in cmd.arguments
    )


class Client:
    """One accepted connection: its socket stream and, once greeted, its session."""

    def __init__(
        self, route: Route, sock: socket.socket, sid: int, listen: str, policy: Policy
    ) -> None:
        self.route = route
        self.sid = sid
        self.listen = listen
        self.policy = policy
        # The route's own method, bound in C: no trampoline call per chunk read.
        on_data = functools.partial(route.client_data, self)
        self.stream = Stream(route.loop, sock, on_data, self._eof, self._error,
                             read_size=CLIENT_READ_SIZE, max_backlog=route.limits.max_backlog,
                             on_overflow=self._overflow)  # fmt: skip
        self.session: Session | None = None
        self.half_closed = False
        self.paused = False
        self.ended = False
        self.connected_at = time.monotonic()

    def _eof(self) -> None:
        self.route.client_eof(self)

    def _error(self, exc: OSError) -> None:
        self.route.end(self, "reset", str(exc))

    def _overflow(self) -> None:
        self.route.end(self, "slow", f"output backlog over {self.stream.max_backlog} bytes")


class Route:
    """Everything served by one upstream QEMU."""

    def __init__(
        self,
        name: str,
        upstream: Address,
        limits: Limits,
        loop: asyncio.AbstractEventLoop,
        metrics: RouteMetrics,
        backport: bool = True,
        on_state: Callable[[], None] | None = None,
        state_dir: Path | None = None,
        probe_lock: asyncio.Lock | None = None,
    ) -> None:
        self.probe_lock = probe_lock
        self.journal = Journal(state_dir, name) if state_dir is not None else None
        self.name = name
        self.address = upstream
        self.limits = limits
        self.loop = loop
        self.metrics = metrics
        self.backport = backport
        self._on_state = on_state
        self.lane = Lane()
        self.clients: dict[int, Client] = {}
        self.upstream: Upstream | None = None
        self.state = Runstate.DOWN
        self.restore_failures = 0
        self._greeting = b""
        self._offered: frozenset[str] = frozenset()
        self._next_sid = 0
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._splitting: asyncio.Task[None] | None = None
        self._connections = 0

    # -- upstream lifecycle ------------------------------------------------------------------

    def start(self) -> None:
        self._task = self.loop.create_task(self._run(), name=f"route-{self.name}")

    async def _run(self) -> None:
        backoff = self.limits.backoff_min
        while not self._stopping:
            self._connections += 1
            up = Upstream(self.loop, self.address, self.name, self._event, self._reply,
                          self._set_state, self.metrics, self.probe_lock)  # fmt: skip
            up.upstream_sid = self._connections
            self.upstream = up
            try:
                await up.connect()
            except UpstreamError as exc:
                up.close()
                self.metrics.connect(exc.result)
                log.warning(fields("upstream_connect_failed", route=self.name,
                                   upstream=str(self.address), result=exc.result,
                                   why=str(exc)))  # fmt: skip
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.limits.backoff_max)
                continue
            self.metrics.connect("ok")
            try:
                await self._recover(up)
            except UpstreamError as exc:
                log.warning(fields("upstream_lost", route=self.name, why=str(exc)))
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.limits.backoff_max)
                continue
            up.set_ready()
            self._ready(up)
            served_from = time.monotonic()
            why = await up.lost
            self._upstream_lost(up, why)
            # A QEMU that dies right after the probe must not be reconnected in a tight loop.
            if time.monotonic() - served_from >= self.limits.backoff_max:
                backoff = self.limits.backoff_min
            else:
                backoff = min(backoff * 2, self.limits.backoff_max)
            await asyncio.sleep(backoff)

    async def _recover(self, up: Upstream) -> None:
        """Apply a split's pending restore left by a proxy that died mid-sequence."""
        if self.journal is None:
            return
        entry = self.journal.read()
        if entry is None:
            return
        if entry.identity != up.identity:
            log.warning(fields("journal_discarded", route=self.name, why="another QEMU",
                               recorded=entry.identity.get("pid")))  # fmt: skip
        else:
            now = await up.call("query-migrate")
            if now.get("return") == entry.migration:
                done = await up.call("migrate-set-capabilities", {"capabilities": entry.restore})
                outcome = "ok" if "return" in done else "failed"
                self.metrics.restore(outcome)
                (log.warning if outcome == "ok" else log.error)(fields(
                    "journal_restored", route=self.name, command=entry.command, outcome=outcome,
                    capabilities=",".join(str(c["capability"]) for c in entry.restore),
                ))  # fmt: skip
            else:
                log.warning(fields("journal_discarded", route=self.name,
                                   why="the migration started"))  # fmt: skip
        self.journal.remove()

    def _ready(self, up: Upstream) -> None:
        v = up.version.get("qemu", {})
        qemu = f"{v.get('major')}.{v.get('minor')}.{v.get('micro')}"
        native = all(up.schema.native(c) for c in MIGRATE_COMMANDS)
        mode = "native" if native else "split"
        log.info(fields("upstream_ready", route=self.name, upstream=str(self.address),
                        upstream_id=up.upstream_sid, qemu=qemu, oob=up.oob,
                        mode=mode))  # fmt: skip
        self.metrics.probed(up.schema.commands, up.schema.events, qemu, mode)
        self.metrics.up = 1
        self._offered = frozenset({"oob"}) if up.oob else frozenset()
        self._greeting = qmp.greeting(up.greeting_line, sorted(self._offered))
        for client in list(self.clients.values()):
            if client.session is None:
                self._greet(client)

    def _set_state(self, state: Runstate) -> None:
        if state != self.state:
            self.state = state
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

    def in_flight(self) -> int:
        """Commands accepted from clients and not yet answered (for the shutdown drain)."""
        busy = self._splitting is not None and not self._splitting.done()
        return busy + sum(not c.session.finished for c in self.clients.values() if c.session)

    # -- clients -----------------------------------------------------------------------------

    def accept(self, sock: socket.socket, peer: str, listen: str, policy: Policy = OPEN) -> None:
        self._next_sid += 1
        sid = self._next_sid
        self.metrics.connections += 1
        if len(self.clients) >= self.limits.max_sessions or self._stopping:
            why = "shutting down" if self._stopping else "session limit"
            log.warning(fields("session_refused", route=self.name, session=sid, peer=peer,
                               why=why, limit=self.limits.max_sessions))  # fmt: skip
            self.metrics.disconnect("limit")
            sock.close()
            return
        client = Client(self, sock, sid, listen, policy)
        self.clients[sid] = client
        self.metrics.sessions = len(self.clients)
        self._report()
        log.info(fields("session_start", route=self.name, session=sid, peer=peer, listen=listen,
                        policy=None if policy.open else "restricted"))  # fmt: skip
        if self.state == Runstate.READY:
            self._greet(client)
        else:
            self.loop.call_later(self.limits.client_wait, self._wait_expired, client)

    def set_limits(self, limits: Limits) -> None:
        """Reloaded limits apply to the live sessions too, as policies do."""
        self.limits = limits
        for client in list(self.clients.values()):
            client.stream.max_backlog = limits.max_backlog
            session = client.session
            if session is not None and not client.ended:
                session.set_limits(limits.max_message, limits.max_queued)
                if session.held:
                    self._handle(client, session, session.resume())
                else:
                    self._settle(client, session)

    def set_policy(self, listen: str, policy: Policy) -> None:
        """A reloaded policy applies to the listener's live sessions too."""
        for client in self.clients.values():
            if client.listen == listen:
                client.policy = policy
                if client.session is not None:
                    client.session.policy = policy

    def _wait_expired(self, client: Client) -> None:
        if client.session is None and not client.ended:
            self.end(client, "limit", "upstream not ready within client_wait")

    def _greet(self, client: Client) -> None:
        client.session = Session(client.sid, self._offered, self.limits.max_message,
                                 client.policy, self.limits.max_queued)  # fmt: skip
        self._write(client, self._greeting)
        client.stream.resume_reading()

    def _write(self, client: Client, data: bytes) -> None:
        self.metrics.client_out += len(data)
        client.stream.write(data)

    def client_data(self, client: Client, data: bytes, fds: list[int]) -> None:
        session = client.session
        assert session is not None
        self.metrics.client_in += len(data)
        self._handle(client, session, session.receive(data, fds))

    def _handle(self, client: Client, session: Session, items: list[Command | bytes]) -> None:
        up = self.upstream
        if up is not None and up.state != Runstate.READY:
            up = None  # in-band commands wait in the lane
        queued = False
        for index, item in enumerate(items):
            if isinstance(item, bytes):
                self._write(client, item)
                if client.ended:
                    # One read of garbage can earn thousands of error replies: the backlog is
                    # policed per reply (by the stream), and what was not yet handled is dropped.
                    for rest in items[index + 1 :]:
                        if isinstance(rest, Command):
                            session.close_command_fds(rest)
                    return
            elif item.oob:
                if up is not None:
                    up.send(item)
            elif item.name in MIGRATE_COMMANDS and self._splits(item):
                self.lane.submit(item, exclusive=True)
                queued = True
            elif up is not None and self.lane.start(item):
                self.metrics.lane_wait.observe_zero()  # it never queued
                up.send(item)
            else:
                self.lane.submit(item)
                queued = True
        if session.parse_errors:
            for kind in session.parse_errors:
                self.metrics.protocol_error(kind)
            session.parse_errors.clear()
        if session.denied:
            for name in session.denied:
                self.metrics.denial(name)
                log.info(fields("policy_denied", route=self.name, session=client.sid,
                                command=name))  # fmt: skip
            session.denied.clear()
        if queued:
            self._pump()
        self._settle(client, session)

    def _settle(self, client: Client, session: Session) -> None:
        """Pause or resume reading; finish a half-closed session."""
        if session.busy:
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
        """Half-close: answer everything already received, then close (DESIGN §4.9)."""
        client.half_closed = True
        log.debug(fields("session_half_closed", route=self.name, session=client.sid))
        session = client.session
        if session is None or session.finished:
            self.end(client, "eof", flush=True)

    def end(self, client: Client, reason: str, why: str | None = None, flush: bool = False) -> None:
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
        seconds = round(time.monotonic() - client.connected_at, 3)
        log.info(fields("session_end", route=self.name, session=client.sid, reason=reason,
                        why=why, seconds=seconds))  # fmt: skip

    def _drop(self, cmd: Command) -> None:
        """A command that will never reach QEMU: its descriptors back, counted as dropped."""
        cmd.session.close_command_fds(cmd)
        self.metrics.command(cmd.name, "dropped")

    # -- lane and upstream traffic -------------------------------------------------------------

    def _splits(self, cmd: Command) -> bool:
        """Whether this command needs the backport's split sequence (DESIGN §5.2)."""
        up = self.upstream
        return (
            self.backport
            and _carries_capabilities(cmd)
            and up is not None
            and not up.schema.native(cmd.name)
        )

    def _pump(self) -> None:
        up = self.upstream
        if not self.lane.waiting or up is None or up.state != Runstate.READY:
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
        """Run the backport's plan while holding the lane; answer the client once."""
        assert cmd.arguments is not None
        journal = self.journal
        plan = backport.split(cmd.name, cmd.arguments, up.schema, journal is not None)
        try:
            step = next(plan)
            while True:
                if isinstance(step, backport.Record):
                    assert journal is not None
                    entry = Entry(self.name, up.identity, step.restore, step.migration, cmd.name)
                    await self.loop.run_in_executor(None, journal.write, entry)
                    reply: dict[str, Any] = {}
                else:
                    reply = await up.call(step.command, step.arguments)
                step = plan.send(reply)
        except StopIteration as done:
            outcome: backport.Outcome = done.value
            if journal is not None:
                journal.remove()
        except UpstreamError as exc:
            # The route's loss handling ends the sessions and empties the lane.
            log.error(fields("backport_interrupted", route=self.name, session=cmd.session.sid,
                             command=cmd.name, why=str(exc)))  # fmt: skip
            self.metrics.command(cmd.name, "dropped")
            return
        log.info(fields(
            "backport", route=self.name, session=cmd.session.sid, upstream_id=up.upstream_sid,
            command=cmd.name, mode="split", outcome=outcome.outcome, restore=outcome.restore,
            ms=round((time.monotonic() - cmd.sent) * 1000, 1),
        ))  # fmt: skip
        self.metrics.backport(cmd.name, "split", outcome.outcome)
        if outcome.restore is not None:
            self.metrics.restore(outcome.restore)
        if outcome.restore == "failed":
            self.restore_failures += 1
            log.error(fields("backport_restore_failed", route=self.name, command=cmd.name,
                             why=outcome.restore_error))  # fmt: skip
            self._report()
        self.lane.release()
        self._deliver(cmd, qmp.reply_for(outcome.reply, cmd.client_id), "return" in outcome.reply)
        self._pump()

    def _reply(self, cmd: Command, line: bytes, msg: dict[str, Any] | None) -> None:
        """QEMU's reply to a client command; ``msg`` is None for a success reply that the
        upstream handed on unparsed (it needs no more than its id spliced)."""
        queued = not cmd.oob and self.lane.done(cmd)
        ok = msg is None or "return" in msg
        up = self.upstream
        data = None
        if cmd.name == "query-qmp-schema" and ok and self.backport and up is not None:
            if msg is None:
                msg = orjson.loads(line)
            entries = msg["return"]
            patched = schema.advertise(entries, up.schema)
            if patched is not entries:
                data = qmp.return_reply(cmd.client_id, orjson.dumps(patched))
        elif _carries_capabilities(cmd) and up is not None and up.schema.native(cmd.name):
            self.metrics.backport(cmd.name, "native", "ok" if ok else "command_error")
        if data is None:
            data = qmp.restore_id(line, cmd.upstream_id, cmd.client_id, msg)
        self._deliver(cmd, data, ok)
        if queued:
            self._pump()

    def _deliver(self, cmd: Command, data: bytes, ok: bool) -> None:
        """Hand a reply to its session (if the client is still there) and write what is due."""
        self.metrics.duration.observe(time.monotonic() - cmd.started)
        client = self.clients.get(cmd.session.sid)
        if client is None or client.ended:
            self.metrics.command(cmd.name, "dropped")
            return
        self.metrics.command(cmd.name, "return" if ok else "error")
        session = cmd.session
        stream = client.stream
        for out in session.complete(cmd, data):
            self.metrics.client_out += len(out)
            stream.write(out)
        if stream.closed:
            return  # ended: over the backlog limit
        if session.held:
            self._handle(client, session, session.resume())
        elif client.paused or client.half_closed:
            self._settle(client, session)  # a reply can only lift a pause or end a half-close

    def _event(self, line: bytes, msg: dict[str, Any]) -> None:
        self.metrics.event(str(msg.get("event")))
        for client in list(self.clients.values()):
            session = client.session
            if session is not None and session.negotiated and not client.ended:
                self._write(client, line)
