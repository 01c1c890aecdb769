"""``postcopy checkpoint-demo``: continuous checkpointing between the testbed's two
namespaces at several dirty bounds, then failover, verified against the reference
hash. It sits above the checkpoint package (it builds a testbed and runs its agents)."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time

from postcopy.checkpoint.cli import DEFAULT_PORT, DEMO_BOUNDS, STARTUP_TIMEOUT, _bounds, _fmt
from postcopy.protocol import wire
from postcopy.report import write_json
from postcopy.units import positive_float_arg, positive_int_arg, size_arg


def register(subparsers) -> None:
    d = subparsers.add_parser(
        "checkpoint-demo", help="checkpoint a guest between two namespaces at several dirty bounds, fail over",
        description="For each dirty bound: start a guest, a standby and a primary in the two-namespace "
                    "testbed, checkpoint for --seconds, kill the guest, fail over on the standby and "
                    "verify the failed-over guest's final hash (and the standby image's) against the "
                    "reference. Prints checkpoints per second and pause time per epoch.")
    d.add_argument("--ram", type=size_arg, default=64 << 20, help="guest RAM (default 64M)")
    d.add_argument("--bounds", type=_bounds, default=DEMO_BOUNDS, metavar="N,N,...",
                   help="dirty page bounds (default 64,256,1024)")
    d.add_argument("--seconds", type=positive_float_arg, default=2.0, help="checkpointing time per bound (default 2)")
    d.add_argument("--threads", type=positive_int_arg, default=1, help="vCPU threads (default 1)")
    d.add_argument("--backing", choices=("memfd", "anon"), default="memfd")
    d.add_argument("--port", type=int, default=DEFAULT_PORT)
    d.add_argument("--json", metavar="FILE", help="write the results as JSON")
    d.add_argument("--primary-flag", action="append", default=[], metavar="FLAG", dest="primary_flags",
                   help="pass FLAG to postcopy checkpoint (repeatable; e.g. --primary-flag=--overlap)")
    d.set_defaults(func=run_demo_command)


class CheckpointDemoError(RuntimeError):
    """The demo could not run; the message says where."""


def _agent(*args: str) -> list[str]:
    return [sys.executable, "-m", "postcopy", *args]


def _read_line(proc: subprocess.Popen, expect: str, what: str, timeout: float) -> str:
    """The first stdout line of ``proc`` starting with ``expect`` (within ``timeout``)."""
    import selectors

    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if not sel.select(timeout=max(0.0, deadline - time.monotonic())):
                continue
            line = proc.stdout.readline()
            if not line:
                break
            if line.startswith(expect):
                return line.strip()
    err = proc.stderr.read() if proc.poll() is not None and proc.stderr else ""
    raise CheckpointDemoError(f"{what} did not report {expect!r} (exit {proc.poll()}): {err.strip()[-1500:]}")


def run_checkpoint_demo(ram: int = 64 << 20, dirty_bounds=DEMO_BOUNDS, seconds: float = 2.0, *,
                        threads: int = 1, backing: str = "memfd", port: int = DEFAULT_PORT,
                        seed: int = 7, verify: bool = True, timeout: float = 300.0, vm: str = "process",
                        dirty_log: str = "auto", primary_flags: tuple[str, ...] = ()) -> dict:
    """For each dirty bound: checkpoint a random-write guest from the source namespace to
    a standby in the dest namespace for ``seconds``, kill the guest (SIGKILL), let the
    standby fail over, and verify. Returns ``{"bounds": {N: figures}, ...}`` with, per
    bound, checkpoints_per_s, pause_ms (p50/p99/max), dirty_pages (p50/max), where the
    epoch time goes (time_us), commit latency, failover_ms, and verified (the failed-over
    guest's final hash equals the reference; the standby image's hash equals the
    reference parked at the committed step count). With ``vm="kvm"`` the guest is a KVM
    guest and ``dirty_log`` may name one of KVM's logs; references are run by the process
    guest, whose hash after the same steps is the same. ``primary_flags`` go to
    ``postcopy checkpoint`` as they are (e.g. ``--overlap``, ``--no-doorbell``)."""
    from postcopy.guest import GuestParams, reference_hash
    from postcopy.testbed.netns import Testbed
    from postcopy.checkpoint.reference import reference_hash_at

    started = time.monotonic()
    # Enough steps that no guest finishes while checkpointed (~3000 epochs/s at most).
    steps = max(dirty_bounds) * int(3000 * seconds * 2) + 1_000_000
    params = GuestParams(ram=ram, threads=threads, workload="random-write", seed=seed, steps=steps,
                         backing=backing, vm=vm)
    reference_params = dataclasses.replace(params, vm="process")
    results: dict = {"ram_bytes": ram, "threads": threads, "backing": backing, "seconds": seconds, "vm": vm,
                     "steps_target": steps, "bounds": {}}
    with tempfile.TemporaryDirectory(prefix="postcopy-ckpt-") as work, Testbed() as bed:
        key_file = _write_key(work)
        endpoint = f"{bed.dest.address}:{port}"
        reference = reference_hash(reference_params, timeout=timeout) if verify else None
        for n, bound in enumerate(dirty_bounds):
            prim, stby, guest_cpu = _checkpoint_and_kill(bed, params, work, n, bound, endpoint, key_file,
                                                         seconds, timeout, dirty_log, primary_flags)
            image_ref = None
            if verify and stby.get("committed_steps"):
                image_ref = reference_hash_at(reference_params, min(stby["committed_steps"]), work, timeout=timeout)
            results["bounds"][bound] = _bound_figures(prim, stby, guest_cpu, reference, image_ref)
    results["reference_hash"] = reference
    results["verified"] = all(b["verified"] and b["image_verified"] for b in results["bounds"].values()) \
        if verify else None
    results["seconds_total"] = round(time.monotonic() - started, 1)
    return results


def _write_key(work: str) -> str:
    """A fresh key in WORK/key (mode 0600); returns its path."""
    key_file = os.path.join(work, "key")
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, wire.new_key())
    os.close(fd)
    return key_file


def _checkpoint_and_kill(bed, params, work: str, n: int, bound: int, endpoint: str, key_file: str,
                         seconds: float, timeout: float, dirty_log: str = "auto",
                         primary_flags: tuple[str, ...] = ()) -> tuple[dict, dict, float]:
    """One bound: a guest checkpointed for ``seconds``, then killed so that the standby
    fails over. Returns the primary's and the standby's figures and the guest's CPU
    seconds while checkpointed."""
    from postcopy.guest.control import wait_for_control

    pipes = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    control = os.path.join(work, f"guest{n}.sock")
    pjson, sjson = os.path.join(work, f"primary{n}.json"), os.path.join(work, f"standby{n}.json")
    # Started paused: the primary runs it epoch by epoch from its first step, so
    # it cannot finish (or run unprotected) while a slow host starts the agents.
    guest = bed.popen(bed.source, params.argv(control=control, start_paused=True), **pipes)
    wait_for_control(control, timeout=STARTUP_TIMEOUT, proc=guest)
    standby = bed.popen(bed.dest, _agent("standby", "--listen", endpoint, "--key-file", key_file,
                                         "--failover", "--workdir", work, "--json", sjson), **pipes)
    _read_line(standby, "listening", "postcopy standby", STARTUP_TIMEOUT)
    primary = bed.popen(bed.source, _agent("checkpoint", "--guest", control, "--connect", endpoint,
                                           "--key-file", key_file, "--max-dirty", str(bound),
                                           "--dirty-log", dirty_log, "--json", pjson, *primary_flags), **pipes)
    _read_line(primary, "protected", "postcopy checkpoint", STARTUP_TIMEOUT)
    guest_cpu = _cpu_seconds(guest.pid)
    time.sleep(seconds)
    guest_cpu = _cpu_seconds(guest.pid) - guest_cpu
    guest.kill()  # the primary host "fails": its guest dies mid-run
    guest.communicate()
    try:
        errors = {"primary": primary.communicate(timeout=60)[1], "standby": standby.communicate(timeout=timeout)[1]}
    except subprocess.TimeoutExpired:
        raise CheckpointDemoError(f"bound {bound}: an agent did not finish after the guest was killed")
    try:
        with open(pjson) as f:
            prim = json.load(f)
        with open(sjson) as f:
            stby = json.load(f)
    except OSError as exc:
        said = "; ".join(f"{name} said: {err.strip()[-400:]}" for name, err in errors.items() if err.strip())
        raise CheckpointDemoError(f"bound {bound}: an agent wrote no figures: {exc}; {said}") from None
    return prim, stby, guest_cpu


def _bound_figures(prim: dict, stby: dict, guest_cpu: float, reference: str | None,
                   image_ref: str | None) -> dict:
    """One bound's row of the demo's result, from the two agents' figures."""
    fo = stby.get("failover") or {}
    return {
        "checkpoints_per_s": prim["checkpoints_per_s"],
        "checkpoints_per_s_pause_plus_run": prim.get("checkpoints_per_s_pause_plus_run"),
        "dirty_log": prim.get("dirty_log"),
        "pause_ms": {k: prim["pause_ms"][k] for k in ("p50", "p99", "max", "count")},
        "dirty_pages": {k: prim["dirty_pages"][k] for k in ("p50", "max", "mean")},
        "bound_exceeded": prim["bound_exceeded"],
        "steps_per_epoch": prim["steps_per_epoch"],
        "time_us": {k: {"p50": v["p50"], "mean": v["mean"]} for k, v in prim["time_us"].items()},
        "commit_latency_ms": {k: prim["commit_latency_ms"][k] for k in ("p50", "p99", "max")},
        # CPU time per epoch of each process (2 cores here: they compete)
        "cpu_us_per_epoch": {"guest": round(guest_cpu / max(1, prim["epochs"] - 1) * 1e6, 1),
                             "primary": prim["cpu_us_per_epoch"], "standby": stby["cpu_us_per_epoch"]},
        "epochs": prim["epochs"],
        "epoch_driver": prim.get("epoch_driver"),
        "committed_epoch_primary": prim["committed_epoch"],
        "committed_epoch_standby": stby["committed_epoch"],
        "primary_end": prim["end_reason"],
        "standby_end": stby["end_reason"],
        "failover_ms": fo.get("failover_ms"),
        "final_hash": fo.get("final_hash"),
        "image_hash": stby.get("image_hash"),
        "image_reference_hash": image_ref,
        "image_verified": bool(image_ref and image_ref == stby.get("image_hash")),
        "verified": bool(reference and fo.get("final_hash") == reference),
    }


