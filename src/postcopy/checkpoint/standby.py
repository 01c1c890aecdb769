"""Continuous checkpointing, Remus style: the standby side.

The standby holds a copy of the primary guest's RAM in a memfd of its own and applies
the primary's epochs to it (:mod:`postcopy.checkpoint.primary` sends them). An epoch is applied
only once all of it has arrived: its pages are staged in a buffer as they come and
copied into the image when the epoch's marker arrives, then acknowledged. So the image
is always exactly the last complete epoch: a connection cut in the middle of an epoch
leaves the staged half unapplied (it is counted and dropped).

When the primary is lost (connection closed or broken, silent for ``timeout`` seconds,
or the primary reports that its guest died) the standby can fail over: it starts an
incoming guest (``postcopy guest --incoming``), installs the image into it with
UFFDIO_COPY (as the destination agent installs migrated pages), unregisters the range
so untouched pages read as zero, and resumes it. The guest continues from the step
count of the last complete epoch. Like Remus, the standby cannot tell a dead primary
host from a cut link: failing over after a mere network split leaves two guests
running (fencing is outside this tool).

Epoch protocol, on one authenticated :mod:`postcopy.protocol.wire` connection (the primary is
the client with role "source", the standby the server with role "dest", channel
"main"; page numbers are page indexes in RAM)::

    primary -> standby
      PageRun(cause PRECOPY)*   initial sync: every populated page (epoch 0)
      Switchover {"epoch": 0, "initial": true, "pages": N, "guest": {...},
                  "max_dirty": B, "steps_per_epoch": S}
      for n = 1, 2, ...:
        PageRun(cause RESENT)*  the pages dirtied in epoch n, the state page included
        Switchover {"epoch": n, "pages": N, "runs": R, "steps": [...], "paused_ns": T}
      PushDone(pages=n)         clean end: the primary stopped (its guest runs on there)
      Error(code, reason)       the primary lost its guest
    standby -> primary
      Complete {"epoch": n, "steps": [...]}   epoch n is applied: it is committed
      Error(code, reason)                     the standby gives up

Epoch 0 is written straight into the image (there is no complete epoch to protect
yet); epoch 1 is the first consistent image, because the primary's dirty log was
armed before the initial sync read any page.
"""
from __future__ import annotations

import dataclasses
import errno
import mmap
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

from postcopy import report

from postcopy.protocol import wire
from postcopy.guest.control import GuestClient, GuestError, GuestParams, parse_final_hash, wait_for_control
from postcopy.protocol.endpoint import listen_socket
from postcopy.protocol.channel import MAX_RUN_BYTES, Channel, ChannelClosed, handshake, tune

# Frames are at most one page run of MAX_RUN_BYTES; the receive buffer holds two.
RECV_BUFFER = 2 * MAX_RUN_BYTES + (64 << 10)

# Why the stream ended -> whether that means the primary is lost (failover).
PRIMARY_LOST = {"connection-lost": True, "primary-silent": True, "primary-guest-lost": True,
                "primary-stopped": False, "protocol-error": False}


class StandbyError(RuntimeError):
    """The standby could not run or fail over; the message says why."""


@dataclass
class StandbyConfig:
    """What ``postcopy standby`` does; see the module docstring."""

    listen: tuple[str, int]
    key: bytes
    failover: bool = False  # start the guest from the last complete epoch when the primary is lost
    backing: str | None = None  # RAM backing of the failover guest (default: the primary's)
    workdir: str | None = None  # where the failover guest's control socket goes (default: a temp dir)
    guest_control: str | None = None  # control socket path of the failover guest
    timeout: float = 5.0  # seconds of silence after which the primary counts as lost
    accept_timeout: float = 60.0
    wait_guest: bool = True  # after failover, wait for the guest to finish and take its hash


@dataclass(frozen=True)
class CommittedEpoch:
    """The epoch the image holds."""

    epoch: int
    steps: tuple[int, ...]
    paused_ns: int | None
    pages: int


_CAUSES = frozenset(int(c) for c in wire.Cause)
_PAGE_RUN = int(wire.FrameType.PAGE_RUN)


