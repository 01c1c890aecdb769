"""The standby's epoch loop in C (native/ckpt_standby.c): EpochBegin, the page runs
staged, EpochCommit, the epoch applied and acknowledged, with no Python in between.
:class:`NativeStandbyLoop` lends it the channel's two sides for each call, keeps the
session's phase in step with it, and hands the applied epochs' figures back to
:class:`postcopy.checkpoint.standby.Standby`, which handles every frame the loop leaves
to Python (Ping, CheckpointEnd, Error, anything out of order or forged)."""
from __future__ import annotations

from postcopy._native import ffi, lib
from postcopy.checkpoint.epochstage import EpochStage
from postcopy.checkpoint.nativelink import lend
from postcopy.migration.dp_recv import receive_rules
from postcopy.protocol import wire
from postcopy.protocol.channel import Channel

LOG_EPOCHS = 4096  # applied epochs logged per stretch (handed back when full)
SLICE_S = 0.05  # the longest call: then Python's signal handlers run
# The frames of one epoch, from where the loop starts (between epochs, or inside one):
# checked against the session once per call (the cycle leaves the phase where it was).
CYCLE = {False: ("EPOCH_BEGIN", "PAGE_RUN/RESENT", "EPOCH_COMMIT"),
         True: ("PAGE_RUN/RESENT", "EPOCH_COMMIT", "EPOCH_BEGIN")}


class NativeStandbyLoop:
    """The C loop's struct, its receive buffer, the page-run rules (those of the Python
    decoder: :class:`postcopy.migration.dp_recv.PageReceiver`'s, RESENT runs only) and
    its log of applied epochs."""

    def __init__(self, layout: wire.Layout, stage: EpochStage, image, silence_s: float):
        rules, self._regions = receive_rules(layout)
        rules.taken_causes = 1 << wire.Cause.RESENT
        self._rules = rules
        self._rbuf = ffi.new("uint8_t[]", lib.pc_dp_recv_min_buffer(rules))
        self._pages = ffi.new("uint64_t[]", LOG_EPOCHS)
        self._apply_ns = ffi.new("int64_t[]", LOG_EPOCHS)
        s = self.s = ffi.new("struct pc_ckpt_standby *")
        s.rules, s.stage, s.image = rules, stage.native, image
        s.silence_ns, s.slice_ns = int(silence_s * 1e9), int(SLICE_S * 1e9)
        s.log_pages, s.log_apply_ns, s.log_cap = self._pages, self._apply_ns, LOG_EPOCHS

    @property
    def expect(self) -> int:
        """The next epoch."""
        return self.s.expect

    @property
    def in_epoch(self) -> bool:
        """Its EpochBegin was taken."""
        return bool(self.s.in_epoch)

    def run(self, channel: Channel, expect: int, in_epoch: bool) -> int:
        """One call of the C loop on ``channel`` from epoch ``expect`` (``in_epoch``: its
        EpochBegin already taken); returns its reason (``lib.PC_CKPT_STANDBY_*`` or -errno)."""
        s, session = self.s, channel.session
        s.expect, s.in_epoch = expect, in_epoch
        if session is not None:
            for kind in CYCLE[in_epoch]:
                session.received(kind, channel.name)
        with lend(channel, s.rx, ("EPOCH_ACK",), self._rbuf) as s.link:
            rc = lib.pc_ckpt_standby_run(s)
        s.link = ffi.NULL
        if rc == lib.PC_CKPT_STANDBY_FRAME:
            s.rx.last_ns = 0  # Python's decoder reads on (its socket timeout counts meanwhile)
        if session is not None and bool(s.in_epoch) != in_epoch:  # the loop stopped inside an epoch, or left one
            session.received("EPOCH_BEGIN" if s.in_epoch else "EPOCH_COMMIT", channel.name)
        return rc

    def drain(self, pages: list[int], apply_us: list[float]) -> tuple[int, int, int, tuple[int, ...]] | None:
        """Append the applied epochs' pages and apply times to the lists; returns the
        last one applied (epoch, pages, paused_ns, steps), or None if none was."""
        s = self.s
        n = s.log_len
        pages.extend(self._pages[i] for i in range(n))
        apply_us.extend(self._apply_ns[i] / 1e3 for i in range(n))
        s.log_len = 0
        if not n:
            return None
        c = s.committed
        return c.epoch, c.pages, c.paused_ns, tuple(c.steps[i] for i in range(c.nsteps))
