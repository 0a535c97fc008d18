"""Settings: command-line flags (one route) into frozen dataclasses, validated up front.

Every limit of DESIGN §7 is a named default here, each with the precedent it follows, so the
value a test or an operator sets is the value the proxy enforces.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import NoReturn

from proxy import address
from proxy.framing import DEFAULT_MAX_MESSAGE


@dataclass(frozen=True, slots=True)
class Limits:
    # One message a client may make the proxy buffer (QEMU's own bound is 64 MiB).
    max_message: int = DEFAULT_MAX_MESSAGE
    # Bytes queued for a client beyond the message being written; then it is a slow reader.
    max_backlog: int = 8 << 20
    # Client sessions per route, the waiting ones included.
    max_sessions: int = 64
    # A session's unanswered in-band requests before the proxy stops reading it.
    max_queued: int = 64
    # How long a client is held, ungreeted, while the upstream is not ready.
    client_wait: float = 10.0
    # Upstream reconnect backoff: first delay, doubling up to the cap.
    backoff_min: float = 0.1
    backoff_max: float = 5.0
    # How long SIGTERM waits for commands in flight (keep below systemd's TimeoutStopSec).
    drain: float = 5.0


@dataclass(frozen=True, slots=True)
class RouteConfig:
    name: str
    upstream: address.Address
    listen: tuple[address.Address, ...]


@dataclass(frozen=True, slots=True)
class Config:
    routes: tuple[RouteConfig, ...]
    limits: Limits = field(default_factory=Limits)
    log_level: str = "info"
    # Split migrate/migrate-incoming + capabilities when QEMU lacks the argument (DESIGN §5.2).
    backport: bool = True


class ConfigError(ValueError):
    pass


class _Parser(argparse.ArgumentParser):
    """Bad arguments get one clear line and exit status 2, without the usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"qmp-proxy: error: {message}\n")


def parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="qmp-proxy",
        description="Serve many QMP clients over one QEMU monitor; backport capabilities on "
        "migrate/migrate-incoming.",
    )
    p.add_argument("--upstream", metavar="ADDR", help="QEMU's QMP socket (unix:/path, tcp:H:P)")
    p.add_argument(
        "--listen",
        metavar="ADDR",
        action="append",
        default=[],
        help="a socket for clients (repeatable)",
    )
    p.add_argument("--name", metavar="VM", default=None, help="route name in logs (default: vm)")
    p.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="default: info",
    )
    p.add_argument(
        "--backport",
        choices=["on", "off"],
        default="on",
        help="off: pass capabilities through untouched (QEMU rejects them); default on",
    )
    defaults = Limits()
    p.add_argument("--max-message", type=int, default=defaults.max_message, metavar="BYTES")
    p.add_argument("--max-backlog", type=int, default=defaults.max_backlog, metavar="BYTES")
    p.add_argument("--max-sessions", type=int, default=defaults.max_sessions, metavar="N")
    p.add_argument("--max-queued", type=int, default=defaults.max_queued, metavar="N")
    p.add_argument("--client-wait", type=float, default=defaults.client_wait, metavar="SECONDS")
    return p


def from_args(args: argparse.Namespace) -> Config:
    """Validate parsed flags; raises :class:`ConfigError` naming the flag at fault."""
    if not args.upstream:
        raise ConfigError("--upstream is required")
    if not args.listen:
        raise ConfigError("at least one --listen is required")
    try:
        upstream = address.parse(args.upstream)
    except address.AddressError as exc:
        raise ConfigError(f"--upstream: {exc}") from None
    if upstream.kind == "systemd":
        raise ConfigError("--upstream: systemd: names a listener, not QEMU")
    listen = []
    for text in args.listen:
        try:
            listen.append(address.parse(text))
        except address.AddressError as exc:
            raise ConfigError(f"--listen: {exc}") from None
    for flag in ("max_message", "max_backlog", "max_sessions", "max_queued"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be at least 1")
    if args.client_wait < 0:
        raise ConfigError("--client-wait must not be negative")
    limits = Limits(
        max_message=args.max_message,
        max_backlog=args.max_backlog,
        max_sessions=args.max_sessions,
        max_queued=args.max_queued,
        client_wait=args.client_wait,
    )
    route = RouteConfig(args.name or "vm", upstream, tuple(listen))
    return Config((route,), limits, args.log_level, args.backport == "on")
