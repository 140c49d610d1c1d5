"""A sharded (FSDP2) checkpoint resumed at 2 -> 3 -> 1 ranks loads exactly the model and
optimizer state that was saved: real gloo ranks (spawned processes on loopback) shard a tiny GPT
with `fully_shard` (each Block, then the root), train it, and save through CheckpointManager with
a ShardGroup, every rank its own shards; fresh models (another init) at 3 ranks, then at 1 rank
(no process group at all), load it through TrainingState and DCP's resharding. Before the save
and after each load the FULL state is gathered (get_state_dict, full_state_dict=True): bitwise
equal every time. The train.py-level runs: tests/e2e/test_fsdp.py."""

from __future__ import annotations

import json
import traceback
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from models.gpt import GPT
from spot.checkpoint.manager import CheckpointManager, list_step_dirs
from spot.checkpoint.sharded import ShardGroup
from spot.checkpoint.state import TrainingState
from spot.distributed import fsdp
from spot.distributed import world as distributed
from spot.distributed.sampler import ResumableBatchSampler
from spot.run.events import EventLog
from spot.tree import first_difference
from tests.helpers import assert_bitwise_equal, free_port, gloo_world

pytestmark = [
    pytest.mark.slow,
    # torch.distributed.checkpoint says so on every save and load without a process group
    pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning"),
]

SIZES = {"vocab_size": 256, "block_size": 16, "n_layer": 2, "n_head": 2, "n_embd": 32}
STEP = 3  # the step every checkpoint here is saved at
DATASET, BATCH = 96, 4  # the sampler's (its position travels with the checkpoint)


def gpt(seed: int) -> GPT:
    torch.manual_seed(seed)
    return GPT(**SIZES, dropout=0.0)


