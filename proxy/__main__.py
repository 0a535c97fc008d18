"""Entry point: ``qmp-proxy`` and ``python -m proxy``."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

import uvloop

from proxy import config, logs
from proxy.logs import fields
from proxy.server import Server

log = logging.getLogger("qmp_proxy")


async def serve(cfg: config.Config) -> int:
    loop = asyncio.get_running_loop()
    server = Server(cfg, loop)
    try:
        server.start()
    except OSError as exc:
        log.error(fields("listen_failed", why=str(exc)))
        return 1
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info(fields("stopping"))
    await server.stop()
    log.info(fields("stopped"))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = config.parser()
    args = parser.parse_args(argv)
    try:
        cfg = config.from_args(args)
    except config.ConfigError as exc:
        parser.error(str(exc))
    logs.setup(cfg.log_level)
    return uvloop.run(serve(cfg))


if __name__ == "__main__":
    sys.exit(main())
