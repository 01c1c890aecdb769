"""``postcopy demo``: build the two-namespace testbed, start a guest on the source host,
migrate it mid-run to the destination host with the real ``postcopy source`` and
``postcopy dest`` commands, let it finish there, and verify its final RAM hash against
the same workload run without migration."""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from postcopy import report

from postcopy import svg

from postcopy.protocol import wire
from postcopy.migration.cli import add_install_option, add_precopy_options, convergence_argv
from postcopy.migration.install import install_path_error
from postcopy.guest.control import GuestClient, GuestError, parse_final_hash, wait_for_control
from postcopy.guest.cli import add_guest_options, params_from_args
from postcopy.guest.runtime import layout_error
from postcopy.kernel.meminfo import ram_fit_error
from postcopy.guest import GuestParams, reference_hash
from postcopy.testbed import inject
from postcopy.testbed.netns import Testbed
from postcopy.units import nonneg_float_arg, port_arg, positive_int_arg, positive_rate_arg, size_arg

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
    prealloc: bool = False  # destination: populate the guest's RAM first (continue path; dest --prealloc)
    frame_auth: bool = True  # False is UNSAFE (no tags after the handshake): the bench's baseline only
    # Park the guest at this step until migrated (tests: no race with a wall clock). The
    # downtime figure then includes the time it was parked: not for benchmarks.
    hold_at: int | None = None
    # A safety net instead of a gate: the guest runs (and is migrated mid-run, with a
    # true downtime), but parks at this step rather than finish if the migration has
    # not happened yet (a busy host). Benchmarks use it.
    park_at: int | None = None
    inject: list = field(default_factory=list)  # inject.Injection events, applied in order
    source_options: tuple[str, ...] = ()  # more `postcopy source` flags (convergence, limits, --events)
    # Benchmarks: CPUs of the source host (its guest and agent) and of the destination's
    # (its agent, and so the incoming guest it starts); None: unpinned.
    cpus: tuple[frozenset[int], frozenset[int]] | None = None


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
    """Run one migration on a fresh testbed; returns the report (DESIGN.md contract).
    With ``options.inject`` the report also says what was injected, what the agents
    did and whether the outcome is the documented one (see :mod:`postcopy.testbed.inject`)."""
    params = options.params
    if params.steps is None:
        raise DemoError("the demo needs --steps so the guest finishes and can be verified")
    error = install_path_error(options.install, params.backing, prealloc=options.prealloc)
    if error:
        raise DemoError(error)
    deadline = time.monotonic() + options.timeout
    with tempfile.TemporaryDirectory(prefix="postcopy-demo-") as work, Testbed(rate=options.rate) as bed:
        key_file = os.path.join(work, "key")
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, wire.new_key())
        os.close(fd)
        control = os.path.join(work, "guest.sock")
        dest_work = os.path.join(work, "dest")  # where the incoming guest's socket is found
        os.mkdir(dest_work)
        endpoint = f"{bed.dest.address}:{options.port}"
        pipes = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        unsafe = [] if options.frame_auth else ["--unsafe-no-frame-auth"]

        guest_started = time.monotonic()
        argv = params.argv(control=control, pause_at=options.hold_at or options.park_at)
        source_cpus, dest_cpus = options.cpus or (None, None)
        guest = bed.popen(bed.source, argv, cpus=source_cpus, **pipes)
        wait_for_control(control, proc=guest)
        if options.hold_at is None:
            _warm_up(control, options, guest, guest_started)
        else:
            _wait_parked(control, options.hold_at, guest, deadline)
        dest = bed.popen(bed.dest, _agent("dest", "--listen", endpoint, "--key-file", key_file,
                                          "--backing", params.backing, "--install", options.install,
                                          "--vm", params.vm, "--workdir", dest_work,
                                          "--json", f"{work}/dest.json", *unsafe,
                                          *(["--prealloc"] if options.prealloc else [])), cpus=dest_cpus, **pipes)
        source = bed.popen(bed.source, _agent("source", "--guest", control, "--connect", endpoint,
                                              "--key-file", key_file, "--json", f"{work}/source.json", "--raw-json",
                                              "--push-delay", str(options.push_delay), "--mode", options.mode,
                                              "--dirty-log", options.dirty_log,
                                              "--downtime-limit", str(options.downtime_limit_ms),
                                              "--max-rounds", str(options.max_rounds),
                                              "--stall-rounds", str(options.stall_rounds),
                                              *([] if options.free_hints else ["--no-free-hints"]), *unsafe,
                                              *options.source_options),
                       cpus=source_cpus, **pipes)
        _progress(options, "migrating ...")
        if options.inject:
            watch = inject.PhaseWatch(control, dest, options.port, dest_work)
            return _injected(options, bed, watch, guest, source, dest, work, deadline)
        try:
            _wait(source, "postcopy source", deadline)
        except DemoError as exc:
            _raise_if_finished_early(guest, guest_started, params)
            raise DemoError(f"{exc}{_last_words(dest, 'postcopy dest')}") from None
        _wait(dest, "postcopy dest", deadline)
        _wait(guest, "source guest", deadline)
        return _report(options, work)


