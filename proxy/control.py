"""The live view: ``qmp-proxy status`` over a local control socket.

The daemon answers every connection to its control socket with one JSON document (each route's
state, QEMU and mode, and each session: listener, peer, since when, commands answered and in
flight, bytes queued for it) and closes.  It reads nothing from the connection, so there is no
request to parse; the socket is a listener like any other (0600 unless configured, never a
moment looser), and session data never goes to the metrics port.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import socket
import sys
import time
from collections.abc import Sequence
from typing import Any, Final

from proxy.address import Address
from proxy.logs import fields

log = logging.getLogger("qmp_proxy.control")

MAX_CONNECTIONS: Final = 16
WRITE_TIMEOUT: Final = 5.0
MAX_ANSWER: Final = 64 << 20


def status(routes: Sequence[Any]) -> dict[str, Any]:
    """What the live view shows, from the routes as they are now."""
    now = time.monotonic()
    out: list[dict[str, Any]] = []
    for route in routes:
        up = route.upstream
        sessions = []
        for client in list(route.clients.values()):
            session = client.session
            sessions.append(
                {
                    "session": client.sid,
                    "listener": client.listen,
                    "peer": client.peer,
                    "since": round(client.connected_since, 3),
                    "seconds": round(now - client.connected_at, 1),
                    "negotiated": bool(session is not None and session.negotiated),
                    "commands_done": client.commands,
                    "in_flight": session.queued if session is not None else 0,
                    "bytes_queued": client.stream.backlog,
                }
            )
        out.append(
            {
                "route": route.name,
                "upstream": str(route.address),
                "state": route.state.value,
                "qemu": up.qemu if up is not None and up.qemu else None,
                "mode": route.mode or None,
                "sessions": sessions,
            }
        )
    return {"routes": out}


class ControlServer:
    """Answers each connection with :func:`status` of ``routes``; bounded in connections and
    in the time a slow reader may take."""

    def __init__(self, sock: socket.socket, routes: Sequence[Any]) -> None:
        self.sock = sock
        self.routes = routes
        self._server: asyncio.AbstractServer | None = None
        self._active = 0

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._answer, sock=self.sock)

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if self._active >= MAX_CONNECTIONS:
                return
            self._active += 1
            try:
                writer.write(json.dumps(status(self.routes)).encode() + b"\n")
                await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT)
            finally:
                self._active -= 1
        except Exception as exc:  # a reader that went away, or slow: never the daemon's problem
            log.debug(fields("control_answer_failed", why=repr(exc)))
        finally:
            writer.close()

    def close(self) -> None:
        if self._server is not None:
            self._server.close()


def fetch(addr: Address, timeout: float = 10.0) -> dict[str, Any]:
    """The daemon's answer on the control socket ``addr``."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(addr.path)
        chunks = []
        size = 0
        while chunk := sock.recv(65536):
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_ANSWER:
                raise ValueError("the answer is too large")
    finally:
        sock.close()
    answer = json.loads(b"".join(chunks))
    if not isinstance(answer, dict):
        raise ValueError("not a status document")
    return answer


def render(answer: dict[str, Any]) -> str:
    """The status document as a table for people."""
    lines: list[str] = []
    for route in answer.get("routes", []):
        qemu = route.get("qemu") or "-"
        mode = route.get("mode") or "-"
        lines.append(
            f"route {route['route']}: {route['state']}, QEMU {qemu}, mode {mode}"
            f", upstream {route['upstream']}, {len(route['sessions'])} sessions"
        )
        if route["sessions"]:
            header = ("session", "listener", "peer", "seconds", "done", "in flight", "queued")
            rows = [
                (
                    str(s["session"]),
                    s["listener"],
                    s["peer"],
                    f"{s['seconds']:.0f}",
                    str(s["commands_done"]),
                    str(s["in_flight"]),
                    str(s["bytes_queued"]),
                )
                for s in route["sessions"]
            ]
            widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
            for row in [header, *rows]:
                lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
    return "\n".join(lines)


def parser(default: Address) -> argparse.ArgumentParser:
    """``qmp-proxy status``'s arguments; on their own so the man page is made from them too."""
    p = argparse.ArgumentParser(
        prog="qmp-proxy status", description="the daemon's routes and sessions, live"
    )
    p.add_argument("--json", action="store_true", help="the raw JSON document")
    p.add_argument(
        "--control",
        metavar="ADDRESS",
        default=None,
        help=f"the daemon's control socket (default: {default})",
    )
    return p


def main(argv: list[str], default: Address) -> int:
    """``qmp-proxy status [--json] [--control ADDRESS]``."""
    from proxy import address

    args = parser(default).parse_args(argv)
    try:
        addr = address.parse(args.control) if args.control else default
        if addr.kind != "unix":
            raise address.AddressError(f"{addr}: the control socket is a unix socket")
        answer = fetch(addr)
    except (OSError, ValueError) as exc:
        where = args.control or default
        why = getattr(exc, "strerror", None) or exc
        print(f"qmp-proxy status: {where}: {why}", file=sys.stderr)
        return 1
    with contextlib.suppress(BrokenPipeError):
        print(json.dumps(answer, indent=2) if args.json else render(answer))
    return 0
