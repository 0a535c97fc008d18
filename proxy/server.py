"""The process: listeners, routes, metrics endpoint, systemd integration, reload (asyncio).

A unix listener never steals a live socket: if the path exists and something answers on it,
start-up fails; a stale file is replaced.  Sockets are created 0600 unless the listener says
otherwise (a QMP socket is root over the VM).  ``systemd:NAME`` listeners are adopted from
socket activation and held to the same rules: listening (or start-up fails), ``allow_remote``
for TCP, and the listener's ``mode``/``group``, or a refusal when anyone could connect.
Routes are independent: each has its own upstream, lane and reconnect loop, so one QEMU that is
down, hung or dying does not affect the others.

Accepting never spins: when the descriptor table is full (EMFILE, ENFILE) or accept fails in
any other lasting way, the listener pauses for a second and logs one line per pause.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import grp
import ipaddress
import logging
import os
import resource
import socket
import stat
from collections.abc import Callable
from dataclasses import replace

from proxy import systemd
from proxy.config import Config, ConfigError, ListenConfig, state_directory
from proxy.control import ControlServer
from proxy.httpd import HttpServer
from proxy.journal import Journal, JournalError, check_directory
from proxy.logs import failure, fields, set_level
from proxy.metrics import Heartbeat, Metrics, serve
from proxy.route import Route
from proxy.session import FdBudget
from proxy.upstream import Runstate

log = logging.getLogger("qmp_proxy.server")


class ListenError(OSError):
    pass


# How long a listener stops accepting after a failure that would repeat at once (EMFILE ...).
ACCEPT_PAUSE = 1.0
# accept() errors that only concern the connection being accepted (it was reset first).
_CONNECTION_GONE = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.ECONNRESET})


def fd_budget() -> FdBudget:
    """A quarter of the descriptor table for what clients pass, the rest for sockets."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return FdBudget(max(16, soft // 4))


def bind(listen: ListenConfig, inherited: dict[str, socket.socket]) -> socket.socket:
    """Create (or adopt), bind and listen; raises :class:`ListenError` with a user message."""
    addr = listen.address
    if addr.kind == "systemd":
        sock = inherited.pop(addr.path, None)
        if sock is None:
            raise ListenError(f"{addr}: systemd passed no socket named {addr.path!r}")
        _check_inherited(listen, sock)
    elif addr.kind == "fd":
        try:
            sock = socket.socket(fileno=int(addr.path))
        except OSError as exc:
            raise ListenError(f"{addr}: not an open socket: {exc.strerror}") from exc
        try:
            _check_inherited(listen, sock)
        except ListenError:
            sock.detach()  # not ours to close: whoever passed it may still need it
            raise
    elif addr.kind == "unix":
        sock = _bind_unix(listen)
    else:
        infos = socket.getaddrinfo(addr.host, addr.port, type=socket.SOCK_STREAM)
        family, _, _, _, target = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(target)
        except OSError as exc:
            sock.close()
            raise ListenError(f"{addr}: {exc.strerror}") from exc
        sock.listen(128)
    sock.setblocking(False)
    return sock


def _bind_unix(listen: ListenConfig) -> socket.socket:
    path = listen.address.path
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise ListenError(f"{path}: exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)  # a live owner with a full backlog must not hang start-up
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)  # stale: nobody listens there
        except (TimeoutError, BlockingIOError):
            raise ListenError(f"{path}: another process is listening there (busy)") from None
        except OSError as exc:
            raise ListenError(f"{path}: cannot tell whether it is live: {exc.strerror}") from exc
        else:
            raise ListenError(f"{path}: another process is listening there")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # never a moment with looser permissions than asked for
    try:
        sock.bind(path)
        if listen.group is not None:
            os.chown(path, -1, grp.getgrnam(listen.group).gr_gid)
        os.chmod(path, listen.mode)
    except (OSError, KeyError) as exc:
        sock.close()
        raise ListenError(f"{path}: {exc}") from exc
    finally:
        os.umask(old)
    sock.listen(128)
    return sock


