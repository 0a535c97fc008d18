"""The benchmarks' harness: processes, clients, measurements and the report.

Everything the benchmark modules share: the run's :class:`Plan` (how much of each benchmark),
:class:`Env` (a work directory and the processes started in it: the fast fake QEMU, the bare
relay, socat, the proxy, each ended by its own pid and reaped), the clients that make the load
(:class:`LineClient` and :func:`round_trips` for lockstep round trips, :class:`LoadClient` and
:func:`pipelined` for pipelining asyncio clients), CPU and memory readings of other processes
(:func:`measured`, :func:`rss_kib`), the tables and the :class:`Report` of PASS/MISS verdicts,
and what the machine was doing meanwhile (:class:`OtherLoad`).

CPU is a process's own ``utime + stime`` (read from its CPU-time clock, the same total as
``/proc/PID/stat`` but in nanoseconds rather than 10 ms ticks) before and after a measurement,
divided by the work done.  The load comes from this process (raw sockets, compact JSON without
newlines, as ``qemu.qmp`` writes it, one CRLF line read per reply).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import math
import os
import platform
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

from tests.qemu import QEMU_BINARIES, QemuProcess

REPO: Final = Path(__file__).resolve().parent.parent
BENCH: Final = REPO / "bench"
T = TypeVar("T")
CLK_TCK: Final = os.sysconf("SC_CLK_TCK")
QUERY_STATUS: Final = b'{"execute":"query-status","id":%d}'
CAPS: Final = b'{"execute":"qmp_capabilities"}'
CAPS_OOB: Final = b'{"execute":"qmp_capabilities","arguments":{"enable":["oob"]}}'


@dataclass(frozen=True)
class Plan:
    """How much of each benchmark to run, and how."""

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
    latency_pinned: bool = True  # latency: the pinned placement too, not only unpinned


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
    return (
        "the process's CPU-time clock (utime+stime of /proc/PID/stat, at ns resolution "
        "instead of 10 ms ticks)"
    )


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
        child = self.keep(
            "socat",
            ["socat", f"UNIX-LISTEN:{listen},fork,unlink-early", f"UNIX-CONNECT:{upstream}"],
        )
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
        return self._proxy_command(
            "--upstream", f"unix:{upstream}", "--listen", f"unix:{listen}", "--drain", "2", *extra
        )

    def _proxy_command(self, *args: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "proxy",
            *args,
            "--log-level",
            "warning",
            "--state-dir",
            str(self.state),
        ]

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
        print(
            "  "
            + "  ".join(
                c.rjust(w) if j else c.ljust(w)
                for j, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
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
        for r in (
            resource.getrusage(resource.RUSAGE_SELF),
            resource.getrusage(resource.RUSAGE_CHILDREN),
        )
    )
    me = os.getpid()
    for pid in tree(me):
        if pid != me:
            with (
                contextlib.suppress(OSError, ValueError, IndexError),
                open(f"/proc/{pid}/stat", "rb") as f,
            ):
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
    qemu = subprocess.run(
        [QEMU_BINARIES["7.2"], "--version"], capture_output=True, text=True, check=False
    ).stdout.splitlines()
    socat = subprocess.run(["socat", "-V"], capture_output=True, text=True, check=False).stdout
    socat_v = next((ln.strip() for ln in socat.splitlines() if "socat version" in ln), "?")
    print("Machine")
    print(f"  CPU: {model}; nproc {len(os.sched_getaffinity(0))}; Linux {platform.release()}")
    print(
        f"  Python {platform.python_version()}, uvloop {metadata.version('uvloop')}, "
        f"orjson {metadata.version('orjson')}"
    )
    print(f"  {qemu[0] if qemu else 'QEMU: not found'}; {socat_v}")
    print(f"  proxy: {proxy_revision()}")
    print(f"  CPU time: {cpu_source()}")


def proxy_revision() -> str:
    """The commit measured, and whether proxy/ differs from it."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=False)
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
