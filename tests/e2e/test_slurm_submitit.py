"""SLURM through Hydra's submitit launcher (`hydra/launcher=spot_slurm`), without a cluster:
stand-ins for sbatch, srun, scontrol and sacct (tests/fakeslurm) run the jobs on this machine;
submitit, Hydra and train.py are the real ones."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

from spot.run.events import read_events

from ..helpers import (
    FAST,
    REPO,
    assert_bitwise_equal,
    completed_run,
    final_state,
    start_train,
    train_env,
    wait_for_step,
)

FAKE_SLURM = REPO / "tests" / "fakeslurm"
ARGS = [*FAST, "cloud=slurm", "trainer.max_steps=60", "trainer.log_every=1"]


@pytest.mark.slow
def test_a_preempted_job_is_requeued_and_resumes_bitwise(tmp_path):
    reference = final_state(completed_run(ARGS, tmp_path / "reference"))

    slurm = tmp_path / "slurm"
    slurm.mkdir()
    root = tmp_path / "runs"
    env = train_env(
        PATH=f"{FAKE_SLURM}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        FAKE_SLURM_DIR=str(slurm),
        SPOT_FAILPOINTS="train.step@sleep=0.05",  # time to preempt it mid-run
    )
    sweep = start_train(
        [
            "-m",
            "hydra/launcher=spot_slurm",
            f"hydra.sweep.dir={tmp_path / 'multirun'}",
            *ARGS,
            f"run.root={root}",
        ],
        env,
    )
    try:
        wait_for_step(root, 20, sweep)
        (pid,) = map(int, (slurm / "task-42.pids").read_text().split())
        os.kill(pid, signal.SIGUSR2)  # SLURM's --signal=USR2@90, as submitit asks for it
        out = sweep.communicate(timeout=180)[0]
    finally:
        if sweep.poll() is None:
            os.killpg(sweep.pid, signal.SIGKILL)
    jobs_log = (slurm / "job-42.out").read_text()
    assert sweep.returncode == 0, out[-3000:] + jobs_log[-3000:]
    assert (slurm / "scontrol.log").read_text().split("\n")[0] == "requeue 42"

    run_dir = next(root.glob("*/*"))
    events = read_events(run_dir / "events.jsonl")
    (notice,) = [e for e in events if e["event"] == "notice"]
    assert notice["kind"] == "SIGUSR2"
    starts = [e["step"] for e in events if e["event"] == "start"]
    assert starts == [0, notice["step"]]  # requeued, resumed at the emergency checkpoint
    assert [e["event"] for e in events][-1] == "complete"
    assert_bitwise_equal(final_state(run_dir), reference)
