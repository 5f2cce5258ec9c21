"""Free TCP ports on loopback, for servers a test or benchmark starts itself."""

from __future__ import annotations

import socket


def free_ports(count: int) -> list[int]:
    """Ports the kernel has just handed out (and released) on loopback, all different."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def free_port() -> int:
    """One such port; nothing listens on it (until someone binds it)."""
    return free_ports(1)[0]
