"""The source agent: attaches to a running guest, pauses it, hands its state over, then
serves demand requests on the urgent channel while the pusher streams every other page
on the main channel. The guest's RAM stays intact until the destination confirms that
every page is in."""
from __future__ import annotations

import resource
import secrets
import socket
import sys
import threading
import time
from dataclasses import dataclass, field

from postcopy import ranges

from postcopy.protocol import wire
from postcopy.kernel.dirtylog import DirtyLogUnavailable, open_dirty_log
from postcopy.guest.control import GuestClient, GuestError
from postcopy.kernel.priority import make_current_thread_urgent
from postcopy.migration.fence import LeaseKeeper, fence_keeper, fence_note
from postcopy.migration.precopy import ConvergencePolicy, RoundStats, run_rounds
from postcopy.migration.guestmem import GuestMemory, PageExtents
from postcopy.protocol.channel import Channel, ChannelClosed, handshake, tune
from postcopy.protocol.wire import MAX_RUN_BYTES


class MigrationError(RuntimeError):
    """The migration failed; the message says what is kept where."""


@dataclass
class SourceConfig:
    guest_control: str
    endpoint: tuple[str, int]
    key: bytes
    mode: str = "postcopy"  # postcopy | precopy | hybrid
    dirty_log: str = "auto"  # auto | soft-dirty | pagemap-scan (precopy and hybrid)
    policy: ConvergencePolicy = field(default_factory=ConvergencePolicy)
    free_page_hints: bool = True
    run_pages: int = 256  # pages per pushed frame: 1 MiB with 4 KiB pages
    connect_timeout: float = 15.0
    recovery_timeout: float = 30.0  # postcopy: how long to try to reconnect after a broken link (0: never)
    push_delay: float = 0.0  # benchmark knob: serve demand faults alone this long first
    frame_auth: bool = True  # False is UNSAFE: only to measure what authentication costs


MODES = ("postcopy", "precopy", "hybrid")
DISCARD_BATCH = 4096
PREPAGE_PAGES = 16  # pages pushed right behind each demand fault  # runs per Discard frame (well inside the frame size limit)


