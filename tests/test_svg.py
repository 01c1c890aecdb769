"""SVG report pictures: documents parse as XML, draw the series they claim, escape
text, and turn missing data into a visible note rather than an exception."""
from __future__ import annotations

import math
import shutil
import subprocess
import xml.etree.ElementTree as ET

import pytest

from postcopy import svg

SVG = "{http://www.w3.org/2000/svg}"
PC = "{" + svg.NS + "}"
N_BUCKETS = 40


def parse(text: str) -> ET.Element:
    root = ET.fromstring(text.encode("utf-8"))
    assert root.tag == f"{SVG}svg"
    assert root.get("version") == "1.1"
    return root


def by_class(root: ET.Element, tag: str, cls: str) -> list[ET.Element]:
    return [e for e in root.iter(f"{SVG}{tag}") if cls in (e.get("class") or "").split()]


def texts(root: ET.Element) -> list[str]:
    return ["".join(e.itertext()) for e in root.iter(f"{SVG}text")]


def notes(root: ET.Element) -> list[str]:
    return ["".join(e.itertext()) for e in by_class(root, "text", "note")]


def point_count(element: ET.Element) -> int:
    return len(element.get("points").split())


def synthetic_report(**overrides) -> dict:
    """A hybrid migration with known per-cause totals."""
    installed = {
        "precopy": [100] * 10 + [0] * 30,     # 1000
        "resent": [0] * 10 + [5] * 4 + [0] * 26,  # 20
        "demand": [0] * 15 + [2] * 25,        # 50
        "pushed": [0] * 15 + [40] * 25,       # 1000
        "zero": [0] * 15 + [8] * 5 + [0] * 20,  # 40
    }
    report = {
        "mode": "hybrid", "ram_bytes": 8 << 20, "workload": "random-write", "dirty_log": "pagemap-scan",
        "downtime_ms": 4.5, "total_ms": 400.0, "verified": True,
        "timeline": {"bucket_ms": 10, "start_ns": 123, "installed": installed, "switchover_ms": 150.0},
        "precopy_rounds": [
            {"round": 0, "dirty_pages": 2048, "harvest_ms": 0.0, "sent_pages": 1000, "round_ms": 20.0},
            {"round": 1, "dirty_pages": 30, "harvest_ms": 0.3, "sent_pages": 20, "round_ms": 2.0},
            {"round": 2, "dirty_pages": 0, "harvest_ms": 0.2, "sent_pages": 0, "round_ms": 1.0},
        ],
        "fault_latency_us": {"count": 50, "p50": 80.0, "p99": 900.0, "max": 1500.0},
        "fault_latency_histogram": [
            {"from_us": 0, "to_us": 2, "count": 0}, {"from_us": 2, "to_us": 4, "count": 0},
            {"from_us": 4, "to_us": 8, "count": 1}, {"from_us": 8, "to_us": 16, "count": 0},
            {"from_us": 16, "to_us": 32, "count": 3}, {"from_us": 32, "to_us": 64, "count": 10},
            {"from_us": 64, "to_us": 128, "count": 30}, {"from_us": 128, "to_us": 256, "count": 0},
            {"from_us": 256, "to_us": 512, "count": 4}, {"from_us": 512, "to_us": 1024, "count": 1},
            {"from_us": 1024, "to_us": 2048, "count": 1},
        ],
    }
    report.update(overrides)
    return report


TOTALS = {"precopy": 1000, "resent": 20, "demand": 50, "pushed": 1000, "zero": 40}


def test_migration_figure_stacks_every_cause_with_one_point_per_bucket():
    root = parse(svg.migration_figure(synthetic_report()))
    layers = {g.get(f"{PC}series"): g for g in by_class(root, "g", "series")
              if g.find(f"{SVG}polygon[@class='area']") is not None}
    assert [name.split()[0] for name in layers] == list(TOTALS)
    for name, g in layers.items():
        edge = g.find(f"{SVG}polyline[@class='area-edge']")
        area = g.find(f"{SVG}polygon[@class='area']")
        # (0, 0) plus one point at the end of each bucket; the area closes along the layer below.
        assert point_count(edge) == N_BUCKETS + 1
        assert point_count(area) == 2 * (N_BUCKETS + 1)
        assert g.get(f"{PC}points") == str(N_BUCKETS + 1)
        # Cumulative: the top edge never goes down (SVG y grows downwards).
        ys = [float(p.split(",")[1]) for p in edge.get("points").split()]
        assert all(b <= a + 1e-6 for a, b in zip(ys, ys[1:]))
    legend = ["".join(t.itertext()) for t in by_class(root, "text", "legend-label")]
    for cause, total in TOTALS.items():
        assert f"{cause} {total:,}" in legend
    assert any("2,110 pages installed" in t for t in texts(root))


