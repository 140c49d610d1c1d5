"""Learning-rate schedules that are a closed-form function of the step.

A closed form (lr = base_lr * f(step)) resumes exactly from the step alone and lets the elastic
helpers rescale base_lr for a new world size without compounding. Recursive ("chainable")
schedulers would carry the previous LR forward and bake any scaling into it.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

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


@dataclass(frozen=True)
class TrainingLength:
    """How long training is, and where the LR schedule stands in it.

    The schedule is built for `schedule_steps` (the first attempt's estimate, kept in every
    checkpoint). Its position follows the share of training done, not the optimizer steps taken:
    under `batch_policy=scale_lr` a world-size change changes how many steps an epoch takes, so
    counting steps would reach the schedule's floor early or never in a run bounded by epochs.
    Training ends when either bound is reached, and so does the schedule, at any sequence of
    world sizes. With one world size and an epoch a whole number of steps, the position is the
    step count itself (so the LR is what `scheduler.step()` would give)."""

    max_steps: int | None
    max_epochs: int | None
    dataset_size: int
    schedule_steps: int

    def position(self, step: int, epoch: int, samples_in_epoch: int) -> int | float:
        done = Fraction(0)
        if self.max_steps:
            done = max(done, Fraction(step, self.max_steps))
        if self.max_epochs:
            seen = epoch * self.dataset_size + samples_in_epoch
            done = max(done, Fraction(seen, self.max_epochs * self.dataset_size))
        at = min(done, Fraction(1)) * self.schedule_steps
        return at.numerator if at.denominator == 1 else float(at)


def set_position(scheduler: torch.optim.lr_scheduler.LRScheduler, position: int | float) -> None:
    """Move a closed-form schedule (LambdaLR) to `position` and set the LRs it gives there:
    lr = base_lr * f(position), as LambdaLR computes it. Any other scheduler takes one step."""
    lambdas = getattr(scheduler, "lr_lambdas", None)
    if lambdas is None:
        scheduler.step()
        return
    scheduler.last_epoch = position
    lrs = [base * fn(position) for base, fn in zip(scheduler.base_lrs, lambdas, strict=True)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    scheduler._last_lr = lrs