@dataclass
class SourceStats:
    """Page counters, updated by the pusher and the urgent server at once: use add()."""

    pages_precopy: int = 0
    pages_resent: int = 0
    pages_pushed: int = 0
    pages_demand: int = 0
    pages_zero: int = 0
    requests: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, name: str, count: int) -> None:
        with self._lock:  # += on an attribute is a read and a write: two threads lose counts
            setattr(self, name, getattr(self, name) + count)


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
    """Runs one migration from the source side. Use :meth:`run`."""

    def __init__(self, config: SourceConfig):
        if config.mode not in MODES:
            raise ValueError(f"mode {config.mode!r} is not one of {', '.join(MODES)}")
        self.config = config
        self.stats = SourceStats()
        self._hint: int | None = None  # next page for the pusher after a demand fault
        self._sent: bytearray | None = None  # per page: sent once already (pusher and urgent server)
        self._sent_lock = threading.Lock()
        self._urgent_error: BaseException | None = None
        self._extents: PageExtents | None = None
        self._scratch: bytearray | None = None  # main channel's read buffer (anon backing)
        self._guest_pid: int | None = None
        self._link_lost = threading.Event()
        self._lease: str | None = None
        self._fence: LeaseKeeper | None = None
        self.recoveries: list[float] = []
        self.protocol = wire.Session(wire.MIGRATION, "source")  # checks every frame of both channels

    # -- connection --------------------------------------------------------------------
    def _open_channel(self, mem: GuestMemory, session: bytes, name: str, deadline: float | None = None) -> Channel:
        timeout = self.config.connect_timeout if deadline is None else max(0.1, deadline - time.monotonic())
        sock = connect(self.config.endpoint, timeout)
        # Bounded while reconnecting: the destination may still be noticing the break.
        sock.settimeout(None if deadline is None else timeout)
        tune(sock, urgent=(name == "urgent"))
        channel = Channel(sock, name, mem.layout, self.protocol)
        hello = wire.make_hello("source", name, mem.page_size, mem.layout.regions, session,
                                unauthenticated=not self.config.frame_auth)
        handshake(channel, "client", self.config.key, hello)
        sock.settimeout(None)
        return channel

    # -- the migration -----------------------------------------------------------------
    def run(self) -> dict:
        """Migrate the guest; returns the source's figures merged with the destination's
        (from its Complete message). Raises MigrationError on failure; before the
        switchover the guest goes on running here, after it the guest stays paused here
        with all its RAM until the destination confirms."""
        cfg = self.config
        started = time.monotonic()
        try:
            guest = GuestClient(cfg.guest_control)
            self._lease = guest.lease()  # one migration of a guest at a time
            info, fds = guest.take_fds()
        except GuestError as exc:
            raise MigrationError(f"cannot attach to the guest: {exc}") from None
        self._guest_pid = info.get("pid")
        mem = GuestMemory(info, fds)
        status = guest.status()
        dirty_log = None
        main = urgent = None
        switchover_sent = False
        rounds: list[RoundStats] = []
        stop_reason = None
        try:
            if cfg.mode != "postcopy":
                try:  # refuses a backend this kernel lacks before the guest is touched
                    dirty_log = open_dirty_log(cfg.dirty_log, guest, info)
                except DirtyLogUnavailable as exc:
                    raise MigrationError(str(exc)) from None
            session = secrets.token_bytes(wire.SESSION_BYTES)
            main = self._open_channel(mem, session, "main")
            urgent = self._open_channel(mem, session, "urgent")
            self.protocol.established()
            self._await_ready(main)
            self._scratch = GuestMemory.scratch() if mem.memfd is None else None
            self._sent = bytearray(mem.npages)
            if dirty_log is not None:
                dirty_log.start()
                rounds, stop_reason = run_rounds(
                    populated=mem.populated_extents(), dirty_log=dirty_log,
                    send=lambda runs, resend: self._send_precopy(mem, main, runs, resend),
                    free_hint=lambda: self._free_hint(guest, mem), policy=cfg.policy, page_size=mem.page_size)
            if dirty_log is not None:
                # Let the destination install the last round before the pause, so its
                # backlog is not downtime.
                self._await_ready(main)
            # Downtime starts here: the guest parks at a step boundary.
            pause_started = time.monotonic()
            paused = guest.pause()
            marks = {"pause": time.monotonic()}
            stale: list[tuple[int, int]] = []
            if dirty_log is not None:
                stale = dirty_log.harvest()  # stopped after the switchover: not downtime
                marks["final_harvest"] = time.monotonic()
                if cfg.mode == "precopy":
                    self._send_precopy(mem, main, stale, True)
                    stale = []
                else:
                    for i in range(0, len(stale), DISCARD_BATCH):
                        main.send(wire.Discard(ranges=tuple(stale[i:i + DISCARD_BATCH])))
                marks["final_send"] = time.monotonic()
            mem.send_run(main, 0, 1, wire.Cause.STATE, self._scratch)
            # From the Switchover on, the destination may run the guest: fence it here first.
            self._fence = fence_keeper(cfg.guest_control, self._lease, cfg.recovery_timeout,
                                       in_contact=lambda: not self._link_lost.is_set())
            self._fence.arm()
            main.send(wire.Switchover(info={
                "recovery_timeout_s": cfg.recovery_timeout,
                "mode": cfg.mode,
                "paused_ns": paused["paused_ns"],
                "last_heartbeat_ns": paused["last_heartbeat_ns"],
                "steps": paused["steps"],
                "guest": {k: status.get(k) for k in ("threads", "workload", "steps_target", "backing", "ram_size")},
            }))
            switchover_sent = True
            switched = marks["switchover"] = time.monotonic()
            if dirty_log is not None:
                dirty_log.stop()  # the guest stays paused here; write-protection is moot
            self._prepare_postcopy(mem, stale, precopied=dirty_log is not None)
            push_delay = cfg.push_delay
            while True:
                server = threading.Thread(target=self._serve_urgent, args=(mem, urgent), name="urgent-server",
                                          daemon=True)
                server.start()
                try:
                    if push_delay and self._link_lost.wait(push_delay):
                        raise ChannelClosed("urgent channel broke")
                    push_delay = 0.0
                    self._push(mem, main)
                    main.send(wire.PushDone(pages=self.stats.pages_pushed))
                    complete = self._await_complete(main)
                    break
                except ChannelClosed as exc:
                    if cfg.recovery_timeout <= 0:
                        raise
                    main, urgent = self._recover(mem, session, main, urgent, server, exc)
            push_done = time.monotonic()
            guest.quit()  # the destination holds every page now
            urgent.close()
            server.join(timeout=5)
        except (ChannelClosed, wire.ProtocolError, OSError, MigrationError, GuestError) as exc:
            raise MigrationError(self._failure(exc, guest, switchover_sent)) from exc
        except BaseException as exc:  # Ctrl-C, SIGTERM: same rule, then stop
            print(f"postcopy source: {self._failure(exc, guest, switchover_sent)}", file=sys.stderr)
            raise
        finally:
            if self._fence is not None:
                self._fence.close()
            if dirty_log is not None:
                dirty_log.stop()
            for channel in (main, urgent):
                if channel is not None:
                    channel.close()
            mem.close()
            guest.close()
        return {
            "mode": cfg.mode,
            "dirty_log": dirty_log.name if dirty_log is not None else "none",
            "total_ms": (time.monotonic() - started) * 1e3,
            "precopy_ms": (pause_started - started) * 1e3,
            "switchover_ms": (switched - pause_started) * 1e3,
            # Where the source's part of the downtime went, ms after the pause request.
            "switchover_breakdown_ms": {k: (t - pause_started) * 1e3 for k, t in marks.items()},
            "final_stale_pages": ranges.total(stale) if cfg.mode == "hybrid" else 0,
            "push_ms": (push_done - switched) * 1e3,
            "rounds": [r.as_dict() for r in rounds],
            "stop_reason": stop_reason,
            "bytes_sent": main.bytes_sent + urgent.bytes_sent,
            "bytes_sent_urgent": urgent.bytes_sent,
            "pages_skipped_free": sum(r.skipped_free for r in rounds),
            **{k: v for k, v in vars(self.stats).items() if k.startswith("pages_")},
            "requests": self.stats.requests,
            "recoveries_ms": self.recoveries,
            "max_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
            "dest": complete,
        }

    def _recover(self, mem: GuestMemory, session: bytes, main: Channel, urgent: Channel,
                 server: threading.Thread, cause: BaseException) -> tuple[Channel, Channel]:
        """Postcopy recovery: reconnect with the same key and session, learn from the
        destination which pages it still lacks, and push those again. The guest stays
        paused here with all its RAM whatever happens."""
        started = time.monotonic()
        deadline = started + self.config.recovery_timeout
        self._link_lost.set()  # no fence refresh while out of contact
        main.close()
        urgent.close()
        server.join(timeout=5)
        self.protocol.link_lost()
        print(f"postcopy source: link lost ({cause}); reconnecting for up to "
              f"{self.config.recovery_timeout:g} s", file=sys.stderr, flush=True)
        while True:
            try:
                self._fence.refresh()  # before the destination can hear from us again
                main = self._open_channel(mem, session, "main", deadline)
                urgent = self._open_channel(mem, session, "urgent", deadline)
                missing = self._outstanding(main)
                break
            except (ChannelClosed, OSError, MigrationError, wire.ProtocolError) as exc:
                if time.monotonic() >= deadline:
                    raise MigrationError(f"the link to the destination stayed down longer than the recovery "
                                         f"timeout ({self.config.recovery_timeout:g} s): {exc}") from None
                time.sleep(0.1)
        self._sent = bytearray(b"\x01" * mem.npages)
        for first, count in missing:
            self._sent[first:first + count] = bytes(count)
        self._link_lost.clear()
        self._urgent_error = None
        main.send(wire.RecoveryAck())
        self.recoveries.append((time.monotonic() - started) * 1e3)
        print(f"postcopy source: link recovered after {self.recoveries[-1]:.0f} ms; "
              f"{ranges.total(missing)} pages outstanding", file=sys.stderr, flush=True)
        return main, urgent

    @staticmethod
    def _outstanding(main: Channel) -> list[tuple[int, int]]:
        """After a reconnect the destination lists the runs it still lacks, then RecoveryEnd."""
        missing = []
        while True:
            message = main.recv()
            if isinstance(message, wire.PageRequest):
                missing.append((message.first_page, message.npages))
            elif isinstance(message, wire.RecoveryEnd):
                return missing
            elif isinstance(message, wire.Error):
                raise MigrationError(f"the destination refused to resume: {message.reason}")
            else:
                raise wire.ProtocolError(f"unexpected {type(message).__name__} while resuming")

    def _failure(self, exc: BaseException, guest: GuestClient, switchover_sent: bool) -> str:
        """Say what failed and where the guest is; before the switchover the guest
        goes on running here."""
        if not switchover_sent:
            try:
                if guest.status().get("state") == "paused":
                    guest.resume()
                return f"migration failed: {exc}. The guest goes on running on the source."
            except Exception as resume_exc:  # the guest itself is gone
                if self._guest_pid is not None and not _alive(self._guest_pid):
                    return (f"migration failed: the guest (pid {self._guest_pid}) exited before the switchover "
                            f"(did it finish its steps?): {exc}")
                return f"migration failed: {exc}; the source guest could not be resumed: {resume_exc}"
        remaining = self._fence.remaining() if self._fence is not None else None
        return (f"migration failed after the switchover: {exc}. The guest is kept paused on the source with "
                f"all its RAM (control socket {self.config.guest_control}). {fence_note(remaining)}")

    def _free_hint(self, guest: GuestClient, mem: GuestMemory) -> list[tuple[int, int]]:
        """Pages the guest reports free right now (skipped: their content is undefined)."""
        if not self.config.free_page_hints:
            return []
        try:
            reply = guest.request("free_ranges")
        except GuestError:
            return []  # a guest without free-page reporting
        ps = mem.page_size
        return ranges.normalize((offset // ps, length // ps) for offset, length in reply.get("ranges", []))

    def _await_ready(self, main: Channel) -> None:
        """The destination answers Ready once it has handled everything sent before it:
        the first one once its incoming guest is up and its fault server runs (starting
        a guest there is never downtime here), later ones once the precopy pages are in."""
        main.send(wire.ReadyCheck())
        message = main.recv()
        if isinstance(message, wire.Error):
            raise MigrationError(f"the destination is not ready: {message.reason}")

    def _await_complete(self, main: Channel) -> dict:
        message = main.recv()
        if isinstance(message, wire.Complete):
            return message.info
        if isinstance(message, wire.Error):
            raise MigrationError(f"the destination failed: {message.reason}")
        raise wire.ProtocolError(f"expected Complete, got {type(message).__name__}")

    # -- precopy -----------------------------------------------------------------------
    def _send_precopy(self, mem: GuestMemory, main: Channel, runs: list[tuple[int, int]], resend: bool) -> int:
        """Round 0 covers all of RAM (the gaps go as zero ranges); later rounds send
        just the dirty runs. Returns the bytes this sent."""
        before = main.bytes_sent
        if resend:
            for first, count in ranges.split(runs, self.config.run_pages):
                mem.send_run(main, first, count, wire.Cause.RESENT, self._scratch)
                self.stats.add("pages_resent", count)
        else:
            self._send_range(mem, main, 0, mem.npages, runs, wire.Cause.PRECOPY, self._scratch)
        return main.bytes_sent - before

    def _prepare_postcopy(self, mem: GuestMemory, stale: list[tuple[int, int]], precopied: bool) -> None:
        """What is left to push: everything (pure postcopy) or the stale pages (hybrid)."""
        self._sent = bytearray(b"\x01" * mem.npages) if precopied else bytearray(mem.npages)
        for first, count in stale:
            self._sent[first:first + count] = bytes(count)
        self._sent[0] = 1  # the state page went with the switchover

    # -- pusher ------------------------------------------------------------------------
    def _push(self, mem: GuestMemory, main: Channel) -> None:
        """Send every page not yet sent: a sequential sweep in large runs (zero ranges
        for untouched pages), and after each demand fault a short window right behind
        the faulting page first (pre-paging: the guest is likely to touch it next)."""
        sent = self._sent
        if sent.find(0) < 0:
            return  # precopy sent it all
        extents = self._extents = PageExtents(mem.populated_extents())
        run_pages = min(self.config.run_pages, MAX_RUN_BYTES // mem.page_size)
        pos = 0
        while True:
            if self._link_lost.is_set():
                raise ChannelClosed("the urgent channel broke")
            if self._urgent_error is not None:
                raise MigrationError(f"urgent channel failed: {self._urgent_error}")
            hint, self._hint = self._hint, None
            if hint is not None and hint < mem.npages:
                self._push_unsent(mem, main, extents, hint, min(hint + PREPAGE_PAGES, mem.npages))
            first = sent.find(0, pos)
            if first < 0:
                first = sent.find(0)
                if first < 0:
                    return
            end = min(first + run_pages, mem.npages)
            self._push_unsent(mem, main, extents, first, end)
            pos = end

    def _push_unsent(self, mem: GuestMemory, main: Channel, extents: PageExtents, first: int, end: int) -> None:
        """Push the pages of [first, end) not sent yet."""
        sent = self._sent
        while first < end:
            with self._sent_lock:  # find and claim at once: the urgent server marks pages too
                first = sent.find(0, first, end)
                if first < 0:
                    return
                stop = sent.find(1, first, end)
                stop = end if stop < 0 else stop
                sent[first:stop] = b"\x01" * (stop - first)
            self._send_range(mem, main, first, stop, extents.runs_in(first, stop), wire.Cause.PUSHED, self._scratch)
            first = stop

    def _send_range(self, mem: GuestMemory, channel: Channel, first: int, end: int,
                    runs: list[tuple[int, int]], cause: wire.Cause, scratch: bytearray | None) -> None:
        """Send [first, end): the populated runs as pages (frames of at most run_pages),
        the gaps as zero ranges."""
        cursor = first
        stats = self.stats
        counter = _CAUSE_COUNTERS[cause]
        for start, count in ranges.split(runs, self.config.run_pages):
            if start > cursor:
                channel.send(wire.ZeroRange(first_page=cursor, npages=start - cursor))
                stats.add("pages_zero", start - cursor)
            mem.send_run(channel, start, count, cause, scratch)
            stats.add(counter, count)
            cursor = start + count
        if cursor < end:
            channel.send(wire.ZeroRange(first_page=cursor, npages=end - cursor))
            stats.add("pages_zero", end - cursor)

    # -- urgent channel ----------------------------------------------------------------
    def _serve_urgent(self, mem: GuestMemory, urgent: Channel) -> None:
        """Answer page requests at once; they never queue behind pushed data."""
        make_current_thread_urgent()
        scratch = GuestMemory.scratch() if mem.memfd is None else None
        try:
            while True:
                message = urgent.recv()
                if not isinstance(message, wire.PageRequest):
                    raise wire.ProtocolError(f"unexpected {type(message).__name__} on the urgent channel")
                self.stats.add("requests", 1)
                first, end = message.first_page, message.first_page + message.npages
                if self._extents is not None:
                    runs = self._extents.runs_in(first, end)
                else:  # the pusher is still sweeping the extents: ask page by page
                    runs = [(page, 1) for page in range(first, end) if mem.is_populated(page)]
                self._send_range(mem, urgent, first, end, runs, wire.Cause.DEMAND, scratch)
                with self._sent_lock:
                    self._sent[first:end] = b"\x01" * (end - first)
                self._hint = end
        except ChannelClosed:
            # Either every page is in (the destination closes the channel), or the link
            # broke: the pusher notices and recovers.
            self._link_lost.set()
        except BaseException as exc:  # surfaced by the pusher
            self._urgent_error = exc


_CAUSE_COUNTERS = {
    wire.Cause.PRECOPY: "pages_precopy",
    wire.Cause.RESENT: "pages_resent",
    wire.Cause.PUSHED: "pages_pushed",
    wire.Cause.DEMAND: "pages_demand",
}


def _alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
