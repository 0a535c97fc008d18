"""The endpoints' HTTP server against real sockets: protocol, deadlines, floods and garbage.

The attacks here are the ones that took down ``ThreadingHTTPServer`` (a thread per idle
connection, no deadlines), so each test checks the bound that defeats them: threads, time,
connections or memory, not only the status code.
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import logging
import os
import random
import select
import socket
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from proxy.httpd import HttpServer

BIG = bytes(8 * 1024 * 1024)  # more than loopback's kernel buffers hold for a 4 KiB receiver


@dataclass
class App:
    """The handler: records the paths it was given."""

    paths: list[str] = field(default_factory=list)

    def __call__(self, path: str) -> tuple[int, str, bytes]:
        self.paths.append(path)
        if path in ("/", "/healthz"):
            return 200, "text/plain", b"ok\n"
        if path == "/big":
            return 200, "application/octet-stream", BIG
        if path == "/boom":
            raise RuntimeError("boom\nsecond line")
        return 404, "text/plain", b"not found\n"


MakeServer = Callable[..., HttpServer]


@pytest.fixture
def app() -> App:
    return App()


@pytest.fixture
def make_server(app: App) -> Iterator[MakeServer]:
    """Started servers with test-sized deadlines, closed at the end."""
    servers: list[HttpServer] = []

    def make(
        *,
        max_connections: int = 64,
        request_timeout: float = 0.5,
        idle_timeout: float = 1.0,
        write_timeout: float = 0.5,
        max_request: int = 8192,
        handler: Callable[[str], Any] = app,
    ) -> HttpServer:
        server = HttpServer(
            "127.0.0.1",
            0,
            handler,
            max_connections=max_connections,
            request_timeout=request_timeout,
            idle_timeout=idle_timeout,
            write_timeout=write_timeout,
            max_request=max_request,
        )
        server.start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.close()


@pytest.fixture
def server(make_server: MakeServer) -> HttpServer:
    return make_server()


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


_clients: list[Client] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while _clients:
        _clients.pop().close()


class Client:
    """A raw HTTP client: exactly the bytes we choose, and replies read without hiding anything."""

    def __init__(self, address: tuple[str, int], rcvbuf: int | None = None) -> None:
        self.sock = socket.socket(socket.AF_INET6 if ":" in address[0] else socket.AF_INET)
        _clients.append(self)
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(3.0)
        self.sock.connect(address)
        self.pending = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def get(self, path: str, method: str = "GET", extra: str = "") -> Reply:
        self.send(f"{method} {path} HTTP/1.1\r\nHost: test\r\n{extra}\r\n".encode())
        return self.reply(head_only=method == "HEAD")

    def _more(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise EOFError("connection closed")
        self.pending += chunk

    def reply(self, head_only: bool = False) -> Reply:
        while b"\r\n\r\n" not in self.pending:
            self._more()
        head, self.pending = self.pending.split(b"\r\n\r\n", 1)
        status_line, *lines = head.decode("latin-1").split("\r\n")
        version, status, _ = status_line.split(" ", 2)
        assert version == "HTTP/1.1"
        headers = {}
        for line in lines:
            name, value = line.split(":", 1)
            headers[name.lower()] = value.strip()
        length = 0 if head_only else int(headers["content-length"])
        while len(self.pending) < length:
            self._more()
        body, self.pending = self.pending[:length], self.pending[length:]
        return Reply(int(status), headers, body)

    def closed(self, within: float = 2.0) -> bool:
        """Whether the server ends the connection (EOF or reset) within ``within`` seconds."""
        self.sock.settimeout(within)
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
                self.pending += chunk
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def client(server: HttpServer) -> Client:
    return Client(server.address)


def wait_until(condition: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def threads() -> tuple[int, int]:
    return threading.active_count(), len(os.listdir("/proc/self/task"))


def status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


# The protocol.


def test_get_head_and_query_string(server: HttpServer, client: Client, app: App) -> None:
    reply = client.get("/?verbose=1")
    assert (reply.status, reply.body) == (200, b"ok\n")
    assert reply.headers["content-type"] == "text/plain"
    assert reply.headers["content-length"] == "3"
    assert "connection" not in reply.headers  # HTTP/1.1: stays open
    head = client.get("/", method="HEAD")
    assert head.status == 200
    assert head.headers["content-length"] == "3"
    # No body followed the HEAD reply: the next reply parses from the first byte.
    assert client.get("/missing").status == 404
    assert app.paths == ["/", "/", "/missing"]
    assert server.requests == 3


def test_absolute_form_target(client: Client, app: App) -> None:
    assert client.get("http://localhost:9740/healthz?x=1").status == 200
    assert app.paths == ["/healthz"]


def test_keep_alive_with_a_standard_client(server: HttpServer) -> None:
    conn = http.client.HTTPConnection(*server.address, timeout=3)
    try:
        for path in ("/", "/healthz", "/nope"):
            conn.request("GET", path)
            response = conn.getresponse()
            response.read()
        assert response.status == 404
        assert server.accepted == 1  # three requests, one connection
    finally:
        conn.close()


def test_pipelined_requests_answered_in_order(client: Client, app: App) -> None:
    client.send(b"GET /a HTTP/1.1\r\n\r\nGET /healthz HTTP/1.1\r\n\r\nHEAD / HTTP/1.1\r\n\r\n")
    assert client.reply().status == 404
    assert client.reply().status == 200
    assert client.reply(head_only=True).status == 200
    assert app.paths == ["/a", "/healthz", "/"]


def test_http10_closes_unless_asked(server: HttpServer) -> None:
    c = Client(server.address)
    c.send(b"GET / HTTP/1.0\r\n\r\n")
    assert c.reply().headers["connection"] == "close"
    assert c.closed()
    c = Client(server.address)
    c.send(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    assert c.reply().headers["connection"] == "keep-alive"
    assert c.get("/").status == 200


def test_connection_close_honoured(client: Client) -> None:
    reply = client.get("/", extra="Connection: close\r\n")
    assert (reply.status, reply.headers["connection"]) == (200, "close")
    assert client.closed()


def test_405_keeps_the_connection(server: HttpServer, client: Client) -> None:
    reply = client.get("/", method="POST")
    assert reply.status == 405
    assert reply.headers["allow"] == "GET, HEAD"
    assert client.get("/").status == 200
    assert server.bad_requests == 1


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET /\r\n\r\n", 400),
        (b"GET / HTTP/1.1 extra\r\n\r\n", 400),
        (b"GET noslash HTTP/1.1\r\n\r\n", 400),
        (b"GET /\x1b[31m HTTP/1.1\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nNo colon here\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\n folded: x\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nBad Name: x\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nX: a\rb\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
        (b"GET / HTTP/2.0\r\n\r\n", 505),
        (b"GET / HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello", 413),
        (b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 413),
        (b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello", 405),
    ],
)
def test_bad_requests_answered_and_closed(
    server: HttpServer, client: Client, app: App, request_bytes: bytes, status: int
) -> None:
    client.send(request_bytes)
    reply = client.reply()
    assert reply.status == status
    assert reply.headers["connection"] == "close"
    assert client.closed()
    assert app.paths == []
    assert server.bad_requests == 1


def test_empty_lines_before_a_request_and_lf_only_heads(client: Client) -> None:
    client.send(b"\r\n\r\nGET / HTTP/1.1\nHost: x\n\n")
    assert client.reply().status == 200
    assert client.get("/").status == 200


def test_content_length_zero_is_no_body(client: Client) -> None:
    assert client.get("/", extra="Content-Length: 0\r\n").status == 200


def test_head_larger_than_max_request_gets_431(server: HttpServer, client: Client) -> None:
    client.send(b"GET / HTTP/1.1\r\nX-Long: " + b"a" * 10_000 + b"\r\n\r\n")
    reply = client.reply()
    assert (reply.status, reply.headers["connection"]) == (431, "close")
    assert client.closed()
    # A head that just fits is fine.
    c = Client(server.address)
    head = b"GET / HTTP/1.1\r\nX-Long: \r\n\r\n"
    c.send(head[:-4] + b"a" * (8192 - len(head)) + b"\r\n\r\n")
    assert c.reply().status == 200


# Deadlines.


def test_slowloris_cut_at_the_request_deadline(server: HttpServer) -> None:
    """One byte every 0.2 s: cut 0.5 s after the first, not 0.5 s after the last."""
    c = Client(server.address)
    assert c.get("/").status == 200
    time.sleep(0.3)  # idle between requests (idle_timeout is 1 s) does not count
    start = time.monotonic()
    sent = 0
    for byte in b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 50:
        try:
            c.send(bytes([byte]))
        except OSError:
            break
        sent += 1
        if select.select([c.sock], [], [], 0.2)[0]:
            break
    reply = c.reply()
    elapsed = time.monotonic() - start
    assert reply.status == 408
    assert c.closed()
    assert 0.4 < elapsed < 0.9, elapsed
    assert sent <= 4
    assert server.timed_out == 1


def test_connection_that_sends_nothing_is_closed(server: HttpServer) -> None:
    c = Client(server.address)
    start = time.monotonic()
    assert c.closed(within=2.0)
    assert c.pending == b""  # no 408 for a client that never asked anything
    assert 0.4 < time.monotonic() - start < 1.0
    assert server.timed_out == 1


def test_idle_keep_alive_connection_closed_after_idle_timeout(make_server: MakeServer) -> None:
    server = make_server(idle_timeout=0.3, request_timeout=2.0)
    c = Client(server.address)
    assert c.get("/").status == 200
    start = time.monotonic()
    assert c.closed()
    assert 0.25 < time.monotonic() - start < 0.8
    assert server.idle_closed == 1
    assert server.timed_out == 0


def test_large_response_to_a_reader_then_keep_alive(make_server: MakeServer) -> None:
    """A response the kernel cannot take at once is finished as the client reads it."""
    server = make_server(write_timeout=5.0)
    c = Client(server.address, rcvbuf=65536)
    reply = c.get("/big")
    assert (reply.status, len(reply.body)) == (200, len(BIG))
    assert c.get("/").status == 200
    reply = c.get("/big", extra="Connection: close\r\n")
    assert (len(reply.body), reply.headers["connection"]) == (len(BIG), "close")
    assert c.closed()
    assert server.timed_out == 0


def test_client_that_never_reads_is_dropped_after_write_timeout(server: HttpServer) -> None:
    c = Client(server.address, rcvbuf=4096)
    c.send(b"GET /big HTTP/1.1\r\n\r\n")
    start = time.monotonic()
    wait_until(lambda: server.timed_out == 1)
    assert 0.4 < time.monotonic() - start < 1.2
    wait_until(lambda: server.connections == 0)
    assert Client(server.address).get("/healthz").status == 200
    # The client got a prefix, then a reset: nothing is left queued for it.
    received = 0
    c.sock.settimeout(2.0)
    try:
        while chunk := c.sock.recv(1 << 20):
            received += len(chunk)
    except ConnectionResetError:
        pass
    assert received < len(BIG)


# Floods and garbage.


def test_300_idle_connections_cost_no_thread_and_a_get_still_answers(
    make_server: MakeServer,
) -> None:
    server = make_server(request_timeout=10.0, idle_timeout=10.0)
    before = threads()
    vm_before, rss_before = status_kib("VmSize"), status_kib("VmRSS")
    flood: list[socket.socket] = []
    try:
        for i in range(300):
            s = socket.create_connection(server.address)
            flood.append(s)
            if i % 2:
                s.sendall(b"GET /healthz HTTP/1.1\r\nX-Slow: ")  # a head never finished
        wait_until(lambda: server.accepted == 300)
        assert threads() == before
        assert server.connections <= 64
        assert server.evicted == 300 - 64
        vm_growth = status_kib("VmSize") - vm_before
        rss_growth = status_kib("VmRSS") - rss_before
        assert vm_growth < 64 * 1024, vm_growth  # KiB; 300 threads' stacks were 3.5 GB
        start = time.monotonic()
        reply = Client(server.address).get("/healthz")
        latency = time.monotonic() - start
        assert reply.status == 200
        assert latency < 1.0
        assert threads() == before
        print(
            f"threads {before} -> {threads()}; VmSize +{vm_growth} KiB, VmRSS +{rss_growth} "
            f"KiB; GET under the flood {latency * 1000:.1f} ms"
        )
    finally:
        for s in flood:
            s.close()


def test_eviction_takes_the_longest_idle(make_server: MakeServer) -> None:
    server = make_server(max_connections=2, request_timeout=5.0, idle_timeout=5.0)
    a = Client(server.address)
    wait_until(lambda: server.accepted == 1)
    b = Client(server.address)
    wait_until(lambda: server.accepted == 2)
    c = Client(server.address)
    assert a.closed()  # the oldest
    assert b.get("/").status == 200  # b is now the most recently idle
    d = Client(server.address)
    assert c.closed()
    assert b.get("/").status == 200
    assert d.get("/").status == 200
    assert server.evicted == 2


@pytest.mark.parametrize(
    "payload",
    [
        random.Random(7).randbytes(64 * 1024),
        b"A" * (1 << 20),
        b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 150_000,  # headers that never end
    ],
    ids=["random", "1MB-without-CRLF", "endless-headers"],
)
def test_garbage_gets_400_or_431(server: HttpServer, payload: bytes) -> None:
    c = Client(server.address)
    sender = threading.Thread(target=lambda: _send_quietly(c.sock, payload))
    sender.start()
    reply = c.reply()
    sender.join()
    assert reply.status in (400, 431)
    assert reply.headers["connection"] == "close"
    assert c.closed()
    assert server.bad_requests == 1


def _send_quietly(sock: socket.socket, payload: bytes) -> None:
    # The server may stop reading: its answer is what the test checks.
    with contextlib.suppress(OSError):
        sock.sendall(payload)


def test_garbage_flood_does_not_grow_memory(server: HttpServer) -> None:
    """20 clients each sending 1 MB without a line end: the server's buffers stay fixed."""
    payload = b"\x00" * (1 << 20)
    clients = [Client(server.address) for _ in range(20)]
    tracemalloc.start()
    try:
        base, _ = tracemalloc.get_traced_memory()
        senders = [threading.Thread(target=_send_quietly, args=(c.sock, payload)) for c in clients]
        for t in senders:
            t.start()
        statuses = {c.reply().status for c in clients}
        for t in senders:
            t.join()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert statuses == {431}
    assert peak - base < 1 << 20, peak - base  # holding the input would be 20 MB


