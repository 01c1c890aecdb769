"""``postcopy checkpoint``, ``postcopy standby`` and ``postcopy checkpoint-demo``:
continuous checkpointing of a running guest to a standby (Remus style), and a demo that
runs both sides in the two-namespace testbed, kills the primary guest and fails over.

:func:`run_checkpoint_demo` is the benchmark entry point (checkpoints per second and
pause time per epoch at bounded dirty sets)."""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

from postcopy.protocol import wire
from postcopy.units import positive_float_arg, positive_int_arg, size_arg
from postcopy.report import write_json
from postcopy.protocol.endpoint import format_endpoint, parse_endpoint
from postcopy.protocol.keyfile import load_key

DEFAULT_PORT = 7030
# Starting a Python process takes seconds on a busy host: wait for observable readiness
# this long before calling it a failure.
STARTUP_TIMEOUT = 120.0
DEMO_BOUNDS = (64, 256, 1024)


def _endpoint(text: str) -> tuple[str, int]:
    try:
        return parse_endpoint(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _bounds(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of page counts") from None
    if not values or min(values) < 2:
        raise argparse.ArgumentTypeError("dirty bounds must be page counts of at least 2")
    return values


def _load_key(path: str, who: str) -> bytes | None:
    try:
        return load_key(path)
    except (OSError, ValueError) as exc:
        print(f"postcopy {who}: cannot use key file {path}: {exc}", file=sys.stderr)
        return None


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "checkpoint", help="keep a standby copy of a running guest's RAM, in epochs (Remus style)",
        description="Attach to a running guest and send its RAM to a standby in epochs: the guest parks "
                    "after a step budget that bounds the pages it dirties, the dirty pages go out, the "
                    "guest runs on; the standby commits each complete epoch. Ends after --epochs, "
                    "--seconds, SIGINT/SIGTERM, or when the guest finishes or is lost (then the standby "
                    "is told, so it can fail over).")
    p.add_argument("--guest", required=True, metavar="PATH", help="the guest's control socket")
    p.add_argument("--connect", required=True, type=_endpoint, metavar="HOST:PORT", help="the standby")
    p.add_argument("--key-file", required=True, metavar="FILE", help="shared key (both sides)")
    p.add_argument("--max-dirty", type=positive_int_arg, default=256, metavar="PAGES",
                   help="bound on pages dirtied per epoch (default 256)")
    stop = p.add_mutually_exclusive_group()
    stop.add_argument("--epochs", type=positive_int_arg, metavar="N", help="stop after N epochs")
    stop.add_argument("--seconds", type=positive_float_arg, metavar="S", help="stop after S seconds")
    p.add_argument("--interval-ms", type=positive_float_arg, metavar="MS",
                   help="also end an epoch after MS milliseconds (default: only the dirty bound ends it)")
    p.add_argument("--max-unacked", type=int, default=4, metavar="N",
                   help="epochs the standby may lag behind before the guest waits (default 4; 0: every "
                        "epoch is committed before the guest runs on)")
    p.add_argument("--overlap", action="store_true",
                   help="send each epoch while the guest runs the next (copies the pages first; pays "
                        "with spare cores) instead of while it is parked")
    p.add_argument("--dirty-log", choices=("auto", "soft-dirty", "pagemap-scan"), default="auto",
                   help="dirty log backend (auto: whichever this kernel offers)")
    p.add_argument("--json", metavar="FILE", help="write the figures as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.set_defaults(func=run_primary, _parser=p)

    s = subparsers.add_parser(
        "standby", help="hold a checkpointed guest's RAM; fail over when the primary is lost",
        description="Receive a primary's epochs into a RAM image, applying each only when complete. "
                    "With --failover, when the primary is lost (connection lost, silent, or its guest "
                    "died) start the guest from the last complete epoch and wait for it.")
    s.add_argument("--listen", required=True, type=_endpoint, metavar="HOST:PORT")
    s.add_argument("--key-file", required=True, metavar="FILE")
    s.add_argument("--failover", action="store_true", help="start the guest from the last complete epoch "
                                                           "when the primary is lost")
    s.add_argument("--backing", choices=("memfd", "anon"), help="RAM backing of the failover guest "
                                                                "(default: the primary's)")
    s.add_argument("--guest-control", metavar="PATH", help="control socket of the failover guest")
    s.add_argument("--workdir", metavar="DIR", help="where temporary control sockets go")
    s.add_argument("--timeout", type=positive_float_arg, default=5.0, metavar="S",
                   help="silence from the primary that counts as losing it (default 5)")
    s.add_argument("--no-wait", action="store_true", help="after failover, exit once the guest runs")
    s.add_argument("--json", metavar="FILE", help="write the figures as JSON")
    s.set_defaults(func=run_standby)

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
    d.set_defaults(func=run_demo_command)


# -- primary ---------------------------------------------------------------------------
def run_primary(args) -> int:
    from postcopy.checkpoint.primary import CheckpointConfig, CheckpointError, Checkpointer

    if args.max_unacked < 0:
        args._parser.error("--max-unacked must be >= 0")
    key = _load_key(args.key_file, "checkpoint")
    if key is None:
        return 2

    def committed(epoch: int, steps: list[int]) -> None:
        if epoch == 1 and not args.quiet:
            print(f"protected: epoch 1 committed on the standby (guest at steps {steps})", flush=True)

    agent = Checkpointer(CheckpointConfig(
        guest_control=args.guest, endpoint=args.connect, key=key, max_dirty=args.max_dirty,
        epochs=args.epochs, seconds=args.seconds, interval_ms=args.interval_ms,
        max_unacked=args.max_unacked, overlap=args.overlap, dirty_log=args.dirty_log, on_commit=committed))
    # The first SIGINT/SIGTERM ends checkpointing cleanly after the current epoch (the
    # standby then does not fail over); a second one forces the exit.
    previous = {}

    def graceful(signum, frame):
        agent.stop()
        for sig, handler in previous.items():
            signal.signal(sig, _force)

    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, graceful)
    try:
        figures = agent.run()
    except CheckpointError as exc:
        print(f"postcopy checkpoint: {exc}", file=sys.stderr)
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if args.json:
        write_json(args.json, figures)
    print(format_primary(figures), flush=True)
    if not figures["ok"]:
        print(f"postcopy checkpoint: {figures['end_reason']}: {figures['error']}", file=sys.stderr)
        return 1
    return 0


def _force(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _fmt(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def format_primary(f: dict) -> str:
    pause, dirty, t = f["pause_ms"], f["dirty_pages"], f["time_us"]
    return "\n".join([
        f"checkpointed {f['epochs']} epochs ({f['committed_epoch']} committed) in {_fmt(f['loop_s'], 2)} s, "
        f"{_fmt(f['checkpoints_per_s'], 0)} checkpoints/s; dirty log {f['dirty_log']}, "
        f"bound {f['max_dirty']} pages ({f['steps_per_epoch']} steps/epoch); end: {f['end_reason']}",
        f"pause per epoch ms: p50 {_fmt(pause['p50'])} p99 {_fmt(pause['p99'])} max {_fmt(pause['max'])}; "
        f"dirty pages per epoch: p50 {_fmt(dirty['p50'], 0)} max {_fmt(dirty['max'], 0)}",
        f"per epoch µs (mean): run_until {_fmt(t['run_until_rpc']['mean'], 1)}  harvest "
        f"{_fmt(t['harvest']['mean'], 1)}  send {_fmt(t['send']['mean'], 1)}  ack {_fmt(t['ack']['mean'], 1)}",
    ])


# -- standby ---------------------------------------------------------------------------
def run_standby(args) -> int:
    from postcopy.checkpoint.standby import Standby, StandbyConfig, StandbyError

    key = _load_key(args.key_file, "standby")
    if key is None:
        return 2
    standby = Standby(StandbyConfig(listen=args.listen, key=key, failover=args.failover, backing=args.backing,
                                    workdir=args.workdir, guest_control=args.guest_control,
                                    timeout=args.timeout, wait_guest=not args.no_wait))
    try:
        standby.bind()
        print(f"listening on {format_endpoint(args.listen)}", flush=True)
        figures = standby.run()
    except StandbyError as exc:
        print(f"postcopy standby: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        proc = standby.failover_proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            proc.wait()
        raise
    finally:
        standby.close()
    if args.json:
        write_json(args.json, figures)
    print(f"standby: {figures['end_reason']} ({figures['end_detail']}); last complete epoch "
          f"{figures['committed_epoch']} at steps {figures['committed_steps']}"
          + (f"; dropped the partial epoch {figures['discarded_partial_epoch']['epoch']}"
             if figures["discarded_partial_epoch"] else ""), flush=True)
    fo = figures.get("failover")
    if fo is None:
        return 0 if figures["end_reason"] == "primary-stopped" else 1
    if "error" in fo:
        print(f"postcopy standby: failover: {fo['error']}", file=sys.stderr)
        return 1
    print(f"failover: guest resumed from epoch {fo['epoch']} at steps {fo['steps']} in {fo['failover_ms']:.1f} ms",
          flush=True)
    if fo.get("final_hash"):
        print(f"final_hash {fo['final_hash']}", flush=True)
    if fo.get("guest_exit_code") not in (None, 0):
        print(f"postcopy standby: the failover guest exited {fo['guest_exit_code']}: "
              f"{fo.get('guest_stderr', '')}", file=sys.stderr)
        return 1
    return 0


# -- demo / benchmark ----------------------------------------------------------------------
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
                        seed: int = 7, verify: bool = True, timeout: float = 300.0) -> dict:
    """For each dirty bound: checkpoint a random-write guest from the source namespace to
    a standby in the dest namespace for ``seconds``, kill the guest (SIGKILL), let the
    standby fail over, and verify. Returns ``{"bounds": {N: figures}, ...}`` with, per
    bound, checkpoints_per_s, pause_ms (p50/p99/max), dirty_pages (p50/max), where the
    epoch time goes (time_us), commit latency, failover_ms, and verified (the failed-over
    guest's final hash equals the reference; the standby image's hash equals the
    reference parked at the committed step count)."""
    from postcopy.guest import GuestParams, reference_hash
    from postcopy.guest.control import wait_for_control
    from postcopy.testbed.netns import Testbed
    from postcopy.checkpoint.standby import reference_hash_at

    started = time.monotonic()
    # Enough steps that no guest finishes while checkpointed (~3000 epochs/s at most).
    steps = max(dirty_bounds) * int(3000 * seconds * 2) + 1_000_000
    params = GuestParams(ram=ram, threads=threads, workload="random-write", seed=seed, steps=steps,
                         backing=backing)
    results: dict = {"ram_bytes": ram, "threads": threads, "backing": backing, "seconds": seconds,
                     "steps_target": steps, "bounds": {}}
    pipes = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with tempfile.TemporaryDirectory(prefix="postcopy-ckpt-") as work, Testbed() as bed:
        key_file = os.path.join(work, "key")
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, wire.new_key())
        os.close(fd)
        endpoint = f"{bed.dest.address}:{port}"
        reference = reference_hash(params, timeout=timeout) if verify else None
        for n, bound in enumerate(dirty_bounds):
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
                                                   "--json", pjson), **pipes)
            _read_line(primary, "protected", "postcopy checkpoint", STARTUP_TIMEOUT)
            guest_cpu = _cpu_seconds(guest.pid)
            time.sleep(seconds)
            guest_cpu = _cpu_seconds(guest.pid) - guest_cpu
            guest.kill()  # the primary host "fails": its guest dies mid-run
            guest.communicate()
            try:
                primary.communicate(timeout=60)
                standby.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                raise CheckpointDemoError(f"bound {bound}: an agent did not finish after the guest was killed")
            try:
                with open(pjson) as f:
                    prim = json.load(f)
                with open(sjson) as f:
                    stby = json.load(f)
            except OSError as exc:
                raise CheckpointDemoError(f"bound {bound}: an agent wrote no figures: {exc}") from None
            fo = stby.get("failover") or {}
            image_ref = None
            if verify and stby.get("committed_steps"):
                image_ref = reference_hash_at(params, min(stby["committed_steps"]), work, timeout=timeout)
            results["bounds"][bound] = {
                "checkpoints_per_s": prim["checkpoints_per_s"],
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
    results["reference_hash"] = reference
    results["verified"] = all(b["verified"] and b["image_verified"] for b in results["bounds"].values()) \
        if verify else None
    results["seconds_total"] = round(time.monotonic() - started, 1)
    return results


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
                                     backing=args.backing, port=args.port)
    except (CheckpointDemoError, TestbedError) as exc:
        print(f"postcopy checkpoint-demo: {exc}", file=sys.stderr)
        return 1
    print(format_demo(result))
    if args.json:
        write_json(args.json, result)
    return 0 if result["verified"] else 1