def _last_words(proc: subprocess.Popen, name: str) -> str:
    """The other agent's side of a failure (a source that saw its peer close says no
    more than that): what it printed, if it exits within a few seconds."""
    try:
        out, err = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        return f"; {name} is still running"
    text = (err or out or "").strip()
    return f"; {name} exited {proc.returncode}" + (f": {text[-1500:]}" if text else " and said nothing")


def _report(options: DemoOptions, work: str) -> dict:
    """The report of a completed migration, from both agents' JSON."""
    params = options.params
    with open(f"{work}/source.json") as f:
        source_figures = json.load(f)
    with open(f"{work}/dest.json") as f:
        dest_figures = json.load(f)
    dest = source_figures.get("dest", {}) | {"final_hash": dest_figures.get("final_hash")}
    if dest.get("max_step_gap_ms") is None:  # the guest finished before all pages were in
        dest["max_step_gap_ms"] = dest_figures.get("max_step_gap_ms")
    result = report.build_report(
        mode=options.mode, dirty_log=source_figures.get("dirty_log", "none"), ram_bytes=params.ram, workload=params.workload,
        source=source_figures, dest=dest, final_hash=dest_figures.get("final_hash"), reference_hash=_reference(options),
        guest={"params": params.as_dict(), "reference_command": params.reference_command()},
    )
    result["install"] = dest_figures.get("install", options.install)
    return result


def _reference(options: DemoOptions) -> str:
    reference = _REFERENCE_HASHES.get(options.params)
    if reference is None:
        _progress(options, "computing the reference hash (same workload, no migration) ...")
        reference = _REFERENCE_HASHES[options.params] = reference_hash(options.params)
    return reference


def _wait_parked(control: str, step: int, proc: subprocess.Popen, deadline: float) -> None:
    """Wait until every vCPU of the guest parked at ``step`` (an observable state: the
    guest is mid-run whatever the host's load)."""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DemoError(f"the guest exited (status {proc.returncode}) before parking at step {step}")
        with GuestClient(control) as guest:
            status = guest.status()
        if status["state"] == "paused" and all(s == step for s in status["steps"]):
            return
        time.sleep(0.01)
    raise DemoError(f"the guest did not reach step {step} in time")


