"""Continuous checkpointing, Remus style: the primary side.

The primary agent attaches to a running guest and keeps a standby copy of its RAM up to
date on a standby agent (:mod:`postcopy.checkpoint.standby`), in epochs::

    guest parked -> harvest the dirty log -> send the dirty pages + epoch marker
                 -> resume the guest until the next epoch ends -> guest parked -> ...

The standby applies an epoch only once all of it has arrived and then acknowledges it;
its acknowledgement is what commits the epoch. The primary does not wait for it before
resuming the guest (at most ``max_unacked`` epochs may be outstanding; 0 makes every
epoch synchronous, as Remus does before releasing output).

**Bound on dirty pages per epoch.** An epoch ends when the guest has done a step budget
computed from the bound: every step of every workload writes at most one page of its
vCPU's slice (plus, with free pages, up to 3 pages every ``PC_GUEST_FREE_PERIOD`` steps),
and the state page is written by every step. The guest parks itself at that exact step
count (the ``run`` control command: N more steps, then park; with pagemap-scan it also
harvests its dirty log there, into the reply), so the bound holds without harvesting
while the guest runs, and "pause early when the bound is reached" costs nothing. The report
gives the dirty pages actually measured per epoch (and how many epochs exceeded the
bound, which only an unforeseen workload could do). Optionally an epoch also ends after
``interval_ms`` (a ``pause`` from a second control connection), whichever comes first.

**Consistency.** Each epoch is the RAM at one step boundary: the dirty pages are
copied while the guest is parked, either into the socket (``sendmsg`` copies; unlike
``sendfile``, whose pages could change under the guest after it resumes) or, with
``overlap``, into an epoch buffer that is sent while the guest runs the next epoch.
The run request and its reply are split for that (:class:`_ControlLine`), so the
agent works while the guest runs. The first epoch is preceded by
an initial sync of every populated page (epoch 0, sent while the guest runs, never a
commit point on its own): the dirty log is started before it, so epoch 1 resends
everything written meanwhile and is the first consistent image.

The wire protocol is :mod:`postcopy.protocol.wire`'s; the epoch messages are described in
:mod:`postcopy.checkpoint.standby`.
"""
from __future__ import annotations

import errno
import json
import math
import mmap
import os
import resource
import select
import socket
import threading
import time
from dataclasses import dataclass
from typing import Callable

from postcopy import ranges

from postcopy import report

from postcopy.protocol import wire
from postcopy.kernel.dirtylog import DirtyLogUnavailable, open_dirty_log
from postcopy.guest.control import GuestClient, GuestError
from postcopy.guest.dirtytrack import decode_runs
from postcopy.migration.guestmem import GuestMemory
from postcopy.protocol.channel import Channel, ChannelClosed, handshake, tune
from postcopy.protocol.wire import MAX_RUN_BYTES

try:  # the guest's free-page swap period (pages written besides the step's own)
    from postcopy._native import lib as _lib

    FREE_PERIOD = int(_lib.PC_GUEST_FREE_PERIOD)
except (ImportError, AttributeError):  # pragma: no cover - the native helper is built at install
    FREE_PERIOD = 256

FREE_SWAP_PAGES = 3  # a free/reuse swap writes two page-table entries and zero-fills a page


class CheckpointError(RuntimeError):
    """Checkpointing could not start (guest, dirty log, standby); the message says why."""


@dataclass
class CheckpointConfig:
    """What ``postcopy checkpoint`` does; see the module docstring."""

    guest_control: str
    endpoint: tuple[str, int]
    key: bytes
    max_dirty: int = 256  # bound on pages dirtied per epoch
    epochs: int | None = None  # stop after this many epochs (None: no limit)
    seconds: float | None = None  # stop after this long in the epoch loop
    interval_ms: float | None = None  # also end an epoch after this long
    max_unacked: int = 4  # epochs sent but not yet acknowledged before the guest may run on
    # Send an epoch while the guest runs the next (its pages copied into a buffer first)
    # instead of while it is parked. Pays with spare cores; on 2 cores the copy and the
    # competition with the running guest cost more than they hide.
    overlap: bool = False
    dirty_log: str = "auto"
    run_pages: int = 256  # pages per frame of the initial sync
    connect_timeout: float = 15.0
    ack_timeout: float = 30.0  # how long to wait for the standby's acknowledgements at the end
    heartbeat: float = 1.0  # seconds between Pings to the standby while an epoch runs long
    # Fault injection for tests: after this many epochs, send half of the next one and
    # drop the connection (the standby must keep the previous epoch).
    cut_mid_epoch: int | None = None
    on_commit: Callable[[int, list[int]], None] | None = None  # (epoch, steps) per ack


