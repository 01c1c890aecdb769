"""``postcopy guest``: run a guest (or an incoming guest waiting for its RAM)."""
from __future__ import annotations

import argparse
import sys

from postcopy.kernel.meminfo import ram_fit_error
from postcopy.units import nonneg_float_arg, positive_int_arg, seed_arg, size_arg


def add_guest_options(p: argparse.ArgumentParser, *, steps: int | None, rate: float,
                      explicit_only: bool = False) -> None:
    """The options that make a guest, with the one set of defaults of
    :data:`postcopy.guest.control.GUEST_DEFAULTS` (``steps`` and ``rate``, which do
    not change the guest's final RAM for a given step count, are the caller's).
    ``explicit_only``: leave unset options None (so a caller can tell what was given)
    and resolve them with :func:`params_from_args`; help shows the defaults either way."""
    from postcopy.guest.control import GUEST_DEFAULTS as d
    from postcopy.guest.params import BACKINGS, MAX_THREADS, WORKLOADS

    def default(value):
        return None if explicit_only else value

    p.add_argument("--threads", type=positive_int_arg, default=default(d["threads"]), metavar="N",
                   help=f"vCPU threads, 1..{MAX_THREADS} (default {d['threads']})")
    p.add_argument("--workload", choices=list(WORKLOADS), default=default(d["workload"]),
                   help=f"what each step writes (default {d['workload']})")
    p.add_argument("--seed", type=seed_arg, default=default(d["seed"]), metavar="S", help=f"RNG seed (default {d['seed']})")
    p.add_argument("--steps", type=positive_int_arg, default=default(steps), metavar="K",
                   help=f"steps per vCPU (default {steps})" if steps is not None else
                   "steps per vCPU (default none: the guest runs until quit or SIGTERM)")
    p.add_argument("--rate", type=nonneg_float_arg, default=default(rate), metavar="STEPS_PER_S",
                   help=f"step rate limit per vCPU, 0 = unlimited (idle: 0 means 1000/s); timing only, the "
                        f"final hash does not depend on it (default {rate:g})")
    p.add_argument("--working-set", type=float, default=default(d["working_set"]), metavar="FRACTION",
                   help=f"fraction (0, 1] of each vCPU's slice that is written (default {d['working_set']:g})")
    p.add_argument("--free-fraction", type=float, default=default(d["free_fraction"]), metavar="FRACTION",
                   help="fraction [0, 1) of each working set that is free at any time; the free set "
                        "moves (a page taken back is zero-filled first), the hash counts free pages as "
                        f"zero, and the control command free_ranges lists them (default {d['free_fraction']:g})")
    p.add_argument("--backing", choices=BACKINGS, default=d["backing"], help=f"RAM backing (default {d['backing']})")
    p.add_argument("--vm", choices=("process", "kvm"), default=d["vm"],
                   help="who runs the workload: threads of this process, or the vCPUs of a KVM micro-VM over "
                        f"the same RAM (needs /dev/kvm; same RAM and hash after K steps; default {d['vm']})")


def params_from_args(args, ram: int):
    """The :class:`GuestParams` of parsed guest options (unset ones take the defaults)."""
    from postcopy.guest.control import GUEST_DEFAULTS, GuestParams

    def pick(name):
        value = getattr(args, name)
        return GUEST_DEFAULTS[name] if value is None else value

    return GuestParams(ram=ram, threads=pick("threads"), workload=pick("workload"), seed=pick("seed"),
                       steps=args.steps, rate=float(pick("rate")), working_set=float(pick("working_set")),
                       backing=args.backing, free_fraction=float(pick("free_fraction")), vm=args.vm)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "guest", help="run a guest process whose whole state lives in its RAM",
        description="Run a guest: vCPU threads step a deterministic workload in guest RAM. "
                    "With --steps, print 'final_hash <16 hex>' when every vCPU is done and exit 0. "
                    "With --incoming, map empty RAM registered with userfaultfd and wait for "
                    "'resume' on the control socket; threads, workload and steps come with the RAM.")
    p.add_argument("--ram", type=size_arg, required=True, metavar="SIZE",
                   help="guest RAM size, a page multiple (e.g. 64M)")
    add_guest_options(p, steps=None, rate=0.0, explicit_only=True)
    p.add_argument("--control", metavar="PATH", help="Unix socket for control commands (mode 0600; default none)")
    p.add_argument("--incoming", action="store_true",
                   help="map empty RAM under userfaultfd and wait for the migrated state")
    p.add_argument("--uffd-minor", action="store_true",
                   help="incoming, memfd backing: register RAM for missing AND minor faults, so the agent can "
                        "install pages by writing the memfd and UFFDIO_CONTINUE (needs UFFD_FEATURE_MINOR_SHMEM)")
    p.add_argument("--staging-pages", type=positive_int_arg, metavar="N",
                   help="incoming, anon backing: also map N pages of unregistered private anonymous staging "
                        "memory the agent fills and moves pages out of with UFFDIO_MOVE (needs UFFD_FEATURE_MOVE; "
                        "default none)")
    p.add_argument("--linger", action="store_true", help="when finished, keep serving the control socket until quit")
    p.add_argument("--start-paused", action="store_true", help="boot, then wait for resume")
    p.add_argument("--pause-at", type=positive_int_arg, metavar="K",
                   help="park every vCPU when it has done exactly K steps (resume continues; default none)")
    p.set_defaults(func=handler, _parser=p)


