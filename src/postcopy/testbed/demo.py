"""``postcopy demo``: build the two-namespace testbed, start a guest on the source host,
migrate it mid-run to the destination host with the real ``postcopy source`` and
``postcopy dest`` commands, let it finish there, and verify its final RAM hash against
the same workload run without migration."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from postcopy import report

from postcopy import svg

from postcopy.protocol import wire
from postcopy.migration.cli import add_install_option, add_precopy_options
from postcopy.migration.install import install_path_error
from postcopy.guest.control import GuestClient, GuestError, wait_for_control
from postcopy.guest.cli import add_guest_options, params_from_args
from postcopy.guest.runtime import layout_error
from postcopy.guest import GuestParams, reference_hash
from postcopy.testbed.netns import Testbed
from postcopy.units import rate_arg, size_arg

DEFAULT_PORT = 7010
DEMO_STEPS = 4_000_000  # per vCPU: ~8 s at DEMO_RATE, so the guest is mid-run when it moves
DEMO_RATE = 500_000.0  # steps/s per vCPU
# The reference hash depends only on the guest parameters: compute it once per process.
_REFERENCE_HASHES: dict[GuestParams, str] = {}


class DemoError(RuntimeError):
    """The demo could not run or the migration failed; the message says where."""


@dataclass
class DemoOptions:
    params: GuestParams
    mode: str = "postcopy"
    rate: int | None = None  # link rate limit, bits/s
    migrate_after: float = 0.5
    port: int = DEFAULT_PORT
    progress: bool = False
    timeout: float = 300.0
    push_delay: float = 0.0  # benchmarks: demand faults alone before the pusher starts
    dirty_log: str = "auto"
    downtime_limit_ms: float = 300.0
    max_rounds: int = 30
    stall_rounds: int = 3
    free_hints: bool = True
    install: str = "copy"  # destination install path: copy, continue (memfd), move (anon)


def _agent(*args: str) -> list[str]:
    return [sys.executable, "-m", "postcopy", *args]


def _wait(proc: subprocess.Popen, name: str, deadline: float) -> str:
    try:
        out, err = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise DemoError(f"{name} did not finish in time") from None
    if proc.returncode != 0:
        raise DemoError(f"{name} failed (exit {proc.returncode}): {(err or out or '').strip()[-2000:]}")
    return out or ""


def run_demo(options: DemoOptions) -> dict:
    """Run one migration on a fresh testbed; returns the report (DESIGN.md contract)."""
    params = options.params
    if params.steps is None:
        raise DemoError("the demo needs --steps so the guest finishes and can be verified")
    error = install_path_error(options.install, params.backing)
    if error:
        raise DemoError(error)
    deadline = time.monotonic() + options.timeout
    with tempfile.TemporaryDirectory(prefix="postcopy-demo-") as work, Testbed(rate=options.rate) as bed:
        key_file = os.path.join(work, "key")
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, wire.new_key())
        os.close(fd)
        control = os.path.join(work, "guest.sock")
        endpoint = f"{bed.dest.address}:{options.port}"
        pipes = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

        guest = bed.popen(bed.source, params.argv(control=control), **pipes)
        wait_for_control(control, timeout=30, proc=guest)
        _warm_up(control, options)
        dest = bed.popen(bed.dest, _agent("dest", "--listen", endpoint, "--key-file", key_file,
                                          "--backing", params.backing, "--install", options.install,
                                          "--json", f"{work}/dest.json"), **pipes)
        source = bed.popen(bed.source, _agent("source", "--guest", control, "--connect", endpoint,
                                              "--key-file", key_file, "--json", f"{work}/source.json",
                                              "--push-delay", str(options.push_delay), "--mode", options.mode,
                                              "--dirty-log", options.dirty_log,
                                              "--downtime-limit", str(options.downtime_limit_ms),
                                              "--max-rounds", str(options.max_rounds),
                                              "--stall-rounds", str(options.stall_rounds),
                                              *([] if options.free_hints else ["--no-free-hints"])), **pipes)
        _progress(options, "migrating ...")
        _wait(source, "postcopy source", deadline)
        _wait(dest, "postcopy dest", deadline)
        _wait(guest, "source guest", deadline)
        with open(f"{work}/source.json") as f:
            source_figures = json.load(f)
        with open(f"{work}/dest.json") as f:
            dest_figures = json.load(f)
    reference = _REFERENCE_HASHES.get(params)
    if reference is None:
        _progress(options, "computing the reference hash (same workload, no migration) ...")
        reference = _REFERENCE_HASHES[params] = reference_hash(params)
    dest = source_figures.get("dest", {}) | {"final_hash": dest_figures.get("final_hash")}
    if dest.get("max_step_gap_ms") is None:  # the guest finished before all pages were in
        dest["max_step_gap_ms"] = dest_figures.get("max_step_gap_ms")
    result = report.build_report(
        mode=options.mode, dirty_log=source_figures.get("dirty_log", "none"), ram_bytes=params.ram, workload=params.workload,
        source=source_figures, dest=dest, final_hash=dest_figures.get("final_hash"), reference_hash=reference,
        guest={"params": params.as_dict(), "reference_command": params.reference_command()},
    )
    result["install"] = dest_figures.get("install", options.install)
    return result


def _warm_up(control: str, options: DemoOptions) -> None:
    """Let the guest run a while so it migrates mid-run, and check it is still running."""
    _progress(options, f"guest running on the source; migrating in {options.migrate_after:.1f} s")
    time.sleep(options.migrate_after)
    try:
        with GuestClient(control) as guest:
            status = guest.status()
    except GuestError:
        status = {"state": "finished"}
    if status["state"] != "running":
        raise DemoError(f"the guest is {status['state']} before migration; give it more --steps "
                        f"or a smaller --migrate-after")
    _progress(options, f"guest at steps {status['steps']} of {status['steps_target']} per thread")


def _progress(options: DemoOptions, text: str) -> None:
    if options.progress:
        print(f"[demo] {text}", file=sys.stderr, flush=True)


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="migrate a running guest between two network namespaces")
    add_precopy_options(p)
    add_install_option(p)
    p.add_argument("--ram", type=size_arg, default=256 << 20, help="guest RAM (default 256M)")
    # The guest's own options and defaults (postcopy guest): the same flags, the same
    # guest. Only the run's length and pace are the demo's: it needs a bounded guest
    # that is mid-run when it moves (the rate is timing, not state).
    add_guest_options(p, steps=DEMO_STEPS, rate=DEMO_RATE)
    p.add_argument("--rate-limit", type=rate_arg, metavar="RATE", help="shape the link, e.g. 1gbit (default none)")
    p.add_argument("--migrate-after", type=float, default=0.5, metavar="SECONDS",
                   help="how long the guest runs on the source first (default 0.5)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"destination port (default {DEFAULT_PORT})")
    p.add_argument("--json", metavar="FILE", help="write the report as JSON")
    p.add_argument("--svg", metavar="FILE", help="write a timeline picture of the migration (SVG)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    params = params_from_args(args, args.ram)
    error = layout_error(params.ram, params.threads, params.workload, params.working_set, params.free_fraction)
    if error:
        print(f"postcopy demo: {error}", file=sys.stderr)
        return 2
    options = DemoOptions(params=params, mode=args.mode, rate=args.rate_limit, migrate_after=args.migrate_after,
                          port=args.port, progress=sys.stderr.isatty(), dirty_log=args.dirty_log,
                          downtime_limit_ms=args.downtime_limit, max_rounds=args.max_rounds,
                          stall_rounds=args.stall_rounds,
                          free_hints=not args.no_free_hints, install=args.install)
    try:
        result = run_demo(options)
    except DemoError as exc:
        print(f"postcopy demo: {exc}", file=sys.stderr)
        return 1
    print(report.format_summary(result))
    if args.json:
        report.write_json(args.json, result)
    if args.svg:
        svg.write_svg(args.svg, svg.migration_figure(result))
    return 0 if result["verified"] else 1