def training_state(model, rank: int, world_size: int, lr: float = 0.01) -> TrainingState:
    """lr: a fresh one's other than the saved one's, so a load that left the optimizer's
    hyper-parameters (param_groups) behind would show."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=lr * 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    sampler = ResumableBatchSampler(DATASET, BATCH, seed=0, rank=rank, world_size=world_size)
    return TrainingState(
        model, optimizer, scheduler, sampler, rank=rank, world_size=world_size, sharded=True
    )


def train_step(state: TrainingState, rank: int, step: int) -> None:
    """One optimizer step on this rank's own deterministic batch (no dropout)."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    tokens = torch.randint(0, SIZES["vocab_size"], (BATCH, SIZES["block_size"] + 1), generator=g)
    logits = state.model(tokens[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    state.optimizer.step()
    state.scheduler.step()


def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The whole model and optimizer state, gathered on rank 0 (empty dicts on the others):
    every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state, optimizer_state = get_state_dict(model, optimizer, options=options)
    return {"model": model_state, "optimizer": optimizer_state}


def manager(root: Path, shards: ShardGroup, leader: bool) -> CheckpointManager:
    return CheckpointManager(
        root,
        keep_last=2,
        async_save=True,
        on_corrupt="fail",
        events=EventLog(root.parent / f"events-{shards.rank}.jsonl" if leader else None),
        meta={"config_digest": "x", "training_config": {}},
        shards=shards,
    )


def save(state: TrainingState, world, root: Path) -> None:
    """Every rank, together: the state through a manager of its own (rank 0's commits)."""
    group = ShardGroup(world.background_group(), world.rank, world.share)
    checkpoints = manager(root, group, world.is_leader)
    checkpoints.save(STEP, state.state_dict(), {"reason": "test"})
    checkpoints.wait()
    checkpoints.close()


def load(state: TrainingState, group, path: Path) -> None:
    loaded = CheckpointManager.load(path)  # every file verified first (shards streamed)
    assert loaded.manifest.sharded and set(loaded.state) == {"scheduler", "trainer"}
    state.load_state_dict(loaded.state, shards=path, group=group)
    assert state.step == STEP


# ---- the phases at 2 and 3 ranks, each rank a spawned process -------------------------------


def _two_ranks(world, out: Path) -> dict:
    """Train, gather the full state (rank 0 keeps it), save; then train on, while the
    checkpoint is written in the background, so a checkpoint of the live tensors would differ."""
    model = fsdp.shard(gpt(0), world.train, torch.device("cpu"), ["Block"], True, "32")
    assert fsdp.is_sharded(model)
    state = training_state(model, world.rank, 2)
    for step in range(STEP):
        train_step(state, world.rank, step)
    state.step = STEP
    saved = full_state(model, state.optimizer)
    if world.is_leader:
        torch.save(saved, out / "saved.pt")
    group = ShardGroup(world.background_group(), world.rank, world.share)
    checkpoints = manager(out / "two", group, world.is_leader)
    checkpoints.save(STEP, state.state_dict(), {"reason": "test"})
    train_step(state, world.rank, STEP)  # during the background write
    checkpoints.wait()
    checkpoints.close()
    after = full_state(model, state.optimizer)
    return {"moved_on": world.is_leader and first_difference(saved, after) is not None}


def _three_ranks(world, out: Path) -> dict:
    """A fresh model (another init) loads the 2-rank checkpoint; gathered, it is the saved
    state. Then it is saved again, by these 3 ranks."""
    model = fsdp.shard(gpt(1), world.train, torch.device("cpu"), ["Block"], True, "32")
    state = training_state(model, world.rank, 3, lr=0.02)
    saved = torch.load(out / "saved.pt", weights_only=True) if world.is_leader else None
    before = full_state(model, state.optimizer)
    (_, path), *_ = list_step_dirs(out / "two")
    load(state, world.background_group(), path)
    after = full_state(model, state.optimizer)
    save(state, world, out / "three")
    if not world.is_leader:
        return {}
    return {
        "fresh_differs": first_difference(saved, before) is not None,
        "difference": first_difference(saved, after, "at 3 ranks"),
    }


PHASES = {"two": _two_ranks, "three": _three_ranks}


def _rank(rank: int, world_size: int, port: int, out: str, phase: str) -> None:
    """A spawned rank: its result (or its traceback) into a file, then out without the
    interpreter's teardown (see spot.distributed.world.exit_process)."""
    code = 0
    try:
        torch.set_num_threads(1)
        world = gloo_world(rank, world_size, port)
        result = PHASES[phase](world, Path(out))
        Path(out, f"{phase}-{rank}.json").write_text(json.dumps(result))
    except BaseException:
        Path(out, f"{phase}-{rank}.error").write_text(traceback.format_exc())
        code = 1
    distributed.exit_process(code)


def spawn(phase: str, world_size: int, out: Path) -> list[dict]:
    try:
        mp.start_processes(
            _rank,
            args=(world_size, free_port(), str(out), phase),
            nprocs=world_size,
            start_method="spawn",
        )
    except mp.ProcessExitedException:
        errors = sorted(out.glob(f"{phase}-*.error"))
        raise AssertionError("\n".join(p.read_text() for p in errors) or "a rank died") from None
    return [json.loads((out / f"{phase}-{r}.json").read_text()) for r in range(world_size)]


def test_resume_at_two_three_one_ranks_loads_the_saved_state_bitwise(tmp_path):
    two = spawn("two", 2, tmp_path)
    assert two[0]["moved_on"]  # the live state changed during the write: the test can see it
    saved = torch.load(tmp_path / "saved.pt", weights_only=True)
    assert len(saved["model"]) == len(dict(gpt(0).named_parameters()))
    assert len(saved["optimizer"]["state"]) == len(saved["model"])  # AdamW's moments: all there

    three = spawn("three", 3, tmp_path)
    assert three[0]["fresh_differs"]  # the fresh model and optimizer are not the saved ones
    assert three[0]["difference"] is None, three[0]["difference"]
    (_, path), *_ = list_step_dirs(tmp_path / "three")
    files = CheckpointManager.load(path).manifest.files
    assert {f["rank"] for n, f in files.items() if n.endswith(".distcp")} == {0, 1, 2}

    # 1 rank: no process group at all; the plain module loads the 3 ranks' shards
    assert not torch.distributed.is_initialized()
    state = training_state(gpt(2), 0, 1, lr=0.03)
    assert first_difference(saved, full_state(state.model, state.optimizer)) is not None
    load(state, None, path)
    assert_bitwise_equal(saved, full_state(state.model, state.optimizer), "at 1 rank")

    # gathered whole in one process, as export and init.checkpoint read it
    whole = CheckpointManager.load(path, whole=True).state
    assert_bitwise_equal(saved["model"], whole["model"], "whole model")
    assert_bitwise_equal(saved["optimizer"], whole["optimizer"], "whole optimizer")

    # and a world of one writes it back in the same format, which loads the same again
    root = tmp_path / "one"
    checkpoints = manager(root, ShardGroup(None, 0), True)
    checkpoints.save(STEP, state.state_dict(), {"reason": "test"})
    checkpoints.wait()
    (_, path), *_ = list_step_dirs(root)
    again = training_state(gpt(3), 0, 1, lr=0.04)
    load(again, None, path)
    assert_bitwise_equal(saved, full_state(again.model, again.optimizer), "1 rank, again")
