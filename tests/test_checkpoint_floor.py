"""The C floor of a checkpoint epoch (native/ckpt_floor.c, bench/ckptfloor.py): it does
the work it claims (every written page found by the harvest, the receiver's image equal
to the source after the epochs), with and without unacknowledged epochs in flight, and
the bench puts it beside the measured rate. Its speed is the bench's business."""
from __future__ import annotations

import errno

import pytest

from postcopy._native import ffi, lib
from postcopy.bench.ckptfloor import FloorUnavailable, attach_floors, checkpoint_floor
from postcopy.bench.ratios import baseline_ratios
from postcopy.bench.tables import format_bench
from test_bench_baselines import _synthetic_bench


def _floor(dirty: int, **kw) -> dict:
    try:
        return checkpoint_floor(dirty, **kw)
    except FloorUnavailable as exc:
        pytest.skip(str(exc))


@pytest.mark.parametrize("dirty,window", [(64, 0), (64, 4), (1024, 4), (1, 0)])
def test_floor_finds_every_written_page_and_rebuilds_the_image(dirty, window):
    got = _floor(dirty, ram=4 << 20, epochs=20, window=window)
    assert got["epochs"] == 20
    assert got["pages_written"] == 20 * dirty
    assert got["pages_found"] == got["pages_written"]
    assert got["epochs_short"] == 0
    assert got["image_matches"] is True
    assert got["epochs_per_s"] > 0 and set(got["parts_us"]) == {"write", "harvest", "copy", "send", "ack", "apply"}


def test_floor_rejects_bad_sizes():
    parts = ffi.new("struct pc_ckpt_floor_parts *")
    assert lib.pc_ckpt_floor_run(4 << 20, 0, 1, 0, 1, ffi.NULL, parts) == -errno.EINVAL
    assert lib.pc_ckpt_floor_run(4 << 20, (4 << 20) // 4096 + 1, 1, 0, 1, ffi.NULL, parts) == -errno.EINVAL
    assert lib.pc_ckpt_floor_run(4097, 1, 1, 0, 1, ffi.NULL, parts) == -errno.EINVAL


def test_bench_table_shows_the_floor_and_the_ratio():
    floor = _floor(64, ram=4 << 20, epochs=10)
    checkpoint = attach_floors({"bounds": {64: {"checkpoints_per_s": floor["epochs_per_s"] / 2,
                                                "pause_ms": {"p50": 0.1, "p99": 0.2}}}}, {64: [floor]})
    row = checkpoint["bounds"][64]
    assert row["floor_per_s"] == floor["epochs_per_s"] and row["vs_floor"] == pytest.approx(0.5, abs=0.01)
    result = {**_synthetic_bench(), "checkpoint": checkpoint}
    result["ratios"] = baseline_ratios(result["baselines"], result["postcopy"])
    text = format_bench(result)
    assert "| floor/s | vs floor |" in text
    assert f"| 64 | {row['checkpoints_per_s']:.0f} | {floor['epochs_per_s']:.0f} | 0.50 |" in text
    assert "| window | write | harvest | copy | send | ack | apply |" in text