def _injected(options: DemoOptions, bed: Testbed, watch: "inject.PhaseWatch", guest: subprocess.Popen,
              source: subprocess.Popen, dest: subprocess.Popen, work: str, deadline: float) -> dict:
    """Run the migration with the injections; report what happened and judge it."""
    injector = inject.Injector(bed, options.inject, watch, source, dest)
    injector.start()
    # Read the agents' output in threads: a child that outlives its agent (an incoming
    # guest) keeps the pipes open, and the judge must see that, not wait for it.
    readers = {name: inject.OutputReader(proc) for name, proc in (("source", source), ("dest", dest))}
    hung: dict[str, str | None] = {}  # agent -> the incoming guest's state when it was found hung
    for name, proc in (("source", source), ("dest", dest)):
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            hung[name] = watch.incoming_state()  # before the kill takes the guest with it
            _kill_hung(proc)
    outputs = {name: reader.text() for name, reader in readers.items()}
    events = injector.join()
    incoming_state = hung.get("dest", watch.incoming_state()) if hung else watch.incoming_state()
    result: dict = {}
    if source.returncode == 0 and dest.returncode == 0:
        _wait(guest, "source guest", deadline)
        result = _report(options, work)
        source_state, hash_ok = "migrated", None
    else:
        source_state, hash_ok = _finish_on_source(options, watch.source_control, guest, incoming_state, deadline)
    outcome, documented = inject.judge(
        source_rc=source.returncode, dest_rc=dest.returncode, verified=bool(result.get("verified")),
        source_state=source_state, incoming_state=incoming_state, source_guest_hash_ok=hash_ok)
    result["injection"] = {
        "events": events,
        "agents": {name: {"exit": proc.returncode, "said": inject.agent_said(*outputs[name]),
                          **({"hung": {"incoming_guest": hung[name],
                                       "stacks": outputs[name][1].strip().splitlines()[-60:]}}
                             if name in hung else {})}
                   for name, proc in (("source", source), ("dest", dest))},
        "source_guest": source_state, "incoming_guest": incoming_state,
        "outcome": outcome, "documented": documented,
    }
    return result


def _kill_hung(proc: subprocess.Popen) -> None:
    """Kill an agent that missed the deadline, after asking it for its threads' stacks
    (SIGUSR1, see :func:`postcopy.cli.main`): a hang is reported with where it was."""
    try:
        proc.send_signal(signal.SIGUSR1)
        proc.wait(timeout=1.0)
    except (OSError, subprocess.TimeoutExpired):
        pass
    proc.kill()
    proc.wait()


def _finish_on_source(options: DemoOptions, control: str, guest: subprocess.Popen, incoming_state: str | None,
                      deadline: float) -> tuple[str | None, bool | None]:
    """After a failed migration: is the source guest intact? Let it finish where it is
    (resuming it only if no incoming guest runs) and check its hash."""
    try:
        with GuestClient(control) as client:
            status = client.status()
            state = status["state"]
            if state == "paused" and incoming_state != "running":
                # After a switchover the guest is fenced until its destination surely
                # stopped (its recovery timeout plus a margin): wait that out, then resume.
                while (status.get("fence_remaining_s") or 0) > 0 and time.monotonic() < deadline:
                    time.sleep(min(0.5, status["fence_remaining_s"]))
                    status = client.status()
                client.resume()
    except GuestError:
        return None, None
    if state == "paused" and incoming_state == "running":
        return state, None
    try:
        out, _ = guest.communicate(timeout=max(0.1, deadline - time.monotonic()))
        return state, parse_final_hash(out) == _reference(options)
    except (subprocess.TimeoutExpired, GuestError):
        return state, None


def _warm_up(control: str, options: DemoOptions, proc: subprocess.Popen, started: float) -> None:
    """Let the guest run a while so it migrates mid-run, and check it is still running."""
    _progress(options, f"guest running on the source; migrating in {options.migrate_after:.1f} s")
    time.sleep(options.migrate_after)
    try:
        with GuestClient(control) as guest:
            status = guest.status()
    except GuestError:
        status = {"state": "finished"}
    if status["state"] == "paused" and options.park_at is not None:
        return  # parked at its safety net: it migrates from there
    if status["state"] != "running":
        _raise_if_finished_early(proc, started, options.params)
        raise DemoError(f"the guest is {status['state']} before migration; give it more --steps "
                        f"or a smaller --migrate-after")
    _progress(options, f"guest at steps {status['steps']} of {status['steps_target']} per thread")


