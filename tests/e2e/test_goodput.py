"""Goodput and cost accounting of a real interrupted run. From events with known answers, and
the spot economics: tests/unit/test_goodput.py."""

from __future__ import annotations

import pytest

from spot.run.goodput import account


@pytest.mark.slow
def test_accounting_of_a_real_interrupted_run(tmp_path, markers):
    from spot.run.events import read_events

    from ..helpers import FAST, run_dir_of, run_train, run_until_failpoint

    args = [
        *FAST,
        "trainer.max_steps=80",
        "checkpoint.every_steps=20",
        "trainer.log_every=1",
        "cloud=aws",  # prices; no metadata endpoint is polled without a watcher address
        "cloud.metadata_url=null",
        f"run.root={tmp_path}",
    ]
    assert run_until_failpoint(args, "train.step@step=30", markers) == 30
    assert run_train(args).returncode == 0
    events = read_events(run_dir_of(tmp_path) / "events.jsonl")
    resumed = [e["step"] for e in events if e["event"] == "start"][1]  # 0 if nothing committed
    a = account(events, spot_per_hour=7.35, on_demand_per_hour=24.48)
    # Exact: every step is logged, and the killed attempt trained up to step 30.
    assert a.interruptions == 1 and a.lost_steps == 30 - resumed
    parts = ("productive", "lost", "stalled", "restarting", "other")
    assert sum(getattr(a, f"{p}_seconds") for p in parts) == pytest.approx(a.wall_seconds)
    assert 0 < a.goodput < 1 and a.restarting_seconds > 0
    assert a.spot_usd == pytest.approx(a.wall_seconds / 3600 * 7.35, rel=1e-9)
