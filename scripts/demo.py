"""Two QMP clients on one QEMU through qmp-proxy, printed as a transcript (stdlib only)."""

from __future__ import annotations

import json
import socket
import sys


class Client:
    def __init__(self, name: str, path: str) -> None:
        self.name = name
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(10)
        self.sock.connect(path)
        self.buf = b""

    def read(self) -> dict[str, object]:
        while b"\n" not in self.buf:
            self.buf += self.sock.recv(65536)
        line, self.buf = self.buf.split(b"\n", 1)
        print(f"  {self.name} <- {line.decode().strip()[:150]}")
        return json.loads(line)  # type: ignore[no-any-return]

    def send(self, text: str) -> None:
        print(f"  {self.name} -> {text}")
        self.sock.sendall(text.encode())


def main(path: str) -> None:
    a = Client("A", path)
    b = Client("B", path)
    print("Both clients are connected at once; QEMU alone would greet only one of them.")
    a.read()
    b.read()
    a.send('{"execute": "qmp_capabilities"}')
    a.read()
    b.send("{'execute': 'qmp_capabilities', 'id': 'b0'}")  # QEMU also takes single quotes
    b.read()
    print("B resumes the VM; both see the RESUME event, B also its reply:")
    b.send('{"execute": "cont", "id": "b1"}')
    b.read()
    b.read()
    a.read()
    print("Both use the same ids; each gets only its own replies:")
    a.send('{"execute": "query-status", "id": 1}')
    b.send('{"execute": "query-name", "id": 1}')
    a.read()
    b.read()
    print("Malformed input gets QEMU's own errors:")
    a.send('{"execute": "query-status", "bogus": 1, "id": 2}')
    a.read()
    print("The backport: QEMU 7.2 lacks capabilities on migrate; through the proxy it works:")
    a.send(
        '{"execute": "migrate", "id": "save", "arguments": {"uri": "exec:cat > /dev/null", '
        '"capabilities": [{"capability": "xbzrle", "state": true}]}}'
    )
    while "id" not in a.read():
        pass  # MIGRATION events (if enabled) may come first
    a.send('{"execute": "query-migrate-capabilities", "id": "caps"}')
    while "id" not in (caps := a.read()):
        pass  # the finished migration stops the VM: a STOP event may come first
    xbzrle = [c for c in caps["return"] if c["capability"] == "xbzrle"]  # type: ignore[union-attr]
    print(f"  xbzrle is now {xbzrle[0]['state']}")


if __name__ == "__main__":
    main(sys.argv[1])
