"""What reaches the bucket, and what retention counts there (issue 13: 1, 2, 12, 13), against
moto's S3 server over HTTP: corrupt or vanished local checkpoints are dropped, never uploaded
nor retried; only verified remote checkpoints count; newest first after an outage; a zombie past
its ownership check cannot replace a commit."""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch

from spot.checkpoint import manifest, storage
from spot.checkpoint.manager import CheckpointManager, list_step_dirs
from spot.checkpoint.manifest import step_dir_name
from spot.checkpoint.storage import RemoteError, S3Store
from spot.checkpoint.upload import remote_problem
from spot.run.events import EventLog, read_events
from tests import test_s3
from tests.faultproxy import FaultProxy
from tests.helpers import FAST, run_dir_of, run_train, run_until_failpoint
from tests.test_s3 import CREDENTIALS, env, keys, spot_cli

s3_endpoint = test_s3.s3_endpoint  # its fixtures: a moto server for this module, a bucket a test
bucket = test_s3.bucket
ARGS = [*FAST, "trainer.max_steps=100"]


@pytest.fixture(autouse=True)
def credentials(monkeypatch):
    for key, value in CREDENTIALS.items():
        monkeypatch.setenv(key, value)


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


def state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "model": {"w": torch.randn(256, generator=g)},
        "optimizer": {"m": torch.randn(256, generator=g)},
        "scheduler": {"n": seed},
        "trainer": {"step": seed},
    }


def manager(root: Path, events: EventLog, keep_last: int = 3) -> CheckpointManager:
    return CheckpointManager(
        root,
        keep_last=keep_last,
        async_save=False,
        on_corrupt="previous",
        events=events,
        meta={"config_digest": "x", "training_config": {}},
    )


def wait_for_event(path: Path, name: str, count: int = 1, timeout: float = 60) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [e for e in read_events(path) if e["event"] == name]
        if len(found) >= count:
            return found
        time.sleep(0.02)
    raise AssertionError(f"never saw {count} {name} event(s)")


def verifies(store: S3Store, step: int, into: Path) -> bool:
    try:
        store.download(step, into)
        return True
    except manifest.CorruptCheckpoint:
        return False


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
    store = S3Store(name, prefix_of(run_dir), endpoint_url=s3_endpoint)
    assert store.committed_steps() == [100, 80, 60, 40]
    assert all(verifies(store, step, tmp_path / "check") for step in (100, 80, 60, 40))


def test_a_checkpoint_that_vanished_from_the_queue_is_dropped(s3_endpoint, bucket, tmp_path):
    """Three local checkpoints are queued; while the first upload is held (the proxy holds every
    step PUT), 20 is moved aside, as the restore moves a corrupt one. It is dropped with an
    event, never retried; 10 and 30 are uploaded and the queue drains."""
    client, name = bucket
    started, gate = threading.Event(), threading.Event()

    def rule(method: str, path: str):
        if method == "PUT" and "/step-" in path:
            started.set()
            gate.wait(30)
        return "pass"

    events_path = tmp_path / "events.jsonl"
    events = EventLog(events_path)
    local = manager(tmp_path / "ck", events)
    for step in (10, 20, 30):
        local.save(step, state(step), {})
    with FaultProxy(s3_endpoint, rule) as proxy:
        store = S3Store(name, "runs/r/1", endpoint_url=proxy.url)
        uploader = storage.attach(local, store, events, alert_after=3)
        try:
            assert started.wait(30), "no upload started"
            path = tmp_path / "ck" / step_dir_name(20)
            os.replace(path, path.with_name(f".corrupt-{path.name}-test"))
            gate.set()
            assert uploader.drain(30)
        finally:
            gate.set()
            uploader.close()
    got = read_events(events_path)
    assert [e["step"] for e in got if e["event"] == "upload_skipped"] == [20]
    assert sorted(e["step"] for e in got if e["event"] == "upload") == [10, 30]
    assert not [e for e in got if e["event"] == "upload_failed"]
    assert store.committed_steps() == [30, 10]


# ---- 2: only verified remote checkpoints count ---------------------------------------------


def _plant_bad_manifest(client, name: str, store: S3Store, local: Path, step: int) -> None:
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
    store = S3Store(name, prefix_of(run_dir), endpoint_url=s3_endpoint)
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


