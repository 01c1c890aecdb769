"""``postcopy checkpoint``, ``postcopy standby`` and ``postcopy checkpoint-demo``:
continuous checkpointing of a running guest to a standby (Remus style), and a demo that
runs both sides in the two-namespace testbed, kills the primary guest and fails over.

:func:`run_checkpoint_demo` is the benchmark entry point (checkpoints per second and
pause time per epoch at bounded dirty sets)."""
from __future__ import annotations

import argparse
import signal
import sys

from postcopy.kernel.dirtylog import KINDS as DIRTY_LOG_KINDS
from postcopy.units import positive_float_arg, positive_int_arg
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
    p.add_argument("--overlap", action="store_true", default=None,
                   help="send each epoch while the guest runs the next (copies the pages first) instead of "
                        "while it is parked (default: with the C epoch loop only)")
    p.add_argument("--no-overlap", dest="overlap", action="store_false",
                   help="send each epoch while the guest is parked")
    p.add_argument("--no-doorbell", dest="doorbell", action="store_false",
                   help="one control request per epoch instead of the guest's doorbell in shared memory "
                        "(pagemap-scan without --interval-ms uses the doorbell by default)")
    p.add_argument("--no-native-loop", dest="native_loop", action="store_false",
                   help="run every epoch in Python instead of the C epoch loop (A/B)")
    p.add_argument("--dirty-log", choices=DIRTY_LOG_KINDS, default="auto",
                   help="dirty log backend (auto: whichever this kernel offers; a KVM guest's own log "
                        "on a --vm kvm guest)")
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
    s.add_argument("--no-native-loop", dest="native_loop", action="store_false",
                   help="receive every epoch in Python instead of the C epoch loop (A/B)")
    s.add_argument("--json", metavar="FILE", help="write the figures as JSON")
    s.set_defaults(func=run_standby)


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
        max_unacked=args.max_unacked, overlap=args.overlap, dirty_log=args.dirty_log, doorbell=args.doorbell,
        native_loop=args.native_loop,
        on_commit=committed))
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
                                    timeout=args.timeout, wait_guest=not args.no_wait,
                                    native_loop=args.native_loop))
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