class _FrameReader:
    """Frames from a socket with few syscalls: one recv_into fills a large buffer with
    whatever has arrived, and frames are cut out of it in place.

    :meth:`frame` returns the header fields and the payload's offset in :attr:`buf`. A
    page run's header is checked here directly (the hot path: magic, type, cause,
    length); every other header goes through :func:`wire.decode_header`. Payload bytes
    stay valid until a later frame needs their room, except while :attr:`pinned`: then
    ``on_spill`` is called first, to copy out what it still needs and unpin."""

    def __init__(self, sock: socket.socket, size: int = RECV_BUFFER, max_payload: int = MAX_RUN_BYTES):
        self.sock = sock
        self.buf = bytearray(size)
        self.view = memoryview(self.buf)
        self.size = size
        self.max_payload = max_payload
        self.r = self.w = 0
        self.pinned = False
        self.on_spill = None

    def frame(self) -> tuple[int, int, int, int, int, wire.FrameHeader | None]:
        """(type, flags, length, arg, payload offset, header): ``header`` is the
        decoded :class:`wire.FrameHeader` for frames other than page runs."""
        if self.w - self.r < wire.HEADER.size:
            self._fill(wire.HEADER.size)
        r = self.r
        magic, ftype, flags, length, arg = wire.HEADER.unpack_from(self.buf, r)
        header = None
        if not (ftype == _PAGE_RUN and magic == wire.MAGIC and flags in _CAUSES and 0 < length <= self.max_payload):
            header = wire.decode_header(self.view[r:r + wire.HEADER.size], self.max_payload)  # or raises why
        end = wire.HEADER.size + length
        if self.w - r < end:
            self._fill(end)
            r = self.r
        self.r = r + end
        return ftype, flags, length, arg, r + wire.HEADER.size, header

    def _fill(self, n: int) -> None:
        """Make ``n`` bytes from :attr:`r` available, receiving as much as has arrived."""
        if self.r == self.w and not self.pinned:
            self.r = self.w = 0
        elif self.r + n > self.size:  # no room for this frame: move its start to the front
            if self.pinned:
                self.on_spill()
            rest = self.w - self.r
            self.buf[:rest] = self.buf[self.r:self.w]
            self.r, self.w = 0, rest
        while self.w - self.r < n:
            try:
                got = self.sock.recv_into(self.view[self.w:])
            except TimeoutError:
                raise
            except OSError as exc:
                raise ChannelClosed(f"receive failed: {exc}") from exc
            if not got:
                raise ChannelClosed("the primary closed the connection")
            self.w += got