def _check_inherited(listen: ListenConfig, sock: socket.socket) -> None:
    """A socket handed over (by systemd, or as ``fd:N`` by libvirt) must pass what a socket the
    proxy makes would.  Its mode and group change only if the listener asks: the socket is
    its creator's."""
    addr = listen.address
    if sock.type != socket.SOCK_STREAM:
        raise ListenError(f"{addr}: not a stream socket")
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        raise ListenError(
            f"{addr}: not a listening socket (a socket unit with Accept=yes "
            "passes connections, not a listener)"
        )
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        host = sock.getsockname()[0]
        if not ipaddress.ip_address(host.split("%")[0]).is_loopback and not listen.allow_remote:
            raise ListenError(
                f"{addr}: bound to {host}, not loopback; QMP has no "
                "authentication (set allow_remote = true to accept that)"
            )
        return
    if sock.family != socket.AF_UNIX:
        raise ListenError(f"{addr}: not a unix or TCP socket")
    path = sock.getsockname()
    if not isinstance(path, str) or not path or path.startswith("\0"):
        if not listen.allow_remote:
            raise ListenError(
                f"{addr}: an abstract socket has no permissions, so any local "
                "user could connect (set allow_remote = true to accept that)"
            )
        return
    try:
        if listen.group is not None:
            os.chown(path, -1, grp.getgrnam(listen.group).gr_gid)
        if listen.mode_given:
            os.chmod(path, listen.mode)
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except (OSError, KeyError) as exc:
        raise ListenError(f"{addr}: {path}: {exc}") from exc
    if mode & stat.S_IWOTH and not listen.mode_given:
        raise ListenError(
            f"{addr}: {path} has mode {mode:04o}, so any local user could "
            "connect: set SocketMode= in the socket unit, or mode here"
        )


def peer_of(sock: socket.socket) -> str:
    """Who connected: pid/uid/gid for unix peers (SO_PEERCRED), host:port for TCP."""
    try:
        if sock.family == socket.AF_UNIX:
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
            pid, uid, gid = (int.from_bytes(creds[i : i + 4], "little") for i in (0, 4, 8))
            return f"pid={pid},uid={uid},gid={gid}"
        host, port = sock.getpeername()[:2]
        return f"{host}:{port}"
    except OSError:
        return "unknown (gone)"


class Listener:
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        listen: ListenConfig,
        sock: socket.socket,
        route: Route,
    ) -> None:
        self.loop = loop
        self.config = listen
        self.sock = sock
        self.route = route
        self._paused: asyncio.TimerHandle | None = None
        loop.add_reader(sock.fileno(), self._accept)

    def _accept(self) -> None:
        for _ in range(64):  # bounded, so a connect storm cannot hog the loop
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _CONNECTION_GONE:
                    continue  # reset by the peer before it was accepted: not our problem
                self._pause(exc)
                return
            try:
                if conn.family != socket.AF_UNIX:
                    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self.route.accept(
                    conn,
                    peer_of(conn),
                    str(self.config.address),
                    self.config.policy,
                    max_message=self.config.max_message,
                )
            except Exception as exc:
                conn.close()
                self.route.metrics.internal_error()
                failure(log, "accept_internal_error", exc, listen=str(self.config.address))

    def _pause(self, exc: OSError) -> None:
        """Stop accepting for a moment: the same accept would fail again at once."""
        full = exc.errno in (errno.EMFILE, errno.ENFILE)
        self.route.metrics.accept_error("descriptors" if full else "other")
        self.loop.remove_reader(self.sock.fileno())
        self._paused = self.loop.call_later(ACCEPT_PAUSE, self._resume)
        log.error(
            fields(
                "accept_paused", listen=str(self.config.address), why=str(exc), seconds=ACCEPT_PAUSE
            )
        )

    def _resume(self) -> None:
        self._paused = None
        self.loop.add_reader(self.sock.fileno(), self._accept)

    def close(self) -> None:
        if self._paused is not None:
            self._paused.cancel()
        else:
            self.loop.remove_reader(self.sock.fileno())
        self.sock.close()
        if self.config.address.kind == "unix":
            with contextlib.suppress(OSError):
                os.unlink(self.config.address.path)


