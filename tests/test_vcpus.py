"""The guest's persistent vCPU threads and its epoch command (``run`` N steps, then park,
optionally harvesting the dirty log in the guest), and one set of guest defaults."""
from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import subprocess

import pytest

from conftest import require_uffd

from postcopy.guest import GuestClient, GuestError, GuestParams, parse_final_hash, reference_hash

BASE = GuestParams(ram=4 << 20, threads=2, workload="random-write", seed=11, steps=30_000)


def vcpu_tasks(pid: int) -> dict[int, str]:
    """The guest's vCPU threads as tid -> name, from /proc/PID/task."""
    tasks = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                name = f.read().strip()
        except FileNotFoundError:  # a thread that just exited
            continue
        if name.startswith("vcpu"):
            tasks[int(tid)] = name
    return tasks


def test_vcpu_threads_park_and_are_released_never_recreated(launch):
    proc, sock = launch(dataclasses.replace(BASE, steps=None), start_paused=True)
    with GuestClient(sock) as guest:
        status = guest.status()
        tids = status["vcpu_thread_ids"]
        assert len(tids) == 2 and len(set(tids)) == 2
        before = vcpu_tasks(proc.pid)
        assert set(before) == set(tids) and sorted(before.values()) == ["vcpu0", "vcpu1"]
        for i in range(20):
            guest.resume()
            reply = guest.pause()
            assert reply["state"] == "paused" and reply["was"] in ("running", "paused")
            if reply["was"] == "running":
                assert reply["pause_to_parked_ns"] >= 0
            parked = guest.run(3)
            assert parked["state"] == "paused"
            # The same threads, parked: nothing created per resume, nothing left behind.
            assert vcpu_tasks(proc.pid) == before
            assert guest.status()["vcpu_thread_ids"] == tids
        done = guest.status()["steps"]
        assert min(done) > 0


def test_run_lands_exactly_at_the_step_even_from_uneven_vcpus(launch):
    params = dataclasses.replace(BASE, steps=None, rate=20_000)
    _, sock = launch(params, start_paused=True)
    with GuestClient(sock) as guest:
        assert guest.run(100)["steps"] == [100, 100]
        assert guest.run(1)["steps"] == [101, 101]
        assert guest.run(0)["steps"] == [101, 101]
        guest.resume()
        uneven = guest.pause()["steps"]  # wherever the pause found each vCPU
        reply = guest.run(250)
        assert reply["steps"] == [s + 250 for s in uneven]
        assert reply["resume_to_first_step_ns"] is not None and reply["resume_to_first_step_ns"] >= 0
        with pytest.raises(GuestError, match="non-negative integer 'steps'"):
            guest.request("run", steps=-1)
        with pytest.raises(GuestError, match="dirty tracking"):
            guest.run(1, harvest=True)


def test_run_stops_at_the_target_and_the_guest_finishes(launch):
    proc, sock = launch(dataclasses.replace(BASE, steps=1000), start_paused=True, linger=True)
    with GuestClient(sock) as guest:
        assert guest.run(600)["steps"] == [600, 600]
        reply = guest.run(600)  # only 400 are left
        assert reply["steps"] == [1000, 1000] and reply["state"] == "finished"
        with pytest.raises(GuestError, match="needs a paused guest"):
            guest.run(1)
        guest.quit()
    out, _ = proc.communicate(timeout=30)
    assert parse_final_hash(out) == reference_hash(dataclasses.replace(BASE, steps=1000))