class Standby:
    """Receives one primary's epochs and keeps the last complete one. Use :meth:`run`
    (or :meth:`bind` first to learn the port), then :meth:`failover` if you want the
    guest back (``run`` does it itself with ``config.failover``)."""

    def __init__(self, config: StandbyConfig, listener: socket.socket | None = None):
        self.config = config
        self.listener = listener
        self.committed: CommittedEpoch | None = None
        self.guest_info: dict = {}
        self.end_reason: str | None = None
        self.end_detail: str | None = None
        self.discarded: dict | None = None  # the partial epoch dropped at the end, if any
        self.failover_proc: subprocess.Popen | None = None
        self._failed_over = False
        self._tmpdir: str | None = None
        self._control: str | None = None
        self._backing: str | None = None
        self._image_fd: int | None = None
        self._image: mmap.mmap | None = None
        self._layout: wire.Layout | None = None
        self._apply_us: list[float] = []
        self._epoch_pages: list[int] = []
        self._initial_pages = 0
        self._epochs_applied = 0
        self.committed_event = threading.Event()  # set at every commit (tests, progress)

    # -- connection --------------------------------------------------------------------
    def bind(self) -> socket.socket:
        """Listen on the configured endpoint."""
        if self.listener is None:
            try:
                sock = listen_socket(self.config.listen)  # IPv4 or IPv6
            except OSError as exc:
                raise StandbyError(f"cannot listen on {self.config.listen[0]}:{self.config.listen[1]}: "
                                   f"{exc.strerror or exc}") from None
            self.listener = sock
        return self.listener

    def _accept(self) -> tuple[Channel, wire.Layout]:
        listener = self.bind()
        listener.settimeout(self.config.accept_timeout)
        try:
            sock, _ = listener.accept()
        except TimeoutError:
            raise StandbyError(f"no primary connected within {self.config.accept_timeout:g} s") from None
        sock.settimeout(self.config.timeout)
        tune(sock, urgent=False)
        channel = Channel(sock, "main")
        hello = wire.make_hello("dest", "main", os.sysconf("SC_PAGE_SIZE"))
        try:
            peer = handshake(channel, "server", self.config.key, hello)
        except (wire.ProtocolError, ChannelClosed, TimeoutError) as exc:
            channel.close()
            raise StandbyError(f"handshake with the primary failed: {exc}") from None
        layout = peer.layout
        if len(layout.regions) != 1 or layout.regions[0][0] != 0:
            channel.close()
            raise StandbyError(f"unsupported RAM layout {layout.regions}: one region from offset 0")
        return channel, layout

    # -- the image ---------------------------------------------------------------------
    def _make_image(self, layout: wire.Layout) -> None:
        size = layout.total_bytes
        self._image_fd = os.memfd_create("postcopy-standby-image", os.MFD_CLOEXEC)
        os.ftruncate(self._image_fd, size)
        self._image = mmap.mmap(self._image_fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._layout = layout

    def __enter__(self) -> "Standby":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def ram_size(self) -> int:
        return self._layout.total_bytes if self._layout else 0

    def close(self) -> None:
        """Release the image and stop a warm failover guest that was not used (a guest
        that took over keeps running, with its own copy of the RAM)."""
        proc = self.failover_proc
        if proc is not None and not self._failed_over:
            _kill(proc)
        if self._tmpdir is not None and (proc is None or proc.poll() is not None):
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None
        if self._image is not None:
            self._image.close()
            self._image = None
        if self._image_fd is not None:
            os.close(self._image_fd)
            self._image_fd = None
        if self.listener is not None:
            self.listener.close()
            self.listener = None

    # -- the run -------------------------------------------------------------------------
    def run(self) -> dict:
        """Receive epochs until the stream ends; fail over if configured and the
        primary is lost. Returns the figures. Raises :class:`StandbyError` if no
        primary connects or the handshake fails."""
        channel, layout = self._accept()
        self._make_image(layout)
        started = time.monotonic()
        cpu = _cpu_seconds()
        try:
            self._receive(channel)
        finally:
            channel.close()
        cpu = _cpu_seconds() - cpu
        figures = self.figures()
        figures["receive_s"] = round(time.monotonic() - started, 4)
        epochs = self._epochs_applied
        figures["cpu_us_per_epoch"] = round(cpu / epochs * 1e6, 1) if epochs else None
        if self.config.failover and PRIMARY_LOST.get(self.end_reason, False):
            if self.committed is None:
                figures["failover"] = {"error": "no complete epoch arrived: nothing to fail over from"}
            else:
                try:
                    figures["failover"] = self.failover()
                except StandbyError as exc:
                    figures["failover"] = {"error": str(exc)}
        return figures

    def _receive(self, channel: Channel) -> None:
        """The receive loop: stage, commit, acknowledge.

        A staged page run stays where it arrived, in the receive buffer (pinned), and
        is copied into the image at the epoch's marker: one copy per page. Only when
        the buffer needs the room before the marker (an epoch larger than the buffer)
        are the staged runs moved to the staging arena first."""
        sock = channel.sock
        reader = _FrameReader(sock)
        rview = reader.view
        image = memoryview(self._image)
        layout = self._layout
        ps = layout.page_size
        total_pages = layout.total_pages
        arena = bytearray(0)
        # (first page, npages, offset, in arena): in the receive buffer or the arena
        staged: list[tuple[int, int, int, bool]] = []
        counts = [0, 0]  # pages staged, arena bytes used

        def spill() -> None:
            need = counts[1] + sum(n for _, n, _, in_arena in staged if not in_arena) * ps
            if len(arena) < need:
                arena.extend(bytes(need - len(arena)))
            pos = counts[1]
            for i, (first, npages, off, in_arena) in enumerate(staged):
                if not in_arena:
                    length = npages * ps
                    arena[pos:pos + length] = rview[off:off + length]
                    staged[i] = (first, npages, pos, True)
                    pos += length
            counts[1] = pos
            reader.pinned = False

        reader.on_spill = spill
        staging = False  # False during the initial sync: pages go straight into the image
        expect = 0  # next epoch marker
        try:
            while True:
                kind, flags, length, first, off, header = reader.frame()
                if kind == _PAGE_RUN:
                    npages, rest = divmod(length, ps)
                    if rest or first + npages > total_pages:
                        raise wire.RangeError(f"PAGE_RUN of {length} bytes at page {first} is not whole pages "
                                              f"inside RAM ({total_pages} pages of {ps} bytes)")
                    if staging:
                        staged.append((first, npages, off, False))
                        reader.pinned = True
                        counts[0] += npages
                    else:
                        image[first * ps:(first + npages) * ps] = rview[off:off + length]
                        self._initial_pages += npages
                    continue
                payload = rview[off:off + length]
                if kind == wire.FrameType.SWITCHOVER:
                    info = wire.decode_payload(header, payload).info
                    epoch = info.get("epoch")
                    if epoch != expect:
                        raise wire.ProtocolError(f"epoch marker {epoch!r} where epoch {expect} was expected")
                    if epoch == 0:
                        self.guest_info = dict(info.get("guest") or {}, max_dirty=info.get("max_dirty"),
                                               steps_per_epoch=info.get("steps_per_epoch"))
                        staging = True
                        if self.config.failover:
                            self._prestart()
                    else:
                        if info.get("pages") != counts[0]:
                            raise wire.ProtocolError(f"epoch {epoch} announces {info.get('pages')} pages, "
                                                     f"{counts[0]} arrived")
                        t0 = time.perf_counter()
                        aview = memoryview(arena)
                        for first, npages, off, in_arena in staged:
                            src = aview if in_arena else rview
                            image[first * ps:(first + npages) * ps] = src[off:off + npages * ps]
                        aview.release()
                        steps = tuple(info.get("steps") or ())
                        self.committed = CommittedEpoch(epoch, steps, info.get("paused_ns"), counts[0])
                        self._apply_us.append((time.perf_counter() - t0) * 1e6)
                        self._epoch_pages.append(counts[0])
                        self._epochs_applied += 1
                        staged.clear()
                        counts[0] = counts[1] = 0
                        reader.pinned = False
                        sock.sendall(wire.Complete(info={"epoch": epoch, "steps": list(steps)}).encode())
                        self.committed_event.set()
                    expect += 1
                elif kind == wire.FrameType.PUSH_DONE:
                    self._end("primary-stopped", f"the primary stopped after epoch {first}")
                    break
                elif kind == wire.FrameType.ERROR:
                    self._end("primary-guest-lost", wire.decode_payload(header, payload).reason)
                    break
                elif kind == wire.FrameType.PING:
                    sock.sendall(wire.Pong(token=first).encode())
                else:
                    raise wire.ProtocolError(f"unexpected {header.type.name} frame in the checkpoint stream")
        except ChannelClosed as exc:
            self._end("connection-lost", str(exc))
        except TimeoutError:
            self._end("primary-silent", f"nothing from the primary for {self.config.timeout:g} s")
        except wire.ProtocolError as exc:
            self._end("protocol-error", str(exc))
            try:
                sock.sendall(wire.Error(wire.ErrorCode.PROTOCOL, str(exc)).encode())
            except OSError:
                pass
        except OSError as exc:  # sending an acknowledgement failed
            self._end("connection-lost", str(exc))
        finally:
            image.release()
        if staged:
            self.discarded = {"epoch": expect, "pages": counts[0]}

    def _end(self, reason: str, detail: str) -> None:
        self.end_reason, self.end_detail = reason, detail

    # -- figures ---------------------------------------------------------------------------
    def image_hash(self) -> str | None:
        """The guest RAM hash of the image (as the guest's ``hash`` command computes it),
        or None before the first complete epoch."""
        if self.committed is None or self._image is None:
            return None
        from postcopy._native import ffi, lib

        ram = ffi.from_buffer(self._image)
        return f"{lib.pc_guest_hash(ram, self.ram_size, self._layout.page_size, self._image_fd):016x}"

    def figures(self) -> dict:
        c = self.committed
        return {
            "role": "standby",
            "end_reason": self.end_reason,
            "end_detail": self.end_detail,
            "primary_lost": PRIMARY_LOST.get(self.end_reason, False),
            "ram_bytes": self.ram_size,
            "guest": self.guest_info,
            "committed_epoch": c.epoch if c else None,
            "committed_steps": list(c.steps) if c else None,
            "committed_paused_ns": c.paused_ns if c else None,
            "epochs_applied": self._epochs_applied,
            "initial_pages": self._initial_pages,
            "epoch_pages": report.latency_summary(self._epoch_pages),
            "apply_us": report.latency_summary(self._apply_us),
            "discarded_partial_epoch": self.discarded,
            "image_hash": self.image_hash(),
        }

    # -- failover ----------------------------------------------------------------------------
    def _prestart(self) -> None:
        """Start the incoming guest that a failover would fill (warm standby): it costs
        an idle process, and saves its start-up (an interpreter and its imports) from
        the failover time. Called once the RAM layout and the primary's backing are known."""
        if self.failover_proc is not None:
            return
        cfg = self.config
        self._backing = cfg.backing or self.guest_info.get("backing") or "memfd"
        if cfg.guest_control is None:
            self._tmpdir = tempfile.mkdtemp(prefix="postcopy-standby-", dir=cfg.workdir)
        self._control = cfg.guest_control or os.path.join(self._tmpdir, "guest.sock")
        argv = [sys.executable, "-m", "postcopy", "guest", "--incoming", "--ram", str(self.ram_size),
                "--backing", self._backing, "--control", self._control]
        self.failover_proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def failover(self) -> dict:
        """Start a guest from the last complete epoch: the incoming guest (started
        already if ``config.failover``) gets the image with UFFDIO_COPY, then the range
        is unregistered (untouched pages read as zero) and the guest resumed. With
        ``wait_guest`` this waits for the guest to finish and returns its final hash."""
        from postcopy.kernel.uffd import Feature, UffdError, Userfaultfd

        if self.committed is None:
            raise StandbyError("no complete epoch to fail over from")
        t0 = time.monotonic()
        self._prestart()
        proc = self.failover_proc
        try:
            wait_for_control(self._control, timeout=120, proc=proc)  # a busy host starts Python slowly
            with GuestClient(self._control) as client:
                info, fds = client.take_fds(incoming=True)
                if "memfd" in fds:
                    os.close(fds["memfd"])
                uffd = Userfaultfd.from_fd(fds["uffd"], Feature(info.get("uffd_features", 0)))
                try:
                    pages = self._install(uffd, info["ram_address"])
                    uffd.unregister(info["ram_address"], self.ram_size)
                finally:
                    uffd.close()
                client.resume()
            resumed = time.monotonic()
        except (GuestError, UffdError, OSError) as exc:
            _kill(proc)
            raise StandbyError(f"failover failed: {exc}") from None
        self._failed_over = True
        result = {"epoch": self.committed.epoch, "steps": list(self.committed.steps), "backing": self._backing,
                  "pages_installed": pages, "failover_ms": round((resumed - t0) * 1e3, 3),
                  "guest_pid": proc.pid, "control": self._control if self.config.guest_control else None}
        if not self.config.wait_guest:
            return result
        try:
            out, err = proc.communicate()
        except BaseException:
            _kill(proc)
            raise
        result["guest_exit_code"] = proc.returncode
        try:
            result["final_hash"] = parse_final_hash(out)
        except GuestError:
            result["final_hash"] = None
            result["guest_stderr"] = err.strip()[-2000:]
        return result

    def _install(self, uffd, base: int) -> int:
        """UFFDIO_COPY every data extent of the image into the guest at ``base``."""
        from postcopy.kernel.uffd import address_of

        src = address_of(self._image)
        pages = 0
        ps = self._layout.page_size
        for first, count in _data_extents(self._image_fd, self.ram_size, ps):
            done, length = 0, count * ps
            off = first * ps
            while done < length:
                done += uffd.copy(base + off + done, src + off + done, length - done)
            pages += count
        return pages


def _data_extents(fd: int, size: int, page_size: int) -> list[tuple[int, int]]:
    """Runs (first_page, npages) of a file's data (SEEK_DATA / SEEK_HOLE)."""
    pos, runs = 0, []
    while pos < size:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                break
            raise
        if data >= size:
            break
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), size)
        runs.append((data // page_size, (hole - data) // page_size))
        pos = hole
    return runs


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.communicate()


def reference_hash_at(params: GuestParams, steps: int, workdir: str, timeout: float = 120.0) -> str:
    """The RAM hash of the same guest run without checkpointing, parked when every vCPU
    has done exactly ``steps`` steps (what a standby image of an epoch at that step
    count must hash to). ``workdir`` holds the reference guest's control socket."""
    from postcopy.guest import reference_hash

    params = dataclasses.replace(params, rate=0)
    if params.steps is not None and steps >= params.steps:
        return reference_hash(params, timeout=timeout)
    control = os.path.join(workdir, f"reference-{os.getpid()}-{steps}.sock")
    proc = subprocess.Popen(params.argv(control=control, pause_at=steps) if steps > 0 else
                            params.argv(control=control, start_paused=True),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_control(control, timeout=120, proc=proc)
        with GuestClient(control, timeout=timeout) as client:
            deadline = time.monotonic() + timeout
            while (status := client.status())["state"] != "paused" or min(status["steps"]) < steps:
                if time.monotonic() > deadline:
                    raise GuestError(f"reference guest did not reach step {steps}: {status}")
                time.sleep(0.005)
            value = client.hash()
            client.quit()
        proc.wait(timeout=10)
        return value
    finally:
        if proc.poll() is None:
            _kill(proc)
        elif proc.stderr is not None:
            proc.stderr.close()
