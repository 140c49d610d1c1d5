"""Asynchronous checkpoints: the committed state is the state at its step though training went
on; background failures surface as configured; busy policy. In real runs: tests/e2e/test_async.py."""

from __future__ import annotations

import copy
import threading
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from spot.checkpoint import tensorfile
from spot.checkpoint.manager import (
    CheckpointManager,
    CheckpointWriteError,
    SaveKind,
    list_step_dirs,
)
from spot.checkpoint.manifest import verify
from spot.run.events import EventLog, read_events
from tests.helpers import assert_bitwise_equal

DIGEST = "a" * 16


def manager(root: Path, **kwargs) -> CheckpointManager:
    options = {"keep_last": 3, "async_save": True, "on_corrupt": "fail"} | kwargs
    return CheckpointManager(
        root,
        events=EventLog(root.parent / "events.jsonl"),
        meta={"config_digest": DIGEST},
        **options,
    )


def test_committed_state_is_the_state_at_its_step(tmp_path):
    """Save with the optimizer state deferred (copied during the next forward/backward), then
    train on: the committed files hold the state of the step they name, bit for bit."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 8))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)

    def step():
        loss = model(torch.randn(32, 64)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        return loss

    step()
    optimizer.step()
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": {},
        "trainer": {"step": 1},
    }
    expected = copy.deepcopy(state)
    m = manager(tmp_path / "ck")
    m.save(1, state, {}, defer=("optimizer", "model"))
    step()  # the next forward and backward run while the copy may still be going
    m.before_update()
    optimizer.step()  # now parameters and Adam moments change in place
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    m.close()
    loaded = m.load_latest(DIGEST, {})
    assert_bitwise_equal(expected["model"], loaded.state["model"], "model")
    assert_bitwise_equal(expected["optimizer"], loaded.state["optimizer"], "optimizer")
    assert not torch.equal(loaded.state["model"]["0.weight"], model.state_dict()["0.weight"])


def test_snapshot_buffer_is_reused_and_costs_one_copy(tmp_path):
    m = manager(tmp_path / "ck")
    state = {"model": {"w": torch.randn(1000)}, "optimizer": {}, "scheduler": {}, "trainer": {}}
    m.save(1, state, {})
    m.wait()
    first = m._buffer.data.data_ptr()
    m.save(2, {**state, "model": {"w": torch.randn(1000)}}, {})
    m.close()
    assert m._buffer.data.data_ptr() == first
    assert m.snapshot_bytes == tensorfile._align(4000, tensorfile.BLOCK)


class Gate:
    """Hold background writes until released (a unit-test stand-in for a slow disk)."""

    def __init__(self, monkeypatch):
        self.release = threading.Event()
        real = tensorfile.write_component

        def slow(*args, **kwargs):
            self.release.wait(10)
            return real(*args, **kwargs)

        monkeypatch.setattr(tensorfile, "write_component", slow)


def test_when_busy_skip_does_not_block_and_wait_does(tmp_path, monkeypatch):
    gate = Gate(monkeypatch)
    state = {"model": {"w": torch.ones(10)}, "optimizer": {}, "scheduler": {}, "trainer": {}}
    m = manager(tmp_path / "ck", when_busy="skip")
    assert m.save(1, state, {}) is not None
    assert m.save(2, state, {}) is None  # the first is still being written: skipped, no stall
    gate.release.set()
    m.close()
    assert [s for s, _ in list_step_dirs(tmp_path / "ck")] == [1]
    skipped = [
        e for e in read_events(tmp_path / "events.jsonl") if e["event"] == "checkpoint_skipped"
    ]
    assert [e["step"] for e in skipped] == [2] and m.skipped == 1


def test_when_busy_wait_blocks_until_the_previous_one_commits(tmp_path, monkeypatch):
    """when_busy=wait (the default): a checkpoint due while the one before is being written
    waits for it, then commits too; nothing is skipped."""
    gate = Gate(monkeypatch)
    state = {"model": {"w": torch.ones(10)}, "optimizer": {}, "scheduler": {}, "trainer": {}}
    m = manager(tmp_path / "ck", when_busy="wait")
    assert m.save(1, state, {}) is not None
    second = threading.Thread(target=m.save, args=(2, state, {}))
    second.start()
    second.join(timeout=0.5)
    assert second.is_alive()  # held behind step 1, which the gate holds (skip returns at once)
    gate.release.set()
    second.join(timeout=10)
    assert not second.is_alive()
    m.close()
    assert sorted(s for s, _ in list_step_dirs(tmp_path / "ck")) == [1, 2]
    assert m.skipped == 0


@pytest.mark.parametrize("on_error", ["stop", "continue"])
def test_a_checkpoint_that_must_commit_is_tried_after_the_one_before_failed(on_error, tmp_path):
    """Step 2's background write is held until step 3 (final or emergency) is asked for, then
    fails: 3 is still written and commits, whatever on_error says; 2's failure is counted."""
    from spot.failpoints import arm

    state = {"model": {"w": torch.ones(10)}, "optimizer": {}, "scheduler": {}, "trainer": {}}
    m = manager(tmp_path / "ck", on_error=on_error)
    arm("checkpoint.persist@step=2@until=checkpoint.must_commit@raise")
    try:
        m.save(1, state, {})
        m.save(2, state, {})
        m.save(3, state, {}, kind=SaveKind.LAST)
        m.close()
    finally:
        arm("")
    assert sorted(s for s, _ in list_step_dirs(tmp_path / "ck")) == [1, 3]
    failed = [
        e["step"]
        for e in read_events(tmp_path / "events.jsonl")
        if e["event"] == "checkpoint_failed"
    ]
    assert failed == [2] and m.failures == 1


