"""Settings: a TOML file and/or command-line flags, into frozen dataclasses, validated up front.

Every limit is a named default here, with the precedent it follows, so the value a test or an
operator sets is the value the proxy enforces.  A bad file is reported completely, one
line per problem naming the file and the key, before anything starts; ``config/qmp-proxy.toml``
documents every key.
"""

from __future__ import annotations

import argparse
import dataclasses
import grp
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, NoReturn

from proxy import VERSION, address
from proxy.framing import DEFAULT_MAX_MESSAGE
from proxy.logs import LOG_FORMATS, LogFormat
from proxy.policy import OPEN, Policy
from proxy.session import MAX_CLIENT_MESSAGE

# The most QEMU may write in one message before it is a protocol error (the connection is
# dropped and the route reconnects).  libvirt and qemu.qmp read replies with 10 MiB buffers, so
# no client could take a longer one anyway; QEMU's largest ordinary line, query-qmp-schema, is
# about 250 KB.
DEFAULT_MAX_UPSTREAM_LINE: Final = 16 << 20


@dataclass(frozen=True, slots=True)
class Limits:
    # One message a client may make the proxy buffer (QEMU's own bound is 64 MiB).
    max_message: int = DEFAULT_MAX_MESSAGE
    # Bytes queued for a client beyond the message being written; then it is a slow reader.
    max_backlog: int = 8 << 20
    # Client sessions per listener of a route, the waiting ones included.
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
    # One message from QEMU (see DEFAULT_MAX_UPSTREAM_LINE).
    max_upstream_line: int = DEFAULT_MAX_UPSTREAM_LINE


# A restricted listener's default bound on one client message: far above any query a
# monitoring tool sends, and about half a second of QEMU's reading.
RESTRICTED_MAX_MESSAGE: Final = 64 << 10


@dataclass(frozen=True, slots=True)
class ListenConfig:
    address: address.Address
    mode: int = 0o600  # unix sockets: a QMP socket is root over the VM
    group: str | None = None
    # Whether mode was set: an inherited socket keeps the mode its creator gave it unless so.
    mode_given: bool = False
    allow_remote: bool = False  # TCP on a non-loopback address; QMP has no authentication
    policy: Policy = OPEN
    # This listener's bound on one client message, below the route's ``max_message``; None:
    # the route's.  QEMU reads its monitor a byte at a time, so every byte a client may send
    # delays every other client of the shared monitor (about 10 us a byte): a restricted
    # listener (monitoring tools) gets RESTRICTED_MAX_MESSAGE unless it says otherwise.
    max_message: int | None = None

    def __post_init__(self) -> None:
        if self.max_message is None and not self.policy.open:
            object.__setattr__(self, "max_message", RESTRICTED_MAX_MESSAGE)


@dataclass(frozen=True, slots=True)
class RouteConfig:
    name: str
    upstream: address.Address
    listen: tuple[ListenConfig, ...]


@dataclass(frozen=True, slots=True)
class Config:
    routes: tuple[RouteConfig, ...]
    limits: Limits = field(default_factory=Limits)
    log_level: str = "info"
    # Split migrate/migrate-incoming + capabilities when QEMU lacks the argument.
    backport: bool = True
    metrics: tuple[str, int] | None = None
    # Where a split journals its pending restore (crash safety); None: see state_directory().
    state_dir: Path | None = None
    source: Path | None = None  # the file it came from, for SIGHUP
    # Where wrapped libvirt domains' proxies publish their metrics: merged into /metrics.
    metrics_dir: Path | None = None
    # The live view's socket (qmp-proxy status).  None: none.  control_default: the default
    # place, not asked for, so a failure to bind it is a warning, not a failed start.
    control: ListenConfig | None = None
    control_default: bool = False
    log_format: LogFormat = "auto"


