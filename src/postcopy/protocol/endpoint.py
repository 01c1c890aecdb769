"""Network endpoints as users write them: ``HOST:PORT``, ``[IPV6]:PORT``."""
from __future__ import annotations

import socket


def parse_endpoint(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPV6]:PORT`` → (host, port), with a clear error."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"endpoint {text!r} is not HOST:PORT (IPv6: [ADDRESS]:PORT)")
    if host.startswith("[") != host.endswith("]"):
        raise ValueError(f"endpoint {text!r}: unbalanced brackets around the host")
    if host.startswith("["):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"endpoint {text!r}: write an IPv6 address in brackets, as [{host}]:{port}")
    if not host:
        raise ValueError(f"endpoint {text!r} has no host")
    return host, int(port)


def format_endpoint(endpoint: tuple[str, int]) -> str:
    """The inverse of :func:`parse_endpoint`."""
    host, port = endpoint[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def listen_socket(endpoint: tuple[str, int]) -> socket.socket:
    """A listening TCP socket on ``endpoint`` (IPv4 or IPv6 host) with the largest
    backlog the kernel allows, so a burst of connections never fills it."""
    host, port = endpoint
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(socket.SOMAXCONN)
    except OSError:
        sock.close()
        raise
    return sock
