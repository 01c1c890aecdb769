"""The destination agent: starts (or attaches to) the incoming guest, takes its
userfaultfd, resumes it as soon as the state arrives, and runs the fault server: fault
events become page requests on the urgent channel, arriving runs are installed with one
UFFDIO_COPY each (or another install path, see :mod:`postcopy.migration.install`), and the range
is unregistered once every page is in."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

from postcopy import report

from postcopy.protocol import wire
from postcopy.migration.fence import LeaseKeeper, watchdog_keeper, watchdog_seconds
from postcopy.migration.dp_recv import PageReceiver, channel_sinks
from postcopy.migration.prealloc import preallocated
from postcopy.migration.faults import FaultServer, UrgentLender
from postcopy.migration.install import (DEFAULT_STAGING_PAGES, CopyPath, InstallError, InstallTarget, guest_options,
                                        install_path_error, make_install_path)
from postcopy.migration.pagetable import REQUESTED, PageTable, StopEvent
from postcopy._native import lib as native
from postcopy.kernel.meminfo import ram_fit_error
from postcopy.kernel.priority import make_current_thread_urgent
from postcopy.kernel.process import die_with_parent
from postcopy.migration.destreport import ReceiveFacts, first_step_ns, max_step_gap_ns, receive_figures
from postcopy.guest.control import GuestClient, GuestError, wait_for_control
from postcopy.protocol.channel import Channel, ChannelClosed, PeerInfo
from postcopy.migration.listener import AcceptTimeout, Listener
from postcopy.protocol.endpoint import listen_socket
from postcopy.kernel.uffd import Feature, UffdError, Userfaultfd


class DestinationError(RuntimeError):
    """The incoming migration failed; the message says why."""


@dataclass
class DestConfig:
    listen: tuple[str, int]
    key: bytes
    workdir: str
    backing: str = "memfd"
    guest_control: str | None = None  # attach to this incoming guest instead of starting one
    accept_timeout: float = 60.0
    recovery_timeout: float = 30.0  # postcopy: how long to wait for the source to reconnect (0: never)
    install: str = "copy"  # install path: copy, continue (memfd) or move (anon); see postcopy.migration.install
    staging_pages: int = DEFAULT_STAGING_PAGES  # move: staging area of the guest this agent starts
    frame_auth: bool = True  # False is UNSAFE: only to measure what authentication costs
    guest_vm: str = "process"  # the guest this agent starts: process, or kvm (postcopy guest --vm)
    fault_poll: str = "sleep"  # the fault loop: sleep in poll(2), or spin (busy-poll; experiments)
    requests_in_c: bool = True  # the fault loop sends its requests itself (False: through Python)
    data_in_c: bool = True  # copy and continue paths: page runs and zero ranges received and installed in C
    prealloc: bool = False  # continue path: populate the guest's RAM before any page moves (migration/prealloc.py)


class DestinationAgent:
    """Receives one postcopy migration. Use :meth:`run` (or :meth:`bind` then :meth:`run`)."""

    def __init__(self, config: DestConfig, listener: socket.socket | None = None):
        self.config = config
        self.listener = listener
        self.guest_proc: subprocess.Popen | None = None
        self.final_hash: str | None = None
        self.final_max_step_gap_ns: int | None = None  # from the guest's last output line
        self._stop = StopEvent()  # also stops the page table's C loops
        self._first_push_ns: int | None = None
        self._timeline = report.Timeline()
        self.table: PageTable | None = None  # page states, counts and fault latencies, from _setup
        self._target: InstallTarget | None = None
        self._fault_server: FaultServer | None = None
        self._thread_error: BaseException | None = None
        self._main: Channel | None = None
        self._urgent: Channel | None = None  # None while the link is being recovered
        self._session: bytes | None = None
        self._switched = False
        self._link_broken = threading.Event()
        self._recoveries: list[float] = []  # ms from noticing the break to resuming
        self._path: CopyPath | None = None  # the install strategy, chosen in _setup
        self.protocol = wire.Session(wire.MIGRATION, "dest")  # checks every frame of every channel
        self._source_recovery_timeout: float | None = None  # from the Switchover
        self._guest_client: GuestClient | None = None  # holds the incoming guest's lease
        self._lease: str | None = None
        self._watchdog: LeaseKeeper | None = None  # renews the incoming guest's watchdog
        self._killed_guest = False
        self._listener: Listener | None = None
        self._fault_thread: threading.Thread | None = None
        self._urgent_thread: threading.Thread | None = None
        self._lender: UrgentLender | None = None  # lends the urgent channel's send side to the fault loop
        self._receivers: dict[str, PageReceiver] = {}  # per channel name: data frames received in C
        self._prealloc_ms: float | None = None  # --prealloc: populating the guest's RAM took this long

    def bind(self) -> socket.socket:
        """Listen on the configured endpoint (call before run to learn the port).
        Refuses an install path this backing or kernel cannot do before anyone connects."""
        if self.config.guest_control is None:
            error = install_path_error(self.config.install, self.config.backing, prealloc=self.config.prealloc)
            if error:
                raise DestinationError(error)
        if self.listener is None:
            self.listener = listen_socket(self.config.listen)
        if self._listener is None:  # accepts and authenticates in the background from now on
            self._listener = Listener(self.listener, self.config.key, protocol=self.protocol,
                                      frame_auth=self.config.frame_auth)
        return self.listener

    def _accept(self, name: str, session: bytes | None, timeout: float | None = None) -> tuple[Channel, PeerInfo]:
        """The next authenticated channel of this migration within ``timeout`` (default:
        the configured one; strangers and other sources are the listener's business)."""
        try:
            return self._listener.accept(name, session, self.config.accept_timeout if timeout is None else timeout)
        except AcceptTimeout as exc:
            if session is None:  # no migration began: nothing else will close it
                self._listener.close()
            raise DestinationError(str(exc)) from None

    # -- guest -----------------------------------------------------------------------
    def _start_guest(self, ram_size: int) -> str:
        error = ram_fit_error(ram_size)  # refused now, not at the very end (UFFDIO_UNREGISTER: ENOMEM)
        if error:
            raise DestinationError(f"the source's guest cannot run here: {error}")
        control = os.path.join(self.config.workdir, "incoming.sock")
        argv = [sys.executable, "-m", "postcopy", "guest", "--incoming", "--ram", str(ram_size),
                "--backing", self.config.backing, "--control", control,
                *guest_options(self.config.install, self.config.staging_pages),
                *(["--vm", self.config.guest_vm] if self.config.guest_vm != "process" else [])]
        self.guest_proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True,
                                           preexec_fn=die_with_parent(os.getpid()))
        print(f"incoming guest pid {self.guest_proc.pid}", file=sys.stderr, flush=True)
        wait_for_control(control, proc=self.guest_proc)
        return control

    def stop_guest(self) -> None:
        """Stop the incoming guest before it has every page (a failed migration must not
        leave it running): kill the one this agent started; an attached one stops when
        its lease (our control connection) ends."""
        if self._guest_client is not None:
            self._guest_client.close()
        if self.guest_proc is not None and self.guest_proc.poll() is None:
            self.guest_proc.kill()
            self.guest_proc.wait()
            # A guest already inside its exit (its watchdog fired) keeps its own status.
            self._killed_guest = self.guest_proc.returncode == -signal.SIGKILL

    def _stopped_note(self) -> str:
        """What became of the incoming guest after a failure (said only if true)."""
        if self.guest_proc is None:
            if self.config.guest_control is None:
                return "No incoming guest was started."
            if self._lease is None:
                return "The incoming guest this agent was to attach to was not touched."
            return ("The incoming guest this agent attached to stops now: its lease ended before every "
                    "page arrived.")
        if self._killed_guest:
            return f"The incoming guest was stopped (pid {self.guest_proc.pid}) before it had every page."
        return (f"The incoming guest (pid {self.guest_proc.pid}) had already exited with status "
                f"{self.guest_proc.returncode}.")

    def _read_guest_output(self) -> None:
        for line in self.guest_proc.stdout:
            if line.startswith("final_hash "):
                self.final_hash = line.split()[1]
            elif line.startswith("max_step_gap_ns "):
                self.final_max_step_gap_ns = int(line.split()[1])

    # -- the migration -----------------------------------------------------------------
    def run(self) -> dict:
        """Receive the migration; returns the destination's figures (also sent to the
        source in Complete)."""
        self.bind()
        main, peer = self._accept("main", None)
        urgent = None
        figures: dict = {}
        try:
            self._session = peer.hello.session
            urgent, _ = self._accept("urgent", self._session)
            self.protocol.established()
            layout = peer.layout
            if len(layout.regions) != 1 or layout.regions[0][0] != 0:
                raise DestinationError(f"unsupported RAM layout {layout.regions}")
            control = self.config.guest_control or self._start_guest(layout.regions[0][1])
            guest = self._guest_client = GuestClient(control)
            # Held until every page is in: if this agent goes away first, the guest stops.
            self._lease = guest.lease()
            # Armed before any frame can carry the Switchover: stopped anywhere from here on, this
            # agent cannot wake after the source's fence ended and run the guest (see fence).
            self._watchdog = watchdog_keeper(guest.path, self._lease, 0.0, lambda: not self._link_broken.is_set())
            self._watchdog.arm()
            info, fds = guest.take_fds(incoming=True)
            uffd = Userfaultfd.from_fd(fds["uffd"], Feature(info.get("uffd_features", 0)))
            self._setup(info, uffd, layout, fds.get("memfd"))
            try:
                self._path = make_install_path(self.config.install, self._target, info, fds)
            except ValueError as exc:
                raise DestinationError(str(exc)) from None
            self._fault_server = FaultServer(self._target, self._path, spin=self.config.fault_poll == "spin",
                                             lender=self._lender)
            self._make_receivers(layout)
            self._main, self._urgent = main, urgent
            self._lender.lend(urgent)  # the fault loop sends its requests itself
            figures = self._receive(guest, uffd)
            self._main.send(wire.Complete(info=figures))
        except BaseException as exc:  # Ctrl-C and SIGTERM too: the incoming guest must not run on
            self._stop.set()
            self.stop_guest()
            if isinstance(exc, DestinationError):
                raise DestinationError(f"{exc}. {self._stopped_note()}") from exc
            if isinstance(exc, (ChannelClosed, wire.ProtocolError, UffdError, OSError, GuestError, InstallError)):
                raise DestinationError(f"incoming migration failed: {exc}. {self._stopped_note()}") from exc
            raise
        finally:
            self._stop.set()
            if self._fault_thread is not None:
                # Its C loop uses the page table and the userfaultfd: it must be out of
                # them before they go (a failed run's exit crashed in it otherwise).
                self._fault_thread.join(timeout=10)
            if self._lender is not None:
                self._lender.take_back()  # before its descriptor closes
            if self._watchdog is not None:
                self._watchdog.close()
            for channel in {main, urgent, self._main, self._urgent} - {None}:
                channel.close()
            if self._urgent_thread is not None:
                self._urgent_thread.join(timeout=10)  # it may be receiving into the table in C
            if self._path is not None:
                self._path.close()
            self._listener.close()
            if self.table is not None:  # freed now, not by the collector at exit (under a live view)
                self.table.close_after(self._fault_thread, self._urgent_thread)
        if self.guest_proc is not None:
            reader = threading.Thread(target=self._read_guest_output, daemon=True)
            reader.start()
            self.guest_proc.wait()
            reader.join(timeout=5)
            figures["guest_exit_code"] = self.guest_proc.returncode
        figures["final_hash"] = self.final_hash
        if figures.get("max_step_gap_ms") is None and self.final_max_step_gap_ns is not None:
            figures["max_step_gap_ms"] = self.final_max_step_gap_ns / 1e6
        return figures

    def _setup(self, info: dict, uffd: Userfaultfd, layout: wire.Layout, memfd: int | None) -> None:
        self.uffd = uffd
        self.base = info["ram_address"]
        self.page_size = layout.page_size
        self.npages = layout.total_pages
        self.table = PageTable(self.npages, report.PAGE_CAUSES, self._timeline)
        self._stop.attach(self.table)
        self._lender = UrgentLender(self.table, enabled=self.config.requests_in_c)
        # Precopy resends overwrite pages already installed: through the memfd, or the
        # guest's /proc/PID/mem for anonymous memory (the page is present: no fault).
        self._memfd = memfd
        if memfd is not None:
            self._ram_fd, self._ram_fd_base = memfd, 0
        else:
            self._ram_fd = os.open(f"/proc/{info['pid']}/mem", os.O_RDWR | os.O_CLOEXEC)
            self._ram_fd_base = self.base
        # Installs and the reading of uffd events exclude each other (see InstallTarget).
        self._target = InstallTarget(table=self.table, uffd=uffd, gate=self.table.gate, base=self.base,
                                     page_size=self.page_size, ram_fd=self._ram_fd,
                                     ram_fd_base=self._ram_fd_base, memfd=memfd, stop=self._stop)

    def _receive(self, guest: GuestClient, uffd: Userfaultfd) -> dict:
        started = time.monotonic()
        faults = threading.Thread(target=self._guard, args=(self._fault_server.run, self._send_requests,
                                                            self._link_lost),
                                  name="fault-server", daemon=True)
        faults.start()
        self._fault_thread = faults
        self._start_urgent_receiver()
        switchover: dict | None = None
        resumed: dict | None = None
        push_done = False
        while not push_done:
            try:
                self._receive_data(self._main)
                message = self._main.recv()
            except ChannelClosed:
                self._recover()
                continue
            if isinstance(message, wire.PageRun):
                if self._first_push_ns is None and message.cause == wire.Cause.PUSHED:
                    self._first_push_ns = time.monotonic_ns()
                self._path.install(message.first_page, message.npages, message.data, message.cause)
            elif isinstance(message, wire.ZeroRange):
                self._fault_server.mark_zero(message.first_page, message.npages)
            elif isinstance(message, wire.Discard):
                self._discard(guest, message.ranges)
            elif isinstance(message, wire.Switchover):
                self._timeline.mark("switchover_read")
                switchover = message.info
                resumed = self._switch_over(guest, switchover)
            elif isinstance(message, wire.ReadyCheck):
                self._main.send(wire.Ready())  # guest up, fault server running
            elif isinstance(message, wire.PushDone):
                push_done = True
            elif isinstance(message, wire.Error):
                raise DestinationError(f"the source failed: {message.reason}")
            else:
                raise wire.ProtocolError(f"unexpected {type(message).__name__} on the main channel")
        while not self.table.all_in.wait(0.2):
            if self._thread_error is not None:
                raise self._thread_error
            if self._link_broken.is_set():
                self._recover()
        all_in = time.monotonic()
        # Every non-zero page is in; the pages still missing are exactly the zero ones,
        # which the kernel fills with zeros itself once the range is unregistered.
        self._stop.set()
        faults.join()
        uffd.unregister(self.base, self.npages * self.page_size)
        os.close(self._ram_fd)
        first_step = first_step_ns(guest, self._timeline)
        max_gap_ns = max_step_gap_ns(guest)
        guest.close()
        return receive_figures(ReceiveFacts(
            table=self.table, timeline=self._timeline, install=self._path.name, page_size=self.page_size,
            started=started, all_in=all_in, first_push_ns=self._first_push_ns, switchover=switchover,
            resumed=resumed, first_step_ns=first_step, max_gap_ns=max_gap_ns, recoveries_ms=self._recoveries,
            frames_in_c={name: r.counts.frames for name, r in self._receivers.items()}, prealloc_ms=self._prealloc_ms))

    def _switch_over(self, guest: GuestClient, switchover: dict) -> dict:
        """The source stopped its guest: widen the watchdog to the agreed recovery time
        and resume ours here."""
        self._source_recovery_timeout = switchover.get("recovery_timeout_s")
        # Every event of the discard was read (madvise waits for that): what the guest
        # removes from now on is its own.
        self.table.switched()
        self._timeline.mark("switched")
        # The guest widens its watchdog, then resumes (one request). Stopped or cut off,
        # this agent stops renewing, and the guest stops itself; a guest whose watchdog
        # lapsed already refuses this resume.
        resumed = self._watchdog.arm_with(lambda watchdog: guest.resume(watchdog=watchdog),
                                          watchdog_seconds(self._recovery_timeout()))
        self._timeline.mark("resume_replied")
        self._switched = True
        self._timeline.switchover_ns = time.monotonic_ns()
        return resumed

    def _guard(self, target, *args) -> None:
        try:
            target(*args)
        except BaseException as exc:
            if not self._stop.is_set():
                self._thread_error = exc

    # -- link recovery ---------------------------------------------------------------------
    def _start_urgent_receiver(self) -> None:
        channel = self._urgent
        self._urgent_thread = threading.Thread(target=self._guard, args=(self._receive_urgent, channel),
                                               name="urgent-receiver", daemon=True)
        self._urgent_thread.start()

    def _recovery_timeout(self) -> float:
        """How long to wait for the source after a break: ours, or the source's if
        shorter (its guest's fence counts on that: see postcopy.migration.fence)."""
        theirs = self._source_recovery_timeout
        if isinstance(theirs, (int, float)) and not isinstance(theirs, bool) and theirs >= 0:
            return min(self.config.recovery_timeout, float(theirs))
        return self.config.recovery_timeout

    def _link_lost(self) -> None:
        """A channel broke: wake the main thread (blocked in recv) so it recovers."""
        self._link_broken.set()
        if self._main is not None:
            self._main.close()

    def _recover(self) -> None:
        """Postcopy recovery (as QEMU's): the faulting guest threads wait while the
        source reconnects with the same key and session; then everything outstanding is
        asked for again. Before the switchover there is nothing to recover: the source
        goes on running the guest, and this side gives up."""
        timeout = self._recovery_timeout()
        if not self._switched or timeout <= 0 or self._stop.is_set():
            raise ChannelClosed("the link to the source broke")
        noticed = time.monotonic()
        self._link_broken.set()
        self._lender.take_back()  # before its descriptor closes
        for channel in (self._main, self._urgent):
            if channel is not None:
                channel.close()
        self._urgent = None
        self._urgent_thread.join(timeout=5)
        self.protocol.link_lost()
        print(f"link to the source lost; waiting up to {timeout:g} s for it to reconnect",
              file=sys.stderr, flush=True)
        try:
            main, _ = self._accept("main", self._session, max(0.01, noticed + timeout - time.monotonic()))
            urgent, _ = self._accept("urgent", self._session, max(0.01, noticed + timeout - time.monotonic()))
        except DestinationError as exc:
            raise DestinationError(f"the link to the source stayed down longer than the recovery timeout "
                                   f"({timeout:g} s)") from exc
        # Everything not in yet: the pusher sends it again; what threads wait on goes
        # first, on the urgent channel.
        outstanding, waiting = self.table.outstanding()
        for first, count in outstanding:
            main.send(wire.PageRequest(first_page=first, npages=count))
        main.send(wire.RecoveryEnd())
        reply = main.recv()  # RecoveryAck or Error: the table refuses anything else here
        if isinstance(reply, wire.Error):
            raise DestinationError(f"the source refused to resume: {reply.reason}")
        self._main, self._urgent = main, urgent
        self._link_broken.clear()
        if self._watchdog is not None:
            self._watchdog.refresh()  # in contact again: the guest may run on
        self._start_urgent_receiver()
        for page in waiting:
            if self.table[page] == REQUESTED:
                urgent.send(wire.PageRequest(first_page=page, npages=1))
        self._lender.lend(urgent)  # the fault loop sends its requests itself
        self._recoveries.append((time.monotonic() - noticed) * 1e3)
        print(f"link recovered after {self._recoveries[-1]:.0f} ms; {len(outstanding)} runs outstanding",
              file=sys.stderr, flush=True)

    # -- receiving pages -----------------------------------------------------------------
    def _make_receivers(self, layout: wire.Layout) -> None:
        """One C receiver per channel for the copy and continue paths (move: Python);
        with --prealloc, the guest's RAM populated first (before the ReadyCheck is
        answered, so before the source pauses its guest) and received into in place."""
        if self.config.data_in_c and self._path.name in ("copy", "continue"):
            ram = None  # bind() refused --prealloc on any other path
            if self.config.prealloc:
                ram, self._prealloc_ms = preallocated(self._memfd, self.npages * self.page_size)
            stop = native.pc_dp_table_stop_flag(self.table.native)
            sinks = channel_sinks(self._path.name, self.table, self._memfd, self.page_size, ram=ram)
            self._receivers = {name: PageReceiver(layout, sink, stop) for name, sink in sinks.items()}

    def _receive_data(self, channel: Channel) -> None:
        """Page runs and zero ranges received and installed in C until a frame is Python's."""
        receiver = self._receivers.get(channel.name)
        if receiver is None:
            return
        receiver.receive(channel)
        if self._first_push_ns is None:
            self._first_push_ns = receiver.counts.first_ns.get(wire.Cause.PUSHED)

    def _discard(self, guest: GuestClient, runs) -> None:
        """Hybrid: drop the pages dirtied since their last send, so they fault in anew.
        A memfd is punched right here (no round trip to the guest, no events); anonymous
        memory needs the guest's own madvise (its REMOVE events are read by our fault
        server meanwhile)."""
        ps = self.page_size
        if self._memfd is not None:
            for first, count in runs:
                err = native.pc_punch_hole(self._memfd, first * ps, count * ps)
                if err:
                    raise OSError(-err, f"punching pages {first}+{count} out of the guest's memfd")
        else:
            guest.discard([(first * ps, count * ps) for first, count in runs])
        self.table.discard(runs)

    def _send_requests(self, runs: list[tuple[int, int]]) -> None:
        """Ask the source for the runs (first, count) of pages the guest faulted on
        (fault server thread)."""
        urgent = self._urgent
        if urgent is None:
            return  # recovering: these pages are asked for again once reconnected
        try:
            for first, count in runs:
                urgent.send(wire.PageRequest(first_page=first, npages=count))
        except ChannelClosed:
            self._link_lost()

    def _receive_urgent(self, urgent: Channel) -> None:
        make_current_thread_urgent()
        while True:
            try:
                self._receive_data(urgent)
                message = urgent.recv()
            except ChannelClosed:
                if not self._stop.is_set() and urgent is self._urgent:
                    self._link_lost()
                return
            if isinstance(message, wire.PageRun):
                self._path.install(message.first_page, message.npages, message.data, message.cause)
            elif isinstance(message, wire.ZeroRange):
                self._fault_server.mark_zero(message.first_page, message.npages)
            else:
                raise wire.ProtocolError(f"unexpected {type(message).__name__} on the urgent channel")
