"""Asynchronous checkpoints in real runs: a disk that refuses writes; the young_daly interval;
and the benchmark runs. In-process: tests/unit/test_async.py."""

from __future__ import annotations

import resource
import subprocess
import sys

import pytest

from spot.checkpoint.manager import list_step_dirs
from spot.checkpoint.manifest import verify
from spot.run.events import read_events
from spot.run.exitcodes import EXIT_CHECKPOINT_WRITE_FAILED
from tests.helpers import FAST, REPO, run_dir_of, run_train, train_env


def _limit_file_size(limit: int):
    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.slow
@pytest.mark.parametrize("on_error", ["stop", "continue"])
def test_disk_refuses_writes(on_error, tmp_path, markers):
    """The kernel refuses checkpoint writes (RLIMIT_FSIZE: 'File too large', as a full disk
    refuses them): reported as configured, previous checkpoints intact, nothing half-written."""
    from tests.helpers import run_until_failpoint

    # The default hidden=128, not FAST's 32: model.bin and optimizer.bin are over 64 KiB.
    fast = [a for a in FAST if not a.startswith("model.hidden")]
    args = [*fast, "trainer.max_steps=40", "checkpoint.every_steps=10", f"run.root={tmp_path}"]
    run_until_failpoint(args, "checkpoint.committed@step=20", markers)  # 10 and 20 committed
    run_dir = run_dir_of(tmp_path)
    # Whatever the machine's load: with stop, step 30's failure is known before step 32 (the
    # loop waits for it at 31), so the run stops there; with continue, step 30's write is still
    # in flight when the final checkpoint is asked for (held until then), which must be tried.
    hold = {
        "stop": "train.step@step=31@until=checkpoint.write_failed",
        "continue": "checkpoint.persist@step=30@until=checkpoint.must_commit",
    }[on_error]
    result = subprocess.run(
        [sys.executable, str(REPO / "train.py"), *args, f"checkpoint.on_error={on_error}"],
        cwd=REPO,
        env=train_env(SPOT_FAILPOINTS=hold),
        capture_output=True,
        text=True,
        timeout=180,
        preexec_fn=_limit_file_size(64 * 1024),  # model.bin and optimizer.bin are larger
    )
    assert result.returncode == EXIT_CHECKPOINT_WRITE_FAILED, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("checkpoint error:")]
    assert lines and "File too large" in lines[-1] and "Traceback" not in result.stderr
    failed = [e for e in read_events(run_dir / "events.jsonl") if e["event"] == "checkpoint_failed"]
    if on_error == "stop":
        assert [e["step"] for e in failed] == [30]  # the first failure stops training
    else:
        assert [e["step"] for e in failed] == [30, 40]  # the final one is tried, and fails
    assert not (run_dir / "COMPLETE").exists()
    assert [s for s, _ in list_step_dirs(run_dir / "checkpoints")] == [20, 10]
    for _, path in list_step_dirs(run_dir / "checkpoints"):
        verify(path)
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    resumed = run_train(args)  # the disk has room again: the run resumes and completes
    assert resumed.returncode == 0, resumed.stderr


@pytest.mark.slow
def test_young_daly_run_checkpoints_at_the_formula_interval(tmp_path):
    rate = 40.0  # interruptions per hour: MTBF 90 s; with a stall of ~1 ms, T is ~0.4 s
    args = [
        *FAST,
        "trainer.max_steps=1500",
        "checkpoint.policy=young_daly",
        f"cloud.interruption_rate_per_hour={rate}",
        f"run.root={tmp_path}",
    ]
    result = run_train(args)
    assert result.returncode == 0, result.stderr
    events = read_events(run_dir_of(tmp_path) / "events.jsonl")
    intervals = [e for e in events if e["event"] == "checkpoint_interval"]
    saves = [e for e in events if e["event"] == "checkpoint" and e["reason"] == "interval"]
    assert saves[0]["step"] == 1 and len(saves) >= 3, saves  # first one at once, to measure
    for e in intervals:
        expected = max((2 * e["stall_seconds"] * 3600 / rate) ** 0.5, e["persist_seconds"])
        assert abs(e["interval_seconds"] - expected) < 1e-3 + 1e-3 * expected
    # Every save after the first comes no sooner than the interval in force when it was decided.
    for earlier, later in zip(saves, saves[1:], strict=False):
        in_force = [e for e in intervals if e["time"] <= later["requested_at"]][-1][
            "interval_seconds"
        ]
        assert later["requested_at"] - earlier["requested_at"] >= in_force - 0.01


@pytest.mark.slow
def test_bench_runs_at_a_small_size(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "spot",
            "bench",
            "--size-gib",
            "0.01",
            "--repeats",
            "1",
            "--every",
            "0.2",
            "--pairs",
            "1",
            "--s3",
            "local",
            "--dir",
            str(tmp_path),
            "--json",
            str(tmp_path / "bench.json"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    for label in (
        "training-loop stall",
        "torch.save + fsync",
        "DCP async_save",
        "raw sequential write",
        "background persist",
        "restore + verify",
        "torch.load",
        "throughput loss",
        "upload, this project",
    ):
        assert label in result.stdout, label
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".spot-bench")]