def test_a_best_checkpoint_after_a_failed_one_keeps_on_error_stop(tmp_path):
    """A best checkpoint must commit too, but it is not the last one: with on_error=stop, the
    failure of the save before it stops the run there, as at any other step boundary."""
    from spot.failpoints import arm

    state = {"model": {"w": torch.ones(10)}, "optimizer": {}, "scheduler": {}, "trainer": {}}
    m = manager(tmp_path / "ck", on_error="stop")
    arm("checkpoint.persist@step=2@until=checkpoint.must_commit@raise")
    try:
        m.save(1, state, {})
        m.save(2, state, {})
        with pytest.raises(CheckpointWriteError, match="step 2"):
            m.save(3, state, {}, kind=SaveKind.MUST_COMMIT)
        m.close()
    finally:
        arm("")
    assert sorted(s for s, _ in list_step_dirs(tmp_path / "ck")) == [1]


@pytest.mark.parametrize("on_error", ["stop", "continue"])
def test_background_failure_surfaces_by_policy(on_error, tmp_path):
    state = {"model": {"w": torch.ones(10)}, "optimizer": {}, "scheduler": {}, "trainer": {}}
    root = tmp_path / "ck"
    m = manager(root, on_error=on_error)
    m.save(1, state, {})
    m.wait()
    moved = tmp_path / "moved"
    root.rename(moved)
    root.write_text("a file where the checkpoint directory was: nothing can be written there")
    m.save(2, state, {})
    deadline = time.monotonic() + 10
    raised = None
    while not m.failures and time.monotonic() < deadline:  # it reaches the loop's next poll
        try:
            m.poll()
        except CheckpointWriteError as exc:
            raised = exc
        time.sleep(0.01)
    assert m.failures == 1
    assert (raised is not None) == (on_error == "stop")
    with pytest.raises(CheckpointWriteError, match="step 3"):
        m.save(3, state, {}, kind=SaveKind.LAST)  # a final checkpoint's failure is always raised
        m.wait()
    failed = [
        e["step"]
        for e in read_events(tmp_path / "events.jsonl")
        if e["event"] == "checkpoint_failed"
    ]
    assert failed == [2, 3]
    root.unlink()
    moved.rename(root)
    verify(root / "step-000000001")  # the previous checkpoint survives