def test_switchover_marker_and_ram_line():
    root = parse(svg.migration_figure(synthetic_report()))
    (vline,) = by_class(root, "g", "vline")
    assert float(vline.get(f"{PC}x")) == 150.0
    assert "switchover 150 ms" in "".join(vline.itertext())
    (hline,) = by_class(root, "g", "hline")
    assert float(hline.get(f"{PC}y")) == 2048


def test_histogram_has_one_rect_per_non_empty_bucket():
    report = synthetic_report()
    root = parse(svg.migration_figure(report))
    bars = [r for r in by_class(root, "rect", "bar") if r.get(f"{PC}series") == "count"]
    expected = [b["count"] for b in report["fault_latency_histogram"] if b["count"]]
    assert [int(float(r.get(f"{PC}value"))) for r in bars] == expected
    # Bars on a log count axis: taller for more faults, and the count-1 bucket is still visible.
    heights = {int(float(r.get(f"{PC}value"))): float(r.get("height")) for r in bars}
    assert heights[1] > 5 and heights[1] < heights[3] < heights[10] < heights[30]
    assert any("50 faults: p50 80.0 µs, p99 900.0 µs" in t for t in texts(root))


def test_precopy_round_bars_skip_zero_values():
    root = parse(svg.migration_figure(synthetic_report()))
    bars = [r for r in by_class(root, "rect", "bar") if r.get(f"{PC}series") in ("dirty pages", "sent pages")]
    got = sorted((r.get(f"{PC}series"), r.get(f"{PC}category"), float(r.get(f"{PC}value"))) for r in bars)
    assert got == [("dirty pages", "0", 2048.0), ("dirty pages", "1", 30.0),
                   ("sent pages", "0", 1000.0), ("sent pages", "1", 20.0)]
    assert "3 rounds, harvest 0.5 ms in all" in " ".join(texts(root))


def test_header_and_text_are_escaped():
    name = 'evil <&> "quoted" \'single\''
    text = svg.migration_figure(synthetic_report(workload=name, verified=False))
    assert "<&>" not in text
    root = parse(text)
    facts = "".join(by_class(root, "text", "header-facts")[0].itertext())
    assert f"workload {name}" in facts
    assert "downtime 4.50 ms" in facts and "RAM 8 MiB" in facts
    assert "NOT VERIFIED" in "".join(by_class(root, "text", "verdict")[0].itertext())
    assert name in root.find(f"{SVG}title").text


@pytest.mark.parametrize("report", [
    None,
    {},
    {"mode": "postcopy", "timeline": None, "precopy_rounds": None, "fault_latency_histogram": None},
    {"mode": "precopy", "timeline": {"bucket_ms": 10, "installed": {"precopy": [0, 0], "demand": None},
                                     "switchover_ms": None},
     "precopy_rounds": [{"round": 0}], "fault_latency_histogram": [{"from_us": 0, "to_us": 2, "count": 0}]},
], ids=["none", "empty", "none-series", "all-zero"])
def test_missing_data_gives_notes_not_exceptions(report):
    root = parse(svg.migration_figure(report))
    found = notes(root)
    assert len(found) == 3, found
    assert any("timeline" in n or "no pages installed" in n for n in found)
    assert any("precopy round" in n for n in found)
    assert "no faults recorded" in found
    assert not by_class(root, "rect", "bar")


