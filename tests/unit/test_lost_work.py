"""Defects that could lose work or stop a run that should go on: never a commit over a committed
one; a failed measuring save under young_daly; absurd sizes in a manifest; a checkpoint deleted
while it was being listed; the LR schedule after a world-size change; each rank's own CUDA
generator; a worker whose agent died while it started. In real runs (one commit per step, a
checkpoint that does not fit the model, a save on rank 0 slower than the collective timeout):
tests/e2e/test_lost_work.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from spot.checkpoint import rng
from spot.checkpoint.interval import CheckpointSchedule
from spot.checkpoint.manager import CheckpointManager, SaveKind
from spot.checkpoint.manifest import verify
from spot.distributed.sampler import ResumableBatchSampler
from spot.run.config import CheckpointConfig
from spot.run.events import EventLog, read_events
from spot.run.schedule import TrainingLength, set_position, warmup_cosine
from tests.helpers import committed_steps, rewrite_manifest

DIGEST = "d" * 16
STATE = {"model": {"w": torch.arange(8.0)}, "optimizer": {}, "scheduler": {}, "trainer": {}}


def manager(root: Path, events: EventLog | None = None, **kwargs) -> CheckpointManager:
    options = {"keep_last": 3, "async_save": False, "on_corrupt": "previous"} | kwargs
    return CheckpointManager(
        root,
        events=events or EventLog(root.parent / "events.jsonl"),
        meta={"config_digest": DIGEST, "training_config": {}},
        **options,
    )


# ---- 3: one commit per step ------------------------------------------------------------------


@pytest.mark.parametrize("async_save", [False, True])
def test_saving_a_step_again_keeps_the_one_committed(tmp_path, async_save):
    """The same step asked twice of one manager (the second a final one) commits once; a new
    process asked for a step already committed and verified keeps that one untouched."""
    root = tmp_path / "ck"
    first = manager(root, async_save=async_save)
    first.save(5, STATE, {})
    first.save(5, {**STATE, "model": {"w": torch.zeros(8)}}, {}, kind=SaveKind.LAST)
    first.close()
    assert committed_steps(tmp_path / "events.jsonl") == [5]
    committed = root / "step-000000005"
    inode = committed.stat().st_ino
    assert torch.equal(CheckpointManager.load(committed).state["model"]["w"], torch.arange(8.0))

    again = manager(root, async_save=async_save)  # another process, same step
    again.save(5, {**STATE, "model": {"w": torch.zeros(8)}}, {}, kind=SaveKind.LAST)
    again.close()
    assert committed.stat().st_ino == inode  # never renamed away, never replaced
    assert torch.equal(CheckpointManager.load(committed).state["model"]["w"], torch.arange(8.0))
    assert not [p for p in root.iterdir() if p.name.startswith(".")]


def test_an_uncommitted_leftover_at_a_step_is_replaced(tmp_path):
    root = tmp_path / "ck"
    leftover = root / "step-000000005"
    leftover.mkdir(parents=True)
    (leftover / "model.bin").write_bytes(b"half written, no manifest")
    m = manager(root)
    m.save(5, STATE, {})
    assert verify(leftover).step == 5


# ---- 5: young_daly after a failed save ---------------------------------------------------------


def test_young_daly_retries_a_failed_measuring_save_and_then_measures(tmp_path):
    """on_error=continue: the first save (the one that measures the cost) fails; the schedule
    tries again on the fixed interval instead of never, and the next success sets the interval."""
    events = EventLog(tmp_path / "events.jsonl")
    root = tmp_path / "ck"
    root.parent.mkdir(exist_ok=True)
    root.write_text("a file where the checkpoint directory should be: every save fails")
    m = manager(root, events, on_error="continue")
    cfg = CheckpointConfig(every_steps=3, every_minutes=None, policy="young_daly")
    schedule = CheckpointSchedule(cfg, interruption_rate_per_hour=60.0, events=events)
    schedule.start(0)
    saved_at = []
    for step in range(1, 12):
        if schedule.due(step):
            if step == 4:
                root.unlink()  # the disk has room again
            m.save(step, STATE, {})
            schedule.saved(step)
            saved_at.append(step)
            for done, stall, persist in m.measurements():
                schedule.measured(stall, persist, done)
    records = read_events(tmp_path / "events.jsonl")
    assert [e["step"] for e in records if e["event"] == "checkpoint_failed"] == [1]
    assert saved_at[:2] == [1, 4]  # retried every_steps=3 later
    (interval,) = [e for e in records if e["event"] == "checkpoint_interval"]
    assert interval["step"] == 4
    assert schedule.interval_seconds == pytest.approx(interval["interval_seconds"], abs=1e-3)
    expected = max((2 * interval["stall_seconds"] * 3600 / 60) ** 0.5, interval["persist_seconds"])
    assert interval["interval_seconds"] == pytest.approx(expected, rel=1e-3)


# ---- 7: absurd sizes in a manifest -------------------------------------------------------------


@pytest.mark.parametrize("claimed", [2**46, -1, True])
def test_absurd_sizes_in_a_manifest_make_it_corrupt_not_a_crash(tmp_path, claimed):
    root = tmp_path / "ck"
    m = manager(root)
    m.save(1, STATE, {})
    m.save(2, STATE, {})

    def claim(files):
        files["model.bin"] = {**files["model.bin"], "bytes": claimed}

    rewrite_manifest(root / "step-000000002", claim)  # self-consistent: its own digest is redone
    loaded = manager(root).load_latest(DIGEST, {})
    assert loaded is not None and loaded.step == 1
    (skipped,) = [
        e
        for e in read_events(tmp_path / "events.jsonl")
        if e["event"] == "corrupt_checkpoint_skipped"
    ]
    assert skipped["step"] == 2 and "model.bin" in skipped["reason"]


# ---- 11: a checkpoint that vanishes while resuming ----------------------------------------------


def test_a_checkpoint_deleted_while_listed_is_skipped_quietly(tmp_path):
    """Retention (the uploader's thread) deletes a checkpoint that load_latest had just listed:
    it is gone, not corrupt; the next one is used."""
    root = tmp_path / "ck"
    m = manager(root)
    for step in (1, 2, 3):
        m.save(step, STATE, {})

    class Racing(CheckpointManager):
        def load(self, path):  # retention wins the race for the newest one
            if path.name == "step-000000003":
                os.rename(path, path.with_name(".trash-step-000000003"))
            return super().load(path)

    racing = Racing(
        root,
        keep_last=3,
        async_save=False,
        on_corrupt="previous",
        events=EventLog(tmp_path / "events.jsonl"),
        meta={"config_digest": DIGEST},
    )
    loaded = racing.load_latest(DIGEST, {})
    assert loaded is not None and loaded.step == 2
    assert not [e for e in read_events(tmp_path / "events.jsonl") if "corrupt" in e["event"]]
    racing._quarantine(root / "step-000000003")  # and moving aside a vanished one is no error


# ---- 9: the LR schedule's length after a world-size change -------------------------------------


def _train_schedule(world_sizes: dict[int, int], *, dataset: int = 512, batch: int = 64):
    """Drive a real warmup-cosine LambdaLR over an epoch-bounded run (2 epochs, scale_lr: the
    global batch follows the world size) whose world size changes at the given steps, the way
    train.py advances it. Returns the LR after each step."""
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    first = world_sizes[0]
    sampler = ResumableBatchSampler(dataset, batch, seed=0, world_size=first)
    schedule_steps = 2 * sampler.steps_per_epoch()  # the first attempt's estimate, as train.py
    scheduler = warmup_cosine(optimizer, schedule_steps, warmup_steps=2, min_ratio=0.1)
    length = TrainingLength(None, 2, dataset, schedule_steps)
    step, lrs = 0, []
    while sampler.epoch < 2:
        if step in world_sizes:  # a restart at another world size: the position is kept
            position = sampler.state_dict()
            sampler = ResumableBatchSampler(dataset, batch, seed=0, world_size=world_sizes[step])
            sampler.load_state_dict(position)
        optimizer.step()
        step += 1
        sampler.advance()
        set_position(scheduler, length.position(step, sampler.epoch, sampler.consumed))
        lrs.append(scheduler.get_last_lr()[0])
        if sampler.epoch_finished:
            sampler.next_epoch()
    return lrs


@pytest.mark.parametrize("sizes", [{0: 1, 3: 2}, {0: 2, 2: 1}, {0: 1, 3: 4, 5: 1}])
def test_lr_schedule_ends_with_training_whatever_the_world_sizes(sizes):
    lrs = _train_schedule(sizes)
    assert lrs[-1] == pytest.approx(0.1, rel=1e-12)  # the floor, exactly at the last step
    assert all(lr > 0.1 + 1e-9 for lr in lrs[:-1])  # and not before
    after_warmup = lrs[1:]
    assert all(a >= b for a, b in zip(after_warmup, after_warmup[1:], strict=False))


def test_lr_schedule_position_is_the_step_at_one_world_size():
    """At one world size the position is the step count itself: the LRs are what
    scheduler.step() gives, so runs without a world-size change are unchanged."""
    length = TrainingLength(None, 2, 512, schedule_steps=16)
    assert [length.position(s, s // 8, (s % 8) * 64) for s in range(17)] == list(range(17))
    assert TrainingLength(100, None, 512, 100).position(37, 4, 0) == 37
    model = torch.nn.Linear(2, 2)
    a, b = (torch.optim.SGD(model.parameters(), lr=1.0) for _ in range(2))
    stepped, placed = (warmup_cosine(o, 16, warmup_steps=3, min_ratio=0.1) for o in (a, b))
    for s in range(1, 17):
        a.step()
        stepped.step()
        set_position(placed, s)
        assert stepped.get_last_lr() == placed.get_last_lr()  # bit for bit


# ---- 10: each rank's own CUDA generator -------------------------------------------------------


def test_each_rank_restores_its_own_cuda_generator():
    own = torch.arange(16, dtype=torch.uint8)
    assert rng.own_cuda_state(own, device_index=3) is own  # its own, whatever device it is on now
    every_device = [torch.full((16,), d, dtype=torch.uint8) for d in range(4)]
    assert rng.own_cuda_state(every_device, device_index=2) is every_device[2]  # older format
    assert rng.own_cuda_state(every_device[:2], device_index=3) is every_device[0]
    assert rng.own_cuda_state(None, device_index=0) is None
    if not torch.cuda.is_available():
        assert "cuda" not in rng.capture()  # nothing to restore on a machine without CUDA
        return
    torch.cuda.init()
    captured = rng.capture()
    assert isinstance(captured["cuda"], torch.Tensor)  # one generator: this rank's device
    expected = torch.rand(4, device="cuda")
    rng.restore(captured)
    assert torch.equal(torch.rand(4, device="cuda"), expected)


# ---- a worker whose agent died while it was starting -------------------------------------------


@pytest.mark.parametrize("agent_alive", [True, False])
def test_a_worker_whose_agent_died_during_its_start_dies_too(agent_alive):
    """The agent's pid comes from the agent, not from os.getppid() after the worker's imports
    (by then an orphan's parent is already init): a worker that lost its agent before it could
    watch for that kills itself instead of training on unsupervised."""
    import subprocess
    import sys

    agent = os.getpid() if agent_alive else 2**22 + 1  # this test process is the real parent
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "from spot.distributed.world import die_with_agent as d; d(); print(1)",
        ],
        env={**os.environ, "SPOT_AGENT_PID": str(agent)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    if agent_alive:
        assert result.returncode == 0 and result.stdout == "1\n", result.stderr
    else:
        assert result.returncode == -9 and result.stdout == ""
