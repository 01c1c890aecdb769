"""KVM's dirty logs side by side with PAGEMAP_SCAN, on one KVM guest (``--vm kvm``).

Two tables, every figure measured in the same run:

* **harvest**: for each RAM size a KVM guest idles at IDLE_RATE steps/s (one vCPU; each
  step writes only its state page) and for each dirty count N: harvest (clear), the
  VM's service vCPU writes exactly N distinct pages, harvest again. Per backend
  (``kvm-bitmap``, ``kvm-clear``, ``kvm-ring`` and ``pagemap-scan`` on the same guest's
  RAM): ``harvest_ms`` is the harvest seen by the agent (control-socket round trip
  included), ``kernel_ms`` the time inside the ioctls (KVM backends), ``worst_gap_ms``
  the vCPU's longest stall between two passes while harvests ran beside
  ``idle_gap_ms`` (the same guest without harvests: pass length plus scheduling noise).
* **rates**: the guest's own step rate (random-write, unpaced) with no log, then with
  each log armed and harvested back to back: ``harvests_per_s`` is the checkpoint rate
  each backend sustains, ``steps_per_s`` what the guest keeps meanwhile. The process
  guest's step rate on the same RAM is the baseline that tells emulation cost (this
  host runs small KVM guests through KVM's instruction emulator) from logging cost.
"""
from __future__ import annotations

import os
import statistics
import subprocess
import tempfile
import time
from typing import Callable

from postcopy.bench.harvest import _BenchGuest  # its close() and context manager

MiB = 1 << 20
IDLE_RATE = 1000  # steps/s: one pass per millisecond or so
# Every log a KVM guest's RAM can be harvested with; each kernel offers a subset (this
# host: no soft-dirty; Debian's 6.12 inside scripts/kernel-matrix: all five).
LOGS = ("kvm-bitmap", "kvm-clear", "kvm-ring", "pagemap-scan", "soft-dirty")
DIRTY = (0, 100, 10_000)


def kvm_figures(quick: bool, progress: Callable[[str], None] | None = None, *, port: int = 7026) -> dict:
    """The three tables for this host (sizes 64 MiB, and 256 MiB unless quick);
    ``port`` is where the checkpoint runs' standby listens."""
    from postcopy.guest.kvm import kvm_reason

    reason = kvm_reason()
    if reason:
        return {"skipped": reason}
    say = progress or (lambda _msg: None)
    sizes = (64 * MiB,) if quick else (64 * MiB, 256 * MiB)
    logs = usable_logs()
    rows: list[dict] = []
    for size in sizes:
        rows.extend(harvest_rows(size, logs, DIRTY, repeats=3 if quick else 5, say=say))
    rates = rate_rows(64 * MiB, logs, seconds=1.0 if quick else 3.0, say=say)
    checkpoints = checkpoint_rows(logs, bounds=(64,) if quick else (64, 1024), seconds=1.0 if quick else 2.0,
                                  port=port, say=say)
    failed = sum("error" in r for r in (*rows, *rates, *checkpoints))
    return {"harvest": rows, "rates": rates, "checkpoint": checkpoints, "failed_rows": failed,
            "unavailable": {n: r for n, r in _reasons().items() if r}}


def _reasons() -> dict[str, str | None]:
    from postcopy.kernel.dirtylog import available_backends
    from postcopy.kernel.dirtylog.kvm import kvm_backend_reasons

    process_logs = available_backends()
    return {**kvm_backend_reasons(), **{name: process_logs[name] for name in ("pagemap-scan", "soft-dirty")}}


def usable_logs() -> list[str]:
    reasons = _reasons()
    return [name for name in LOGS if reasons.get(name) is None]


class KvmBenchGuest(_BenchGuest):
    """A KVM guest with a control socket in a private folder; killed on close."""

    def __init__(self, size: int, *, workload: str, rate: float, threads: int = 1, vm: str = "kvm") -> None:
        from postcopy.guest import GuestClient, GuestParams, wait_for_control

        self.size = size
        self._dir = tempfile.mkdtemp(prefix="postcopy-kvmbench-")
        sock = os.path.join(self._dir, "guest.sock")
        params = GuestParams(ram=size, threads=threads, workload=workload, seed=1, steps=None, rate=rate, vm=vm)
        self.proc = subprocess.Popen(params.argv(control=sock), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True)
        try:
            wait_for_control(sock, proc=self.proc)
            self.client = GuestClient(sock, timeout=300)
            self.info = self.client.status()
            self.npages = size // self.info["page_size"]
        except BaseException:
            self.close()
            raise

    def steps(self) -> int:
        return sum(self.client.status()["steps"])


