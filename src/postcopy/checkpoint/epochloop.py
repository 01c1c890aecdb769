"""The primary's epoch loop in C (native/ckpt_primary.c): wait for the guest's doorbell
answer, send the epoch, take the acknowledgements, ring for the next epoch, with no
Python in between. :class:`NativeEpochLoop` lends it the channel's two sides for each
call and turns each return into the policy's next step (in
:meth:`postcopy.checkpoint.primary.Checkpointer._run_native`); this module only moves
state and figures between the C struct and Python."""
from __future__ import annotations

from postcopy._native import ffi, lib
from postcopy.checkpoint.epochdoorbell import DoorbellRunner
from postcopy.checkpoint.epochlog import EpochLog
from postcopy.checkpoint.epochpages import EpochPages
from postcopy.checkpoint.nativelink import lend
from postcopy.protocol.channel import Channel

# Epochs logged per stretch of the loop (drained into the EpochLog when full).
LOG_EPOCHS = 4096
RECEIVE_BUFFER = 64 << 10  # acknowledgements are small
# The longest the loop waits for the guest in one call: then Python looks at the guest
# (a killed guest never answers) and at the heartbeat.
WAIT_SLICE_S = 0.02
# The frames one turn sends, in order (checked against the session once per call: the
# turn leaves the phase where it found it).
EPOCH_KINDS = ("EPOCH_BEGIN", "PAGE_RUN/RESENT", "EPOCH_COMMIT")


# With overlap, an epoch of up to this many times the dirty bound is copied and sent
# while the guest runs (a larger one, which only an unforeseen workload makes, in place).
COPY_BOUNDS = 2


def fits(runner, pages: EpochPages, max_unacked: int) -> bool:
    """Whether the native loop can run this checkpoint: epochs through the doorbell,
    memfd RAM read in place, an acknowledgement window that fits the loop's ring."""
    return isinstance(runner, DoorbellRunner) and pages.ram is not None and max_unacked < lib.PC_CKPT_RING - 1


class NativeEpochLoop:
    """The C loop's struct, its log and buffers. Set the policy (:meth:`configure`),
    then :meth:`run` until it returns something Python must handle."""

    def __init__(self, runner: DoorbellRunner, pages: EpochPages, threads: int, budget: int, stop_flag,
                 overlap: bool = False, max_dirty: int = 0):
        p = self.p = ffi.new("struct pc_ckpt_primary *")
        self._log = ffi.new("struct pc_ckpt_epoch_rec[]", LOG_EPOCHS)
        self._commit = ffi.new("int64_t[]", LOG_EPOCHS)
        self._runs = ffi.new("uint64_t[]", 2 * (runner.runs_cap + 1))
        self._rbuf = ffi.new("uint8_t[]", RECEIVE_BUFFER)
        self._frames = ffi.new("uint8_t[]", 16 + lib.PC_CKPT_FRAME_MAX)
        copy_cap = min(COPY_BOUNDS * max_dirty * pages.mem.page_size, pages.mem.size) if overlap else 0
        self._copy = ffi.new("uint8_t[]", copy_cap) if copy_cap else ffi.NULL
        p.frames, p.overlap, p.copy, p.copy_cap = self._frames, overlap, self._copy, copy_cap
        self.runner = runner
        db, _ = runner.native
        p.db, p.threads, p.budget = db, threads, budget
        p.ram, p.page_size, p.max_run_pages = pages.ram, pages.mem.page_size, pages.max_run_pages
        p.runs, p.log, p.log_cap = self._runs, self._log, LOG_EPOCHS
        p.commit_ns, p.commit_cap = self._commit, LOG_EPOCHS
        p.stop = stop_flag
        p.slice_ns = int(WAIT_SLICE_S * 1e9)

    def configure(self, *, epoch: int, acked: int, resume_ns: int, max_unacked: int, last_epoch: int | None,
                  deadline: float | None, notify_acked: int) -> None:
        """Where the Python loop left off (the guest runs epoch ``epoch + 1``, let run at
        ``resume_ns``) and the limits (``deadline``: time.monotonic() seconds)."""
        p = self.p
        p.epoch, p.acked, p.resume_ns = epoch, acked, resume_ns
        _, p.req = self.runner.native
        p.max_unacked = max_unacked
        p.last_epoch = (1 << 64) - 1 if last_epoch is None else last_epoch
        p.deadline_ns = 0 if deadline is None else int(deadline * 1e9)
        p.notify_acked = notify_acked

    def run(self, channel: Channel) -> int:
        """One call of the C loop on ``channel`` (both sides lent for its length);
        returns its reason (``lib.PC_CKPT_LOOP_*`` or -errno)."""
        p = self.p
        acked = p.acked
        with lend(channel, p.rx, EPOCH_KINDS, self._rbuf) as p.link:
            rc = lib.pc_ckpt_primary_run(p)
        p.link = ffi.NULL
        if p.acked != acked and channel.session is not None:
            channel.session.received("EPOCH_ACK", channel.name)  # a self-loop: one check covers them
        self.runner.adopt(p.req, p.final_state)
        return rc

    def steps_of(self, epoch: int) -> list[int]:
        """The steps epoch ``epoch`` was sent with (one of the last PC_CKPT_RING)."""
        row = self.p.ring_steps[epoch % lib.PC_CKPT_RING]
        return [row[t] for t in range(self.p.threads)]

    def drain(self, log: EpochLog) -> None:
        """Move the epochs and commit latencies logged so far into ``log``."""
        p = self.p
        for i in range(p.log_len):
            r = self._log[i]
            log.dirty_pages.append(r.pages)
            log.runs.append(r.runs)
            log.steps.append(r.steps0)
            log.harvest_us.append(r.harvest_ns / 1e3)
            log.collect_us.append(r.build_ns / 1e3)
            log.send_us.append(r.send_ns / 1e3)
            log.ack_us.append(r.ack_ns / 1e3)
            log.run_us.append((r.seen_ns - r.prev_resume_ns) / 1e3)
            if r.resume_ns:
                log.pause_us.append((r.resume_ns - r.paused_ns) / 1e3)
                log.cycle_us.append((r.resume_ns - r.prev_resume_ns) / 1e3)
                log.unacked.append(r.unacked)
        log.commit_ms.extend(self._commit[i] / 1e6 for i in range(p.commit_len))
        p.log_len = p.commit_len = 0
