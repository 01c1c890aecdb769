"""The ``postcopy`` command: one subcommand per module, each registering itself."""
from __future__ import annotations

import argparse
import faulthandler
import importlib
import io
import signal
import sys

# Each module has register(subparsers) that adds its subcommand and sets func=handler;
# handler(args) returns the exit code.
SUBCOMMAND_MODULES = [
    "postcopy.guest.cli",
    "postcopy.kernel.doctor",
    "postcopy.migration.cli",
    "postcopy.migration.status",
    "postcopy.migration.dirtyrate",
    "postcopy.testbed.demo",
    "postcopy.bench.run",
    "postcopy.checkpoint.cli",
    "postcopy.testbed.checkpoint_demo",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="postcopy", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def _terminate(signum, frame):
    # SIGTERM takes the same clean-up path as Ctrl-C.
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    # SIGUSR1 prints every thread's stack to stderr: a hung agent or guest can be asked
    # where it is (the demo does it before killing one that missed its deadline).
    try:
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    except (AttributeError, ValueError, io.UnsupportedOperation):
        pass  # called in-process with a stderr that is no file (a test's capture): no stacks then
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("postcopy: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
