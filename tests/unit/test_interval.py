"""When to checkpoint: fixed steps or minutes, and Young/Daly from measured cost."""

from __future__ import annotations

import math
import time

from spot.checkpoint.interval import CheckpointSchedule
from spot.run.config import CheckpointConfig
from spot.run.events import EventLog, read_events


def test_every_steps():
    s = CheckpointSchedule(CheckpointConfig(every_steps=5, every_minutes=None), 0.0, EventLog(None))
    s.start(0)
    due = []
    for step in range(1, 12):
        if s.due(step):
            due.append(step)
            s.saved(step)
    assert due == [5, 10]


def test_every_minutes_uses_elapsed_time():
    s = CheckpointSchedule(
        CheckpointConfig(every_steps=None, every_minutes=0.01), 0.0, EventLog(None)
    )
    s.start(0)
    assert not s.due(1)
    time.sleep(0.65)
    assert s.due(2)
    s.saved(2)
    assert not s.due(3)


def test_young_daly_interval_from_measured_stall(tmp_path):
    events = EventLog(tmp_path / "events.jsonl")
    cfg = CheckpointConfig(every_steps=None, every_minutes=15, policy="young_daly")
    s = CheckpointSchedule(cfg, interruption_rate_per_hour=0.05, events=events)
    s.start(0)
    assert s.due(1)  # no cost measured yet: the first checkpoint comes at once, to measure it
    s.saved(1)
    assert not s.due(2) and not s.due(50)  # and only one until its cost is known
    s.measured(stall_seconds=2.0, persist_seconds=1.0, step=1)
    mtbf = 3600 / 0.05
    assert math.isclose(s.interval_seconds, math.sqrt(2 * 2.0 * mtbf))
    assert not s.due(51)  # 1200 s have not passed
    s.measured(stall_seconds=2.0, persist_seconds=5000.0, step=2)  # persisting is slower than T
    assert s.interval_seconds == 5000.0
    why = [
        e["why"]
        for e in read_events(tmp_path / "events.jsonl")
        if e["event"] == "checkpoint_interval"
    ]
    assert why == ["sqrt(2 * stall * mtbf)", "persist time"]
