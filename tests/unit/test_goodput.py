"""Goodput and cost accounting from events with known answers, and the spot economics. Of a
real interrupted run: tests/e2e/test_goodput.py."""

from __future__ import annotations

import pytest

from spot.run.goodput import Economics, account


def synthetic_run() -> list[dict]:
    """Two attempts of 2 nodes: the first trains steps 1-20 at 1 s each (a 0.5 s checkpoint
    stall at step 10) and is killed at t=20; the second starts at t=30 from step 10 and trains
    steps 11-30 at 1.1 s each; complete at t=53."""
    return [
        {"event": "start", "time": 0.0, "step": 0, "nodes": 2},
        {"event": "train", "time": 10.0, "step": 10},
        {"event": "checkpoint", "time": 10.1, "step": 10, "stall_seconds": 0.5},
        {"event": "train", "time": 20.0, "step": 20},
        {"event": "resume", "time": 29.5, "step": 10},
        {"event": "start", "time": 30.0, "step": 10, "nodes": 2},
        {"event": "train", "time": 52.0, "step": 30},
        {"event": "complete", "time": 53.0, "step": 30},
    ]


def test_accounting_of_a_synthetic_run():
    a = account(synthetic_run(), spot_per_hour=3.6, on_demand_per_hour=36.0)
    assert a.wall_seconds == 53.0
    assert a.lost_steps == 10 and a.lost_seconds == pytest.approx(10.0)  # steps 11-20 again
    assert a.stalled_seconds == 0.5
    assert a.productive_seconds == pytest.approx(20 - 10 - 0.5 + 22)
    assert a.restarting_seconds == pytest.approx(9.5)  # killed at t=20, restored at t=29.5
    assert a.interruptions == 1
    total = (
        a.productive_seconds
        + a.lost_seconds
        + a.stalled_seconds
        + a.restarting_seconds
        + a.other_seconds
    )
    assert total == pytest.approx(a.wall_seconds)
    assert a.goodput == pytest.approx(31.5 / 53)
    assert a.spot_usd == pytest.approx(53 * 2 * 3.6 / 3600)  # 2 nodes, all wall time
    assert a.on_demand_usd == pytest.approx((31.5 + 0.5) * 2 * 36.0 / 3600)
    assert a.saved_usd == pytest.approx(a.on_demand_usd - a.spot_usd)


def test_the_articles_example_done_right():
    # 100 h of work, spot at 30% of on demand, 4 interruptions losing 15 minutes each: 101 h.
    e = Economics(
        work_hours=100,
        spot_per_hour=0.3,
        on_demand_per_hour=1.0,
        rate_per_hour=0.04,
        checkpoint_seconds=0.0,
        interval_seconds=1800,  # half an interval (15 min) re-done per interruption
    )
    assert e.overhead == pytest.approx(0.01)
    assert e.spot_usd == pytest.approx(30.3) and e.on_demand_usd == 100
    # The break-even is not "3% overhead", as the article says: spot stays cheaper until the
    # overhead reaches on_demand / spot - 1.
    assert e.break_even_overhead == pytest.approx(1 / 0.3 - 1)
    p3 = Economics(100, 7.35, 24.48, 0.05, checkpoint_seconds=180, interval_seconds=1800)
    assert p3.optimal_interval_seconds == pytest.approx((2 * 180 * 3600 / 0.05) ** 0.5)
    assert p3.on_demand_usd - p3.spot_usd > 1600
