"""``postcopy source`` and ``postcopy dest``: the two halves of a migration, for real
hosts (the demo runs the same commands inside its namespaces)."""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile

from postcopy.kernel.dirtylog import KINDS as DIRTY_LOGS
from postcopy.protocol import wire
from postcopy.migration.destination import DestConfig, DestinationAgent, DestinationError
from postcopy.migration.install import DEFAULT_STAGING_PAGES, INSTALL_PATHS
from postcopy.kernel.process import pid_exists
from postcopy.report import source_report, write_json
from postcopy.migration.precopy import ConvergencePolicy
from postcopy.migration.progress import terminal_or_none
from postcopy.units import rate_arg
from postcopy.migration.source import MODES, MigrationError, SourceAgent, SourceConfig
from postcopy.protocol.endpoint import format_endpoint, parse_endpoint
from postcopy.protocol.keyfile import load_key


def _endpoint(text: str) -> tuple[str, int]:
    try:
        return parse_endpoint(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _key(args) -> bytes:
    try:
        return load_key(args.key_file)
    except (OSError, ValueError, wire.ProtocolError) as exc:
        raise SystemExit(f"postcopy: cannot use key file {args.key_file}: {exc}")


def register(subparsers) -> None:
    src = subparsers.add_parser("source", help="migrate a running guest to a destination agent")
    src.add_argument("--guest", required=True, metavar="PATH", help="the guest's control socket")
    src.add_argument("--connect", required=True, type=_endpoint, metavar="HOST:PORT")
    src.add_argument("--key-file", required=True, metavar="FILE", help="shared key (both agents)")
    src.add_argument("--json", metavar="FILE",
                     help="write the report as JSON: the demo's shape (DESIGN.md's figures), the source's own "
                          "figures under 'source'")
    src.add_argument("--raw-json", dest="report", action="store_false",
                     help="with --json: write only the source's own figures (what the demo reads)")
    src.add_argument("--events", metavar="FILE",
                     help="write one JSON line per status change (setup, precopy round, switchover, postcopy, "
                          "recovery, done, failed) with the live figures")
    src.add_argument("--progress", action="store_true",
                     help="draw the live progress line on stderr even when it is not a terminal")
    src.add_argument("--status-socket", metavar="PATH",
                     help="answer `postcopy status --source PATH` while migrating")
    add_precopy_options(src)
    src.add_argument("--recovery-timeout", type=float, default=30.0, metavar="SECONDS",
                     help="postcopy: keep reconnecting this long after the link breaks (0: fail at once)")
    src.add_argument("--push-delay", type=float, default=0.0, metavar="SECONDS",
                     help="benchmarks: serve demand faults alone this long before pushing")
    add_unsafe_option(src)
    src.set_defaults(func=run_source)

    dst = subparsers.add_parser("dest", help="receive a migration and run the guest here")
    dst.add_argument("--listen", required=True, type=_endpoint, metavar="HOST:PORT")
    dst.add_argument("--key-file", required=True, metavar="FILE")
    dst.add_argument("--backing", choices=("memfd", "anon"), default="memfd", help="RAM backing of the incoming guest")
    dst.add_argument("--attach", metavar="PATH", help="control socket of an incoming guest already started")
    dst.add_argument("--workdir", metavar="DIR", help="where the incoming guest's control socket goes")
    dst.add_argument("--recovery-timeout", type=float, default=30.0, metavar="SECONDS",
                     help="postcopy: wait this long for the source to reconnect after the link breaks")
    dst.add_argument("--json", metavar="FILE", help="write the figures as JSON")
    add_install_option(dst)
    dst.add_argument("--vm", choices=("process", "kvm"), default="process",
                     help="the incoming guest this agent starts: a process guest (default) or a KVM guest")
    dst.add_argument("--staging-pages", type=int, default=DEFAULT_STAGING_PAGES, metavar="N",
                     help=f"--install move: staging area of the incoming guest, in pages (default {DEFAULT_STAGING_PAGES})")
    dst.add_argument("--fault-poll", choices=("sleep", "spin"), default="sleep",
                     help="the fault loop sleeps in poll(2) (default) or busy-polls the userfaultfd "
                          "(spin: for experiments; it keeps one CPU busy)")
    add_unsafe_option(dst)
    dst.set_defaults(func=run_dest)


def add_unsafe_option(parser: argparse.ArgumentParser) -> None:
    """``--unsafe-no-frame-auth``: benchmarks only."""
    parser.add_argument("--unsafe-no-frame-auth", action="store_true", help="UNSAFE, for measuring the cost of frame authentication only: frames after the handshake carry no tag (both agents must say so)")


def add_install_option(parser: argparse.ArgumentParser) -> None:
    """``--install`` and ``--prealloc``, shared by ``dest`` and ``demo``."""
    parser.add_argument("--install", choices=INSTALL_PATHS, default="copy",
                        help="how pages are installed: copy (UFFDIO_COPY, default), continue (memfd backing: "
                             "write the page cache, UFFDIO_CONTINUE on minor faults), move (anon backing: "
                             "stage in the guest, UFFDIO_MOVE into place)")
    parser.add_argument("--prealloc", action="store_true",
                        help="with --install continue: allocate the incoming guest's RAM before any page moves "
                             "(before the source pauses its guest), then receive pages straight into it: no "
                             "allocation while pages move (default off)")


def add_precopy_options(parser: argparse.ArgumentParser) -> None:
    """Mode and precopy options, shared by ``source`` and ``demo``."""
    parser.add_argument("--mode", choices=MODES, default="postcopy",
                        help="postcopy (default), precopy (stop-and-copy after rounds), hybrid (rounds, then postcopy)")
    parser.add_argument("--dirty-log", choices=DIRTY_LOGS, default="auto",
                        help="dirty log for precopy rounds (default auto: soft-dirty where it works, else "
                             "pagemap-scan; a KVM guest: kvm-ring, else kvm-clear, else kvm-bitmap)")
    parser.add_argument("--downtime-limit", type=float, default=300.0, metavar="MS",
                        help="precopy stops when the rest fits this at the measured bandwidth (default 300)")
    parser.add_argument("--max-rounds", type=int, default=30, help="precopy round limit (default 30)")
    parser.add_argument("--stall-rounds", type=int, default=3, metavar="N",
                        help="switch over when the dirty set has not shrunk for N rounds (default 3; 0: never)")
    parser.add_argument("--no-free-hints", action="store_true", help="send pages the guest reports free")
    parser.add_argument("--auto-converge", action="store_true",
                        help="throttle the guest's vCPUs while rounds do not converge (QEMU's auto-converge: "
                             "20%%, then +10%% each time, at most 99%%; lifted at the switchover)")
    parser.add_argument("--dirty-limit", type=float, default=0.0, metavar="PAGES_S",
                        help="cap each vCPU's step rate so that it dirties at most this many pages/s during "
                             "precopy (0: no limit)")
    parser.add_argument("--max-bandwidth", type=rate_arg, default=0, metavar="RATE",
                        help="precopy bandwidth limit, e.g. 1gbit or 100MB (default: none)")
    parser.add_argument("--max-postcopy-bandwidth", type=rate_arg, default=0, metavar="RATE",
                        help="the postcopy pusher's bandwidth limit; demand pages are never held back (default: none)")


def convergence_argv(args) -> list[str]:
    """Source flags for the convergence options of :func:`add_precopy_options` in
    ``args`` that differ from their defaults (the demo passes them on)."""
    argv = []
    if args.auto_converge:
        argv.append("--auto-converge")
    if args.dirty_limit:
        argv += ["--dirty-limit", repr(args.dirty_limit)]
    if args.max_bandwidth:
        argv += ["--max-bandwidth", f"{args.max_bandwidth}bit"]
    if args.max_postcopy_bandwidth:
        argv += ["--max-postcopy-bandwidth", f"{args.max_postcopy_bandwidth}bit"]
    return argv


def policy_of(args) -> ConvergencePolicy:
    return ConvergencePolicy(downtime_limit_ms=args.downtime_limit, max_rounds=args.max_rounds,
                             stall_rounds=args.stall_rounds, auto_converge=args.auto_converge,
                             dirty_limit=args.dirty_limit)


def run_source(args) -> int:
    events = open(args.events, "w") if args.events else None
    try:
        agent = SourceAgent(SourceConfig(
            guest_control=args.guest, endpoint=args.connect, key=_key(args), mode=args.mode,
            dirty_log=args.dirty_log, policy=policy_of(args), free_page_hints=not args.no_free_hints,
            push_delay=args.push_delay, recovery_timeout=args.recovery_timeout,
            frame_auth=not args.unsafe_no_frame_auth, max_bandwidth=args.max_bandwidth / 8,
            max_postcopy_bandwidth=args.max_postcopy_bandwidth / 8, events=events,
            terminal=terminal_or_none(sys.stderr, force=args.progress), status_socket=args.status_socket))
        figures = agent.run()
    except MigrationError as exc:
        print(f"postcopy source: {exc}", file=sys.stderr)
        return 1
    finally:
        if events is not None:
            events.close()
    if args.json:
        write_json(args.json, source_report(figures) if args.report else figures)
    dest = figures.get("dest", {})
    print(f"migrated: total {figures['total_ms']:.1f} ms, downtime {dest.get('downtime_ms') or float('nan'):.2f} ms, "
          f"sent {figures['bytes_sent'] / 2**20:.1f} MiB")
    return 0


WORKDIR_PREFIX = "postcopy-dest-"
_WORKDIR_NAME = re.compile(re.escape(WORKDIR_PREFIX) + r"(\d+)-")


def remove_stale_workdirs(parent: str | None) -> list[str]:
    """Remove the work folders of destination agents that died without cleaning up
    (kill -9): named ``postcopy-dest-<pid>-*``, ours, and that pid is gone."""
    parent = parent or tempfile.gettempdir()
    removed = []
    try:
        names = os.listdir(parent)
    except OSError:
        return removed
    for name in names:
        match = _WORKDIR_NAME.match(name)
        path = os.path.join(parent, name)
        if not match or pid_exists(int(match.group(1))):
            continue
        try:
            if os.lstat(path).st_uid != os.geteuid() or not os.path.isdir(path):
                continue
        except OSError:
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def run_dest(args) -> int:
    remove_stale_workdirs(args.workdir)
    with tempfile.TemporaryDirectory(prefix=f"{WORKDIR_PREFIX}{os.getpid()}-", dir=args.workdir) as workdir:
        agent = DestinationAgent(DestConfig(listen=args.listen, key=_key(args), workdir=workdir,
                                            backing=args.backing, guest_control=args.attach,
                                            recovery_timeout=args.recovery_timeout, install=args.install,
                                            staging_pages=args.staging_pages, guest_vm=args.vm,
                                            frame_auth=not args.unsafe_no_frame_auth,
                                            fault_poll=args.fault_poll, prealloc=args.prealloc))
        try:
            agent.bind()
            print(f"listening on {format_endpoint(args.listen)}", flush=True)
            figures = agent.run()
        except (DestinationError, wire.ProtocolError, OSError) as exc:
            print(f"postcopy dest: {exc}", file=sys.stderr)
            return 1
    if args.json:
        write_json(args.json, figures)
    print(json.dumps({"final_hash": figures.get("final_hash"), "downtime_ms": figures.get("downtime_ms"),
                      "install": figures.get("install")}))
    return 0