def _failed(what: str, exc: Exception, say: Callable[[str], None]) -> str:
    """A row that could not be measured: its reason, said at once and kept in the table."""
    reason = f"{type(exc).__name__}: {exc}"
    say(f"kvm bench: {what}: FAILED: {reason}")
    return reason


def harvest_rows(size: int, logs: list[str], dirty: tuple[int, ...], *, repeats: int,
                 say: Callable[[str], None]) -> list[dict]:
    """Every log on one guest; a log whose measurement fails (its guest may have died:
    nested KVM under emulation has triple-faulted here once) gets an error row, and the
    logs after it a fresh guest."""
    rows: list[dict] = []
    pending = list(logs)
    while pending:
        with KvmBenchGuest(size, workload="idle", rate=IDLE_RATE) as guest:
            guest.client.max_step_gap_ns()
            time.sleep(0.3)
            idle_gap_ms = guest.client.max_step_gap_ns() / 1e6
            while pending:
                name = pending.pop(0)
                try:
                    rows.extend(_harvest_one(guest, name, dirty, repeats, idle_gap_ms, say))
                except Exception as exc:  # recorded and reported; the other logs still count
                    rows.append({"method": name, "ram_bytes": size,
                                 "error": _failed(f"{name} {size // MiB} MiB", exc, say)})
                    break
    return rows


def _harvest_one(guest: KvmBenchGuest, name: str, dirty: tuple[int, ...], repeats: int, idle_gap_ms: float,
                 say: Callable[[str], None]) -> list[dict]:
    from postcopy.kernel.dirtylog import open_dirty_log

    rows = []
    log = open_dirty_log(name, guest.client, guest.info)
    log.start()
    try:
        for n in (d for d in dirty if d <= guest.npages):
            times, kernel, gaps, reported = [], [], [], 0
            for rep in range(repeats):
                log.harvest()
                if n:
                    guest.client.touch_spread(0, guest.npages, n, seed=rep + 1)
                guest.client.max_step_gap_ns()
                reported = sum(count for _, count in log.harvest())
                time.sleep(0.003)  # the pass after the harvest lands in the window
                gaps.append(guest.client.max_step_gap_ns() / 1e6)
                times.append(log.last_harvest_ms)
                kernel.append(getattr(log, "last_kernel_ms", None))
            rows.append({
                "method": name, "ram_bytes": guest.size, "dirty_pages": n, "reported_pages": reported,
                "harvest_ms": round(statistics.median(times), 4),
                "kernel_ms": round(statistics.median(kernel), 4) if kernel[0] is not None else None,
                "worst_gap_ms": round(max(gaps), 3), "idle_gap_ms": round(idle_gap_ms, 3),
                "repeats": repeats})
            say(f"kvm bench: {name} {guest.size // MiB} MiB, {n} dirty: {rows[-1]['harvest_ms']:.3f} ms")
    finally:
        log.stop()
    return rows


def rate_rows(size: int, logs: list[str], *, seconds: float, say: Callable[[str], None]) -> list[dict]:
    """Step rate of an unpaced random-write guest: process guest, KVM guest without a
    log, and with each log harvested back to back."""
    rows = []
    for vm, name in [("process", None), ("kvm", None), *[("kvm", n) for n in logs]]:
        try:
            rows.append(_rate_one(size, vm, name, seconds))
        except Exception as exc:  # recorded and reported; the other rows still count
            rows.append({"vm": vm, "dirty_log": name or "none",
                         "error": _failed(f"{vm} guest, log {name or 'none'}", exc, say)})
            continue
        say(f"kvm bench: {vm} guest, log {name or 'none'}: {rows[-1]['steps_per_s']} steps/s, "
            f"{rows[-1]['harvests_per_s']} harvests/s")
    return rows


def _rate_one(size: int, vm: str, name: str | None, seconds: float) -> dict:
    from postcopy.kernel.dirtylog import open_dirty_log

    with KvmBenchGuest(size, workload="random-write", rate=0, vm=vm) as guest:
        log = open_dirty_log(name, guest.client, guest.info) if name else None
        if log:
            log.start()
        try:
            time.sleep(0.2)  # past start-up (and the ring's VM rebuild)
            s0, t0, harvests, pages = guest.steps(), time.perf_counter(), 0, 0
            while time.perf_counter() - t0 < seconds:
                if log:
                    pages += sum(count for _, count in log.harvest())
                    harvests += 1
                else:
                    time.sleep(0.05)
            elapsed = time.perf_counter() - t0
            steps = guest.steps() - s0
        finally:
            if log:
                log.stop()
    return {"vm": vm, "dirty_log": name or "none", "steps_per_s": round(steps / elapsed),
            "harvests_per_s": round(harvests / elapsed, 1) if log else None,
            "pages_per_harvest": round(pages / harvests, 1) if harvests else None}