class ConfigError(ValueError):
    """One or more problems, each a line naming where and why."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


LOG_LEVELS = ("debug", "info", "warning", "error")
# Each limit's type, from its default (the dataclass's annotations are strings under
# ``from __future__ import annotations``).
_LIMIT_TYPES: dict[str, type] = {f.name: type(f.default) for f in dataclasses.fields(Limits)}
_TOP_KEYS = {
    "log_level",
    "log_format",
    "backport",
    "metrics",
    "metrics_dir",
    "control",
    "state_dir",
    "limits",
    "route",
}
# What each limit is, in the units its value is in (for --help and the man page).
_LIMIT_HELP: Final = {
    "max_message": "bytes one client message may occupy while buffered",
    "max_backlog": "bytes queued for a client that does not read before it is disconnected",
    "max_sessions": "client sessions per listener of a route",
    "max_queued": "a session's unanswered requests before the proxy stops reading it",
    "client_wait": "seconds a client is held, ungreeted, while QEMU is not ready (inf: always)",
    "backoff_min": "seconds before the first reconnect to QEMU",
    "backoff_max": "seconds between reconnects at most",
    "drain": "seconds SIGTERM waits for commands in flight",
    "max_upstream_line": "bytes of one line from QEMU before it is a protocol error",
}
_ROUTE_KEYS = {"name", "upstream", "listen"}
_LISTEN_KEYS = {"address", "mode", "group", "allow_remote", "allow", "deny", "max_message"}


class _Parser(argparse.ArgumentParser):
    """Bad arguments get one clear line and exit status 2, without the usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"qmp-proxy: error: {message}\n")


def default_control() -> ListenConfig:
    """The live view's socket when none is configured: in systemd's RuntimeDirectory=, else
    under /run/qmp-proxy."""
    runtime = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    directory = runtime or "/run/qmp-proxy"
    return ListenConfig(address.Address("unix", path=f"{directory}/control.sock"))


def parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="qmp-proxy",
        description="Serve many QMP clients over one QEMU monitor; backport capabilities on "
        "migrate/migrate-incoming.  'qmp-proxy status --help': the live view of a running "
        "daemon.",
    )
    p.add_argument("--version", action="version", version=f"qmp-proxy {VERSION}")
    p.add_argument("--config", metavar="FILE", type=Path, help="TOML file: one or many routes")
    p.add_argument(
        "--check-config",
        metavar="FILE",
        type=Path,
        help="validate FILE, print one line per problem, exit 0 or 2",
    )
    p.add_argument("--upstream", metavar="ADDR", help="QEMU's QMP socket (unix:/path, tcp:H:P)")
    p.add_argument(
        "--listen",
        metavar="ADDR",
        action="append",
        default=None,
        help="a socket for clients (repeatable)",
    )
    p.add_argument("--name", metavar="VM", default=None, help="route name (default: vm)")
    p.add_argument(
        "--metrics",
        metavar="[HOST:]PORT",
        default=None,
        help="serve /metrics, /healthz, /readyz (HOST defaults to 127.0.0.1)",
    )
    p.add_argument("--log-level", default=None, choices=LOG_LEVELS, help="default: info")
    p.add_argument(
        "--log-format",
        default=None,
        choices=LOG_FORMATS,
        help="text (timestamped lines), journal (<N> priority prefixes, no timestamps), json "
        "(one object per event); default auto: journal when stderr is journald's, else text",
    )
    p.add_argument(
        "--control",
        metavar="ADDR",
        default=None,
        help="the live view's unix socket for 'qmp-proxy status' (default: "
        "unix:$RUNTIME_DIRECTORY/control.sock, else unix:/run/qmp-proxy/control.sock; "
        "'none': no control socket)",
    )
    p.add_argument(
        "--state-dir",
        metavar="DIR",
        type=Path,
        default=None,
        help="where splits journal pending restores (default: $RUNTIME_DIRECTORY, "
        "else $STATE_DIRECTORY, else /run/qmp-proxy-state)",
    )
    p.add_argument(
        "--backport",
        choices=["on", "off"],
        default=None,
        help="off: pass capabilities through untouched (QEMU rejects them); default on",
    )
    limits = p.add_argument_group("limits (override the file's [limits])")
    defaults = Limits()
    for name, kind in _LIMIT_TYPES.items():
        limits.add_argument(
            f"--{name.replace('_', '-')}",
            type=kind,
            default=None,
            metavar="N",
            dest=name,
            help=f"{_LIMIT_HELP[name]} (default: {getattr(defaults, name)})",
        )
    return p


def parse_metrics(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r}: expected [HOST:]PORT")
    host = host.strip("[]") if sep else "127.0.0.1"
    return host or "127.0.0.1", int(port)


