"""The systemd protocols the proxy speaks, without libsystemd.

sd_notify is one datagram per message to ``$NOTIFY_SOCKET`` (a leading ``@`` means the abstract
namespace); systemd's own position is that this datagram protocol *is* the API.  Socket
activation hands listeners over as fds 3.. with ``LISTEN_FDS``/``LISTEN_FDNAMES``, valid only if
``LISTEN_PID`` is this process.  The watchdog is pinged from the event loop, so a wedged loop
stops the pings and systemd restarts the service.
"""

from __future__ import annotations

import os
import socket
import time

SD_LISTEN_FDS_START = 3


def notify(*lines: str) -> bool:
    """Send ``READY=1``, ``STATUS=...`` and the like; False when not run by systemd."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):
        path = "\0" + path[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.sendto("\n".join(lines).encode(), path)
        except OSError:
            return False
    return True


def reloading() -> bool:
    """``RELOADING=1`` with the monotonic timestamp ``Type=notify-reload`` wants."""
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify("RELOADING=1", f"MONOTONIC_USEC={usec}")


def watchdog_interval() -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half of ``WATCHDOG_USEC``), if systemd wants them."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or not usec.isdigit() or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 1e6 / 2


def listen_fds() -> dict[str, socket.socket]:
    """Adopt the listening sockets systemd passed, by ``FileDescriptorName=``.

    The variables are removed so children do not inherit them.  Unnamed sockets get systemd's
    default name ``unknown``; with several, the later ones get ``unknown.N``.
    """
    pid = os.environ.pop("LISTEN_PID", None)
    count = os.environ.pop("LISTEN_FDS", None)
    names = os.environ.pop("LISTEN_FDNAMES", None)
    if pid != str(os.getpid()) or not count or not count.isdigit():
        return {}
    labels = names.split(":") if names else []
    out: dict[str, socket.socket] = {}
    for index in range(int(count)):
        fd = SD_LISTEN_FDS_START + index
        os.set_inheritable(fd, False)
        name = labels[index] if index < len(labels) else "unknown"
        if name in out:
            name = f"{name}.{index}"
        out[name] = socket.socket(fileno=fd)
    return out
