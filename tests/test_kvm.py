"""The KVM guest (``postcopy guest --vm kvm``) and KVM's three dirty logs.

The KVM guest runs the workloads inside a micro-VM on the process guest's RAM layout,
so after K steps its RAM hash equals the process guest's. Each KVM dirty log must
report exactly the pages the guest wrote: the guest's page tables live in a memslot of
their own that is never logged, so no nested-paging extras are allowed. Needs /dev/kvm
(and, per backend, the capability): skips name what is missing."""
from __future__ import annotations

import dataclasses
import filecmp
import mmap
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from postcopy.guest import GuestClient, GuestError, GuestParams, parse_final_hash
from postcopy.kernel.dirtylog import DirtyLogUnavailable, open_dirty_log

ROOT = Path(__file__).resolve().parents[1]
RAM = 8 << 20
PAGE = mmap.PAGESIZE
KVM = GuestParams(ram=RAM, threads=2, workload="random-write", seed=5, steps=None, vm="kvm")
LOGS = ["kvm-bitmap", "kvm-clear", "kvm-ring"]


def require_kvm() -> None:
    from postcopy.guest.kvm import kvm_reason

    reason = kvm_reason()
    if reason:
        pytest.skip(f"needs /dev/kvm: {reason}")


def require_log(name: str) -> None:
    require_kvm()
    from postcopy.kernel.dirtylog.kvm import kvm_backend_reasons

    reason = kvm_backend_reasons()[name]
    if reason:
        pytest.skip(reason)  # names the capability (KVM_CAP_DIRTY_LOG_RING, ...)


def pages_of(runs) -> set[int]:
    return {p for first, count in runs for p in range(first, first + count)}


