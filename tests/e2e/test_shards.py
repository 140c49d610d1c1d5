"""train.py on a data set in a bucket (data=shards, spot/shards/), against moto's S3 server on
loopback: written with `python -m spot data write`, trained from, killed, and resumed on a node
whose cache is empty, ending bitwise equal to an uninterrupted run on the local data set."""

from __future__ import annotations

import bisect
import functools
import itertools
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from spot.distributed.sampler import ResumableBatchSampler
from spot.run.events import read_events
from spot.run.exitcodes import EXIT_CHECKPOINT_UNUSABLE
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
VECTORS = ["model.in_features=32", "model.num_classes=10"]  # data=vectors' samples, for the MLP


def write_vectors(out: str, endpoint: str | None, *overrides: str) -> dict:
    """data=vectors (with `overrides`) as shards of about 0.02 MiB (33 of them) in `out`."""
    from spot.shards.write import dataset_of, write

    return write(
        dataset_of(list(overrides), "dataset"), out, int(0.02 * 2**20), {"endpoint_url": endpoint}
    )


def shards_args(url: str, endpoint: str | None, cache: Path, root: Path) -> list[str]:
    """train.py on the shards at `url` (data=shards, in the shard order), cached in `cache`."""
    return [
        *VECTORS,
        "data=shards",  # data.order=shards
        f"data.dataset.url={url}",
        f"data.dataset.endpoint_url={endpoint}" if endpoint else "data.dataset.endpoint_url=null",
        f"data.cache_dir={cache}",
        f"run.root={root}",
    ]


def shards_read(index: dict, run_dir: Path, position: int, until_step: int) -> list[set[int]]:
    """The shards each epoch reads from sample `position` of epoch 0 up to `until_step` (the
    run's own order: its seed, one rank)."""
    seed = OmegaConf.load(run_dir / "config.yaml").seed
    ends = list(itertools.accumulate(s["samples"] for s in index["shards"]))
    sampler = ResumableBatchSampler(ends[-1], 64, seed=seed, groups=ends, window=4)
    sampler.taken = [position]
    epochs, step = [], position // 64
    while step < until_step:
        epochs.append(set())
        for plan in itertools.islice(sampler.remaining_plans(), until_step - step):
            epochs[-1] |= {bisect.bisect_right(ends, i) for batch in plan for i in batch}
            step += 1
        sampler.next_epoch()
    return epochs


def test_a_data_set_in_a_bucket_trains_resumes_on_an_empty_cache_and_matches_the_local_one(
    s3_endpoint, bucket, tmp_path, markers
):
    """Written to the bucket with `python -m spot data write`; trained from it, SIGKILLed; the
    bucket's data rewritten (other samples) is refused on resume in one line; written back,
    resumed on a node whose cache is empty, fetching only the shards its remaining steps read:
    bitwise equal to an uninterrupted run on a local copy of the same shards."""
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
    index = write_vectors(str(tmp_path / "local"), None)  # the same shards, on local disk
    assert f"identity shards:{index['digest']}" in written.stdout
    local = shards_args(str(tmp_path / "local"), None, tmp_path / "ref-cache", tmp_path / "ref")
    reference = completed_run([*BASE, *local[:-1]], tmp_path / "ref")  # (run.root: its own)

    cache = tmp_path / "cache"
    args = [*BASE, *shards_args(url, s3_endpoint, cache, tmp_path / "runs")]
    args.append("data.cache_limit_gb=0.0003")  # about a third of the data set
    step = run_until_failpoint(args, "train.step@step=70", markers, env=test_s3.env())
    assert step == 70

    write_vectors(url, s3_endpoint, "seed=1")  # the data set rewritten in the bucket
    refused = run_train(args, env=test_s3.env())
    assert refused.returncode == EXIT_CHECKPOINT_UNUSABLE, refused.stderr[-2000:]
    assert "trained on other data" in refused.stderr.strip().splitlines()[-1]

    write_vectors(url, s3_endpoint)  # written back: the same bytes, the same identity
    shutil.rmtree(cache)  # a new node: nothing cached
    result = run_train(args, env=test_s3.env())
    assert result.returncode == 0, result.stderr
    run_dir = run_dir_of(tmp_path / "runs")
    events = read_events(run_dir / "events.jsonl")
    resumed = [e["step"] for e in events if e["event"] == "resume"]
    assert resumed[-1] in (40, 60)  # (60 may still be writing at the kill)
    a, b = final_state(reference), final_state(run_dir)
    for component in ("model", "optimizer"):
        assert_bitwise_equal(a[component], b[component], component)

    # What the resumed node downloaded: each shard its remaining steps read, at most once per
    # epoch (the shards of the next steps are never evicted), and none it skipped. (The
    # prefetch also asks for those of the 7 steps after the last: data.prefetch_steps=8.)
    last_start = max(i for i, e in enumerate(events) if e["event"] == "start")
    logged = [e for e in events[last_start:] if e["event"] == "train"]
    fetched = sum(e["data_fetched_bytes"] for e in logged)
    read = functools.partial(shards_read, index, run_dir, resumed[-1] * 64)
    size = {n: s["bytes"] for n, s in enumerate(index["shards"])}
    assert sum(size[n] for n in set().union(*read(100))) <= fetched
    assert fetched <= sum(size[n] for epoch in read(107) for n in epoch)
    assert all(e["data_wait_seconds"] >= 0 for e in logged)
    cached = sum(p.stat().st_size for p in cache.rglob("shard-*"))
    assert 0 < cached <= 0.0003 * 2**30  # (the limit through an epoch: test_shards.py's unit)


