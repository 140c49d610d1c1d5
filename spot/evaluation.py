"""Evaluation on the validation split (`data.val`, `eval.every_steps`, `eval.max_batches`).

It must leave training exactly as it was, so that a run with evaluation trains bitwise the same
as one without, and a resumed run reports the same figures at the same steps:
- every RNG a checkpoint captures (Python's, numpy's, torch's, this rank's CUDA generator) is
  put back afterwards, so a data set that draws from any of them moves no training stream; data
  come in a fixed order, never from the training sampler;
- it runs the bare module (no DDP wrapper: no buffer broadcast), in eval mode, without gradients.

The samples are the same at every world size: the first `max_batches * batch_size` of the split
(all of it when `max_batches` is null), rank r taking every world_size-th from the r-th, so an
elastic resize compares figures over the same samples. The sums are reduced in one all-reduce.

An interruption notice is heard by one rank (per node); every rank must stop at once, not when
its own split ends. So every rank runs the same number of rounds (the most any rank has, known
without communication: rank 0's), a rank whose share has run out computes nothing, and each
round the ranks agree on a stop in a one-integer all-reduce that runs while the batch computes:
a notice heard during a batch stops every rank after the next one.
A stop drops the figures (they would cover part of the split); the loop then takes the
emergency checkpoint at the step boundary it is at.

A sharded model (trainer.strategy=fsdp) gathers its parameters from every rank in each forward:
there every rank runs a forward in every round, a rank without a batch of its own (or one that
heard the notice) on a stand-in whose figures are dropped.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from spot.checkpoint import rng
from spot.checkpoint.state import unwrap
from spot.distributed.fsdp import is_sharded
from spot.distributed.world import World
from spot.failpoints import failpoint


def evaluate(
    model: torch.nn.Module,
    dataset: Dataset,
    batch_fn: Callable[[torch.nn.Module, object], dict[str, torch.Tensor]],
    world: World,
    *,
    batch_size: int,
    max_batches: int | None,
    interrupted: Callable[[], bool],
) -> dict[str, float] | None:
    """The mean of each figure `batch_fn` sums over a batch ({"loss": ..., "accuracy": ...}),
    over the validation subset: per `count` if `batch_fn` gives one (targets, for a per-token
    loss), else per sample; None if an interruption notice (on any rank) stopped it."""
    began = time.perf_counter()
    indices, rounds = share(len(dataset), batch_size, max_batches, world)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=indices, num_workers=0)
    sums: dict[str, torch.Tensor] = {}
    with evaluating(model) as module:
        every_rank_computes = is_sharded(module)
        batches = iter(loader)  # draws its base seed from torch's generator
        for i in range(rounds):
            heard = bool(interrupted())
            agreed = world.agree_later(heard)  # in flight while this batch computes
            batch = None if heard else next(batches, None)
            if batch is None and every_rank_computes:  # the others' forward needs this rank's
                batch_fn(module, first_batch(dataset, batch_size))  # shards: computed, dropped
            elif batch is not None:
                failpoint("eval.batch", i, rank=world.rank)
                # .cpu() waits for the batch on a GPU: a stop waits for one, not a queue.
                for name, value in batch_fn(module, batch).items():
                    sums[name] = sums.get(name, 0) + value.detach().double().cpu()
            if agreed():
                return None  # every rank returns here, at the same round
    # The figures' names are rank 0's (a rank whose share is empty has none; rank 0's is not,
    # unless the split is), so every rank reduces the same list.
    names = world.share(sorted(sums))
    totals = world.sums([float(sums.get(n, 0.0)) for n in names] + [len(indices)])
    samples = totals[-1]
    if not samples:
        return None
    sums_all = dict(zip(names, totals, strict=False))
    count = sums_all.pop("count", samples)
    figures = {n: v / count for n, v in sums_all.items()}
    return {**figures, "samples": int(samples), "seconds": round(time.perf_counter() - began, 6)}


def share(
    length: int, batch_size: int, max_batches: int | None, world: World
) -> tuple[list[int], int]:
    """This rank's indices of the validation subset, and the number of rounds every rank runs
    (rank 0's batches: it has the most). `max_batches` counts batches of `batch_size` over all
    ranks, so the subset does not depend on the world size."""
    limit = length if max_batches is None else min(length, max_batches * batch_size)
    indices = list(range(world.rank, limit, world.world_size))
    return indices, math.ceil(math.ceil(limit / world.world_size) / batch_size)


def figure_names(
    model: torch.nn.Module,
    dataset: Dataset,
    batch_fn: Callable[[torch.nn.Module, object], dict[str, torch.Tensor]],
    batch_size: int,
) -> list[str]:
    """The figures evaluation reports, as metrics name them (`val/<name>`: the keys `batch_fn`
    returns, less `count`). Only running it tells: `batch_fn` on the split's first batch, with
    training untouched (before the first step, to check checkpoint.keep_best's metric)."""
    with evaluating(model) as module:
        keys = list(batch_fn(module, first_batch(dataset, batch_size)))
    return sorted(f"val/{k}" for k in keys if k != "count")


def first_batch(dataset: Dataset, batch_size: int):
    """The split's first batch (drawing from no generator)."""
    first = range(min(batch_size, len(dataset)))
    return next(iter(DataLoader(dataset, batch_size=batch_size, sampler=first)))


@contextlib.contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The bare module in eval mode, without gradients; on the way out, its mode and every
    generator a checkpoint captures are as they were (a validation set may crop or add noise
    with Python's `random` or numpy)."""
    module = unwrap(model)
    was_training = module.training
    state = rng.capture()
    try:
        with torch.no_grad():
            module.eval()
            yield module
    finally:
        module.train(was_training)
        rng.restore(state)
