"""Starting a guest: its parameters as a command line, and its reference hash (the
same guest run to its end without migration)."""
from __future__ import annotations

import dataclasses
import shlex
import subprocess
import sys
from dataclasses import dataclass

from postcopy.guest.controlwire import GuestError


# One set of defaults for every way of starting a guest (``postcopy guest``, ``postcopy
# demo``, GuestParams): the same flags give the same guest, and the same reference hash.
GUEST_DEFAULTS: dict = {"threads": 2, "workload": "random-write", "seed": 1, "rate": 0.0, "working_set": 1.0,
                        "free_fraction": 0.0, "backing": "memfd", "vm": "process"}


@dataclass(frozen=True)
class GuestParams:
    """Everything that determines a guest's final RAM (plus its backing)."""

    ram: int
    threads: int = GUEST_DEFAULTS["threads"]
    workload: str = GUEST_DEFAULTS["workload"]
    seed: int = GUEST_DEFAULTS["seed"]
    steps: int | None = None
    rate: float = GUEST_DEFAULTS["rate"]
    working_set: float = GUEST_DEFAULTS["working_set"]
    backing: str = GUEST_DEFAULTS["backing"]
    free_fraction: float = GUEST_DEFAULTS["free_fraction"]
    vm: str = GUEST_DEFAULTS["vm"]  # or "kvm": the same RAM and workload run by KVM vCPUs

    def reference_command(self) -> str:
        """The ``postcopy guest`` command line that runs this guest without migration
        to its reference hash (printed as ``final_hash``); every parameter is spelled
        out, so it does not depend on any default."""
        argv = dataclasses.replace(self, rate=0).argv()[4:]
        if not self.free_fraction:
            argv += ["--free-fraction", "0.0"]
        return shlex.join(["postcopy", "guest", *argv])

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def argv(self, *, control: str | None = None, incoming: bool = False, linger: bool = False,
             start_paused: bool = False, pause_at: int | None = None) -> list[str]:
        """Command line that starts this guest. An incoming guest gets only RAM size and
        backing: the rest comes with its state page."""
        argv = [sys.executable, "-m", "postcopy", "guest", "--ram", str(self.ram), "--backing", self.backing]
        if self.vm != "process":
            argv += ["--vm", self.vm]
        if incoming:
            argv.append("--incoming")
        else:
            argv += ["--threads", str(self.threads), "--workload", self.workload, "--seed", str(self.seed),
                     "--rate", repr(float(self.rate)), "--working-set", repr(float(self.working_set))]
            if self.free_fraction:
                argv += ["--free-fraction", repr(float(self.free_fraction))]
            if self.steps is not None:
                argv += ["--steps", str(self.steps)]
        if control:
            argv += ["--control", control]
        if linger:
            argv.append("--linger")
        if start_paused:
            argv.append("--start-paused")
        if pause_at is not None:
            argv += ["--pause-at", str(pause_at)]
        return argv


def parse_final_hash(stdout: str) -> str:
    """The hash from a guest's ``final_hash <16 hex>`` stdout line."""
    for line in stdout.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == "final_hash" and len(parts[1]) == 16:
            return parts[1]
    raise GuestError(f"no final_hash line in guest output {stdout!r}")


def reference_hash(params: GuestParams, timeout: float | None = None) -> str:
    """Run the same guest without migration to completion and return its final hash.

    The rate limit is dropped (it is timing, not state, and is not hashed)."""
    if params.steps is None:
        raise ValueError("reference_hash needs a step target (steps)")
    proc = subprocess.run(dataclasses.replace(params, rate=0).argv(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise GuestError(f"reference guest exited {proc.returncode}: {proc.stderr.strip()}")
    return parse_final_hash(proc.stdout)
