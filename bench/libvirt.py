"""What qmp-proxy-qemu adds to libvirt's own operations, against the same domain without it.

Run from the repository root, as root, with libvirt installed (scripts/install-libvirt.sh)::

    .venv/bin/python -m bench.libvirt [--commands 50] [--saves 5]

Two domains of the same definition (tests/libvirt_env.py's 64 MiB TCG PC, QEMU 7.2) differ
only in ``<emulator>``: the wrapper, or the real QEMU.  libvirtd runs as in the tests, in a
private mount namespace.  Measured, alternating between the two so that drift hits both alike:

* ``virsh qemu-monitor-command DOM '{"execute":"query-status"}'``, wall time of the whole
  command (virsh's start, its connection to libvirtd, libvirt's monitor round trip);
* the same commands' monitor round trip inside libvirtd: from libvirt's ``QEMU_MONITOR_SEND_MSG``
  to its ``QEMU_MONITOR_RECV_REPLY`` in libvirtd's log (millisecond timestamps, so the mean of
  many is the figure);
* ``virsh save DOM FILE`` (libvirt passes a descriptor with ``getfd`` and migrates to
  ``fd:``; the stream goes from QEMU straight into the descriptor, not through the proxy), and
  the ``virsh restore`` that follows it (a new QEMU, and with the wrapper a new proxy).

Figures only, no target: medians and the spread.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Final

from tests.libvirt_env import REAL_QEMU, WRAPPER, Libvirt, make_domain

QUERY: Final = '{"execute":"query-status"}'
_STAMP: Final = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3})\+0000: .*? (QEMU_MONITOR_\w+): mon=(\w+) "
)
_ID: Final = re.compile(r'"id": ?"(libvirt-\d+)"')


def timed(action: Callable[..., object], *args: object) -> float:
    """Seconds ``action(*args)`` took."""
    start = time.perf_counter()
    action(*args)
    return time.perf_counter() - start


def virsh_query(lv: Libvirt, name: str) -> None:
    done = subprocess.run(
        ["virsh", "-q", "-c", lv.uri, "qemu-monitor-command", name, QUERY],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0 or b'"running"' not in done.stdout:
        raise RuntimeError(f"qemu-monitor-command {name}: {done.stderr!r} {done.stdout!r}")


def monitor_round_trips(log: str) -> dict[str, list[float]]:
    """Per libvirt monitor (``mon=0x...``), the seconds from each query-status libvirt sent to
    its reply, from libvirtd's log."""
    sent: dict[tuple[str, str], datetime] = {}
    trips: dict[str, list[float]] = {}
    for line in log.splitlines():
        stamp, ident = _STAMP.match(line), _ID.search(line)
        if stamp is None or ident is None:
            continue
        when = datetime.fromisoformat(stamp.group(1))
        key = (stamp.group(3), ident.group(1))
        if stamp.group(2) == "QEMU_MONITOR_SEND_MSG" and '"execute":"query-status"' in line:
            sent[key] = when
        elif stamp.group(2) == "QEMU_MONITOR_RECV_REPLY" and key in sent:
            trips.setdefault(key[0], []).append((when - sent.pop(key)).total_seconds())
    return trips


def spread(values: list[float]) -> str:
    """Median, and the quartiles, in milliseconds."""
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return f"{statistics.median(values) * 1000:8.1f} ms  (IQR {q[0] * 1000:.1f}-{q[2] * 1000:.1f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--commands", type=int, default=50, help="qemu-monitor-command runs")
    parser.add_argument("--saves", type=int, default=5, help="save/restore cycles")
    args = parser.parse_args()
    with Libvirt() as lv:
        names = {"proxy": "qpb-proxy", "plain": "qpb-plain"}
        for kind, name in names.items():
            emulator = WRAPPER if kind == "proxy" else Path(REAL_QEMU)
            dom = make_domain(lv, name, emulator=emulator)
            lv.virsh("create", str(dom.xml))
        versions = dict(
            line.split(": ", 1) for line in lv.virsh("version").splitlines() if ": " in line
        )
        print(
            f"{versions.get('Using library')}, {versions.get('Running hypervisor')}, "
            f"QEMU runs as {lv.qemu_user}"
        )
        query: dict[str, list[float]] = {kind: [] for kind in names}
        monitors: dict[str, str] = {}
        for kind, name in names.items():  # warm-up: each path's first use; which monitor
            before = set(monitor_round_trips(lv.log.read_text(errors="replace")))
            virsh_query(lv, name)
            (monitors[kind],) = set(monitor_round_trips(lv.log.read_text())) - before
        for _ in range(args.commands):
            for kind, name in names.items():
                query[kind].append(timed(virsh_query, lv, name))
        trips = monitor_round_trips(lv.log.read_text(errors="replace"))
        inside = {kind: trips[mon][1:] for kind, mon in monitors.items()}
        save: dict[str, list[float]] = {kind: [] for kind in names}
        restore: dict[str, list[float]] = {kind: [] for kind in names}
        for run in range(args.saves):
            # Each goes first every other time: a restore's start-up load falls on the next save.
            for kind, name in list(names.items())[:: 1 if run % 2 else -1]:
                target = lv.root / f"{name}.save"
                save[kind].append(timed(lv.virsh, "save", name, str(target)))
                restore[kind].append(timed(lv.virsh, "restore", str(target)))
                target.unlink()
                time.sleep(1.0)
        print(f"\nlibvirt's monitor round trip for those commands (mean, {args.commands} runs)")
        for kind in ("plain", "proxy"):
            label = "with the wrapper   " if kind == "proxy" else "without the wrapper"
            print(f"  {label} {statistics.mean(inside[kind]) * 1000:8.2f} ms")
        added = statistics.mean(inside["proxy"]) - statistics.mean(inside["plain"])
        print(f"  added (mean)        {added * 1000:8.2f} ms")
        rows = [
            (f"qemu-monitor-command query-status ({args.commands} runs)", query),
            (f"virsh save, 64 MiB guest ({args.saves} runs)", save),
            (f"virsh restore ({args.saves} runs)", restore),
        ]
        for title, data in rows:
            added = statistics.median(data["proxy"]) - statistics.median(data["plain"])
            print(f"\n{title}")
            print(f"  without the wrapper {spread(data['plain'])}")
            print(f"  with the wrapper    {spread(data['proxy'])}")
            print(f"  added (median)      {added * 1000:8.1f} ms")


if __name__ == "__main__":
    main()