def load(path: Path) -> Config:
    """Read and validate a TOML file; raises :class:`ConfigError` listing every problem."""
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError([f"{path}: {exc.strerror}"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: not valid TOML: {exc}"]) from None
    return _from_table(data, path)


def _from_table(data: dict[str, Any], path: Path) -> Config:
    problems: list[str] = []

    def bad(key: str, why: str) -> None:
        problems.append(f"{path}: {key}: {why}")

    for key in data.keys() - _TOP_KEYS:
        bad(key, "unknown key")
    log_level = data.get("log_level", "info")
    if log_level not in LOG_LEVELS:
        bad("log_level", f"must be one of {', '.join(LOG_LEVELS)}")
    log_format = data.get("log_format", "auto")
    if log_format not in LOG_FORMATS:
        bad("log_format", f"must be one of {', '.join(LOG_FORMATS)}")
        log_format = "auto"
    control: ListenConfig | None = None
    control_default = False
    if "control" not in data:
        control, control_default = default_control(), True
    elif data["control"] not in ("", False):
        found = parse_listeners([data["control"]], "control", bad, {})
        if found and found[0].address.kind != "unix":
            bad("control", "must be a unix socket")
        elif found:
            control = found[0]
    backport = data.get("backport", True)
    if not isinstance(backport, bool):
        bad("backport", "must be true or false")
    metrics = None
    if "metrics" in data:
        try:
            metrics = parse_metrics(str(data["metrics"]))
        except ValueError as exc:
            bad("metrics", str(exc))
    state_dir = data.get("state_dir")
    if state_dir is not None and (not isinstance(state_dir, str) or not state_dir.startswith("/")):
        bad("state_dir", "must be an absolute path")
        state_dir = None
    metrics_dir = data.get("metrics_dir")
    if metrics_dir is not None and (
        not isinstance(metrics_dir, str) or not metrics_dir.startswith("/")
    ):
        bad("metrics_dir", "must be an absolute path")
        metrics_dir = None
    limits = parse_limits(data.get("limits", {}), bad)
    routes = _routes(data.get("route", []), bad)
    if problems:
        raise ConfigError(problems)
    return Config(
        tuple(routes),
        limits=limits,
        log_level=log_level,
        backport=backport,
        metrics=metrics,
        state_dir=Path(state_dir) if state_dir else None,
        source=path,
        metrics_dir=Path(metrics_dir) if metrics_dir else None,
        control=control,
        control_default=control_default,
        log_format=log_format,
    )


def parse_limits(table: object, bad: Any) -> Limits:
    if not isinstance(table, dict):
        bad("limits", "must be a table")
        return Limits()
    values: dict[str, Any] = {}
    for key, value in table.items():
        kind = _LIMIT_TYPES.get(key)
        if kind is None:
            bad(f"limits.{key}", "unknown key")
        elif isinstance(value, bool) or not isinstance(value, int | float):
            bad(f"limits.{key}", "must be a number")
        elif kind is int and not isinstance(value, int):
            bad(f"limits.{key}", "must be a whole number")
        elif value < 0 or (value == 0 and kind is int):
            bad(f"limits.{key}", "must be positive")
        else:
            values[key] = value
    limits = Limits(**values)
    if limits.max_message > MAX_CLIENT_MESSAGE:
        bad(
            "limits.max_message",
            f"must not exceed {MAX_CLIENT_MESSAGE} (QEMU's token count, less the proxy's id)",
        )
    if limits.backoff_min > limits.backoff_max:
        bad("limits.backoff_min", "must not exceed limits.backoff_max")
    return limits


def _routes(items: object, bad: Any) -> list[RouteConfig]:
    if not isinstance(items, list):
        bad("route", "must be an array of tables ([[route]])")
        return []
    routes: list[RouteConfig] = []
    upstreams: dict[address.Address, str] = {}
    paths: dict[str, str] = {}
    for index, item in enumerate(items):
        where = f"route[{index}]"
        if not isinstance(item, dict):
            bad(where, "must be a table")
            continue
        for key in item.keys() - _ROUTE_KEYS:
            bad(f"{where}.{key}", "unknown key")
        name = item.get("name", "vm" if len(items) == 1 else "")
        if isinstance(name, str) and name:
            where = f"route[{name}]"
        else:
            bad(f"{where}.name", "required (the vm label in metrics and logs)")
            name = where
        if name in {r.name for r in routes}:
            bad(f"{where}.name", "used by two routes")
        upstream = None
        try:
            upstream = address.parse(str(item["upstream"]))
            if upstream.kind in ("systemd", "fd"):
                raise address.AddressError(f"{upstream.kind}: names a listener, not QEMU")
        except KeyError:
            bad(f"{where}.upstream", "required")
        except address.AddressError as exc:
            bad(f"{where}.upstream", str(exc))
            upstream = None
        if upstream is not None:
            if upstream in upstreams:
                bad(f"{where}.upstream", f"also used by route {upstreams[upstream]}")
            upstreams[upstream] = name
        listen = parse_listeners(item.get("listen", []), f"{where}.listen", bad, paths)
        if upstream is not None:
            routes.append(RouteConfig(name, upstream, tuple(listen)))
    return routes


def parse_listeners(
    items: object, where: str, bad: Any, paths: dict[str, str]
) -> list[ListenConfig]:
    if not isinstance(items, list) or not items:
        bad(where, "needs at least one address")
        return []
    out: list[ListenConfig] = []
    for index, item in enumerate(items):
        here = f"{where}[{index}]"
        table = {"address": item} if isinstance(item, str) else item
        if not isinstance(table, dict):
            bad(here, "must be an address or a table")
            continue
        for key in table.keys() - _LISTEN_KEYS:
            bad(f"{here}.{key}", "unknown key")
        try:
            addr = address.parse(str(table["address"]))
        except KeyError:
            bad(f"{here}.address", "required")
            continue
        except address.AddressError as exc:
            bad(f"{here}.address", str(exc))
            continue
        key = str(addr)
        if key in paths:
            bad(f"{here}.address", f"{addr} is also a listener of {paths[key]}")
        paths[key] = where
        mode = table.get("mode", "0600")
        try:
            # A string is octal text ("0660"); an integer is its value (TOML's 0o660), so the
            # decimal 660 is refused rather than read as 0o1224.
            if isinstance(mode, bool) or not isinstance(mode, str | int):
                raise ValueError
            mode_bits = int(mode, 8) if isinstance(mode, str) else mode
            if not 0 <= mode_bits <= 0o777:
                raise ValueError
        except ValueError:
            bad(f"{here}.mode", 'must be an octal string such as "0660" (or TOML 0o660)')
            mode_bits = 0o600
        group = table.get("group")
        if group is not None:
            try:
                grp.getgrnam(str(group))
            except KeyError:
                bad(f"{here}.group", f"no such group {group!r}")
        allow_remote = table.get("allow_remote", False)
        if not isinstance(allow_remote, bool):
            bad(f"{here}.allow_remote", "must be true or false")
            allow_remote = False
        if addr.kind == "tcp" and not addr.is_loopback and not allow_remote:
            bad(
                f"{here}.address",
                f"{addr} is not loopback; QMP has no authentication "
                "(set allow_remote = true to accept that)",
            )
        policy = OPEN
        allow = table.get("allow")
        deny = table.get("deny", [])
        if allow is not None and not _globs(allow):
            bad(f"{here}.allow", "must be a list of command patterns")
            allow = None
        if not _globs(deny):
            bad(f"{here}.deny", "must be a list of command patterns")
            deny = []
        if allow is not None or deny:
            policy = Policy(tuple(allow) if allow is not None else None, tuple(deny))
        max_message = table.get("max_message")
        if max_message is not None and (
            isinstance(max_message, bool)
            or not isinstance(max_message, int)
            or not 0 < max_message <= MAX_CLIENT_MESSAGE
        ):
            bad(f"{here}.max_message", f"must be an integer from 1 to {MAX_CLIENT_MESSAGE}")
            max_message = None
        out.append(
            ListenConfig(
                addr,
                mode=mode_bits,
                group=group,
                mode_given="mode" in table,
                allow_remote=allow_remote,
                policy=policy,
                max_message=max_message,
            )
        )
    return out


def _globs(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) and v for v in value)


_ROUTE_FLAGS = ("upstream", "listen", "name")


def from_args(args: argparse.Namespace) -> Config:
    """The file (if any) with the flags laid over it; raises :class:`ConfigError`."""
    flags_given = [f for f in _ROUTE_FLAGS if getattr(args, f) is not None]
    if args.config is not None:
        config = load(args.config)
        if flags_given and len(config.routes) > 1:
            raise ConfigError([f"--{flags_given[0]} cannot be combined with a multi-route file"])
    else:
        config = Config(())
    route = config.routes[0] if config.routes else None
    if route is None and (args.config is None or flags_given):
        # The flags alone make the route: they must name both ends.
        hint = "--config FILE" if args.config is None else f"a [[route]] in {args.config}"
        if args.upstream is None:
            raise ConfigError([f"--upstream is required (or {hint})"])
        if not args.listen:
            raise ConfigError([f"at least one --listen is required (or {hint})"])
    if flags_given:
        upstream = route.upstream if route else None
        if args.upstream is not None:
            try:
                upstream = address.parse(args.upstream)
            except address.AddressError as exc:
                raise ConfigError([f"--upstream: {exc}"]) from None
            if upstream.kind in ("systemd", "fd"):
                raise ConfigError([f"--upstream: {upstream.kind}: names a listener, not QEMU"])
        listen = route.listen if route else ()
        if args.listen is not None:
            listen = tuple(_listen_flag(text) for text in args.listen)
        name = args.name or (route.name if route else "vm")
        assert upstream is not None
        config = dataclasses.replace(config, routes=(RouteConfig(name, upstream, listen),))
    if not config.routes:
        raise ConfigError(
            [f"{args.config}: route: at least one [[route]] (or --upstream/--listen)"]
        )
    overrides = {k: getattr(args, k) for k in _LIMIT_TYPES if getattr(args, k) is not None}
    for key, value in overrides.items():
        if value < 0 or (value == 0 and _LIMIT_TYPES[key] is int):
            raise ConfigError([f"--{key.replace('_', '-')} must be positive"])
    changes: dict[str, Any] = {"limits": dataclasses.replace(config.limits, **overrides)}
    if args.log_level is not None:
        changes["log_level"] = args.log_level
    if args.backport is not None:
        changes["backport"] = args.backport == "on"
    if args.state_dir is not None:
        changes["state_dir"] = args.state_dir
    if args.metrics is not None:
        try:
            changes["metrics"] = parse_metrics(args.metrics)
        except ValueError as exc:
            raise ConfigError([f"--metrics: {exc}"]) from None
    if args.log_format is not None:
        changes["log_format"] = args.log_format
    if args.control is not None:
        changes["control_default"] = False
        if args.control == "none":
            changes["control"] = None
        else:
            control = _listen_flag(args.control)
            if control.address.kind != "unix":
                raise ConfigError(["--control: must be a unix socket"])
            changes["control"] = control
    elif args.config is None:
        changes["control"], changes["control_default"] = default_control(), True
    return dataclasses.replace(config, **changes)


def _listen_flag(text: str) -> ListenConfig:
    try:
        addr = address.parse(text)
    except address.AddressError as exc:
        raise ConfigError([f"--listen: {exc}"]) from None
    if addr.kind == "tcp" and not addr.is_loopback:
        raise ConfigError(
            [
                f"--listen: {addr} is not loopback; QMP has no authentication "
                "(use a config file with allow_remote = true)"
            ]
        )
    return ListenConfig(addr)


def state_directory(config: Config) -> Path:
    """The configured state directory, else systemd's RuntimeDirectory=, else its
    StateDirectory=, else a /run default.

    ``$STATE_DIRECTORY`` is how an environment without systemd's RuntimeDirectory= (the
    container image) names a directory its user owns, so that any command line it is given
    keeps crash safety; ``$RUNTIME_DIRECTORY`` stays first so units that set both keep their
    journal in /run, which a reboot (and QEMU with it) clears.
    """
    if config.state_dir is not None:
        return config.state_dir
    for variable in ("RUNTIME_DIRECTORY", "STATE_DIRECTORY"):
        directory = os.environ.get(variable, "").split(":")[0]
        if directory:
            return Path(directory)
    return Path("/run/qmp-proxy-state")
