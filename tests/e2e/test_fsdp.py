"""trainer.strategy=fsdp with real processes: train.py's own elastic agent, gloo on CPU, FSDP2
shards, every rank writing its own part of each checkpoint; SIGKILLs, world-size changes,
corrupt shards, a notice."""

from __future__ import annotations

import pytest

from spot.checkpoint.manager import CheckpointManager, list_step_dirs
from spot.distributed.ledger import read_ledger
from spot.run.events import read_events

from ..helpers import (
    FAST,
    assert_bitwise_equal,
    final_state,
    run_dir_of,
    run_train,
    run_until_failpoint,
)

pytestmark = [pytest.mark.slow]

FSDP = ["trainer.strategy=fsdp", "trainer.fsdp.shard=[Linear]"]
ARGS = [*FAST, *FSDP, "trainer.max_steps=40", "checkpoint.every_steps=10", "data.ledger=true"]


def ranks(n: int) -> list[str]:
    return [f"elastic.nproc_per_node={n}", "elastic.monitor_interval_seconds=0.1"]


def epoch_indices(run_dir, epoch: int) -> list[int]:
    seen = []
    for path in sorted((run_dir / "ledger").glob("rank-*.jsonl")):
        seen += [i for e in read_ledger(path) if e["epoch"] == epoch for i in e["indices"]]
    return sorted(seen)


