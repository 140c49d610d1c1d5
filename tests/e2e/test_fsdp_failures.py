"""A sharded checkpoint that fails on one rank only (real gloo ranks, FSDP2): every rank takes the
same collectives and reaches the same outcome. With on_error=continue both go on and the next
checkpoint commits whole; with on_error=stop both raise at the same save."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from spot import failpoints
from spot.checkpoint.manager import CheckpointManager, CheckpointWriteError, list_step_dirs
from spot.checkpoint.sharded import ShardGroup
from spot.checkpoint.state import TrainingState
from spot.distributed import fsdp
from spot.distributed import world as distributed
from spot.distributed.sampler import ResumableBatchSampler
from spot.run.events import EventLog
from tests.helpers import free_port, gloo_world

pytestmark = pytest.mark.slow


def _rank(rank: int, port: int, out: str, on_error: str) -> None:
    world = gloo_world(rank, 2, port)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))
    model = fsdp.shard(model, world.train, torch.device("cpu"), ["Linear"], True, "fp32")
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    model(torch.ones(2, 8)).sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    sampler = ResumableBatchSampler(64, 8, seed=0, rank=rank, world_size=2)
    state = TrainingState(
        model, optimizer, scheduler, sampler, rank=rank, world_size=2, sharded=True
    )
    root = Path(out)
    manager = CheckpointManager(
        root / "checkpoints",
        keep_last=3,
        async_save=True,
        on_corrupt="fail",
        on_error=on_error,
        events=EventLog(root / "events.jsonl" if rank == 0 else None),
        meta={"config_digest": "x", "world_size": 2},
        shards=ShardGroup(world.background_group(), rank, world.share),
    )
    failpoints.arm("checkpoint.persist@step=2@rank=1@raise")  # rank 1 alone cannot write step 2
    raised = None
    try:
        for step in (1, 2, 3):
            state.step = step
            manager.save(step, state.state_dict(), {"reason": "interval"})
        manager.wait()
    except CheckpointWriteError:
        raised = state.step
    Path(out, f"rank-{rank}.json").write_text(json.dumps({"raised": raised}))
    distributed.exit_process(0)


@pytest.mark.parametrize(
    "on_error, raised, committed", [("continue", None, [3, 1]), ("stop", 3, [1])]
)
def test_a_write_failing_on_one_rank_ends_the_same_on_every_rank(
    tmp_path, on_error, raised, committed
):
    mp.start_processes(
        _rank, args=(free_port(), str(tmp_path), on_error), nprocs=2, start_method="spawn"
    )
    outcomes = [json.loads((tmp_path / f"rank-{r}.json").read_text())["raised"] for r in (0, 1)]
    assert outcomes == [raised, raised]
    steps = [step for step, _ in list_step_dirs(tmp_path / "checkpoints")]
    assert steps == committed
    for step, path in list_step_dirs(tmp_path / "checkpoints"):
        assert CheckpointManager.load(path, whole=True).step == step  # whole: every rank's part
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