def checkpoint_rows(logs: list[str], *, bounds: tuple[int, ...], seconds: float, port: int,
                    say: Callable[[str], None]) -> list[dict]:
    """Continuous checkpointing of a 32 MiB KVM guest with each log (the checkpoint demo:
    primary -> standby over veth, then failover, verified). ``agent_us`` is the epoch's
    time outside the guest's run (harvest, collect, send, ack: means), and
    ``ceiling_per_s`` the rate those alone would allow: what the log and transport cost
    apart from this host's emulated guest steps (``run_us``)."""
    from postcopy.testbed.checkpoint_demo import run_checkpoint_demo

    rows = []
    for name in logs:
        try:
            result = run_checkpoint_demo(ram=32 * MiB, dirty_bounds=bounds, seconds=seconds, port=port, vm="kvm",
                                         dirty_log=name)
        except Exception as exc:  # recorded and reported; the other logs still count
            rows.append({"dirty_log": name, "error": _failed(f"checkpoint with {name}", exc, say)})
            continue
        for bound, b in result["bounds"].items():
            t = b["time_us"]
            agent_us = sum(t[k]["mean"] for k in ("harvest", "collect", "send", "ack") if k in t)
            rows.append({"dirty_log": b["dirty_log"], "bound": bound, "checkpoints_per_s": b["checkpoints_per_s"],
                         "steps_per_epoch": b["steps_per_epoch"], "run_us": round(t["run_until_rpc"]["mean"]),
                         "harvest_us": round(t["harvest"]["mean"]), "agent_us": round(agent_us),
                         "ceiling_per_s": round(1e6 / agent_us) if agent_us else None,
                         "verified": bool(b["verified"] and b["image_verified"])})
            say(f"kvm bench: checkpoint with {name}, bound {bound}: {b['checkpoints_per_s']} /s")
    return rows


def format_kvm(result: dict) -> str:
    """Both tables as aligned text."""
    if "skipped" in result:
        return f"KVM: skipped ({result['skipped']})"
    lines = ["KVM guest harvest cost (agent ms incl. control round trip; kernel ms inside the ioctls)",
             f"{'method':<13} {'RAM':>8} {'dirty':>6} {'reported':>8} {'harvest ms':>10} {'kernel ms':>9} "
             f"{'worst gap ms':>12} {'idle gap ms':>11}"]
    for r in result["harvest"]:
        if "error" in r:
            lines.append(f"{r['method']:<13} {r['ram_bytes'] // MiB:>4} MiB  FAILED: {r['error']}")
            continue
        kernel = "-" if r["kernel_ms"] is None else f"{r['kernel_ms']:.3f}"
        lines.append(f"{r['method']:<13} {r['ram_bytes'] // MiB:>4} MiB {r['dirty_pages']:>6} {r['reported_pages']:>8} "
                     f"{r['harvest_ms']:>10.3f} {kernel:>9} {r['worst_gap_ms']:>12.2f} {r['idle_gap_ms']:>11.2f}")
    lines += ["", "Step rate (random-write, 1 vCPU, unpaced) and back-to-back harvests",
              f"{'guest':<8} {'dirty log':<13} {'steps/s':>9} {'harvests/s':>10} {'pages/harvest':>13}"]
    for r in result["rates"]:
        if "error" in r:
            lines.append(f"{r['vm']:<8} {r['dirty_log']:<13} FAILED: {r['error']}")
            continue
        hps = "-" if r["harvests_per_s"] is None else f"{r['harvests_per_s']:.1f}"
        pph = "-" if r["pages_per_harvest"] is None else f"{r['pages_per_harvest']:.1f}"
        lines.append(f"{r['vm']:<8} {r['dirty_log']:<13} {r['steps_per_s']:>9} {hps:>10} {pph:>13}")
    lines += ["", "Continuous checkpointing of a 32 MiB KVM guest (means per epoch; ceiling = 1 s / agent time)",
              f"{'dirty log':<13} {'bound':>5} {'ckpt/s':>7} {'steps/epoch':>11} {'run µs':>7} {'harvest µs':>10} "
              f"{'agent µs':>8} {'ceiling/s':>9}  verified"]
    for r in result.get("checkpoint", []):
        if "error" in r:
            lines.append(f"{r['dirty_log']:<13} FAILED: {r['error']}")
            continue
        lines.append(f"{r['dirty_log']:<13} {r['bound']:>5} {r['checkpoints_per_s']:>7.0f} {r['steps_per_epoch']!s:>11} "
                     f"{r['run_us']:>7} {r['harvest_us']:>10} {r['agent_us']:>8} {r['ceiling_per_s']!s:>9}  "
                     f"{r['verified']}")
    for name, reason in result.get("unavailable", {}).items():
        lines.append(f"{name}: unavailable: {reason}")
    return "\n".join(lines)
