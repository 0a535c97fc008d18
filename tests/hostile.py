"""Helpers for the chaos and hostile-QEMU tests: process accounting, metrics over HTTP, a raw
client that can pass descriptors, and the well-behaved load that measures latency.

The well-behaved clients run in a process of their own (``python -m tests.hostile``), not in the
test's event loop: the loop that drives hundreds of hostile sockets is itself busy, and a
latency measured from inside it would measure the test, not the proxy.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import json
import logging
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

# -- process accounting --------------------------------------------------------------------------


def fd_count(pid: int) -> int:
    """Open descriptors of a process."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def fd_targets(pid: int) -> list[str]:
    """What each open descriptor of a process points at (for a leak's error message)."""
    out = []
    for name in sorted(os.listdir(f"/proc/{pid}/fd"), key=int):
        with contextlib.suppress(OSError):
            out.append(f"{name}->{os.readlink(f'/proc/{pid}/fd/{name}')}")
    return out


def thread_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process has used so far."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss(pid: int) -> int:
    """VmRSS of a process, in bytes."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


# -- HTTP and metrics ----------------------------------------------------------------------------


async def http_get(port: int, path: str, timeout: float = 5.0) -> tuple[int, str]:
    """One ``GET`` on a fresh connection: (status, body)."""

    async def run() -> tuple[int, str]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(f"GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode())
            await writer.drain()
            data = await reader.read()
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        head, _, body = data.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        return status, body.decode()

    return await asyncio.wait_for(run(), timeout)


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of every sample called ``name`` whose labels include ``labels`` (0 if none)."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


# -- a raw client that can pass descriptors ------------------------------------------------------


class RawConn:
    """A non-blocking unix socket driven by the event loop, with ``sendmsg`` for SCM_RIGHTS.

    ``line()`` returns one CRLF-terminated line; anything that is not one whole JSON object per
    line is reported by the caller (that is what "never a reply glued to another" checks).
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.loop = asyncio.get_running_loop()
        self.buf = bytearray()
        self.eof = False

    @classmethod
    async def connect(cls, path: str, timeout: float = 5.0) -> RawConn:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, path), timeout)
        except BaseException:
            sock.close()
            raise
        return cls(sock)

    async def send(self, data: bytes, fds: list[int] | None = None) -> None:
        if fds:
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
            while True:
                try:
                    sent = self.sock.sendmsg([data], anc)
                    break
                except BlockingIOError:
                    await asyncio.sleep(0.001)
            data = data[sent:]
        if data:
            await self.loop.sock_sendall(self.sock, data)

    async def _fill(self) -> None:
        chunk = await self.loop.sock_recv(self.sock, 1 << 20)
        if not chunk:
            self.eof = True
        self.buf += chunk

    async def line(self, timeout: float = 10.0) -> bytes | None:
        """The next line with its CRLF, or None at EOF (a partial line at EOF is returned as is,
        without CRLF, for the caller to reject)."""
        end = self.buf.find(b"\n")
        if end >= 0:  # already here: no timer (storms read thousands of lines a round)
            out = bytes(self.buf[: end + 1])
            del self.buf[: end + 1]
            return out

        async def run() -> bytes | None:
            while True:
                end = self.buf.find(b"\n")
                if end >= 0:
                    out = bytes(self.buf[: end + 1])
                    del self.buf[: end + 1]
                    return out
                if self.eof:
                    if self.buf:
                        out = bytes(self.buf)
                        self.buf.clear()
                        return out
                    return None
                await self._fill()

        return await asyncio.wait_for(run(), timeout)

    async def message(self, timeout: float = 10.0) -> Any:
        """The next message, or None at EOF; a malformed line raises AssertionError."""
        data = await self.line(timeout)
        if data is None:
            return None
        return parse_line(data)

    async def reply(self, timeout: float = 10.0) -> dict[str, Any] | None:
        """The next non-event message, or None at EOF."""
        while True:
            msg: dict[str, Any] | None = await self.message(timeout)
            if msg is None or "event" not in msg:
                return msg

    async def negotiate(self, timeout: float = 10.0) -> bool:
        """Greeting and qmp_capabilities; False if the proxy closed the connection first."""
        greeting = await self.message(timeout)
        if greeting is None:
            return False
        assert "QMP" in greeting, greeting
        await self.send(b'{"execute":"qmp_capabilities","id":"neg"}')
        reply = await self.reply(timeout)
        if reply is None:
            return False
        assert reply == {"return": {}, "id": "neg"}, reply
        return True

    async def drain_until_eof(self, timeout: float = 10.0) -> list[Any]:
        out = []
        while (msg := await self.message(timeout)) is not None:
            out.append(msg)
        return out

    def close(self) -> None:
        self.sock.close()

    def reset(self) -> None:
        """Close with an RST (SO_LINGER 0): the peer sees ECONNRESET, not an orderly EOF."""
        with contextlib.suppress(OSError):
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
        self.sock.close()


