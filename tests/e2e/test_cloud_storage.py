"""train.py with its checkpoints in Google Cloud Storage and Azure Blob Storage, each against a
real protocol server on loopback started here (gcp-storage-emulator, Azurite: tests/emulators.py):
a kill during an upload, then a fresh machine resumes from the bucket bitwise; a notice commits
the emergency checkpoint in the bucket before exit 75; bad input stops at once with one line.
The storage layer's own guarantees on each back end (receipts, preconditions, retention):
tests/unit/test_buckets.py; S3: tests/e2e/test_s3.py."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from spot.buckets import open_bucket
from spot.checkpoint.storage import RemoteStore
from spot.checkpoint.upload import remote_problem
from spot.run.events import read_events
from spot.run.exitcodes import EXIT_BAD_CONFIG, EXIT_PREEMPTED
from tests import emulators
from tests.helpers import (
    FAST,
    REPO,
    assert_bitwise_equal,
    completed_run,
    final_state,
    run_dir_of,
    run_train,
    run_until_failpoint,
    start_train,
    train_env,
    wait_for_step,
)

pytestmark = pytest.mark.slow

STEPS = 100
BASE = [*FAST, f"trainer.max_steps={STEPS}", "checkpoint.every_steps=20"]
SCHEME = {"gcs": "gs", "azure": "az"}


@pytest.fixture(scope="module", params=("gcs", "azure"))
def service(request, tmp_path_factory):
    logs = tmp_path_factory.mktemp(f"{request.param}-server")
    if request.param == "gcs":
        with emulators.gcs_emulator(logs / "gcs.log") as endpoint:
            yield request.param, endpoint
    else:
        with emulators.azurite(logs / "azurite.log") as endpoint:
            yield request.param, endpoint


@pytest.fixture
def bucket(service):
    backend, endpoint = service
    name = f"b-{uuid.uuid4().hex[:12]}"
    emulators.create_bucket(backend, endpoint, name)
    return backend, endpoint, name


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    return completed_run(BASE, tmp_path_factory.mktemp("reference"))


def args_for(bucket, root: Path) -> list[str]:
    backend, endpoint, name = bucket
    return [
        *BASE,
        f"storage={backend}",
        f"storage.bucket={name}",
        f"storage.endpoint_url={endpoint}",
        f"run.root={root}",
    ]


def env_for(bucket) -> dict[str, str]:
    backend, endpoint, _ = bucket
    extra = (
        {"AZURE_STORAGE_CONNECTION_STRING": emulators.azurite_connection(endpoint)}
        if backend == "azure"
        else {}
    )
    return train_env(**extra)


def run_url(bucket, run_dir: Path) -> str:
    backend, _, name = bucket
    return f"{SCHEME[backend]}://{name}/checkpoints/default/{run_dir.name}"


def store_of(bucket, run_dir: Path) -> RemoteStore:
    backend, endpoint, name = bucket
    if backend == "azure":
        os.environ["AZURE_STORAGE_CONNECTION_STRING"] = emulators.azurite_connection(endpoint)
    return RemoteStore(
        open_bucket(backend, name, endpoint_url=endpoint), f"checkpoints/default/{run_dir.name}"
    )


def test_killed_during_an_upload_a_fresh_machine_resumes_from_the_bucket_bitwise(
    bucket, reference, tmp_path, markers
):
    """SIGKILL while step 40's files are up and its manifest is not: `spot list` on the bucket's
    URL shows 40 incomplete; a fresh machine (empty disk) resumes from 20, the newest committed,
    and ends bitwise equal to an uninterrupted run."""
    args, env = args_for(bucket, tmp_path), env_for(bucket)
    failpoints = "upload.file_uploaded@step=40,train.step@step=41"
    run_until_failpoint(args, failpoints, markers, env=env)
    run_dir = run_dir_of(tmp_path)
    listed = subprocess.run(
        [sys.executable, "-m", "spot", "list", run_url(bucket, run_dir)]
        + ["--endpoint-url", bucket[1]],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert listed.returncode == 0, listed.stderr
    rows = {line.split()[0]: line for line in listed.stdout.splitlines()[1:]}
    assert "uploaded" in rows["20"] and "INCOMPLETE: no manifest" in rows["40"], listed.stdout
    shutil.rmtree(tmp_path)

    result = run_train(args, env=env)
    assert result.returncode == 0, result.stderr
    run_dir = run_dir_of(tmp_path)
    events = read_events(run_dir / "events.jsonl")
    assert [e["step"] for e in events if e["event"] == "download"] == [20]
    assert [e["step"] for e in events if e["event"] == "resume"] == [20]
    a, b = final_state(reference), final_state(run_dir)
    for component in ("model", "optimizer", "scheduler"):
        assert_bitwise_equal(a[component], b[component], component)
    store = store_of(bucket, run_dir)
    assert [c.step for c in store.list_checkpoints()] == [100, 80, 60]  # keep_last=3 there too


def test_a_notice_commits_the_emergency_checkpoint_in_the_bucket_before_exit_75(
    bucket, reference, tmp_path
):
    args = [*args_for(bucket, tmp_path), "trainer.log_every=1"]
    proc = start_train(args, {**env_for(bucket), "SPOT_FAILPOINTS": "train.step@sleep=0.03"})
    try:
        wait_for_step(tmp_path, 30, proc)
        os.killpg(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == EXIT_PREEMPTED, out[-3000:]
    run_dir = run_dir_of(tmp_path)
    (emergency,) = [
        e for e in read_events(run_dir / "events.jsonl") if e["event"] == "emergency_checkpoint"
    ]
    store = store_of(bucket, run_dir)
    newest = store.list_checkpoints()[0]
    assert newest.step == emergency["step"] and newest.committed
    assert remote_problem(store, newest) is None
    if bucket[0] == "azure":  # the account key (Azurite's) is in no file and no object
        secret = emulators.AZURITE_KEY.encode()
        assert not [p for p in tmp_path.rglob("*") if p.is_file() and secret in p.read_bytes()]
        for info in store.bucket.list(""):
            assert secret not in store.bucket.get(info.key)[0], info.key
    shutil.rmtree(tmp_path)

    result = run_train(args, env=env_for(bucket))
    assert result.returncode == 0, result.stderr
    events = read_events(run_dir_of(tmp_path) / "events.jsonl")
    assert [e["step"] for e in events if e["event"] == "resume"] == [emergency["step"]]
    assert_bitwise_equal(
        final_state(reference)["model"], final_state(run_dir_of(tmp_path))["model"]
    )


def test_bad_input_stops_with_one_line_before_any_run_directory(bucket, tmp_path):
    """A container that does not exist, no credentials: exit 2, one line naming the bucket,
    before any run directory is written. (An endpoint where nothing listens: the same line,
    tests/unit/test_buckets.py.)"""
    name = bucket[2]
    no_credentials = ["storage.endpoint_url=null", "storage.account=nobody"]
    cases = {
        "missing": ([f"storage.bucket={name}-missing"], env_for(bucket)),
        "no credentials": (no_credentials, emulators.no_cloud_credentials(train_env())),
    }
    for case, (extra, env) in cases.items():
        root = tmp_path / case.replace(" ", "-")
        result = run_train([*args_for(bucket, root), *extra], env=env)
        assert result.returncode == EXIT_BAD_CONFIG, (case, result.stderr[-2000:])
        errors = [line for line in result.stderr.splitlines() if "storage.bucket" in line]
        assert errors and name in errors[-1], (case, result.stderr[-2000:])
        assert not root.exists() or not any(root.rglob("*.jsonl")), case
