"""Pure logic: page-run arithmetic and the precopy convergence policy."""
from __future__ import annotations

import random

from postcopy import ranges
from postcopy.migration.precopy import ConvergencePolicy, RoundStats, run_rounds


def _pages(runs):
    return {p for first, count in runs for p in range(first, first + count)}


def test_normalize_merges_and_sorts():
    assert ranges.normalize([(10, 2), (0, 3), (3, 1), (11, 5), (20, 0)]) == [(0, 4), (10, 6)]


def test_subtract_matches_set_difference():
    rng = random.Random(5)
    for _ in range(300):
        a = ranges.normalize((rng.randrange(200), rng.randrange(1, 20)) for _ in range(rng.randrange(8)))
        b = ranges.normalize((rng.randrange(200), rng.randrange(1, 20)) for _ in range(rng.randrange(8)))
        result = ranges.subtract(a, b)
        assert _pages(result) == _pages(a) - _pages(b)
        assert result == ranges.normalize(result)


def test_split_bounds_frames():
    assert ranges.split([(0, 5), (10, 2)], 2) == [(0, 2), (2, 2), (4, 1), (10, 2)]
    assert ranges.total(ranges.split([(7, 1000)], 256)) == 1000


def _round(n, dirty, ms=10.0, nbytes=4096 * 100):
    return RoundStats(n, dirty, 1.0, 0.0, dirty, 0, ms, nbytes)


def test_policy_converges_when_rest_fits_downtime_limit():
    policy = ConvergencePolicy(downtime_limit_ms=50)
    # 100 pages in 10 ms -> 40 MB/s; 400 dirty pages need 40 ms <= 50 ms.
    assert "converged" in policy.stop_reason([_round(0, 1000), _round(1, 400)], 4096)
    assert policy.stop_reason([_round(0, 1000), _round(1, 600)], 4096) is None


def test_policy_stops_at_round_limit_and_when_not_shrinking():
    assert "round limit" in ConvergencePolicy(downtime_limit_ms=0, max_rounds=2).stop_reason(
        [_round(0, 10), _round(1, 900), _round(2, 800)], 4096)
    stalled = [_round(0, 10)] + [_round(i, d) for i, d in enumerate([500, 400, 450, 420, 410], start=1)]
    assert "stopped shrinking" in ConvergencePolicy(downtime_limit_ms=0, stall_rounds=3).stop_reason(stalled, 4096)


class _FakeLog:
    def __init__(self, batches):
        self.batches = list(batches)
        self.last_harvest_ms = 0.5
        self.last_pause_ms = 0.0

    def harvest(self):
        return self.batches.pop(0) if self.batches else []


def test_rounds_skip_free_pages_and_resend_dirty_ones():
    sent = []
    log = _FakeLog([[(0, 4), (10, 2)], []])
    rounds, reason = run_rounds(
        populated=[(0, 20)], dirty_log=log, send=lambda runs, resend: sent.append((runs, resend)) or 0,
        free_hint=lambda: [(2, 2)], policy=ConvergencePolicy(downtime_limit_ms=0, max_rounds=2), page_size=4096)
    assert sent[0] == ([(0, 2), (4, 16)], False)  # round 0: populated minus free
    assert sent[1] == ([(0, 2), (10, 2)], True)  # round 1: dirty minus free
    assert [r.skipped_free for r in rounds] == [2, 2, 0]
    assert reason.startswith("round limit")


def _sent_round(n, dirty, sent, throttle=0):
    return RoundStats(n, dirty, 1.0, 0.0, sent, 0, 10.0, 4096 * sent, throttle_pct=throttle)


def test_auto_converge_raises_the_throttle_like_qemu():
    policy = ConvergencePolicy(downtime_limit_ms=0, auto_converge=True)
    # Dirty > 50 % of what the previous round sent, twice in a row: start at 20 %.
    rounds = [_sent_round(0, 1000, 1000), _sent_round(1, 600, 600), _sent_round(2, 500, 500)]
    assert policy.next_throttle(rounds) == 20
    # Just raised: the next step waits for two more high rounds at that throttle.
    rounds.append(_sent_round(3, 480, 480, throttle=20))
    assert policy.next_throttle(rounds) == 20
    rounds.append(_sent_round(4, 470, 470, throttle=20))
    assert policy.next_throttle(rounds) == 30
    # A low round (dirty <= half of what was sent) does not raise it.
    low = [_sent_round(0, 1000, 1000), _sent_round(1, 400, 1000), _sent_round(2, 100, 400)]
    assert policy.next_throttle(low) == 0
    # Never past the maximum.
    top = [_sent_round(0, 9, 9), _sent_round(1, 9, 9, 95), _sent_round(2, 9, 9, 95)]
    assert ConvergencePolicy(auto_converge=True, throttle_max=99).next_throttle(top) == 99


def test_auto_converge_keeps_going_while_the_throttle_can_rise():
    stalled = [_round(0, 10)] + [_round(i, d) for i, d in enumerate([500, 400, 450, 420, 410], start=1)]
    policy = ConvergencePolicy(downtime_limit_ms=0, stall_rounds=3, auto_converge=True)
    assert policy.stop_reason(stalled, 4096) is None
    stalled[-1].throttle_pct = 99
    assert "stopped shrinking" in policy.stop_reason(stalled, 4096)
    assert "99% throttle" in policy.stop_reason(stalled, 4096)


def test_dirty_limit_caps_the_step_rate_from_pages_per_step():
    last = RoundStats(3, 2000, 1.0, 0.0, 2000, 0, 10.0, 0, steps=4000)  # 0.5 pages per step
    assert ConvergencePolicy(dirty_limit=1000).next_rate_cap(last) == 2000.0
    assert ConvergencePolicy().next_rate_cap(last) == 0.0  # no limit: no cap


def test_rounds_throttle_until_converged_then_leave_lifting_to_the_caller():
    """A fake guest whose dirty set halves with each throttle step converges."""
    from postcopy.migration.precopy import GuestControls

    applied = []
    state = {"throttle": 0}

    def throttle(pct):
        applied.append(pct)
        state["throttle"] = pct

    class Log:
        last_harvest_ms = 0.1
        last_pause_ms = 0.0

        def harvest(self):
            return [(0, max(1, 4000 >> (state["throttle"] // 10)))]

    controls = GuestControls(throttle=throttle)
    rounds, reason = run_rounds(populated=[(0, 5000)], dirty_log=Log(), send=lambda runs, resend: 4096 * ranges.total(runs),
                                free_hint=lambda: [], page_size=4096, guest=controls,
                                policy=ConvergencePolicy(downtime_limit_ms=0.0, auto_converge=True, max_rounds=60))
    assert applied[:3] == [20, 30, 40]
    assert [r.throttle_pct for r in rounds][:4] == [0, 0, 0, 20]
    controls.lift()
    assert applied[-1] == 0 and controls.applied["throttle"] == 0
    assert reason.startswith(("round limit", "dirty set stopped shrinking"))
