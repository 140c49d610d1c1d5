"""One W&B run across restarts (read back from W&B's own offline files), and the run report.
Metrics from events: tests/unit/test_metrics.py."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from spot.run.events import read_events
from spot.run.goodput import account
from spot.run.metrics import accounting_figures

from ..helpers import (
    FAST,
    PRICES,
    REPO,
    run_dir_of,
    run_train,
    run_until_failpoint,
    start_train,
    train_env,
    wait_for_step,
)

SECRET = "do-not-log-me-9f3a1c"  # an AWS secret in the environment: must appear nowhere
STEPS = 80


@pytest.fixture(scope="module")
def interrupted_twice(tmp_path_factory) -> Path:
    """A run with the W&B logger (offline), SIGKILLed at step 30 (no notice), stopped by a
    SIGTERM notice near step 55 (exit 75), then resumed to the end."""
    root = tmp_path_factory.mktemp("runs")
    markers = tmp_path_factory.mktemp("markers")
    args = [
        *(a for a in FAST if a != "logger=none"),
        "logger=wandb",
        f"trainer.max_steps={STEPS}",
        "checkpoint.every_steps=20",
        "trainer.log_every=1",
        f"cloud.price.spot_per_hour={PRICES[0]}",
        f"cloud.price.on_demand_per_hour={PRICES[1]}",
        f"run.root={root}",
    ]
    env = train_env(AWS_SECRET_ACCESS_KEY=SECRET, AWS_ACCESS_KEY_ID="AKIDEXAMPLE")
    assert run_until_failpoint(args, "train.step@step=30", markers, env=env) == 30
    proc = start_train(args, {**env, "SPOT_FAILPOINTS": "train.step@sleep=0.03"})
    wait_for_step(root, 55, proc)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 75, out[-3000:]
    result = run_train(args, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir_of(root)


@pytest.mark.slow
def test_an_interrupted_run_is_one_wandb_run_with_the_contract_metrics(interrupted_twice):
    from spot.run.wandb_tracker import offline_history, offline_segments, read_records

    run_dir = interrupted_twice
    run_id = f"{run_dir.parent.name}-{run_dir.name}"
    wandb_dir = run_dir / "wandb"
    segments = offline_segments(wandb_dir, run_id)
    assert len(segments) == 3  # one per attempt, in one directory, all the same W&B run
    runs = [
        r.run for s in segments for r in read_records(s) if r.WhichOneof("record_type") == "run"
    ]
    # The SIGKILLed attempt took W&B's unflushed buffer with it (its file may hold only the
    # header); the next attempt sent its figures again from events.jsonl.
    assert {r.run_id for r in runs} == {run_id} and len(runs) >= 2
    config = {i.key: json.loads(i.value_json) for i in runs[-1].config.update}
    assert config["world_size"] == 1
    config = config["cloud"]
    assert config["name"] == "local" and "instance_type" in config

    rows = offline_history(wandb_dir, run_id)
    w_steps = [r["_step"] for r in rows]
    assert w_steps == sorted(set(w_steps)), "W&B's step went backwards or repeated"
    events = read_events(run_dir / "events.jsonl")

    # Every training step's loss, as the events say (a lost step appears once per attempt).
    trained = [(e["step"], e["loss"]) for e in events if e["event"] == "train"]
    logged = [(r["trainer/step"], r["train/loss"]) for r in rows if "train/loss" in r]
    assert logged == trained and {s for s, _ in logged} == set(range(1, STEPS + 1))

    # Checkpoint figures at the checkpoint's step, with the values the events recorded.
    saved = [
        (e["step"], e["stall_seconds"], e["persist_seconds"], e["bytes"])
        for e in events
        if e["event"] == "checkpoint"
    ]
    logged_ckpt = [
        (r["trainer/step"], r["ckpt/stall_seconds"], r["ckpt/persist_seconds"], r["ckpt/bytes"])
        for r in rows
        if "ckpt/bytes" in r
    ]
    assert logged_ckpt == saved and len(saved) >= 4
    (emergency,) = [r for r in rows if "ckpt/emergency_seconds" in r]
    assert emergency["trainer/step"] >= 55

    # The last accounting is the whole run's: two interruptions, goodput and cost.
    final = [r for r in rows if "spot/goodput" in r][-1]
    expected = accounting_figures(events, *PRICES)
    assert final["spot/interruptions"] == expected["spot/interruptions"] == 2
    resumed = [e["step"] for e in events if e["event"] == "start"][1]  # 20, or 0 if not committed
    assert final["spot/lost_steps"] == expected["spot/lost_steps"] == 30 - resumed
    for key in ("spot/goodput", "spot/recovery_seconds", "cost/spot_usd", "cost/on_demand_usd"):
        assert final[key] == pytest.approx(expected[key], rel=1e-12), key
    assert final["cost/saved_usd"] == pytest.approx(
        final["cost/on_demand_usd"] - final["cost/spot_usd"]
    )
    # Each interruption is marked where it happened: the notice by the count going up.
    notice_rows = [r for r in rows if "spot/notice" in r]
    assert [r["spot/interruptions"] for r in notice_rows] == [2]
    starts = [r for r in rows if "elastic/world_size" in r]
    assert [r["spot/interruptions"] for r in starts] == [0, 1, 2]

    leaked = [p for p in run_dir.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert not leaked


@pytest.mark.slow
def test_the_report_marks_interruptions_and_prints_the_runs_figures(interrupted_twice, tmp_path):
    import matplotlib.image

    from spot.tools.report import INTERRUPTION, RESTART

    out = tmp_path / "report.png"
    result = subprocess.run(
        [sys.executable, "-m", "spot", "report", str(interrupted_twice), "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    events = read_events(interrupted_twice / "events.jsonl")
    a = account(events, *PRICES)
    assert f"interruptions {a.interruptions}, lost steps {a.lost_steps}," in result.stdout
    assert f"goodput {a.goodput:.1%}" in result.stdout
    assert f"spot ${a.spot_usd:.4f}" in result.stdout
    assert "interruptions at steps [30, " in result.stdout

    pixels = matplotlib.image.imread(out)[..., :3]
    assert pixels.std() > 0.05  # not blank
    loss_panel = pixels[: int(pixels.shape[0] * 0.5)]

    def vertical_lines(colour: str) -> int:
        rgb = [int(colour[i : i + 2], 16) / 255 for i in (1, 3, 5)]
        close = (abs(loss_panel - rgb).sum(axis=-1) < 0.05).sum(axis=0)
        columns = [x for x, n in enumerate(close) if n > loss_panel.shape[0] * 0.2]
        return sum(1 for i, x in enumerate(columns) if i == 0 or x > columns[i - 1] + 3)

    assert vertical_lines(INTERRUPTION) == 2
    assert vertical_lines(RESTART) == 2