def test_health_answers_during_a_slowloris_flood(make_server: MakeServer) -> None:
    """48 trickling clients that reconnect when cut, against 32 slots: health checks pass.

    Each sweep reconnects about 16 clients, each evicting another; a GET is read long before 32
    newer connections arrive to evict it.
    """
    server = make_server(request_timeout=10.0, max_connections=32)
    stop = threading.Event()

    def trickle() -> None:
        flood: list[socket.socket | None] = [None] * 48
        while not stop.is_set():
            for i, s in enumerate(flood):
                try:
                    if s is None:
                        s = flood[i] = socket.create_connection(server.address)
                    s.send(b"a")
                except OSError:
                    if s is not None:
                        s.close()
                    flood[i] = None
            time.sleep(0.2)
        for s in flood:
            if s is not None:
                s.close()

    flooder = threading.Thread(target=trickle)
    flooder.start()
    try:
        wait_until(lambda: server.evicted > 48)
        worst = 0.0
        for _ in range(10):
            start = time.monotonic()
            assert Client(server.address).get("/healthz").status == 200
            worst = max(worst, time.monotonic() - start)
            time.sleep(0.05)
        assert worst < 1.0
    finally:
        stop.set()
        flooder.join()
    assert server.connections <= 32


# The handler.


def test_handler_exception_is_a_500_and_one_log_line(
    server: HttpServer, client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="qmp_proxy.httpd")
    reply = client.get("/boom")
    assert reply.status == 500
    assert "connection" not in reply.headers
    assert client.get("/").status == 200  # same connection, still serving
    records = [r for r in caplog.records if r.name == "qmp_proxy.httpd"]
    assert len(records) == 1
    message = records[0].getMessage()
    assert records[0].exc_info is None
    assert "\n" not in message
    assert "path=/boom" in message
    assert "RuntimeError: boom" in message
    assert server.handler_errors == 1


