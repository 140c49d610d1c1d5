"""Defects that could lose work or stop a run that should go on, in real runs: one commit per
step; a checkpoint that does not fit the model; a save on rank 0 slower than the collective
timeout. The others: tests/unit/test_lost_work.py."""

from __future__ import annotations

import time

import pytest

from spot.checkpoint.manager import list_step_dirs
from spot.run.events import read_events
from spot.run.exitcodes import EXIT_CHECKPOINT_UNUSABLE
from tests.helpers import (
    FAST,
    committed_steps,
    run_dir_of,
    run_train,
    run_until_failpoint,
    train_env,
)

# ---- 3: one commit per step ------------------------------------------------------------------


@pytest.mark.slow
def test_each_step_is_committed_once_in_an_epoch_bounded_run(tmp_path):
    """The last step of an epoch-bounded run is also an interval step: one commit, not two (the
    second used to delete the first before putting its own in place). And it is the end: the
    final evaluation and the final log line come at that step (issue 21, item 8)."""
    args = [
        *FAST,
        "trainer.max_steps=null",
        "trainer.max_epochs=2",
        "data.dataset.size=512",
        "checkpoint.every_steps=4",
        "eval.every_steps=6",
        f"run.root={tmp_path}",
    ]
    result = run_train(args)
    assert result.returncode == 0, result.stderr
    events_path = run_dir_of(tmp_path) / "events.jsonl"
    assert committed_steps(events_path) == [4, 8, 12, 16]
    events = read_events(events_path)
    assert [e["step"] for e in events if e["event"] == "eval"] == [6, 12, 16]
    assert [e["step"] for e in events if e["event"] == "train"] == [16]


# ---- 11: a checkpoint that vanishes while resuming ----------------------------------------------


@pytest.mark.slow
def test_a_checkpoint_that_does_not_fit_the_edited_model_exits_3(tmp_path, markers):
    """The model's code changed, not its config (same digest): the checkpoint is refused whole
    with one line and exit 3, not a traceback, and nothing is written over it."""
    args = [
        *FAST,
        "trainer.max_steps=30",
        "checkpoint.every_steps=10",
        "model._target_=tests.edited_model.EditedMLP",
        f"run.root={tmp_path}",
    ]
    run_until_failpoint(args, "checkpoint.committed@step=10", markers)
    run_dir = run_dir_of(tmp_path)
    result = run_train(args, env=train_env(EDITED_MLP_HIDDEN="48"))
    assert result.returncode == EXIT_CHECKPOINT_UNUSABLE, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("checkpoint error:")]
    assert "does not fit" in line and "vs (48" in line, line
    unusable = [
        e for e in read_events(run_dir / "events.jsonl") if e["event"] == "checkpoint_unusable"
    ]
    assert len(unusable) == 1
    assert [s for s, _ in list_step_dirs(run_dir / "checkpoints")] == [10]


# ---- 6: a save on rank 0 slower than the collective timeout ------------------------------------


@pytest.mark.slow
@pytest.mark.serial
def test_a_save_slower_than_the_collective_timeout_does_not_fail_the_group(tmp_path):
    """Two ranks, synchronous saves that take 2x the collective timeout on rank 0: the other rank
    waits for it on the long-timeout group, no collective times out, nothing restarts."""
    args = [
        *FAST,
        "trainer.max_steps=20",
        "checkpoint.every_steps=10",
        "checkpoint.async_save=false",
        "elastic.nproc_per_node=2",
        "elastic.monitor_interval_seconds=0.1",
        "elastic.collective_timeout_seconds=2",
        "elastic.max_restarts=1",
        f"run.root={tmp_path}",
    ]
    env = train_env(SPOT_FAILPOINTS="checkpoint.component_written@sleep=1")  # 4 s a save
    began = time.monotonic()
    result = run_train(args, env=env, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    events = read_events(run_dir_of(tmp_path) / "events.jsonl")
    assert [e["restart"] for e in events if e["event"] == "start"] == [0]
    assert committed_steps(run_dir_of(tmp_path) / "events.jsonl") == [10, 20]
    assert time.monotonic() - began > 2 * 4  # the saves really were that slow