@pytest.mark.parametrize("workload", ["random-write", "hotspot"])
def test_epochs_and_pauses_keep_the_hash(launch, workload):
    """Same parameters twice give one hash; K steps straight = K/2 in epochs of run +
    pause/resume + the rest."""
    params = dataclasses.replace(BASE, workload=workload, rate=20_000)  # the pause lands mid-run
    straight = reference_hash(params)
    assert reference_hash(params) == straight
    proc, sock = launch(params, start_paused=True)
    half = params.steps // 2
    with GuestClient(sock) as guest:
        for _ in range(half // 1000):
            guest.run(1000)
        assert guest.status()["steps"] == [half, half]
        guest.resume()
        if guest.pause()["state"] == "paused":
            guest.resume()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert parse_final_hash(out) == straight


def test_run_with_harvest_reports_what_the_vcpus_wrote(launch):
    require_uffd()
    from postcopy.guest.dirtytrack import decode_runs

    params = dataclasses.replace(BASE, steps=None, threads=1)
    _, sock = launch(params, start_paused=True)
    with GuestClient(sock) as guest:
        try:
            guest.dirty_track(True)
        except GuestError as exc:
            pytest.skip(f"async write-protect dirty tracking unavailable: {exc}")
        guest.run(1, harvest=True)  # a fresh epoch
        nothing = guest.run(0, harvest=True)
        assert decode_runs(nothing["dirty_runs"]) == []
        reply = guest.run(50, harvest=True)
        runs = decode_runs(reply["dirty_runs"])
        pages = sum(n for _, n in runs)
        # The state page plus at most one page per step, at least one page written.
        assert runs[0][0] == 0 and 2 <= pages <= 51, runs
        assert reply["harvest_ns"] >= 0
        assert decode_runs(guest.run(0, harvest=True)["dirty_runs"]) == []
        guest.touch([7, 8, 9])
        assert decode_runs(guest.run(0, harvest=True)["dirty_runs"]) == [(7, 3)]


# ---- one guest, one set of defaults ---------------------------------------------------


def _parse(command: str, argv: list[str]) -> argparse.Namespace:
    from postcopy.cli import build_parser

    return build_parser().parse_args([command, *argv])


def test_demo_and_guest_make_the_same_guest_for_the_same_flags():
    from postcopy.guest.cli import params_from_args

    for flags in ([], ["--threads", "3", "--seed", "9"], ["--workload", "hotspot", "--working-set", "0.25"]):
        demo = _parse("demo", [*flags, "--steps", "1000"])
        guest = _parse("guest", ["--ram", "256M", *flags, "--steps", "1000"])
        from_demo = params_from_args(demo, demo.ram)
        from_guest = params_from_args(guest, guest.ram)
        # The rate is timing (not hashed); everything else is the same guest.
        assert dataclasses.replace(from_demo, rate=0) == dataclasses.replace(from_guest, rate=0), flags


def test_the_reference_command_reproduces_the_reference_hash():
    params = GuestParams(ram=4 << 20, workload="sequential", seed=3, steps=5000, rate=1000, working_set=0.5)
    argv = shlex.split(params.reference_command())
    assert argv[:2] == ["postcopy", "guest"] and "--working-set" in argv and "--threads" in argv
    import sys

    out = subprocess.run([sys.executable, "-m", "postcopy", *argv[1:]], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert parse_final_hash(out) == reference_hash(params)


def test_help_shows_every_default():
    from postcopy.cli import build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name in ("guest", "demo"):
        for action in subparsers.choices[name]._actions:
            if action.option_strings and action.default not in (None, False, argparse.SUPPRESS) \
                    and action.dest != "help":
                assert "default" in (action.help or ""), f"{name} {action.option_strings}: {action.help!r}"


# ---- the guest's own view in every migration report ------------------------------------


def test_report_carries_the_guests_view_and_parameters():
    from postcopy import report

    params = GuestParams(ram=16 << 20, steps=1000)
    built = report.build_report(mode="postcopy", dirty_log="none", ram_bytes=params.ram, workload=params.workload,
                                source={}, dest={"first_step_ms": 0.25, "max_step_gap_ms": 3.5},
                                final_hash=None, reference_hash=None,
                                guest={"params": params.as_dict(), "reference_command": params.reference_command()})
    assert built["guest_view"] == {"first_step_ms": 0.25, "max_step_gap_ms": 3.5}
    assert built["guest"]["params"]["threads"] == params.threads
    summary = report.format_summary(built)
    assert "longest step gap after the switchover 3.50 ms" in summary
    assert params.reference_command() in summary


def test_a_migration_reports_the_stall_the_guest_felt():
    from conftest import require_netns

    require_netns()
    require_uffd()
    from postcopy.testbed.demo import DemoOptions, run_demo

    params = GuestParams(ram=16 << 20, threads=2, workload="random-write", seed=5, steps=400_000, rate=100_000)
    # Held at a step until migrated: on a busy host its 4 s of steps could end before the
    # switchover (then there is no stall on the destination to report).
    result = run_demo(DemoOptions(params=params, migrate_after=0.2, port=7019, hold_at=100_000))
    assert result["verified"], result
    view = result["guest_view"]
    # Measured by the destination's guest itself: steps went on there (gaps between
    # them, demand-fault stalls included) after a first step that came after the resume.
    assert view["max_step_gap_ms"] is not None and view["max_step_gap_ms"] > 0
    assert view["first_step_ms"] is not None and view["first_step_ms"] > 0
    assert result["guest"]["reference_command"] == params.reference_command()


def test_throttle_parks_the_vcpus_without_touching_guest_state(launch):
    """``throttle``: accepted, reported, bad values refused, lifted by 0; it changes
    only timing, so the final hash is the unthrottled reference."""
    params = dataclasses.replace(BASE, rate=20_000)  # 1,000 steps = 50 ms: several 10 ms slices
    proc, sock = launch(params, start_paused=True)
    with GuestClient(sock) as guest:
        assert guest.status()["throttle_pct"] == 0
        for bad in (100, -1, "90", True, 2.5, None):
            with pytest.raises(GuestError, match="throttle wants an integer 'percent' 0..99"):
                guest.request("throttle", percent=bad)
        assert guest.request("throttle", percent=90)["throttle_pct"] == 90
        assert guest.status()["throttle_pct"] == 90
        guest.max_step_gap_ns()  # start the measure here
        assert guest.run(1000)["steps"] == [1000, 1000]
        # A lower bound only (a nap is a sleep to an absolute deadline): after 10 ms of
        # running, a vCPU throttled 90% parks 90 ms.
        assert guest.max_step_gap_ns() >= 90_000_000
        for _ in range(3):
            guest.run(1000)
        assert guest.request("throttle", percent=0)["throttle_pct"] == 0
        assert guest.status()["throttle_pct"] == 0
        guest.resume()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert parse_final_hash(out) == reference_hash(params)


def test_rate_cap_holds_at_run_time_and_is_not_a_guest_parameter(launch):
    """``rate_cap``: accepted, reported, bad values refused, lifted by 0; it paces the
    steps (the slower of it and --rate holds) and leaves the final hash as it was."""
    params = dataclasses.replace(BASE, rate=0)
    proc, sock = launch(params, start_paused=True)
    with GuestClient(sock) as guest:
        for bad in (-1, "100", True, None, -0.5, 1e300):
            with pytest.raises(GuestError, match="rate_cap wants a number 'steps_per_s'"):
                guest.request("rate_cap", steps_per_s=bad)
        assert guest.request("rate_cap", steps_per_s=200)["rate_cap"] == 200
        status = guest.status()
        assert status["rate_cap"] == 200 and status["rate"] == 0  # not the guest's --rate
        guest.max_step_gap_ns()
        assert guest.run(20)["steps"] == [20, 20]
        # 20 steps paced at 200/s span at least 19 intervals of 5 ms: some gap is >= 5 ms.
        assert guest.max_step_gap_ns() >= 5_000_000
        assert guest.request("rate_cap", steps_per_s=0)["rate_cap"] == 0
        assert guest.status()["rate_cap"] == 0
        guest.resume()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert parse_final_hash(out) == reference_hash(params)


def test_abandon_stops_the_vcpus_at_once_and_ends_the_guest():
    """An incoming guest whose agent stopped renewing its watchdog is abandoned: its
    vCPUs stop stepping there and then (not at the main thread's next look) and the
    guest ends as fatal with the reason."""
    from postcopy.guest.runtime import BootParams, Guest

    guest = Guest(4 << 20)
    try:
        guest.boot(BootParams(threads=2, workload="random-write", seed=1, steps=None, rate=0.0,
                              working_set=1.0, free_fraction=0.0))
        guest.resume()
        guest.abandon("its destination agent did not renew the watchdog in time")
        assert guest.wait() == "fatal" and "watchdog" in guest.fatal
        assert guest._vcpus.wait_parked(30), "the vCPUs still step after the abandon"
        stopped = guest.steps()
        assert guest._vcpus.parked and guest.steps() == stopped
    finally:
        guest.request_quit()
