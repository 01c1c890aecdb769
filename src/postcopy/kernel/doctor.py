"""``postcopy doctor``: which kernel features this machine offers, and what a missing
one disables.  Every line comes from a probe that tried the feature
(:mod:`postcopy.kernel.probes`).  Exit status 0 even with features missing; 1 only when
userfaultfd itself is unusable (no postcopy at all)."""
from __future__ import annotations

import argparse
import json
import os
import sys

from postcopy.kernel.probes import Probe, all_probes


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "doctor", help="check the kernel features postcopy needs",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.set_defaults(func=handler)


def _summary(probes: dict[str, Probe]) -> list[str]:
    def ok(name: str) -> bool:
        return name in probes and probes[name].ok

    logs = [label for name, label in (("pagemap_scan", "pagemap-scan"), ("soft_dirty", "soft-dirty")) if ok(name)]
    return [
        "userfaultfd: " + ("usable (postcopy works)" if ok("uffd_api") else "UNUSABLE (no postcopy)"),
        "precopy dirty log: " + (", ".join(logs) if logs else "none (only pure postcopy works)"),
        "KVM guest dirty log: " + (", ".join(f"kvm-{n}" for n in ("ring", "clear", "bitmap") if ok(f"kvm_dirty_{n}"))
                                   or "none"),
        "network testbed: " + ("usable" if ok("netns") else "unavailable"),
    ]


def render_text(probes: list[Probe], kernel: str) -> str:
    width = max(len(p.name) for p in probes)
    lines = [f"postcopy doctor: Linux {kernel}"]
    for p in probes:
        lines.append(f"{'OK' if p.ok else 'NO'}  {p.name:<{width}}  {p.detail}")
        if not p.ok and p.disables:
            lines.append(f"    {'':<{width}}  -> {p.disables}")
    lines.append("")
    lines.extend(_summary({p.name: p for p in probes}))
    return "\n".join(lines)


def handler(args: argparse.Namespace) -> int:
    probes = all_probes()
    kernel = os.uname().release
    if args.json:
        json.dump({"probes": [p.to_dict() for p in probes], "kernel": kernel}, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(render_text(probes, kernel))
    usable = any(p.name == "uffd_api" and p.ok for p in probes)
    return 0 if usable else 1
