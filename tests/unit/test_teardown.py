"""Teardown is written once: an exception in the middle of training (a failpoint armed with
`@raise`) still closes the event log, restores the monitor's signal handlers and finishes the
tracker, in-process, as a sweep running jobs one after another in one process needs."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from spot import failpoints
from spot.job import Job
from tests.helpers import FAST, REPO


def open_files() -> set[str]:
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            found.add(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            continue
    return found


def test_an_exception_mid_training_closes_what_train_opened(tmp_path, monkeypatch):
    import wandb

    import train

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    overrides = [
        *[a for a in FAST if not a.startswith("logger=")],
        "logger=wandb",
        "trainer.max_steps=20",
        "trainer.deterministic=false",  # no global torch setting left behind in this process
        "checkpoint.every_steps=5",
        f"run.root={tmp_path}",
    ]
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    failpoints.arm("train.step@step=7@raise")
    try:
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides)
        with pytest.raises(failpoints.FailpointError, match="train.step at step 7"):
            train.train(Job.from_config(cfg, overrides))
    finally:
        failpoints.arm("")
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers  # the monitor's are gone
    (events,) = Path(tmp_path).glob("*/*/events.jsonl")
    assert str(events.resolve()) not in open_files()  # the event log is closed
    assert wandb.run is None  # the tracker finished its run
    steps = [line for line in events.read_text().splitlines() if '"checkpoint"' in line]
    assert len(steps) == 1  # the save at 5 committed before the way out (none lost in flight)
