"""Training progress on rank 0: a one-line bar on an interactive terminal, plain periodic log
lines otherwise (files, `kubectl logs`, SLURM output). Step rate, ETA, loss, and the training
time since the last committed checkpoint (or the resume): what is at stake if the machine goes
now."""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("train")


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Progress:
    def __init__(self, total_steps: int, start_step: int, stream=None, clock=time.monotonic):
        self.total = total_steps
        self.stream = stream or sys.stderr
        self.interactive = self.stream.isatty()
        self._clock = clock
        self._t0 = clock()
        self._start = start_step
        self._saved_at = self._t0  # the start, or the resume: nothing trained is at stake yet

    def on_event(self, event: dict) -> None:
        """An `EventLog` listener: a committed checkpoint puts the work so far in safety."""
        if event["event"] == "checkpoint":
            self._saved_at = self._clock()

    def line(self, step: int, **figures: float) -> str:
        elapsed = self._clock() - self._t0
        rate = (step - self._start) / elapsed if elapsed > 0 else 0.0
        eta = (self.total - step) / rate if rate > 0 else None
        parts = [f"step {step}/{self.total}", *(f"{k} {v:.4g}" for k, v in figures.items())]
        parts += [
            f"{rate:.1f} it/s",
            f"ETA {_duration(eta)}",
            f"unsaved {_duration(self._clock() - self._saved_at)}",
        ]
        return " ".join(parts)

    def update(self, step: int, **figures: float) -> None:
        text = self.line(step, **figures)
        if self.interactive:
            width = 24
            filled = int(width * step / max(self.total, 1))
            bar = "#" * filled + "." * (width - filled)
            self.stream.write(f"\r[{bar}] {text} ")
            self.stream.flush()
        else:
            log.info("%s", text)

    def close(self) -> None:
        if self.interactive:
            self.stream.write("\n")
            self.stream.flush()
