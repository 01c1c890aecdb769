"""The control socket's framing, shared by both ends: one JSON object per line, the
line limits, descriptors as SCM_RIGHTS, and the error a refused request raises."""
from __future__ import annotations

import json
import socket

from postcopy.kernel.dirtylog import GuestLinkError

MAX_LINE = 1 << 20  # requests
MAX_REPLY = 64 << 20  # replies: free_ranges of a fragmented free set can be long
MAX_FDS = 8


class GuestError(GuestLinkError):
    """The guest refused a request (``ok`` false) or is gone."""


def send_line(sock: socket.socket, obj: dict, fds: list[int] | None = None) -> None:
    """Send ``obj`` as one line, with ``fds`` as SCM_RIGHTS on its first bytes."""
    data = (json.dumps(obj, separators=(",", ":")) + "\n").encode()
    if fds:
        sent = socket.send_fds(sock, [data], fds)
        data = data[sent:]
    if data:
        sock.sendall(data)
