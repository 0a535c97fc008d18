"""qmp-proxy benchmarks: one command, a table per benchmark, ratios and a summary.

    python bench/run.py [--quick] [--only latency,cpu,throughput,fanout,memory,migrate]

(``python`` with uvloop and orjson: the project's ``.venv/bin/python``.)  ``--quick`` takes about
a minute, the full run a few.  ``bench/hotspots.py`` shows where the proxy's CPU goes;
``bench/instructions.py`` counts its instructions per round trip, without noise.

Every figure is measured in the same run against the same baselines:

* a real QEMU 7.2 (``-M none -S``) serves, in turn and in many small interleaved batches, a direct
  connection, a ``socat`` relay, the bare Python relay of ``bench/relay.py`` (uvloop, no parsing:
  the floor no Python proxy can beat) and the proxy.  QEMU serves one client at a time and the
  proxy holds its connection, so the proxy is started for each of its batches and stopped after;
* where QEMU itself would be the bottleneck (CPU per command, event fan-out, memory) the proxy
  runs against ``bench/fakeqemu.py``, which answers at once.

CPU is the proxy process's own ``utime + stime`` (read from its CPU-time clock, the same total
as ``/proc/PID/stat`` but in nanoseconds rather than 10 ms ticks) before and after a
measurement, divided by the work done.  The load comes from this process (raw sockets, compact
JSON without newlines, as ``qemu.qmp`` writes it, one CRLF line read per reply).  The run
prints figures and PASS/MISS against the issue's targets; nothing here asserts timings.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import math
import os
import platform
import random
import resource
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Final, TypeVar, cast

try:
    import orjson
    import uvloop
except ImportError as exc:  # pragma: no cover - the message is the point
    sys.exit(f"bench/run.py needs uvloop and orjson ({exc}); run it with .venv/bin/python")

REPO: Final = Path(__file__).resolve().parent.parent
BENCH: Final = REPO / "bench"
sys.path.insert(0, str(REPO))

from tests.qemu import QEMU_BINARIES, QemuProcess  # noqa: E402

T = TypeVar("T")
CLK_TCK: Final = os.sysconf("SC_CLK_TCK")
QUERY_STATUS: Final = b'{"execute":"query-status","id":%d}'
CAPS: Final = b'{"execute":"qmp_capabilities"}'
CAPS_OOB: Final = b'{"execute":"qmp_capabilities","arguments":{"enable":["oob"]}}'
MIGRATE_URI: Final = "exec:cat > /dev/null"
MIGRATE_CAPS: Final = [{"capability": "events", "state": True}]

# Targets the proxy must meet.
LATENCY_RATIO_TARGET: Final = 1.25  # proxy's added latency / bare relay's
CPU_TARGET_US: Final = 30.0  # per proxied command, on one core
THROUGHPUT_TARGET: Final = 0.90  # proxy with 8+ clients / one direct client
SESSION_TARGET_KIB: Final = 40.0
ROUTE_TARGET_KIB: Final = 300.0


@dataclass(frozen=True)
class Plan:
    """How much of each benchmark to run."""

    latency_rounds: int  # interleaved rounds; each round runs one batch per path
    latency_samples: int  # timed round trips per batch
    latency_warmup: int
    cpu_commands: int  # per measurement (spread over the clients)
    cpu_repeats: int
    tput_rounds: int
    tput_commands: int  # per batch
    fan_deliveries: int  # events x clients per flood measurement
    fan_rate: int  # events/s for the paced measurement
    fan_seconds: float
    migrate_rounds: int
    migrate_samples: int  # per variant per round


QUICK: Final = Plan(
    latency_rounds=12, latency_samples=300, latency_warmup=50,
    cpu_commands=20_000, cpu_repeats=2,
    tput_rounds=4, tput_commands=4_000,
    fan_deliveries=200_000, fan_rate=1_000, fan_seconds=1.0,
    migrate_rounds=3, migrate_samples=20,
)  # fmt: skip
FULL: Final = Plan(
    latency_rounds=20, latency_samples=1_000, latency_warmup=100,
    cpu_commands=60_000, cpu_repeats=3,
    tput_rounds=6, tput_commands=10_000,
    fan_deliveries=600_000, fan_rate=1_000, fan_seconds=3.0,
    migrate_rounds=6, migrate_samples=40,
)  # fmt: skip


def log(text: str) -> None:
    """Progress goes to stderr; stdout carries only the report."""
    print(f"  .. {text}", file=sys.stderr, flush=True)


# -- measuring processes ---------------------------------------------------------------------------


def _process_clock(pid: int) -> int:
    """Linux's CPU-time clock of another process (MAKE_PROCESS_CPUCLOCK(pid, CPUCLOCK_SCHED)):
    the utime + stime total of all its threads, in nanoseconds rather than 10 ms ticks."""
    return ((~pid) << 3) | 2


def stat_cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def cpu_seconds(pid: int) -> float:
    try:
        return time.clock_gettime_ns(_process_clock(pid)) / 1e9
    except OSError:
        return stat_cpu_seconds(pid)


def tree(pid: int) -> list[int]:
    """A process and its descendants (socat serves each connection from a forked child)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as f:
                    ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def tree_cpu(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += cpu_seconds(pid)
    return total


def cpu_source() -> str:
    try:
        time.clock_gettime_ns(_process_clock(os.getpid()))
    except OSError:
        return f"utime+stime from /proc/PID/stat ({CLK_TCK} ticks/s)"
    return ("the process's CPU-time clock (utime+stime of /proc/PID/stat, at ns resolution "
            "instead of 10 ms ticks)")  # fmt: skip


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def settled_rss(pid: int, seconds: float = 0.4) -> int:
    time.sleep(seconds)
    return rss_kib(pid)


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def p99(values: Sequence[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]


class Child:
    """A process this run started; ``stop()`` ends it by its own pid and reaps it."""

    def __init__(self, name: str, argv: list[str], work: Path, ready_line: str | None = None):
        self.name = name
        self.log_path = work / f"{name}-{time.monotonic_ns()}.log"
        self._log = self.log_path.open("wb")
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if ready_line else subprocess.DEVNULL,
            stderr=self._log,
            cwd=REPO,
            env=env,
        )
        if ready_line is not None:
            self._wait_stdout(ready_line)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _wait_stdout(self, word: str, timeout: float = 10.0) -> None:
        assert self.proc.stdout is not None
        readable = select.select([self.proc.stdout], [], [], timeout)[0]
        if readable and self.proc.stdout.readline().decode().strip() == word:
            return
        self.stop()
        raise RuntimeError(f"{self.name} did not start:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def check(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()}")

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()


def relay_argv(upstream: str, listen: Path) -> list[str]:
    """The bare relay (``bench/relay.py``) from ``upstream`` to ``listen``."""
    return [sys.executable, str(BENCH / "relay.py"), upstream, str(listen)]


def wait_greeting(path: Path, child: Child, timeout: float = 15.0) -> None:
    """Ready means greeted: the proxy holds clients ungreeted until QEMU is negotiated."""
    deadline = time.monotonic() + timeout
    while True:
        child.check()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(max(0.1, deadline - time.monotonic()))
                s.connect(str(path))
                if s.recv(4096).startswith(b'{"QMP"'):
                    return
        except (FileNotFoundError, ConnectionRefusedError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{child.name} not ready:\n{child.log()}")
        time.sleep(0.02)


class Env:
    """Work directory, the processes started so far, and how to start more."""

    def __init__(self, stack: contextlib.ExitStack) -> None:
        self.work = Path(tempfile.mkdtemp(prefix="qmp-bench-"))
        stack.callback(shutil.rmtree, self.work, True)
        # The split journals with fsync; in production state_dir is under /run (tmpfs).
        shm = Path("/dev/shm")
        self.state = Path(tempfile.mkdtemp(prefix="qmp-bench-", dir=shm if shm.is_dir() else None))
        stack.callback(shutil.rmtree, self.state, True)
        self.stack = stack
        self.schema_file: Path | None = None  # QEMU 7.2's schema, for the fake
        self._n = 0

    def path(self, stem: str) -> Path:
        self._n += 1
        return self.work / f"{stem}{self._n}.sock"

    @contextlib.contextmanager
    def child(self, name: str, argv: list[str], ready_line: str | None = None) -> Iterator[Child]:
        c = Child(name, argv, self.work, ready_line)
        try:
            yield c
        finally:
            c.stop()

    def keep(self, name: str, argv: list[str], ready_line: str | None = None) -> Child:
        """A child that lives until the end of the run."""
        return self.stack.enter_context(self.child(name, argv, ready_line))

    def fake(self, *paths: Path, schema: bool = True) -> Child:
        argv = [sys.executable, str(BENCH / "fakeqemu.py"), *map(str, paths)]
        if schema and self.schema_file is not None:
            argv += ["--schema", str(self.schema_file)]
        return self.keep("fakeqemu", argv, "ready")

    def relay(self, upstream: str) -> tuple[Child, Path]:
        listen = self.path("relay")
        return self.keep("relay", relay_argv(upstream, listen), "listening"), listen

    def socat(self, upstream: str) -> tuple[Child, Path]:
        """socat forks a child per connection: its CPU is counted with its descendants'."""
        listen = self.path("socat")
        child = self.keep("socat", ["socat", f"UNIX-LISTEN:{listen},fork,unlink-early",
                                    f"UNIX-CONNECT:{upstream}"])  # fmt: skip
        deadline = time.monotonic() + 5
        while not listen.exists():
            child.check()
            if time.monotonic() > deadline:
                raise TimeoutError("socat did not listen")
            time.sleep(0.01)
        time.sleep(0.05)  # bound before it listens; never probe it (that would occupy QEMU)
        return child, listen

    @contextlib.contextmanager
    def proxy(self, upstream: str, *extra: str) -> Iterator[tuple[Child, Path]]:
        """``python -m proxy`` for one batch; yields it once it greets clients."""
        listen = self.path("proxy")
        with self.child("proxy", self.proxy_argv(upstream, listen, *extra)) as child:
            wait_greeting(listen, child)
            yield child, listen
            child.check()

    def proxy_argv(self, upstream: str, listen: Path, *extra: str) -> list[str]:
        """The proxy serving the unix socket ``upstream`` on ``listen``."""
        return self._proxy_command("--upstream", f"unix:{upstream}", "--listen",
                                   f"unix:{listen}", "--drain", "2", *extra)  # fmt: skip

    def _proxy_command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "proxy", *args, "--log-level", "warning",
                "--state-dir", str(self.state)]  # fmt: skip

    @contextlib.contextmanager
    def proxy_config(self, toml: str, listens: list[Path]) -> Iterator[Child]:
        cfg = self.work / f"routes{time.monotonic_ns()}.toml"
        cfg.write_text(toml)
        with self.child("proxy", self._proxy_command("--config", str(cfg))) as child:
            for listen in listens:
                wait_greeting(listen, child)
            yield child


# -- a blocking client for round trips -------------------------------------------------------------


class LineClient:
    """Raw QMP over a unix socket: writes compact JSON without newline, reads CRLF lines."""

    def __init__(self, path: Path, timeout: float = 15.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self._buf = b""

    def line(self) -> bytes:
        buf = self._buf
        while True:
            end = buf.find(b"\n")
            if end >= 0:
                self._buf = buf[end + 1 :]
                return buf[: end + 1]
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"connection closed; partial {buf[:200]!r}")
            buf += chunk

    def reply(self) -> bytes:
        """The next line that is not an event."""
        while True:
            line = self.line()
            if not line.startswith(b'{"timestamp"'):
                return line

    def negotiate(self) -> None:
        if not self.line().startswith(b'{"QMP"'):
            raise RuntimeError("no QMP greeting")
        self.sock.sendall(CAPS)
        if not self.reply().startswith(b'{"return"'):
            raise RuntimeError("qmp_capabilities failed")

    def call(self, execute: str, arguments: dict[str, Any] | None = None) -> Any:
        msg: dict[str, Any] = {"execute": execute}
        if arguments is not None:
            msg["arguments"] = arguments
        self.sock.sendall(orjson.dumps(msg))
        reply = orjson.loads(self.reply())
        if "return" not in reply:
            raise RuntimeError(f"{execute}: {reply}")
        return reply["return"]

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> LineClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def round_trips(path: Path, samples: int, warmup: int) -> list[float]:
    """Microseconds per ``query-status`` round trip, one client, no pipelining."""
    payloads = [QUERY_STATUS % i for i in range(samples + warmup)]
    out: list[float] = []
    with LineClient(path) as c:
        c.negotiate()
        send, reply, clock = c.sock.sendall, c.reply, time.perf_counter_ns
        gc.disable()
        try:
            for i, payload in enumerate(payloads):
                t0 = clock()
                send(payload)
                line = reply()
                dt = clock() - t0
                if i >= warmup:
                    out.append(dt / 1000)
        finally:
            gc.enable()
        if b'"running"' not in line:
            raise RuntimeError(f"unexpected reply {line!r}")
    return out


# -- an asyncio load generator ---------------------------------------------------------------------


class LoadClient(asyncio.Protocol):
    """One pipelining client: keeps ``window`` commands outstanding, one write per read."""

    def __init__(self, oob: bool = False) -> None:
        loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.negotiated: asyncio.Future[None] = loop.create_future()
        self.done: asyncio.Future[None] = loop.create_future()
        self._caps = CAPS_OOB if oob else CAPS
        self._setup = bytearray()
        self._stage = 0  # 0: await greeting, 1: await the qmp_capabilities reply, 2: running
        self._lines = 0
        self._expect = 1 << 62
        self._to_send = 0
        self._closing = False
        self._cmd = QUERY_STATUS % 1
        self._blocks: list[bytes] = [b""]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self._stage < 2:
            buf = self._setup
            buf += data
            while self._stage < 2 and (end := buf.find(b"\n")) >= 0:
                line = bytes(buf[: end + 1])
                del buf[: end + 1]
                if self._stage == 0:
                    assert self.transport is not None
                    self.transport.write(self._caps)
                    self._stage = 1
                elif line.startswith(b'{"return"'):
                    self._stage = 2
                    self.negotiated.set_result(None)
                elif not line.startswith(b'{"timestamp"'):
                    self.negotiated.set_exception(RuntimeError(f"negotiation: {line!r}"))
            if self._stage < 2 or not buf:
                return
            data = bytes(buf)
            buf.clear()
        n = data.count(b"\n")
        self._lines += n
        if self._to_send:
            k = min(n, self._to_send)
            self._to_send -= k
            assert self.transport is not None
            self.transport.write(self._blocks[k] if k < len(self._blocks) else self._cmd * k)
        if self._lines >= self._expect and not self.done.done():
            self.done.set_result(None)

    def pipeline(self, count: int, window: int, cmd: bytes = QUERY_STATUS % 1) -> None:
        """Send ``count`` commands, ``window`` at a time; ``done`` when all are answered."""
        self.expect(count)
        self._cmd = cmd
        self._blocks = [cmd * k for k in range(window + 1)]
        first = min(window, count)
        self._to_send = count - first
        assert self.transport is not None
        self.transport.write(cmd * first)

    def expect(self, lines: int) -> None:
        """``done`` once ``lines`` more lines have arrived."""
        self.done = asyncio.get_running_loop().create_future()
        self._lines = 0
        self._expect = lines

    def connection_lost(self, exc: Exception | None) -> None:
        if self._closing:
            return
        err = ConnectionError(f"connection lost ({exc or 'closed by the peer'})")
        for fut in (self.negotiated, self.done):
            if not fut.done():
                fut.set_exception(err)

    def close(self) -> None:
        self._closing = True
        if self.transport is not None:
            self.transport.close()


async def connect(path: Path, oob: bool = False) -> LoadClient:
    loop = asyncio.get_running_loop()
    for _ in range(500):
        try:
            _, proto = await loop.create_unix_connection(lambda: LoadClient(oob), str(path))
            return proto
        except BlockingIOError:  # the listen backlog is full: the server is still accepting
            await asyncio.sleep(0.01)
    raise TimeoutError(f"cannot connect to {path}")


async def open_clients(path: Path, n: int, oob: bool = False) -> list[LoadClient]:
    clients: list[LoadClient] = []
    for start in range(0, n, 50):
        clients += await asyncio.gather(*(connect(path, oob) for _ in range(min(50, n - start))))
    await asyncio.wait_for(asyncio.gather(*(c.negotiated for c in clients)), 30)
    return clients


@dataclass
class Load:
    """What one measured stretch of work cost."""

    units: int  # commands, or event deliveries
    wall: float
    cpu: dict[str, float]  # process name -> CPU seconds used meanwhile

    @property
    def rate(self) -> float:
        return self.units / self.wall

    def us_per_unit(self, name: str) -> float:
        return self.cpu[name] * 1e6 / self.units


async def measured(
    pids: dict[str, int], start: Callable[[], list[asyncio.Future[None]]], units: int
) -> Load:
    """CPU (of each named process and its descendants) and wall time from ``start()`` until
    every future it returned is done."""
    trees = {name: tree(pid) for name, pid in pids.items()}
    before = {name: tree_cpu(t) for name, t in trees.items()}
    own = time.process_time()
    t0 = time.perf_counter()
    waits = start()
    await asyncio.wait_for(asyncio.gather(*waits), 120)
    wall = time.perf_counter() - t0
    cpu = {name: tree_cpu(t) - before[name] for name, t in trees.items()}
    cpu["load generator"] = time.process_time() - own
    return Load(units, wall, cpu)


async def pipelined(
    path: Path, clients: int, total: int, window: int, pids: dict[str, int], oob: bool = False
) -> Load:
    """``total`` query-status commands over ``clients`` pipelining connections."""
    conns = await open_clients(path, clients, oob)
    try:
        for c in conns:  # warm up: first-use costs are not the steady state
            c.pipeline(max(window, 50), window)
        await asyncio.wait_for(asyncio.gather(*(c.done for c in conns)), 60)
        per = math.ceil(total / clients)

        def start() -> list[asyncio.Future[None]]:
            for c in conns:
                c.pipeline(per, window)
            return [c.done for c in conns]

        return await measured(pids, start, per * clients)
    finally:
        for c in conns:
            c.close()


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run one measurement on a fresh uvloop event loop."""
    return uvloop.run(coro)


# -- report ----------------------------------------------------------------------------------------


def table(title: str, headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [[h for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    if title:
        print(f"\n{title}")
    for i, row in enumerate(cells):
        print("  " + "  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in
                               enumerate(zip(row, widths, strict=True))))  # fmt: skip
        if i == 0:
            print("  " + "  ".join("-" * w for w in widths))


def _cell(v: object) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        if abs(v) >= 100:
            return f"{v:.0f}"
        return f"{v:.2f}" if abs(v) < 10 else f"{v:.1f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


@dataclass
class Verdict:
    name: str
    target: str
    measured: str
    ok: bool | None  # None: no target, figures only


@dataclass
class Report:
    verdicts: list[Verdict] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def add(self, name: str, target: str, measured: str, ok: bool | None) -> None:
        self.verdicts.append(Verdict(name, target, measured, ok))


# -- 1. latency ------------------------------------------------------------------------------------


@contextlib.contextmanager
def pinned(pids: Sequence[int]) -> Iterator[int | None]:
    """Run this process, what it starts meanwhile and every thread of ``pids`` on one CPU.

    A one-client round trip is a chain of wake-ups; left to the scheduler, a chain spread over
    CPUs pays a cross-CPU wake-up per hop, which in a VM (an IPI to a halted vCPU) costs tens of
    microseconds and comes and goes with the rest of the machine's load.  On one CPU every path
    pays only its own work and context switches.  Yields the CPU (None: not pinned).
    """
    allowed = os.sched_getaffinity(0)
    if len(allowed) < 2:
        yield None
        return
    cpu = max(allowed)
    tids = [int(t) for pid in pids for t in os.listdir(f"/proc/{pid}/task")]
    saved = {tid: os.sched_getaffinity(tid) for tid in tids}
    os.sched_setaffinity(0, {cpu})
    for tid in tids:
        os.sched_setaffinity(tid, {cpu})
    try:
        yield cpu
    finally:
        os.sched_setaffinity(0, allowed)
        for tid, mask in saved.items():
            with contextlib.suppress(OSError):
                os.sched_setaffinity(tid, mask)


def latency_table(env: Env, upstream: str, rounds: int, plan: Plan, what: str) -> dict[str, float]:
    """Round trips through each path in interleaved rounds; prints the table, returns each
    path's added latency over direct (us)."""
    fixed = {"direct": Path(upstream), "socat": env.socat(upstream)[1],
             "relay": env.relay(upstream)[1]}  # fmt: skip
    paths = ["direct", "socat", "relay", "proxy"]
    batches: list[dict[str, list[float]]] = []
    rng = random.Random(5)
    for r in range(rounds):
        log(f"latency against {what}: round {r + 1}/{rounds}")
        order = paths[:]
        rng.shuffle(order)
        batch: dict[str, list[float]] = {}
        for p in order:
            if p == "proxy":
                with env.proxy(upstream) as (_, listen):
                    batch[p] = round_trips(listen, plan.latency_samples, plan.latency_warmup)
            else:
                batch[p] = round_trips(fixed[p], plan.latency_samples, plan.latency_warmup)
        batches.append(batch)
    pooled = {p: [x for b in batches for x in b[p]] for p in paths}
    med = {p: median(pooled[p]) for p in paths}
    tail = {p: p99(pooled[p]) for p in paths}
    # Added latency is paired by round (a path's median minus direct's median in the same round),
    # then the median over rounds: drift between rounds cancels out.
    added = {p: median([median(b[p]) - median(b["direct"]) for b in batches]) for p in paths}
    added99 = {p: tail[p] - tail["direct"] for p in paths}
    rows = [[p, med[p], tail[p], added[p] if p != "direct" else None,
             added99[p] if p != "direct" else None, ratio(added, p, "relay"),
             ratio(added, p, "socat")] for p in paths]  # fmt: skip
    table(f"1. query-status round trip against {what}, one client, no pipelining "
          f"({rounds} interleaved rounds x {plan.latency_samples} per path, us)",
          ["path", "median", "p99", "added", "added p99", "x relay's", "x socat's"],
          rows)  # fmt: skip
    print(f"  proxy adds {added['proxy']:.1f} us; bare Python relay adds {added['relay']:.1f} us;"
          f" socat adds {added['socat']:.1f} us")  # fmt: skip
    return added


def ratio(added: dict[str, float], p: str, base: str) -> float | None:
    # Below 2 us the base is within noise and a ratio to it means nothing.
    return added[p] / added[base] if p != "direct" and added[base] >= 2.0 else None


def bench_latency(env: Env, qemu: QemuProcess, plan: Plan, rep: Report, pin: bool) -> None:
    with pinned([qemu.pid]) if pin else contextlib.nullcontext(None) as cpu:
        real = latency_table(env, qemu.sock_path, plan.latency_rounds, plan, "real QEMU 7.2")
        fake_sock = env.path("fake-lat")
        env.fake(fake_sock)
        fake = latency_table(env, str(fake_sock), max(4, plan.latency_rounds // 2), plan,
                             "the fast fake QEMU")  # fmt: skip
    print(
        "  added: median over rounds of (path's median - direct's median in the same round);"
        " '-': base within noise; the fake answers at once, so QEMU's own jitter is absent"
    )
    if cpu is not None:
        print(f"  every process of these paths (client, relays, proxy, QEMU's threads) ran on CPU "
              f"{cpu}; --no-pin lets the scheduler place them")  # fmt: skip
    else:
        print("  not pinned: processes ran wherever the scheduler put them")
    vs_relay, vs_socat = ratio(real, "proxy", "relay"), ratio(real, "proxy", "socat")
    fake_vs_relay = ratio(fake, "proxy", "relay")

    def shown(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.2f}x"

    rep.add(
        "1. latency: proxy added / relay added",
        f"<= {LATENCY_RATIO_TARGET}",
        f"{shown(vs_relay)} (vs socat {shown(vs_socat)}; fake QEMU: {shown(fake_vs_relay)})",
        vs_relay is not None and vs_relay <= LATENCY_RATIO_TARGET,
    )


# -- 2. CPU per command ----------------------------------------------------------------------------


def bench_cpu(env: Env, plan: Plan, rep: Report) -> None:
    # One fake process, two sockets: the proxy holds one, the relays use the other.
    fake_sock, fake_sock2 = env.path("fake-cpu"), env.path("fake-cpu")
    fake = env.fake(fake_sock, fake_sock2)
    relay, socat = env.relay(str(fake_sock2)), env.socat(str(fake_sock2))
    cases = [("relay", 1, 16), ("socat", 1, 16), ("proxy", 1, 16), ("proxy", 8, 16),
             ("proxy", 64, 16), ("relay", 1, 1), ("socat", 1, 1), ("proxy", 1, 1)]  # fmt: skip
    results: dict[tuple[str, int, int], list[Load]] = {}
    with env.proxy(str(fake_sock), "--max-sessions", "256") as proxy:
        middles = {"relay": relay, "socat": socat, "proxy": proxy}
        for path, clients, window in cases:
            child, listen = middles[path]
            pids = {"middle": child.pid, "fake": fake.pid}
            total = plan.cpu_commands if window > 1 else plan.cpu_commands // 4
            for i in range(plan.cpu_repeats):
                log(f"cpu: {path}, {clients} clients, window {window}, {i + 1}/{plan.cpu_repeats}")
                load = run_async(pipelined(listen, clients, total, window, pids))
                results.setdefault((path, clients, window), []).append(load)
    rows: list[list[object]] = []
    worst = 0.0
    for key in cases:
        path, clients, window = key
        loads = results[key]
        us = median([x.us_per_unit("middle") for x in loads])
        floor = median([x.us_per_unit("middle") for x in results[("relay", 1, window)]])
        if path == "proxy" and window > 1:
            worst = max(worst, us)
        mode = f"pipelined, window {window}" if window > 1 else "lockstep"
        rows.append([path, clients, mode, us, us / floor,
                     median([x.cpu["middle"] / x.wall * 100 for x in loads]),
                     median([x.rate for x in loads]),
                     median([x.us_per_unit("fake") for x in loads]),
                     median([x.us_per_unit("load generator") for x in loads])])  # fmt: skip
    table("2. CPU per command of the process in the middle, against the fast fake QEMU "
          f"(median of {plan.cpu_repeats} x {plan.cpu_commands:,} commands; lockstep: a quarter)",
          ["path", "clients", "mode", "us/cmd", "x relay's", "CPU %", "cmds/s", "fake us/cmd",
           "loadgen us/cmd"], rows)  # fmt: skip
    print("  x relay's: over the bare Python relay with one client in the same mode (the relay "
          "and socat serve one client per QEMU)")  # fmt: skip
    rep.add("2. CPU per command (1/8/64 clients, worst)", f"<= {CPU_TARGET_US:.0f} us",
            f"{worst:.1f} us", worst <= CPU_TARGET_US)  # fmt: skip


# -- 3. throughput against real QEMU ---------------------------------------------------------------


def clients_name(path: str, clients: int) -> str:
    return f"{path}, {clients} client{'s' if clients > 1 else ''}"


def bench_throughput(env: Env, qemu: QemuProcess, plan: Plan, rep: Report) -> None:
    upstream = qemu.sock_path
    socat, relay = env.socat(upstream)[1], env.relay(upstream)[1]
    window = 16
    groups = ["direct", "direct oob", "relay", "socat", "proxy"]
    rates: dict[str, list[Load]] = {}
    rng = random.Random(3)
    qpid = {"qemu": qemu.pid}
    for r in range(plan.tput_rounds):
        log(f"throughput round {r + 1}/{plan.tput_rounds}")
        order = groups[:]
        rng.shuffle(order)
        for g in order:
            n = plan.tput_commands
            if g == "proxy":
                with env.proxy(upstream) as (proxy, listen):
                    for clients in (1, 8, 64):
                        load = run_async(pipelined(listen, clients, n, window,
                                                   {**qpid, "proxy": proxy.pid}))  # fmt: skip
                        rates.setdefault(clients_name("proxy", clients), []).append(load)
                continue
            path = {"direct": Path(upstream), "direct oob": Path(upstream),
                    "relay": relay, "socat": socat}[g]  # fmt: skip
            load = run_async(pipelined(path, 1, n, window, qpid, oob=g == "direct oob"))
            rates.setdefault(clients_name(g, 1), []).append(load)
    base_name = max(("direct, 1 client", "direct oob, 1 client"),
                    key=lambda k: median([x.rate for x in rates[k]]))  # fmt: skip
    base = median([x.rate for x in rates[base_name]])
    plain = median([x.rate for x in rates["direct, 1 client"]])
    ncpu = len(os.sched_getaffinity(0))
    rows = []
    order = ["direct, 1 client", "direct oob, 1 client", "relay, 1 client", "socat, 1 client",
             "proxy, 1 client", "proxy, 8 clients", "proxy, 64 clients"]  # fmt: skip
    for name in order:
        loads = rates[name]
        rate = median([x.rate for x in loads])
        proxy_us = median([x.us_per_unit("proxy") for x in loads]) if "proxy" in name else None
        proxy_pct = (median([x.cpu["proxy"] / x.wall * 100 for x in loads])
                     if "proxy" in name else None)  # fmt: skip
        busy = median([sum(x.cpu.values()) / x.wall / ncpu * 100 for x in loads])
        rows.append([name, rate, rate / base, rate / plain,
                     median([x.us_per_unit("qemu") for x in loads]), proxy_us, proxy_pct,
                     busy])  # fmt: skip
    table(f"3. Pipelined throughput against real QEMU (window {window} per client, median of "
          f"{plan.tput_rounds} interleaved rounds x {plan.tput_commands:,} commands)",
          ["path", "cmds/s", "x baseline", "x plain direct", "QEMU us/cmd", "proxy us/cmd",
           "proxy CPU %", f"machine CPU % ({ncpu})"], rows)  # fmt: skip
    print(f"  baseline: the faster direct client, {base_name} ({base:,.0f} cmds/s); 'direct oob' "
          "enables QEMU's oob capability, which lets QEMU queue 8 requests as it does for the "
          "proxy; machine CPU %: QEMU + proxy + load generator over all CPUs")  # fmt: skip
    worst = min(median([x.rate for x in rates[k]]) for k in ("proxy, 8 clients",
                                                            "proxy, 64 clients"))  # fmt: skip
    rep.add(
        "3. throughput, 8 and 64 clients / direct",
        f">= {THROUGHPUT_TARGET:.0%}",
        f"{worst / base:.0%} (worst of 8, 64; {worst / plain:.0%} of a plain direct client)",
        worst / base >= THROUGHPUT_TARGET,
    )


# -- 4. event fan-out ------------------------------------------------------------------------------


async def fan_out(
    listen: Path, clients: int, count: int, rate: float, pids: dict[str, int]
) -> Load:
    conns = await open_clients(listen, clients)
    try:
        for c in conns:
            c.expect(count)
        conns[0].expect(count + 1)  # the trigger's own reply, then the events
        emit = orjson.dumps(
            {"execute": "x-bench-emit", "arguments": {"count": count, "rate": rate}}
        )

        def start() -> list[asyncio.Future[None]]:
            assert conns[0].transport is not None
            conns[0].transport.write(emit)
            return [c.done for c in conns]

        return await measured(pids, start, count * clients)
    finally:
        for c in conns:
            c.close()


def bench_fanout(env: Env, plan: Plan, rep: Report) -> None:
    fake_sock, fake_sock2 = env.path("fake-fan"), env.path("fake-fan")
    fake = env.fake(fake_sock, fake_sock2)
    relay, socat = env.relay(str(fake_sock2)), env.socat(str(fake_sock2))
    rows: list[list[object]] = []
    paced_count = int(plan.fan_rate * plan.fan_seconds)
    with env.proxy(str(fake_sock), "--max-sessions", "256") as proxy:
        cases = [("relay", relay, 1), ("socat", socat, 1), ("proxy", proxy, 1),
                 ("proxy", proxy, 10), ("proxy", proxy, 100)]  # fmt: skip
        for path, (child, listen), clients in cases:
            pids = {"middle": child.pid, "fake": fake.pid}
            run_async(fan_out(listen, clients, 2000, 0, pids))  # warm-up
            count = max(2000, plan.fan_deliveries // clients)
            log(f"fan-out: {path}, {clients} clients, {count:,} events as fast as possible")
            flood: Load = run_async(fan_out(listen, clients, count, 0, pids))
            log(f"fan-out: {path}, {clients} clients, {paced_count:,} events at {plan.fan_rate}/s")
            paced: Load = run_async(fan_out(listen, clients, paced_count, plan.fan_rate, pids))
            rows.append([path, clients, count / flood.wall, flood.rate,
                         flood.us_per_unit("middle"), paced.us_per_unit("middle"),
                         paced.cpu["middle"] / paced.wall * 100])  # fmt: skip
    table("4. Event fan-out from the fast fake QEMU to negotiated clients (CPU of the process in "
          "the middle)",
          ["path", "clients", "events/s (flood)", "deliveries/s", "us/event/client (flood)",
           f"us/event/client @{plan.fan_rate}/s", f"CPU % @{plan.fan_rate}/s"],
          rows)  # fmt: skip
    print("  flood: the fake writes events as fast as the proxy reads them; events/s is what every "
          "client received per second")  # fmt: skip
    last = rows[-1]
    rep.add("4. event fan-out, 100 clients", "figures only",
            f"{last[2]:,.0f} events/s, {last[4]:.2f} us/event/client flood, "
            f"{last[5]:.2f} at {plan.fan_rate}/s", None)  # fmt: skip


# -- 5. memory -------------------------------------------------------------------------------------


async def hold_sessions(listen: Path, pid: int, steps: Sequence[int]) -> list[tuple[int, int]]:
    """RSS with 0 and then each cumulative number of idle, negotiated sessions."""
    held: list[LoadClient] = []
    await asyncio.sleep(0.5)
    out = [(0, rss_kib(pid))]
    try:
        for target in steps:
            held += await open_clients(listen, target - len(held))
            await asyncio.sleep(0.5)
            out.append((target, rss_kib(pid)))
    finally:
        for c in held:
            c.close()
    return out


def route_rss(env: Env, upstreams: list[Path], listens: list[Path], n: int) -> int:
    """RSS of a proxy serving the first ``n`` routes, once all of them greet clients."""
    toml = "\n".join(f'[[route]]\nname = "vm{i}"\nupstream = "unix:{upstreams[i]}"\n'
                     f'listen = ["unix:{listens[i]}"]\n' for i in range(n))  # fmt: skip
    with env.proxy_config(toml, listens[:n]) as proxy:
        return settled_rss(proxy.pid, 0.5)


def bench_memory(env: Env, plan: Plan, rep: Report) -> None:
    fake_sock = env.path("fake-mem")
    env.fake(fake_sock)
    steps = [100, 1000, 3000]  # 3000: the slope once free memory from start-up is used up
    with env.proxy(str(fake_sock), "--max-sessions", str(steps[-1] + 100)) as (proxy, listen):
        log("memory: idle sessions")
        points: list[tuple[int, int]] = run_async(hold_sessions(listen, proxy.pid, steps))
    rss0 = points[0][1]
    rows: list[list[object]] = []
    for i, (n, kib) in enumerate(points):
        marginal = (kib - points[i - 1][1]) / (n - points[i - 1][0]) if i else None
        rows.append([f"{n:,} idle sessions", kib / 1024, (kib - rss0) / n if n else None,
                     marginal])  # fmt: skip
    at = dict(points)
    per_session = max((at[1000] - rss0) / 1000, (at[3000] - at[1000]) / 2000)

    routes = 50
    per_route: dict[str, float] = {}
    for kind in ("QEMU 7.2's schema", "small schema"):
        log(f"memory: 1 and {routes} routes, {kind}")
        upstreams = [env.path("fake-route") for _ in range(routes)]
        env.fake(*upstreams, schema=kind != "small schema")
        listens = [env.path("route") for _ in range(routes)]
        one, many = (route_rss(env, upstreams, listens, n) for n in (1, routes))
        per_route[kind] = (many - one) / (routes - 1)
        rows.append([f"1 route, {kind}", one / 1024, None, None])
        rows.append([f"{routes} routes, {kind}", many / 1024, per_route[kind], None])
    table("5. Memory (VmRSS of the proxy) against the fake QEMU; sessions are negotiated and "
          "idle; a route's fake serves QEMU 7.2's own query-qmp-schema (207 KB) or a small one",
          ["state", "RSS MiB", "KiB each", "KiB each, marginal"], rows)  # fmt: skip
    print("  KiB each: over 0 sessions, or over 1 route; marginal: over the row above")
    rep.add("5. memory per idle session", f"<= {SESSION_TARGET_KIB:.0f} KiB",
            f"{per_session:.1f} KiB (worst of 0-1000 avg, 1000-3000 slope)",
            per_session <= SESSION_TARGET_KIB)  # fmt: skip
    real = per_route["QEMU 7.2's schema"]
    rep.add("5. memory per idle route beyond the first", f"<= {ROUTE_TARGET_KIB:.0f} KiB",
            f"{real:,.0f} KiB (small schema: {per_route['small schema']:.0f} KiB)",
            real <= ROUTE_TARGET_KIB)  # fmt: skip


# -- 6. split migrate ------------------------------------------------------------------------------


def settle_migration(c: LineClient) -> None:
    """Wait for the last migration to end and resume the VM (QEMU refuses to migrate a VM
    paused by a finished migration); untimed."""
    deadline = time.monotonic() + 10
    while c.call("query-migrate").get("status") not in (None, "completed", "failed"):
        if time.monotonic() > deadline:
            raise TimeoutError("migration did not finish")
        time.sleep(0.0005)
    if c.call("query-status")["status"] == "postmigrate":
        c.call("cont")


class StillCleaningUp(RuntimeError):
    """QEMU reports a migration completed slightly before it has unregistered it (its yank
    instance); a migrate in that window fails with "duplicate yank instance"."""


def timed_migrate(c: LineClient, split: bool) -> float:
    """Microseconds until the reply to a migrate that starts a migration; a sample that hits
    QEMU's clean-up window is discarded and taken again."""
    for _ in range(50):
        settle_migration(c)
        t0 = time.perf_counter_ns()
        try:
            if split:
                c.call("migrate", {"uri": MIGRATE_URI, "capabilities": MIGRATE_CAPS})
            else:
                c.call("migrate-set-capabilities", {"capabilities": MIGRATE_CAPS})
                c.call("migrate", {"uri": MIGRATE_URI})
        except RuntimeError as exc:
            # Both come from QEMU finishing its clean-up just after it reported "completed":
            # the yank instance is still registered, or the VM only now becomes postmigrate.
            if not any(t in str(exc) for t in ("duplicate yank instance", "paused due to")):
                raise
            time.sleep(0.005)
            continue
        return (time.perf_counter_ns() - t0) / 1000
    raise StillCleaningUp("QEMU kept refusing to start a migration (duplicate yank instance)")


def bench_migrate(env: Env, qemu: QemuProcess, plan: Plan, rep: Report) -> None:
    upstream = qemu.sock_path
    times: dict[str, list[float]] = {"split": [], "two": [], "direct": []}
    for r in range(plan.migrate_rounds):
        log(f"migrate round {r + 1}/{plan.migrate_rounds}")
        with env.proxy(upstream) as (_, listen), LineClient(listen) as c:
            c.negotiate()
            timed_migrate(c, True)  # warm-up: the first migration sets QEMU up
            for i in range(plan.migrate_samples):
                for split in (True, False) if i % 2 else (False, True):
                    times["split" if split else "two"].append(timed_migrate(c, split))
            settle_migration(c)
        with LineClient(Path(upstream)) as c:
            c.negotiate()
            for _ in range(plan.migrate_samples):
                times["direct"].append(timed_migrate(c, False))
            settle_migration(c)
    rows = [["proxy: migrate + capabilities (split)", median(times["split"]), p99(times["split"])],
            ["proxy: migrate-set-capabilities, then migrate", median(times["two"]),
             p99(times["two"])],
            ["direct: migrate-set-capabilities, then migrate", median(times["direct"]),
             p99(times["direct"])]]  # fmt: skip
    ratio = median(times["split"]) / median(times["two"])
    table(f"6. migrate with capabilities, real QEMU (-M none, uri {MIGRATE_URI!r}; reply "
          f"received, us; {plan.migrate_rounds} rounds x {plan.migrate_samples} per variant)",
          ["what the client does", "median", "p99"], rows)  # fmt: skip
    print(f"  split / two commands through the proxy: {ratio:.2f}x; split / two commands "
          f"direct: {median(times['split']) / median(times['direct']):.2f}x "
          "(the split runs query-migrate-capabilities, query-migrate, a journal write with "
          "fsync, migrate-set-capabilities and migrate)")  # fmt: skip
    rep.add("6. split migrate / two commands (proxy)", "figures only", f"{ratio:.2f}x", None)


# -- machine and main ------------------------------------------------------------------------------


def busy_seconds() -> float:
    """CPU time all processes on the machine used so far (/proc/stat, every CPU)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def own_seconds() -> float:
    """CPU time of this run so far: this process, the children it reaped, and its live
    descendants (with what they reaped in turn)."""
    total = sum(
        r.ru_utime + r.ru_stime
        for r in (resource.getrusage(resource.RUSAGE_SELF),
                  resource.getrusage(resource.RUSAGE_CHILDREN))
    )  # fmt: skip
    me = os.getpid()
    for pid in tree(me):
        if pid != me:
            with contextlib.suppress(OSError, ValueError, IndexError), \
                    open(f"/proc/{pid}/stat", "rb") as f:  # fmt: skip
                fields = f.read().rsplit(b")", 1)[1].split()
                total += sum(int(x) for x in fields[11:15]) / CLK_TCK  # u, s, cu, cs time
    return total


class OtherLoad:
    """How much CPU processes outside this run took: benchmarks on a shared machine are noisy."""

    def __init__(self) -> None:
        self.t0, self.busy0, self.own0 = time.monotonic(), busy_seconds(), own_seconds()

    def share(self) -> float:
        wall = time.monotonic() - self.t0
        others = busy_seconds() - self.busy0 - (own_seconds() - self.own0)
        return max(0.0, others / (wall * (os.cpu_count() or 1)))

    def note(self) -> str:
        share = self.share()
        warn = ": figures are noisier than usual" if share > 0.05 else ""
        return f"other processes on this machine took {share:.0%} of its CPUs{warn}"


def machine() -> None:
    model = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    qemu = subprocess.run([QEMU_BINARIES["7.2"], "--version"], capture_output=True, text=True,
                          check=False).stdout.splitlines()  # fmt: skip
    socat = subprocess.run(["socat", "-V"], capture_output=True, text=True, check=False).stdout
    socat_v = next((ln.strip() for ln in socat.splitlines() if "socat version" in ln), "?")
    print("Machine")
    print(f"  CPU: {model}; nproc {len(os.sched_getaffinity(0))}; Linux {platform.release()}")
    print(f"  Python {platform.python_version()}, uvloop {metadata.version('uvloop')}, "
          f"orjson {metadata.version('orjson')}")  # fmt: skip
    print(f"  {qemu[0] if qemu else 'QEMU: not found'}; {socat_v}")
    print(f"  proxy: {proxy_revision()}")
    print(f"  CPU time: {cpu_source()}")


def proxy_revision() -> str:
    """The commit measured, and whether proxy/ differs from it."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                              check=False)  # fmt: skip
        return done.stdout.strip() if done.returncode == 0 else ""

    head = git("log", "-1", "--format=%h %s")
    if not head:
        return "not a git checkout"
    dirty = git("status", "--porcelain", "--", "proxy")
    return head + (" (+ uncommitted changes in proxy/)" if dirty else "")


def capture_schema(env: Env, qemu: QemuProcess) -> None:
    """QEMU 7.2's own schema, so the fake's routes cost what real ones cost."""
    with LineClient(Path(qemu.sock_path)) as c:
        c.negotiate()
        schema = c.call("query-qmp-schema")
    env.schema_file = env.work / "qemu72-schema.json"
    env.schema_file.write_bytes(orjson.dumps(schema))


BENCHES: Final = ("latency", "cpu", "throughput", "fanout", "memory", "migrate")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="qmp-proxy benchmarks")
    p.add_argument("--quick", action="store_true", help="about a minute instead of a few")
    p.add_argument(
        "--no-pin",
        action="store_true",
        help="latency: let the scheduler place processes (default: all on one CPU)",
    )
    p.add_argument("--only", default=",".join(BENCHES),
                   help=f"comma-separated subset of {','.join(BENCHES)}")  # fmt: skip
    args = p.parse_args(argv)
    only = [b.strip() for b in args.only.split(",") if b.strip()]
    unknown = set(only) - set(BENCHES)
    if unknown:
        p.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}")
    plan = QUICK if args.quick else FULL
    for tool in (QEMU_BINARIES["7.2"], "socat"):
        if shutil.which(tool) is None:
            print(f"bench: {tool} is required (scripts/install-qemu.sh installs it)",
                  file=sys.stderr)  # fmt: skip
            return 2
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))

    started = time.monotonic()
    whole_run = OtherLoad()
    machine()
    print(f"  mode: {'quick' if args.quick else 'full'}")
    rep = Report()
    with contextlib.ExitStack() as stack:
        env = Env(stack)
        qemu = stack.enter_context(QemuProcess("7.2", "-M", "none"))
        capture_schema(env, qemu)
        steps: dict[str, Callable[[], None]] = {
            "latency": lambda: bench_latency(env, qemu, plan, rep, pin=not args.no_pin),
            "cpu": lambda: bench_cpu(env, plan, rep),
            "throughput": lambda: bench_throughput(env, qemu, plan, rep),
            "fanout": lambda: bench_fanout(env, plan, rep),
            "memory": lambda: bench_memory(env, plan, rep),
            "migrate": lambda: bench_migrate(env, qemu, plan, rep),
        }
        for name in BENCHES:
            if name not in only:
                continue
            log(f"{name} ...")
            during = OtherLoad()
            try:
                steps[name]()
            except Exception as exc:  # report it and go on with the other benchmarks
                rep.errors.append(f"{name}: {exc!r}")
                print(f"\n{name}: ERROR {exc!r}")
                traceback.print_exc(file=sys.stderr)
            print(f"  ({during.note()})")
            sys.stdout.flush()

    print("\nSummary")
    table(
        "",
        ["benchmark", "target", "measured", "result"],
        [
            [v.name, v.target, v.measured, "-" if v.ok is None else "PASS" if v.ok else "MISS"]
            for v in rep.verdicts
        ],
    )
    for err in rep.errors:
        print(f"  ERROR {err}")
    print(f"\n  total {time.monotonic() - started:.0f} s; {whole_run.note()}")
    return 1 if rep.errors else 0


if __name__ == "__main__":
    sys.exit(main())
