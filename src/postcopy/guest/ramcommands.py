"""The guest's RAM commands: hash, descriptors, discard, dirty tracking, free pages,
touch and step gaps. Apart from the vCPU life cycle (:mod:`postcopy.guest.runtime`),
which mixes them into :class:`~postcopy.guest.runtime.Guest`."""
from __future__ import annotations

import os

from postcopy._native import ffi, lib
from postcopy.guest.dirtytrack import DirtyTracker, TrackingError
from postcopy.guest.incoming import uffd_registered
from postcopy.guest.params import _UNLIMITED, GuestStateError


class RamCommands:
    """Commands on guest RAM; the host class provides the RAM (``_ram``, ``address``,
    ``ram_size``, ``page_size``, ``memfd``, ``uffd``), the locks (``_op`` for one command at
    a time, ``_cond`` for the vCPU state) and ``_settle``."""

    def ram_arriving(self) -> bool:
        """Whether pages may still arrive: an incoming guest's RAM stays registered with
        its userfaultfd until the destination has every page in (it unregisters then).
        Until that, a read that bypasses the mapping (the hash's SEEK_DATA on the memfd,
        or skipping non-present pages) would see missing pages as zeros."""
        if self.uffd is None or self._ram_settled:
            return False
        if uffd_registered(self.address, self.ram_size):
            return True
        self._ram_settled = True  # nothing registers it again
        return False

    def ram_hash(self) -> str:
        """Hash of the whole RAM without heartbeats (paused or finished guests only).
        Pages that read as zero without being present are not touched, so an incoming
        guest refuses until every page has arrived (see :meth:`ram_arriving`)."""
        with self._op:
            with self._cond:
                self._settle()
                if self._state not in ("paused", "finished") or self._starting or self._running:
                    raise GuestStateError(f"hash needs a paused or finished guest (state {self._state})")
            if self.ram_arriving():
                raise GuestStateError("hash needs every page in: the RAM is still registered with the incoming "
                                      "userfaultfd (the destination has not received every page yet)")
            value = lib.pc_guest_hash(self._ram, self.ram_size, self.page_size,
                                      -1 if self.memfd is None else self.memfd)
            return f"{value:016x}"

    def fds(self) -> tuple[dict, list[int]]:
        """The reply for ``fds`` and the descriptors to send with it (memfd, uffd)."""
        with self._op:
            names, fds = [], []
            if self.memfd is not None:
                names.append("memfd")
                fds.append(self.memfd)
            if self.uffd is not None:
                names.append("uffd")
                fds.append(self.uffd.fileno())
            if self._mover_peer is not None:
                names.append("mover")
                fds.append(self._mover_peer.fileno())
            self._fds_taken = True
            reply = {"fds": names, "ram_address": self.address, "ram_size": self.ram_size,
                     "page_size": self.page_size, "pid": os.getpid(), "backing": self.backing,
                     "uffd_features": int(self.uffd.features) if self.uffd is not None else 0,
                     "uffd_minor": self.uffd_minor, "staging_address": self.staging_address,
                     "staging_pages": self.staging_pages}
            return reply, fds

    def discard(self, ranges: list) -> dict:
        """Drop RAM ranges so they read as missing again (under userfaultfd) or zero.

        Each range is ``[offset, length]``, page aligned and inside RAM. Allowed while
        the vCPUs are parked (paused, finished) or before an incoming guest starts.
        With UFFD_FEATURE_EVENT_REMOVE the kernel's madvise() blocks until the uffd
        reader has read the REMOVE event, so the uffd holder must be reading events
        meanwhile; a discard before the uffd was handed out is refused for that reason.
        """
        checked = self._check_ranges(ranges)
        with self._op:
            with self._cond:
                self._settle()
                if self._state in ("running", "checkpointing") or self._starting or self._running:
                    raise GuestStateError("discard needs parked vCPUs (pause first)")
            if self._dirty is not None:
                raise GuestStateError("discard while dirty tracking is on would go unreported (a punched "
                                      "hole keeps its write-protect marker): turn dirty_track off first")
            if (self.uffd is not None and not self._fds_taken
                    and int(self.uffd.features) & int(_feature("EVENT_REMOVE"))):
                raise GuestStateError("discard would block: nobody reads the userfaultfd's REMOVE "
                                      "events (take the fds first)")
            total = 0
            for off, length in checked:
                rc = lib.pc_guest_discard(self._ram, off, length, -1 if self.memfd is None else self.memfd)
                if rc:
                    raise GuestStateError(f"discard [{off}, +{length}): {os.strerror(-rc)}")
                total += length
            return {"discarded": total}

    # ---- dirty tracking, free pages, touch, step gaps ----------------------------------

    def dirty_track(self, on: bool) -> dict:
        """Turn async write-protect dirty tracking of the RAM on or off (see
        :mod:`postcopy.guest.dirtytrack`). On when already on protects everything again
        (a fresh epoch). Refused on a guest whose RAM is registered with a missing-mode
        userfaultfd (incoming): one VMA takes one userfaultfd context, and that one
        lacks WP_ASYNC. Off: unregister and close (idempotent)."""
        with self._op:
            if self._doorbell is not None:
                raise GuestStateError("dirty tracking cannot change during a checkpoint doorbell session")
            if not on:
                tracker, self._dirty = self._dirty, None
                if tracker is not None:
                    tracker.close()
                return {"tracking": False, "was": tracker is not None}
            if self.uffd is not None:
                raise GuestStateError("dirty tracking needs a guest without a userfaultfd: this one's RAM is "
                                      "registered (missing mode) with the incoming userfaultfd, and a VMA takes "
                                      "only one userfaultfd context")
            restarted = self._dirty is not None
            try:
                if not restarted:
                    self._dirty = DirtyTracker(self.address, self.ram_size, shmem=self.memfd is not None)
                self._dirty.protect_all()
            except TrackingError as exc:
                tracker, self._dirty = self._dirty, None
                if tracker is not None:
                    tracker.close()
                raise GuestStateError(str(exc)) from None
            return {"tracking": True, "restarted": restarted}

    def _harvest_encoded(self) -> str:
        """The dirty log's pages written since the previous harvest (``_op`` held)."""
        if self._dirty is None:
            raise GuestStateError("dirty tracking was turned off during the run")
        try:
            return self._dirty.harvest_encoded()
        except OSError as exc:
            raise GuestStateError(f"harvest: {exc}") from None

    def free_ranges(self) -> dict:
        """Pages free right now: sorted, merged ``[offset, length]`` byte ranges. A
        snapshot: the vCPUs may take any of them back right after (zero-filling first)."""
        with self._cond:
            if self._info is None:
                raise GuestStateError(f"free_ranges needs the guest's state page (state {self._state})")
        while True:
            cap = self._free_cap
            buf = ffi.new("uint64_t[]", 2 * cap)
            n = lib.pc_guest_free_runs(self._ram, self.ram_size, self.page_size, buf, cap)
            if n < 0:
                raise GuestStateError(f"free_ranges: {os.strerror(-n)}")
            if n <= cap:
                break
            self._free_cap = n + n // 4 + 16  # the set moves: leave room
        flat = ffi.unpack(buf, 2 * n)
        ps = self.page_size
        ranges = [[first * ps, count * ps] for first, count in zip(flat[0::2], flat[1::2])]
        return {"ranges": ranges, "free_pages": sum(flat[1::2])}

    def touch(self, *, pages=None, spread=None) -> dict:
        """Write to pages without changing them (atomic OR of 0 into the first word):
        they become dirty for any dirty log. ``pages`` is a list of page indexes;
        ``spread`` is ``{"first", "count", "n", "seed"}``: n distinct pseudo-random pages
        of [first, first + count). Like a vCPU write, but not stopped by pause."""
        with self._cond:
            if self._state == "incoming":
                raise GuestStateError("guest is incoming: its RAM has not arrived")
        npages = self.ram_size // self.page_size
        if pages is not None:
            if not isinstance(pages, list) or not all(_is_int(p) and 0 <= p < npages for p in pages):
                raise GuestStateError(f"touch: pages must be a list of page indexes below {npages}")
            arr = ffi.new("uint64_t[]", pages)
            rc = lib.pc_guest_touch(self._ram, self.ram_size, self.page_size, arr, len(pages))
            count = len(pages)
        elif spread is not None:
            keys = ("first", "count", "n", "seed")
            if not isinstance(spread, dict) or not all(_is_int(spread.get(k)) and spread[k] >= 0 for k in keys):
                raise GuestStateError("touch: spread wants non-negative integers first, count, n, seed")
            first, span, count, seed = (spread[k] for k in keys)
            if first + span > npages or count > span:
                raise GuestStateError(f"touch: spread [{first}, +{span}) of {count} pages does not fit "
                                      f"{npages} pages")
            rc = lib.pc_guest_touch_spread(self._ram, self.ram_size, self.page_size, first, span, count,
                                           seed & _UNLIMITED)
        else:
            raise GuestStateError("touch wants 'pages' or 'spread'")
        if rc:
            raise GuestStateError(f"touch: {os.strerror(-rc)}")
        return {"touched": count}

    def take_max_step_gap(self) -> dict:
        """Longest time any vCPU went without a step (pauses included) since the
        previous call, in ns; resets it."""
        with self._cond:
            n = len(self._local_ptrs)
            locals_ = self._locals
        gap = lib.pc_vcpu_take_max_gap(locals_, n) if n else 0
        return {"max_gap_ns": int(gap)}

    def _check_ranges(self, ranges) -> list[tuple[int, int]]:
        if not isinstance(ranges, list):
            raise GuestStateError("ranges must be a list of [offset, length]")
        out = []
        for item in ranges:
            if (not isinstance(item, (list, tuple)) or len(item) != 2
                    or not all(isinstance(x, int) and not isinstance(x, bool) for x in item)):
                raise GuestStateError(f"bad range {item!r}: want [offset, length] integers")
            off, length = item
            if off < 0 or length <= 0 or off % self.page_size or length % self.page_size:
                raise GuestStateError(f"range [{off}, {length}] is not page aligned and non-empty")
            if off + length > self.ram_size:
                raise GuestStateError(f"range [{off}, {length}] ends beyond RAM ({self.ram_size})")
            out.append((off, length))
        return out


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _feature(name: str):
    from postcopy.kernel.uffd import Feature

    return getattr(Feature, name)
