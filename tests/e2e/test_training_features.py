"""Real-training features keep the promise: mixed precision (bf16 autocast; fp16 and its gradient
scaler) resumes bitwise, torch.compile checkpoints hold the eager keys, and a global batch size
holds at any world size by accumulation."""

from __future__ import annotations

import pytest

from spot.run.events import read_events
from tests.helpers import (
    FAST,
    assert_bitwise_equal,
    completed_run,
    final_state,
    run_dir_of,
    run_train,
    run_until_failpoint,
)

pytestmark = pytest.mark.slow

STEPS = 70  # across the first epoch boundary (64 steps)
# Synchronous saves: a kill at a step finds every earlier checkpoint committed (deterministic).
ARGS = [
    *FAST,
    f"trainer.max_steps={STEPS}",
    "checkpoint.every_steps=20",
    "checkpoint.async_save=false",
]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_a_resumed_mixed_precision_run_is_bitwise_the_uninterrupted_one(
    precision, tmp_path, markers
):
    args = [*ARGS, f"trainer.precision={precision}"]
    reference = completed_run(args, tmp_path / "reference")
    root = tmp_path / "interrupted"
    assert run_until_failpoint([*args, f"run.root={root}"], "train.step@step=50", markers) == 50
    result = run_train([*args, f"run.root={root}"])
    assert result.returncode == 0, result.stderr
    run_dir = run_dir_of(root)
    resumes = [e["step"] for e in read_events(run_dir / "events.jsonl") if e["event"] == "resume"]
    assert resumes == [40]
    a, b = final_state(reference), final_state(run_dir)
    for component in ("model", "optimizer", "scheduler"):
        assert_bitwise_equal(a[component], b[component], component)
    assert_bitwise_equal(a["trainer"]["rng"], b["trainer"]["rng"], "rng")
    assert a["trainer"]["grad_scaler"] == b["trainer"]["grad_scaler"]
    if precision == "fp16":
        assert b["trainer"]["grad_scaler"]["_growth_tracker"] == STEPS  # none lost at the resume
    else:
        assert b["trainer"]["grad_scaler"] == {}  # bf16 needs no scaler
    # Not the fp32 run: autocast really ran in the lower precision.
    fp32 = final_state(completed_run(ARGS, tmp_path / "fp32"))
    assert not all((fp32["model"][k] == b["model"][k]).all() for k in fp32["model"]), (
        "the same weights as fp32"
    )


def test_a_run_resumes_compiled_from_an_eager_checkpoint_and_eager_from_a_compiled_one(
    tmp_path, markers
):
    """torch.compile wraps the model (`_orig_mod.`); checkpoints hold the eager keys either way,
    so an attempt may switch (trainer.compile is not part of the training config)."""
    args = [*ARGS, f"run.root={tmp_path}"]
    assert run_until_failpoint(args, "train.step@step=30", markers) == 30  # eager: 20 saved
    compiled = [*args, "trainer.compile=true"]
    assert run_until_failpoint(compiled, "train.step@step=50", markers) == 50  # 40 saved
    result = run_train(args)  # eager again, from the compiled attempt's checkpoint
    assert result.returncode == 0, result.stderr
    run_dir = run_dir_of(tmp_path)
    events = read_events(run_dir / "events.jsonl")
    assert [e["step"] for e in events if e["event"] == "resume"] == [20, 40]
    starts = [e["compile"] for e in events if e["event"] == "start"]
    assert starts == [False, True, False]
    (compiled_event,) = [e for e in events if e["event"] == "compiled"]
    assert compiled_event["step"] == 21 and compiled_event["seconds"] > 0
    from spot.checkpoint.manager import CheckpointManager

    written_compiled = CheckpointManager.load(run_dir / "checkpoints" / "step-000000040").state
    final = final_state(run_dir)
    assert list(written_compiled["model"]) == list(final["model"])
    assert not any("_orig_mod" in k or k.startswith("module.") for k in final["model"])


def test_a_global_batch_size_is_made_up_by_accumulation(tmp_path):
    """trainer.global_batch_size=128 with a micro-batch of 32 on one rank: every step trains on
    128 samples in 4 micro-batches (the ledger), and the LR is the config's."""
    args = [
        *ARGS,
        "trainer.batch_size=32",
        "trainer.global_batch_size=128",
        "trainer.max_steps=40",
        "data.ledger=true",
    ]
    run_dir = completed_run(args, tmp_path)
    (start,) = [e for e in read_events(run_dir / "events.jsonl") if e["event"] == "start"]
    assert start["global_batch"] == 128 and start["micro_batches"] == [4]
    assert start["lr_scale"] == 1.0
    from spot.distributed.ledger import read_ledger

    steps = read_ledger(run_dir / "ledger" / "rank-0.jsonl")
    assert [len(s["indices"]) for s in steps] == [128] * 40  # an epoch: 4096 = 32 steps
    assert len({i for s in steps[:32] for i in s["indices"]}) == 4096  # each sample once


EVAL = ["eval.every_steps=20", "trainer.log_every=20"]


def eval_figures(run_dir) -> dict[int, tuple[float, float]]:
    events = read_events(run_dir / "events.jsonl")
    return {e["step"]: (e["loss"], e["accuracy"]) for e in events if e["event"] == "eval"}


def test_evaluation_changes_nothing_in_training_and_resumes_with_the_same_figures(
    tmp_path, markers
):
    """With evaluation every 20 steps the trained state is bitwise the one without; a run killed
    at step 50 and resumed reports the same validation figures at the same steps."""
    plain = final_state(completed_run(ARGS, tmp_path / "plain"))
    reference = completed_run([*ARGS, *EVAL], tmp_path / "eval")
    assert_bitwise_equal(plain, final_state(reference), "state")
    assert sorted(eval_figures(reference)) == [20, 40, 60, 70]  # and at the end

    args = [*ARGS, *EVAL, f"run.root={tmp_path / 'interrupted'}"]
    assert run_until_failpoint(args, "train.step@step=50", markers) == 50
    assert run_train(args).returncode == 0
    assert eval_figures(run_dir_of(tmp_path / "interrupted")) == eval_figures(reference)