def _validate(args) -> str | None:
    from postcopy.guest.params import incoming_options_error, layout_error

    error = incoming_options_error(args.backing, incoming=args.incoming, uffd_minor=args.uffd_minor,
                                   staging_pages=args.staging_pages or 0)
    if error:
        return error
    if args.incoming:
        given = [f"--{name.replace('_', '-')}" for name in
                 ("threads", "workload", "seed", "steps", "rate", "working_set", "free_fraction", "pause_at")
                 if getattr(args, name) is not None]
        if given:
            return f"--incoming takes {', '.join(given)} from the migrated state page: leave them out"
        if args.start_paused:
            return "--incoming already waits for resume: leave out --start-paused"
    if args.vm == "kvm":
        from postcopy.guest.kvm import kvm_reason

        if args.free_fraction:
            return "--vm kvm: the KVM guest has no free pages: leave out --free-fraction"
        reason = kvm_reason()
        if reason:
            return f"--vm kvm: {reason}"
    if (args.incoming or args.start_paused or args.linger) and not args.control:
        return "--incoming, --start-paused and --linger need --control (nothing else could resume or quit)"
    if args.start_paused and args.pause_at is not None:
        return "--start-paused and --pause-at do not mix: use the run_until control command"
    if args.steps is not None and args.pause_at is not None and args.pause_at >= args.steps:
        return f"--pause-at {args.pause_at} must be below --steps {args.steps}"
    too_big = ram_fit_error(args.ram)
    if too_big:
        return f"--ram: {too_big}"
    params = params_from_args(args, args.ram)
    return layout_error(args.ram, params.threads, params.workload, params.working_set, params.free_fraction)


def handler(args) -> int:
    from postcopy.guest.control import ControlServer
    from postcopy.guest.runtime import BootParams, Guest

    error = _validate(args)
    if error:
        args._parser.error(error)  # exit 2
    try:
        if args.vm == "kvm":
            from postcopy.guest.kvm import KvmGuest as Guest
        guest = Guest(args.ram, args.backing, incoming=args.incoming, uffd_minor=args.uffd_minor,
                      staging_pages=args.staging_pages or 0)
    except ImportError as exc:
        print(f"guest: --incoming needs postcopy.kernel.uffd: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"guest: {exc}", file=sys.stderr)
        return 1
    server = None
    try:
        if args.control:
            try:
                server = ControlServer(args.control, guest, on_quit=guest.request_quit)
            except OSError as exc:
                print(f"guest: control socket {args.control}: {exc}", file=sys.stderr)
                return 1
        if not args.incoming:
            params = params_from_args(args, args.ram)
            try:
                guest.boot(BootParams(threads=params.threads, workload=params.workload, seed=params.seed,
                                      steps=params.steps, rate=params.rate, working_set=params.working_set,
                                      free_fraction=params.free_fraction))
            except (ValueError, RuntimeError) as exc:  # the KVM guest: its VM could not be made
                print(f"guest: {exc}", file=sys.stderr)
                return 1
        if server:
            server.start()
        if not args.incoming and not args.start_paused:
            guest.resume(stop_at=args.pause_at)
        outcome = guest.wait()
        if outcome == "finished":
            print(f"final_hash {guest.ram_hash()}", flush=True)
            if args.incoming:  # the migrated guest's own view, for an agent that reads it late
                print(f"max_step_gap_ns {guest.take_max_step_gap()['max_gap_ns']}", flush=True)
            if args.linger:
                outcome = guest.wait(finished_ok=False)
        if outcome == "fatal":
            print(f"guest: {guest.fatal}", file=sys.stderr)
            return 1
        return 0
    finally:
        if server:
            server.close()
