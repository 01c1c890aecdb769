"""The switchover's steps, each with fewer round trips and hops (issue 11: downtime),
none weaker: the source's fence is set by its pause, the destination's watchdog is
renewed by its resume (refused once lapsed), an incoming guest whose state page is in
starts its vCPUs inside the resume request, and the downtime's breakdown adds up."""
from __future__ import annotations

import dataclasses
import mmap
import os
import threading
import time
from types import SimpleNamespace

import pytest

from test_guest import BASE, RAM, FaultServer, final_hash_of, need_uffd, wait_state
from postcopy import report
from postcopy.guest import GuestClient, GuestError, GuestParams, reference_hash
from postcopy.guest.lease import Lease
from postcopy.migration.fence import fence_keeper
from postcopy.migration.source import SourceAgent, SourceConfig

IDLE = GuestParams(ram=4 << 20, threads=1, workload="idle", seed=0, steps=None)


def _wait_for(predicate, what: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)
    return value


def test_a_pause_sets_the_fence_it_carries_and_a_wrong_token_neither_fences_nor_pauses(launch):
    _, control = launch(IDLE)
    with GuestClient(control) as owner:
        token = owner.lease()
        with pytest.raises(GuestError, match="token"):
            owner.pause(fence={"token": "not-it", "seconds": 30})
        assert owner.status()["state"] == "running" and owner.status()["fence_remaining_s"] == 0
        keeper = fence_keeper(control, token, 600.0, in_contact=lambda: True)
        try:
            paused = keeper.arm_with(lambda fence: owner.pause(fence=fence))  # one round trip for both
            assert paused["was"] == "running" and owner.status()["state"] == "paused"
            assert owner.status()["fence_remaining_s"] > 600
            with pytest.raises(GuestError, match="resume refused"):
                owner.resume()
            keeper.close()
            keeper.lift()  # what a source does when it fails before its Switchover
            assert owner.status()["fence_remaining_s"] == 0
            owner.resume()
        finally:
            keeper.close()


def test_a_source_failing_before_its_switchover_lifts_the_fence_and_the_guest_runs_on(launch):
    _, control = launch(IDLE)
    agent = SourceAgent(SourceConfig(guest_control=control, endpoint=("127.0.0.1", 9), key=b"k" * 32))
    with GuestClient(control) as guest:
        agent._lease = guest.lease()
        agent._fence = fence_keeper(control, agent._lease, 30.0, in_contact=lambda: True)
        agent._fence.arm_with(lambda fence: guest.pause(fence=fence))
        m = SimpleNamespace(switchover_sent=False, guest=guest, controls=SimpleNamespace(lift=lambda: None))
        message = agent._failure(ConnectionError("link broke before the Switchover"), m)
        assert "goes on running on the source" in message, message
        status = guest.status()
        assert status["state"] == "running" and status["fence_remaining_s"] == 0, status


def test_a_lapsed_watchdog_is_not_renewed():
    lease = Lease()
    token = lease.command("lease", {}, None)["token"]
    lease.command("watchdog", {"token": token, "seconds": 0.0}, None)
    _wait_for(lease.watchdog_expired, "the watchdog to lapse")
    with pytest.raises(Exception, match="lapsed already"):
        lease.command("watchdog", {"token": token, "seconds": 30.0}, None)
    assert lease.watchdog_expired()