def steps_per_epoch(max_dirty: int, threads: int, free_fraction: float = 0.0) -> int:
    """Steps per vCPU per epoch such that an epoch dirties at most ``max_dirty`` pages:
    the state page, one page per step and vCPU, and with free pages up to
    FREE_SWAP_PAGES more every FREE_PERIOD steps. At least 1 (a bound below
    ``threads + 1`` cannot be met: :func:`bound_problem` says so)."""
    room = (max_dirty - 1) // max(1, threads)
    steps = max(1, room)
    if free_fraction > 0:
        while steps > 1 and steps + FREE_SWAP_PAGES * math.ceil(steps / FREE_PERIOD) > room:
            steps -= 1
    return steps


def bound_problem(max_dirty: int, threads: int, free_fraction: float = 0.0) -> str | None:
    """Why ``max_dirty`` cannot be guaranteed for this guest, or None."""
    worst = 1 + threads * (1 + (FREE_SWAP_PAGES if free_fraction > 0 else 0))
    if max_dirty < worst:
        return (f"--max-dirty {max_dirty} is below what one step of {threads} vCPU(s) can dirty "
                f"({worst} pages with the state page)")
    return None


class _ControlLine:
    """The guest's control protocol (one JSON object per line each way, see
    :mod:`postcopy.guest.control`) with request and reply split, so the agent can send
    the previous epoch while the guest runs the next one."""

    def __init__(self, path: str, timeout: float = 60.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except OSError as exc:
            self.sock.close()
            raise GuestError(f"cannot reach guest control socket {path}: {exc.strerror or exc}") from None
        self.rfile = self.sock.makefile("rb")
        self.path = path

    def send(self, cmd: str, **fields) -> None:
        try:
            self.sock.sendall((json.dumps({"cmd": cmd, **fields}, separators=(",", ":")) + "\n").encode())
        except OSError as exc:
            raise GuestError(f"guest {self.path}: {cmd}: {exc}") from None

    def reply(self, cmd: str) -> dict:
        try:
            line = self.rfile.readline()
        except OSError as exc:
            raise GuestError(f"guest {self.path}: {cmd}: {exc}") from None
        if not line:
            raise GuestError(f"guest {self.path}: {cmd}: the guest closed the connection")
        reply = json.loads(line)
        if not reply.get("ok"):
            raise GuestError(f"guest {cmd}: {reply.get('error', 'failed')}")
        return reply

    def close(self) -> None:
        self.rfile.close()
        self.sock.close()


class _EpochRunner:
    """Lets the parked guest run one epoch: :meth:`start` sends ``run`` and returns
    at once, :meth:`wait` returns its reply, which comes only once every vCPU is parked
    again, so nothing is harvested while the guest runs.

    With an interval, :meth:`wait` pauses the guest (from the main control connection)
    when the interval is over before the step budget; the run reply follows."""

    def __init__(self, control: str, client: GuestClient, interval_ms: float | None):
        self.client = client
        self.interval = None if interval_ms is None else interval_ms / 1e3
        self.interval_pauses = 0
        self.line = _ControlLine(control)
        self.pending = False  # a run awaits its reply
        self._started = 0.0

    def start(self, steps: int, harvest: bool) -> None:
        """Every vCPU does exactly ``steps`` more steps and parks; with ``harvest`` the
        guest harvests its dirty log at the park, into the reply."""
        self._started = time.monotonic()
        self.line.send("run", steps=steps, harvest=harvest)
        self.pending = True

    def wait(self, heartbeat: Callable[[], None], every: float) -> dict:
        """The run reply; ``heartbeat`` is called every ``every`` seconds while the
        guest runs (a long epoch must not look like a dead primary to the standby)."""
        sock = self.line.sock
        interval_end = None if self.interval is None else self._started + self.interval
        beat = self._started + every
        # One request is outstanding and every reply was read whole: the socket turns
        # readable exactly when this one's reply arrives.
        while True:
            now = time.monotonic()
            until = beat if interval_end is None else min(beat, interval_end)
            if select.select([sock], [], [], max(0.0, until - now))[0]:
                break
            now = time.monotonic()
            if interval_end is not None and now >= interval_end:
                self.client.pause()  # the interval ended first: the run reply follows
                self.interval_pauses += 1
                interval_end = None
            if now >= beat:
                heartbeat()
                beat = now + every
        reply = self.line.reply("run")
        self.pending = False
        return reply

    def settle(self) -> None:
        """After a failure between start and wait: park the guest and take the reply."""
        if self.pending:
            self.pending = False
            try:
                self.client.pause()
                self.line.reply("run")
            except (GuestError, ValueError):
                pass

    def close(self) -> None:
        self.line.close()


class _EpochLog:
    """Per-epoch figures in flat lists (appending floats is all the loop does)."""

    def __init__(self) -> None:
        self.dirty_pages: list[int] = []
        self.runs: list[int] = []
        self.pause_us: list[float] = []  # guest parked -> resume requested
        self.run_us: list[float] = []  # resume requested -> parked again (includes the guest's steps)
        self.harvest_us: list[float] = []
        self.collect_us: list[float] = []  # the epoch's frames built (with overlap: pages copied)
        self.send_us: list[float] = []  # the epoch buffer into the socket (guest running)
        self.ack_us: list[float] = []  # acknowledgement handling before resuming
        self.commit_ms: list[float] = []  # marker sent -> acknowledgement read
        self.steps: list[int] = []  # steps per vCPU of the first vCPU at each epoch


def _summary(values: list[float], digits: int = 3) -> dict:
    s = report.latency_summary(values)
    out = {k: (round(v, digits) if isinstance(v, float) else v) for k, v in s.items()}
    out["mean"] = round(sum(values) / len(values), digits) if values else None
    return out


class Checkpointer:
    """Checkpoints one guest to one standby. Use :meth:`run`."""

    def __init__(self, config: CheckpointConfig):
        if config.max_dirty < 2:
            raise ValueError("max_dirty must be at least 2 (the state page and one written page)")
        if config.max_unacked < 0:
            raise ValueError("max_unacked must be >= 0")
        self.config = config
        self.log = _EpochLog()
        self.epoch = 0  # last epoch sent
        self.acked = 0  # last epoch acknowledged by the standby (committed)
        self.bytes_sent = 0
        self._marker_sent_ns: dict[int, int] = {}
        self._stop = threading.Event()
        self._channel: Channel | None = None
        self._sock: socket.socket | None = None
        self._poll: select.poll | None = None
        self._map: mmap.mmap | None = None
        self._view: memoryview | None = None
        self._scratch: bytearray | None = None
        self._cpu_start: float | None = None
        self._buffer = bytearray(MAX_RUN_BYTES)  # the epoch's pages, copied while the guest is parked
        self._buffer_view: memoryview | None = memoryview(self._buffer)

    def stop(self) -> None:
        """Ask :meth:`run` to end after the current epoch (thread safe)."""
        self._stop.set()

    # -- connection ------------------------------------------------------------------
    def _connect(self, mem: GuestMemory, socket_factory: Callable[[], socket.socket] | None) -> Channel:
        """Connect (retrying while the standby is not listening yet) and authenticate."""
        cfg = self.config
        factory = socket_factory or (lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))
        deadline = time.monotonic() + cfg.connect_timeout
        while True:
            s = factory()
            try:
                s.settimeout(cfg.connect_timeout)
                s.connect(cfg.endpoint)
                break
            except OSError as exc:
                s.close()
                if time.monotonic() > deadline:
                    raise CheckpointError(f"cannot reach the standby at {cfg.endpoint[0]}:{cfg.endpoint[1]}: "
                                          f"{exc}") from None
                time.sleep(0.05)
        s.settimeout(None)
        tune(s, urgent=False)
        channel = Channel(s, "main", mem.layout, wire.Session(wire.CHECKPOINT, "primary"))
        hello = wire.make_hello("primary", "main", mem.page_size, mem.layout.regions)
        try:
            handshake(channel, "client", cfg.key, hello)
        except (wire.ProtocolError, ChannelClosed) as exc:
            channel.close()
            raise CheckpointError(f"handshake with the standby failed: {exc}") from None
        channel.session.established()
        self._sock = s
        self._poll = select.poll()
        self._poll.register(s, select.POLLIN)
        return channel

    # -- the run ----------------------------------------------------------------------
    def run(self, socket_factory: Callable[[], socket.socket] | None = None) -> dict:
        """Checkpoint until the epoch or time limit, :meth:`stop`, the guest finishing
        or something failing; returns the figures (``end_reason`` says why it ended,
        ``ok`` whether that was a clean end). Raises :class:`CheckpointError` if it
        cannot start. ``socket_factory`` makes the (unconnected) socket to use, e.g. one
        inside a network namespace.

        On a clean end the guest is left as it was found (running or paused); if the
        standby is lost the guest goes on unprotected; if the guest is lost the standby
        is told so it can fail over."""
        cfg = self.config
        try:
            guest = GuestClient(cfg.guest_control)
        except GuestError as exc:
            raise CheckpointError(str(exc)) from None
        mem = dirty = runner = None
        try:
            try:
                info, fds = guest.take_fds()
                status = guest.status()
            except GuestError as exc:
                raise CheckpointError(f"cannot attach to the guest: {exc}") from None
            if status["state"] not in ("running", "paused"):
                for fd in fds.values():
                    os.close(fd)
                raise CheckpointError(f"the guest is {status['state']}: only a running or paused guest "
                                      f"can be checkpointed")
            mem = GuestMemory(info, fds)
            threads = status["threads"]
            free_fraction = status.get("free_fraction") or 0.0
            problem = bound_problem(cfg.max_dirty, threads, free_fraction)
            if problem:
                raise CheckpointError(problem)
            budget = steps_per_epoch(cfg.max_dirty, threads, free_fraction)
            try:
                dirty = open_dirty_log(cfg.dirty_log, guest, info)
            except DirtyLogUnavailable as exc:
                raise CheckpointError(str(exc)) from None
            self._channel = self._connect(mem, socket_factory)
            self._prepare_reader(mem)
            try:
                runner = _EpochRunner(cfg.guest_control, guest, cfg.interval_ms)
            except GuestError as exc:
                raise CheckpointError(f"cannot open a second control connection: {exc}") from None
            return self._run(guest, mem, dirty, runner, status, budget)
        finally:
            if runner is not None:
                runner.close()
            if dirty is not None:
                dirty.stop()
            if self._channel is not None:
                self._close_channel()
            self._view = None
            if self._map is not None:
                try:
                    self._map.close()
                except BufferError:  # a view still referenced by a traceback: the GC unmaps it
                    pass
            if mem is not None:
                mem.close()
            guest.close()

    def _prepare_reader(self, mem: GuestMemory) -> None:
        """memfd RAM is read through a read-only shared mapping (sendmsg copies from it);
        anonymous RAM through /proc/PID/mem into a scratch buffer."""
        if mem.memfd is not None:
            self._map = mmap.mmap(mem.memfd, mem.size, mmap.MAP_SHARED, mmap.PROT_READ)
            self._view = memoryview(self._map)
        else:
            self._scratch = bytearray(MAX_RUN_BYTES)

    def _run(self, guest: GuestClient, mem: GuestMemory, dirty, runner: _EpochRunner,
             status: dict, budget: int) -> dict:
        cfg = self.config
        was_running = status["state"] == "running"
        started = time.monotonic()
        end_reason, ok, error = "stopped", True, None
        paused_by_us = False
        sync = {}
        loop_started = loop_ended = None
        try:
            # Epoch 0: every populated page, while the guest runs (dirty log armed first).
            dirty.start()
            t0 = time.perf_counter()
            sync_pages = self._initial_sync(mem)
            self._send([wire.EpochCommit(info={
                "epoch": 0, "initial": True, "pages": sync_pages,
                "guest": {k: status.get(k) for k in ("threads", "workload", "steps_target", "backing",
                                                     "ram_size", "free_fraction", "seed")},
                "max_dirty": cfg.max_dirty, "steps_per_epoch": budget})])
            sync = {"pages": sync_pages, "ms": round((time.perf_counter() - t0) * 1e3, 3)}
            try:
                parked = guest.pause()
                if min(parked["steps"]) < max(parked["steps"]):
                    # vCPUs park wherever the pause finds them: level them (part of the
                    # catch-up epoch 1) so that every later epoch's budget holds per vCPU.
                    parked = guest.run_until(max(parked["steps"]))
            except GuestError as exc:
                raise _GuestLost(exc) from None
            paused_by_us = was_running
            loop_started = time.monotonic()
            self._cpu_start = _cpu_seconds()
            end_reason, ok, error = self._loop(mem, dirty, runner, parked, budget, loop_started)
            loop_ended = time.monotonic()
        except _GuestLost as exc:
            end_reason, ok, error = "guest-lost", False, str(exc.cause)
            self._tell_standby(wire.Error(wire.ErrorCode.ABORTED, f"primary guest lost: {exc.cause}"))
        except (ChannelClosed, wire.ProtocolError, _StandbyError) as exc:
            end_reason, ok, error = "standby-lost", False, str(exc)
        except KeyboardInterrupt:
            # A forced stop (the CLI turns the first SIGINT/SIGTERM into stop()): the
            # stream may end mid-frame, so the standby sees the primary vanish.
            end_reason, ok, error = "interrupted", False, "interrupted"
        cpu = _cpu_seconds() - self._cpu_start if self._cpu_start is not None else None
        if loop_ended is None:
            loop_ended = time.monotonic()
            if end_reason != "guest-lost":
                runner.settle()
        if error is not None and end_reason in ("stopped", "epochs", "seconds", "guest-finished"):
            ok = False  # a clean end whose last epochs were not acknowledged
        if end_reason not in ("guest-lost", "guest-finished") and paused_by_us:
            try:  # leave the guest as we found it: running (unprotected from now on)
                if guest.status()["state"] == "paused":
                    guest.resume()
            except GuestError as exc:
                error = error or f"could not resume the guest: {exc}"
        figures = self._figures(mem, dirty, runner, status, budget, sync, started, loop_started, loop_ended)
        figures.update(end_reason=end_reason, ok=ok, error=error,
                       cpu_us_per_epoch=round(cpu / self.epoch * 1e6, 1) if cpu is not None and self.epoch else None)
        return figures

    def _close_channel(self) -> None:
        """Close after reading what the standby still sends (acknowledgements) up to its
        end of stream: closing with unread data would reset the connection, and a reset
        can discard our last frames (an Error) before the standby reads them."""
        sock = self._sock
        if sock is not None and sock.fileno() >= 0:
            try:
                sock.shutdown(socket.SHUT_WR)
                sock.settimeout(2.0)
                while sock.recv(65536):
                    pass
            except OSError:
                pass
        self._channel.close()

    def _heartbeat(self) -> None:
        """A Ping during a long epoch (the standby answers with a Pong, read with the
        acknowledgements)."""
        self._send([wire.Ping(token=self.epoch)])

    def _tell_standby(self, message) -> None:
        try:
            self._send([message])
        except (ChannelClosed, OSError, wire.ProtocolError):
            pass

    # -- epoch 0 ------------------------------------------------------------------------
    def _initial_sync(self, mem: GuestMemory) -> int:
        """Send every populated page (sendfile for memfd RAM: these pages need not be
        stable, whatever changes is in epoch 1's dirty set). Returns the pages sent."""
        pages = 0
        run_pages = min(self.config.run_pages, MAX_RUN_BYTES // mem.page_size)
        channel = self._channel
        before = channel.bytes_sent
        try:
            for first, count in ranges.split(mem.populated_extents(), run_pages):
                mem.send_run(channel, first, count, wire.Cause.PRECOPY, self._scratch)
                pages += count
        finally:
            self.bytes_sent += channel.bytes_sent - before
        return pages

    # -- the epoch loop ---------------------------------------------------------------
    def _loop(self, mem: GuestMemory, dirty, runner: _EpochRunner, parked: dict, budget: int,
              loop_started: float) -> tuple[str, bool, str | None]:
        """Epochs until a stop condition. While the guest is parked: harvest, send the
        dirty pages and the marker, read the acknowledgements that arrived (waiting if
        more than max_unacked are outstanding; 0: this epoch's), let the guest run.
        With ``overlap`` the pages are copied into the epoch buffer instead and sent
        while the guest runs."""
        cfg, log = self.config, self.log
        perf, mono_ns = time.perf_counter, time.monotonic_ns
        deadline = None if cfg.seconds is None else loop_started + cfg.seconds
        synchronous = cfg.max_unacked == 0
        # pagemap-scan: the guest harvests at the park, into the run reply (one control
        # round trip per epoch); other logs are harvested here while it is parked.
        in_guest = dirty.name == "pagemap-scan"
        finished = False
        while True:
            # The guest is parked at a step boundary: take epoch n.
            paused_ns = parked.get("paused_ns") or mono_ns()  # none for a guest that never ran
            steps = parked["steps"]
            t1 = perf()
            encoded = parked.get("dirty_runs")
            try:
                runs = dirty.harvest() if encoded is None else decode_runs(encoded)
            except (OSError, GuestError) as exc:  # its pagemap (or, KVM logs, its control socket) went with it
                raise _GuestLost(exc) from None
            t2 = perf()
            self.epoch += 1
            stopping = (finished or self._stop.is_set()
                        or (cfg.epochs is not None and self.epoch >= cfg.epochs)
                        or (deadline is not None and time.monotonic() >= deadline))
            overlap = cfg.overlap and not (stopping or synchronous)
            parts, npages, nruns = self._collect(mem, runs, steps, paused_ns, overlap)
            t3 = perf()
            if not overlap:
                self._send(parts)
            t4 = perf()
            if not stopping:  # a standby lagging by more than max_unacked epochs holds the guest
                self._take_acks(block_over=cfg.max_unacked)
            t5 = perf()
            log.dirty_pages.append(npages)
            log.runs.append(nruns)
            log.steps.append(steps[0])
            log.harvest_us.append((t2 - t1) * 1e6 + parked.get("harvest_ns", 0) / 1e3)
            log.collect_us.append((t3 - t2) * 1e6)
            log.send_us.append((t4 - t3) * 1e6)
            log.ack_us.append((t5 - t4) * 1e6)
            if stopping:
                reason = ("guest-finished" if finished else "stopped" if self._stop.is_set()
                          else "epochs" if cfg.epochs is not None and self.epoch >= cfg.epochs else "seconds")
                return reason, True, self._finish()
            resume_ns = mono_ns()
            log.pause_us.append((resume_ns - paused_ns) / 1e3)
            try:
                runner.start(budget, harvest=in_guest)  # each vCPU: exactly `budget` steps
            except GuestError as exc:
                raise _GuestLost(exc) from None
            if overlap:  # send while the guest runs
                t6 = perf()
                self._send(parts)
                t7 = perf()
                self._take_acks(block_over=cfg.max_unacked)
                log.send_us[-1] += (t7 - t6) * 1e6
                log.ack_us[-1] += (perf() - t7) * 1e6
            del parts
            try:
                parked = runner.wait(self._heartbeat, cfg.heartbeat)
            except GuestError as exc:
                raise _GuestLost(exc) from None
            log.run_us.append((mono_ns() - resume_ns) / 1e3)
            if parked["state"] == "finished":
                finished = True  # one more epoch takes the final state, if the guest is still there

    def _collect(self, mem: GuestMemory, runs: list[tuple[int, int]], steps: list[int], paused_ns: int,
                 copy: bool) -> tuple[list, int, int]:
        """The epoch's frames (EpochBegin, page runs with the state page always among
        them, EpochCommit) as (header, payload) pairs for one sendmsg, plus the page and
        run counts. memfd RAM is
        referenced in place when the frames are sent before the guest resumes (sendmsg
        copies it), and copied into the epoch buffer first when they are sent while the
        guest runs (``copy``); anonymous RAM is always read into the buffer."""
        ps = mem.page_size
        if not runs or runs[0][0] > 1:
            runs.insert(0, (0, 1))
        elif runs[0][0] == 1:
            runs[0] = (0, runs[0][1] + 1)
        max_pages = MAX_RUN_BYTES // ps
        if max(n for _, n in runs) > max_pages:
            runs = ranges.split(runs, max_pages)
        npages = sum(n for _, n in runs)
        # Frame headers packed directly: the runs come from the harvest, in range by
        # construction and split below the frame limit (what encode_page_run_header checks).
        pack, magic, ftype, cause = wire.HEADER.pack, wire.MAGIC, int(wire.FrameType.PAGE_RUN), int(wire.Cause.RESENT)
        parts: list = [wire.EpochBegin(epoch=self.epoch)]
        append = parts.append
        view = self._view
        if view is not None and not copy:
            for first, n in runs:
                append((pack(magic, ftype, cause, n * ps, first), view[first * ps:(first + n) * ps]))
        else:
            need = npages * ps
            if len(self._buffer) < need:
                self._buffer_view = None
                self._buffer = bytearray(max(need, 2 * len(self._buffer)))
                self._buffer_view = memoryview(self._buffer)
            buf = self._buffer_view
            pos = 0
            if view is not None:
                for first, n in runs:
                    end = pos + n * ps
                    buf[pos:end] = view[first * ps:(first + n) * ps]
                    append((pack(magic, ftype, cause, n * ps, first), buf[pos:end]))
                    pos = end
            else:  # anonymous RAM: read through /proc/PID/mem
                fd, base = mem._mem_fd, mem.base
                for first, n in runs:
                    end = pos + n * ps
                    if os.preadv(fd, [buf[pos:end]], base + first * ps) != end - pos:
                        raise _GuestLost(OSError(errno.EIO, f"short read of guest RAM at page {first}"))
                    append((pack(magic, ftype, cause, n * ps, first), buf[pos:end]))
                    pos = end
        cut = self.config.cut_mid_epoch
        if cut is not None and self.epoch > cut:
            self._send(parts[:max(2, len(parts) // 4)])
            self._channel.close()
            raise ChannelClosed(f"fault injection: connection cut in the middle of epoch {self.epoch}")
        parts.append(wire.EpochCommit(info={"epoch": self.epoch, "pages": npages, "runs": len(runs),
                                            "steps": steps, "paused_ns": paused_ns}))
        self._marker_sent_ns[self.epoch] = time.monotonic_ns()
        return parts, npages, len(runs)

    def _send(self, parts: list) -> None:
        """Send messages and (header, payload) frames in one go (each checked against
        the checkpoint table and tagged by the channel)."""
        channel = self._channel
        before = channel.bytes_sent
        frames = [p if isinstance(p, tuple) else _split(p.encode()) for p in parts]
        try:
            channel.send_frames(frames)
        finally:
            self.bytes_sent += channel.bytes_sent - before

    # -- acknowledgements ---------------------------------------------------------------
    def _take_acks(self, block_over: int) -> None:
        """Read the acknowledgements that have arrived; block while more than
        ``block_over`` epochs are unacknowledged."""
        poll = self._poll
        while True:
            if self.epoch - self.acked <= block_over and not (self._channel.buffered or poll.poll(0)):
                return
            self._read_ack()

    def _read_ack(self) -> None:
        message = self._channel.recv()
        if isinstance(message, wire.EpochAck):
            epoch = message.info.get("epoch")
            if epoch != self.acked + 1:
                raise wire.ProtocolError(f"the standby acknowledged epoch {epoch!r}, expected {self.acked + 1}")
            self.acked = epoch
            sent = self._marker_sent_ns.pop(epoch, None)
            if sent is not None:
                self.log.commit_ms.append((time.monotonic_ns() - sent) / 1e6)
            if self.config.on_commit is not None:
                self.config.on_commit(epoch, message.info.get("steps") or [])
        elif isinstance(message, wire.Error):
            raise _StandbyError(f"the standby failed: {message.reason}")
        elif isinstance(message, wire.Pong):
            pass
        else:
            raise wire.ProtocolError(f"unexpected {type(message).__name__} from the standby")

    def _finish(self) -> str | None:
        """Clean end: tell the standby, wait for the outstanding acknowledgements."""
        self._send([wire.CheckpointEnd(epoch=self.epoch)])
        self._sock.settimeout(self.config.ack_timeout)
        try:
            while self.acked < self.epoch:
                self._read_ack()
        except (ChannelClosed, TimeoutError, OSError) as exc:
            return f"the standby did not acknowledge epochs {self.acked + 1}..{self.epoch}: {exc}"
        return None

    # -- figures --------------------------------------------------------------------------
    def _figures(self, mem, dirty, runner, status, budget, sync, started, loop_started, loop_ended) -> dict:
        """The primary's report. Per-epoch statistics cover the steady epochs (2 on):
        epoch 1 carries everything written during the initial sync and is reported apart
        (``first_epoch``). ``pause_ms``: from the guest parking (its clock) to the resume
        request; the resume itself (control round trip, vCPU start) and the epoch's steps
        are in ``time_us.run_until_rpc``. ``checkpoints_per_s``: steady epochs over the
        sum of their pause and run times. ``commit_latency_ms``: marker sent to
        acknowledgement read."""
        log, cfg = self.log, self.config
        steady = slice(1, None)
        elapsed = (loop_ended - loop_started) if loop_started else 0.0
        epochs_timed = len(log.pause_us)  # epochs followed by a run
        steady_s = sum(log.pause_us[1:]) / 1e6 + sum(log.run_us[1:]) / 1e6
        dirty_steady = log.dirty_pages[steady]
        return {
            "role": "primary",
            "dirty_log": dirty.name if dirty is not None else None,
            "ram_bytes": mem.size if mem is not None else None,
            "page_size": mem.page_size if mem is not None else None,
            "workload": status.get("workload"),
            "threads": status.get("threads"),
            "max_dirty": cfg.max_dirty,
            "steps_per_epoch": budget,
            "interval_ms": cfg.interval_ms,
            "max_unacked": cfg.max_unacked,
            "overlap": cfg.overlap,
            "epochs": self.epoch,
            "committed_epoch": self.acked,
            "committed_steps": log.steps[self.acked - 1] if 0 < self.acked <= len(log.steps) else None,
            "total_s": round(time.monotonic() - started, 4),
            "loop_s": round(elapsed, 4),
            "checkpoints_per_s": round((epochs_timed - 1) / steady_s, 1) if epochs_timed > 1 and steady_s else None,
            "checkpoints_per_s_overall": round(self.epoch / elapsed, 1) if elapsed else None,
            "pause_ms": _summary([v / 1e3 for v in log.pause_us[1:]], 4),
            "dirty_pages": _summary(dirty_steady, 1),
            "bound_exceeded": sum(1 for n in dirty_steady if n > cfg.max_dirty),
            "runs_per_epoch": _summary(log.runs[steady], 1),
            "time_us": {  # where an epoch's time goes (steady epochs)
                "run_until_rpc": _summary(log.run_us[1:], 1),
                "harvest": _summary(log.harvest_us[steady], 1),
                "collect": _summary(log.collect_us[steady], 1),
                "send": _summary(log.send_us[steady], 1),
                "ack": _summary(log.ack_us[steady], 1),
            },
            "commit_latency_ms": _summary(log.commit_ms[1:], 4),
            "first_epoch": {"dirty_pages": log.dirty_pages[0] if log.dirty_pages else None,
                            "pause_ms": round(log.pause_us[0] / 1e3, 4) if log.pause_us else None},
            "initial_sync": sync,
            "interval_pauses": runner.interval_pauses if runner is not None else 0,
            "bytes_sent": self.bytes_sent,
        }


def _cpu_seconds() -> float:
    """CPU time of this process (all threads, user + system)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class _GuestLost(Exception):
    def __init__(self, cause: BaseException):
        super().__init__(str(cause))
        self.cause = cause


class _StandbyError(Exception):
    pass


def _split(frame: bytes) -> tuple[memoryview, memoryview]:
    """(header, payload) of an encoded frame."""
    view = memoryview(frame)
    return view[:wire.HEADER.size], view[wire.HEADER.size:]
