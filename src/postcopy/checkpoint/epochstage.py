"""The standby's staging of one epoch: its page runs are received into an arena (by C,
:class:`postcopy.migration.dp_recv.PageReceiver` with a staging sink, native/ckpt_io.c;
or one by one from the Python decoder) and copied into the image only once the whole
epoch arrived (:meth:`EpochStage.apply`)."""
from __future__ import annotations

import errno
import os

from postcopy._native import ffi, lib
from postcopy.migration.dp_recv import CLOSED, PageReceiver, Sink
from postcopy.protocol import wire
from postcopy.protocol.channel import Channel, ChannelClosed


class EpochStage:
    """An arena of page bytes and the (first page, npages, offset) of each run in it
    (C memory, grown as needed)."""

    def __init__(self, layout: wire.Layout):
        self.layout = layout
        self._stage = ffi.gc(ffi.new("struct pc_ckpt_stage *"), lib.pc_ckpt_stage_free)
        self._stage.page_size = layout.page_size
        sink = ffi.new("struct pc_dp_sink *")
        lib.pc_ckpt_sink_stage(sink, self._stage)
        self._receiver = PageReceiver(layout, Sink(sink, (self._stage,), _stage_error))

    @property
    def native(self):
        """The staging struct (``struct pc_ckpt_stage *``), for the native standby loop."""
        return self._stage

    @property
    def pages(self) -> int:
        return self._stage.pages

    @property
    def nruns(self) -> int:
        return self._stage.nruns

    def runs(self) -> list[tuple[int, int, bytes]]:
        """The staged (first page, npages, bytes) (for tests)."""
        st, ps = self._stage, self.layout.page_size
        return [(st.runs[3 * i], st.runs[3 * i + 1], ffi.buffer(st.arena + st.runs[3 * i + 2], st.runs[3 * i + 1] * ps)[:])
                for i in range(st.nruns)]

    def add(self, first: int, npages: int, data) -> None:
        """Stage one run the Python decoder returned."""
        if lib.pc_ckpt_stage_run(self._stage, first, npages, ffi.from_buffer(data)) < 0:
            raise _stage_error(-errno.ENOMEM)

    def receive(self, channel: Channel) -> None:
        """Stage the page runs that follow on ``channel`` (in C, as far as the session
        lets them through: the runs of an epoch) up to the first other frame, left for
        ``channel.recv()``. Raises ChannelClosed when the link fails."""
        rc = self._receiver.receive(channel)
        if rc < 0:
            raise ChannelClosed(f"{channel.name}: receive failed: {os.strerror(-rc)}")
        if rc == CLOSED:
            raise ChannelClosed(f"{channel.name}: the peer closed the connection")

    def apply(self, image) -> None:
        """Copy every staged run into ``image`` (a cffi pointer to RAM offset 0)."""
        st = self._stage
        lib.pc_ckpt_apply(image, st.arena, st.page_size, st.runs, st.nruns)

    def clear(self) -> None:
        st = self._stage
        st.used = st.nruns = st.pages = 0


def _stage_error(rc: int) -> Exception:
    return MemoryError(f"no memory to stage an epoch ({os.strerror(-rc)})")