def test_local_retention_keeps_what_only_this_disk_has(s3_endpoint, bucket, tmp_path):
    """The bucket's newest checkpoint (60) is unverifiable (a file written again after its
    commit); verified is 40. Nothing can be uploaded now (every step PUT fails). With
    keep_last=1, committing 50 and 60 locally must not delete 50: the bucket has nothing newer
    than 40 that counts (before: 60 did, and 50 was deleted, its upload retried forever)."""
    client, name = bucket
    events = EventLog(tmp_path / "events.jsonl")
    source = manager(tmp_path / "source", EventLog(None), keep_last=10)
    seed = S3Store(name, "runs/r/1", endpoint_url=s3_endpoint)
    seed.claim()
    for step in (40, 60):
        source.save(step, state(step), {})
        seed.upload(tmp_path / "source" / step_dir_name(step), step)
    key = seed.key(step_dir_name(60), "optimizer.bin")
    data = bytearray(client.get_object(Bucket=name, Key=key)["Body"].read())
    data[len(data) // 2] ^= 0x10
    client.put_object(Bucket=name, Key=key, Body=bytes(data))

    rule = lambda method, path: "500" if method == "PUT" and "/step-" in path else "pass"  # noqa: E731
    with FaultProxy(s3_endpoint, rule) as proxy:
        local = manager(tmp_path / "ck", events, keep_last=1)
        store = S3Store(name, "runs/r/1", endpoint_url=proxy.url, max_attempts=1)
        uploader = storage.attach(local, store, events, alert_after=100)
        try:
            local.save(50, state(50), {})
            local.save(60, state(60), {})
            assert sorted(s for s, _ in list_step_dirs(tmp_path / "ck")) == [50, 60]
            assert uploader.newest_uploaded == 40
        finally:
            uploader.close()
    got = read_events(tmp_path / "events.jsonl")
    reported = [(e["step"], e["reason"]) for e in got if e["event"] == "remote_unverified"]
    assert reported == [(60, "files written again after the commit, or no upload receipt")]


def test_a_step_committed_again_replaces_an_unverifiable_remote_copy(s3_endpoint, bucket, tmp_path):
    """The bucket's 60 had a file overwritten after its commit; this disk has a good 60. The
    uploader queues it (before: skipped as a duplicate of the remote one) and replaces the
    remote copy, which then verifies."""
    client, name = bucket
    events = EventLog(tmp_path / "events.jsonl")
    local = manager(tmp_path / "ck", events)
    local.save(60, state(60), {})
    store = S3Store(name, "runs/r/1", endpoint_url=s3_endpoint)
    store.claim()
    store.upload(tmp_path / "ck" / step_dir_name(60), 60)
    key = store.key(step_dir_name(60), "model.bin")
    data = bytearray(client.get_object(Bucket=name, Key=key)["Body"].read())
    data[len(data) // 2] ^= 0x10
    client.put_object(Bucket=name, Key=key, Body=bytes(data))
    assert not verifies(S3Store(name, "runs/r/1", endpoint_url=s3_endpoint), 60, tmp_path / "a")

    uploader = storage.attach(local, S3Store(name, "runs/r/1", endpoint_url=s3_endpoint), events, 3)
    try:
        assert uploader.drain(30)
    finally:
        uploader.close()
    assert verifies(S3Store(name, "runs/r/1", endpoint_url=s3_endpoint), 60, tmp_path / "b")
    got = read_events(tmp_path / "events.jsonl")
    assert [e["step"] for e in got if e["event"] == "remote_unverified"] == [60]
    assert [e["step"] for e in got if e["event"] == "upload"] == [60]


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
        local = manager(tmp_path / "ck", events, keep_last=2)
        store = S3Store(name, "runs/r/1", endpoint_url=proxy.url, max_attempts=1)
        uploader = storage.attach(local, store, events, alert_after=100)
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


# ---- 13: conditional writes ---------------------------------------------------------------


def test_a_zombie_past_its_ownership_check_cannot_replace_a_commit(
    s3_endpoint, bucket, tmp_path, monkeypatch
):
    """A zombie checked that it owns the run just before its successor claimed it (the race
    window, made deterministic by answering its first check with the stale result). The
    successor commits step 7; the zombie's commit of its own step 7 is refused (the manifest
    exists: If-None-Match), it checks again and stops. The successor's manifest stands, and
    the files the zombie wrote over it show in the cheap check: never counted."""
    client, name = bucket
    zombie = S3Store(name, "runs/r/1", endpoint_url=s3_endpoint)
    successor = S3Store(name, "runs/r/1", endpoint_url=s3_endpoint)
    mine = manager(tmp_path / "zombie", EventLog(None))
    theirs = manager(tmp_path / "successor", EventLog(None))
    mine.save(7, state(1), {})
    theirs.save(7, state(2), {})
    zombie.claim()
    successor.claim()
    successor.upload(tmp_path / "successor" / step_dir_name(7), 7)
    stale = iter([True])
    monkeypatch.setattr(zombie, "owns", lambda: next(stale, None) or S3Store.owns(zombie))
    with pytest.raises(RemoteError, match="another process now owns this run"):
        zombie.upload(tmp_path / "zombie" / step_dir_name(7), 7)
    key = successor.key(step_dir_name(7), "manifest.json")
    committed = client.get_object(Bucket=name, Key=key)["Body"].read()
    assert committed == (tmp_path / "successor" / step_dir_name(7) / "manifest.json").read_bytes()
    listed = successor.list_checkpoints()[0]
    assert (
        remote_problem(successor, listed)
        == "files written again after the commit, or no upload receipt"
    )


def test_a_commit_whose_response_was_lost_is_not_refused_by_its_own_retry(
    s3_endpoint, bucket, tmp_path
):
    """The manifest PUT reaches the bucket but its response does not: botocore sends it
    again, and the conditional write (If-None-Match) finds the manifest there. It is this
    writer's own, so the upload succeeds and the checkpoint verifies."""
    client, name = bucket
    sent = []

    def rule(method: str, path: str):
        if method == "PUT" and path.split("?")[0].endswith("/manifest.json"):
            sent.append(path)
            return "lost" if len(sent) == 1 else "pass"
        return "pass"

    local = manager(tmp_path / "ck", EventLog(None))
    local.save(7, state(7), {})
    with FaultProxy(s3_endpoint, rule) as proxy:
        store = S3Store(name, "runs/r/1", endpoint_url=proxy.url)
        store.claim()
        store.upload(tmp_path / "ck" / step_dir_name(7), 7)
    assert len(sent) == 2  # the first one got through, then it was retried
    plain = S3Store(name, "runs/r/1", endpoint_url=s3_endpoint)
    assert remote_problem(plain, plain.list_checkpoints()[0]) is None
    assert verifies(plain, 7, tmp_path / "check")