def test_pure_postcopy_says_so():
    report = synthetic_report(mode="postcopy", precopy_rounds=[])
    report["timeline"]["installed"]["precopy"] = [0] * N_BUCKETS
    report["timeline"]["installed"]["resent"] = [0] * N_BUCKETS
    root = parse(svg.migration_figure(report))
    assert notes(root) == ["no precopy rounds (pure postcopy)"]
    names = [g.get(f"{PC}series").split()[0] for g in by_class(root, "g", "series")
             if g.find(f"{SVG}polygon") is not None]
    assert names == ["demand", "pushed", "zero"]


def test_timeline_in_dest_is_found_and_long_runs_are_sampled_exactly():
    n = 5000
    timeline = {"bucket_ms": 10, "installed": {"demand": [1] * n, "pushed": [0] * (n - 1) + [7]},
                "switchover_ms": 0.0}
    series, unit = svg.timeline_series(timeline, max_points=1000)
    assert unit == "s"  # 50 s of buckets
    demand = dict(series)["demand"]
    assert len(demand) == 1001 and demand[0] == (0.0, 0.0)
    assert demand[-1] == (50.0, float(n))
    assert dict(series)["pushed"][-1][1] == 7
    root = parse(svg.migration_figure({"mode": "postcopy", "dest": {"timeline": timeline}}))
    assert "no timeline in this report" not in notes(root)
    assert by_class(root, "polyline", "area-edge")


def test_ticks_are_round_numbers():
    lo, hi, ticks = svg.linear_ticks(0, 2110)
    assert (lo, ticks[1] - ticks[0]) == (0, 500) and hi >= 2110 and len(ticks) == 6
    assert svg.linear_ticks(0, 0.3)[2] == [0.0, 0.1, 0.2, 0.3]
    lo, hi, major, minor = svg.log_ticks(7, 123456)
    assert (lo, hi) == (1, 1e6) and major == [1, 10, 100, 1e3, 1e4, 1e5, 1e6]
    assert 2 in minor and 2 not in major
    assert svg.log_ticks(3, 40)[2] == [1, 2, 5, 10, 20, 50, 100]
    assert [svg.format_number(v) for v in (0, 0.25, 2000, 10000, 1.5e6)] == ["0", "0.25", "2000", "10k", "1.5M"]
    assert svg.format_size(256 << 20) == "256 MiB" and svg.format_size(3 << 29) == "1.5 GiB"


def test_line_chart_log_log_draws_each_series_and_reports_hidden_points():
    series = [("a", [(10, 1.0), (100, 10.0), (1000, 100.0)]), ("b <x>", [(10, 2.0), (0, 5.0), (1000, float("nan"))])]
    text = svg.document(900, 500, [svg.line_chart(series, x_log=True, y_log=True, title="t", x_label="x (pages)",
                                                  y_label="y (ms)")])
    assert "nan" not in text
    root = parse(text)
    lines = by_class(root, "polyline", "line")
    assert [point_count(p) for p in lines] == [3, 1]
    assert ["".join(t.itertext()) for t in by_class(root, "text", "legend-label")] == ["a", "b <x>"]
    assert "1 point <= 0 not shown (log axis)" in texts(root)
    labels = ["".join(t.itertext()) for t in by_class(root, "text", "tick-label")]
    assert "1000" in labels and "x (pages)" in texts(root)


def test_empty_primitives_draw_a_note():
    for fragment in (svg.line_chart([]), svg.stacked_area_chart([]), svg.bar_chart([]),
                     svg.grouped_bar_chart(["a"], [("s", [None])]), svg.histogram_chart([])):
        root = parse(svg.document(900, 420, [fragment]))
        assert notes(root) == ["no data"]


def test_stacked_area_rejects_mismatched_x():
    with pytest.raises(ValueError, match="different x values"):
        svg.stacked_area_chart([("a", [(0, 1), (1, 2)]), ("b", [(0, 1), (2, 2)])])


