"""When to checkpoint: a fixed interval, or Young/Daly's optimum from measured cost and risk.

Young/Daly: with a checkpoint costing C seconds of stalled training and a mean time between
interruptions M, the interval that minimises expected lost time is T = sqrt(2 * C * M).
C is the median stall measured so far (the first checkpoint is taken after the first step, to
measure it); T is never shorter than the last background persist, so checkpoints never queue up.
Under young_daly, every_steps and every_minutes serve only until a first save succeeds: when
the measuring save fails (checkpoint.on_error=continue), the next try is due on that interval
rather than never (nothing measured would otherwise leave the run without checkpoints).
"""

from __future__ import annotations

import math
import time

from spot.run.config import CheckpointConfig
from spot.run.events import EventLog


class CheckpointSchedule:
    def __init__(self, cfg: CheckpointConfig, interruption_rate_per_hour: float, events: EventLog):
        self.cfg = cfg
        self.events = events
        self.mtbf_seconds = (
            3600.0 / interruption_rate_per_hour if interruption_rate_per_hour > 0 else None
        )
        self.interval_seconds = cfg.every_minutes * 60 if cfg.every_minutes else None
        self._last_step = 0
        self._last_time = time.monotonic()
        self._saved = False
        self._stalls: list[float] = []
        self._failed = False  # the save meant to measure the cost failed: retry on the fixed rule
        events.subscribe(self._on_event)  # failures happen in the background thread

    def start(self, step: int) -> None:
        """Training starts (or resumes) at `step`: the interval starts now."""
        self._last_step = step
        self._last_time = time.monotonic()

    def saved(self, step: int) -> None:
        """A checkpoint was taken at `step`: the interval restarts."""
        self.start(step)
        self._saved = True

    def _on_event(self, record: dict) -> None:
        if record["event"] == "checkpoint_failed":  # nothing measured: it must be tried again
            self._failed = True

    def due(self, step: int) -> bool:
        if self.cfg.policy == "young_daly":
            if self._stalls:
                return time.monotonic() - self._last_time >= self.interval_seconds
            if not self._failed:  # nothing measured yet: take one checkpoint first, to measure
                return not self._saved and step > self._last_step
            if not (self.cfg.every_steps or self.interval_seconds):
                return step > self._last_step
        return self._fixed_due(step)

    def _fixed_due(self, step: int) -> bool:
        if self.cfg.every_steps and step - self._last_step >= self.cfg.every_steps:
            return True
        return (
            self.interval_seconds is not None
            and time.monotonic() - self._last_time >= self.interval_seconds
        )

    def measured(self, stall_seconds: float, persist_seconds: float, step: int) -> None:
        """A checkpoint committed: under young_daly, re-estimate the interval from its cost."""
        if self.cfg.policy != "young_daly" or self.mtbf_seconds is None:
            return
        self._stalls.append(stall_seconds)
        # The median stall, floored at 1 ms: a near-zero measured cost must not make the interval
        # collapse to nothing (and the figure in the event is the one the formula used).
        cost = max(sorted(self._stalls)[len(self._stalls) // 2], 1e-3)
        optimum = math.sqrt(2 * cost * self.mtbf_seconds)
        self.interval_seconds = max(optimum, persist_seconds)
        self.events.emit(
            "checkpoint_interval",
            step=step,
            interval_seconds=round(self.interval_seconds, 3),
            policy="young_daly",
            stall_seconds=round(cost, 6),
            persist_seconds=round(persist_seconds, 6),
            mtbf_seconds=round(self.mtbf_seconds, 1),
            why="persist time" if persist_seconds > optimum else "sqrt(2 * stall * mtbf)",
        )
