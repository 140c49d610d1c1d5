"""Remote checkpoints against a real S3 protocol server (moto's, over HTTP on loopback), through
boto3 with endpoint_url: upload, resume on a fresh machine, torn uploads, corrupt objects."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from pathlib import Path

import boto3
import pytest

from spot.run.events import read_events
from spot.run.exitcodes import EXIT_BAD_CONFIG
from tests.helpers import (
    CREDENTIALS,
    FAST,
    REPO,
    assert_bitwise_equal,
    completed_run,
    final_state,
    run_dir_of,
    run_train,
    run_until_failpoint,
    train_env,
)

pytestmark = pytest.mark.slow

STEPS = 100
BASE = [*FAST, f"trainer.max_steps={STEPS}", "checkpoint.every_steps=20"]


@pytest.fixture(scope="module")
def s3_endpoint():
    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def bucket(s3_endpoint, request):
    name = f"ckpt-{request.node.name.lower().replace('_', '-')[:40]}".strip("-")
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1", **_keys())
    client.create_bucket(Bucket=name)
    return client, name


def _keys():
    return {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}


def s3_args(endpoint: str, bucket: str, root: Path) -> list[str]:
    return [
        *BASE,
        "storage=s3",
        f"storage.bucket={bucket}",
        f"storage.endpoint_url={endpoint}",
        f"run.root={root}",
    ]


def env():
    return train_env(**CREDENTIALS)


def spot_cli(command: str, url: str, endpoint: str):
    return subprocess.run(
        [sys.executable, "-m", "spot", command, url, "--endpoint-url", endpoint],
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def keys(client, bucket: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def held(upload_point: str, step: int) -> str:
    """Failpoints: the upload of `step` stops at `upload_point`, and training waits at the next
    step, so no newer checkpoint exists: uploads go newest first, and one committed meanwhile
    would go before `step` (or make it superseded)."""
    return f"{upload_point}@step={step},train.step@step={step + 1}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    return completed_run(BASE, tmp_path_factory.mktemp("s3-reference"))


def test_uploads_and_resumes_on_a_fresh_machine(s3_endpoint, bucket, reference, tmp_path, markers):
    client, name = bucket
    args = s3_args(s3_endpoint, name, tmp_path)
    step = run_until_failpoint(args, held("upload.committed", 60), markers, env=env())
    assert step == 60
    run_dir = run_dir_of(tmp_path)
    uploads = [e["step"] for e in read_events(run_dir / "events.jsonl") if e["event"] == "upload"]
    assert uploads[-1] == 60 and set(uploads) <= {20, 40, 60}
    shutil.rmtree(tmp_path)  # the machine is gone, its disk with it

    result = run_train(args, env=env())
    assert result.returncode == 0, result.stderr
    run_dir = run_dir_of(tmp_path)
    events = read_events(run_dir / "events.jsonl")
    assert [e["step"] for e in events if e["event"] == "download"] == [60]
    assert [e["step"] for e in events if e["event"] == "resume"] == [60]
    assert sorted(e["step"] for e in events if e["event"] == "upload") == [80, 100]
    a, b = final_state(reference), final_state(run_dir)
    for component in ("model", "optimizer", "scheduler"):
        assert_bitwise_equal(a[component], b[component], component)
    prefix = f"checkpoints/default/{run_dir.name}/"
    stored = keys(client, name)
    assert f"{prefix}COMPLETE" in stored
    # keep_last=3 applies to the bucket too; each committed step has its manifest.
    steps = sorted(
        {k[len(prefix) :].split("/")[0] for k in stored if k.startswith(prefix + "step-")}
    )
    assert steps == ["step-000000060", "step-000000080", "step-000000100"]

    shutil.rmtree(tmp_path)  # a finished run is finished everywhere
    again = run_train(args, env=env())
    assert again.returncode == 0 and "already complete" in again.stdout + again.stderr


def test_sigkill_during_upload_leaves_no_manifest(
    s3_endpoint, bucket, reference, tmp_path, markers
):
    client, name = bucket
    args = s3_args(s3_endpoint, name, tmp_path)
    run_until_failpoint(args, held("upload.file_uploaded", 40), markers, env=env())
    run_dir = run_dir_of(tmp_path)
    prefix = f"checkpoints/default/{run_dir.name}/step-000000040/"
    partial = [k for k in keys(client, name) if k.startswith(prefix)]
    assert partial and f"{prefix}manifest.json" not in partial  # files up, not committed
    url = f"s3://{name}/checkpoints/default/{run_dir.name}"
    listed = spot_cli("list", url, s3_endpoint)
    assert listed.returncode == 0, listed.stderr
    rows = {line.split()[0]: line for line in listed.stdout.splitlines()[1:]}
    assert "uploaded" in rows["20"] and "INCOMPLETE: no manifest" in rows["40"]
    verified = spot_cli("verify", url, s3_endpoint)
    assert verified.returncode == 0 and "20  valid" in verified.stdout
    shutil.rmtree(tmp_path)

    result = run_train(args, env=env())
    assert result.returncode == 0, result.stderr
    events = read_events(run_dir_of(tmp_path) / "events.jsonl")
    assert [e["step"] for e in events if e["event"] == "resume"] == [20]
    assert_bitwise_equal(
        final_state(reference)["model"], final_state(run_dir_of(tmp_path))["model"]
    )


def test_corrupt_object_in_the_bucket_falls_back(s3_endpoint, bucket, reference, tmp_path, markers):
    client, name = bucket
    args = s3_args(s3_endpoint, name, tmp_path)
    run_until_failpoint(args, held("upload.committed", 60), markers, env=env())
    run_dir = run_dir_of(tmp_path)
    # The newest good checkpoint in the bucket: 40, unless 60 committed while 40 was still
    # waiting to upload (under load), which then went first (newest first) and was held.
    listed = client.list_objects_v2(Bucket=name, Prefix=f"checkpoints/default/{run_dir.name}/")
    manifests = [o["Key"] for o in listed.get("Contents", []) if o["Key"].endswith("manifest.json")]
    fallback = max(int(k.split("/")[-2][5:]) for k in manifests if "step-000000060" not in k)
    key = f"checkpoints/default/{run_dir.name}/step-000000060/optimizer.bin"
    data = bytearray(client.get_object(Bucket=name, Key=key)["Body"].read())
    data[len(data) // 2] ^= 0x10
    client.put_object(Bucket=name, Key=key, Body=bytes(data))
    verified = spot_cli("verify", f"s3://{name}/checkpoints/default/{run_dir.name}", s3_endpoint)
    assert verified.returncode == 1
    assert "60  INVALID: optimizer.bin fails its xxh3_128 checksum" in verified.stdout
    shutil.rmtree(tmp_path)

    result = run_train(args, env=env())
    assert result.returncode == 0, result.stderr
    events = read_events(run_dir_of(tmp_path) / "events.jsonl")
    skipped = [e for e in events if e["event"] == "corrupt_checkpoint_skipped"]
    assert [(e["step"], e["source"]) for e in skipped] == [(60, "remote")]
    assert "optimizer.bin fails its xxh3_128 checksum" in skipped[0]["reason"]
    assert [e["step"] for e in events if e["event"] == "resume"] == [fallback]
    assert fallback in (20, 40)
    assert_bitwise_equal(
        final_state(reference)["optimizer"], final_state(run_dir_of(tmp_path))["optimizer"]
    )
    assert not list(run_dir_of(tmp_path).glob("checkpoints/.download-*"))


def test_missing_bucket_and_missing_credentials_fail_at_start(s3_endpoint, tmp_path):
    result = run_train(s3_args(s3_endpoint, "no-such-bucket", tmp_path), env=env())
    assert result.returncode == EXIT_BAD_CONFIG
    assert result.stderr.strip() == "config error: storage.bucket=no-such-bucket: does not exist"
    assert not tmp_path.exists() or not any(tmp_path.iterdir())

    bare = train_env(
        AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
        AWS_CONFIG_FILE=str(tmp_path / "none"),
        AWS_EC2_METADATA_DISABLED="true",
    )
    for key in CREDENTIALS:
        bare.pop(key, None)
    result = run_train(s3_args(s3_endpoint, "any-bucket", tmp_path), env=bare)
    assert result.returncode == EXIT_BAD_CONFIG
    assert "storage.bucket=any-bucket: no AWS credentials found" in result.stderr
    assert "Traceback" not in result.stderr


def test_credentials_never_reach_logs_or_checkpoints(s3_endpoint, bucket, tmp_path):
    client, name = bucket
    secret = "Sup3rS3cretKeyValue"
    result = run_train(
        s3_args(s3_endpoint, name, tmp_path),
        env=train_env(
            AWS_ACCESS_KEY_ID="testing",
            AWS_SECRET_ACCESS_KEY=secret,
            AWS_DEFAULT_REGION="us-east-1",
        ),
    )
    assert result.returncode == 0, result.stderr
    assert secret not in result.stdout + result.stderr
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
    for key in keys(client, name):
        assert secret.encode() not in client.get_object(Bucket=name, Key=key)["Body"].read(), key


@pytest.mark.serial
def test_transient_faults_are_retried_and_training_never_waits(
    s3_endpoint, bucket, reference, tmp_path
):
    """500, 503, SlowDown, a reset mid-response and a slow endpoint on every checkpoint upload:
    botocore's retries absorb them, every checkpoint is uploaded, the loop never waits."""
    from collections import Counter

    from tests.faultproxy import FaultProxy

    client, name = bucket
    seen: Counter = Counter()
    faults = ["500", "503", "slowdown", "reset"]

    def rule(method: str, path: str):
        if method != "PUT" or "/step-" not in path:
            return "pass"
        seen[path] += 1
        if seen[path] == 1:
            return faults[len(seen) % len(faults)]
        return ("slow", 1.0) if seen[path] == 2 else "pass"

    with FaultProxy(s3_endpoint, rule) as proxy:
        result = run_train(s3_args(proxy.url, name, tmp_path), env=env())
    assert result.returncode == 0, result.stderr
    assert set(faults) <= {action for _, _, action in proxy.log}
    events = read_events(run_dir_of(tmp_path) / "events.jsonl")
    assert not [e for e in events if e["event"] == "upload_failed"]  # retries absorbed them all
    # Newest first: the uploads lag behind training, so an older one may be superseded (the
    # bucket keeps 3) instead of uploaded.
    uploaded = {e["step"] for e in events if e["event"] == "upload"}
    superseded = {e["step"] for e in events if e["event"] == "upload_skipped"}
    assert {60, 80, 100} <= uploaded and uploaded | superseded == {20, 40, 60, 80, 100}
    uploads = [e["seconds"] for e in events if e["event"] == "upload"]
    stalls = [e["stall_seconds"] for e in events if e["event"] == "checkpoint"]
    assert min(uploads) >= 1.0  # every upload went through a fault and a slow response
    assert max(stalls) < min(uploads) / 3, (stalls, uploads)  # the loop never waited for them
    assert_bitwise_equal(
        final_state(reference)["model"], final_state(run_dir_of(tmp_path))["model"]
    )


