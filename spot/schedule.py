"""Learning-rate schedules that are a closed-form function of the step.

A closed form (lr = base_lr * f(step)) resumes exactly from the step alone and lets the elastic
helpers rescale base_lr for a new world size without compounding. Recursive ("chainable")
schedulers would carry the previous LR forward and bake any scaling into it.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable

import torch


class WarmupCosine:
    """Linear warmup to 1, then cosine decay to `min_ratio` at `total_steps`."""

    def __init__(self, warmup_steps: int, total_steps: int, min_ratio: float = 0.0):
        self.warmup_steps = int(warmup_steps)
        self.total_steps = max(int(total_steps), 1)
        self.min_ratio = float(min_ratio)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(self.total_steps - self.warmup_steps, 1)
        progress = min((step - self.warmup_steps) / span, 1.0)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_cosine(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_steps: int = 0,
    min_ratio: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, WarmupCosine(warmup_steps, total_steps, min_ratio)
    )


def constant(optimizer: torch.optim.Optimizer, total_steps: int | None = None):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _step: 1.0)


def build_scheduler(factory: Callable, optimizer: torch.optim.Optimizer, total_steps: int):
    """Call a scheduler factory (a Hydra partial) with `total_steps` when it takes it."""
    params = inspect.signature(factory).parameters
    if "total_steps" in params or any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return factory(optimizer, total_steps=total_steps)
    return factory(optimizer)
