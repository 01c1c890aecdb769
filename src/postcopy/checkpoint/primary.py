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
``overlap``, into an epoch buffer sent while the guest runs the next epoch. One native
call builds, tags and sends the whole epoch (``pc_ckpt_send_epoch``, native/ckpt_io.c).
The first epoch is preceded by an initial sync of every populated page (epoch 0, sent
while the guest runs, never a commit point on its own): the dirty log is started before
it, so epoch 1 resends everything written meanwhile and is the first consistent image.

**Where the loop runs.** With the doorbell and memfd RAM, the epochs after the first run
in C (:mod:`postcopy.checkpoint.epochloop`, native/ckpt_primary.c: wait for the guest,
send, take the acknowledgements, ring), and Python handles only what the loop hands
back; otherwise each epoch runs here, the run request and its reply split
(:mod:`postcopy.checkpoint.epochrun`) so that the agent works while the guest runs.

The wire protocol is :mod:`postcopy.protocol.wire`'s; the epoch messages are described in
:mod:`postcopy.checkpoint.standby`.
"""
from __future__ import annotations

import os
import resource
import select
import socket
import threading
import time
from typing import Callable

from postcopy.checkpoint.config import (CheckpointConfig, CheckpointError, GuestLost, bound_problem,
                                        steps_per_epoch)
from postcopy.checkpoint.epochlog import EpochLog, primary_report
from postcopy.checkpoint.epochpages import EpochPages, EpochPlan, flat_runs
from postcopy.checkpoint.epochdoorbell import DoorbellRunner
from postcopy.checkpoint.epochloop import NativeEpochLoop, fits
from postcopy.checkpoint.epochrun import EpochRunner
from postcopy.checkpoint.standbylink import close_channel, connect_standby
from postcopy.guest.control import GuestClient, GuestError
from postcopy.guest.dirtytrack import decode_flat
from postcopy.kernel.dirtylog import DirtyLogUnavailable, open_dirty_log
from postcopy.migration.guestmem import GuestMemory
from postcopy.protocol import wire
from postcopy.protocol.channel import Channel, ChannelClosed
from postcopy._native import ffi, lib
from postcopy.protocol.wire import MAX_RUN_BYTES

# The run's configuration and its checks stay importable from here, beside the run.
__all__ = ["CheckpointConfig", "CheckpointError", "Checkpointer", "bound_problem", "steps_per_epoch"]


class Checkpointer:
    """Checkpoints one guest to one standby. Use :meth:`run`."""

    def __init__(self, config: CheckpointConfig):
        if config.max_dirty < 2:
            raise ValueError("max_dirty must be at least 2 (the state page and one written page)")
        if config.max_unacked < 0:
            raise ValueError("max_unacked must be >= 0")
        self.config = config
        self.log = EpochLog()
        self.epoch = 0  # last epoch sent
        self.acked = 0  # last epoch acknowledged by the standby (committed)
        self.bytes_sent = 0
        self._marker_sent_ns: dict[int, int] = {}
        self._stop = threading.Event()
        self._stop_flag = ffi.new("int *")  # the same, for the native epoch loop
        self.epoch_loop = "python"  # or "native": the epochs after the first ran in C
        self.overlap = False  # epochs sent while the guest runs the next
        self._channel: Channel | None = None
        self._sock: socket.socket | None = None
        self._poll: select.poll | None = None
        self._pages: EpochPages | None = None
        self._cpu_start: float | None = None

    def stop(self) -> None:
        """Ask :meth:`run` to end after the current epoch (thread safe)."""
        self._stop.set()
        self._stop_flag[0] = 1

    # -- connection ------------------------------------------------------------------
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
                state = guest.status()["state"]
                if state not in ("running", "paused"):  # checked first: an incoming guest stops when a lease ends
                    raise CheckpointError(f"the guest is {state}: only a running or paused guest can be checkpointed")
                # One agent at a time: a migration source or a second primary is refused
                # while this one checkpoints (the lease ends with this connection).
                guest.lease()
                info, fds = guest.take_fds()
                status = guest.status()
            except GuestError as exc:
                raise CheckpointError(f"cannot attach to the guest: {exc}") from None
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
            self._channel = connect_standby(cfg, mem, socket_factory)
            self._sock = self._channel.sock
            self._poll = select.poll()
            self._poll.register(self._sock, select.POLLIN)
            self._pages = EpochPages(mem)
            try:
                if dirty.name == "pagemap-scan" and cfg.interval_ms is None and cfg.doorbell:
                    # most runs one epoch can report: every other page dirty
                    runner = DoorbellRunner(guest, info["ram_size"] // info["page_size"] // 2 + 1)
                else:
                    runner = EpochRunner(cfg.guest_control, guest, cfg.interval_ms)
            except GuestError as exc:
                raise CheckpointError(f"cannot open a second control connection: {exc}") from None
            return self._run(guest, mem, dirty, runner, status, budget)
        finally:
            if runner is not None:
                runner.close()
            if dirty is not None:
                dirty.stop()
            if self._channel is not None:
                close_channel(self._channel)
            if self._pages is not None:
                self._pages.close()
            if mem is not None:
                mem.close()
            guest.close()

    def _run(self, guest: GuestClient, mem: GuestMemory, dirty, runner: EpochRunner,
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
                raise GuestLost(exc) from None
            paused_by_us = was_running
            loop_started = time.monotonic()
            self._cpu_start = _cpu_seconds()
            end_reason, ok, error = self._loop(mem, dirty, runner, parked, budget, loop_started)
            loop_ended = time.monotonic()
        except GuestLost as exc:
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
        runner.end()  # a doorbell session ends: the guest is parked, and its own again
        if error is not None and end_reason in ("stopped", "epochs", "seconds", "guest-finished"):
            ok = False  # a clean end whose last epochs were not acknowledged
        if end_reason not in ("guest-lost", "guest-finished") and paused_by_us:
            try:  # leave the guest as we found it: running (unprotected from now on)
                if guest.status()["state"] == "paused":
                    guest.resume()
            except GuestError as exc:
                error = error or f"could not resume the guest: {exc}"
        figures = primary_report(self, mem, dirty, runner, status, budget, sync, started, loop_started,
                                 loop_ended)
        figures.update(end_reason=end_reason, ok=ok, error=error,
                       epoch_driver="doorbell" if isinstance(runner, DoorbellRunner) else "run",
                       epoch_loop=self.epoch_loop,
                       cpu_us_per_epoch=round(cpu / self.epoch * 1e6, 1) if cpu is not None and self.epoch else None)
        return figures

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
        """Send every populated page (:meth:`EpochPages.send_populated`); returns how many."""
        before = self._channel.bytes_sent
        try:
            return self._pages.send_populated(self._channel, min(self.config.run_pages, MAX_RUN_BYTES // mem.page_size))
        finally:
            self.bytes_sent += self._channel.bytes_sent - before

    # -- the epoch loop ---------------------------------------------------------------
    def _loop(self, mem: GuestMemory, dirty, runner: EpochRunner, parked: dict, budget: int,
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
        resume_ns = None  # when the guest was last let run
        # After the first epoch the loop goes on in C where it can (epochloop.py).
        native = (cfg.native_loop and in_guest and cfg.cut_mid_epoch is None
                  and fits(runner, self._pages, cfg.max_unacked))
        self.overlap = not synchronous and (cfg.overlap if cfg.overlap is not None else native)
        while True:
            # The guest is parked at a step boundary: take epoch n.
            paused_ns = parked.get("paused_ns") or mono_ns()  # none for a guest that never ran
            steps = parked["steps"]
            t1 = perf()
            runs, encoded = parked.get("runs"), parked.get("dirty_runs")  # from the doorbell, the run reply
            try:
                if runs is None:
                    runs = flat_runs(dirty.harvest()) if encoded is None else decode_flat(encoded)
            except (OSError, GuestError) as exc:  # its pagemap (or, KVM logs, its control socket) went with it
                raise GuestLost(exc) from None
            t2 = perf()
            self.epoch += 1
            stopping = (finished or self._stop.is_set()
                        or (cfg.epochs is not None and self.epoch >= cfg.epochs)
                        or (deadline is not None and time.monotonic() >= deadline))
            overlap = self.overlap and not stopping
            plan, commit = self._collect(runs, steps, paused_ns, overlap)
            npages, nruns = plan.npages, plan.nruns
            t3 = perf()
            if not overlap:
                self._send_epoch(plan, commit)
            t4 = perf()
            if not stopping and self.epoch - self.acked > cfg.max_unacked:
                self._take_acks(block_over=cfg.max_unacked)  # a standby lagging this far holds the guest
            t5 = perf()
            log.dirty_pages.append(npages)
            log.runs.append(nruns)
            log.steps.append(steps[0])
            log.harvest_us.append((t2 - t1) * 1e6 + parked.get("harvest_ns", 0) / 1e3)
            log.collect_us.append((t3 - t2) * 1e6)
            log.send_us.append((t4 - t3) * 1e6)
            log.ack_us.append((t5 - t4) * 1e6)
            if stopping:
                return self._end_reason(finished), True, self._finish()
            resume_ns = self._resume(runner, budget, in_guest, paused_ns, resume_ns)
            t6 = perf()
            if overlap:  # send while the guest runs
                self._send_epoch(plan, commit)
            t7 = perf()
            self._take_acks(block_over=cfg.max_unacked)  # those that came, read while the guest runs
            log.send_us[-1] += (t7 - t6) * 1e6
            log.ack_us[-1] += (perf() - t7) * 1e6
            del plan
            if native:  # the doorbell is open now
                loop = NativeEpochLoop(runner, self._pages, len(steps), budget, self._stop_flag,
                                       overlap=self.overlap, max_dirty=cfg.max_dirty)
                return self._run_native(loop, resume_ns, deadline)
            try:
                parked = runner.wait(self._heartbeat, cfg.heartbeat)
            except GuestError as exc:
                raise GuestLost(exc) from None
            log.run_us.append((mono_ns() - resume_ns) / 1e3)
            if parked["state"] == "finished":
                finished = True  # one more epoch takes the final state, if the guest is still there

    def _resume(self, runner, budget: int, harvest: bool, paused_ns: int, previous: int | None) -> int:
        """Let the parked guest run one epoch (each vCPU exactly ``budget`` steps), its
        pause logged (and the epoch's wall time since the ``previous`` resume); returns
        the resume's time."""
        log, resume_ns = self.log, time.monotonic_ns()
        log.pause_us.append((resume_ns - paused_ns) / 1e3)
        if previous is not None:
            log.cycle_us.append((resume_ns - previous) / 1e3)
        log.unacked.append(self.epoch - self.acked)
        try:
            runner.start(budget, harvest=harvest)
        except GuestError as exc:
            raise GuestLost(exc) from None
        return resume_ns

    def _end_reason(self, finished: bool) -> str:
        """Why the last epoch was the last (a clean end)."""
        cfg = self.config
        return ("guest-finished" if finished else "stopped" if self._stop.is_set()
                else "epochs" if cfg.epochs is not None and self.epoch >= cfg.epochs else "seconds")

    def _run_native(self, loop: NativeEpochLoop, resume_ns: int,
                    deadline: float | None) -> tuple[str, bool, str | None]:
        """The epochs after the first, in C (native/ckpt_primary.c), from the guest let
        run at ``resume_ns`` on. Python handles what the loop hands back: a frame it did
        not take, the guest to look at and heartbeats while an epoch runs long, commits
        to report (the first at once, later ones when the loop returns), the end."""
        cfg, runner = self.config, loop.runner
        self.epoch_loop = "native"
        loop.configure(epoch=self.epoch, acked=self.acked, resume_ns=resume_ns, max_unacked=cfg.max_unacked,
                       last_epoch=cfg.epochs, deadline=deadline,
                       notify_acked=1 if cfg.on_commit is not None and self.acked < 1 else 0)
        last_beat = 0.0
        try:
            while True:
                acked = self.acked
                rc = loop.run(self._channel)
                self.epoch, self.acked = loop.p.epoch, loop.p.acked
                if cfg.on_commit is not None:
                    for epoch in range(acked + 1, self.acked + 1):
                        cfg.on_commit(epoch, loop.steps_of(epoch))
                if rc == lib.PC_CKPT_LOOP_WAITING:  # an epoch runs long
                    try:
                        runner.check_alive()
                    except GuestError as exc:
                        raise GuestLost(exc) from None
                    if time.monotonic() >= max(loop.p.resume_ns / 1e9, last_beat) + cfg.heartbeat:
                        self._heartbeat()
                        last_beat = time.monotonic()
                elif rc == lib.PC_CKPT_LOOP_FRAME:
                    self._read_ack()  # a Pong, an Error or an acknowledgement C did not take
                    loop.p.acked = self.acked
                elif rc == lib.PC_CKPT_LOOP_ACKED:
                    loop.p.notify_acked = 0
                elif rc == lib.PC_CKPT_LOOP_LOG_FULL:
                    loop.drain(self.log)
                elif rc == lib.PC_CKPT_LOOP_ENDED:
                    loop.drain(self.log)
                    return self._end_reason(loop.p.final_state == lib.PC_DB_FINISHED), True, self._finish()
                elif rc == lib.PC_CKPT_LOOP_GUEST_ERROR:
                    raise GuestLost(GuestError(f"the guest's doorbell failed: error {loop.p.guest_error}"))
                elif rc == lib.PC_CKPT_LOOP_CLOSED:
                    raise ChannelClosed(f"{self._channel.name}: the peer closed the connection")
                else:
                    raise ChannelClosed(f"{self._channel.name}: epoch loop failed: {os.strerror(-rc)}")
        finally:
            loop.drain(self.log)

    def _collect(self, runs, steps: list[int], paused_ns: int, copy: bool) -> tuple[EpochPlan, bytes]:
        """The epoch's pages (:meth:`EpochPages.plan`: the state page always among them)
        and its EpochCommit frame; ``copy``: the pages are copied now, to be sent while
        the guest runs."""
        plan = self._pages.plan(runs, copy)
        cut = self.config.cut_mid_epoch
        if cut is not None and self.epoch > cut:
            self._send_epoch(plan, b"", max(1, plan.nruns // 4))
            self._channel.close()
            raise ChannelClosed(f"fault injection: connection cut in the middle of epoch {self.epoch}")
        commit = wire.EpochCommit(info={"epoch": self.epoch, "pages": plan.npages, "runs": plan.nruns,
                                        "steps": steps, "paused_ns": paused_ns}).encode()
        self._marker_sent_ns[self.epoch] = time.monotonic_ns()
        return plan, commit

    def _send_epoch(self, plan: EpochPlan, commit: bytes, nruns: int | None = None) -> None:
        """EpochBegin, the page runs of ``plan`` (the first ``nruns`` of them) and
        ``commit`` (none if empty), built, tagged and sent by C in one call."""
        channel = self._channel
        kinds = ("EPOCH_BEGIN", "PAGE_RUN/RESENT") + (("EPOCH_COMMIT",) if commit else ())
        begin = wire.EpochBegin(epoch=self.epoch).encode()
        pairs = ffi.from_buffer("uint64_t[]", plan.runs)
        before = channel.bytes_sent
        try:
            with channel.native_send(*kinds) as link:
                rc = lib.pc_ckpt_send_epoch(link, begin, len(begin), plan.src, plan.packed, self._pages.mem.page_size,
                                            pairs, plan.nruns if nruns is None else nruns,
                                            self._pages.max_run_pages, int(wire.Cause.RESENT), commit, len(commit))
        finally:
            self.bytes_sent += channel.bytes_sent - before
        if rc < 0:
            raise ChannelClosed(f"{channel.name}: send failed: {os.strerror(-rc)}")

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

def _cpu_seconds() -> float:
    """CPU time of this process (all threads, user + system)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class _StandbyError(Exception):
    pass


def _split(frame: bytes) -> tuple[memoryview, memoryview]:
    """(header, payload) of an encoded frame."""
    view = memoryview(frame)
    return view[:wire.HEADER.size], view[wire.HEADER.size:]
