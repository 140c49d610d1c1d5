"""CheckpointManager on a real file system: commit protocol, verification, retention, errors."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from spot.checkpoint import manifest
from spot.checkpoint.manager import (
    CheckpointManager,
    CheckpointUnusable,
    CheckpointWriteError,
    list_step_dirs,
)
from spot.fsutil import digest_bytes
from spot.run.events import EventLog, read_events
from tests.helpers import assert_bitwise_equal, rewrite_manifest

DIGEST = "d" * 16


def make_state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "model": {"w": torch.randn(64, 64, generator=g), "b": torch.randn(64, generator=g)},
        "optimizer": {
            "state": {0: {"step": torch.tensor(float(seed))}},
            "param_groups": [{"lr": 0.1, "params": [0]}],
        },
        "scheduler": {"last_epoch": seed},
        "trainer": {"step": seed, "rng": torch.get_rng_state()},
    }


def manager(
    root: Path, *, keep_last=3, async_save=False, on_corrupt="previous"
) -> CheckpointManager:
    return CheckpointManager(
        root,
        keep_last=keep_last,
        async_save=async_save,
        on_corrupt=on_corrupt,
        events=EventLog(root.parent / "events.jsonl"),
        meta={"config_digest": DIGEST, "training_config": {"lr": 0.1}, "world_size": 1},
    )


@pytest.mark.parametrize("async_save", [False, True])
def test_round_trip_is_bitwise(tmp_path, async_save):
    m = manager(tmp_path / "ck", async_save=async_save)
    state = make_state(7)
    m.save(7, state, {"epoch": 0})
    m.close()
    loaded = m.load_latest(DIGEST, {"lr": 0.1})
    assert loaded.step == 7
    assert_bitwise_equal(state, loaded.state)
    body = json.loads((loaded.path / "manifest.json").read_text())
    assert body["files"]["model.bin"]["bytes"] == (loaded.path / "model.bin").stat().st_size
    assert body["components"] == ["model", "optimizer", "scheduler", "trainer"]
    assert body["world_size"] == 1 and body["config_digest"] == DIGEST and body["epoch"] == 0


def test_async_snapshot_is_isolated_from_later_updates(tmp_path):
    m = manager(tmp_path / "ck", async_save=True)
    state = make_state(1)
    expected = {k: v.clone() for k, v in state["model"].items()}
    m.save(1, state, {})
    state["model"]["w"].add_(1.0)  # training goes on while the checkpoint is written
    m.close()
    assert_bitwise_equal(expected, m.load_latest(DIGEST, {"lr": 0.1}).state["model"])


def test_retention_keeps_last_n(tmp_path):
    m = manager(tmp_path / "ck", keep_last=2)
    for step in range(1, 6):
        m.save(step, make_state(step), {})
    assert [s for s, _ in list_step_dirs(tmp_path / "ck")] == [5, 4]


def test_retention_counts_only_committed(tmp_path):
    root = tmp_path / "ck"
    m = manager(root, keep_last=1)
    m.save(1, make_state(1), {})
    (root / "step-000000009").mkdir()  # torn leftover without a manifest: not a checkpoint
    m.save(2, make_state(2), {})
    assert [s for s, _ in list_step_dirs(root)] == [9, 2]


def test_failed_save_keeps_previous_and_leaves_no_temporary(tmp_path):
    root = tmp_path / "ck"
    m = manager(root, keep_last=1)
    m.save(1, make_state(1), {})
    bad = make_state(2)
    bad["trainer"]["callback"] = lambda: None  # cannot be serialised
    with pytest.raises(CheckpointWriteError, match="step 2"):
        m.save(2, bad, {})
    assert [s for s, _ in list_step_dirs(root)] == [1]
    assert not [p for p in root.iterdir() if p.name.startswith(".")]
    manifest.verify(root / "step-000000001")


def test_async_error_surfaces_on_next_call(tmp_path):
    m = manager(tmp_path / "ck", async_save=True)
    bad = make_state(1)
    bad["trainer"]["callback"] = lambda: None
    m.save(1, bad, {})
    with pytest.raises(CheckpointWriteError):
        m.wait()


def test_corrupt_newest_falls_back_and_is_moved_aside(tmp_path):
    root = tmp_path / "ck"
    m = manager(root)
    for step in (1, 2):
        m.save(step, make_state(step), {})
    model = root / "step-000000002" / "model.bin"
    data = model.read_bytes()
    model.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    loaded = m.load_latest(DIGEST, {"lr": 0.1})
    assert loaded.step == 1
    assert [s for s, _ in list_step_dirs(root)] == [1]
    assert any(p.name.startswith(".corrupt-step-000000002") for p in root.iterdir())
    skipped = [
        e
        for e in read_events(tmp_path / "events.jsonl")
        if e["event"] == "corrupt_checkpoint_skipped"
    ]
    assert (
        skipped[0]["step"] == 2 and "model.bin fails its xxh3_128 checksum" in skipped[0]["reason"]
    )


def test_on_corrupt_fail(tmp_path):
    root = tmp_path / "ck"
    m = manager(root, on_corrupt="fail")
    m.save(1, make_state(1), {})
    (root / "step-000000001" / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointUnusable, match="on_corrupt=fail"):
        m.load_latest(DIGEST, {"lr": 0.1})


def test_manifest_tampering_is_caught(tmp_path):
    root = tmp_path / "ck"
    m = manager(root)
    m.save(3, make_state(3), {})
    path = root / "step-000000003" / "manifest.json"
    body = json.loads(path.read_text())
    body["step"] = 4  # edited without updating the manifest's own digest
    path.write_text(json.dumps(body))
    with pytest.raises(manifest.CorruptCheckpoint, match="own checksum"):
        manifest.read(root / "step-000000003")


def test_unsafe_file_names_are_refused(tmp_path):
    root = tmp_path / "ck"
    m = manager(root)
    m.save(3, make_state(3), {})
    ckpt = root / "step-000000003"
    rewrite_manifest(ckpt, lambda files: files.update({"../../outside.pt": files.pop("model.pt")}))
    with pytest.raises(manifest.CorruptCheckpoint, match="unsafe file"):
        manifest.read(ckpt)


def test_pickled_code_is_never_run(tmp_path):
    """A checkpoint whose file carries an arbitrary pickle (checksums updated to match) is refused
    by weights_only loading, and its payload never runs."""
    root = tmp_path / "ck"
    m = manager(root)
    m.save(5, make_state(5), {})
    ckpt = root / "step-000000005"
    canary = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {canary}",))

    evil = ckpt / "trainer.pt"
    torch.save({"x": Exploit()}, evil, pickle_module=pickle)
    data = evil.read_bytes()
    entry = {"bytes": len(data), "digest": digest_bytes(data)}
    rewrite_manifest(ckpt, lambda files: files.update({"trainer.pt": entry}))
    with pytest.raises(manifest.CorruptCheckpoint, match="does not load"):
        CheckpointManager.load(ckpt)
    assert not canary.exists()


def test_other_config_is_refused_with_the_difference(tmp_path):
    m = manager(tmp_path / "ck")
    m.save(1, make_state(1), {})
    with pytest.raises(CheckpointUnusable, match=r"lr: 0.1 -> 0.2"):
        m.load_latest("e" * 16, {"lr": 0.2})


def test_stale_temporaries_are_removed(tmp_path):
    root = tmp_path / "ck"
    (root / ".tmp-step-000000004-123-abcd").mkdir(parents=True)
    (root / ".tmp-step-000000004-123-abcd" / "model.pt").write_bytes(b"half")
    m = manager(root)
    m.remove_stale()
    assert list(root.iterdir()) == []


def test_spot_cli_lists_verifies_and_inspects(tmp_path):
    import subprocess
    import sys

    from tests.helpers import REPO

    root = tmp_path / "run" / "checkpoints"
    m = manager(root)
    for step in (10, 20):
        m.save(step, make_state(step), {"epoch": 0})

    def spot(*args):
        return subprocess.run(
            [sys.executable, "-m", "spot", *args],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )

    listed = spot("list", str(tmp_path / "run"))
    assert listed.returncode == 0 and listed.stdout.count("valid") == 2
    flip = root / "step-000000020" / "optimizer.bin"
    data = flip.read_bytes()
    flip.write_bytes(data[:2] + bytes([data[2] ^ 1]) + data[3:])
    assert spot("list", str(root)).returncode == 0, "list reads manifests only"
    verified = spot("verify", str(root))
    assert verified.returncode == 1
    assert "INVALID: optimizer.bin fails its xxh3_128 checksum" in verified.stdout
    inspected = spot("inspect", str(root))
    assert (
        inspected.returncode == 0
        and "step: 10" in inspected.stdout
        and "w: (64, 64)" in inspected.stdout
    )


def test_a_checkpoint_from_before_a_key_was_added_resumes_at_the_key_s_old_value(tmp_path):
    """A checkpoint's config lacks a key the template added since (data.partitions): at the
    value that trains as before (KEYS_ADDED) it resumes, though the digest differs; any other
    value, another type, or a new key not in the table is a different training config."""
    from spot.run.config import keys_added

    m = manager(tmp_path / "ck")
    m.save(7, make_state(7), {"epoch": 0})
    m.close()
    now = {"lr": 0.1, "data": {"partitions": 1, "order": "uniform"}}
    assert m.load_latest("e" * 16, now, keys_added()).step == 7
    for data, named in (
        ({"partitions": 2}, r"data.partitions: None -> 2"),
        ({"partitions": True}, r"data.partitions: None -> True"),
        ({"partitions": 1, "new": {}}, r"data.new: None -> \{\}"),
    ):
        with pytest.raises(CheckpointUnusable, match=named):
            m.load_latest("e" * 16, {**now, "data": data}, keys_added())
    with pytest.raises(CheckpointUnusable, match=r"data: None -> \{"):
        m.load_latest("e" * 16, now)  # (without the table: any new key is a difference)
