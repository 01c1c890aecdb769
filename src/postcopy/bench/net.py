"""Network baselines for ``postcopy bench``: raw TCP bulk throughput and 4 KiB
request/response round trips, run as separate processes on the two testbed hosts, the
way the agents run. ``python -m postcopy.bench.net server PORT`` on one host,
``python -m postcopy.bench.net bulk|rtt HOST PORT N`` on the other; the client prints
one JSON line."""
from __future__ import annotations

import json
import socket
import struct
import sys
import time

from postcopy.protocol.channel import tune

CHUNK = 1 << 20
REPLY = 4096
_REQ = struct.Struct("!cQ")  # kind (b"B" bulk, b"R" rtt), count


def _recv_exact(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ConnectionError("peer closed")
        got += n


def serve(port: int, connections: int = 2) -> None:
    """Serve a fixed number of client sessions, then exit."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("0.0.0.0", port))
    listener.listen(4)
    print("ready", flush=True)
    buf = bytearray(CHUNK)
    reply = bytes(REPLY)
    for _ in range(connections):
        sock, _ = listener.accept()
        tune(sock, urgent=False)
        head = bytearray(_REQ.size)
        _recv_exact(sock, memoryview(head))
        kind, count = _REQ.unpack(head)
        if kind == b"B":
            left = count
            while left:
                n = sock.recv_into(buf, min(len(buf), left))
                if n == 0:
                    raise ConnectionError("bulk client closed early")
                left -= n
            sock.sendall(b"k")
        else:
            req = memoryview(bytearray(16))
            for _ in range(count):
                _recv_exact(sock, req)
                sock.sendall(reply)
        sock.close()


def bulk(host: str, port: int, nbytes: int) -> dict:
    """Send nbytes as fast as TCP goes; the server acknowledges the last byte."""
    sock = socket.create_connection((host, port))
    tune(sock, urgent=False)
    data = bytes(CHUNK)
    sock.sendall(_REQ.pack(b"B", nbytes))
    started = time.perf_counter()
    left = nbytes
    while left:
        n = min(CHUNK, left)
        sock.sendall(memoryview(data)[:n])
        left -= n
    sock.recv(1)
    elapsed = time.perf_counter() - started
    sock.close()
    return {"bytes": nbytes, "seconds": elapsed, "bytes_per_s": nbytes / elapsed}


def rtt(host: str, port: int, count: int) -> dict:
    """count round trips of a 16-byte request and a 4 KiB reply (a demand fault's shape)."""
    sock = socket.create_connection((host, port))
    tune(sock, urgent=True)
    sock.sendall(_REQ.pack(b"R", count))
    request = bytes(16)
    reply = memoryview(bytearray(REPLY))
    samples = []
    for _ in range(count):
        t0 = time.perf_counter_ns()
        sock.sendall(request)
        _recv_exact(sock, reply)
        samples.append((time.perf_counter_ns() - t0) / 1e3)
    sock.close()
    return {"count": count, "latencies_us": samples}


def main(argv: list[str]) -> int:
    if argv[:1] == ["server"]:
        serve(int(argv[1]), int(argv[2]) if len(argv) > 2 else 2)
        return 0
    kind, host, port, n = argv[0], argv[1], int(argv[2]), int(argv[3])
    result = bulk(host, port, n) if kind == "bulk" else rtt(host, port, n)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