def test_outage_is_reported_loudly_and_uploads_finish_after(s3_endpoint, bucket, tmp_path):
    import threading
    import time

    from spot.checkpoint.manager import list_step_dirs
    from tests.faultproxy import FaultProxy

    client, name = bucket
    down = threading.Event()
    down.set()

    def rule(method: str, path: str):
        return "500" if down.is_set() and "/step-" in path else "pass"

    with FaultProxy(s3_endpoint, rule) as proxy:
        args = [
            *s3_args(proxy.url, name, tmp_path),
            "storage.max_attempts=1",
            "storage.alert_after_failures=2",
        ]
        proc = subprocess.Popen(
            [sys.executable, str(REPO / "train.py"), *args],
            cwd=REPO,
            env=env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            deadline = time.monotonic() + 120
            events: list = []
            while time.monotonic() < deadline:
                runs = list(tmp_path.glob("*/*/events.jsonl"))
                events = read_events(runs[0]) if runs else []
                if any(e["event"] == "upload_failing" for e in events) and any(
                    e["event"] == "checkpoint" and e["reason"] == "final" for e in events
                ):
                    break
                time.sleep(0.2)
            run_dir = run_dir_of(tmp_path)
            committed = [e["step"] for e in events if e["event"] == "checkpoint"]
            assert committed == [20, 40, 60, 80, 100]
            local = sorted(s for s, _ in list_step_dirs(run_dir / "checkpoints"))
            assert local == committed  # keep_last=3, but nothing un-uploaded was deleted
            down.clear()  # the endpoint recovers
            output, _ = proc.communicate(timeout=180)
        finally:
            proc.kill()
    assert proc.returncode == 0, output
    assert "checkpoint uploads in a row failed" in output
    events = read_events(run_dir / "events.jsonl")
    assert len([e for e in events if e["event"] == "upload_failed"]) >= 2
    assert len([e for e in events if e["event"] == "upload_failing"]) == 1
    # Newest first once the endpoint is back; 20 and 40 would be deleted from the bucket at once
    # (keep_last=3), so they are not sent.
    assert sorted(e["step"] for e in events if e["event"] == "upload") == [60, 80, 100]
    assert sorted(e["step"] for e in events if e["event"] == "upload_skipped") == [20, 40]
    assert sorted(s for s, _ in list_step_dirs(run_dir / "checkpoints")) == [60, 80, 100]


def test_a_zombie_writer_is_fenced(s3_endpoint, bucket, tmp_path):
    """Two processes of the same run: the one that started last owns it; the other's uploads
    stop before they commit anything."""
    import os

    import torch

    from spot.checkpoint.manager import CheckpointManager
    from spot.checkpoint.storage import RemoteError
    from spot.run.events import EventLog
    from tests.helpers import s3_store

    client, name = bucket
    for key, value in CREDENTIALS.items():
        os.environ.setdefault(key, value)
    local = CheckpointManager(
        tmp_path / "ck",
        keep_last=3,
        async_save=False,
        on_corrupt="fail",
        events=EventLog(None),
        meta={"config_digest": "x"},
    )
    state = {"model": {"w": torch.ones(4)}, "optimizer": {}, "scheduler": {}, "trainer": {}}
    local.save(7, state, {})
    zombie = s3_store(name, "runs/r/1", endpoint_url=s3_endpoint)
    successor = s3_store(name, "runs/r/1", endpoint_url=s3_endpoint)
    zombie.claim()
    zombie.upload(tmp_path / "ck" / "step-000000007", 7)
    successor.claim()
    with pytest.raises(RemoteError, match="another process now owns this run"):
        zombie.upload(tmp_path / "ck" / "step-000000007", 8 - 1)
    assert successor.owns() and not zombie.owns()
    successor.upload(tmp_path / "ck" / "step-000000007", 7)
    assert successor.committed_steps() == [7]


def test_hostile_keys_never_escape_the_checkpoint_directory(s3_endpoint, bucket, tmp_path, markers):
    """A bucket writer plants a newer 'checkpoint' whose manifest names ../../ paths and a key
    with .. in it: resume refuses it and writes nothing outside the checkpoint directory."""
    from spot.checkpoint import manifest

    client, name = bucket
    args = s3_args(s3_endpoint, name, tmp_path / "root")
    run_until_failpoint(args, held("upload.committed", 40), markers, env=env())
    run_dir = run_dir_of(tmp_path / "root")
    prefix = f"checkpoints/default/{run_dir.name}"
    body = manifest.read(run_dir / "checkpoints" / "step-000000040").body
    files = {"../../../escape.bin": {"bytes": 4, "digest": "0" * 32}, **body["files"]}
    meta = {
        k: v
        for k, v in body.items()
        if k not in ("format", "library_version", "hash", "components", "files")
    }
    evil = manifest.build(files, {**meta, "step": 90})
    client.put_object(Bucket=name, Key=f"{prefix}/step-000000090/manifest.json", Body=evil)
    client.put_object(Bucket=name, Key=f"{prefix}/step-000000090/../../../escape.bin", Body=b"evil")
    shutil.rmtree(tmp_path / "root")

    result = run_train(args, env=env())
    assert result.returncode == 0, result.stderr
    events = read_events(run_dir_of(tmp_path / "root") / "events.jsonl")
    skipped = [e for e in events if e["event"] == "corrupt_checkpoint_skipped"]
    assert [(e["step"], e["source"]) for e in skipped] == [(90, "remote")]
    assert "unsafe file" in skipped[0]["reason"]
    assert [e["step"] for e in events if e["event"] == "resume"] == [40]
    assert not list(tmp_path.rglob("escape.bin"))


def test_a_new_run_starts_from_the_weights_of_a_run_in_a_bucket(s3_endpoint, bucket, tmp_path):
    """init.checkpoint=s3://...: a fine-tuning run on a machine that never saw the source run
    downloads its newest verified checkpoint (LR 0 here: the weights stay the source's)."""
    client, name = bucket
    source = run_train(s3_args(s3_endpoint, name, tmp_path / "a"), env=env())
    assert source.returncode == 0, source.stderr
    run_id = run_dir_of(tmp_path / "a").name
    url = f"s3://{name}/checkpoints/default/{run_id}"
    args = [
        *FAST,
        "trainer.max_steps=1",
        "run.name=finetune",
        f"init.checkpoint={url}",
        f"storage.endpoint_url={s3_endpoint}",
        "optimizer.lr=0",
        "optimizer.weight_decay=0",
        f"run.root={tmp_path / 'b'}",
    ]
    result = run_train(args, env=env())
    assert result.returncode == 0, result.stderr
    run_dir = run_dir_of(tmp_path / "b")
    (init,) = [e for e in read_events(run_dir / "events.jsonl") if e["event"] == "init"]
    assert init["source"] == f"{url}/step-{STEPS:09d}" and init["step"] == STEPS
    source_model = final_state(run_dir_of(tmp_path / "a"))["model"]
    assert_bitwise_equal(source_model, final_state(run_dir)["model"], "model")


def test_sharded_checkpoints_go_up_whole_and_a_fresh_machine_resumes_at_another_world_size(
    s3_endpoint, bucket, tmp_path, markers
):
    """trainer.strategy=fsdp at 2 ranks with storage=s3. Held between the files and the manifest
    of step 40: every rank's shard is in the bucket and no manifest (a checkpoint there is the
    manifest). The machine is then gone: a fresh one with 3 ranks resumes from the bucket's
    newest committed checkpoint, resharded; `spot export` gathers the whole model from it."""
    from safetensors.torch import load_file

    client, name = bucket
    args = [
        *s3_args(s3_endpoint, name, tmp_path),
        "trainer.strategy=fsdp",
        "elastic.nproc_per_node=2",
        "trainer.max_steps=60",
    ]
    run_until_failpoint(args, held("upload.file_uploaded", 40), markers, env=env())
    run_dir = run_dir_of(tmp_path)
    prefix = f"checkpoints/default/{run_dir.name}/step-000000040/"
    sent = {k[len(prefix) :] for k in keys(client, name) if k.startswith(prefix)}
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata", "trainer.bin"} <= sent
    assert "manifest.json" not in sent
    shutil.rmtree(tmp_path)

    result = run_train([*args[:-2], "elastic.nproc_per_node=3", "trainer.max_steps=60"], env=env())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_dir = run_dir_of(tmp_path)
    events = read_events(run_dir / "events.jsonl")
    assert [e["step"] for e in events if e["event"] == "download"] == [20]
    assert [e["step"] for e in events if e["event"] == "resume"] == [20]
    assert [
        (e["previous"], e["world_size"]) for e in events if e["event"] == "world_size_change"
    ] == [(2, 3)]
    url = f"s3://{name}/checkpoints/default/{run_dir.name}"
    verified = spot_cli("verify", url, s3_endpoint)
    assert verified.returncode == 0 and "60  valid" in verified.stdout, verified.stdout
    out = tmp_path / "model.safetensors"
    exported = subprocess.run(
        [sys.executable, "-m", "spot", "export", url, str(out), "--endpoint-url", s3_endpoint],
        cwd=REPO, env=env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert exported.returncode == 0, exported.stderr
    assert_bitwise_equal(load_file(out), final_state(run_dir)["model"])