def parse_line(data: bytes) -> Any:
    """One proxy output line: exactly one JSON object, ending in CRLF."""
    if not data.endswith(b"\r\n"):
        raise AssertionError(f"a line without CRLF (cut or glued): {data[:200]!r}")
    try:
        msg = json.loads(data)
    except ValueError:
        raise AssertionError(f"not one JSON message: {data[:300]!r}") from None
    if not isinstance(msg, dict):
        raise AssertionError(f"not an object: {data[:200]!r}")
    return msg


# -- the well-behaved load -----------------------------------------------------------------------

VM_NAME = "chaosvm"
# Between two commands of one well-behaved client: a monitoring client, not a benchmark, so the
# four of them leave CPU for the proxy, QEMU and the hostile clients on a two-core machine.
PAUSE = 0.001
STATUSES = {"prelaunch", "running", "paused"}


def check_status(value: Any) -> str | None:
    """What is wrong with a ``query-status`` return value, or None."""
    if not isinstance(value, dict) or value.get("status") not in STATUSES:
        return f"bad query-status return {value!r}"
    if value.get("running") is not (value["status"] == "running"):
        return f"inconsistent query-status return {value!r}"
    return None


def check_name(value: Any) -> str | None:
    return None if value == {"name": VM_NAME} else f"bad query-name return {value!r}"


@dataclass
class Load:
    """What the well-behaved clients saw: latencies in seconds, and every fault."""

    latencies: dict[str, list[float]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    events: dict[str, int] = field(default_factory=dict)

    def all_latencies(self) -> list[float]:
        return sorted(x for xs in self.latencies.values() for x in xs)

    def percentile(self, q: float) -> float:
        xs = self.all_latencies()
        assert xs, "no well-behaved command completed"
        return xs[min(len(xs) - 1, int(len(xs) * q))]


class _Unroutable(logging.Handler):
    """qemu.qmp drops a reply with an unknown id with a log line: here it is an error."""

    def __init__(self, errors: list[str], who: str) -> None:
        super().__init__(logging.WARNING)
        self.errors = errors
        self.who = who

    def emit(self, record: logging.LogRecord) -> None:
        self.errors.append(f"{self.who}: qemu.qmp logged: {record.getMessage()[:300]}")


async def _qmp_client_loop(name: str, path: str, until: float, load: Load) -> None:
    from qemu.qmp import QMPClient

    client = QMPClient(name)
    handler = _Unroutable(load.errors, name)
    client.logger.addHandler(handler)
    lat = load.latencies.setdefault(name, [])
    try:
        await asyncio.wait_for(client.connect(path), 10)
        n = 0
        while time.monotonic() < until:
            command = "query-status" if n % 2 == 0 else "query-name"
            start = time.perf_counter()
            value = await asyncio.wait_for(client.execute(command), 10)
            lat.append(time.perf_counter() - start)
            fault = check_status(value) if command == "query-status" else check_name(value)
            if fault:
                load.errors.append(f"{name}: {fault}")
            n += 1
            await asyncio.sleep(PAUSE)
    except Exception as exc:
        load.errors.append(f"{name}: {exc!r}")
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.disconnect(), 5)
        client.logger.removeHandler(handler)


