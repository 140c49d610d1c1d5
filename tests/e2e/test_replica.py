"""A node-local emergency copy is rank 0's checkpoint, byte for byte (issue 21, item 11): two real
gloo ranks train the CNN under DDP on different samples, so their batch-norm running statistics
differ; the emergency checkpoint rank 0 commits on its disk and the one rank 1 commits on its
own disk (a node that stays) must hold the same bytes in every file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from spot.checkpoint import manifest
from spot.checkpoint.best import BestCheckpoint
from spot.checkpoint.checkpointer import Checkpointer
from spot.checkpoint.interval import CheckpointSchedule
from spot.checkpoint.manager import CheckpointManager, list_step_dirs
from spot.checkpoint.state import TrainingState, unwrap
from spot.distributed import world as distributed
from spot.distributed.sampler import ResumableBatchSampler
from spot.run.config import CheckpointConfig, CloudConfig
from spot.run.events import EventLog
from tests.helpers import free_port, gloo_world


def _rank(rank: int, port: int, out: str) -> None:
    from models.cnn import SmallCNN

    world = gloo_world(rank, 2, port)
    torch.manual_seed(0)
    model = world.wrap(SmallCNN(in_channels=1, num_classes=3, dropout=0.0), torch.device("cpu"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    torch.manual_seed(100 + rank)  # each rank its own samples: its own running statistics
    for _ in range(2):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(
            model(torch.randn(8, 1, 8, 8)), torch.randint(0, 3, (8,))
        )
        loss.backward()
        optimizer.step()
    sampler = ResumableBatchSampler(64, 8, seed=0, rank=rank, world_size=2)
    state = TrainingState(model, optimizer, scheduler, sampler, step=2, rank=rank, world_size=2)
    root = Path(out, f"disk-{rank}")
    events = EventLog(root / "events.jsonl" if rank == 0 else None)
    disk = CheckpointManager(
        root / "checkpoints",
        keep_last=2,
        async_save=False,
        on_corrupt="fail",
        events=events,
        meta={"config_digest": "x", "world_size": 2},
    )
    checkpointer = Checkpointer(
        world,
        state,
        CheckpointSchedule(CheckpointConfig(every_steps=100), 0.0, events),
        events,
        CloudConfig(),
        manager=disk if rank == 0 else None,
        replica=disk if rank == 1 else None,
        best=BestCheckpoint(None, events),
    )
    notice = {"source": "test", "kind": "notice", "received_at": 0.0, "deadline": None}
    checkpointer.emergency([notice, None], keep_here=True)
    running_mean = unwrap(model).features[1].running_mean
    Path(out, f"rank-{rank}.json").write_text(json.dumps({"running_mean": running_mean.tolist()}))
    distributed.exit_process(0)


@pytest.mark.serial
def test_the_replica_is_rank_zeros_checkpoint_byte_for_byte(tmp_path):
    port = free_port()
    mp.start_processes(_rank, args=(port, str(tmp_path)), nprocs=2, start_method="spawn")
    means = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert means[0] != means[1]  # the live buffers differ: the test can see a wrong copy
    (step0, leader), (step1, replica) = (
        list_step_dirs(tmp_path / f"disk-{r}" / "checkpoints")[0] for r in (0, 1)
    )
    assert step0 == step1 == 2
    files = [manifest.verify(path).files for path in (leader, replica)]
    assert files[0] == files[1]  # every file's name, size and checksum
    for name in files[0]:
        assert (leader / name).read_bytes() == (replica / name).read_bytes(), name
