"""What reaches the bucket, and what retention counts there (issue 13: 1, 2, 12), against moto's
S3 server over HTTP, with train.py: corrupt local checkpoints are dropped, never uploaded nor
retried; only verified remote checkpoints count; and (in-process, timed) newest first after an
outage. The in-process others: tests/unit/test_s3_integrity.py."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import pytest

from spot.checkpoint import manifest
from spot.checkpoint.manager import list_step_dirs
from spot.checkpoint.manifest import step_dir_name
from spot.run.events import EventLog, read_events
from tests.e2e import test_s3
from tests.e2e.test_s3 import env, keys, spot_cli
from tests.faultproxy import FaultProxy
from tests.helpers import FAST, run_dir_of, run_train, run_until_failpoint, s3_store, verifies
from tests.helpers import checkpoint_manager as manager
from tests.helpers import seeded_state as state

s3_endpoint = test_s3.s3_endpoint  # its fixtures: a moto server for this module, a bucket a test
bucket = test_s3.bucket
pytestmark = pytest.mark.usefixtures("credentials")  # tests/conftest.py
ARGS = [*FAST, "trainer.max_steps=100"]


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def prefix_of(run_dir: Path) -> str:
    """The run's prefix in the bucket (storage.prefix/run.name/run.id)."""
    return f"checkpoints/{run_dir.parent.name}/{run_dir.name}"


def s3_run_args(endpoint: str, bucket_name: str, root: Path, *extra: str) -> list[str]:
    return [
        *ARGS,
        "storage=s3",
        f"storage.bucket={bucket_name}",
        f"storage.endpoint_url={endpoint}",
        f"run.root={root}",
        *extra,
    ]


def new_events(path: Path, before: int) -> list[dict]:
    return read_events(path)[before:]


@pytest.fixture(scope="module")
def local_run(tmp_path_factory) -> Path:
    """A run root with local checkpoints 20, 40, 60 and nothing uploaded: train.py with local
    storage, killed once 60 is committed. Tests copy it."""
    root = tmp_path_factory.mktemp("local-run")
    markers = tmp_path_factory.mktemp("local-run-markers")
    args = [*ARGS, "checkpoint.every_steps=20", f"run.root={root}"]
    assert run_until_failpoint(args, "checkpoint.committed@step=60", markers) == 60
    steps = sorted(s for s, _ in list_step_dirs(run_dir_of(root) / "checkpoints"))
    assert steps == [20, 40, 60]
    return root


def copy_of(local_run: Path, tmp_path: Path) -> Path:
    root = tmp_path / "root"
    shutil.copytree(local_run, root)
    return root


def wait_for_event(path: Path, name: str, count: int = 1, timeout: float = 60) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [e for e in read_events(path) if e["event"] == name]
        if len(found) >= count:
            return found
        time.sleep(0.02)
    raise AssertionError(f"never saw {count} {name} event(s)")


# ---- 1: corrupt local checkpoints ---------------------------------------------------------


@pytest.mark.slow
def test_corrupt_local_checkpoints_are_never_uploaded_nor_block_later_ones(
    s3_endpoint, bucket, local_run, tmp_path
):
    """Local 60 (the newest) and 20 have valid manifests but a corrupt file; nothing is in the
    bucket yet. The restore moves 60 aside and resumes from 40; the uploader refuses 20 (what it
    read does not match the manifest) and drops it. Everything else is uploaded, verifiably, and
    the run ends normally instead of waiting for 20 or 60 forever (exit 4)."""
    client, name = bucket
    root = copy_of(local_run, tmp_path)
    run_dir = run_dir_of(root)
    flip_byte(run_dir / "checkpoints" / "step-000000060" / "optimizer.bin")
    flip_byte(run_dir / "checkpoints" / "step-000000020" / "optimizer.bin")  # model.* go first
    before = len(read_events(run_dir / "events.jsonl"))
    args = s3_run_args(
        s3_endpoint,
        name,
        root,
        "checkpoint.every_steps=20",
        "checkpoint.keep_last=10",  # nothing is superseded: 20 is really tried
        "storage.final_upload_timeout_seconds=20",
    )
    result = run_train(args, env=env())
    assert result.returncode == 0, result.stderr[-3000:]
    events = new_events(run_dir / "events.jsonl", before)
    skipped = [
        (e["step"], e["source"]) for e in events if e["event"] == "corrupt_checkpoint_skipped"
    ]
    assert skipped == [(60, "local")]
    assert [e["step"] for e in events if e["event"] == "resume"] == [40]
    dropped = [(e["step"], e["reason"]) for e in events if e["event"] == "upload_skipped"]
    assert dropped == [(20, "optimizer.bin fails its xxh3_128 checksum")]
    assert sorted(e["step"] for e in events if e["event"] == "upload") == [40, 60, 80, 100]
    assert not [k for k in keys(client, name) if "/step-000000020/" in k]  # none left
    store = s3_store(name, prefix_of(run_dir), endpoint_url=s3_endpoint)
    assert store.committed_steps() == [100, 80, 60, 40]
    assert all(verifies(store, step, tmp_path / "check") for step in (100, 80, 60, 40))


# ---- 2: only verified remote checkpoints count ---------------------------------------------


