"""``postcopy status --source SOCK``: ask a running source agent how its migration
goes (the ``query-migrate`` analogue). The source serves its live figures on a Unix
socket (``postcopy source --status-socket PATH``): one JSON object per connection."""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import threading
from typing import Callable


class StatusServer:
    """Answers every connection on ``path`` with ``snapshot()`` as one JSON line.
    Only the socket's owner may connect (mode 0600); closed by :meth:`close`."""

    def __init__(self, path: str, snapshot: Callable[[], dict]) -> None:
        self.path = path
        self._snapshot = snapshot
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        old = os.umask(0o177)
        try:
            self._sock.bind(path)
        finally:
            os.umask(old)
        self._sock.listen(8)
        self._thread = threading.Thread(target=self._serve, name="status-server", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # closed
            with conn:
                try:
                    conn.sendall(json.dumps(self._snapshot()).encode() + b"\n")
                except OSError:
                    pass

    def close(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        self._thread.join(timeout=2)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def __enter__(self) -> "StatusServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def query(path: str, timeout: float = 5.0) -> dict:
    """The status a source serves on ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    try:
        return json.loads(data)
    except ValueError:
        raise OSError(f"{path} did not answer with a status (is it a postcopy source's --status-socket?)") from None


def register(subparsers) -> None:
    p = subparsers.add_parser("status", help="the live status of a running `postcopy source`",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--source", required=True, metavar="SOCK", help="the source's --status-socket")
    p.add_argument("--json", action="store_true", help="print the raw JSON")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from postcopy.migration.progress import format_line

    try:
        status = query(args.source)
    except OSError as exc:
        print(f"postcopy status: cannot query {args.source}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(status, indent=2) if args.json else format_line(status))
    return 0
