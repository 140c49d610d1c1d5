"""Training progress: a one-line bar on an interactive terminal, plain log lines otherwise."""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("train")


class Progress:
    def __init__(self, total_steps: int, start_step: int, stream=None):
        self.total = total_steps
        self.stream = stream or sys.stderr
        self.interactive = self.stream.isatty()
        self._t0 = time.perf_counter()
        self._start = start_step

    def update(self, step: int, **metrics: float) -> None:
        elapsed = time.perf_counter() - self._t0
        rate = (step - self._start) / elapsed if elapsed > 0 else 0.0
        figures = " ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        if self.interactive:
            width = 24
            filled = int(width * step / max(self.total, 1))
            bar = "#" * filled + "." * (width - filled)
            self.stream.write(f"\r[{bar}] step {step}/{self.total} {figures} {rate:.1f} it/s ")
            self.stream.flush()
        else:
            log.info("step %d/%d %s %.1f it/s", step, self.total, figures, rate)

    def close(self) -> None:
        if self.interactive:
            self.stream.write("\n")
            self.stream.flush()
