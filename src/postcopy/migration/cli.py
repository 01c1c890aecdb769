"""``postcopy source`` and ``postcopy dest``: the two halves of a migration, for real
hosts (the demo runs the same commands inside its namespaces)."""
from __future__ import annotations

import argparse
import json
import sys
import tempfile

from postcopy.protocol import wire
from postcopy.migration.destination import DestConfig, DestinationAgent, DestinationError
from postcopy.migration.install import DEFAULT_STAGING_PAGES, INSTALL_PATHS
from postcopy.report import write_json
from postcopy.migration.precopy import ConvergencePolicy
from postcopy.migration.source import MODES, MigrationError, SourceAgent, SourceConfig
from postcopy.protocol.channel import parse_endpoint


def _endpoint(text: str) -> tuple[str, int]:
    try:
        return parse_endpoint(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _key(args) -> bytes:
    try:
        return wire.load_key(args.key_file)
    except (OSError, ValueError, wire.ProtocolError) as exc:
        raise SystemExit(f"postcopy: cannot use key file {args.key_file}: {exc}")


def register(subparsers) -> None:
    src = subparsers.add_parser("source", help="migrate a running guest to a destination agent")
    src.add_argument("--guest", required=True, metavar="PATH", help="the guest's control socket")
    src.add_argument("--connect", required=True, type=_endpoint, metavar="HOST:PORT")
    src.add_argument("--key-file", required=True, metavar="FILE", help="shared key (both agents)")
    src.add_argument("--json", metavar="FILE", help="write the figures as JSON")
    add_precopy_options(src)
    src.add_argument("--recovery-timeout", type=float, default=30.0, metavar="SECONDS",
                     help="postcopy: keep reconnecting this long after the link breaks (0: fail at once)")
    src.add_argument("--push-delay", type=float, default=0.0, metavar="SECONDS",
                     help="benchmarks: serve demand faults alone this long before pushing")
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
    dst.add_argument("--staging-pages", type=int, default=DEFAULT_STAGING_PAGES, metavar="N",
                     help=f"--install move: staging area of the incoming guest, in pages (default {DEFAULT_STAGING_PAGES})")
    dst.set_defaults(func=run_dest)


def add_install_option(parser: argparse.ArgumentParser) -> None:
    """``--install``, shared by ``dest`` and ``demo``."""
    parser.add_argument("--install", choices=INSTALL_PATHS, default="copy",
                        help="how pages are installed: copy (UFFDIO_COPY, default), continue (memfd backing: "
                             "write the page cache, UFFDIO_CONTINUE on minor faults), move (anon backing: "
                             "stage in the guest, UFFDIO_MOVE into place)")


def add_precopy_options(parser: argparse.ArgumentParser) -> None:
    """Mode and precopy options, shared by ``source`` and ``demo``."""
    parser.add_argument("--mode", choices=MODES, default="postcopy",
                        help="postcopy (default), precopy (stop-and-copy after rounds), hybrid (rounds, then postcopy)")
    parser.add_argument("--dirty-log", choices=("auto", "soft-dirty", "pagemap-scan"), default="auto",
                        help="dirty log for precopy rounds (default auto: soft-dirty where it works, else pagemap-scan)")
    parser.add_argument("--downtime-limit", type=float, default=300.0, metavar="MS",
                        help="precopy stops when the rest fits this at the measured bandwidth (default 300)")
    parser.add_argument("--max-rounds", type=int, default=30, help="precopy round limit (default 30)")
    parser.add_argument("--stall-rounds", type=int, default=3, metavar="N",
                        help="switch over when the dirty set has not shrunk for N rounds (default 3; 0: never)")
    parser.add_argument("--no-free-hints", action="store_true", help="send pages the guest reports free")


def policy_of(args) -> ConvergencePolicy:
    return ConvergencePolicy(downtime_limit_ms=args.downtime_limit, max_rounds=args.max_rounds,
                             stall_rounds=args.stall_rounds)


def run_source(args) -> int:
    agent = SourceAgent(SourceConfig(guest_control=args.guest, endpoint=args.connect, key=_key(args),
                                     mode=args.mode, dirty_log=args.dirty_log, policy=policy_of(args),
                                     free_page_hints=not args.no_free_hints, push_delay=args.push_delay,
                                     recovery_timeout=args.recovery_timeout))
    try:
        figures = agent.run()
    except MigrationError as exc:
        print(f"postcopy source: {exc}", file=sys.stderr)
        return 1
    if args.json:
        write_json(args.json, figures)
    dest = figures.get("dest", {})
    print(f"migrated: total {figures['total_ms']:.1f} ms, downtime {dest.get('downtime_ms') or float('nan'):.2f} ms, "
          f"sent {figures['bytes_sent'] / 2**20:.1f} MiB")
    return 0


def run_dest(args) -> int:
    with tempfile.TemporaryDirectory(prefix="postcopy-dest-", dir=args.workdir) as workdir:
        agent = DestinationAgent(DestConfig(listen=args.listen, key=_key(args), workdir=workdir,
                                            backing=args.backing, guest_control=args.attach,
                                            recovery_timeout=args.recovery_timeout, install=args.install,
                                            staging_pages=args.staging_pages))
        try:
            agent.bind()
            print(f"listening on {args.listen[0]}:{args.listen[1]}", flush=True)
            figures = agent.run()
        except (DestinationError, wire.ProtocolError, OSError) as exc:
            print(f"postcopy dest: {exc}", file=sys.stderr)
            return 1
    if args.json:
        write_json(args.json, figures)
    print(json.dumps({"final_hash": figures.get("final_hash"), "downtime_ms": figures.get("downtime_ms"),
                      "install": figures.get("install")}))
    return 0
