"""The RAM hash a standby image must have: that of the same guest run without
checkpointing, parked at the committed step count."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import time

from postcopy.guest.control import GuestClient, GuestError, GuestParams, wait_for_control


def reference_hash_at(params: GuestParams, steps: int, workdir: str, timeout: float = 120.0) -> str:
    """The RAM hash of the same guest run without checkpointing, parked when every vCPU
    has done exactly ``steps`` steps (what a standby image of an epoch at that step
    count must hash to). ``workdir`` holds the reference guest's control socket."""
    from postcopy.guest import reference_hash

    params = dataclasses.replace(params, rate=0)
    if params.steps is not None and steps >= params.steps:
        return reference_hash(params, timeout=timeout)
    control = os.path.join(workdir, f"reference-{os.getpid()}-{steps}.sock")
    proc = subprocess.Popen(params.argv(control=control, pause_at=steps) if steps > 0 else
                            params.argv(control=control, start_paused=True),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_control(control, proc=proc)
        with GuestClient(control, timeout=timeout) as client:
            deadline = time.monotonic() + timeout
            while (status := client.status())["state"] != "paused" or min(status["steps"]) < steps:
                if time.monotonic() > deadline:
                    raise GuestError(f"reference guest did not reach step {steps}: {status}")
                time.sleep(0.005)
            value = client.hash()
            client.quit()
        proc.wait(timeout=10)
        return value
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        elif proc.stderr is not None:
            proc.stderr.close()
