"""How fast a guest answers pause and resume (the ``pause-resume`` bench experiment).

A running random-write guest is paused and resumed ``rounds`` times over its control
socket. Both clocks are CLOCK_MONOTONIC on one host, so the client's send time and the
guest's own timestamps compare directly:

* pause -> parked: pause request sent -> the last vCPU parked (the reply's ``paused_ns``);
* resume -> first step: resume request sent -> the first step any vCPU completed
  (``first_step_after_resume_ns`` in ``status``);
* one epoch: the round trip of ``run`` 1 step (release, one step, park, reply), or
  ``run_until`` on a guest that has no ``run``.

The guest-internal parts (request seen -> parked, resume -> first step) come from the
guest's replies where it reports them. ``python`` runs another installation's guest
(e.g. the one before a change) with the same client, for a before/after on one machine.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

from postcopy import report
from postcopy.guest import GuestClient, GuestError, GuestParams, wait_for_control


def _us(values: list[int]) -> dict:
    s = report.latency_summary(v / 1e3 for v in values)
    return {k: (round(v, 1) if isinstance(v, float) else v) for k, v in s.items()}


def _thread_ids(pid: int) -> set[int]:
    return {int(t) for t in os.listdir(f"/proc/{pid}/task")}


def _first_step(guest: GuestClient, deadline: float) -> int:
    while True:
        first = guest.status().get("first_step_after_resume_ns")
        if first:
            return first
        if time.monotonic() > deadline:
            raise GuestError("the guest did not step within 5 s of a resume")


def pause_resume_figures(rounds: int = 300, *, threads: int = 2, ram: int = 16 << 20,
                         python: str | None = None) -> dict:
    """p50/p99/max in µs of pause -> parked, resume -> first step and one ``run``
    epoch; ``threads_created`` counts OS threads that appeared over the rounds."""
    params = GuestParams(ram=ram, threads=threads, workload="random-write", seed=5, steps=None)
    with tempfile.TemporaryDirectory(prefix="postcopy-pr-") as work:
        control = os.path.join(work, "guest.sock")
        argv = params.argv(control=control)
        if python:
            argv[0] = python
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            wait_for_control(control, proc=proc)
            with GuestClient(control) as guest:
                return _measure(guest, proc.pid, rounds)
        finally:
            proc.kill()
            proc.wait()


def _measure(guest: GuestClient, pid: int, rounds: int) -> dict:
    pause, resume, inner_pause, inner_resume, epoch = [], [], [], [], []
    tasks_before: set[int] = set()
    seen: set[int] = set()
    has_run = True
    for i in range(rounds + 1):
        sent = time.monotonic_ns()
        reply = guest.pause()
        if i:  # round 0 only settles the guest (and its threads) in
            pause.append(reply["paused_ns"] - sent)
            if reply.get("pause_to_parked_ns") is not None:
                inner_pause.append(reply["pause_to_parked_ns"])
        else:
            tasks_before, seen = _thread_ids(pid), _thread_ids(pid)
        sent = time.monotonic_ns()
        try:
            if has_run:
                guest.run(1)
            else:
                guest.run_until(max(reply["steps"]) + 1)
        except GuestError as exc:
            if "unknown command" not in str(exc):
                raise
            has_run = False
            guest.run_until(max(guest.status()["steps"]) + 1)
        if i:
            epoch.append(time.monotonic_ns() - sent)
        sent = time.monotonic_ns()
        resumed = guest.resume()
        first = _first_step(guest, time.monotonic() + 5)
        seen |= _thread_ids(pid)  # a vCPU thread made per resume is alive now
        if i:
            resume.append(first - sent)
            inner_resume.append(first - resumed["resumed_ns"])
    guest.pause()
    created = len(seen - tasks_before)
    return {
        "rounds": rounds,
        "pause_to_parked_us": _us(pause),
        "resume_to_first_step_us": _us(resume),
        "epoch_rpc_us": _us(epoch),
        "epoch_command": "run" if has_run else "run_until",
        "guest_internal": {"pause_to_parked_us": _us(inner_pause),
                           "resume_to_first_step_us": _us(inner_resume)},
        "threads_created": created,
    }


if __name__ == "__main__":  # python -m postcopy.bench.pauseresume [PYTHON]: one run, JSON out
    import json

    print(json.dumps(pause_resume_figures(python=sys.argv[1] if len(sys.argv) > 1 else None), indent=2))
