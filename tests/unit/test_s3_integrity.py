"""What reaches the bucket, and what retention counts there (issue 13: 1, 2, 12, 13), against
moto's S3 server over HTTP, in-process: vanished local checkpoints are dropped, never uploaded
nor retried; only verified remote checkpoints count; a zombie past its ownership check cannot
replace a commit. With train.py, and newest first after an outage: tests/e2e/test_s3_integrity.py."""

from __future__ import annotations

import os
import threading

import pytest

from spot.checkpoint.manager import list_step_dirs
from spot.checkpoint.manifest import step_dir_name
from spot.checkpoint.upload import remote_problem
from spot.run.events import EventLog, read_events
from tests.e2e import test_s3
from tests.faultproxy import FaultProxy
from tests.helpers import checkpoint_manager as manager
from tests.helpers import s3_store, verifies
from tests.helpers import seeded_state as state

s3_endpoint = test_s3.s3_endpoint  # its fixtures: a moto server for this module, a bucket a test
bucket = test_s3.bucket
pytestmark = pytest.mark.usefixtures("credentials")  # tests/conftest.py


# ---- 1: corrupt local checkpoints ---------------------------------------------------------


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
        store = s3_store(name, "runs/r/1", endpoint_url=proxy.url)
        # A new process on this disk: its uploads start after its restore.
        uploader = manager(tmp_path / "ck", events, store=store).start_uploads()
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