@pytest.mark.parametrize(
    "bad",
    [
        None,
        (200, "text/plain"),
        (200, "text/plain", "str body"),
        (99, "text/plain", b""),
        (200, "text/plain\r\nX-Injected: 1", b""),
        (True, "text/plain", b""),
    ],
)
def test_handler_returning_nonsense_is_a_500(make_server: MakeServer, bad: object) -> None:
    server = make_server(handler=lambda path: bad)
    reply = Client(server.address).get("/")
    assert reply.status == 500
    assert "x-injected" not in reply.headers
    assert server.handler_errors == 1


# Life cycle.


def test_close_joins_the_thread_closes_connections_and_frees_the_port(app: App) -> None:
    before = set(threading.enumerate())
    server = HttpServer("127.0.0.1", 0, app)
    server.start()
    host, port = server.address
    assert port != 0
    idle = Client(server.address)
    assert idle.get("/").status == 200
    waiting = Client(server.address)
    start = time.monotonic()
    server.close()
    assert time.monotonic() - start < 1.0
    assert set(threading.enumerate()) == before
    assert idle.closed(within=0.5)
    assert waiting.closed(within=0.5)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((host, port), timeout=1)
    server.close()  # twice is harmless
    again = HttpServer(host, port, app)
    again.start()
    try:
        assert Client(again.address).get("/").status == 200
    finally:
        again.close()