def test_two_ranks_killed_at_any_moment_end_bitwise_equal(tmp_path, markers):
    """Killed in one rank's write (the other's may be done), then after every rank's shards but
    before the manifest: each restart resumes from the last commit, and the end is bitwise the
    uninterrupted run's."""
    ref_root, root = tmp_path / "ref", tmp_path / "run"
    reference = run_train([*ARGS, *ranks(2), f"run.root={ref_root}"], timeout=240)
    assert reference.returncode == 0, reference.stdout[-3000:] + reference.stderr[-3000:]

    args = [*ARGS, *ranks(2), f"run.root={root}"]
    for point in (
        "checkpoint.persist@step=20@rank=1",
        "checkpoint.shards_written@step=30@rank=0",  # rank 1 past it: only 0 commits
    ):
        run_until_failpoint(args, point, markers)
    result = run_train(args, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_dir, ref_dir = run_dir_of(root), run_dir_of(ref_root)
    resumed = [e["step"] for e in read_events(run_dir / "events.jsonl") if e["event"] == "resume"]
    assert resumed == [10, 20]
    newest = list_step_dirs(run_dir / "checkpoints")[0][1]
    files = CheckpointManager.load(newest).manifest.files
    assert {f for f in files if f.endswith(".distcp")} == {"__0_0.distcp", "__1_0.distcp"}
    assert {files["__0_0.distcp"]["rank"], files["__1_0.distcp"]["rank"]} == {0, 1}
    assert_bitwise_equal(final_state(run_dir), final_state(ref_dir))
    for rank in (0, 1):
        assert read_ledger(run_dir / f"ledger/rank-{rank}.jsonl") == read_ledger(
            ref_dir / f"ledger/rank-{rank}.jsonl"
        )


def test_two_three_one_ranks_every_sample_once(tmp_path, markers):
    """An epoch trained at 2, then 3, then 1 rank, killed after a checkpoint each time: the
    shards are read back resharded, every sample of the epoch exactly once, and it completes."""
    args = [
        *FAST,
        *FSDP,
        "trainer.max_steps=null",
        "trainer.max_epochs=1",
        "checkpoint.every_steps=5",
        "data.ledger=true",
        f"run.root={tmp_path}",
    ]
    run_until_failpoint([*args, *ranks(2)], "checkpoint.committed@step=10", markers)
    run_until_failpoint([*args, *ranks(3)], "checkpoint.committed@step=20", markers)
    result = run_train(args, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_dir = run_dir_of(tmp_path)
    events = read_events(run_dir / "events.jsonl")
    changes = [
        (e["previous"], e["world_size"]) for e in events if e["event"] == "world_size_change"
    ]
    assert changes == [(2, 3), (3, 1)]
    assert epoch_indices(run_dir, 0) == list(range(4096))
    assert [e for e in events if e["event"] == "complete"]


def test_a_module_class_that_matches_nothing_is_one_line_and_exit_2(tmp_path):
    """trainer.fsdp.shard names a class the model does not have: one line naming it and the
    classes there are, exit 2, before any run directory exists."""
    result = run_train(
        [*FAST, "trainer.strategy=fsdp", "trainer.fsdp.shard=[Linear,Blok]", f"run.root={tmp_path}"]
    )
    assert result.returncode == 2, result.stdout + result.stderr
    (line,) = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert line.startswith("config error: trainer.fsdp.shard: Blok matches no module of MLP")
    assert "Linear" in line and not any(tmp_path.iterdir())


@pytest.mark.parametrize("source,target", [("ddp", "fsdp")])
def test_init_checkpoint_moves_weights_between_strategies(tmp_path, source, target):
    """init.checkpoint (with its optimizer state) from a ddp run into an fsdp one: the whole
    weights arrive, each rank keeping its shards (LR 0: the one step taken leaves them as they
    came). (fsdp -> ddp: export's and inspect's whole load, tests/unit/test_sharded.py.)"""
    strategy = {"fsdp": [*FSDP, *ranks(2)], "ddp": []}
    first = run_train(
        [*FAST, *strategy[source], "trainer.max_steps=5", f"run.root={tmp_path / 'a'}"]
    )
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    args = [
        *FAST,
        *strategy[target],
        "trainer.max_steps=1",
        "run.name=finetune",
        f"init.checkpoint={run_dir_of(tmp_path / 'a')}",
        "init.optimizer=true",
        "optimizer.lr=0",
        "optimizer.weight_decay=0",
        f"run.root={tmp_path / 'b'}",
    ]
    second = run_train(args)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert_bitwise_equal(
        final_state(run_dir_of(tmp_path / "a"))["model"],
        final_state(run_dir_of(tmp_path / "b"))["model"],
    )


def test_accumulation_with_uneven_shares_runs_the_same_passes_on_every_rank(tmp_path):
    """A global batch of 65 in micro-batches of 32 over 2 ranks: shares of 33 and 32, i.e. 2 and
    1 micro-batches. FSDP2 gathers in every forward: the short rank runs a stand-in (weight 0)
    instead of leaving the other waiting in a collective; every sample counts once."""
    args = [
        *FAST,
        *FSDP,
        *ranks(2),
        "trainer.batch_size=32",
        "trainer.global_batch_size=65",
        "trainer.max_steps=3",
        "data.ledger=true",
        "elastic.collective_timeout_seconds=20",
        f"run.root={tmp_path}",
    ]
    result = run_train(args, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_dir = run_dir_of(tmp_path)
    assert [e["step"] for e in read_events(run_dir / "events.jsonl") if e["event"] == "complete"]
    assert len(epoch_indices(run_dir, 0)) == len(set(epoch_indices(run_dir, 0))) == 3 * 65


def test_a_notice_to_rank_one_commits_both_ranks_shards_and_the_run_resumes_from_them(tmp_path):
    """On one machine (a shared checkpoint directory), SIGUSR1 to rank 1 alone: both ranks stop
    at one step and write their shards of the emergency checkpoint, which rank 0 commits before
    exit 75; started again, the run resumes from it and completes."""
    import os
    import signal

    from spot.run.exitcodes import EXIT_PREEMPTED

    from ..helpers import start_train, train_env, wait_for_step

    longer = [a for a in ARGS if not a.startswith(("trainer.max_steps=", "trainer.log_every="))]
    longer += ["trainer.max_steps=60", "trainer.log_every=1"]
    args = [*longer, *ranks(2), f"run.root={tmp_path}"]
    proc = start_train(args, {**train_env(), "SPOT_FAILPOINTS": "train.step@sleep=0.05"})
    try:
        wait_for_step(tmp_path, 15, proc)
        (start,) = [e for e in read_events(run_dir_of(tmp_path) / "events.jsonl")
                    if e["event"] == "start"]  # fmt: skip
        os.kill(start["pids"][1], signal.SIGUSR1)
        assert proc.wait(timeout=60) == EXIT_PREEMPTED, proc.stdout.read()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.stdout.close()
    run_dir = run_dir_of(tmp_path)
    (emergency,) = [
        e for e in read_events(run_dir / "events.jsonl") if e["event"] == "emergency_checkpoint"
    ]
    step, newest = list_step_dirs(run_dir / "checkpoints")[0]
    files = CheckpointManager.load(newest).manifest.files  # verifies every file
    assert step == emergency["step"] >= 15
    assert {files[f]["rank"] for f in files if f.endswith(".distcp")} == {0, 1}
    result = run_train(args, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    resumed = [e["step"] for e in read_events(run_dir / "events.jsonl") if e["event"] == "resume"]
    assert resumed == [emergency["step"]]
