"""The shared key file, read the way ssh reads a private key: it must be readable by
its owner only and hold a real key. A FIFO (``--key-file <(command)``) is read for a
bounded time, so one with no writer cannot hang an agent."""
from __future__ import annotations

import errno
import os
import select
import stat
import time

from postcopy.protocol.wire import KeyFileError

MIN_KEY_BYTES = 16
MAX_KEY_BYTES = 65536
PIPE_WAIT_S = 5.0
HOW_TO_MAKE = "python3 -c 'import secrets; print(secrets.token_hex(32))' > FILE; chmod 600 FILE"


def load_key(path: str | os.PathLike, pipe_wait: float = PIPE_WAIT_S) -> bytes:
    """The key in ``path`` (surrounding whitespace stripped). Raises OSError if it
    cannot be read and :class:`KeyFileError` if it is readable by group or others,
    shorter than MIN_KEY_BYTES, larger than MAX_KEY_BYTES, or a pipe that stays silent."""
    name = os.fspath(path)
    fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if not (stat.S_ISREG(info.st_mode) or stat.S_ISFIFO(info.st_mode)):
            raise KeyFileError(f"key file {name!r} is not a regular file or a pipe")
        if info.st_mode & 0o077:
            raise KeyFileError(f"key file {name!r} has mode {stat.S_IMODE(info.st_mode):04o}: it must not be "
                               f"accessible by group or others (chmod 600 {name})")
        data = _read_all(fd, name, pipe_wait) if stat.S_ISFIFO(info.st_mode) else os.read(fd, MAX_KEY_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_KEY_BYTES:
        raise KeyFileError(f"key file {name!r} is larger than 64 KiB: not a key file")
    key = data.strip()
    if not key:
        raise KeyFileError(f"key file {name!r} is empty; create one with: {HOW_TO_MAKE}")
    if len(key) < MIN_KEY_BYTES:
        raise KeyFileError(f"key file {name!r} holds {len(key)} bytes; a key needs at least {MIN_KEY_BYTES} "
                           f"(create one with: {HOW_TO_MAKE})")
    return key


def _read_all(fd: int, name: str, wait: float) -> bytes:
    """Read a pipe to its end, waiting at most ``wait`` seconds in all: a FIFO nobody
    writes to reads as empty at once (no writer yet) or blocks (a silent writer)."""
    deadline = time.monotonic() + wait
    chunks: list[bytes] = []
    total = 0
    while total <= MAX_KEY_BYTES:
        try:
            chunk = os.read(fd, MAX_KEY_BYTES + 1 - total)
        except OSError as exc:
            if exc.errno != errno.EAGAIN:
                raise
            chunk = None
        if chunk:
            chunks.append(chunk)
            total += len(chunk)
            continue
        if chunk == b"" and chunks:
            break  # the writer is done
        left = deadline - time.monotonic()
        if left <= 0:
            raise KeyFileError(f"key file {name!r} is a pipe that nobody wrote a key to within {wait:g} s")
        # No writer yet (reads as EOF) or a silent one (EAGAIN): look again shortly.
        select.select([fd], [], [], min(left, 0.05))
    return b"".join(chunks)
