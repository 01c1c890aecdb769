"""Live progress (events, the terminal line, the status socket) and the dirty-rate
estimate. The end-to-end parts of issue 13 are in tests/test_convergence.py."""
from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest

from conftest import require_uffd
from postcopy.guest import GuestParams
from postcopy.migration.dirtyrate import predict
from postcopy.migration.progress import Progress, format_line, legal_order, terminal_or_none
from postcopy.migration.status import StatusServer, query


def test_event_order_table():
    assert legal_order(["setup", "precopy", "precopy", "switchover", "postcopy", "recovery", "postcopy", "done"])
    assert legal_order(["setup", "switchover", "done"])
    assert legal_order(["setup", "precopy", "failed"])
    assert not legal_order(["precopy"])  # setup first
    assert not legal_order(["setup", "postcopy"])  # no postcopy before the switchover
    assert not legal_order(["setup", "switchover", "done", "postcopy"])  # nothing after done


def test_events_file_is_json_lines_in_a_legal_order():
    events = io.StringIO()
    progress = Progress(ram_bytes=1 << 20, events=events)
    progress.event("setup")
    progress.event("precopy", round=0, bytes_sent=4096)
    progress.update(bytes_sent=8192, throughput_bytes_s=1e6)
    progress.event("precopy", round=1, dirty_rate_pages_s=10.0)
    progress.event("switchover")
    progress.event("done")
    lines = [json.loads(line) for line in events.getvalue().splitlines()]
    assert [line["event"] for line in lines] == ["setup", "precopy", "precopy", "switchover", "done"]
    assert legal_order([line["event"] for line in lines])
    assert lines[2]["bytes_sent"] == 8192 and lines[2]["round"] == 1
    assert lines[1]["setup_ms"] is not None
    with pytest.raises(ValueError, match="cannot follow"):
        progress.event("postcopy")


def test_progress_line_only_on_a_terminal():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    assert terminal_or_none(io.StringIO()) is None  # off a terminal: nothing unless asked
    assert terminal_or_none(io.StringIO(), force=True) is not None
    tty = Tty()
    progress = Progress(ram_bytes=100 << 20, terminal=terminal_or_none(tty))
    progress.event("setup")
    progress.event("precopy", round=2, bytes_sent=50 << 20, throughput_bytes_s=2e8, expected_downtime_ms=12.0)
    out = tty.getvalue()
    assert out.startswith("\r\x1b[K") and "round 2" in out and "50.0% of RAM sent" in out
    assert "expected downtime 12 ms" in format_line(progress.status())


def test_status_socket_answers_the_live_figures(tmp_path):
    progress = Progress(ram_bytes=1 << 20)
    progress.event("setup")
    path = str(tmp_path / "status.sock")
    with StatusServer(path, progress.status):
        progress.event("precopy", round=3)
        assert query(path)["phase"] == "precopy"
        assert query(path)["round"] == 3
        out = subprocess.run([sys.executable, "-m", "postcopy", "status", "--source", path, "--json"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and json.loads(out.stdout)["round"] == 3
    out = subprocess.run([sys.executable, "-m", "postcopy", "status", "--source", path],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "cannot query" in out.stderr


def test_prediction():
    assert predict(50e6, 100e6, 300)["converges"] is True
    slow = predict(300e6, 100e6, 300)
    assert slow["converges"] is False and slow["throttle_needed_pct"] == 67
    assert predict(1, 0, 300)["converges"] is None


def test_dirty_rate_measures_a_running_guest_without_migrating_it(launch):
    require_uffd()
    from postcopy.kernel.dirtylog import available_backends

    if all(reason is not None for reason in available_backends().values()):
        pytest.skip("needs a dirty log (PAGEMAP_SCAN with UFFD_FEATURE_WP_ASYNC, or CONFIG_MEM_SOFT_DIRTY)")
    ram, ws = 16 << 20, 0.25
    proc, sock = launch(GuestParams(ram=ram, threads=1, workload="random-write", seed=3, steps=None,
                                    rate=20000, working_set=ws, backing="anon"))
    out = subprocess.run([sys.executable, "-m", "postcopy", "dirty-rate", "--guest", sock, "--seconds", "0.5",
                          "--bandwidth", "1gbit", "--json"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["dirty_pages_per_s"] > 0 and result["distinct_pages"] > 0
    # Only the working set (and the state page) can be dirty.
    assert result["distinct_pages"] <= ws * ram // 4096 + 1
    assert result["prediction"]["converges"] in (True, False)
    assert proc.poll() is None  # still running, not migrated


def test_rate_limiter_holds_back_past_the_burst():
    from postcopy.migration.ratelimit import RateLimiter

    unlimited = RateLimiter(0)
    unlimited.consume(1 << 30)
    assert unlimited.waited_s == 0
    limiter = RateLimiter(1e9, burst=1 << 20)
    limiter.consume(1 << 20)  # the burst passes at once
    assert limiter.waited_s == 0
    limiter.consume(10 << 20)  # 10 MiB more at 1 GB/s: about 10 ms held back
    assert 0.005 < limiter.waited_s < 0.02
    with pytest.raises(ValueError):
        RateLimiter(-1)
