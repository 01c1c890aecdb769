"""The source agent: attaches to a running guest, pauses it, hands its state over, then
serves demand requests on the urgent channel while the pusher streams every other page
on the main channel. The guest's RAM stays intact until the destination confirms that
every page is in."""
from __future__ import annotations

import resource
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field

from postcopy import wire
from postcopy.guest.control import GuestClient
from postcopy.guestmem import GuestMemory, PageExtents
from postcopy.transport import MAX_RUN_BYTES, Channel, ChannelClosed, handshake, tune


class MigrationError(RuntimeError):
    """The migration failed; the message says what is kept where."""


@dataclass
class SourceConfig:
    guest_control: str
    endpoint: tuple[str, int]
    key: bytes
    run_pages: int = 256  # pages per pushed frame: 1 MiB with 4 KiB pages
    connect_timeout: float = 15.0
    push_delay: float = 0.0  # benchmark knob: serve demand faults alone this long first


@dataclass
class SourceStats:
    pages_pushed: int = 0
    pages_demand: int = 0
    pages_zero: int = 0
    requests: int = 0
    pause_ms: float = 0.0
    figures: dict = field(default_factory=dict)


def connect(endpoint: tuple[str, int], timeout: float) -> socket.socket:
    """Connect, retrying while the destination is not listening yet."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return socket.create_connection(endpoint, timeout=timeout)
        except (ConnectionRefusedError, OSError) as exc:
            if time.monotonic() > deadline:
                raise MigrationError(f"cannot reach the destination at {endpoint[0]}:{endpoint[1]}: {exc}") from exc
            time.sleep(0.05)


class SourceAgent:
    """Runs one postcopy migration from the source side. Use :meth:`run`."""

    def __init__(self, config: SourceConfig):
        self.config = config
        self.stats = SourceStats()
        self._hint: int | None = None  # next page for the pusher after a demand fault
        self._sent: bytearray | None = None
        self._urgent_error: BaseException | None = None
        self._extents: PageExtents | None = None

    # -- connection --------------------------------------------------------------------
    def _open_channel(self, mem: GuestMemory, session: bytes, name: str) -> Channel:
        sock = connect(self.config.endpoint, self.config.connect_timeout)
        sock.settimeout(None)
        tune(sock, urgent=(name == "urgent"))
        channel = Channel(sock, name, mem.layout)
        hello = wire.make_hello("source", name, mem.page_size, mem.layout.regions, session)
        handshake(channel, "client", self.config.key, hello)
        return channel

    # -- the migration -----------------------------------------------------------------
    def run(self) -> dict:
        """Migrate the guest; returns the source's figures merged with the destination's
        (from its Complete message). Raises MigrationError on failure."""
        started = time.monotonic()
        guest = GuestClient(self.config.guest_control)
        info, fds = guest.take_fds()
        mem = GuestMemory(info, fds)
        status = guest.status()
        session = secrets.token_bytes(16)
        main = urgent = None
        try:
            main = self._open_channel(mem, session, "main")
            urgent = self._open_channel(mem, session, "urgent")
            self._await_ready(main)
            # Downtime starts here: the guest parks at a step boundary.
            paused = guest.pause()
            self.stats.pause_ms = (time.monotonic() - started) * 1e3
            scratch = GuestMemory.scratch() if mem.memfd is None else None
            mem.send_run(main, 0, 1, wire.Cause.STATE, scratch)
            main.send(wire.Switchover(info={
                "paused_ns": paused["paused_ns"],
                "last_heartbeat_ns": paused["last_heartbeat_ns"],
                "steps": paused["steps"],
                "guest": {k: status.get(k) for k in ("threads", "workload", "steps_target", "backing", "ram_size")},
            }))
            switched = time.monotonic()
            self._sent = bytearray(mem.npages)
            self._sent[0] = 1
            server = threading.Thread(target=self._serve_urgent, args=(mem, urgent), name="urgent-server", daemon=True)
            server.start()
            if self.config.push_delay:
                time.sleep(self.config.push_delay)
            self._push(mem, main, scratch)
            main.send(wire.PushDone(pages=self.stats.pages_pushed))
            complete = self._await_complete(main)
            push_done = time.monotonic()
            guest.quit()  # the destination holds every page now
            urgent.close()
            server.join(timeout=5)
        except (ChannelClosed, wire.ProtocolError, OSError) as exc:
            raise MigrationError(
                f"migration failed: {exc}. The guest is kept paused on the source with all its RAM "
                f"(control socket {self.config.guest_control}); it can be migrated again to a new destination "
                f"or resumed here."
            ) from exc
        finally:
            for channel in (main, urgent):
                if channel is not None:
                    channel.close()
            mem.close()
            guest.close()
        total_ms = (time.monotonic() - started) * 1e3
        return {
            "total_ms": total_ms,
            "switchover_ms": (switched - started) * 1e3,
            "push_ms": (push_done - switched) * 1e3,
            "bytes_sent": main.bytes_sent + urgent.bytes_sent,
            "bytes_sent_urgent": urgent.bytes_sent,
            "pages_pushed": self.stats.pages_pushed,
            "pages_demand": self.stats.pages_demand,
            "pages_zero": self.stats.pages_zero,
            "requests": self.stats.requests,
            "rounds": [],
            "max_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
            "dest": complete,
        }

    def _await_ready(self, main: Channel) -> None:
        """The destination answers the Ping once its incoming guest is up and its fault
        server runs, so starting a guest there never counts as downtime here."""
        main.send(wire.Ping(token=1))
        message = main.recv()
        if isinstance(message, wire.Error):
            raise MigrationError(f"the destination is not ready: {message.reason}")
        if not isinstance(message, wire.Pong) or message.token != 1:
            raise wire.ProtocolError(f"expected Pong, got {type(message).__name__}")

    def _await_complete(self, main: Channel) -> dict:
        message = main.recv()
        if isinstance(message, wire.Complete):
            return message.info
        if isinstance(message, wire.Error):
            raise MigrationError(f"the destination failed: {message.reason}")
        raise wire.ProtocolError(f"expected Complete, got {type(message).__name__}")

    # -- pusher ------------------------------------------------------------------------
    def _push(self, mem: GuestMemory, main: Channel, scratch: bytearray | None) -> None:
        """Send every page not yet sent, in large runs; zero ranges for untouched pages.
        After a demand fault the cursor jumps next to the faulting page (pre-paging)."""
        extents = self._extents = PageExtents(mem.populated_extents())
        sent = self._sent
        run_pages = min(self.config.run_pages, MAX_RUN_BYTES // mem.page_size)
        pos = 0
        while True:
            if self._urgent_error is not None:
                raise MigrationError(f"urgent channel failed: {self._urgent_error}")
            hint, self._hint = self._hint, None
            if hint is not None:
                pos = hint
            first = sent.find(0, pos)
            if first < 0:
                first = sent.find(0)
                if first < 0:
                    return
            end = sent.find(1, first, min(first + run_pages, mem.npages))
            end = min(first + run_pages, mem.npages) if end < 0 else end
            sent[first:end] = b"\x01" * (end - first)
            self._send_range(mem, main, first, end, extents.runs_in(first, end), wire.Cause.PUSHED, scratch)
            pos = end

    def _send_range(self, mem: GuestMemory, channel: Channel, first: int, end: int,
                    runs: list[tuple[int, int]], cause: wire.Cause, scratch: bytearray | None) -> None:
        """Send [first, end): the populated runs as pages, the gaps as zero ranges."""
        cursor = first
        stats = self.stats
        for start, count in runs:
            if start > cursor:
                channel.send(wire.ZeroRange(first_page=cursor, npages=start - cursor))
                stats.pages_zero += start - cursor
            mem.send_run(channel, start, count, cause, scratch)
            if cause == wire.Cause.DEMAND:
                stats.pages_demand += count
            else:
                stats.pages_pushed += count
            cursor = start + count
        if cursor < end:
            channel.send(wire.ZeroRange(first_page=cursor, npages=end - cursor))
            stats.pages_zero += end - cursor

    # -- urgent channel ----------------------------------------------------------------
    def _serve_urgent(self, mem: GuestMemory, urgent: Channel) -> None:
        """Answer page requests at once; they never queue behind pushed data."""
        scratch = GuestMemory.scratch() if mem.memfd is None else None
        try:
            while True:
                message = urgent.recv()
                if not isinstance(message, wire.PageRequest):
                    raise wire.ProtocolError(f"unexpected {type(message).__name__} on the urgent channel")
                self.stats.requests += 1
                first, end = message.first_page, message.first_page + message.npages
                if self._extents is not None:
                    runs = self._extents.runs_in(first, end)
                else:  # the pusher is still sweeping the extents: ask page by page
                    runs = [(page, 1) for page in range(first, end) if mem.is_populated(page)]
                self._send_range(mem, urgent, first, end, runs, wire.Cause.DEMAND, scratch)
                self._sent[first:end] = b"\x01" * (end - first)
                self._hint = end
        except ChannelClosed:
            return  # the destination closes the urgent channel when every page is in
        except BaseException as exc:  # surfaced by the pusher
            self._urgent_error = exc