def _plant_bad_manifest(client, name: str, store, local: Path, step: int) -> None:
    """Replace a remote checkpoint's manifest by a self-consistent one that names a wrong
    checksum: its files, uploaded again unchanged, would not make it whole."""
    body = manifest.read(local).body
    files = {f: dict(e) for f, e in body["files"].items()}
    files["optimizer.bin"]["digest"] = "0" * 32
    generated = ("format", "library_version", "hash", "components", "files")
    meta = {k: v for k, v in body.items() if k not in generated}
    key = store.key(step_dir_name(step), "manifest.json")
    client.put_object(Bucket=name, Key=key, Body=manifest.build(files, meta))


@pytest.mark.slow
def test_an_unverifiable_remote_checkpoint_is_not_counted(
    s3_endpoint, bucket, local_run, tmp_path, markers
):
    """The bucket holds 40 and a newer 60 whose manifest does not match its files. A fresh
    machine resumes from 40 (keep_last=1, a checkpoint every 10 steps) and uploads 50: remote
    retention keeps 50 (before: 60 counted as the one to keep, and 50 and 40 were deleted, so
    the next machine started from step 0), and 60 is reported, not counted."""
    client, name = bucket
    root = copy_of(local_run, tmp_path)
    run_dir = run_dir_of(root)
    store = s3_store(name, prefix_of(run_dir), endpoint_url=s3_endpoint)
    store.claim()
    for step in (40, 60):
        store.upload(run_dir / "checkpoints" / step_dir_name(step), step)
    _plant_bad_manifest(client, name, store, run_dir / "checkpoints" / step_dir_name(60), 60)
    shutil.rmtree(root)  # a fresh machine

    args = s3_run_args(
        s3_endpoint, name, root, "checkpoint.every_steps=10", "checkpoint.keep_last=1"
    )
    run_until_failpoint(args, test_s3.held("upload.retained", 50), markers, env=env())
    assert store.committed_steps() == [60, 50]  # 60 neither counted nor deleted; 40 went
    assert verifies(store, 50, tmp_path / "check")
    events = read_events(run_dir_of(root) / "events.jsonl")
    skipped = [
        (e["step"], e["source"]) for e in events if e["event"] == "corrupt_checkpoint_skipped"
    ]
    assert skipped == [(60, "remote")]
    assert [e["step"] for e in events if e["event"] == "resume"] == [40]
    unverified = [e for e in events if e["event"] == "remote_unverified"]
    assert [e["step"] for e in unverified] == [60]
    assert "optimizer.bin fails its xxh3_128 checksum" in unverified[0]["reason"]
    assert [e["step"] for e in events if e["event"] == "upload"] == [50]
    listed = spot_cli("list", f"s3://{name}/{prefix_of(run_dir)}", s3_endpoint)
    rows = {line.split()[0]: line for line in listed.stdout.splitlines()[1:]}
    assert rows["50"].endswith("uploaded") and "UNVERIFIED: files written again" in rows["60"]


# ---- 12: newest first ------------------------------------------------------------------------


@pytest.mark.serial
def test_after_an_outage_the_newest_goes_first_and_the_superseded_not_at_all(
    s3_endpoint, bucket, tmp_path
):
    """Checkpoints 10..40 are committed during an outage; their uploads fail and back off.
    The outage ends as 50 (an emergency checkpoint, the newest) is committed: 50 is tried at
    once, not after the backoff running for an older one, and goes first; then 40; with
    keep_last=2, 30, 20 and 10 would be deleted from the bucket at once, so they are never
    sent."""
    client, name = bucket
    outage = threading.Event()
    outage.set()

    def rule(method: str, path: str):
        if "/step-000000050/" in path:
            outage.clear()  # the service is back when the emergency upload starts
        return "500" if outage.is_set() and "/step-" in path else "pass"

    events_path = tmp_path / "events.jsonl"
    events = EventLog(events_path)
    with FaultProxy(s3_endpoint, rule) as proxy:
        store = s3_store(name, "runs/r/1", endpoint_url=proxy.url, max_attempts=1)
        local = manager(tmp_path / "ck", events, keep_last=2, store=store, alert_after=100)
        uploader = local.start_uploads()
        try:
            for step in (10, 20, 30, 40):
                local.save(step, state(step), {})
            failed = wait_for_event(events_path, "upload_failed", count=3)
            # Three failures in a row: the backoff now running is 4 s (1, 2, 4, ...).
            local.save(50, state(50), {})
            assert uploader.drain(60)
        finally:
            uploader.close()
    got = read_events(events_path)
    uploads = [e for e in got if e["event"] == "upload"]
    assert [e["step"] for e in uploads] == [50, 40]
    began = uploads[0]["time"] - uploads[0]["seconds"]
    assert began - failed[-1]["time"] < 4.0  # it did not wait out the older one's backoff
    skipped = {e["step"]: e["reason"] for e in got if e["event"] == "upload_skipped"}
    assert sorted(skipped) == [10, 20, 30]
    assert all(r.startswith("superseded") for r in skipped.values()), skipped
    assert store.committed_steps() == [50, 40]
    sent = {k.split("/")[3] for k in keys(client, name) if "/step-" in k}
    assert sent == {"step-000000040", "step-000000050"}  # not one object of 10, 20, 30