def test_a_notice_to_one_rank_during_evaluation_stops_both_and_commits_at_once(tmp_path):
    """Two ranks; evaluation batches of one sample slowed (a failpoint sleeps in each): 512 per
    rank, over 50 s. SIGUSR1 to rank 1 alone once step 20 is logged, i.e. while step 20's
    evaluation runs. Rank 0 never hears it, yet both stop within a round: no eval figures for
    20, the emergency checkpoint at 20 committed within a bound that is a fraction of the
    split's time (before the ranks agreed per round: after rank 0's whole split), exit 75."""
    import os
    import signal

    from spot.run.exitcodes import EXIT_PREEMPTED
    from tests.helpers import start_train, train_env, wait_for_step

    args = [
        *ARGS,
        *EVAL,
        "trainer.max_steps=200",
        "elastic.nproc_per_node=2",
        "eval.batch_size=1",
        f"run.root={tmp_path}",
    ]
    proc = start_train(args, {**train_env(), "SPOT_FAILPOINTS": "eval.batch@sleep=0.1"})
    try:
        wait_for_step(tmp_path, 20, proc)  # logged before its evaluation
        events = read_events(run_dir_of(tmp_path) / "events.jsonl")
        (start,) = [e for e in events if e["event"] == "start"]
        os.kill(start["pids"][1], signal.SIGUSR1)  # SLURM-style: rank 1's process only
        assert proc.wait(timeout=60) == EXIT_PREEMPTED, proc.stdout.read()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.stdout.close()
    events = read_events(run_dir_of(tmp_path) / "events.jsonl")
    assert not [e for e in events if e["event"] == "eval"]
    (notice,) = [e for e in events if e["event"] == "notice"]
    assert notice["heard_by"] == [1]
    (emergency,) = [e for e in events if e["event"] == "emergency_checkpoint"]
    assert emergency["step"] == 20
    assert emergency["seconds"] < 10, emergency  # the split alone sleeps 512 * 0.1 = 51.2 s


@pytest.mark.parametrize("optimizer", [False, True])
def test_a_new_run_starts_from_another_runs_weights_only_when_it_has_none(
    optimizer, tmp_path, markers
):
    """init.checkpoint names run A's directory; run B (LR 0: the weights stay A's) starts from
    A's newest checkpoint, is killed and resumes from its own checkpoint, not A's again."""
    source = completed_run(ARGS, tmp_path / "a")
    args = [
        *FAST,
        "trainer.max_steps=20",
        "checkpoint.every_steps=10",
        "checkpoint.async_save=false",
        "run.name=finetune",
        f"init.checkpoint={source}",
        f"init.optimizer={str(optimizer).lower()}",
        "optimizer.lr=0",
        "optimizer.weight_decay=0",
        f"run.root={tmp_path / 'b'}",
    ]
    assert run_until_failpoint(args, "train.step@step=15", markers) == 15
    assert run_train(args).returncode == 0
    run_dir = run_dir_of(tmp_path / "b")
    events = read_events(run_dir / "events.jsonl")
    (init,) = [e for e in events if e["event"] == "init"]  # once: the resume used B's own
    assert init["step"] == STEPS and init["source"].endswith("step-000000070")
    assert [e["step"] for e in events if e["event"] == "resume"] == [10]
    a, b = final_state(source), final_state(run_dir)
    assert_bitwise_equal(a["model"], b["model"], "model")
    assert b["trainer"]["init"] == {"source": init["source"], "step": STEPS}
    adam_steps = {int(s["step"]) for s in b["optimizer"]["state"].values()}
    assert adam_steps == {STEPS + 20 if optimizer else 20}  # A's moments carried on, or fresh


def test_the_gpt_example_resumes_bitwise_with_its_evaluation_and_best_checkpoint(tmp_path, markers):
    """+experiment=gpt, shrunk to a test's size (bf16, evaluation, keep_best as the example
    has them): killed at step 25 and resumed, it ends bitwise equal to the uninterrupted run,
    with the same validation figures (nats per byte) and the same best checkpoint."""
    tiny = [
        "+experiment=gpt",
        "logger=none",
        f"data.cache_dir={tmp_path / 'cache'}",  # built once, read by both runs
        "model.n_layer=1",
        "model.n_head=2",
        "model.n_embd=32",
        "data.dataset.block_size=32",
        "trainer.batch_size=8",
        "trainer.max_steps=30",
        "eval.every_steps=10",
        "eval.max_batches=2",
        "checkpoint.every_steps=10",
        "checkpoint.async_save=false",
    ]
    reference = completed_run(tiny, tmp_path / "reference")
    args = [*tiny, f"run.root={tmp_path / 'interrupted'}"]
    assert run_until_failpoint(args, "train.step@step=25", markers) == 25
    assert run_train(args).returncode == 0
    run_dir = run_dir_of(tmp_path / "interrupted")
    a, b = final_state(reference), final_state(run_dir)
    for component in ("model", "optimizer", "scheduler"):
        assert_bitwise_equal(a[component], b[component], component)
    assert eval_figures(run_dir) == eval_figures(reference)
    assert sorted(eval_figures(run_dir)) == [10, 20, 30]
    assert a["trainer"]["best"] == b["trainer"]["best"] and b["trainer"]["best"]["step"] in (
        10,
        20,
        30,
    )