def run_to_end(params: GuestParams) -> str:
    proc = subprocess.run(params.argv(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return parse_final_hash(proc.stdout)


def test_guest_code_header_is_built_from_its_source(tmp_path):
    """native/kvm_guest_code.h is what scripts/gen-kvm-guest makes of guest.c."""
    header = ROOT / "native" / "kvm_guest_code.h"
    if not (ROOT / "scripts" / "gen-kvm-guest").exists():
        pytest.skip("needs the source tree (scripts/gen-kvm-guest)")
    if not all(shutil.which(tool) for tool in ("gcc", "objcopy", "objdump")):
        pytest.skip("needs gcc and binutils (objcopy, objdump) to rebuild the guest code")
    gcc = subprocess.run(["gcc", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    if gcc not in header.read_text():
        pytest.skip(f"the header was made by another compiler than {gcc!r}: bytes may differ")
    out = tmp_path / "code.h"
    subprocess.run([str(ROOT / "scripts" / "gen-kvm-guest"), str(out)], check=True, capture_output=True)
    assert filecmp.cmp(out, header, shallow=False), "native/kvm_guest_code.h is stale: run scripts/gen-kvm-guest"


@pytest.mark.parametrize("workload", ["random-write", "sequential", "hotspot", "idle"])
def test_kvm_guest_ends_with_the_process_guests_ram(workload):
    require_kvm()
    params = dataclasses.replace(KVM, workload=workload, steps=1500, backing="anon")
    kvm_hash = run_to_end(params)
    assert kvm_hash == run_to_end(dataclasses.replace(params, vm="process"))
    assert kvm_hash == run_to_end(params)  # and again: deterministic


def test_kvm_guest_refuses_what_it_cannot_run():
    require_kvm()
    argv = [sys.executable, "-m", "postcopy", "guest", "--vm", "kvm", "--ram", "8M", "--free-fraction", "0.2"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "no free pages" in proc.stderr


def test_control_socket_pauses_at_a_step_boundary(launch):
    require_kvm()
    _, sock = launch(dataclasses.replace(KVM, steps=4000), start_paused=True)
    with GuestClient(sock) as guest:
        status = guest.status()
        assert status["vm"] == "kvm" and status["state"] == "paused"
        reply = guest.run_until(700)
        assert reply["steps"] == [700, 700] and reply["state"] == "paused"
        first = guest.hash()
        guest.resume()
        paused = guest.pause()
        assert paused["state"] == "paused" and min(paused["steps"]) >= 700
        guest.quit()
    # The hash at step 700 is the process guest's at step 700.
    _, sock2 = launch(dataclasses.replace(KVM, steps=4000, vm="process"), name="p", start_paused=True)
    with GuestClient(sock2) as proc_guest:
        proc_guest.run_until(700)
        assert proc_guest.hash() == first
        proc_guest.quit()


@pytest.mark.parametrize("name", LOGS)
def test_log_reports_exactly_the_pages_the_guest_wrote(launch, name):
    require_log(name)
    _, sock = launch(KVM, start_paused=True)
    with GuestClient(sock) as guest:
        log = open_dirty_log(name, guest, guest.status())
        assert log.name == name
        with log:
            log.start()
            assert log.harvest() == []  # nothing written since the start
            written = [3, 4, 5, 100, 1000, 2047]
            guest.touch(written)
            assert pages_of(log.harvest()) == set(written)
            assert log.harvest() == []  # the harvest cleared them
            guest.touch_spread(0, 2048, 300, seed=9)
            assert len(pages_of(log.harvest())) == 300
        guest.quit()


def test_full_dirty_ring_is_collected_not_lost(launch):
    """More distinct pages than a vCPU's ring holds (RING_ENTRIES) between two harvests:
    the vCPU exits with KVM_EXIT_DIRTY_RING_FULL, collects its ring and goes on."""
    require_log("kvm-ring")
    from postcopy.guest.kvm import RING_ENTRIES

    ram = 128 << 20
    n = RING_ENTRIES + RING_ENTRIES // 4
    assert n < ram // PAGE
    _, sock = launch(dataclasses.replace(KVM, ram=ram), start_paused=True)
    with GuestClient(sock) as guest:
        with open_dirty_log("kvm-ring", guest, guest.status()) as log:
            log.start()
            guest.touch_spread(0, ram // PAGE, n, seed=3)
            assert sum(count for _, count in log.harvest()) == n
        guest.quit()


@pytest.mark.parametrize("name, workload, ram, steps", [
    *[(name, "random-write", RAM, (300, 1200)) for name in LOGS],
    # each step a new page: more distinct pages than a vCPU's ring holds between harvests
    ("kvm-ring", "sequential", 128 << 20, (20000,)),
])
def test_log_of_a_stepping_guest_is_what_changed(launch, name, workload, ram, steps):
    """Steps between two harvests: the report is exactly the pages whose content changed
    (every workload write changes its word), the state page among them."""
    require_log(name)
    params = dataclasses.replace(KVM, workload=workload, ram=ram, threads=1)
    _, sock = launch(params, start_paused=True)  # memfd RAM: read here without a write
    with GuestClient(sock) as guest:
        _, fds = guest.take_fds()
        try:
            mem = mmap.mmap(fds["memfd"], ram, mmap.MAP_SHARED, mmap.PROT_READ)
        finally:
            for fd in fds.values():
                os.close(fd)
        log = open_dirty_log(name, guest, guest.status())
        with log:
            log.start()
            for target in steps:
                before = mem[:]
                guest.run_until(target)
                changed = changed_pages(before, mem[:])
                assert 0 in changed and len(changed) > 100
                assert pages_of(log.harvest()) == changed
        mem.close()
        guest.quit()


def changed_pages(a: bytes, b: bytes) -> set[int]:
    return {p for p in range(len(a) // PAGE) if a[p * PAGE:(p + 1) * PAGE] != b[p * PAGE:(p + 1) * PAGE]}


@pytest.mark.parametrize("name", LOGS)
def test_kvm_log_refuses_a_process_guest(launch, name):
    require_log(name)
    _, sock = launch(dataclasses.replace(KVM, vm="process"), start_paused=True)
    with GuestClient(sock) as guest:
        with pytest.raises(DirtyLogUnavailable, match="--vm kvm"):
            open_dirty_log(name, guest, guest.status())
        guest.quit()


def test_doctor_tries_each_kvm_log():
    require_kvm()
    from postcopy.kernel.dirtylog.kvm import kvm_backend_reasons
    from postcopy.kernel.probes import probe_kvm_dirty_logs

    probes = {p.name: p for p in probe_kvm_dirty_logs()}
    assert set(probes) == {"kvm_dirty_bitmap", "kvm_dirty_clear", "kvm_dirty_ring"}
    for name, reason in kvm_backend_reasons().items():
        probe = probes[f"kvm_dirty_{name[4:]}"]
        assert probe.ok == (reason is None)
        assert ("reported exactly" in probe.detail) if probe.ok else ("KVM" in probe.detail)


def test_unknown_kvm_dirty_request_is_refused(launch):
    require_kvm()
    _, sock = launch(KVM, start_paused=True)
    with GuestClient(sock) as guest:
        with pytest.raises(GuestError, match="op start"):
            guest.request("kvm_dirty", op="bogus")
        with pytest.raises(GuestError, match="needs a started"):
            guest.request("kvm_dirty", op="harvest")
        with pytest.raises(GuestError, match="log one of"):
            guest.request("kvm_dirty", op="start", log="soft-dirty")
        guest.quit()


def test_kvm_vcpus_are_the_persistent_threads_even_across_a_ring_rebuild(launch):
    """The KVM vCPUs run on the guest's parked vCPU threads: the same threads after
    resumes and after the dirty-ring rebuild (the VM is remade under them), and the
    guest steps on to the process guest's RAM; throttle and rate_cap are refused."""
    require_kvm()
    params = dataclasses.replace(KVM, steps=3000)
    proc, sock = launch(params, start_paused=True, linger=True)
    with GuestClient(sock) as guest:
        tids = guest.status()["vcpu_thread_ids"]
        guest.run(500)
        guest.resume()
        try:
            guest.request("kvm_dirty", op="start", log="kvm-ring")  # mid-run, or after the end
        except GuestError as exc:
            assert "ring" in str(exc).lower() or "KVM" in str(exc)  # no dirty ring on this host
        if guest.pause()["state"] == "paused":
            assert guest.run_until(3000)["state"] == "finished"
        assert guest.status()["vcpu_thread_ids"] == tids
        with pytest.raises(GuestError, match="KVM guest has no run-time throttle"):
            guest.request("throttle", percent=50)
        with pytest.raises(GuestError, match="KVM guest has no run-time throttle"):
            guest.request("rate_cap", steps_per_s=100)
        assert guest.request("throttle", percent=0)["throttle_pct"] == 0
        guest.quit()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    process = dataclasses.replace(params, vm="process")
    from postcopy.guest import reference_hash

    assert parse_final_hash(out) == reference_hash(process)


# ---- migrations of a KVM guest --------------------------------------------------------


def migrate_kvm(mode: str, dirty_log: str, install: str = "copy", **params) -> dict:
    from conftest import require_netns, require_uffd
    from postcopy.testbed.demo import DemoOptions, run_demo

    require_netns()
    require_uffd()
    fields = dict(ram=16 << 20, threads=2, workload="random-write", seed=5, steps=20_000, working_set=0.25, vm="kvm")
    fields.update(params)
    # park_at: on a busy host the guest parks just before its end instead of finishing
    # before the switchover (it still runs, and dirties pages, during the rounds).
    return run_demo(DemoOptions(params=GuestParams(**fields), mode=mode, migrate_after=0.5, downtime_limit_ms=20,
                                park_at=fields["steps"] - 500,
                                max_rounds=8, dirty_log=dirty_log, install=install,
                                **({"push_delay": 1.0} if mode == "postcopy" else {})))


@pytest.mark.parametrize("name", LOGS)
@pytest.mark.parametrize("mode", ["precopy", "hybrid"])
def test_precopy_and_hybrid_of_a_kvm_guest_verify(mode, name):
    require_log(name)
    report = migrate_kvm(mode, name)
    assert report["verified"], report
    assert report["dirty_log"] == name and len(report["precopy_rounds"]) >= 2
    assert report["pages"]["resent"] > 0  # rounds re-sent what the VM dirtied
    if mode == "precopy":
        assert report["pages"]["demand"] == 0 and report["pages"]["pushed"] == 0


@pytest.mark.parametrize("backing, install", [("memfd", "copy"), ("anon", "copy"), ("memfd", "continue"), ("anon", "move")])
def test_postcopy_of_a_kvm_guest_serves_kvms_own_faults(backing, install):
    """Nothing is sent before the switchover and the pusher waits a second: the VM's
    first steps on the destination fault in KVM (its guest RAM registered with
    userfaultfd), and those faults are served on demand like any other, by UFFDIO_COPY
    or UFFDIO_CONTINUE (memfd, minor faults) or UFFDIO_MOVE (anon, from staging)."""
    require_kvm()
    if install != "copy":
        from postcopy.migration.install import install_path_error

        error = install_path_error(install, backing)
        if error:
            pytest.skip(error)  # names the missing userfaultfd feature
    report = migrate_kvm("postcopy", "auto", backing=backing, install=install)
    assert report["verified"], report
    assert report["install"] == install
    assert report["pages"]["demand"] > 0 and report["pages"]["precopy"] == 0


# ---- the bench experiment -------------------------------------------------------------


def test_kvm_bench_tables_smoke():
    require_kvm()
    from postcopy.bench.kvm import format_kvm, harvest_rows, rate_rows, usable_logs

    logs = usable_logs()
    if not logs:
        pytest.skip("no KVM dirty log on this host (see postcopy doctor)")
    rows = harvest_rows(16 << 20, logs, (0, 100), repeats=1, say=lambda _m: None)
    assert {r["method"] for r in rows} == set(logs) and len(rows) == 2 * len(logs)
    for r in rows:  # exactly the pages the service vCPU wrote, plus the state page the idle steps write
        assert r["dirty_pages"] <= r["reported_pages"] <= r["dirty_pages"] + 1, r
        assert (r["kernel_ms"] is None) == (r["method"] in ("pagemap-scan", "soft-dirty"))
    rates = rate_rows(16 << 20, logs[:1], seconds=0.3, say=lambda _m: None)
    assert [(r["vm"], r["dirty_log"]) for r in rates] == [("process", "none"), ("kvm", "none"), ("kvm", logs[0])]
    assert all(r["steps_per_s"] > 0 for r in rates) and rates[2]["harvests_per_s"] > 0
    text = format_kvm({"harvest": rows, "rates": rates})
    assert all(name in text for name in logs) and "steps/s" in text


def test_a_failing_log_is_a_failed_row_and_the_logs_after_it_are_still_measured():
    require_kvm()
    from postcopy.bench.kvm import format_kvm, harvest_rows, usable_logs

    logs = usable_logs()
    if not logs:
        pytest.skip("no KVM dirty log on this host (see postcopy doctor)")
    said: list[str] = []
    rows = harvest_rows(16 << 20, ["no-such-log", logs[0]], (0,), repeats=1, say=said.append)
    assert rows[0]["method"] == "no-such-log" and "no-such-log" in rows[0]["error"], rows
    assert rows[1]["method"] == logs[0] and "error" not in rows[1] and rows[1]["reported_pages"] <= 1, rows
    assert any("no-such-log" in m and "FAILED" in m for m in said), said
    text = format_kvm({"harvest": rows, "rates": []})
    assert "no-such-log" in text and "FAILED" in text


def test_kvm_bench_covers_every_log_of_the_kernel_and_names_the_missing_ones():
    """Every log a KVM guest's RAM can be harvested with is either measured or named
    with its reason (here soft-dirty: CONFIG_MEM_SOFT_DIRTY is off)."""
    from postcopy.bench.kvm import LOGS, _reasons, format_kvm, usable_logs

    reasons = _reasons()
    assert set(reasons) == set(LOGS) >= {"kvm-bitmap", "kvm-clear", "kvm-ring", "pagemap-scan", "soft-dirty"}
    assert usable_logs() == [name for name in LOGS if reasons[name] is None]
    missing = {name: why for name, why in reasons.items() if why is not None}
    assert all(isinstance(why, str) and why for why in missing.values()), missing
    text = format_kvm({"harvest": [], "rates": [], "unavailable": missing})
    assert all(f"{name}: unavailable: {why}" in text for name, why in missing.items())


@pytest.mark.parametrize("name", LOGS)
def test_checkpointing_a_kvm_guest_fails_over_verified(name):
    """The checkpoint rate row of each KVM log: a KVM guest checkpointed epoch by epoch
    with that log, killed, failed over on the standby, and both the failed-over guest's
    final hash and the standby image's hash equal the references."""
    from conftest import require_netns

    require_log(name)
    require_netns()
    from postcopy.bench.kvm import checkpoint_rows, format_kvm

    rows = checkpoint_rows([name], bounds=(64,), seconds=0.5, port=7106, say=lambda _m: None)
    assert [(r["dirty_log"], r["bound"]) for r in rows] == [(name, 64)]
    row = rows[0]
    assert row["verified"], row
    assert row["checkpoints_per_s"] > 0 and row["steps_per_epoch"] > 0 and row["agent_us"] > 0
    assert name in format_kvm({"harvest": [], "rates": [], "checkpoint": rows})
