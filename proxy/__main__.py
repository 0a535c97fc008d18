"""Entry point: ``qmp-proxy`` and ``python -m proxy``."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import uvloop

from proxy import config, control, logs
from proxy.journal import JournalError
from proxy.logs import fields
from proxy.server import Server

log = logging.getLogger("qmp_proxy")


def _unhandled(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """Whatever the route's own guards did not catch: one escaped line, never a raw traceback."""
    exc = context.get("exception")
    if isinstance(exc, BaseException):
        logs.failure(log, "unhandled_error", exc, where=str(context.get("message")))
    else:
        log.error(fields("unhandled_error", where=str(context.get("message"))))


async def serve(cfg: config.Config, loader: Callable[[], config.Config] | None) -> int:
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(_unhandled)
    server = Server(cfg, loop, loader)
    try:
        server.start()
    except (OSError, JournalError) as exc:
        log.error(fields("start_failed", why=str(exc)))
        return 1
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, server.reload)
    await stop.wait()
    log.info(fields("stopping", drain_s=cfg.limits.drain))
    await server.stop()
    log.info(fields("stopped"))
    return 0


def check(path: str) -> int:
    """``--check-config``: every problem on its own line, exit 0 or 2."""
    try:
        cfg = config.load(Path(path))
    except config.ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 2
    if not cfg.routes:
        print(
            f"{path}: route: at least one [[route]] is required to run from this file alone",
            file=sys.stderr,
        )
        return 2
    print(f"{path}: ok ({len(cfg.routes)} route{'s' if len(cfg.routes) != 1 else ''})")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["status"]:
        return control.main(argv[1:], config.default_control().address)
    parser = config.parser()
    args = parser.parse_args(argv)
    if args.check_config is not None:
        return check(str(args.check_config))
    try:
        cfg = config.from_args(args)
    except config.ConfigError as exc:
        for problem in exc.problems:
            print(f"qmp-proxy: error: {problem}", file=sys.stderr)
        return 2
    logs.setup(cfg.log_level, cfg.log_format)
    loader = (lambda: config.from_args(args)) if args.config is not None else None
    return uvloop.run(serve(cfg, loader))


if __name__ == "__main__":
    sys.exit(main())
