"""Evaluation on the validation split (`data.val`, `eval.every_steps`, `eval.max_batches`).

It must leave training exactly as it was, so that a run with evaluation trains bitwise the same
as one without, and a resumed run reports the same figures at the same steps:
- it draws from no training RNG (run inside `torch.random.fork_rng`, data in a fixed order) and
  never touches the training sampler;
- it runs the bare module (no DDP wrapper: no buffer broadcast, no collective per batch, so
  ranks with shards of different lengths cannot deadlock), in eval mode, without gradients;
- each rank takes every world_size-th sample of the first `max_batches * batch_size * world`;
  the sums are reduced over ranks in one all-reduce at the end.
An interruption notice stops it at once (between batches); the figures are then dropped, and the
loop takes the emergency checkpoint at the step boundary it is at.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch.utils.data import DataLoader, Dataset

from spot.checkpoint.state import unwrap
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
    over the validation split of every rank: per `count` if `batch_fn` gives one (targets, for a
    per-token loss), else per sample; None if an interruption stopped it."""
    began = time.perf_counter()
    limit = len(dataset) if max_batches is None else max_batches * batch_size * world.world_size
    indices = list(range(world.rank, min(limit, len(dataset)), world.world_size))
    loader = DataLoader(dataset, batch_size=batch_size, sampler=indices, num_workers=0)
    module = unwrap(model)
    was_training = module.training
    sums: dict[str, torch.Tensor] = {}
    stopped = False
    devices = [torch.cuda.current_device()] if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        module.eval()
        try:
            for batch in loader:
                if interrupted():
                    stopped = True
                    break
                failpoint("eval.batch", world.rank)
                for name, value in batch_fn(module, batch).items():
                    sums[name] = sums.get(name, 0) + value.detach().double().cpu()
        finally:
            module.train(was_training)
    # The figures' names are rank 0's (a rank whose shard is empty, or that stopped before its
    # first batch, has none), so every rank reduces the same list.
    names = world.share(sorted(sums))
    totals = [float(sums.get(n, 0.0)) for n in names] + [len(indices), float(stopped)]
    totals = world.sums(totals)
    if totals[-1] or not totals[-2]:
        return None
    samples = totals[-2]
    sums_all = dict(zip(names, totals, strict=False))
    count = sums_all.pop("count", samples)
    figures = {n: v / count for n, v in sums_all.items()}
    return {**figures, "samples": int(samples), "seconds": round(time.perf_counter() - began, 6)}