def _raise_if_finished_early(proc: subprocess.Popen, started: float, params: GuestParams) -> None:
    """A guest that ran all its steps before the switchover leaves nothing to migrate:
    say that, not what the agents saw of its going."""
    try:
        proc.wait(timeout=2)  # a finished guest is exiting already
    except subprocess.TimeoutExpired:
        return
    if proc.returncode == 0:
        took = time.monotonic() - started
        raise DemoError(f"the guest ran its {params.steps} steps in {took:.1f} s and exited before the migration "
                        f"started (or reached its switchover); raise --steps or lower --rate") from None


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
    p.add_argument("--rate-limit", type=positive_rate_arg, metavar="RATE", help="shape the link, e.g. 1gbit (default none)")
    p.add_argument("--migrate-after", type=nonneg_float_arg, default=0.5, metavar="SECONDS",
                   help="how long the guest runs on the source first (default 0.5)")
    p.add_argument("--port", type=port_arg, default=DEFAULT_PORT, help=f"destination port (default {DEFAULT_PORT})")
    parking = p.add_mutually_exclusive_group()
    parking.add_argument("--park-at", type=positive_int_arg, metavar="STEP",
                         help="a safety net for a slow or busy host: the guest runs and is migrated mid-run, but "
                              "parks at this step (below --steps) instead of finishing if the migration has not "
                              "happened yet; the downtime is true unless it parked (then it includes the parked "
                              "time) (default none)")
    parking.add_argument("--hold-at", type=positive_int_arg, metavar="STEP",
                         help="park the guest at this step (below --steps) and migrate it from there, whatever "
                              "the host's pace; the downtime then includes the time it was parked: not a "
                              "benchmark figure (default none)")
    p.add_argument("--inject", type=_injection, action="append", default=[], metavar="EVENT",
                   help="fault injection at an observed phase (repeatable): link-down=DURATION@PHASE, "
                        "flap=DOWN/UP:TOTAL@PHASE, kill-source@PHASE, kill-dest@PHASE, stop-dest=DURATION@PHASE; "
                        "PHASE is precopy, switchover or postcopy. The report says whether the outcome is the "
                        "documented one; exit 0 if it is (default none)")
    p.add_argument("--events", metavar="FILE", help="the source's status-change events, as JSON lines (default none)")
    p.add_argument("--json", metavar="FILE", help="write the report as JSON")
    p.add_argument("--svg", metavar="FILE", help="write a timeline picture of the migration (SVG)")
    p.set_defaults(func=main, _parser=p)


def _injection(text: str) -> inject.Injection:
    try:
        return inject.parse_injection(text)
    except inject.InjectionError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _usage_error(args: argparse.Namespace) -> str | None:
    """What argparse cannot check alone, before any namespace or process is made."""
    error = layout_error(args.ram, args.threads, args.workload, args.working_set, args.free_fraction)
    error = error or install_path_error(args.install, args.backing, prealloc=args.prealloc)
    for flag, step in (("--park-at", args.park_at), ("--hold-at", args.hold_at)):
        if step is not None and step >= args.steps:
            error = error or f"{flag} {step} must be below --steps {args.steps} (the guest would finish first)"
    too_big = ram_fit_error(args.ram, copies=2)
    error = error or (too_big and f"--ram {args.ram >> 20}M: {too_big}")
    try:
        inject.check_mode(args.inject, args.mode)
    except inject.InjectionError as exc:
        error = error or str(exc)
    return error


def main(args: argparse.Namespace) -> int:
    error = _usage_error(args)
    if error:
        args._parser.error(error)  # exit 2 with the demo's own usage line
    params = params_from_args(args, args.ram)
    options = DemoOptions(params=params, mode=args.mode, rate=args.rate_limit, migrate_after=args.migrate_after,
                          port=args.port, progress=sys.stderr.isatty(), dirty_log=args.dirty_log,
                          downtime_limit_ms=args.downtime_limit, max_rounds=args.max_rounds,
                          stall_rounds=args.stall_rounds,
                          free_hints=not args.no_free_hints, install=args.install, prealloc=args.prealloc,
                          inject=args.inject,
                          park_at=args.park_at, hold_at=args.hold_at,
                          source_options=(*convergence_argv(args),
                                          *(["--events", os.path.abspath(args.events)] if args.events else [])))
    try:
        result = run_demo(options)
    except DemoError as exc:
        print(f"postcopy demo: {exc}", file=sys.stderr)
        return 1
    if "pages" in result:  # the migration completed
        print(report.format_summary(result))
    if args.json:
        report.write_json(args.json, result)
    if args.svg and "pages" in result:
        svg.write_svg(args.svg, svg.migration_figure(result))
    if "injection" in result:
        print(inject.format_injection(result["injection"]))
        return 0 if result["injection"]["documented"] else 1
    return 0 if result["verified"] else 1
