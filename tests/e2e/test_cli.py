"""The commands a user types: multirun sweeps that resume, the example experiments, and the
README's quick start (`make train`) on a clean clone."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import boto3
import pytest

from spot.run.events import read_events
from tests.e2e import test_s3
from tests.helpers import (
    CREDENTIALS,
    FAST,
    REPO,
    assert_bitwise_equal,
    final_state,
    run_dir_of,
    run_train,
    train_env,
)

pytestmark = pytest.mark.slow


def test_multirun_runs_each_job_once_and_skips_finished(tmp_path: Path):
    args = ["-m", "optimizer.lr=0.1,0.01", "trainer.max_steps=12", *FAST, f"run.root={tmp_path}"]
    first = run_train(args)
    assert first.returncode == 0, first.stderr
    runs = sorted(p for p in (tmp_path / "default").iterdir())
    assert len(runs) == 2 and all((p / "COMPLETE").exists() for p in runs)
    configs = {(p / "config.yaml").read_text().count("lr: 0.1\n") for p in runs}
    assert configs == {0, 1}, "the two jobs must have different run directories and configs"
    events_before = [(p / "events.jsonl").read_text() for p in runs]

    again = run_train(args)
    assert again.returncode == 0, again.stderr
    assert (again.stdout + again.stderr).count("already complete") == 2
    assert [(p / "events.jsonl").read_text() for p in runs] == events_before
    assert sorted(p for p in (tmp_path / "default").iterdir()) == runs


def test_multirun_resumes_an_unfinished_job(tmp_path: Path):
    """A sweep cut short (one job done, the other interrupted) resumes the unfinished one."""
    args = [
        "-m",
        "trainer.max_steps=10,30",
        *FAST,
        "checkpoint.every_steps=5",
        f"run.root={tmp_path}",
    ]
    assert run_train(args).returncode == 0
    runs = sorted((tmp_path / "default").iterdir(), key=lambda p: (p / "COMPLETE").read_text())
    unfinished = runs[-1]
    (unfinished / "COMPLETE").unlink()  # as if it was reclaimed after its step-25 checkpoint
    for step_dir in (unfinished / "checkpoints").glob("step-00000003*"):
        shutil.rmtree(step_dir)
    result = run_train(args)
    assert result.returncode == 0, result.stderr
    assert (result.stdout + result.stderr).count("already complete") == 1
    resumes = [e for e in read_events(unfinished / "events.jsonl") if e["event"] == "resume"]
    assert [e["step"] for e in resumes] == [25]
    assert (unfinished / "COMPLETE").read_text().strip() == "30"


def test_cnn_experiment_with_wandb_offline(tmp_path: Path):
    """The second model family, and the default logger (W&B, offline, no network)."""
    result = run_train(
        [
            "+experiment=cnn",
            "trainer.max_steps=6",
            "checkpoint.every_steps=3",
            f"run.root={tmp_path}",
        ]
    )
    assert result.returncode == 0, result.stderr
    run_dir = next((tmp_path / "cnn").iterdir())
    assert (run_dir / "COMPLETE").exists()
    assert list((run_dir / "wandb").glob("offline-run-*")), "W&B offline run not written"
    assert [
        e["step"] for e in read_events(run_dir / "events.jsonl") if e["event"] == "checkpoint"
    ] == [3, 6]


def test_make_train_on_a_clean_clone(tmp_path: Path):
    """The README's first command, from a fresh `git clone` (reusing this venv: installing it is
    what `make test` itself just proved on CI's clean clone)."""
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(clone)], check=True)
    venv = Path(os.environ.get("VIRTUAL_ENV", REPO / ".venv"))
    if not (venv / ".installed").exists():
        pytest.skip("run through `make test` to reuse its venv")
    result = subprocess.run(
        ["make", "train", f"VENV={venv}", "ARGS=trainer.max_steps=60"],
        cwd=clone,
        env=train_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    run_dir = next((clone / "runs" / "example").iterdir())
    assert (run_dir / "COMPLETE").exists()
    assert f"run complete at step 60: {run_dir.relative_to(clone)}" in result.stdout + result.stderr


def test_every_tool_is_an_argparse_subcommand_with_its_own_arguments(capsys):
    """`python -m spot` dispatches through subparsers only: each command's --help shows its own
    arguments (no `path` forced on tools that take none), and a bad value is one line, exit 2."""
    from spot.tools.cli import COMMANDS, main

    own = {"bench": "--size-gib", "chaos": "--interruptions", "emulate": "{aws,gcp,azure}"}
    own |= {"rendezvous": "--host", "cost": "--work-hours", "report": "--out", "list": "path"}
    for name in COMMANDS:
        with pytest.raises(SystemExit) as done:
            main([name, "--help"])
        shown = capsys.readouterr().out
        assert done.value.code == 0 and f"python -m spot {name}" in shown
        assert own.get(name, "") in shown
        usage = shown.split("\n\n")[0]
        assert (" path" in usage) == (name in ("list", "verify", "inspect")), (name, usage)
    for argv, key in (
        (["bench", "--repeats", "0"], "--repeats: 0 is not allowed; must be >= 1"),
        (["chaos", "--kinds", "notice,flood"], "--kinds: flood not allowed"),
        (["nonsense"], "invalid choice: 'nonsense'"),
    ):
        with pytest.raises(SystemExit) as done:
            main(argv)
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert done.value.code == 2 and key in error, error


s3_endpoint = test_s3.s3_endpoint  # its fixture: moto's S3 server on loopback, per module


def spot_tool(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "spot", *argv],
        cwd=REPO,
        env=train_env(**CREDENTIALS),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_export_reads_a_bucket_at_an_endpoint_and_says_in_one_line_when_it_cannot(
    s3_endpoint, tmp_path: Path
):
    """`spot export s3://...` takes `--endpoint-url` as list/verify/inspect do; a bucket that
    cannot be used is one line and exit 2, and nothing is written."""
    from safetensors.torch import load_file

    keys = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1", **keys)
    client.create_bucket(Bucket="exports")
    s3 = ["storage=s3", "storage.bucket=exports", f"storage.endpoint_url={s3_endpoint}"]
    trained = run_train(
        [*FAST, "trainer.max_steps=2", *s3, f"run.root={tmp_path / 'run'}"],
        env=train_env(**CREDENTIALS),
    )
    assert trained.returncode == 0, trained.stderr
    run_dir = run_dir_of(tmp_path / "run")
    url = f"s3://exports/checkpoints/default/{run_dir.name}"

    out = tmp_path / "w.safetensors"
    exported = spot_tool("export", url, str(out), "--endpoint-url", s3_endpoint)
    assert exported.returncode == 0, exported.stderr
    assert_bitwise_equal(load_file(out), final_state(run_dir)["model"], "model")

    for bucket, reason in (("no-such-bucket", "does not exist"), ("Bad_Name", "")):
        missing = tmp_path / f"{bucket}.safetensors"
        failed = spot_tool(
            "export", f"s3://{bucket}/x", str(missing), "--endpoint-url", s3_endpoint
        )
        assert failed.returncode == 2, failed.stderr
        (line,) = failed.stderr.strip().splitlines()
        assert line.startswith(f"error: storage.bucket={bucket}: {reason}"), line
        assert not missing.exists()