def test_local_retention_keeps_what_only_this_disk_has(s3_endpoint, bucket, tmp_path):
    """The bucket's newest checkpoint (60) is unverifiable (a file written again after its
    commit); verified is 40. Nothing can be uploaded now (every step PUT fails). With
    keep_last=1, committing 50 and 60 locally must not delete 50: the bucket has nothing newer
    than 40 that counts (before: 60 did, and 50 was deleted, its upload retried forever)."""
    client, name = bucket
    events = EventLog(tmp_path / "events.jsonl")
    source = manager(tmp_path / "source", EventLog(None), keep_last=10)
    seed = s3_store(name, "runs/r/1", endpoint_url=s3_endpoint)
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
        store = s3_store(name, "runs/r/1", endpoint_url=proxy.url, max_attempts=1)
        local = manager(tmp_path / "ck", events, keep_last=1, store=store, alert_after=100)
        uploader = local.start_uploads()
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
    store = s3_store(name, "runs/r/1", endpoint_url=s3_endpoint)
    store.claim()
    store.upload(tmp_path / "ck" / step_dir_name(60), 60)
    key = store.key(step_dir_name(60), "model.bin")
    data = bytearray(client.get_object(Bucket=name, Key=key)["Body"].read())
    data[len(data) // 2] ^= 0x10
    client.put_object(Bucket=name, Key=key, Body=bytes(data))
    assert not verifies(s3_store(name, "runs/r/1", endpoint_url=s3_endpoint), 60, tmp_path / "a")

    store = s3_store(name, "runs/r/1", endpoint_url=s3_endpoint)
    uploader = manager(tmp_path / "ck", events, store=store).start_uploads()  # a new process
    try:
        assert uploader.drain(30)
    finally:
        uploader.close()
    assert verifies(s3_store(name, "runs/r/1", endpoint_url=s3_endpoint), 60, tmp_path / "b")
    got = read_events(tmp_path / "events.jsonl")
    assert [e["step"] for e in got if e["event"] == "remote_unverified"] == [60]
    assert [e["step"] for e in got if e["event"] == "upload"] == [60]


# ---- 13: conditional writes ---------------------------------------------------------------


# A zombie past its ownership check: tests/unit/test_buckets.py, on every back end.


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
        store = s3_store(name, "runs/r/1", endpoint_url=proxy.url)
        store.claim()
        store.upload(tmp_path / "ck" / step_dir_name(7), 7)
    assert len(sent) == 2  # the first one got through, then it was retried
    plain = s3_store(name, "runs/r/1", endpoint_url=s3_endpoint)
    assert remote_problem(plain, plain.list_checkpoints()[0]) is None
    assert verifies(plain, 7, tmp_path / "check")


# ---- issue 15: the best checkpoint ----------------------------------------------------------


def _best(events, record=None):
    from spot.checkpoint.best import BestCheckpoint
    from spot.run.config import BestConfig

    best = BestCheckpoint(BestConfig(metric="val/loss", mode="min"), events, ("disk", "bucket"))
    best.restore(record)
    return best


def _restart_and_upload(tmp_path, store, record) -> dict[int, list[int]]:
    """A new process (keep_last=1) restores `record` and uploads what this disk holds; for each
    upload, in order, the steps committed in the bucket when it landed (before its retention)."""
    seen: dict[int, list[int]] = {}
    events = EventLog(tmp_path / "restart.jsonl")
    events.subscribe(
        lambda e: e["event"] == "upload" and seen.setdefault(e["step"], store.committed_steps())
    )
    restarted = manager(
        tmp_path / "ck", events, keep_last=1, store=store, best=_best(events, record)
    )
    uploader = restarted.start_uploads()
    try:
        assert uploader.drain(30)
    finally:
        uploader.close()
    return {step: sorted(steps) for step, steps in seen.items()}


def test_the_best_checkpoint_is_spared_by_both_retentions(s3_endpoint, bucket, tmp_path):
    """keep_last=1 with step 20 the best: after 30 and 40 commit and upload, 20 is still on
    this disk and in the bucket; once 40 is the best, 20 goes from both."""
    client, name = bucket
    events = EventLog(tmp_path / "events.jsonl")
    store = s3_store(name, "runs/r/1", endpoint_url=s3_endpoint)
    best = _best(events)
    local = manager(tmp_path / "ck", events, keep_last=1, store=store, best=best)
    uploader = local.start_uploads()
    try:
        local.save(10, state(10), {})
        assert best.consider({"val/loss": 1.0}, 20)
        for step in (20, 30, 40):
            local.save(step, state(step), {})
        assert uploader.drain(30)
        assert sorted(s for s, _ in list_step_dirs(tmp_path / "ck")) == [20, 40]
        assert sorted(store.committed_steps()) == [20, 40]
        assert best.consider({"val/loss": 0.5}, 40)
        local.save(50, state(50), {})
        assert uploader.drain(30)
    finally:
        uploader.close()
    assert sorted(s for s, _ in list_step_dirs(tmp_path / "ck")) == [40, 50]
    assert sorted(store.committed_steps()) == [40, 50]


def test_the_old_best_stays_in_the_bucket_until_the_new_one_is_there(s3_endpoint, bucket, tmp_path):
    """20 (the best) is in the bucket; 30, 40 (the new best) and 50 commit on this disk only,
    and the process dies. The next one restores 50, whose record names 40 (and 20 before it),
    and uploads newest first: 50, then 40. When 40's upload lands, 20 must still be in the
    bucket (50's retention spared it: the bucket was never without a best); then it goes."""
    client, name = bucket
    events = EventLog(tmp_path / "events.jsonl")
    store = s3_store(name, "runs/r/1", endpoint_url=s3_endpoint)
    first = _best(events)
    local = manager(tmp_path / "ck", events, keep_last=1, store=store, best=first)
    uploader = local.start_uploads()
    first.consider({"val/loss": 1.0}, 20)
    local.save(20, state(20), {})
    assert uploader.drain(30)
    uploader.close()  # the uploader is gone (a kill): what commits now stays on this disk
    local.save(30, state(30), {})
    first.consider({"val/loss": 0.5}, 40)
    for step in (40, 50):
        local.save(step, state(step), {})
    assert store.committed_steps() == [20]

    seen = _restart_and_upload(tmp_path, store, first.retention_record)
    assert seen[40] == [20, 40, 50]
    assert sorted(store.committed_steps()) == [40, 50]
    assert sorted(s for s, _ in list_step_dirs(tmp_path / "ck")) == [40, 50]


def test_two_new_bests_before_either_is_uploaded_leave_the_old_one_in_the_bucket(
    s3_endpoint, bucket, tmp_path
):
    """20 (the best) is in the bucket; 40 and 50 are new bests in a row, committed here while
    uploads are stopped, then 60; the next process uploads newest first (60, then 50): 20 is in
    the bucket until 50 is, and the bucket always holds a best."""
    client, name = bucket
    events = EventLog(tmp_path / "events.jsonl")
    store = s3_store(name, "runs/r/1", endpoint_url=s3_endpoint)
    first = _best(events)
    local = manager(tmp_path / "ck", events, keep_last=1, store=store, best=first)
    uploader = local.start_uploads()
    first.consider({"val/loss": 1.0}, 20)
    local.save(20, state(20), {})
    assert uploader.drain(30)
    uploader.close()
    for step, loss in ((40, 0.9), (50, 0.8)):
        first.consider({"val/loss": loss}, step)
        local.save(step, state(step), {})
    local.save(60, state(60), {})

    seen = _restart_and_upload(tmp_path, store, first.retention_record)
    # At each upload, before its retention: 20 stays until 50 (the best) is in the bucket.
    assert list(seen.items()) == [(60, [20, 60]), (50, [20, 50, 60])]
    assert sorted(store.committed_steps()) == [50, 60]


def test_a_best_committed_behind_newer_uploads_is_uploaded_after_a_restart(
    s3_endpoint, bucket, tmp_path
):
    """20, the best, is committed here while uploads are stopped, then 30 and 40; 30 and 40 reach
    the bucket (another uploader, as a newest-first backlog would), and the process dies. The
    next one must upload 20, although it is older than every step in the bucket."""
    client, name = bucket
    events = EventLog(tmp_path / "events.jsonl")
    store = s3_store(name, "runs/r/1", endpoint_url=s3_endpoint)
    best = _best(events)
    local = manager(tmp_path / "ck", events, keep_last=2, store=store, best=best)
    best.consider({"val/loss": 1.0}, 20)
    for step in (20, 30, 40):
        local.save(step, state(step), {})
    store.claim()
    for step in (30, 40):
        store.upload(tmp_path / "ck" / step_dir_name(step), step)
    restarted = manager(
        tmp_path / "ck", events, keep_last=2, store=store, best=_best(events, best.retention_record)
    )
    uploader = restarted.start_uploads()
    try:
        uploader.drain(30)  # (its answer is about 20, the newest submitted: not kept as such)
    finally:
        uploader.close()
    assert sorted(store.committed_steps()) == [20, 30, 40]
