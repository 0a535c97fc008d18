"""``qmp-proxy-qemu``: libvirt's ``<emulator>``, putting the proxy in front of each QEMU.

libvirt makes a domain's monitor itself: it binds and listens on
``/var/lib/libvirt/qemu/domain-ID-NAME/monitor.sock``, passes the listening descriptor as
``-chardev socket,id=charmonitor,fd=N,server=on,wait=off`` and connects to that path, possibly
before QEMU even runs.  The one place to step in is the emulator binary.  So this wrapper:

* execs the real QEMU unchanged (argv and environment as given) for anything that is not a
  domain start with a ``charmonitor`` chardev on a descriptor: libvirt's capability probes;
* for a domain start, starts one proxy on libvirt's listener (``fd:N``) with QEMU's monitor
  moved to a private socket beside it, waits until the proxy is serving, then execs the real
  QEMU with only that chardev rewritten, **under the same pid**: libvirt's pidfile, cgroup
  placement and process tracking stay right.

The proxy is a grandchild (it is not QEMU's child, so QEMU's child handling never sees it)
that watches QEMU through a pidfd: it lives exactly as long as that QEMU, and it holds
libvirt's connection until QEMU greets however long QEMU takes to start (``client_wait`` is
infinite here).  libvirt takes an EOF on the monitor for QEMU's death, so nothing else ends
it: one proxy per domain, sharing nothing with any other.  If the proxy cannot start, the
wrapper says why on stderr (libvirt shows it in ``virsh start``'s error and the domain log)
and QEMU does not start, unless ``if_proxy_fails = "run-qemu-alone"``.

Settings: ``$QMP_PROXY_QEMU_CONFIG`` or ``/etc/qmp-proxy/qemu.toml`` (``config/qemu.toml``
documents every key).  libvirt clears the environment, so a domain sets the variable with
``<qemu:commandline><qemu:env .../></qemu:commandline>``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal, NoReturn

import uvloop

from proxy import config, logs
from proxy.address import Address
from proxy.config import Config, ConfigError, Limits, ListenConfig, RouteConfig
from proxy.journal import JournalError
from proxy.logs import fields
from proxy.server import Server

CONFIG_ENV: Final = "QMP_PROXY_QEMU_CONFIG"
DEFAULT_CONFIG: Final = Path("/etc/qmp-proxy/qemu.toml")
DEFAULT_QEMU: Final = "/usr/bin/qemu-system-x86_64"
# QEMU's monitor, beside libvirt's own socket (a directory QEMU may write, under libvirt's
# confinement).
PRIVATE_SOCKET: Final = "qmp-proxy-qemu.sock"
_KEYS: Final = {
    "qemu",
    "listen",
    "backport",
    "limits",
    "state_dir",
    "log_level",
    "if_proxy_fails",
    "metrics_dir",
}
# Held until QEMU greets, as QEMU's own pre-opened socket would; QEMU's socket appears within
# moments of the exec, so it is looked for often.  The file's [limits] override these.
WRAPPER_LIMITS: Final = Limits(client_wait=float("inf"), backoff_min=0.01, backoff_max=0.25)
_WRAPPER_LIMIT_KEYS: Final = ("client_wait", "backoff_min", "backoff_max")

OnFailure = Literal["refuse", "run-qemu-alone"]


@dataclass(frozen=True)
class Settings:
    qemu: str = DEFAULT_QEMU
    listen: tuple[ListenConfig, ...] = ()
    backport: bool = True
    limits: Limits = WRAPPER_LIMITS
    state_dir: Path | None = None
    log_level: str = "info"
    if_proxy_fails: OnFailure = "refuse"
    metrics_dir: Path | None = None


@dataclass(frozen=True)
class Monitor:
    """libvirt's monitor chardev: where it is in argv, and the descriptor it names."""

    index: int  # of the chardev's option string
    fd: int


