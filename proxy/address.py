"""Socket addresses written as QEMU writes them: ``unix:/path``, ``tcp:HOST:PORT``, or a bare
absolute path.  ``systemd:NAME`` names a listener inherited by socket activation, ``fd:N`` one
inherited as descriptor N (QEMU's own ``fd=N`` form: how libvirt hands QEMU its monitor)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Literal

AddressKind = Literal["unix", "tcp", "systemd", "fd"]


class AddressError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Address:
    kind: AddressKind
    path: str = ""
    host: str = ""
    port: int = 0

    def __str__(self) -> str:
        if self.kind == "tcp":
            host = f"[{self.host}]" if ":" in self.host else self.host
            return f"tcp:{host}:{self.port}"
        return f"{self.kind}:{self.path}"

    @property
    def is_loopback(self) -> bool:
        if self.kind != "tcp":
            return True
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


def parse(text: str) -> Address:
    """Parse one address; raises :class:`AddressError` with a message fit for the user."""
    if text.startswith("/"):
        return Address("unix", path=text)
    kind, sep, rest = text.partition(":")
    if not sep:
        raise AddressError(f"{text!r}: expected unix:/path, tcp:HOST:PORT or an absolute path")
    if kind == "unix":
        if not rest:
            raise AddressError(f"{text!r}: empty unix socket path")
        return Address("unix", path=rest)
    if kind == "systemd":
        if not rest:
            raise AddressError(f"{text!r}: empty systemd socket name")
        return Address("systemd", path=rest)
    if kind == "fd":
        if not rest.isdigit() or int(rest) < 3:
            raise AddressError(f"{text!r}: expected fd:N, N a descriptor number from 3 up")
        return Address("fd", path=str(int(rest)))
    if kind == "tcp":
        host, sep, port_text = rest.rpartition(":")
        if not sep or not port_text.isdigit():
            raise AddressError(f"{text!r}: expected tcp:HOST:PORT")
        port = int(port_text)
        if not 0 < port < 65536:
            raise AddressError(f"{text!r}: port out of range")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if not host:
            raise AddressError(f"{text!r}: empty host")
        return Address("tcp", host=host, port=port)
    raise AddressError(
        f"{text!r}: unknown address kind {kind!r} (use unix:, tcp:, systemd: or fd:)"
    )
