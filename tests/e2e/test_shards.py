"""train.py on a data set in a bucket (data=shards, spot/shards/), against moto's S3 server on
loopback: written with `python -m spot data write`, trained from, killed, and resumed on a node
whose cache is empty, ending bitwise equal to an uninterrupted run on the local data set."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from spot.run.events import read_events
from tests.e2e import test_s3
from tests.helpers import (
    FAST,
    REPO,
    assert_bitwise_equal,
    completed_run,
    final_state,
    run_dir_of,
    run_train,
    run_until_failpoint,
)

s3_endpoint = test_s3.s3_endpoint  # its fixtures: a moto server for this module, a bucket a test
bucket = test_s3.bucket
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("credentials")]

BASE = [*FAST, "trainer.max_steps=100", "checkpoint.every_steps=20"]


def test_a_data_set_in_a_bucket_trains_resumes_on_an_empty_cache_and_matches_the_local_one(
    s3_endpoint, bucket, tmp_path, markers
):
    _, name = bucket
    url = f"s3://{name}/vectors"
    written = subprocess.run(
        [sys.executable, "-m", "spot", "data", "write", url, "--shard-mb", "0.02"]
        + ["--endpoint-url", s3_endpoint],
        cwd=REPO,
        env=test_s3.env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert written.returncode == 0, written.stderr
    assert "wrote 4096 samples in" in written.stdout
    reference = completed_run(BASE, tmp_path / "reference")  # data=vectors, from memory

    cache = tmp_path / "cache"
    args = [
        *BASE,
        "data=shards",
        f"data.dataset.url={url}",
        f"data.dataset.endpoint_url={s3_endpoint}",
        f"data.cache_dir={cache}",
        "data.cache_limit_gb=0.0002",  # about a third of the data set: shards evicted
        "model.in_features=32",  # what data=vectors' config says of its samples
        "model.num_classes=10",
        f"run.root={tmp_path / 'runs'}",
    ]
    step = run_until_failpoint(args, "train.step@step=70", markers, env=test_s3.env())
    assert step == 70
    shutil.rmtree(cache)  # a new node: nothing cached
    result = run_train(args, env=test_s3.env())
    assert result.returncode == 0, result.stderr
    run_dir = run_dir_of(tmp_path / "runs")
    resumed = [e["step"] for e in read_events(run_dir / "events.jsonl") if e["event"] == "resume"]
    assert len(resumed) == 1 and resumed[0] in (40, 60)  # (60 may still be writing at the kill)
    a, b = final_state(reference), final_state(run_dir)
    for component in ("model", "optimizer"):
        assert_bitwise_equal(a[component], b[component], component)
    assert any(cache.rglob("shard-*"))  # (the limit itself: tests/unit/test_shards.py)


def test_a_corrupt_shard_stops_with_exit_3_and_an_unreachable_bucket_with_exit_75(
    s3_endpoint, bucket, tmp_path
):
    """A shard in the bucket that does not match its index (downloaded twice): exit 3 and one
    line naming it. The bucket unreachable for the shards (503 on each, after botocore's
    retries): exit 75, retry later, never called corrupt."""
    from spot.run.exitcodes import EXIT_CHECKPOINT_UNUSABLE, EXIT_PREEMPTED
    from spot.shards.write import write
    from tests.faultproxy import FaultProxy
    from tests.unit.test_shards import Samples

    client, name = bucket
    write(Samples(256), f"s3://{name}/ds", 1024, {"endpoint_url": s3_endpoint})
    args = [
        *FAST,
        "trainer.max_steps=4",
        "data=shards",
        f"data.dataset.url=s3://{name}/ds",
        "data.shuffle=false",  # step 1 reads shard 0 first
        "model.in_features=16",
        "model.num_classes=7",
    ]

    def unreachable(method: str, path: str):
        return "503" if "/shard-" in path else "pass"

    with FaultProxy(s3_endpoint, unreachable) as proxy:
        cut = run_train(
            [*args, f"data.dataset.endpoint_url={proxy.url}", f"data.cache_dir={tmp_path / 'a'}"]
            + [f"run.root={tmp_path / 'runs-a'}"],
            env=test_s3.env(),
        )
    assert cut.returncode == EXIT_PREEMPTED, cut.stderr[-2000:]
    assert "data unavailable, retry later: shard shard-00000.bin" in cut.stderr

    key = "ds/shard-00000.bin"
    body = bytearray(client.get_object(Bucket=name, Key=key)["Body"].read())
    body[3] ^= 1
    client.put_object(Bucket=name, Key=key, Body=bytes(body))
    bad = run_train(
        [*args, f"data.dataset.endpoint_url={s3_endpoint}", f"data.cache_dir={tmp_path / 'b'}"]
        + [f"run.root={tmp_path / 'runs-b'}"],
        env=test_s3.env(),
    )
    assert bad.returncode == EXIT_CHECKPOINT_UNUSABLE, bad.stderr[-2000:]
    last = bad.stderr.strip().splitlines()[-1]
    assert last.startswith("data error: shard shard-00000.bin does not match its index"), last
