"""Continuous checkpointing, Remus style: the standby side.

The standby holds a copy of the primary guest's RAM in a memfd of its own and applies
the primary's epochs to it (:mod:`postcopy.checkpoint.primary` sends them). An epoch is applied
only once all of it has arrived: its pages are staged in a buffer as they come and
copied into the image when the epoch's commit arrives, then acknowledged. So the image
is always exactly the last complete epoch: a connection cut in the middle of an epoch
leaves the staged half unapplied (it is counted and dropped). From epoch 1 on the
whole epoch is received, verified, staged, applied and acknowledged in C
(:mod:`postcopy.checkpoint.standbyloop`; every frame checked as the decoder checks it,
anything else left to the decoder and handled here); with ``native_loop`` off, only the
page runs are (:mod:`postcopy.checkpoint.epochstage`) and the rest runs in Python.

When the primary is lost (connection closed or broken, silent for ``timeout`` seconds
between epochs (within one too in the C loop; the Python loop leaves a dead link within
an epoch to its keepalive, :data:`postcopy.protocol.channel.LINK_TIMEOUT_S`), or the
primary reports that its guest died) the standby can fail over: it starts an
incoming guest (``postcopy guest --incoming``), installs the image into it with
UFFDIO_COPY (as the destination agent installs migrated pages), unregisters the range
so untouched pages read as zero, and resumes it. The guest continues from the step
count of the last complete epoch. Like Remus, the standby cannot tell a dead primary
host from a cut link: failing over after a mere network split leaves two guests
running (fencing is outside this tool).

Epoch protocol, on one authenticated :mod:`postcopy.protocol.wire` connection (the primary is
the client with role "primary", the standby the server with role "standby", channel
"main"; page numbers are page indexes in RAM; the checkpoint table of
:mod:`postcopy.protocol.state` refuses anything else)::

    primary -> standby
      PageRun(cause PRECOPY)*   initial sync: every populated page (epoch 0)
      EpochCommit {"epoch": 0, "initial": true, "pages": N, "guest": {...},
                   "max_dirty": B, "steps_per_epoch": S}
      for n = 1, 2, ...:
        EpochBegin(n)
        PageRun(cause RESENT)*  the pages dirtied in epoch n, the state page included
        EpochCommit {"epoch": n, "pages": N, "runs": R, "steps": [...], "paused_ns": T}
      Ping(token)               heartbeat during a long epoch
      CheckpointEnd(n)          clean end: the primary stopped (its guest runs on there)
      Error(code, reason)       the primary lost its guest
    standby -> primary
      EpochAck {"epoch": n, "steps": [...]}   epoch n is applied: it is committed
      Pong(token)                              heartbeat answer
      Error(code, reason)                      the standby gives up

Epoch 0 is written straight into the image (there is no complete epoch to protect
yet); epoch 1 is the first consistent image, because the primary's dirty log was
armed before the initial sync read any page.
"""
from __future__ import annotations

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
from postcopy._native import ffi, lib
from postcopy.checkpoint.epochstage import EpochStage
from postcopy.checkpoint.standbyloop import NativeStandbyLoop

from postcopy.protocol import wire
from postcopy.guest.control import GuestClient, GuestError, parse_final_hash, wait_for_control
from postcopy.protocol.endpoint import listen_socket
from postcopy.protocol.channel import Channel, ChannelClosed
from postcopy.migration.listener import AcceptTimeout, Listener

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
    native_loop: bool = True  # epochs 1 on received in C (native/ckpt_standby.c); False: in Python


@dataclass(frozen=True)
class CommittedEpoch:
    """The epoch the image holds."""

    epoch: int
    steps: tuple[int, ...]
    paused_ns: int | None
    pages: int