def test_close_before_start_is_harmless(app: App) -> None:
    HttpServer("127.0.0.1", 0, app).close()


def test_bind_error_names_the_address(app: App) -> None:
    before = threading.active_count()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = HttpServer("127.0.0.1", port, app)
        with pytest.raises(OSError, match=rf"^metrics 127\.0\.0\.1:{port}: \[Errno \d+\] "):
            server.start()
    try:
        server.start()
    except OSError as exc:
        pytest.fail(f"the port was free again: {exc}")
    server.close()
    assert threading.active_count() == before


def test_bind_error_keeps_errno(app: App) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError) as info:
            HttpServer("127.0.0.1", port, app).start()
    assert info.value.errno == errno.EADDRINUSE
    assert str(info.value) == (
        f"metrics 127.0.0.1:{port}: [Errno {errno.EADDRINUSE}] Address already in use"
    )


def test_foreign_address_names_the_address(app: App) -> None:
    with pytest.raises(OSError, match=r"^metrics 192\.0\.2\.1:9740: \[Errno \d+\] "):
        HttpServer("192.0.2.1", 9740, app).start()


def test_ipv6(app: App) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    server = HttpServer("::1", 0, app)
    try:
        server.start()
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback: {exc}")
    try:
        assert server.address[0] == "::1"
        conn = http.client.HTTPConnection("::1", server.address[1], timeout=3)
        conn.request("GET", "/healthz")
        assert conn.getresponse().status == 200
        conn.close()
    finally:
        server.close()
