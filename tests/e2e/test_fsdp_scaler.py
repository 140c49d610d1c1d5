"""fp16 with trainer.strategy=fsdp: each rank holds only its shard of the gradients, so an inf in
one rank's shard must make every rank skip the step (real gloo ranks, FSDP2). torch's GradScaler
does: its inf check on a DTensor gradient is reduced over the mesh, so the scaler the template
uses for DDP is right for FSDP2 as it is (FSDP1's ShardedGradScaler is not needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from spot.distributed import fsdp
from spot.distributed import world as distributed
from spot.precision import MixedPrecision
from tests.helpers import free_port, gloo_world

pytestmark = pytest.mark.slow


def _rank(rank: int, port: int, out: str) -> None:
    world = gloo_world(rank, 2, port)
    torch.manual_seed(0)
    model = fsdp.shard(torch.nn.Linear(8, 8), world.train, torch.device("cpu"), [], True, "fp16")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    amp = MixedPrecision("fp16", torch.device("cpu"))
    amp.scale(model(torch.ones(2, 8)).float().sum()).backward()
    if rank == 1:  # an overflow in rank 1's shard of the gradients only
        model.weight.grad.to_local()[0, 0] = float("inf")
    amp.unscale(optimizer)
    skipped = amp.step(optimizer)
    Path(out, f"rank-{rank}.json").write_text(json.dumps({"skipped": skipped}))
    distributed.exit_process(0)


def test_an_overflow_in_one_ranks_shard_skips_the_step_on_every_rank(tmp_path):
    mp.start_processes(_rank, args=(free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    skipped = [json.loads((tmp_path / f"rank-{r}.json").read_text())["skipped"] for r in (0, 1)]
    assert skipped == [True, True]
