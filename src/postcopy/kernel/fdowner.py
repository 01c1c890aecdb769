"""Ownership of one file descriptor: idempotent close, context manager, close on
garbage collection."""
from __future__ import annotations

import os


class FdOwner:
    """Base for objects that own ``self._fd`` (-1 once closed)."""

    _fd: int = -1

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        """Close the descriptor (idempotent)."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
