"""The source agent: attaches to a running guest, pauses it, hands its state over, then
serves demand requests on the urgent channel while the pusher streams every other page
on the main channel. The guest's RAM stays intact until the destination confirms that
every page is in."""
from __future__ import annotations

import secrets
import socket
import sys
import threading
import time
from dataclasses import dataclass, field

from typing import IO

from postcopy import ranges
from postcopy.guest.control import GuestClient, GuestError
from postcopy.kernel.dirtylog import DirtyLog, DirtyLogUnavailable, open_dirty_log
from postcopy.kernel.meminfo import peak_rss_kib
from postcopy.migration.demandserver import DemandServer
from postcopy.migration.dirtyrate import predict
from postcopy.migration.fence import LeaseKeeper, fence_keeper, fence_note
from postcopy.migration.guestmem import GuestMemory
from postcopy.migration.precopy import ConvergencePolicy, GuestControls, RoundStats, run_rounds
from postcopy.migration.progress import Progress
from postcopy.migration.ratelimit import RateLimiter
from postcopy.migration.sender import PageSender, SourceStats, UrgentChannelFailed
from postcopy.migration.status import StatusServer
from postcopy.protocol import wire
from postcopy.protocol.channel import Channel, ChannelClosed, handshake, tune


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
    max_bandwidth: float = 0.0  # bytes/s for precopy rounds (0: no limit)
    max_postcopy_bandwidth: float = 0.0  # bytes/s for the pusher; demand pages are never held back
    events: IO[str] | None = None  # JSON lines, one per status change
    terminal: IO[str] | None = None  # where the live progress line goes (None: nowhere)
    status_socket: str | None = None  # `postcopy status --source PATH` answers from here


MODES = ("postcopy", "precopy", "hybrid")
DISCARD_BATCH = 4096  # runs per Discard frame (well inside the frame size limit)
THROTTLE_SLICE_S = 0.012  # a vCPU throttle's nap ends within one slice (10 ms) of its lifting


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


@dataclass
class _Migration:
    """What one run of the agent holds; its phases fill it in."""

    guest: GuestClient
    info: dict
    mem: GuestMemory
    status: dict
    sender: PageSender
    session: bytes = b""
    dirty_log: DirtyLog | None = None
    main: Channel | None = None
    urgent: Channel | None = None
    server: DemandServer | None = None
    controls: GuestControls = field(default_factory=GuestControls)
    rounds: list[RoundStats] = field(default_factory=list)
    stop_reason: str | None = None
    prediction: dict | None = None
    stale: list[tuple[int, int]] = field(default_factory=list)
    marks: dict[str, float] = field(default_factory=dict)
    steps_ns: dict[str, int] = field(default_factory=dict)  # the switchover's steps (report.DOWNTIME_STEPS)
    switchover_sent: bool = False
    complete: dict = field(default_factory=dict)


