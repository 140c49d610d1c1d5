"""Downloads under faults (issue 13: 14, and the download parts of 11), against moto's S3 server
over HTTP through the fault proxy: a reset or a 5xx mid-GET ends in a verified download or a
clean fallback to an older checkpoint; a download is durable before it becomes a checkpoint;
a killed download's staging directory is cleaned up."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest

from spot.checkpoint.manager import CheckpointManager
from spot.checkpoint.manifest import step_dir_name
from spot.checkpoint.storage import RemoteCheckpoints
from spot.checkpoint.upload import remote_problem
from spot.run.events import EventLog, read_events
from tests.e2e import test_s3
from tests.faultproxy import FaultProxy
from tests.helpers import s3_store
from tests.helpers import seeded_state as state

s3_endpoint = test_s3.s3_endpoint  # its fixtures: a moto server for this module, a bucket a test
bucket = test_s3.bucket
pytestmark = pytest.mark.usefixtures("credentials")  # tests/conftest.py
PREFIX = "runs/r/1"


@pytest.fixture
def remote(s3_endpoint, bucket, tmp_path) -> str:
    """A bucket holding verified checkpoints 40 and 60 of one run; returns the bucket's name."""
    _, name = bucket
    source = manager(tmp_path / "source", EventLog(None))
    store = s3_store(name, PREFIX, endpoint_url=s3_endpoint)
    store.claim()
    for step in (40, 60):
        source.save(step, state(step), {})
        store.upload(tmp_path / "source" / step_dir_name(step), step)
    return name


def manager(root: Path, events: EventLog, remote=None) -> CheckpointManager:
    return CheckpointManager(
        root,
        keep_last=3,
        async_save=False,
        on_corrupt="previous",
        events=events,
        meta={"config_digest": "x", "training_config": {}},
        remote=remote,
    )


def restore_through(proxy: FaultProxy, name: str, tmp_path: Path):
    """A fresh machine's restore (an empty disk) through the proxy: the loaded checkpoint and
    the events."""
    events = EventLog(tmp_path / "events.jsonl")
    store = s3_store(name, PREFIX, endpoint_url=proxy.url, max_attempts=3)
    fresh = manager(tmp_path / "fresh", events, RemoteCheckpoints(store, events, alert_after=3))
    loaded = fresh.load_latest("x", {})
    return loaded, read_events(tmp_path / "events.jsonl"), store


def test_resets_and_5xx_mid_download_are_retried_to_a_verified_checkpoint(
    s3_endpoint, remote, tmp_path
):
    """The first GET of every object of step 60 fails: a reset halfway through the body (the
    manifest's, first), a 500, a 503, a SlowDown, in turn. Every one is retried, and 60 is
    restored, verified."""
    seen: Counter = Counter()
    faults = ["reset", "500", "503", "slowdown"]

    def rule(method: str, path: str):
        if method != "GET" or "/step-000000060/" not in path:
            return "pass"
        seen[path] += 1
        return faults[(len(seen) - 1) % len(faults)] if seen[path] == 1 else "pass"

    with FaultProxy(s3_endpoint, rule) as proxy:
        loaded, events, _ = restore_through(proxy, remote, tmp_path)
    assert set(faults) <= {action for _, _, action in proxy.log}
    assert next(iter(seen)).split("?")[0].endswith("/manifest.json")  # its GET was reset
    assert loaded is not None and loaded.step == 60
    assert [e["step"] for e in events if e["event"] == "download"] == [60]
    assert not [e for e in events if e["event"] == "corrupt_checkpoint_skipped"]


@pytest.mark.parametrize("fault", ["reset", "500"])
def test_a_download_that_keeps_failing_falls_back_cleanly(s3_endpoint, remote, tmp_path, fault):
    """Every GET of step 60's optimizer.bin fails, past every retry: 60 is skipped with one
    clear line, the restore falls back to 40, no staging directory is left, and 60 is not
    counted as in the bucket (retention)."""

    def rule(method: str, path: str):
        if method == "GET" and path.split("?")[0].endswith("/step-000000060/optimizer.bin"):
            return fault
        return "pass"

    with FaultProxy(s3_endpoint, rule) as proxy:
        loaded, events, store = restore_through(proxy, remote, tmp_path)
    assert loaded is not None and loaded.step == 40
    skipped = [e for e in events if e["event"] == "corrupt_checkpoint_skipped"]
    assert [(e["step"], e["source"]) for e in skipped] == [(60, "remote")]
    reason = skipped[0]["reason"]
    assert reason.startswith("remote optimizer.bin unreadable (") and "\n" not in reason
    assert not list((tmp_path / "fresh").glob(".download-*"))
    assert remote_problem(store, store.list_checkpoints()[0]) == f"download failed: {reason}"


def test_a_download_is_durable_before_it_is_renamed_into_place(
    s3_endpoint, remote, tmp_path, monkeypatch
):
    """Every downloaded file, and the staging directory, is fsynced before the rename that
    makes it `step-N`: a power cut after it never leaves a checkpoint with unwritten files.
    (os.fsync and os.replace are the real ones, observed on the way.)"""
    order: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        order.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst, *args, **kwargs):
        order.append(("replace", str(src)))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    store = s3_store(remote, PREFIX, endpoint_url=s3_endpoint)
    final = store.download(60, tmp_path / "into")
    staging = next(src for op, src in order if op == "replace" and ".download-" in src)
    renamed = order.index(("replace", staging))
    synced = {path for op, path in order[:renamed] if op == "fsync"}
    for file in sorted(p.name for p in final.iterdir()):
        assert f"{staging}/{file}" in synced, f"{file} not fsynced before the rename"
    assert staging in synced  # its directory entries too


def test_remove_stale_deletes_the_staging_directory_of_a_killed_download(tmp_path):
    """A process killed mid-download leaves `.download-step-N-*` behind (a partial copy, no
    checkpoint): the next start removes it, with the other leftovers, and keeps checkpoints."""
    root = tmp_path / "ck"
    local = manager(root, EventLog(None))
    local.save(20, state(20), {})
    staging = root / ".download-step-000000060-0123abcd"
    staging.mkdir()
    (staging / "model.bin").write_bytes(b"partial")
    local.remove_stale()
    assert sorted(p.name for p in root.iterdir()) == ["step-000000020"]
