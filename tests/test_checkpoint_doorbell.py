"""Checkpoint epochs through the guest's doorbell (native/epoch_doorbell.c,
guest/doorbell.py, checkpoint/epochdoorbell.py): each epoch is exactly the ``run``
command's (same steps, same harvested pages, same RAM), the guest is driven by nothing
else while the session lasts, and the session ends cleanly whichever way it ends."""
from __future__ import annotations

import os
import pathlib
import subprocess
import tempfile
import time

import pytest

from conftest import require_uffd
from postcopy._native import lib
from postcopy.checkpoint.epochdoorbell import DoorbellRunner
from postcopy.guest import GuestClient, GuestParams, reference_hash, wait_for_control
from postcopy.guest.control import GuestError
from postcopy.guest.dirtytrack import decode_flat


def _require_pagemap_scan() -> None:
    require_uffd()
    from postcopy.kernel.dirtylog import available_backends

    reason = available_backends().get("pagemap-scan", "unknown backend")
    if reason is not None:
        pytest.skip(f"needs the pagemap-scan dirty log: {reason}")


@pytest.fixture
def tmp_path():
    with tempfile.TemporaryDirectory(prefix="pc-door-") as path:  # short: Unix socket paths
        yield pathlib.Path(path)


def _guest(params: GuestParams, control: str) -> subprocess.Popen:
    proc = subprocess.Popen(params.argv(control=control, start_paused=True), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for_control(control, proc=proc)
    return proc


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.communicate()


def _tracked(control: str) -> GuestClient:
    client = GuestClient(control)
    client.request("dirty_track", on=True)
    return client


def test_doorbell_epochs_equal_run_epochs_step_for_step_and_page_for_page(tmp_path):
    _require_pagemap_scan()
    params = GuestParams(ram=8 << 20, threads=2, workload="random-write", seed=31, steps=1_000_000)
    a, b = str(tmp_path / "a.sock"), str(tmp_path / "b.sock")
    guest_a, guest_b = _guest(params, a), _guest(params, b)
    try:
        with _tracked(a) as by_run, _tracked(b) as by_door:
            runner = DoorbellRunner(by_door, 4096)
            for steps in (1, 50, 300, 7):
                reply = by_run.run(steps, harvest=True)
                runner.start(steps, harvest=True)
                answer = runner.wait(lambda: None, 10.0)
                assert answer["state"] == reply["state"] == "paused"
                assert answer["steps"] == reply["steps"]
                assert list(answer["runs"]) == list(decode_flat(reply["dirty_runs"]))
                status = by_door.status()  # to others a driven guest runs
                assert status["state"] == "running" and status["doorbell"] is True
            with pytest.raises(GuestError, match="doorbell session drives the guest"):
                by_door.resume()
            with pytest.raises(GuestError, match="needs a paused guest"):
                by_door.run(1)
            with pytest.raises(GuestError, match="cannot change during a checkpoint doorbell"):
                by_door.request("dirty_track", on=False)
            runner.end()
            assert by_door.status()["state"] == "paused" and by_door.status()["doorbell"] is False
            assert by_door.hash() == by_run.hash()
    finally:
        _kill(guest_a)
        _kill(guest_b)


def test_a_session_ends_with_its_connection_and_at_the_step_target(tmp_path):
    _require_pagemap_scan()
    params = GuestParams(ram=8 << 20, threads=1, workload="random-write", seed=32, steps=5000)
    control = str(tmp_path / "g.sock")
    guest = _guest(params, control)
    try:
        with _tracked(control) as client:
            runner = DoorbellRunner(client, 4096)
            runner.start(100, harvest=True)
            assert runner.wait(lambda: None, 10.0)["steps"] == [100]
            runner._client.close()  # the checkpointer vanishes: the guest is its own again
            for _ in range(1000):  # the guest notices the close on its own thread
                if not client.status()["doorbell"]:
                    break
                time.sleep(0.01)
            assert client.status()["state"] == "paused" and client.status()["steps"] == [100]
            runner = DoorbellRunner(client, 4096)
            runner.start(10_000, harvest=False)  # past the target: it stops there
            answer = runner.wait(lambda: None, 10.0)
            assert answer["state"] == "finished" and answer["steps"] == [5000] and answer["runs"] is None
            runner.end()
        out, _ = guest.communicate(timeout=30)
        assert f"final_hash {reference_hash(params)}" in out
    finally:
        _kill(guest)


def test_a_doorbell_needs_dirty_tracking_and_a_paused_guest(tmp_path):
    _require_pagemap_scan()
    params = GuestParams(ram=8 << 20, threads=1, workload="random-write", seed=33, steps=1_000_000)
    control = str(tmp_path / "g.sock")
    guest = _guest(params, control)
    try:
        with GuestClient(control) as client:
            with pytest.raises(GuestError, match="needs dirty tracking"):
                client.doorbell(16)
            client.request("dirty_track", on=True)
            with pytest.raises(GuestError, match="runs_cap"):
                client.doorbell(0)
            client.resume()
            with pytest.raises(GuestError, match="needs a paused guest"):
                client.doorbell(16)
            client.pause()
            _, fd = client.doorbell(16)
            assert os.fstat(fd).st_size == lib.pc_doorbell_bytes(16)
            os.close(fd)
            assert client.status()["doorbell"] is True
    finally:
        _kill(guest)