@pytest.mark.parametrize("state_page_in", [True, False])
def test_incoming_resume_renews_the_watchdog_and_starts_the_vcpus_in_the_request_once_the_state_page_is_in(
        launch, state_page_in):
    need_uffd()
    params = dataclasses.replace(BASE, backing="memfd")
    _, src_sock = launch(params, name="src", pause_at=params.steps // 2)
    dst, dst_sock = launch(params, name="dst", incoming=True)
    with GuestClient(src_sock) as source, GuestClient(dst_sock) as target:
        wait_state(source, "paused")
        _, src_fds = source.take_fds()
        token = target.lease()
        info, dst_fds = target.take_fds(incoming=True)
        with mmap.mmap(src_fds["memfd"], RAM, mmap.MAP_SHARED, mmap.PROT_READ) as src_ram:
            server = FaultServer(dst_fds["uffd"], info["uffd_features"], info["ram_address"], src_ram)
            server.start()
            try:
                if state_page_in:
                    server.install(0)  # as a destination does before it reads the Switchover
                with pytest.raises(GuestError, match="token"):
                    target.resume(watchdog={"token": "not-it", "seconds": 30})
                assert target.status()["state"] == "incoming"
                reply = target.resume(watchdog={"token": token, "seconds": 30})
                status = target.status()
                assert 25 < status["watchdog_remaining_s"] <= 30
                # In the request (no thread of its own, vCPUs made running) only when
                # reading the state page cannot fault; else the reply must not wait for it.
                assert reply["vcpus_started"] is state_page_in
                if state_page_in:
                    assert status["vcpu_thread_ids"] and "released" in status["incoming_start_ns"]
                wait_state(target, "finished")
                server.complete(RAM)
                result = final_hash_of(dst)
            finally:
                server.close()
        for fd in (*src_fds.values(), *dst_fds.values()):
            os.close(fd)
        assert (0 in server.faults) is not state_page_in
        assert result == reference_hash(params)
        source.quit()


def test_the_breakdown_adds_up_to_the_downtime_in_the_order_the_steps_happened():
    t0 = 1_000_000_000
    marks = {"last_step": t0, "pause_asked": t0 - 100_000, "parked": t0 + 10_000, "state_sent": t0 + 500_000,
             "switchover_sent": t0 + 700_000, "switchover_read": t0 + 900_000, "server_ready": t0 + 950_000,
             "resume_received": t0 + 1_200_000, "released": t0 + 1_300_000, "vcpus_ready": t0 + 1_500_000,
             "first_step": t0 + 2_000_000, "resume_replied": t0 + 2_500_000}
    breakdown = report.downtime_breakdown(marks)
    # Made running, the vCPUs are released before their threads are ready: time order.
    assert [s["step"] for s in breakdown["steps"]] == ["parked", "state_sent", "switchover_sent", "switchover_read",
                                                       "resume_received", "released", "vcpus_ready", "first_step"]
    assert all(s["ms"] >= 0 for s in breakdown["steps"])
    assert breakdown["total_ms"] == pytest.approx(2.0)
    assert sum(s["ms"] for s in breakdown["steps"]) == pytest.approx(2.0)
    assert breakdown["marks_ms"]["server_ready"] == pytest.approx(0.95)  # off the path, still shown
    assert breakdown["marks_ms"]["pause_asked"] == pytest.approx(-0.1)  # asked before the last step
    text = report.format_breakdown(breakdown)
    assert "server_ready 0.950" in text and "pause_asked -0.100" in text and "resume_replied 2.500" in text
    assert report.downtime_breakdown({"last_step": t0}) is None  # no first step there: nothing to say


class _Plane:
    """A send plane whose demand server answers its first request after ``after`` polls."""

    def __init__(self, after: int):
        self.polls, self.after = 0, after

    def served(self) -> int:
        self.polls += 1
        return int(self.polls > self.after)


def _held(plane):
    from postcopy.migration.sender import PageSender

    sender = PageSender.__new__(PageSender)  # only what the hold reads
    sender._plane, sender.link_lost = plane, _Lost()
    return sender


class _Lost(threading.Event):
    """The link-lost event, noting every wait the hold makes on it."""

    def __init__(self):
        super().__init__()
        self.waits: list[float] = []

    def wait(self, timeout=None):
        self.waits.append(timeout)
        return super().wait(0)


def test_the_pushers_first_start_waits_for_the_first_demand_request_and_a_grace():
    from postcopy.migration.sender import FIRST_FAULTS_GRACE_S, HOLD_POLL_S

    plane = _Plane(after=3)
    sender = _held(plane)
    sender._hold_for_first_faults()
    assert plane.polls > 3  # it returned only once a request was answered
    assert sender.link_lost.waits == [HOLD_POLL_S] * 3 + [FIRST_FAULTS_GRACE_S]
    # Answered before the pusher asked (the common case: the first fault comes within a
    # millisecond): the grace still applies, or the pusher's first work lands on it.
    again = _held(_Plane(after=0))
    again._hold_for_first_faults()
    assert again.link_lost.waits == [FIRST_FAULTS_GRACE_S]