class Server:
    """All routes and listeners of one process."""

    def __init__(
        self,
        config: Config,
        loop: asyncio.AbstractEventLoop,
        loader: Callable[[], Config] | None = None,
    ) -> None:
        self.config = config
        self._loader = loader  # re-reads the configuration for SIGHUP
        self.loop = loop
        self.metrics = Metrics()
        self.metrics.gather_dir = config.metrics_dir
        self.heartbeat = Heartbeat()
        self.routes: list[Route] = []
        self.listeners: list[Listener] = []
        self._http: HttpServer | None = None
        self._tick_handle: asyncio.TimerHandle | None = None
        self._status = ""
        self.control: ControlServer | None = None
        self._control_task: asyncio.Task[None] | None = None
        self._control_path: str | None = None

    def _bind_control(self) -> socket.socket | None:
        """The live view's socket.  At its default place a failure only warns (the directory
        may not exist where the proxy was not installed as a service); asked for, it fails."""
        listen = self.config.control
        if listen is None:
            return None
        try:
            sock = bind(listen, {})
        except OSError as exc:
            if not self.config.control_default:
                raise
            log.warning(fields("control_unavailable", address=str(listen.address), why=str(exc)))
            return None
        self._control_path = listen.address.path
        return sock

    def start(self) -> None:
        """Check the state directory and bind every listener first, so a bad setting fails
        before anything runs; raises :class:`OSError` or :class:`JournalError`."""
        journals = self._journals()
        inherited = systemd.listen_fds()
        bound: list[tuple[ListenConfig, socket.socket, int]] = []
        control: socket.socket | None = None
        try:
            for index, rc in enumerate(self.config.routes):
                for listen in rc.listen:
                    bound.append((listen, bind(listen, inherited), index))
            control = self._bind_control()
            if self.config.metrics is not None:
                host, port = self.config.metrics
                self._http = serve(self.metrics, host, port, self.heartbeat, self.not_ready)
        except OSError:
            # A start that fails leaves nothing behind: no socket file it made, no lock.
            for listen, sock, _ in bound:
                sock.close()
                if listen.address.kind == "unix":
                    with contextlib.suppress(OSError):
                        os.unlink(listen.address.path)
            if control is not None:
                control.close()
                assert self._control_path is not None
                with contextlib.suppress(OSError):
                    os.unlink(self._control_path)
            for journal in journals:
                journal.unlock()
            raise
        for name, sock in inherited.items():
            log.warning(fields("systemd_socket_unused", name=name))
            sock.close()
        if control is not None:
            self.control = ControlServer(control, self.routes)
            self._control_task = self.loop.create_task(self.control.start())
        probe_lock = asyncio.Lock()
        budget = fd_budget()
        self.metrics.fd_budget = budget
        for rc, journal in zip(self.config.routes, journals, strict=True):
            self.routes.append(
                Route(
                    rc.name,
                    rc.upstream,
                    self.config.limits,
                    self.loop,
                    self.metrics.route(rc.name),
                    journal=journal,
                    backport=self.config.backport,
                    on_state=self.report,
                    probe_lock=probe_lock,
                    fd_budget=budget,
                )
            )
        for listen, sock, index in bound:
            self.listeners.append(Listener(self.loop, listen, sock, self.routes[index]))
            log.info(fields("listening", route=self.routes[index].name, listen=str(listen.address)))
        if self.config.metrics is not None:
            log.info(fields("metrics_listening", address=f"{host}:{port}"))
        for route in self.routes:
            route.start()
        systemd.notify("READY=1", self._status_line())
        self._tick()

    def _journals(self) -> list[Journal]:
        """One locked journal per route, in a state directory only this user can write."""
        path = state_directory(self.config)
        check_directory(path)
        journals: list[Journal] = []
        try:
            for rc in self.config.routes:
                journal = Journal(path, rc.name, str(rc.upstream))
                journal.lock()
                journals.append(journal)
        except JournalError:
            for journal in journals:
                journal.unlock()
            raise
        return journals

    def _tick(self) -> None:
        """Heartbeat for /healthz, and the systemd watchdog, both from the event loop."""
        self.heartbeat.beat()
        interval = systemd.watchdog_interval()
        if interval is not None:
            systemd.notify("WATCHDOG=1")
        delay = min(1.0, interval) if interval else 1.0
        self._tick_handle = self.loop.call_later(delay, self._tick)

    def not_ready(self) -> dict[str, str]:
        return {r.name: r.state.value for r in self.routes if r.state != Runstate.READY}

    def _status_line(self) -> str:
        parts = []
        for r in self.routes:
            part = f"{r.name}: {r.state.value}, {len(r.clients)} clients"
            if r.restore_failures:
                part += f", {r.restore_failures} failed restores"
            parts.append(part)
        return "STATUS=" + "; ".join(parts)

    def report(self) -> None:
        """Route state changed: tell systemd (``STATUS=``)."""
        line = self._status_line()
        if line != self._status:
            self._status = line
            systemd.notify(line)

    def reload(self) -> None:
        """SIGHUP: log level, limits and policies from the file (with the command-line flags
        laid over it again); other changes are logged as needing a restart."""
        if self._loader is None:
            log.info(fields("reload_skipped", why="no config file"))
            return
        systemd.reloading()
        try:
            new = self._loader()
        except ConfigError as exc:
            for problem in exc.problems:
                log.error(fields("reload_failed", problem=problem))
            log.error(fields("reload_failed", why="keeping the old settings"))
            systemd.notify("READY=1", self._status_line())
            return
        old = self.config
        log.info(fields("reloaded", source=str(new.source), log_level=new.log_level))
        set_level(new.log_level)
        for route in self.routes:
            route.set_limits(new.limits)
        listens = {(rc.name, str(lc.address)): lc for rc in new.routes for lc in rc.listen}
        for listener in self.listeners:
            lc = listens.get((listener.route.name, str(listener.config.address)))
            if lc is not None:
                listener.config = replace(
                    listener.config, policy=lc.policy, max_message=lc.max_message
                )
                listener.route.set_policy(str(lc.address), lc.policy, lc.max_message)
        if _shape(new) != _shape(old) or (new.metrics, new.backport, new.state_dir) != (
            old.metrics,
            old.backport,
            old.state_dir,
        ):
            log.warning(
                fields(
                    "reload_partial",
                    why="routes, listeners, metrics, backport or "
                    "state_dir changed: restart to apply",
                )
            )
        self.metrics.gather_dir = new.metrics_dir
        self.config = replace(
            old, limits=new.limits, log_level=new.log_level, metrics_dir=new.metrics_dir
        )
        systemd.notify("READY=1", self._status_line())

    async def stop(self) -> None:
        """Stop accepting, let commands in flight finish (up to the drain limit), then close."""
        systemd.notify("STOPPING=1")
        for listener in self.listeners:
            listener.close()
        drain_until = self.loop.time() + self.config.limits.drain
        while any(r.in_flight() for r in self.routes) and self.loop.time() < drain_until:
            await asyncio.sleep(0.02)
        for route in self.routes:
            await route.stop()
        if self._tick_handle is not None:
            self._tick_handle.cancel()
        if self._http is not None:
            self._http.close()
        if self.control is not None:
            self.control.close()
        if self._control_path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._control_path)


def _shape(config: Config) -> list[object]:
    """What a reload cannot change in place."""
    return [(r.name, r.upstream, [lc.address for lc in r.listen]) for r in config.routes]
