"""`checkpoint.keep_best`: the one owner of "the best checkpoint".

It holds the rule (which validation figure, lower or higher is better), the record of the best
so far (`{metric, mode, step, value, previous}`), and answers the one question both retentions
ask, local and in the bucket: which steps must stay, given the steps already there. It is
created before anything can upload or delete, and the session gives it the restored record
before uploads start, so no retention ever runs without knowing the best.

A new best replaces the record at once, but the previous best stays spared in each place until
the new one is there (committed on this disk; committed in the bucket): a kill in between never
leaves a place without a best. `previous` is part of the record, so that holds across restarts.

A resume whose rule differs from the one the checkpoint recorded (another metric or mode) starts
a new record (a `keep_best_changed` event): figures of another rule cannot be compared. The old
best stays spared, as a previous one, until the new rule's first best is committed.
"""

from __future__ import annotations

from collections.abc import Collection

from spot.run.config import ConfigError
from spot.run.events import EventLog


class BestCheckpoint:
    def __init__(self, rule, events: EventLog):
        """`rule`: checkpoint.keep_best ({metric, mode}), or None when it is off."""
        self.metric = rule.metric if rule is not None else None
        self.mode = str(rule.mode) if rule is not None else None
        self.events = events
        # Replaced whole, never changed in place: the upload and checkpoint threads read it.
        self._record: dict | None = None
        self._carried: int | None = None  # the best of a rule no longer in force, spared

    @property
    def record(self) -> dict | None:
        """What checkpoints store (and `python -m spot list` marks)."""
        return self._record

    def restore(self, saved: dict | None) -> None:
        """The record of the checkpoint the run resumes from (None: a new run, or none kept)."""
        if saved is None:
            return
        if (saved.get("metric"), saved.get("mode")) == (self.metric, self.mode):
            self._record = saved
            return
        # Another rule (or none): figures of the old one cannot be compared with the new one's.
        self._carried = saved["step"] if self.metric is not None else None
        self.events.emit(
            "keep_best_changed",
            step=saved["step"],
            previous={"metric": saved.get("metric"), "mode": saved.get("mode")},
            now={"metric": self.metric, "mode": self.mode} if self.metric else None,
        )

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
        value, best = figures[self.metric], self._record
        if best is not None and (
            value >= best["value"] if self.mode == "min" else value <= best["value"]
        ):
            return False
        previous = best["step"] if best is not None else self._carried
        self._record = {
            "metric": self.metric,
            "mode": self.mode,
            "step": step,
            "value": value,
            "previous": previous,
        }
        return True

    def spared(self, present: Collection[int]) -> set[int]:
        """The steps a retention must keep whatever keep_last says, given the steps `present`
        where it deletes: the best, and the one before it until the best is there too."""
        record = self._record
        if record is None:
            return {self._carried} if self._carried is not None else set()
        previous = record.get("previous")
        if previous is None or record["step"] in present:
            return {record["step"]}
        return {record["step"], previous}