class SourceAgent:
    """Runs one migration from the source side. Use :meth:`run`."""

    def __init__(self, config: SourceConfig):
        if config.mode not in MODES:
            raise ValueError(f"mode {config.mode!r} is not one of {', '.join(MODES)}")
        self.config = config
        self.stats = SourceStats()  # the sender's, once attached
        self._guest_pid: int | None = None
        self._lease: str | None = None
        self._fence: LeaseKeeper | None = None
        self._sender: PageSender | None = None
        self.recoveries: list[float] = []
        self.protocol = wire.Session(wire.MIGRATION, "source")  # checks every frame of both channels
        self.progress = Progress(ram_bytes=0)
        self._rate = {"t0": time.monotonic(), "bytes0": 0, "bytes": 0}  # throughput of the current phase
        self._rate_lock = threading.Lock()

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

    def _in_contact(self) -> bool:
        return self._sender is not None and not self._sender.link_lost.is_set()

    # -- the migration -----------------------------------------------------------------
    def run(self) -> dict:
        """Migrate the guest; returns the source's figures merged with the destination's
        (from its Complete message). Raises MigrationError on failure; before the
        switchover the guest goes on running here, after it the guest stays paused here
        with all its RAM until the destination confirms."""
        cfg = self.config
        started = time.monotonic()
        m = self._attach()
        self.progress = Progress(ram_bytes=m.mem.size, events=cfg.events, terminal=cfg.terminal)
        status_server = None
        try:
            status_server = StatusServer(cfg.status_socket, self.progress.status) if cfg.status_socket else None
            self.progress.event("setup", mode=cfg.mode)
            self._connect(m)
            self._precopy(m)
            self._switchover(m)
            self._postcopy(m)
            self.progress.event("done", bytes_sent=m.main.bytes_sent + m.urgent.bytes_sent)
        except (ChannelClosed, wire.ProtocolError, OSError, MigrationError, GuestError, UrgentChannelFailed) as exc:
            message = self._failure(exc, m)
            self.progress.event("failed", error=message)
            raise MigrationError(message) from exc
        except BaseException as exc:  # Ctrl-C, SIGTERM: same rule, then stop
            message = self._failure(exc, m)
            self.progress.event("failed", error=message)
            print(f"postcopy source: {message}", file=sys.stderr)
            raise
        finally:
            self._close(m, status_server)
        return self._report(m, started)

    def _attach(self) -> _Migration:
        """Take the guest's lease (one migration of a guest at a time) and its RAM."""
        cfg = self.config
        guest = None
        try:
            guest = GuestClient(cfg.guest_control)
            if guest.status().get("state") == "incoming":  # before the lease: its end would stop that guest
                raise GuestError(f"{cfg.guest_control} is an incoming guest (it waits for its source); "
                                 "a source migrates a running guest")
            self._lease = guest.lease()
            info, fds = guest.take_fds()
            status = guest.status()
        except GuestError as exc:
            if guest is not None:
                guest.close()
            raise MigrationError(f"cannot attach to the guest: {exc}") from None
        self._guest_pid = info.get("pid")
        mem = GuestMemory(info, fds)
        self._sender = PageSender(mem, cfg.run_pages, precopy_limit=RateLimiter(cfg.max_bandwidth),
                                  push_limit=RateLimiter(cfg.max_postcopy_bandwidth), on_progress=self._moved)
        self.stats = self._sender.stats
        return _Migration(guest=guest, info=info, mem=mem, status=status, sender=self._sender)

    def _connect(self, m: _Migration) -> None:
        cfg = self.config
        if cfg.mode != "postcopy":
            try:  # refuses a backend this kernel lacks before the guest is touched
                m.dirty_log = open_dirty_log(cfg.dirty_log, m.guest, m.info)
            except DirtyLogUnavailable as exc:
                raise MigrationError(str(exc)) from None
        m.session = secrets.token_bytes(wire.SESSION_BYTES)
        m.main = self._open_channel(m.mem, m.session, "main")
        m.urgent = self._open_channel(m.mem, m.session, "urgent")
        self.protocol.established()
        self._await_ready(m.main)

    def _precopy(self, m: _Migration) -> None:
        """Rounds while the guest runs (precopy and hybrid), throttled as the policy says."""
        cfg = self.config
        if m.dirty_log is None:
            return
        m.dirty_log.start()
        m.controls = self._guest_controls(m)
        self._new_phase()
        m.rounds, m.stop_reason = run_rounds(
            populated=m.mem.populated_extents(), dirty_log=m.dirty_log,
            send=lambda runs, resend: m.sender.send_precopy(m.main, runs, resend),
            free_hint=lambda: self._free_hint(m.guest, m.mem), policy=cfg.policy, page_size=m.mem.page_size,
            guest=m.controls)
        # Let the destination install the last round before the pause: its backlog is not downtime.
        self._await_ready(m.main)

    def _guest_controls(self, m: _Migration) -> GuestControls:
        """The policy's hands on the guest: its step count, vCPU throttle and rate cap."""
        policy, page_size, guest = self.config.policy, m.mem.page_size, m.guest

        def steps() -> int:
            value = guest.status().get("steps", 0)
            return sum(value) if isinstance(value, list) else int(value)

        def on_round(r: RoundStats) -> None:
            if r.round >= 1 and r.bytes_per_s > 0:
                m.prediction = predict(r.dirty_rate * page_size, r.bytes_per_s, policy.downtime_limit_ms)
            self.progress.event("precopy", round=r.round, dirty_rate_pages_s=r.dirty_rate,
                                throughput_bytes_s=r.bytes_per_s, throttle_pct=r.throttle_pct,
                                expected_downtime_ms=policy.expected_downtime_ms(r, page_size))

        throttles = policy.auto_converge or policy.dirty_limit > 0
        return GuestControls(steps=steps if throttles else (lambda: 0), on_round=on_round,
                             throttle=lambda percent: guest.request("throttle", percent=percent),
                             rate_cap=lambda rate: guest.request("rate_cap", steps_per_s=rate))

    def _switchover(self, m: _Migration) -> None:
        """Pause, send what precopy left (or list it stale), the state page and the
        Switchover; from then on the destination may run the guest."""
        cfg = self.config
        marks = m.marks
        if m.controls.applied["throttle"]:
            # Lift the throttle a slice before the pause: a vCPU napping in it steps again,
            # so the downtime (the guest's heartbeat gap) is not the nap's length.
            m.controls.lift()
            time.sleep(THROTTLE_SLICE_S)
        # Connected before the pause, armed by the pause itself (the guest sets the fence,
        # then parks): before any Switchover, and no round trip of its own in the downtime.
        self._fence = fence_keeper(cfg.guest_control, self._lease, cfg.recovery_timeout, in_contact=self._in_contact)
        m.sender.make_plane(precopied=m.dirty_log is not None)  # mapping the RAM, writing the sent map: not downtime
        m.server = DemandServer(m.sender, lambda: m.urgent, held=True)  # released right after the Switchover
        marks["pause_started"] = time.monotonic()  # downtime starts: the guest parks at a step boundary
        m.steps_ns["pause_asked"] = time.monotonic_ns()
        paused = self._fence.arm_with(lambda fence: m.guest.pause(fence=fence))
        marks["pause"] = time.monotonic()
        m.steps_ns.update(last_step=paused["last_heartbeat_ns"], parked=paused["paused_ns"],
                          pause_replied=time.monotonic_ns())
        if m.dirty_log is not None:
            m.stale = m.dirty_log.harvest()  # stopped after the switchover: not downtime
            marks["final_harvest"] = time.monotonic()
            m.steps_ns["final_harvest"] = time.monotonic_ns()
            if cfg.mode == "precopy":
                m.sender.send_precopy(m.main, m.stale, True)
                m.stale = []
            else:
                for i in range(0, len(m.stale), DISCARD_BATCH):
                    m.main.send(wire.Discard(ranges=tuple(m.stale[i:i + DISCARD_BATCH])))
            marks["final_send"] = time.monotonic()
            m.steps_ns["final_send"] = time.monotonic_ns()
        m.sender.send_state(m.main)
        m.steps_ns["state_sent"] = time.monotonic_ns()
        m.sender.prepare_postcopy(m.stale, precopied=m.dirty_log is not None)
        m.main.send(wire.Switchover(info={
            "recovery_timeout_s": cfg.recovery_timeout,
            "mode": cfg.mode,
            "paused_ns": paused["paused_ns"],
            "last_heartbeat_ns": paused["last_heartbeat_ns"],
            "steps": paused["steps"],
            "guest": {k: m.status.get(k) for k in ("threads", "workload", "steps_target", "backing", "ram_size")},
        }))
        m.switchover_sent = True
        marks["switchover"] = time.monotonic()
        m.steps_ns["switchover_sent"] = time.monotonic_ns()
        # The guest's first faults there come within a millisecond: serve before anything else.
        m.server.release()
        m.server.wait_serving(m.steps_ns)
        self.progress.event("switchover", stale_pages=ranges.total(m.stale))
        m.controls.lift()  # the paused guest here keeps no throttle (the destination's never had one)
        if m.dirty_log is not None:
            m.dirty_log.stop()  # the guest stays paused here; write-protection is moot

    def _postcopy(self, m: _Migration) -> None:
        """Serve demand requests and push the rest until the destination confirms;
        recover the link if it breaks."""
        cfg = self.config
        if cfg.mode != "precopy":
            self._new_phase()
            self.progress.event("postcopy")
        push_delay = cfg.push_delay
        while True:
            if m.server is None:  # released at the switchover; a new one after a recovery
                m.server = DemandServer(m.sender, lambda: m.urgent, held=False)
                m.server.wait_serving(m.steps_ns)
            try:
                if push_delay and m.sender.link_lost.wait(push_delay):
                    raise ChannelClosed("urgent channel broke")
                push_delay = 0.0
                m.sender.push(m.main)
                m.main.send(wire.PushDone(pages=self.stats.pages_pushed))
                m.complete = self._await_complete(m.main)
                m.sender.completed()
                break
            except ChannelClosed as exc:
                if cfg.recovery_timeout <= 0:
                    raise
                self.progress.event("recovery", error=str(exc))
                self._recover(m, exc)
                m.server = None
                self.progress.event("postcopy")
        m.marks["push_done"] = time.monotonic()
        m.guest.quit()  # the destination holds every page now
        m.urgent.close()
        m.server.join(timeout=5)

    def _close(self, m: _Migration, status_server: StatusServer | None) -> None:
        if m.server is not None:
            m.server.abandon()  # one still waiting for a Switchover returns
        if self._fence is not None:
            self._fence.close()
        if m.dirty_log is not None:
            m.dirty_log.stop()
        for channel in (m.main, m.urgent):
            if channel is not None:
                channel.close()
        m.mem.close()
        m.guest.close()
        if status_server is not None:
            status_server.close()
        self.progress.close()

    def _report(self, m: _Migration, started: float) -> dict:
        marks, pause_started = m.marks, m.marks["pause_started"]
        return {
            "mode": self.config.mode,
            "guest": {k: m.status.get(k) for k in ("pid", "threads", "workload", "steps_target", "backing",
                                                   "ram_size")},
            "dirty_log": m.dirty_log.name if m.dirty_log is not None else "none",
            "total_ms": (time.monotonic() - started) * 1e3,
            "precopy_ms": (pause_started - started) * 1e3,
            "switchover_ms": (marks["switchover"] - pause_started) * 1e3,
            # Where the source's part of the downtime went, ms after the pause request.
            "switchover_breakdown_ms": {k: (t - pause_started) * 1e3 for k, t in marks.items()
                                        if k in ("pause", "final_harvest", "final_send", "switchover")},
            "switchover_marks_ns": m.steps_ns,
            "final_stale_pages": ranges.total(m.stale) if self.config.mode == "hybrid" else 0,
            "push_ms": (marks["push_done"] - marks["switchover"]) * 1e3,
            "rounds": [r.as_dict() for r in m.rounds],
            "stop_reason": m.stop_reason,
            "convergence_prediction": m.prediction,
            "bandwidth_limits": {"precopy_bytes_s": self.config.max_bandwidth,
                                 "postcopy_bytes_s": self.config.max_postcopy_bandwidth,
                                 "precopy_held_back_s": m.sender.precopy_limit.waited_s,
                                 "postcopy_held_back_s": m.sender.push_limit.waited_s},
            "bytes_sent": m.main.bytes_sent + m.urgent.bytes_sent,
            "bytes_sent_urgent": m.urgent.bytes_sent,
            "pages_skipped_free": sum(r.skipped_free for r in m.rounds),
            **self.stats.pages(),
            "requests": self.stats.requests,
            "recoveries_ms": self.recoveries,
            "max_rss_kib": peak_rss_kib(),
            "dest": m.complete,
        }

    # -- live figures ------------------------------------------------------------------
    def _new_phase(self) -> None:
        with self._rate_lock:
            self._rate.update(t0=time.monotonic(), bytes0=self._rate["bytes"])

    def _moved(self, nbytes: int) -> None:
        """Called by the sender after each run: refresh the live figures."""
        with self._rate_lock:
            self._rate["bytes"] += nbytes
            sent, elapsed = self._rate["bytes"], time.monotonic() - self._rate["t0"]
            rate = (sent - self._rate["bytes0"]) / elapsed if elapsed > 0 else 0.0
        self.progress.update(bytes_sent=sent, throughput_bytes_s=rate)

    # -- recovery ----------------------------------------------------------------------
    def _recover(self, m: _Migration, cause: BaseException) -> None:
        """Postcopy recovery: reconnect with the same key and session, learn from the
        destination which pages it still lacks, and push those again. The guest stays
        paused here with all its RAM whatever happens."""
        started = time.monotonic()
        deadline = started + self.config.recovery_timeout
        m.sender.lose_link()  # no fence refresh while out of contact
        m.main.close()
        m.urgent.close()
        m.server.join(timeout=5)
        self.protocol.link_lost()
        print(f"postcopy source: link lost ({cause}); reconnecting for up to "
              f"{self.config.recovery_timeout:g} s", file=sys.stderr, flush=True)
        while True:
            try:
                self._fence.refresh()  # before the destination can hear from us again
                main = self._open_channel(m.mem, m.session, "main", deadline)
                urgent = self._open_channel(m.mem, m.session, "urgent", deadline)
                missing = self._outstanding(main)
                break
            except (ChannelClosed, OSError, MigrationError, wire.ProtocolError) as exc:
                if time.monotonic() >= deadline:
                    raise MigrationError(f"the link to the destination stayed down longer than the recovery "
                                         f"timeout ({self.config.recovery_timeout:g} s): {exc}") from None
                time.sleep(0.1)
        m.sender.outstanding_after_recovery(missing)
        main.send(wire.RecoveryAck())
        m.main, m.urgent = main, urgent
        self.recoveries.append((time.monotonic() - started) * 1e3)
        print(f"postcopy source: link recovered after {self.recoveries[-1]:.0f} ms; "
              f"{ranges.total(missing)} pages outstanding", file=sys.stderr, flush=True)

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

    def _failure(self, exc: BaseException, m: _Migration) -> str:
        """Say what failed and where the guest is; before the switchover the guest
        goes on running here (unthrottled)."""
        if not m.switchover_sent:
            try:
                self._unfence()
                m.controls.lift()
                if m.guest.status().get("state") == "paused":
                    m.guest.resume()
                return f"migration failed: {exc}. The guest goes on running on the source."
            except Exception as resume_exc:  # the guest itself is gone
                if self._guest_pid is not None and not _alive(self._guest_pid):
                    return (f"migration failed: the guest (pid {self._guest_pid}) exited before the switchover "
                            f"(did it finish its steps?): {exc}")
                return f"migration failed: {exc}; the source guest could not be resumed: {resume_exc}"
        remaining = self._fence.remaining() if self._fence is not None else None
        return (f"migration failed after the switchover: {exc}. The guest is kept paused on the source with "
                f"all its RAM (control socket {self.config.guest_control}). {fence_note(remaining)}")

    def _unfence(self) -> None:
        """Before the Switchover went out no destination can run the guest: the fence
        the pause set ends here (renewals first), so the guest may run on here."""
        if self._fence is not None:
            self._fence.close()
            self._fence.lift()

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


def _alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
