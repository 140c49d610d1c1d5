"""`checkpoint.keep_best`: the one owner of "the best checkpoint".

It holds the rule (which validation figure, lower or higher is better), the record of the best
so far, and answers the one question every retention asks (this disk's, the bucket's): which
steps must stay, given the steps already there. It is created before anything can upload or
delete, and the session gives it the restored record before uploads start, so no retention ever
runs without knowing the best.

A new best replaces the record at once, but in each place the newest earlier best that is there
stays until the new one is there too (committed on this disk; verified in the bucket): however
many new bests come while uploads lag or a process is killed, no place is ever without a best.
The record keeps the earlier bests a place may still need (`earlier`, trimmed once every place
has a newer one), so that holds across restarts.

A resume whose rule differs from the one the checkpoint recorded (another metric or mode) starts
a new record (a `keep_best_changed` event): figures of another rule cannot be compared. Until
the new rule's first best, the record has no step, and the old best is an earlier one: kept
until that first best is there. keep_best turned off spares nothing.
"""

from __future__ import annotations

from collections.abc import Collection

from spot.run.config import ConfigError
from spot.run.events import EventLog


class BestCheckpoint:
    def __init__(self, rule, events: EventLog, places: Collection[str] = ("disk",)):
        """`rule`: checkpoint.keep_best ({metric, mode}), or None when it is off. `places`:
        where checkpoints are kept and retention asks (the disk; the bucket too with one)."""
        self.metric = rule.metric if rule is not None else None
        self.mode = str(rule.mode) if rule is not None else None
        self.events = events
        self.places = tuple(places)
        # Replaced whole, never changed in place: the upload and checkpoint threads read it.
        self._record: dict | None = None
        self._there: dict[str, int] = {}  # place -> the newest best step found there

    @property
    def record(self) -> dict | None:
        """The best so far, as the trainer state holds it: {metric, mode, step, value}; step is
        None until the rule's first best. The same at a step whether the run was interrupted or
        not (what retention has seen is not in it)."""
        record = self._record
        return None if record is None else {k: v for k, v in record.items() if k != "earlier"}

    @property
    def retention_record(self) -> dict | None:
        """The record with the earlier bests a place may still need (`earlier`, trimmed once
        every place has a newer best): what manifests hold, and a restart restores."""
        record = self._record
        if record is None or len(self._there) < len(self.places):
            return record
        everywhere = min(self._there[p] for p in self.places)  # each place has this or newer
        return {**record, "earlier": [s for s in record["earlier"] if s >= everywhere]}

    def restore(self, saved: dict | None) -> None:
        """The record of the checkpoint the run resumes from, from its manifest (with `earlier`)
        or its trainer state (None: a new run, or none kept)."""
        if saved is None:
            return
        if (saved.get("metric"), saved.get("mode")) == (self.metric, self.mode):
            self._record = {"earlier": [], **saved}
            return
        self.events.emit(
            "keep_best_changed",
            step=saved.get("step"),
            previous={"metric": saved.get("metric"), "mode": saved.get("mode")},
            now={"metric": self.metric, "mode": self.mode} if self.metric else None,
        )
        if self.metric is not None:  # the old rule's bests are earlier ones of the new record
            steps = [*saved.get("earlier", []), saved.get("step")]
            self._record = self._new(None, None, [s for s in steps if s is not None])

    def check(self, figures: Collection[str]) -> None:
        """Before training: the metric must be one evaluation reports (`val/<name>`)."""
        if self.metric is not None and self.metric not in figures:
            raise ConfigError(
                "checkpoint.keep_best.metric",
                f"{self.metric} is not a validation figure; there are: {', '.join(sorted(figures))}",
            )

    def consider(self, figures: dict[str, float], step: int) -> bool:
        """After an evaluation (the same figures on every rank): whether the weights at `step`
        are the new best. The caller then commits a checkpoint at `step`."""
        if self.metric is None:
            return False
        self.check(figures)
        value, best = figures[self.metric], self.retention_record
        if best is not None and best["step"] is not None and not self._better(value, best):
            return False
        earlier = [] if best is None else [*best["earlier"], best["step"]]
        self._record = self._new(step, value, [s for s in earlier if s is not None])
        return True

    def spared(self, present: Collection[int], place: str = "disk") -> set[int]:
        """The steps a retention in `place` keeps whatever keep_last says, given the steps
        `present` there: the best, and the newest earlier best that is there until the best is."""
        record = self._record
        if record is None:
            return set()
        keep = {record["step"]} if record["step"] is not None else set()
        there = [s for s in (*record["earlier"], record["step"]) if s in present]
        if there:
            self._there[place] = there[-1]  # (one writer per place: a dict item is atomic)
            keep.add(there[-1])
        return keep

    def _better(self, value: float, best: dict) -> bool:
        return value < best["value"] if self.mode == "min" else value > best["value"]

    def _new(self, step: int | None, value: float | None, earlier: list[int]) -> dict:
        return {
            "metric": self.metric,
            "mode": self.mode,
            "step": step,
            "value": value,
            "earlier": earlier,
        }
