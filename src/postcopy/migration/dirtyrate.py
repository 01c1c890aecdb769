"""``postcopy dirty-rate``: measure how fast a running guest dirties its RAM with the
dirty log, without migrating it (QEMU's ``calc-dirty-rate``), and predict whether
precopy can converge at a given bandwidth. Precopy makes the same prediction from its
own rounds (:func:`predict`)."""
from __future__ import annotations

import argparse
import json
import sys
import time

from postcopy import ranges
from postcopy.units import format_bytes, rate_arg
from postcopy.kernel.dirtylog import KINDS as DIRTY_LOG_KINDS


def predict(dirty_bytes_per_s: float, bandwidth_bytes_per_s: float, downtime_limit_ms: float) -> dict:
    """Whether precopy converges: each round resends what the guest dirtied while the
    round before it was sent, so the dirty set shrinks only while the dirty rate stays
    under the bandwidth, and it ends once a round fits the downtime limit. Below the
    bandwidth it always gets there; above it only a throttle of at least
    ``1 - bandwidth / dirty rate`` makes it (auto-converge or a dirty limit)."""
    if bandwidth_bytes_per_s <= 0:
        return {"converges": None, "reason": "bandwidth unknown"}
    ratio = dirty_bytes_per_s / bandwidth_bytes_per_s
    if ratio < 1.0:
        return {"converges": True, "dirty_to_bandwidth": ratio, "throttle_needed_pct": 0,
                "reason": f"the guest dirties {ratio:.0%} of the bandwidth: rounds shrink until the rest fits "
                          f"{downtime_limit_ms:g} ms"}
    need = min(99, int((1.0 - 1.0 / ratio) * 100) + 1)
    return {"converges": False, "dirty_to_bandwidth": ratio, "throttle_needed_pct": need,
            "reason": f"the guest dirties {ratio:.1f}x the bandwidth: precopy cannot converge without "
                      f"throttling its vCPUs by at least {need}% (--auto-converge or --dirty-limit)"}


def measure(guest_control: str, seconds: float, kind: str = "auto", samples: int = 10) -> dict:
    """Harvest the guest's dirty log ``samples`` times over ``seconds``; the guest keeps
    running and is not migrated. Returns pages/s per sample and over the window."""
    from postcopy.guest.control import GuestClient
    from postcopy.kernel.dirtylog import open_dirty_log

    with GuestClient(guest_control) as guest:
        status = guest.status()
        log = open_dirty_log(kind, guest, status)
        page_size = int(status["page_size"])
        log.start()
        try:
            log.harvest()  # from here on, each harvest is one period's writes
            steps0, t0 = _steps(guest), time.monotonic()
            window: ranges.Runs = []
            per_sample = []
            last = t0
            for i in range(samples):
                time.sleep(max(0.0, t0 + seconds * (i + 1) / samples - time.monotonic()))
                dirty = log.harvest()
                now = time.monotonic()
                per_sample.append(ranges.total(dirty) / (now - last))
                window = ranges.normalize(window + dirty)
                last = now
            steps1 = _steps(guest)
        finally:
            log.stop()
    elapsed = last - t0
    rate = sum(per_sample) / len(per_sample)
    return {"dirty_log": log.name, "seconds": elapsed, "page_size": page_size, "samples": len(per_sample),
            "dirty_pages_per_s": rate, "dirty_bytes_per_s": rate * page_size,
            "dirty_pages_per_s_max": max(per_sample), "distinct_pages": ranges.total(window),
            "threads": status.get("threads"), "steps_per_s": (steps1 - steps0) / elapsed if elapsed else 0.0}


def _steps(guest) -> int:
    """Steps of all vCPUs so far."""
    steps = guest.status().get("steps", 0)
    return sum(steps) if isinstance(steps, list) else int(steps)


def register(subparsers) -> None:
    p = subparsers.add_parser("dirty-rate", help="measure a running guest's dirty rate without migrating it",
                              description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--guest", required=True, metavar="CONTROL", help="the guest's control socket")
    p.add_argument("--seconds", type=float, default=1.0, help="how long to measure")
    p.add_argument("--samples", type=int, default=10, help="harvests over that time")
    p.add_argument("--dirty-log", choices=DIRTY_LOG_KINDS, default="auto")
    p.add_argument("--bandwidth", type=rate_arg, default=None,
                   help="predict convergence at this link rate (e.g. 1gbit, 100MB)")
    p.add_argument("--downtime-limit", type=float, default=300.0, metavar="MS")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from postcopy.guest.control import GuestError
    from postcopy.kernel.dirtylog import DirtyLogUnavailable

    if not args.seconds > 0 or args.samples < 1:
        print("postcopy dirty-rate: --seconds must be > 0 and --samples >= 1", file=sys.stderr)
        return 2
    try:
        result = measure(args.guest, args.seconds, args.dirty_log, args.samples)
    except (GuestError, DirtyLogUnavailable, OSError) as exc:
        print(f"postcopy dirty-rate: {exc}", file=sys.stderr)
        return 1
    if args.bandwidth:
        result["prediction"] = predict(result["dirty_bytes_per_s"], args.bandwidth / 8, args.downtime_limit)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"dirty rate: {result['dirty_pages_per_s']:,.0f} pages/s ({format_bytes(result['dirty_bytes_per_s'])}/s), "
          f"peak {result['dirty_pages_per_s_max']:,.0f} pages/s, {result['distinct_pages']:,} distinct pages in "
          f"{result['seconds']:.2f} s ({result['dirty_log']}); guest {result['steps_per_s']:,.0f} steps/s")
    if "prediction" in result:
        print(result["prediction"]["reason"])
    return 0
