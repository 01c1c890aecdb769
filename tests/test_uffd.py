"""In-process tests of the userfaultfd layer (native/uffd_ops.c, postcopy/uffd.py).

Threads that touch registered memory do it through native helpers that release the
GIL (pc_mem_*), so a Python handler thread can serve their faults.  Every test that
blocks a thread on a fault closes the userfaultfd on the way out, which wakes it.
"""
from __future__ import annotations

import ctypes
import errno
import mmap
import os
import signal
import statistics
import subprocess
import sys
import textwrap
import threading

import pytest

from conftest import require_uffd
from postcopy._native import ffi, lib
from postcopy.kernel.uffd import (PAGE_SIZE, Event, EventKind, Feature, MappingChangedError, Mode,
                           PageExistsError, UffdError, Userfaultfd, address_of, supported_features)

PS = PAGE_SIZE


@pytest.fixture(autouse=True)
def _uffd_available():
    require_uffd()


def need(feature: Feature) -> None:
    if not supported_features() & feature:
        pytest.skip(f"kernel does not offer UFFD_FEATURE_{feature.name}")


@pytest.fixture
def anon():
    """Factory of private anonymous mappings, one PTE per 4 KiB page (no THP)."""
    maps = []

    def make(npages: int) -> tuple[mmap.mmap, int]:
        m = mmap.mmap(-1, npages * PS, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        m.madvise(mmap.MADV_NOHUGEPAGE)
        maps.append(m)
        return m, address_of(m)

    yield make
    for m in maps:
        m.close()


class Toucher(threading.Thread):
    """Reads (or writes) registered memory from C with the GIL released."""

    def __init__(self, addr: int, length: int, write: int | None = None):
        super().__init__(daemon=True)
        self.addr, self.length, self.write = addr, length, write
        self.sum: int | None = None

    def run(self) -> None:
        if self.write is None:
            self.sum = lib.pc_mem_read_sum(self.addr, self.length, PS)
        else:
            lib.pc_mem_fill(self.addr, self.length, PS, self.write)
            self.sum = 0


def pattern(npages: int) -> bytes:
    return b"".join(bytes([i % 251 + 1]) * PS for i in range(npages))


# -- opening and negotiation ----------------------------------------------------------

def test_open_negotiates_requested_and_optional_features():
    offered = supported_features()
    optional = Feature.THREAD_ID | Feature.EVENT_REMOVE
    with Userfaultfd(optional=optional) as u:
        assert u.fileno() >= 0 and not u.closed
        assert u.features == optional & offered
    assert u.closed
    with pytest.raises(ValueError):
        u.fileno()


def test_missing_required_feature_is_named(monkeypatch):
    import postcopy.kernel.uffd as uffd

    monkeypatch.setattr(uffd, "_supported", Feature.MISSING_SHMEM | Feature.THREAD_ID)
    with pytest.raises(UffdError) as info:
        Userfaultfd(Feature.MOVE | Feature.THREAD_ID)
    assert info.value.errno == errno.EOPNOTSUPP
    assert "MOVE" in str(info.value) and "THREAD_ID" not in str(info.value)


def test_from_fd_wraps_a_passed_descriptor(anon):
    m, base = anon(1)
    with Userfaultfd() as owner:
        clone = Userfaultfd.from_fd(os.dup(owner.fileno()), owner.features)
        with clone:
            assert clone.nonblock  # O_NONBLOCK is read back from the file
            clone.register(base, PS, Mode.MISSING)
            assert clone.copy(base, b"\x07" * PS, PS) == PS
    assert m[0] == 7


def test_error_names_the_operation(anon):
    _, base = anon(2)
    with Userfaultfd() as u:
        with pytest.raises(UffdError) as info:
            u.register(base + 1, PS, Mode.MISSING)
        assert info.value.errno == errno.EINVAL
        assert "UFFDIO_REGISTER" in str(info.value)
        with pytest.raises(MappingChangedError) as info:
            u.copy(base, b"x" * PS, PS)  # range not registered
        assert info.value.errno == errno.ENOENT and "UFFDIO_COPY" in str(info.value)


# -- filling ioctls -------------------------------------------------------------------

def test_copy_installs_pages_from_buffer_and_address(anon):
    m, base = anon(8)
    data = pattern(8)
    with Userfaultfd() as u:
        ioctls = u.register(base, 8 * PS, Mode.MISSING)
        assert ioctls & (1 << 3)  # _UFFDIO_COPY
        assert u.copy(base, data[:4 * PS], 4 * PS) == 4 * PS
        src = bytearray(data[4 * PS:])
        assert u.copy(base + 4 * PS, address_of(src), 4 * PS) == 4 * PS
        assert m[:] == data  # all mapped now: reading from Python cannot fault
        with pytest.raises(ValueError):
            u.copy(base, b"short", PS)


def test_zeropage_maps_zeros_and_then_counts_as_existing(anon):
    m, base = anon(4)
    with Userfaultfd() as u:
        u.register(base, 4 * PS, Mode.MISSING)
        assert u.zeropage(base, 4 * PS) == 4 * PS
        assert m[:] == bytes(4 * PS)
        with pytest.raises(PageExistsError):
            u.copy(base + PS, b"x" * PS, PS)


def test_partial_copy_returns_short_count_then_page_exists(anon):
    m, base = anon(4)
    with Userfaultfd() as u:
        u.register(base, 4 * PS, Mode.MISSING)
        assert u.copy(base + 2 * PS, b"\x02" * PS, PS) == PS
        # Pages 0-1 go in, page 2 exists: a partial result, not an exception.
        assert u.copy(base, b"\x01" * 4 * PS, 4 * PS) == 2 * PS
        with pytest.raises(PageExistsError) as info:
            u.copy(base + 2 * PS, b"\x01" * 2 * PS, 2 * PS)
        assert info.value.errno == errno.EEXIST and isinstance(info.value, UffdError)
        assert u.copy(base + 3 * PS, b"\x03" * PS, PS) == PS
        assert [m[i * PS] for i in range(4)] == [1, 1, 2, 3]


def test_native_copy_reports_result_field_and_errno(anon):
    _, base = anon(2)
    err = ffi.new("int *")
    src = b"\x05" * 2 * PS
    with Userfaultfd() as u:
        u.register(base, 2 * PS, Mode.MISSING)
        assert lib.pc_uffd_copy(u.fileno(), base + PS, address_of(src), PS, 0, err) == PS and err[0] == 0
        assert lib.pc_uffd_copy(u.fileno(), base, address_of(src), 2 * PS, 0, err) == PS
        assert err[0] == errno.EAGAIN  # partial: bytes done, EAGAIN
        assert lib.pc_uffd_copy(u.fileno(), base, address_of(src), PS, 0, err) == -errno.EEXIST
        assert err[0] == errno.EEXIST


# -- faults served from Python --------------------------------------------------------

def test_python_handler_thread_serves_faults(anon):
    npages = 32
    _, base = anon(npages)
    data = pattern(npages)
    seen: list[Event] = []
    stop = threading.Event()
    with Userfaultfd(optional=Feature.THREAD_ID) as u:
        u.register(base, npages * PS, Mode.MISSING)

        def serve() -> None:
            while not stop.is_set():
                for event in u.read_events(16, timeout=0.05):
                    seen.append(event)
                    off = event.address - base
                    try:
                        u.copy(event.address, data[off:off + PS], PS)
                    except PageExistsError:
                        u.wake(event.address, PS)

        handler = threading.Thread(target=serve, daemon=True)
        handler.start()
        toucher = Toucher(base, npages * PS)
        toucher.start()
        toucher.join(30)
        stop.set()
        handler.join(5)
        assert not toucher.is_alive(), "faulting thread never released"
    assert toucher.sum == sum(data[i * PS] for i in range(npages))
    assert sorted(e.address for e in seen) == [base + i * PS for i in range(npages)]
    assert all(e.kind is EventKind.PAGEFAULT and not e.write and not e.wp for e in seen)
    if Feature.THREAD_ID in u.features:
        assert all(e.thread_id == toucher.native_id for e in seen)


def test_dontwake_copy_keeps_waiter_blocked_until_wake(anon):
    m, base = anon(1)
    with Userfaultfd() as u:
        u.register(base, PS, Mode.MISSING)
        toucher = Toucher(base, PS)
        toucher.start()
        try:
            events = u.read_events(timeout=10)
            assert [e.address for e in events] == [base]
            assert u.copy(base, b"\x09" * PS, PS, wake=False) == PS
            toucher.join(0.2)
            assert toucher.is_alive(), "DONTWAKE copy woke the faulting thread"
            u.wake(base, PS)
            toucher.join(10)
            assert not toucher.is_alive()
        finally:
            u.close()  # releases the toucher if an assertion failed
            toucher.join(10)
    assert toucher.sum == 9


def test_write_protect_fault_is_reported_with_wp_flag(anon):
    m, base = anon(2)
    m[:] = b"\x01" * 2 * PS  # populated: WP applies to present pages without WP_UNPOPULATED
    with Userfaultfd(optional=Feature.PAGEFAULT_FLAG_WP) as u:
        u.register(base, 2 * PS, Mode.WP)
        u.writeprotect(base, 2 * PS, protect=True)
        writer = Toucher(base + PS, PS, write=0x42)
        writer.start()
        try:
            events = u.read_events(timeout=10)
            assert len(events) == 1
            event = events[0]
            assert event.kind is EventKind.PAGEFAULT and event.address == base + PS
            assert event.wp and event.write and not event.minor
            assert writer.is_alive()
            u.writeprotect(base + PS, PS, protect=False)  # wakes the writer
            writer.join(10)
            assert not writer.is_alive()
        finally:
            u.close()
            writer.join(10)
    assert m[0] == 1 and m[PS] == 0x42


def test_remove_event_reports_discarded_range(anon):
    need(Feature.EVENT_REMOVE)
    m, base = anon(4)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    with Userfaultfd(Feature.EVENT_REMOVE) as u:
        u.register(base, 4 * PS, Mode.MISSING)
        u.zeropage(base, 4 * PS)
        # madvise waits until the handler has read the event: call it without the GIL.
        result: list[int] = []
        t = threading.Thread(target=lambda: result.append(
            libc.madvise(base + PS, 2 * PS, mmap.MADV_DONTNEED)), daemon=True)
        t.start()
        try:
            events = u.read_events(timeout=10)
        finally:
            u.close()
            t.join(10)
    assert result == [0]
    assert [(e.kind, e.address, e.end) for e in events] == [(EventKind.REMOVE, base + PS, base + 3 * PS)]


def test_read_events_times_out_empty():
    with Userfaultfd() as u:
        assert u.read_events(timeout=0) == []
        assert u.read_events(8, timeout=0.01) == []
    with Userfaultfd(nonblock=False) as u:
        with pytest.raises(ValueError):
            u.read_events(timeout=0.01)


# -- newer ioctls ---------------------------------------------------------------------

def test_move_transfers_pages(anon):
    need(Feature.MOVE)
    src, s = anon(3)
    dst, d = anon(3)
    data = pattern(3)
    src[:] = data
    with Userfaultfd(Feature.MOVE) as u:
        ioctls = u.register(d, 3 * PS, Mode.MISSING)
        assert ioctls & (1 << 5)  # _UFFDIO_MOVE
        assert u.move(d, s, 3 * PS) == 3 * PS
        with pytest.raises(UffdError) as info:
            u.move(d, s, PS)  # source is a hole now
        assert info.value.errno in (errno.ENOENT, errno.EEXIST)
    assert dst[:] == data
    assert src[:] == bytes(3 * PS)  # moved out: the source is unmapped and reads zeros


def test_continue_maps_page_cache_on_minor_fault():
    need(Feature.MINOR_SHMEM)
    fd = os.memfd_create("test-uffd-minor", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, 2 * PS)
        view, other = mmap.mmap(fd, 2 * PS), mmap.mmap(fd, 2 * PS)
        try:
            other[:] = b"\x11" * PS + b"\x22" * PS  # page cache filled via another mapping
            base = address_of(view)
            with Userfaultfd(Feature.MINOR_SHMEM) as u:
                u.register(base, 2 * PS, Mode.MINOR)
                toucher = Toucher(base + PS, PS)
                toucher.start()
                try:
                    events = u.read_events(timeout=10)
                    assert len(events) == 1 and events[0].minor and events[0].address == base + PS
                    assert u.continue_(base + PS, PS) == PS
                    toucher.join(10)
                    assert not toucher.is_alive()
                    with pytest.raises(PageExistsError):
                        u.continue_(base + PS, PS)
                finally:
                    u.close()
                    toucher.join(10)
            assert toucher.sum == 0x22
        finally:
            view.close()
            other.close()
    finally:
        os.close(fd)


def test_poison_makes_access_raise_sigbus():
    need(Feature.POISON)
    # A poisoned page kills whoever touches it: do it in a child process.
    script = textwrap.dedent("""
        import mmap, sys
        from postcopy.kernel.uffd import Feature, Mode, Userfaultfd, address_of, PAGE_SIZE
        from postcopy._native import lib
        m = mmap.mmap(-1, 2 * PAGE_SIZE)
        base = address_of(m)
        u = Userfaultfd(Feature.POISON)
        u.register(base, 2 * PAGE_SIZE, Mode.MISSING)
        assert u.poison(base + PAGE_SIZE, PAGE_SIZE) == PAGE_SIZE
        u.zeropage(base, PAGE_SIZE)
        lib.pc_mem_read_sum(base, PAGE_SIZE, PAGE_SIZE)  # fine
        print("first page ok", flush=True)
        lib.pc_mem_read_sum(base + PAGE_SIZE, PAGE_SIZE, PAGE_SIZE)  # SIGBUS
        sys.exit(3)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.stdout == "first page ok\n", proc.stderr
    assert proc.returncode == -signal.SIGBUS, proc.stderr


# -- benchmark baseline ---------------------------------------------------------------

def test_c_roundtrip_bench_returns_sane_latencies():
    n = 500
    lat = ffi.new("uint64_t[]", n)
    assert lib.pc_bench_uffd_roundtrip(n, lat) == 0
    values = list(lat)
    assert all(0 < v < 10**9 for v in values)  # each touch took time, none a second
    median_us = statistics.median(values) / 1000
    print(f"C uffd round trip: median {median_us:.1f} us over {n} faults")
    assert lib.pc_bench_uffd_roundtrip(0, lat) == -errno.EINVAL