def _raw_id(name: str, n: int) -> Any:
    """Ids of every JSON shape, each naming its client and sequence number."""
    shapes: list[Any] = [
        f"{name}-{n}",
        n,
        {"who": name, "n": n, "deep": [[{"k": n}]]},
        [name, n, None, True, 1.5],
    ]
    return shapes[n % len(shapes)]


async def _raw_client_loop(name: str, path: str, until: float, load: Load) -> None:
    lat = load.latencies.setdefault(name, [])
    reader, writer = await asyncio.open_unix_connection(path, limit=16 << 20)
    events = 0
    try:

        async def message() -> Any:
            data = await asyncio.wait_for(reader.readline(), 10)
            if not data:
                raise EOFError("the proxy closed a well-behaved session")
            return parse_line(data)

        greeting = await message()
        assert "QMP" in greeting, greeting
        writer.write(b'{"execute":"qmp_capabilities","id":"n"}')
        assert await message() == {"return": {}, "id": "n"}
        n = 0
        while time.monotonic() < until:
            command = "query-status" if n % 2 == 0 else "query-name"
            id_ = _raw_id(name, n)
            start = time.perf_counter()
            writer.write(json.dumps({"execute": command, "id": id_}).encode())
            while True:
                msg = await message()
                if "event" in msg:
                    events += 1
                    continue
                break
            lat.append(time.perf_counter() - start)
            if msg.get("id") != id_ or "return" not in msg:
                load.errors.append(f"{name}: sent id {id_!r}, got {json.dumps(msg)[:300]}")
            else:
                value = msg["return"]
                fault = check_status(value) if command == "query-status" else check_name(value)
                if fault:
                    load.errors.append(f"{name}: {fault}")
            n += 1
            await asyncio.sleep(PAUSE)
    except Exception as exc:
        load.errors.append(f"{name}: {exc!r}")
    finally:
        load.events[name] = events
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def well_behaved(open_path: str, ro_path: str, seconds: float) -> Load:
    """Four clients, two per listener (``qemu.qmp``'s QMPClient and a raw one), each running
    query-status / query-name in lockstep for ``seconds``."""
    load = Load()
    until = time.monotonic() + seconds
    await asyncio.gather(
        _qmp_client_loop("qmp-open", open_path, until, load),
        _qmp_client_loop("qmp-ro", ro_path, until, load),
        _raw_client_loop("raw-open", open_path, until, load),
        _raw_client_loop("raw-ro", ro_path, until, load),
    )
    return load


async def start_well_behaved(
    open_path: str, ro_path: str, seconds: float
) -> asyncio.subprocess.Process:
    """Run :func:`well_behaved` in a child process; read it back with :func:`finish_load`."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.hostile",
        open_path,
        ro_path,
        str(seconds),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )


async def finish_load(proc: asyncio.subprocess.Process, timeout: float) -> Load:
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    if proc.returncode != 0:
        raise AssertionError(f"well-behaved load failed ({proc.returncode}): {err.decode()}")
    data = json.loads(out)
    return Load(data["latencies"], data["errors"], data["events"])


def _main() -> None:
    parser = argparse.ArgumentParser(description="well-behaved QMP load, results as JSON")
    parser.add_argument("open_path")
    parser.add_argument("ro_path")
    parser.add_argument("seconds", type=float)
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency of the proxy
        pass
    load = asyncio.run(well_behaved(args.open_path, args.ro_path, args.seconds))
    json.dump(
        {"latencies": load.latencies, "errors": load.errors, "events": load.events}, sys.stdout
    )


if __name__ == "__main__":
    _main()