def load_settings(path: Path, name: str, required: bool) -> Settings:
    """The wrapper's settings, ``{name}`` in listener addresses replaced by the domain's name;
    raises :class:`ConfigError` with every problem."""
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        if required:
            raise ConfigError([f"{path}: no such file"]) from None
        return Settings()
    except OSError as exc:
        raise ConfigError([f"{path}: {exc.strerror}"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: not valid TOML: {exc}"]) from None
    problems: list[str] = []

    def bad(key: str, why: str) -> None:
        problems.append(f"{path}: {key}: {why}")

    for key in data.keys() - _KEYS:
        bad(key, "unknown key")
    qemu = data.get("qemu", DEFAULT_QEMU)
    if not isinstance(qemu, str) or not qemu.startswith("/"):
        bad("qemu", "must be the absolute path of the real QEMU binary")
        qemu = DEFAULT_QEMU
    listen: list[ListenConfig] = []
    if "listen" in data:
        items = data["listen"]
        if isinstance(items, list):
            items = [_named(item, name) for item in items]
        listen = config.parse_listeners(items, "listen", bad, {})
    backport = data.get("backport", True)
    if not isinstance(backport, bool):
        bad("backport", "must be true or false")
        backport = True
    limits_table = data.get("limits", {})
    if isinstance(limits_table, dict):
        defaults = {key: getattr(WRAPPER_LIMITS, key) for key in _WRAPPER_LIMIT_KEYS}
        limits_table = {**defaults, **limits_table}
    limits = config.parse_limits(limits_table, bad)
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
    log_level = data.get("log_level", "info")
    if log_level not in config.LOG_LEVELS:
        bad("log_level", f"must be one of {', '.join(config.LOG_LEVELS)}")
        log_level = "info"
    on_failure = data.get("if_proxy_fails", "refuse")
    if on_failure not in ("refuse", "run-qemu-alone"):
        bad("if_proxy_fails", 'must be "refuse" or "run-qemu-alone"')
        on_failure = "refuse"
    if problems:
        raise ConfigError(problems)
    return Settings(
        qemu=qemu,
        listen=tuple(listen),
        backport=backport,
        limits=limits,
        state_dir=Path(state_dir) if state_dir else None,
        log_level=log_level,
        if_proxy_fails=on_failure,
        metrics_dir=Path(metrics_dir) if metrics_dir else None,
    )


def _named(item: object, name: str) -> object:
    if isinstance(item, str):
        return item.replace("{name}", name)
    if isinstance(item, dict) and isinstance(item.get("address"), str):
        return {**item, "address": item["address"].replace("{name}", name)}
    return item


# -- QEMU's command line -------------------------------------------------------------------------


def split_options(text: str) -> list[str]:
    """QEMU's option string into its parts: ``,`` separates, ``,,`` is a literal comma."""
    parts: list[str] = []
    current: list[str] = []
    i = 0
    while i < len(text):
        if text[i] == ",":
            if text[i + 1 : i + 2] == ",":
                current.append(",")
                i += 2
                continue
            parts.append("".join(current))
            current = []
        else:
            current.append(text[i])
        i += 1
    parts.append("".join(current))
    return parts


def find_monitor(args: list[str]) -> Monitor | None:
    """libvirt's monitor: ``-chardev socket,id=charmonitor,fd=N,...``; None for anything else."""
    for index in range(len(args) - 1):
        if args[index] not in ("-chardev", "--chardev"):
            continue
        parts = split_options(args[index + 1])
        if parts[0] != "socket" or "id=charmonitor" not in parts[1:]:
            continue
        fds = [p[3:] for p in parts[1:] if p.startswith("fd=")]
        if len(fds) == 1 and fds[0].isdigit():
            return Monitor(index + 1, int(fds[0]))
    return None


def domain_name(args: list[str]) -> str:
    """The domain's name from ``-name guest=NAME,...`` (or ``-name NAME``), else ``vm``."""
    for index in range(len(args) - 1):
        if args[index] in ("-name", "--name"):
            parts = split_options(args[index + 1])
            for part in parts:
                if part.startswith("guest="):
                    return part[len("guest=") :] or "vm"
            if parts[0] and "=" not in parts[0]:
                return parts[0]
    return "vm"


def rewrite_monitor(args: list[str], monitor: Monitor, path: str) -> list[str]:
    """The same arguments with the monitor chardev on ``path`` instead of the descriptor, and
    ``wait=on``: QEMU then takes its first client (the proxy) before its main loop runs.

    With ``wait=off`` a client that connects while QEMU is still starting meets a race in
    QEMU itself (the main thread and the monitor's I/O thread both act on the pending
    connection): under load QEMU 10.0 closed its listening socket (a GLib ``g_source_destroy``
    assertion) or aborted in ``tcp_chr_change_state``, about one start in a thousand, and the
    proxy connects exactly then.  libvirt's own descriptor needs no such care: the proxy holds
    it, and QEMU never sees it.
    """
    parts = split_options(args[monitor.index])
    parts = [f"path={path}" if p == f"fd={monitor.fd}" else p for p in parts]
    parts = [p for p in parts if p.split("=", 1)[0] not in ("wait", "nowait")] + ["wait=on"]
    out = list(args)
    out[monitor.index] = ",".join(p.replace(",", ",,") for p in parts)
    return out


# -- the wrapper ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv if argv is None else argv)
    args = argv[1:]
    monitor = find_monitor(args)
    name = domain_name(args)
    given = os.environ.get(CONFIG_ENV)
    path = Path(given) if given else DEFAULT_CONFIG
    try:
        settings = load_settings(path, name, required=bool(given))
    except ConfigError as exc:
        for problem in exc.problems:
            _say(problem)
        _say("QEMU not started: fix the settings above")
        return 1
    if monitor is None:  # a capability probe, or anything else: QEMU exactly as asked
        _exec(settings.qemu, args)
    try:
        listener = socket.socket(fileno=os.dup(monitor.fd))
        own = listener.getsockname()
        listener.close()
    except OSError as exc:
        _say(f"the monitor's descriptor {monitor.fd} is not a socket: {exc.strerror}")
        return 1
    if not isinstance(own, str) or not own.startswith("/"):
        _say(f"the monitor's descriptor {monitor.fd} is not a unix socket with a path")
        return 1
    private = str(Path(own).parent / PRIVATE_SOCKET)
    error = _start_proxy(settings, name, monitor.fd, private)
    if error is not None:
        _say(f"the proxy could not start: {error}")
        if settings.if_proxy_fails == "run-qemu-alone":
            _say("starting QEMU without it (if_proxy_fails = run-qemu-alone)")
            _exec(settings.qemu, args)
        _say("QEMU not started")
        return 1
    os.set_inheritable(monitor.fd, False)  # the proxy owns libvirt's listener now
    with contextlib.suppress(FileNotFoundError):
        os.unlink(private)
    _exec(settings.qemu, rewrite_monitor(args, monitor, private))


def _say(line: str) -> None:
    print(f"qmp-proxy-qemu: {line}", file=sys.stderr, flush=True)


def _exec(qemu: str, args: list[str]) -> NoReturn:
    try:
        os.execv(qemu, [qemu, *args])
    except OSError as exc:
        _say(f"cannot run {qemu}: {exc.strerror}")
        os._exit(1)


def _start_proxy(settings: Settings, name: str, fd: int, private: str) -> str | None:
    """Fork the proxy off (twice: it is nobody's child but init's) and wait until it serves;
    its error message, or None."""
    qemu_pid = os.getpid()
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the forked processes
        os.close(read_end)
        try:
            os.setsid()
            if os.fork() != 0:
                os._exit(0)
            code = _proxy(settings, name, fd, private, qemu_pid, write_end)
        except BaseException as exc:  # the wrapper must hear of it, whatever it is
            with contextlib.suppress(OSError):
                os.write(write_end, f"{type(exc).__name__}: {exc}".encode())
            code = 1
        os._exit(code)
    os.close(write_end)
    chunks = []
    while chunk := os.read(read_end, 4096):
        chunks.append(chunk)
    os.close(read_end)
    os.waitpid(child, 0)
    answer = b"".join(chunks).decode(errors="replace")
    if answer == "ok":
        return None
    return answer or "it exited without saying why"


def _proxy(settings: Settings, name: str, fd: int, private: str, qemu_pid: int, ready: int) -> int:
    """The proxy process: serve until QEMU exits."""
    keep = {0, 1, 2, fd, ready}
    for entry in os.listdir("/proc/self/fd"):
        number = int(entry)
        if number not in keep:
            with contextlib.suppress(OSError):
                os.close(number)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.close(null)
    route = RouteConfig(
        name,
        Address("unix", path=private),
        (ListenConfig(Address("fd", path=str(fd))), *settings.listen),
    )
    cfg = Config(
        (route,),
        limits=settings.limits,
        log_level=settings.log_level,
        backport=settings.backport,
        state_dir=settings.state_dir or Path(private).parent,
    )
    logs.setup(cfg.log_level)
    return uvloop.run(_serve(cfg, qemu_pid, ready, settings.metrics_dir, name))


async def _serve(
    cfg: Config, qemu_pid: int, ready: int, metrics_dir: Path | None, name: str
) -> int:
    loop = asyncio.get_running_loop()
    log = logging.getLogger("qmp_proxy")
    pidfd = os.pidfd_open(qemu_pid)  # before anything: QEMU's exit must never be missed
    server = Server(cfg, loop)
    try:
        server.start()
    except (OSError, JournalError) as exc:
        os.write(ready, str(exc).encode())
        os.close(ready)
        return 1
    os.write(ready, b"ok")
    os.close(ready)
    stop = asyncio.Event()
    loop.add_reader(pidfd, stop.set)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    writer = None
    if metrics_dir is not None:
        writer = loop.create_task(server.metrics.publish(metrics_dir / f"{name}.prom"))
    log.info(fields("wrapping", route=name, qemu_pid=qemu_pid))
    await stop.wait()
    loop.remove_reader(pidfd)
    os.close(pidfd)
    if writer is not None:
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await writer
    await server.stop()
    log.info(fields("stopped", why="QEMU exited"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
