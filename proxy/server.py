"""Listening sockets and the process's routes (asyncio).

A unix listener never steals a live socket: if the path exists and something answers on it, the
proxy refuses to start; a stale file is replaced.  Sockets are created 0600 (a QMP socket is root
over the VM); TCP listeners get TCP_NODELAY on every client, as QMP is request/response.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat

from proxy.address import Address
from proxy.config import Config
from proxy.logs import fields
from proxy.route import Route

log = logging.getLogger("qmp_proxy.server")


class ListenError(OSError):
    pass


def bind(addr: Address) -> socket.socket:
    """Create, bind and listen; raises :class:`ListenError` with a message for the user."""
    if addr.kind == "unix":
        path = addr.path
        with contextlib.suppress(FileNotFoundError):
            mode = os.lstat(path).st_mode
            if not stat.S_ISSOCK(mode):
                raise ListenError(f"{path}: exists and is not a socket")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
            except OSError:
                os.unlink(path)  # stale: nobody answers
            else:
                raise ListenError(f"{path}: another process is listening there")
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            sock.bind(path)
        except OSError as exc:
            sock.close()
            raise ListenError(f"{path}: {exc.strerror}") from exc
        finally:
            os.umask(old)
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


def peer_of(sock: socket.socket) -> str:
    """Who connected: pid/uid/gid for unix peers (SO_PEERCRED), host:port for TCP."""
    if sock.family == socket.AF_UNIX:
        try:
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        except OSError:
            return "unix"
        pid, uid, gid = (int.from_bytes(creds[i : i + 4], "little") for i in (0, 4, 8))
        return f"pid={pid},uid={uid},gid={gid}"
    host, port = sock.getpeername()[:2]
    return f"{host}:{port}"


class Listener:
    def __init__(
        self, loop: asyncio.AbstractEventLoop, addr: Address, sock: socket.socket, route: Route
    ) -> None:
        self.loop = loop
        self.addr = addr
        self.sock = sock
        self.route = route
        loop.add_reader(sock.fileno(), self._accept)

    def _accept(self) -> None:
        for _ in range(64):  # bounded, so a connect storm cannot hog the loop
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.error(fields("accept_failed", listen=str(self.addr), why=str(exc)))
                return
            if conn.family != socket.AF_UNIX:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.route.accept(conn, peer_of(conn))

    def close(self) -> None:
        self.loop.remove_reader(self.sock.fileno())
        self.sock.close()
        if self.addr.kind == "unix":
            with contextlib.suppress(OSError):
                os.unlink(self.addr.path)


class Server:
    """All routes and listeners of one process."""

    def __init__(self, config: Config, loop: asyncio.AbstractEventLoop) -> None:
        self.config = config
        self.loop = loop
        self.routes: list[Route] = []
        self.listeners: list[Listener] = []

    def start(self) -> None:
        """Bind every listener first (so a bad address fails before anything runs)."""
        bound: list[tuple[Address, socket.socket, int]] = []
        try:
            for index, rc in enumerate(self.config.routes):
                for addr in rc.listen:
                    bound.append((addr, bind(addr), index))
        except OSError:
            for _, sock, _ in bound:
                sock.close()
            raise
        for rc in self.config.routes:
            self.routes.append(
                Route(rc.name, rc.upstream, self.config.limits, self.loop, self.config.backport)
            )
        for addr, sock, index in bound:
            self.listeners.append(Listener(self.loop, addr, sock, self.routes[index]))
            log.info(fields("listening", route=self.routes[index].name, listen=str(addr)))
        for route in self.routes:
            route.start()

    async def stop(self) -> None:
        for listener in self.listeners:
            listener.close()
        drain_until = self.loop.time() + self.config.limits.drain
        while any(r.in_flight() for r in self.routes) and self.loop.time() < drain_until:
            await asyncio.sleep(0.02)
        for route in self.routes:
            await route.stop()
