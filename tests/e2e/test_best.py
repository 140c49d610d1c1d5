"""checkpoint.keep_best in real runs: the best outlives both retentions across a kill and a
restart with a bucket and the default logger; a metric evaluation never reports is refused
before the first step; a changed rule starts a new record. The owner's rules in-process:
tests/unit/test_best.py; both retentions against the bucket: tests/unit/test_s3_integrity.py."""

from __future__ import annotations

import subprocess
import sys

import pytest

from spot.checkpoint.manager import list_step_dirs
from spot.run.events import read_events
from spot.run.exitcodes import EXIT_BAD_CONFIG
from tests.e2e import test_s3
from tests.helpers import (
    CREDENTIALS,
    FAST,
    REPO,
    final_state,
    run_dir_of,
    run_train,
    run_until_failpoint,
    train_env,
)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("credentials")]
s3_endpoint = test_s3.s3_endpoint  # a moto S3 server for this module, a bucket per test
bucket = test_s3.bucket

# Synchronous saves every 10 steps, an evaluation every 10: the best by the highest validation
# loss is the first evaluation's (step 10), so it is the oldest checkpoint by far.
ARGS = [
    *FAST,
    "trainer.max_steps=80",
    "checkpoint.every_steps=10",
    "checkpoint.async_save=false",
    "checkpoint.keep_last=2",
    "eval.every_steps=10",
    "checkpoint.keep_best={metric: val/loss, mode: max}",
]


def eval_losses(run_dir) -> dict[int, float]:
    events = read_events(run_dir / "events.jsonl")
    return {e["step"]: e["loss"] for e in events if e["event"] == "eval"}


def test_the_best_outlives_both_retentions_a_kill_and_the_restart(
    s3_endpoint, bucket, tmp_path, markers
):
    """With a bucket and the default logger (W&B offline: its start widens the window between
    the restore and the first step): step 50's upload is held, the run is killed at 55, and the
    restart uploads 50 while both retentions run. Step 10, the best, must stay on the disk and
    in the bucket, and `python -m spot list` marks it."""
    client, name = bucket
    args = [
        *ARGS,
        "logger=wandb",
        "storage=s3",
        f"storage.bucket={name}",
        f"storage.endpoint_url={s3_endpoint}",
        f"run.root={tmp_path}",
    ]
    env = train_env(**CREDENTIALS)
    held = "train.step@step=55,upload.file_uploaded@step=50@until=never"
    assert run_until_failpoint(args, held, markers, env=env) == 55
    result = run_train(args, env=env)
    assert result.returncode == 0, result.stderr
    run_dir = run_dir_of(tmp_path)
    best = final_state(run_dir)["trainer"]["best"]
    losses = eval_losses(run_dir)
    assert best["step"] == 10 and best["value"] == losses[10] == max(losses.values())
    assert sorted(s for s, _ in list_step_dirs(run_dir / "checkpoints")) == [10, 70, 80]
    prefix = f"checkpoints/default/{run_dir.name}/"
    in_bucket = {
        k[len(prefix) :].split("/")[0] for k in test_s3.keys(client, name) if "/step-" in k
    }
    assert sorted(in_bucket) == ["step-000000010", "step-000000070", "step-000000080"]
    listing = subprocess.run(
        [sys.executable, "-m", "spot", "list", str(run_dir)],
        cwd=REPO,
        capture_output=True,
        text=True,
    ).stdout
    (marked,) = [line for line in listing.splitlines() if "best" in line]
    assert marked.split()[0] == "10" and "val/loss" in marked


def test_a_metric_evaluation_never_reports_is_refused_before_the_first_step(tmp_path):
    """val/acc is not a figure (eval_batch reports loss and accuracy): one line naming the key
    and the figures there are, exit 2, before a step is trained or a checkpoint written."""
    args = [*ARGS, "checkpoint.keep_best={metric: val/acc}", "eval.every_steps=25"]
    args.append(f"run.root={tmp_path}")  # (found at step 25, it would find 10 and 20 saved)
    result = run_train(args)
    assert result.returncode == EXIT_BAD_CONFIG, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert "checkpoint.keep_best.metric" in line and "val/accuracy, val/loss" in line
    run_dir = run_dir_of(tmp_path)
    assert not [e for e in read_events(run_dir / "events.jsonl") if e["event"] == "train"]
    assert not list_step_dirs(run_dir / "checkpoints")


def test_a_changed_rule_starts_a_new_record(tmp_path, markers):
    """A run that kept the best by val/loss (max) is killed at 35 and resumed keeping the best
    by val/accuracy (max): the resume says the rule changed, the new rule's first evaluation
    is its first best, and the old best is spared until that one is committed."""
    first = [*ARGS, f"run.root={tmp_path}"]
    assert run_until_failpoint(first, "train.step@step=35", markers) == 35
    changed = [*first, "checkpoint.keep_best={metric: val/accuracy, mode: max}"]
    result = run_train(changed)
    assert result.returncode == 0, result.stderr
    run_dir = run_dir_of(tmp_path)
    events = read_events(run_dir / "events.jsonl")
    (change,) = [e for e in events if e["event"] == "keep_best_changed"]
    assert change["previous"] == {"metric": "val/loss", "mode": "max"} and change["step"] == 10
    accuracy = {e["step"]: e["accuracy"] for e in events if e["event"] == "eval" and e["step"] > 30}
    best = final_state(run_dir)["trainer"]["best"]
    assert best["metric"] == "val/accuracy" and best["value"] == max(accuracy.values())
    assert best["step"] == min(s for s, v in accuracy.items() if v == best["value"])
    steps = sorted(s for s, _ in list_step_dirs(run_dir / "checkpoints"))
    assert 10 not in steps and best["step"] in steps