def bench_result() -> dict:
    rows = []
    for backend in ("pagemap-scan", "uffd-wp"):
        for ram in (256 << 20, 1 << 30):
            for dirty in (10, 1000, 100000):
                rows.append({"backend": backend, "kernel": "6.18", "ram_bytes": ram, "dirty_pages": dirty,
                             "harvest_ms": dirty / 1000 + ram / 2**30, "worst_gap_ms": dirty / 500})
    return {
        "kernel": "6.18", "cpus": 2, "harvest": rows,
        "baselines": {"tcp_bulk_bytes_per_s": 3e9, "tcp_rtt_4k_us": {"p50": 30.0, "p99": 90.0},
                      "uffd_roundtrip_us": {"p50": 3.0, "p99": 9.0}},
        "postcopy": {"push_bytes_per_s": 2e9, "fault_us_without_pusher": {"p50": 50.0, "p99": 200.0},
                     "fault_us_with_pusher": {"p50": 70.0, "p99": None}},
    }


def test_bench_figures():
    figures = svg.bench_figures(bench_result())
    assert sorted(figures) == ["fault-latency", "harvest-stall", "harvest-vs-dirty", "throughput"]
    harvest = parse(figures["harvest-vs-dirty"])
    series = {g.get(f"{PC}series"): int(g.get(f"{PC}points")) for g in by_class(harvest, "g", "series")}
    assert series == {"pagemap-scan, 256 MiB": 3, "pagemap-scan, 1 GiB": 3, "uffd-wp, 256 MiB": 3, "uffd-wp, 1 GiB": 3}
    stall = parse(figures["harvest-stall"])
    bars = {(r.get(f"{PC}category"), r.get(f"{PC}series")): float(r.get(f"{PC}value"))
            for r in by_class(stall, "rect", "bar")}
    assert bars == {(b, s): 200.0 for b in ("pagemap-scan", "uffd-wp") for s in ("256 MiB", "1 GiB")}
    latency = parse(figures["fault-latency"])
    values = {(r.get(f"{PC}category"), r.get(f"{PC}series")) for r in by_class(latency, "rect", "bar")}
    assert ("fault, pusher on", "p50") in values and ("fault, pusher on", "p99") not in values
    assert "n/a" in texts(latency)  # the missing p99 is marked, not drawn as zero
    assert len(by_class(parse(figures["throughput"]), "rect", "bar")) == 2


def test_bench_figures_skip_absent_data():
    assert svg.bench_figures({}) == {}
    assert svg.bench_figures(None) == {}
    only = svg.bench_figures({"baselines": {"tcp_bulk_bytes_per_s": 1e9}})
    assert list(only) == ["throughput"]


def test_documents_are_self_contained():
    docs = [svg.migration_figure(synthetic_report())] + list(svg.bench_figures(bench_result()).values())
    for text in docs:
        root = parse(text)
        for element in root.iter():
            for key, value in element.attrib.items():
                assert "href" not in key and "url(" not in value, (element.tag, key)
                if key in ("x", "y", "width", "height", "x1", "y1", "x2", "y2", "cx", "cy"):
                    assert math.isfinite(float(value)), (element.tag, key, value)
        assert float(root.get("width")) == 900 and float(root.get("height")) <= 1100


def test_write_svg_and_figures(tmp_path):
    path = tmp_path / "m.svg"
    svg.write_svg(str(path), svg.migration_figure(synthetic_report(workload="ü <w>")))
    assert "ü <w>" in ET.parse(path).getroot().find(f"{SVG}title").text
    paths = svg.write_figures(str(tmp_path / "bench"), svg.bench_figures(bench_result()))
    assert sorted(p.rsplit("/", 1)[1] for p in paths) == sorted(
        ["harvest-vs-dirty.svg", "harvest-stall.svg", "fault-latency.svg", "throughput.svg"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench", "m.svg"]  # no temporary left over


def test_figures_render(tmp_path):
    """Optional: the documents render with librsvg when rsvg-convert is installed."""
    tool = shutil.which("rsvg-convert")
    if not tool:
        pytest.skip("rsvg-convert (librsvg2-bin) not on PATH; rendering check skipped")
    docs = {"migration": svg.migration_figure(synthetic_report()), "empty": svg.migration_figure({}),
            **svg.bench_figures(bench_result())}
    for name, text in docs.items():
        src, png = tmp_path / f"{name}.svg", tmp_path / f"{name}.png"
        src.write_text(text, encoding="utf-8")
        out = subprocess.run([tool, "-o", str(png), str(src)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert not out.stderr.strip(), out.stderr