def _cpu_seconds(pid: int) -> float:
    """CPU time (user + system, all threads) of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def format_demo(result: dict) -> str:
    lines = [f"checkpointing a {result['ram_bytes'] >> 20} MiB random-write guest ({result['threads']} vCPU, "
             f"{result['backing']}), {result['seconds']:g} s per bound, then failover",
             f"{'bound':>6} {'ckpt/s':>8} {'pause p50':>10} {'p99':>8} {'max':>8} {'dirty p50':>10} {'max':>5}"
             f" {'run_until':>10} {'harvest':>8} {'send':>7} {'failover':>9}  verified"]
    for bound, b in result["bounds"].items():
        t = b["time_us"]
        lines.append(
            f"{bound:>6} {_fmt(b['checkpoints_per_s'], 0):>8} {_fmt(b['pause_ms']['p50']):>10}"
            f" {_fmt(b['pause_ms']['p99']):>8} {_fmt(b['pause_ms']['max']):>8} {_fmt(b['dirty_pages']['p50'], 0):>10}"
            f" {_fmt(b['dirty_pages']['max'], 0):>5} {_fmt(t['run_until_rpc']['mean'], 0):>8}µs"
            f" {_fmt(t['harvest']['mean'], 0):>6}µs {_fmt(t['send']['mean'], 0):>5}µs"
            f" {_fmt(b['failover_ms'], 1):>7}ms  {b['verified'] and b['image_verified']}")
    lines.append("pause: guest parked -> resume requested (ms); time per epoch: mean µs; "
                 f"({result['seconds_total']:.0f} s)")
    return "\n".join(lines)


def run_demo_command(args) -> int:
    from postcopy.testbed.netns import TestbedError

    try:
        result = run_checkpoint_demo(args.ram, args.bounds, args.seconds, threads=args.threads,
                                     backing=args.backing, port=args.port, primary_flags=tuple(args.primary_flags))
    except (CheckpointDemoError, TestbedError) as exc:
        print(f"postcopy checkpoint-demo: {exc}", file=sys.stderr)
        return 1
    print(format_demo(result))
    if args.json:
        write_json(args.json, result)
    return 0 if result["verified"] else 1
