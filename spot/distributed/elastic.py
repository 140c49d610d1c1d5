"""Training across world-size changes: the batch each step takes, the learning rate that goes with
it, and a gradient that is the mean over every sample of the step whatever the world size.

Two policies (`elastic.batch_policy`):

- `scale_lr`: each rank takes `trainer.batch_size` samples per step, so the global batch follows
  the world size, and the LR is `base_lr * schedule(step) * rule(world_size / reference)` with
  rule `linear`, `sqrt` or `none`. `reference` is `elastic.reference_world_size`, or (null, the
  default) the world size the run started with: the config's LR is the LR of the first world. The scale is applied to the schedule's base LRs from the
  config after every load, so it never compounds across changes and loading the optimizer's state
  (which holds the old LR) cannot undo it.
- `keep_global_batch`: every step takes `trainer.batch_size * reference` samples over
  all ranks, each rank running as many micro-batches of at most `trainer.batch_size` as its share
  needs (gradient accumulation). The LR does not change.

`trainer.global_batch_size` is the same mechanism with the global batch named directly: every
step takes that many samples over all ranks at any world size, `trainer.batch_size` being the
micro-batch (the most one rank runs at once), and the LR does not change; `batch_policy` then
has nothing left to decide. (`keep_global_batch` is `global_batch_size = batch_size *
reference`.)

Each micro-batch's mean loss is weighted by `samples * world_size / step_samples` before
backward; DDP averages over ranks, so the gradient is the mean over the step's samples even when
shares are uneven (a global batch not divisible by the world size, an epoch's short last step).
A full, even step has weight exactly 1 and runs the plain `loss.backward()`. A rank without
samples in a step (an epoch's tail shorter than the world) runs a stand-in sample with weight 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import nullcontext

import torch

from spot.distributed.sampler import ResumableBatchSampler
from spot.distributed.world import World
from spot.run.config import ConfigError, ElasticConfig
from spot.run.schedule import set_position


def global_batch(
    policy: str, batch_size: int, world_size: int, reference: int, fixed: int | None = None
) -> int:
    """Samples per optimizer step over all ranks; `fixed`: trainer.global_batch_size."""
    if fixed:
        return fixed
    return batch_size * (reference if policy == "keep_global_batch" else world_size)


def lr_scale(
    cfg: ElasticConfig, world_size: int, reference: int, fixed: int | None = None
) -> float:
    """The LR's factor at this world size: 1 whenever the global batch does not follow it."""
    if fixed or cfg.batch_policy == "keep_global_batch" or cfg.lr_scaling == "none":
        return 1.0
    ratio = world_size / reference
    return ratio if cfg.lr_scaling == "linear" else math.sqrt(ratio)


def apply_lr_scale(
    scheduler: torch.optim.lr_scheduler.LRScheduler, config_base_lrs: list[float], scale: float
) -> None:
    """Set the LR of the current step to config base LR * schedule(step) * scale, from scratch."""
    lambdas = getattr(scheduler, "lr_lambdas", None)
    if lambdas is None:
        if scale == 1.0:
            return
        raise ConfigError(
            "scheduler",
            f"{type(scheduler).__name__} is not a closed-form schedule (LambdaLR); "
            "elastic LR scaling needs one (or elastic.lr_scaling=none)",
        )
    scheduler.base_lrs = [lr * scale for lr in config_base_lrs]
    for group, base in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, strict=True):
        group["initial_lr"] = base
    set_position(scheduler, scheduler.last_epoch)


def describe_split(sampler: ResumableBatchSampler) -> dict:
    """How a full step is divided over the ranks: said once at start and on every change."""
    total, ranks = sampler.global_batch, sampler.world_size
    shares = [total // ranks + (1 if r < total % ranks else 0) for r in range(ranks)]
    micro = [-(-n // sampler.batch_size) if n else 0 for n in shares]
    text = f"global batch {total} over {ranks} rank(s): {'+'.join(map(str, shares))} samples"
    if total % ranks:
        text += (
            f" ({total} is not divisible by {ranks}: the first {total % ranks} rank(s) take one "
            f"more; each sample is weighted 1/{total}, so the update is the {total}-sample mean)"
        )
    if max(micro) > 1:
        text += f", accumulated in up to {max(micro)} micro-batches of <= {sampler.batch_size}"
    return {"global_batch": total, "per_rank_samples": shares, "micro_batches": micro, "text": text}


def accumulate_gradients(
    model: torch.nn.Module,
    batches: Iterator,
    plan: list[list[int]],
    share_samples: int,
    step_samples: int,
    world: World,
    loss_fn: Callable[[torch.nn.Module, object], torch.Tensor],
    amp=None,
) -> torch.Tensor:
    """Forward and backward over this rank's micro-batches of one step; gradients synchronize on
    the last one only (DDP; FSDP2 reduce-scatters in each). The plan's micro-batches after the
    first `share_samples` samples are stand-ins (all of them when it is 0: the rank has no samples
    in the step): they run with weight 0, only to join the collectives. Returns the sum of
    per-sample losses on this rank (for logging; on the loss's device, so nothing waits for the
    GPU here). `amp`: a spot.precision.MixedPrecision (autocast for the forward, a scaled backward)."""
    total = torch.zeros(())
    counted = 0  # the plan's first micro-batches hold the share; stand-ins (if any) follow
    for i, indices in enumerate(plan):
        last = i == len(plan) - 1
        real = counted < share_samples
        counted += len(indices) if real else 0
        no_sync = getattr(model, "no_sync", None)
        with nullcontext() if last or no_sync is None else no_sync():
            with amp.autocast() if amp else nullcontext():
                loss = loss_fn(model, next(batches))
            weight = len(indices) * world.world_size / step_samples if real else 0.0
            weighted = loss if weight == 1 else loss * weight
            (amp.scale(weighted) if amp else weighted).backward()
        if real:
            total = total.to(loss.device) + loss.detach().float() * len(indices)
    return total