class Standby:
    """Receives one primary's epochs and keeps the last complete one. Use :meth:`run`
    (or :meth:`bind` first to learn the port), then :meth:`failover` if you want the
    guest back (``run`` does it itself with ``config.failover``)."""

    def __init__(self, config: StandbyConfig, listener: socket.socket | None = None):
        self.config = config
        self.listener = listener
        self._acceptor: Listener | None = None  # authenticates connections, from bind on
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
        """Listen on the configured endpoint; from then on connections are accepted and
        authenticated in the background (a stranger is dropped, a second primary told
        "busy": neither can stop the standby; :mod:`postcopy.migration.listener`)."""
        if self.listener is None:
            try:
                self.listener = listen_socket(self.config.listen)  # IPv4 or IPv6
            except OSError as exc:
                raise StandbyError(f"cannot listen on {self.config.listen[0]}:{self.config.listen[1]}: "
                                   f"{exc.strerror or exc}") from None
        if self._acceptor is None:
            self._acceptor = Listener(self.listener, self.config.key, protocol=wire.Session(wire.CHECKPOINT, "standby"),
                                      role="standby")
        return self.listener

    def _accept(self) -> tuple[Channel, wire.Layout]:
        self.bind()
        try:
            channel, peer = self._acceptor.accept("main", None, self.config.accept_timeout)
        except AcceptTimeout:
            raise StandbyError(f"no primary connected within {self.config.accept_timeout:g} s") from None
        channel.sock.settimeout(self.config.timeout)
        layout = peer.layout
        if len(layout.regions) != 1 or layout.regions[0][0] != 0:
            channel.close()
            raise StandbyError(f"unsupported RAM layout {layout.regions}: one region from offset 0")
        channel.session.established()
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
        if self._acceptor is not None:
            self._acceptor.close()  # closes the listening socket too
            self._acceptor = None
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
        """The receive loop: stage, commit, acknowledge. Runs of epoch 0 go straight
        into the image; a later epoch's runs are staged (received by C right after its
        EpochBegin) and copied into the image at the epoch's commit."""
        image = memoryview(self._image)
        image_ptr = ffi.from_buffer("uint8_t[]", self._image)
        ps = self._layout.page_size
        stage = EpochStage(self._layout)
        loop = (NativeStandbyLoop(self._layout, stage, image_ptr, self.config.timeout)
                if self.config.native_loop else None)
        expect = 0  # next epoch
        in_epoch = False  # between an EpochBegin and its commit
        try:
            while True:
                if loop is not None and expect > 0:  # C takes the epochs; Python what it leaves
                    rc = loop.run(channel, expect, in_epoch)
                    expect, in_epoch = loop.expect, loop.in_epoch
                    self._native_commits(loop)
                    if rc in (lib.PC_CKPT_STANDBY_LOG_FULL, lib.PC_CKPT_STANDBY_YIELD):
                        continue
                    if rc == lib.PC_CKPT_STANDBY_CLOSED:
                        raise ChannelClosed(f"{channel.name}: the peer closed the connection")
                    if rc == lib.PC_CKPT_STANDBY_SILENT:
                        raise TimeoutError
                    if rc == -errno.ENOMEM:  # as the Python loop's stage: no failover from a standby that broke
                        raise MemoryError("no memory to stage an epoch")
                    if rc < 0:
                        raise ChannelClosed(f"{channel.name}: epoch loop failed: {os.strerror(-rc)}")
                message = channel.recv()
                if isinstance(message, wire.PageRun):
                    first, npages = message.first_page, message.npages
                    if expect == 0:
                        image[first * ps:(first + npages) * ps] = message.data
                        self._initial_pages += npages
                    else:  # one C did not take (it takes every valid one: not expected)
                        stage.add(first, npages, message.data)
                elif isinstance(message, wire.EpochBegin):
                    if message.epoch != expect:
                        raise wire.ProtocolError(f"epoch {message.epoch} begins where epoch {expect} was expected")
                    in_epoch = True
                    stage.receive(channel)
                elif isinstance(message, wire.EpochCommit):
                    self._commit(channel, message.info, expect, stage, image_ptr)
                    stage.clear()
                    expect += 1
                    in_epoch = False
                elif isinstance(message, wire.CheckpointEnd):
                    self._end("primary-stopped", f"the primary stopped after epoch {message.epoch}")
                    break
                elif isinstance(message, wire.Error):
                    self._end("primary-guest-lost", message.reason)
                    break
                elif isinstance(message, wire.Ping):
                    channel.send(wire.Pong(token=message.token))
                    if in_epoch:  # the epoch's other runs, in C again
                        stage.receive(channel)
        except ChannelClosed as exc:
            self._end("connection-lost", str(exc))
        except TimeoutError:
            self._end("primary-silent", f"nothing from the primary for {self.config.timeout:g} s")
        except wire.ProtocolError as exc:
            self._end("protocol-error", str(exc))
            try:
                channel.send(wire.Error(wire.ErrorCode.PROTOCOL, str(exc)))
            except (ChannelClosed, wire.ProtocolError):
                pass
        finally:
            image.release()
            del image_ptr
        if stage.nruns:
            self.discarded = {"epoch": expect, "pages": stage.pages}

    def _commit(self, channel: Channel, info: dict, expect: int, stage: EpochStage, image) -> None:
        """Epoch ``expect`` is whole: apply what was staged and acknowledge it (epoch 0,
        the initial sync, is already in the image)."""
        epoch = info.get("epoch")
        if epoch != expect:
            raise wire.ProtocolError(f"epoch {epoch!r} committed where epoch {expect} was expected")
        if epoch == 0:
            self.guest_info = dict(info.get("guest") or {}, max_dirty=info.get("max_dirty"),
                                   steps_per_epoch=info.get("steps_per_epoch"))
            if self.config.failover:
                self._prestart()
            return
        pages = stage.pages
        if info.get("pages") != pages:
            raise wire.ProtocolError(f"epoch {epoch} announces {info.get('pages')} pages, {pages} arrived")
        t0 = time.perf_counter()
        stage.apply(image)
        steps = tuple(info.get("steps") or ())
        self.committed = CommittedEpoch(epoch, steps, info.get("paused_ns"), pages)
        self._apply_us.append((time.perf_counter() - t0) * 1e6)
        self._epoch_pages.append(pages)
        self._epochs_applied += 1
        channel.send(wire.EpochAck(info={"epoch": epoch, "steps": list(steps)}))
        self.committed_event.set()

    def _native_commits(self, loop: NativeStandbyLoop) -> None:
        """The epochs the native loop applied and acknowledged, into the figures."""
        applied = len(self._epoch_pages)
        last = loop.drain(self._epoch_pages, self._apply_us)
        if last is not None:
            self._epochs_applied += len(self._epoch_pages) - applied
            epoch, pages, paused_ns, steps = last
            self.committed = CommittedEpoch(epoch, steps, paused_ns, pages)
            self.committed_event.set()

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
            wait_for_control(self._control, proc=proc)
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
