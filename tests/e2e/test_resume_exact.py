"""The promise: an interrupted and resumed run ends bitwise identical to an uninterrupted one.

Everything here runs train.py as real subprocesses and kills them with SIGKILL.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from spot.checkpoint import manifest
from spot.checkpoint.manager import list_step_dirs
from spot.distributed.ledger import read_ledger
from spot.run.events import read_events
from spot.run.exitcodes import EXIT_CHECKPOINT_UNUSABLE
from tests.helpers import (
    FAST,
    assert_bitwise_equal,
    completed_run,
    final_state,
    rewrite_manifest,
    run_dir_of,
    run_train,
    run_until_failpoint,
)

pytestmark = pytest.mark.slow

STEPS = 150  # two epoch boundaries at 64 steps per epoch
ARGS = [*FAST, f"trainer.max_steps={STEPS}", "checkpoint.every_steps=20", "data.ledger=true"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """Run A: the same command, never interrupted."""
    return completed_run(ARGS, tmp_path_factory.mktemp("reference"))


def valid_checkpoints(run_dir: Path) -> list[int]:
    steps = []
    for step, path in list_step_dirs(run_dir / "checkpoints"):
        try:
            manifest.verify(path)
            steps.append(step)
        except manifest.CorruptCheckpoint:
            pass
    return steps


def assert_same_run(run_dir: Path, reference: Path) -> None:
    a, b = final_state(reference), final_state(run_dir)
    for component in ("model", "optimizer", "scheduler"):
        assert_bitwise_equal(a[component], b[component], component)
    assert a["trainer"]["step"] == b["trainer"]["step"] == STEPS
    assert_bitwise_equal(a["trainer"]["rng"], b["trainer"]["rng"], "rng")
    # The ledger of the survivor is the reference's, step for step: nothing skipped or repeated.
    assert read_ledger(run_dir / "ledger/rank-0.jsonl") == read_ledger(
        reference / "ledger/rank-0.jsonl"
    )


def test_sigkill_at_several_points_resumes_bitwise(reference, tmp_path, markers):
    args = [*ARGS, f"run.root={tmp_path}"]
    kill_points = [
        "train.step@step=30",  # mid-epoch, between checkpoints
        "checkpoint.committed@step=80",  # right after a checkpoint (epoch 1)
        "checkpoint.component_written@step=120",  # during a checkpoint write
    ]
    for point in kill_points:
        assert run_until_failpoint(args, point, markers) == int(point.split("=")[1])
        run_dir = run_dir_of(tmp_path)
        assert not (run_dir / "COMPLETE").exists()
        if point != kill_points[0]:  # the first kill may land before step 20's write commits
            assert valid_checkpoints(run_dir), f"no valid checkpoint left after kill at {point}"
    result = run_train(args)
    assert result.returncode == 0, result.stderr
    run_dir = run_dir_of(tmp_path)
    assert_same_run(run_dir, reference)

    # Each restart resumed from a checkpoint before its kill (which one depends on how far the
    # background writes had got when the SIGKILL came).
    resumes = [e["step"] for e in read_events(run_dir / "events.jsonl") if e["event"] == "resume"]
    # (The first kill may even come before step 20 is written: then that restart starts afresh.)
    assert len(resumes) in (2, 3) and all(step % 20 == 0 for step in resumes), resumes
    assert resumes[-2] == 80 and 80 <= resumes[-1] < 120, resumes
    assert not list((run_dir / "checkpoints").glob(".tmp-*")), "half-written checkpoint left behind"


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory) -> Path:
    """A run killed right after committing step 80 (before retention: 20 is still there)."""
    root = tmp_path_factory.mktemp("interrupted")
    markers = tmp_path_factory.mktemp("markers")
    run_until_failpoint([*ARGS, f"run.root={root}"], "checkpoint.committed@step=80", markers)
    assert valid_checkpoints(run_dir_of(root)) == [80, 60, 40, 20]
    return root


def _truncate(ckpt: Path) -> None:
    path = ckpt / "optimizer.bin"
    path.write_bytes(path.read_bytes()[:-100])


def _flip_byte(ckpt: Path) -> None:
    path = ckpt / "model.bin"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _delete_manifest(ckpt: Path) -> None:
    (ckpt / "manifest.json").unlink()


def _manifest_names_missing_file(ckpt: Path) -> None:
    extra = {
        "ghost.pt": {"bytes": 10, "digest": "0" * 32},
        "ghost.bin": {"bytes": 64, "digest": "0" * 32},
    }
    rewrite_manifest(ckpt, lambda files: files.update(extra))


CORRUPTIONS = {
    "truncated": (_truncate, "optimizer.bin has"),
    "flipped": (_flip_byte, "model.bin fails its xxh3_128 checksum"),
    "no_manifest": (_delete_manifest, "no manifest"),
    "missing_file": (_manifest_names_missing_file, "ghost.pt is missing"),
}


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_corrupt_newest_checkpoint_is_skipped(kind, interrupted, reference, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(interrupted, root)
    run_dir = run_dir_of(root)
    corrupt, reason = CORRUPTIONS[kind]
    corrupt(run_dir / "checkpoints" / "step-000000080")

    result = run_train([*ARGS, f"run.root={root}"])
    assert result.returncode == 0, result.stderr
    events = read_events(run_dir / "events.jsonl")
    skipped = [e for e in events if e["event"] == "corrupt_checkpoint_skipped"]
    assert [e["step"] for e in skipped] == [80] and reason in skipped[0]["reason"], skipped
    assert [e["step"] for e in events if e["event"] == "resume"] == [60]
    assert_same_run(run_dir, reference)


def test_on_corrupt_fail_stops_with_clear_error(interrupted, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(interrupted, root)
    _flip_byte(run_dir_of(root) / "checkpoints" / "step-000000080")
    result = run_train([*ARGS, f"run.root={root}", "checkpoint.on_corrupt=fail"])
    assert result.returncode == EXIT_CHECKPOINT_UNUSABLE
    assert "step-000000080" in result.stderr and "on_corrupt=fail" in result.stderr
    assert "Traceback" not in result.stderr
    # Nothing was deleted or moved: the operator can inspect it.
    assert (run_dir_of(root) / "checkpoints" / "step-000000080" / "model.bin").exists()


def test_checkpoint_of_another_config_is_refused(interrupted, tmp_path):
    """Same run directory (explicit run.id), different training config: refused, not half-loaded."""
    root = tmp_path / "root"
    shutil.copytree(interrupted, root)
    run_dir = run_dir_of(root)
    run_id = run_dir.name
    result = run_train(
        [*ARGS, f"run.root={root}", f"run.id={run_id}", "model.hidden=48", "trainer.max_steps=150"]
    )
    assert result.returncode == EXIT_CHECKPOINT_UNUSABLE, result.stderr
    assert (
        "different training config" in result.stderr and "model.hidden: 32 -> 48" in result.stderr
    )
    assert valid_checkpoints(run_dir) == [80, 60, 40, 20]


def test_retention_keeps_last_n_and_survives_kill_during_save(tmp_path, markers):
    args = [
        *FAST,
        "trainer.max_steps=60",
        "checkpoint.every_steps=5",
        "checkpoint.keep_last=2",
        f"run.root={tmp_path}",
    ]
    run_until_failpoint(args, "checkpoint.component_written@step=30", markers)
    run_dir = run_dir_of(tmp_path)
    assert valid_checkpoints(run_dir) == [25, 20]
    result = run_train(args)
    assert result.returncode == 0, result.stderr
    assert valid_checkpoints(run_dir) == [60, 55]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "step-000000055",
        "step-000000060",
    ]
    saved = [e["step"] for e in read_events(run_dir / "events.jsonl") if e["event"] == "checkpoint"]
    assert saved == list(range(5, 30, 5)) + list(range(30, 65, 5))


def test_completed_run_exits_at_once(reference):
    root = reference.parents[1]
    before = (reference / "events.jsonl").read_text()
    result = run_train([*ARGS, f"run.root={root}"])
    assert result.returncode == 0
    assert "already complete" in result.stdout + result.stderr
    assert (reference / "events.jsonl").read_text() == before
    manifest_body = json.loads(
        (list_step_dirs(reference / "checkpoints")[0][1] / "manifest.json").read_text()
    )
    for key in ("step", "epoch", "world_size", "config_digest", "library_version", "components"):
        assert key in manifest_body
