"""Hydra sweeps that survive preemption: a 4-job sweep interrupted during job 3 and started again
with the same command; a failed job that does not stop the others."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spot.run.events import read_events
from spot.run.exitcodes import EXIT_BAD_CONFIG, EXIT_PREEMPTED

from ..helpers import FAST, REPO, assert_bitwise_equal, final_state, run_train, train_env

pytestmark = pytest.mark.slow

LRS = ("0.004", "0.003", "0.002", "0.001")
SWEEP = [
    "-m",
    f"optimizer.lr={','.join(LRS)}",
    *FAST,
    "trainer.max_steps=60",
    "checkpoint.every_steps=10",
    "trainer.log_every=1",
]


def runs_by_lr(root: Path) -> dict[str, Path]:
    out = {}
    for run_dir in (root / "default").iterdir():
        config = run_dir / "config.yaml"
        if not config.exists():  # a job that is just starting
            continue
        for lr in LRS:
            if f"lr: {lr}\n" in config.read_text():
                out[lr] = run_dir
    return out


def test_a_sweep_killed_in_job_3_resumes_it_and_skips_the_finished(tmp_path):
    reference = run_train([*SWEEP, f"run.root={tmp_path / 'ref'}"], timeout=300)
    assert reference.returncode == 0, reference.stderr[-2000:]

    root = tmp_path / "sweep"
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), *SWEEP, f"run.root={root}"],
        cwd=REPO,
        env={**train_env(), "SPOT_FAILPOINTS": "train.step@sleep=0.03"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 180
        while True:  # job 3 (lr 0.002) is training
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            third = (root / "default").exists() and runs_by_lr(root).get("0.002")
            if third and any(
                e["event"] == "train" and e["step"] >= 20
                for e in read_events(third / "events.jsonl")
            ):
                break
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGTERM)  # the machine is being reclaimed
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == EXIT_PREEMPTED, out[-3000:]
    assert set(runs_by_lr(root)) == {"0.004", "0.003", "0.002"}  # job 4 never started

    again = run_train([*SWEEP, f"run.root={root}"], timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert (again.stdout + again.stderr).count("already complete") == 2  # jobs 1-2 not retrained
    runs, ref_runs = runs_by_lr(root), runs_by_lr(tmp_path / "ref")
    job3 = read_events(runs["0.002"] / "events.jsonl")
    (emergency,) = [e for e in job3 if e["event"] == "emergency_checkpoint"]
    assert [e["step"] for e in job3 if e["event"] == "resume"] == [emergency["step"]]
    for lr in LRS:
        assert (runs[lr] / "COMPLETE").exists()
        assert_bitwise_equal(final_state(runs[lr]), final_state(ref_runs[lr]), lr)


def test_a_failed_job_does_not_stop_the_sweep(tmp_path):
    """Job 1's data set cannot be built (a runtime error, exit 2); job 2 still trains, and the
    sweep's exit code says not all finished."""
    result = run_train(
        ["-m", "data.dataset.size=-3,512", *FAST, "trainer.max_steps=5", f"run.root={tmp_path}"]
    )
    assert result.returncode == EXIT_BAD_CONFIG, result.stderr[-2000:]
    assert "the other jobs go on" in result.stdout + result.stderr
    done = [p for p in (tmp_path / "default").iterdir() if (p / "COMPLETE").exists()]
    assert len(done) == 1 and "size: 512" in (done[0] / "config.yaml").read_text()