def test_a_corrupt_shard_stops_with_exit_3_and_an_unreachable_bucket_with_exit_75(
    s3_endpoint, bucket, tmp_path
):
    """A shard in the bucket that does not match its index (downloaded twice): exit 3 and one
    line naming it. The bucket unreachable for the shards (503 on each, after botocore's
    retries): exit 75, retry later, never called corrupt."""
    from spot.run.exitcodes import EXIT_PREEMPTED
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


def test_from_a_bucket_2_then_3_then_1_ranks_with_sigkills_read_each_sample_once(
    s3_endpoint, bucket, tmp_path, markers
):
    """One epoch from the bucket in the shard order with two partitions: 2 ranks, SIGKILLed;
    3 ranks, SIGKILLed; 1 rank to the end. The ledger: every sample of the epoch exactly once
    across both changes, though each world took its own part of each partition per step."""
    from tests.e2e.test_elastic import epoch_indices, ranks

    _, name = bucket
    url = f"s3://{name}/vectors"
    write_vectors(url, s3_endpoint)
    args = [
        *FAST,
        *shards_args(url, s3_endpoint, tmp_path / "cache", tmp_path / "runs"),
        "trainer.max_steps=null",
        "trainer.max_epochs=1",  # 4096 samples: 128, then 192, then 64 per step
        "checkpoint.every_steps=5",
        "data.ledger=true",
        "data.partitions=2",
        "data.cache_limit_gb=0.0003",
        "elastic.reference_world_size=2",
    ]
    env = test_s3.env()
    # Each killed once its checkpoint is committed (else the next world resumes from the one
    # before, and the world-size changes are not those the test names).
    for world, step in ((2, 10), (3, 15)):
        at = f"checkpoint.committed@step={step}"
        assert run_until_failpoint([*args, *ranks(world)], at, markers, env=env) == step
    result = run_train([*args, *ranks(1)], env=env, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_dir = run_dir_of(tmp_path / "runs")
    events = read_events(run_dir / "events.jsonl")
    changes = [
        (e["previous"], e["world_size"]) for e in events if e["event"] == "world_size_change"
    ]
    assert changes == [(2, 3), (3, 1)]
    assert epoch_indices(run_dir, 0) == list(range(4096))  # nothing skipped, nothing twice


def test_a_validation_split_of_shards_is_evaluated_and_an_unset_one_is_one_line(tmp_path):
    """`data write --split val` and data.val.url: evaluation reads it (its own cache, the
    dataset's keys); eval.every_steps without data.val.url exits 2 naming the key."""
    from spot.shards.write import dataset_of, write

    write(dataset_of([], "dataset"), str(tmp_path / "train"), 2**16, {})
    write(dataset_of([], "val"), str(tmp_path / "val"), 2**16, {})
    args = [
        *FAST,
        *shards_args(str(tmp_path / "train"), None, tmp_path / "cache", tmp_path / "runs"),
        "trainer.max_steps=10",
        "eval.every_steps=5",
    ]
    unset = run_train(args)
    assert unset.returncode == 2, unset.stderr[-2000:]
    assert unset.stderr.strip().splitlines()[-1].startswith("config error: data.val: ")
    assert "url is not set" in unset.stderr
    result = run_train([*args, f"data.val.url={tmp_path / 'val'}"])
    assert result.returncode == 0, result.stderr[-2000:]
    evals = [
        e
        for e in read_events(run_dir_of(tmp_path / "runs") / "events.jsonl")
        if e["event"] == "eval"
    ]
    assert [e["step"] for e in evals] == [5, 10] and all(e["loss"] > 0 for e in evals)
    assert len(list((tmp_path / "cache").glob("shards/*"))) == 2  # train's and val's
