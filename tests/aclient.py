"""An asyncio byte-level QMP client for tests that run the proxy in the same event loop."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any


class AsyncRaw:
    """Writes exactly the bytes a test gives it; reads CRLF-terminated reply lines."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.greeting: dict[str, Any] | None = None

    @classmethod
    async def connect(cls, path: str) -> AsyncRaw:
        reader, writer = await asyncio.open_unix_connection(path, limit=16 << 20)
        return cls(reader, writer)

    async def line(self, timeout: float = 10.0) -> bytes:
        data = await asyncio.wait_for(self.reader.readline(), timeout)
        if not data:
            raise EOFError("connection closed")
        assert data.endswith(b"\r\n"), data[-50:]
        return data

    async def silent(self, seconds: float, what: str) -> None:
        """Nothing arrives for ``seconds``; ``what`` names the failure if something does."""
        try:
            line = await self.line(timeout=seconds)
        except TimeoutError:
            return
        raise AssertionError(f"{what}: {line!r}")

    async def message(self, timeout: float = 10.0) -> Any:
        return json.loads(await self.line(timeout))

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def reply(self, timeout: float = 10.0) -> dict[str, Any]:
        """The next reply, skipping events."""
        while True:
            msg: dict[str, Any] = await self.message(timeout)
            if "event" not in msg:
                return msg

    async def negotiate(self, oob: bool = False) -> dict[str, Any]:
        self.greeting = await self.message()
        enable = b',"arguments":{"enable":["oob"]}' if oob else b""
        await self.send(b'{"execute":"qmp_capabilities"' + enable + b"}")
        assert await self.reply() == {"return": {}}
        return self.greeting

    async def command(self, obj: dict[str, Any]) -> dict[str, Any]:
        await self.send(json.dumps(obj).encode())
        return await self.reply()

    async def eof(self, timeout: float = 10.0) -> bytes:
        """Everything until the proxy closes the connection."""
        return await asyncio.wait_for(self.reader.read(), timeout)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()
