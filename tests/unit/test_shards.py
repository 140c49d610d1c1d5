"""Data sets as shards (spot/shards/): the format, the writer, and reading through the bounded
cache with prefetch, from a directory and from moto's S3 server on loopback. train.py on them:
tests/e2e/test_shards.py."""

from __future__ import annotations

import os
import pickle
import time

import pytest
import torch

from spot.distributed.sampler import ResumableBatchSampler
from spot.shards.cache import DataUnavailable
from spot.shards.dataset import ShardedDataset, prefetching
from spot.shards.format import INDEX, ShardError, decode, encode
from spot.shards.write import write
from tests.e2e import test_s3
from tests.helpers import free_port

s3_endpoint = test_s3.s3_endpoint  # its fixtures: a moto server for this module, a bucket a test
bucket = test_s3.bucket
pytestmark = pytest.mark.usefixtures("credentials")


class Samples(torch.utils.data.Dataset):
    """(a float vector, an int64 label, a bool) per index: three dtypes, a 0-dim tensor."""

    def __init__(self, size: int = 300):
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(size, 16, generator=g), torch.arange(size) % 7

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i], bool(i % 2)


def assert_same(a, b) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        y = y if isinstance(y, torch.Tensor) else torch.tensor(y)
        assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)


def test_a_sample_round_trips_bitwise():
    sample = (torch.randn(3, 4).to(torch.bfloat16), torch.tensor(5), torch.zeros(0), 2.5, True)
    assert_same(decode(memoryview(encode(sample))), sample)


def test_shards_in_a_directory_read_back_by_index_bitwise(tmp_path):
    data = Samples()
    index = write(data, str(tmp_path / "shards"), 2048, {})
    assert len(index["shards"]) > 5 and index["samples"] == len(data)
    read = ShardedDataset(str(tmp_path / "shards"), cache_dir=str(tmp_path / "cache"))
    assert len(read) == len(data) and read.identity == f"shards:{index['digest']}"
    for i in (0, 1, 57, 299, 150):
        assert_same(read[i], data[i])
    with pytest.raises(IndexError):
        read[300]


def test_an_index_that_does_not_add_up_is_refused(tmp_path):
    write(Samples(), str(tmp_path / "shards"), 2048, {})
    index = tmp_path / "shards" / INDEX
    index.write_text(index.read_text().replace('"samples": 300', '"samples": 301', 1))
    with pytest.raises(ShardError, match="does not add up"):
        ShardedDataset(str(tmp_path / "shards"), cache_dir=str(tmp_path / "cache"))


def test_from_a_bucket_the_cache_stays_under_its_limit_through_an_epoch(
    s3_endpoint, bucket, tmp_path
):
    """An epoch over a data set four times the cache's limit, in a shuffled order: every
    sample bitwise, the cache never above its limit (checked after every read), and the
    shards the coming steps need are never the ones evicted."""
    _, name = bucket
    data = Samples(600)
    index = write(data, f"s3://{name}/ds", 2048, {"endpoint_url": s3_endpoint})
    size = sum(s["bytes"] for s in index["shards"])
    limit = size / 4
    read = ShardedDataset(
        f"s3://{name}/ds",
        cache_dir=str(tmp_path / "cache"),
        cache_limit_gb=limit / 2**30,
        endpoint_url=s3_endpoint,
    )
    largest = max(s["bytes"] for s in index["shards"])
    sampler = ResumableBatchSampler(len(data), 8, seed=3)
    for batch in prefetching(sampler, read, steps=1):
        for i in batch:
            assert_same(read[i], data[i])
        assert read.cache.cached_bytes() <= limit + 2 * largest  # + the pinned ones
    assert read.cache.fetched_bytes >= size  # every shard at least once


def test_each_rank_fetches_only_the_shards_its_samples_are_in(s3_endpoint, bucket, tmp_path):
    """Unshuffled, two ranks: rank 0's steps read the first half of each step's samples; with
    big steps over small shards, the shards it fetched are only those its indices are in."""
    _, name = bucket
    data = Samples(400)
    write(data, f"s3://{name}/ds", 1024, {"endpoint_url": s3_endpoint})
    read = ShardedDataset(
        f"s3://{name}/ds", cache_dir=str(tmp_path / "cache"), endpoint_url=s3_endpoint
    )
    sampler = ResumableBatchSampler(len(data), 100, seed=0, shuffle=False, rank=0, world_size=2)
    wanted = set()
    for batch in prefetching(sampler, read, steps=2):
        for i in batch:
            read[i]
            wanted.add(read.locate(i)[0])
    here = {p.name for p in (tmp_path / "cache").rglob("shard-*")}
    assert here == {read.shards[s]["name"] for s in wanted}
    assert len(here) < len(read.shards)


def test_a_corrupt_shard_is_fetched_again_then_refused_in_one_line(s3_endpoint, bucket, tmp_path):
    client, name = bucket
    index = write(Samples(), f"s3://{name}/ds", 2048, {"endpoint_url": s3_endpoint})
    key = f"ds/{index['shards'][2]['name']}"
    body = bytearray(client.get_object(Bucket=name, Key=key)["Body"].read())
    body[10] ^= 1
    client.put_object(Bucket=name, Key=key, Body=bytes(body))
    read = ShardedDataset(
        f"s3://{name}/ds", cache_dir=str(tmp_path / "c"), endpoint_url=s3_endpoint
    )
    first = read.locate(0)[0]
    assert first != 2 and read[0] is not None
    start = sum(s["samples"] for s in index["shards"][:2])
    with pytest.raises(ShardError, match=f"{index['shards'][2]['name']} does not match") as err:
        read[start]
    assert "\n" not in str(err.value)
    assert not [p for p in (tmp_path / "c").rglob(".fetch-*")]


def test_an_unreachable_bucket_is_data_unavailable_not_corrupt(s3_endpoint, bucket, tmp_path):
    _, name = bucket
    write(Samples(), f"s3://{name}/ds", 2048, {"endpoint_url": s3_endpoint})
    read = ShardedDataset(
        f"s3://{name}/ds", cache_dir=str(tmp_path / "c"), endpoint_url=s3_endpoint
    )
    read.remote["endpoint_url"] = f"http://127.0.0.1:{free_port()}"  # the service gone
    read.remote["max_attempts"] = 1
    read._bucket = None
    with pytest.raises(DataUnavailable, match="unreachable"):
        read[0]


def test_a_copy_for_a_data_loader_worker_reads_the_same_cache(tmp_path):
    write(Samples(), str(tmp_path / "shards"), 2048, {})
    read = ShardedDataset(str(tmp_path / "shards"), cache_dir=str(tmp_path / "cache"))
    read.prefetch(range(100))
    copy = pickle.loads(pickle.dumps(read))
    assert_same(copy[42], read[42])
    loader = torch.utils.data.DataLoader(read, batch_size=50, num_workers=2)
    assert sum(len(batch[0]) for batch in loader) == 300


def test_workers_forked_while_a_prefetch_thread_holds_the_cache_s_lock_still_read(tmp_path):
    """A DataLoader forks its workers (Linux's default) while a prefetch thread may hold the
    cache's lock: a forked copy of a held lock is held for ever in the child. Each process
    takes its own locks (the fork happens here with the lock held, deterministically)."""
    import threading

    write(Samples(), str(tmp_path / "shards"), 2048, {})
    read = ShardedDataset(str(tmp_path / "shards"), cache_dir=str(tmp_path / "cache"))
    read[0]
    held, release = threading.Event(), threading.Event()

    def hold():
        with read.cache._lock:
            held.set()
            release.wait(60)

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait(10)
    loader = torch.utils.data.DataLoader(
        read, batch_size=50, num_workers=2, timeout=20, multiprocessing_context="fork"
    )
    batches = iter(loader)  # the workers fork now, the lock held
    release.set()
    holder.join()
    assert sum(len(batch[0]) for batch in batches) == 300


def test_in_the_shard_order_an_epoch_fetches_each_shard_about_once_within_the_limit(
    s3_endpoint, bucket, tmp_path
):
    """data.order=shards with four steps fetched ahead: the cache stays under a quarter of the
    data set throughout, and the epoch downloads about the data set once (a uniform order with
    that limit fetches shards again and again)."""
    _, name = bucket
    data = Samples(600)
    index = write(data, f"s3://{name}/ds", 2048, {"endpoint_url": s3_endpoint})
    size = sum(s["bytes"] for s in index["shards"])
    fetched = {}
    for order in ("shards", "uniform"):
        read = ShardedDataset(
            f"s3://{name}/ds",
            cache_dir=str(tmp_path / order),
            cache_limit_gb=size / 4 / 2**30,
            endpoint_url=s3_endpoint,
        )
        groups = {"groups": read.shard_ends, "window": 2} if order == "shards" else {}
        sampler = ResumableBatchSampler(len(data), 8, seed=5, **groups)
        for batch in prefetching(sampler, read, steps=4):
            for i in batch:
                assert_same(read[i], data[i])
            if order == "shards":
                assert read.cache.cached_bytes() <= size / 4 + 2 * max(
                    s["bytes"] for s in index["shards"]
                )
        fetched[order] = read.cache.fetched_bytes / size
    assert fetched["shards"] <= 1.2 and fetched["uniform"] > 3 * fetched["shards"], fetched


PINNING_READER = """
import sys
from spot.shards.dataset import ShardedDataset
url, cache, limit, end = sys.argv[1:]
read = ShardedDataset(url, cache_dir=cache, cache_limit_gb=float(limit))
read.prefetch(range(int(end)))
for i in range(int(end)):
    read[i]
print("pinned", flush=True)
sys.stdin.read()  # until the test closes stdin
"""


def test_the_ranks_of_a_node_share_the_cache_and_never_evict_what_another_pinned(tmp_path):
    """Two readers of one cache directory (the ranks of a node), each a process: the other
    one's pinned shards are never evicted, the directory stays under the limit but for them;
    once it has exited, they are not spared. A shard another reader evicted is fetched again."""
    import subprocess
    import sys

    write(Samples(), str(tmp_path / "shards"), 2048, {})
    url, cache = str(tmp_path / "shards"), tmp_path / "cache"
    read = ShardedDataset(url, cache_dir=str(cache), cache_limit_gb=1)
    theirs = {0, 1}
    end = read.shard_ends[1]
    largest = max(s["bytes"] for s in read.shards)
    limit = 2 * largest
    other = subprocess.Popen(
        [sys.executable, "-c", PINNING_READER, url, str(cache), str(limit / 2**30), str(end)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert other.stdout.readline().strip() == "pinned"
        read = ShardedDataset(url, cache_dir=str(cache), cache_limit_gb=limit / 2**30)
        names = {n: s["name"] for n, s in enumerate(read.shards)}
        folder = read.cache.directory
        pinned_bytes = sum(read.shards[n]["bytes"] for n in theirs)
        for i in range(end, len(read)):
            read.prefetch([i])
            assert_same(read[i], Samples()[i])
            assert all((folder / names[n]).exists() for n in theirs)
            assert read.cache.cached_bytes() <= limit + pinned_bytes + largest
    finally:
        other.stdin.close()
        other.wait(30)
    for i in range(end, len(read)):  # the other reader gone: its shards may go too
        read.prefetch([i])
        read[i]
    assert not all((folder / names[n]).exists() for n in theirs)
    assert read.cache.cached_bytes() <= limit
    assert not list(folder.glob(".pins-*")) or all(
        str(os.getpid()) in p.name for p in folder.glob(".pins-*")
    )
    last = read.locate(len(read) - 1)[0]
    read.cache._open.clear()  # as if another reader had evicted it after we opened it:
    (folder / names[last]).unlink()
    assert_same(read[len(read) - 1], Samples()[len(read) - 1])  # fetched again


FULL_DISK_READER = """
import sys
from spot.shards.dataset import ShardedDataset
from spot.shards.format import ShardError
url, cache, endpoint = sys.argv[1:]
read = ShardedDataset(url, cache_dir=cache, endpoint_url=endpoint or None)
try:
    for i in range(len(read)):
        read[i]
except ShardError as exc:
    print(f"ShardError: {exc}")
"""


def _can_mount_a_small_disk() -> bool:
    import shutil
    import subprocess

    if shutil.which("unshare") is None:
        return False
    mount = "mount -t tmpfs -o size=16k none /mnt"
    return (
        subprocess.run(["unshare", "-rm", "sh", "-c", mount], capture_output=True).returncode == 0
    )


@pytest.mark.skipif(not _can_mount_a_small_disk(), reason="no user namespaces to mount a tmpfs")
@pytest.mark.parametrize("source", ["directory", "bucket"])
def test_a_cache_on_a_full_disk_is_one_clear_line(source, s3_endpoint, bucket, tmp_path):
    """The cache directory on a 16 KiB file system (a tmpfs in a user namespace) and shards of
    about 8 KiB: the download that fills it stops with one line saying the disk is full, from a
    directory (copied: another file system) and from the bucket; never 'unreachable'."""
    import subprocess
    import sys

    _, name = bucket
    url = str(tmp_path / "shards") if source == "directory" else f"s3://{name}/ds"
    write(Samples(2000), url, 8192, {"endpoint_url": s3_endpoint})
    cache = tmp_path / "cache"
    cache.mkdir()
    endpoint = s3_endpoint if source == "bucket" else ""
    script = 'mount -t tmpfs -o size=16k none "$1" && exec "$2" -c "$3" "$4" "$1/spot" "$5"'
    read = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script, "sh", str(cache), sys.executable]
        + [FULL_DISK_READER, url, endpoint],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert read.returncode == 0, read.stderr[-2000:]
    (line,) = read.stdout.strip().splitlines()
    assert line.startswith(f"ShardError: the shard cache {cache}/spot/"), line
    assert line.endswith("is on a full disk"), line


def test_data_write_takes_the_overrides_after_its_options(tmp_path, capsys):
    """`python -m spot data write OUT --shard-mb 0.01 -- data.dataset.size=100` (argparse alone
    refused the overrides after an option that follows the positional)."""
    from spot.tools.cli import main

    out = tmp_path / "shards"
    assert (
        main(["data", "write", str(out), "--shard-mb", "0.01", "--", "data.dataset.size=100"]) == 0
    )
    assert "wrote 100 samples in" in capsys.readouterr().out
    assert len(ShardedDataset(str(out), cache_dir=str(tmp_path / "c"))) == 100


RACING_READER = """
import json, sys, time
from pathlib import Path
from spot.shards.dataset import ShardedDataset
url, cache, endpoint, go = sys.argv[1:]
read = ShardedDataset(url, cache_dir=cache, endpoint_url=endpoint)
while not Path(go).exists():
    time.sleep(0.005)
for i in range(len(read)):
    read[i]
print(json.dumps(read.fetched_bytes), flush=True)
"""


def test_the_ranks_of_a_node_fetch_each_shard_once_between_them(s3_endpoint, bucket, tmp_path):
    """Two processes reading the same shards from the bucket at the same moment, into one
    cache directory (the ranks of a node in the partitioned order): each shard is downloaded
    once on the node, the other process waiting for it and finding it there."""
    import json
    import subprocess
    import sys

    _, name = bucket
    index = write(Samples(600), f"s3://{name}/ds", 2048, {"endpoint_url": s3_endpoint})
    go = tmp_path / "go"
    readers = [
        subprocess.Popen(
            [sys.executable, "-c", RACING_READER, f"s3://{name}/ds", str(tmp_path / "cache")]
            + [s3_endpoint, str(go)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    time.sleep(3)  # both have read the index and wait (a start line, not a measured time)
    go.touch()
    fetched = [json.loads(r.communicate(timeout=120)[0]) for r in readers]
    assert sum(fetched) == sum(s["bytes"] for s in index["shards"]), fetched


def test_a_reader_lets_go_of_shards_another_evicted_and_stale_files_are_removed(tmp_path):
    """A shard another process evicted is dropped from this one's open files (its mapping
    would keep the blocks on disk); a killed reader's temporary download is removed by the next
    reader of the directory, a live one's left; a shard missing from a local data set is one
    line."""
    write(Samples(), str(tmp_path / "shards"), 2048, {})
    read = ShardedDataset(str(tmp_path / "shards"), cache_dir=str(tmp_path / "cache"))
    first, later = read.locate(0)[0], read.locate(len(read) - 1)[0]
    read[0]
    (read.cache.directory / read.shards[first]["name"]).unlink()  # another reader's eviction
    other = ShardedDataset(str(tmp_path / "shards"), cache_dir=str(tmp_path / "cache"))
    other[len(read) - 1]  # ... which fetched the next shard this one reads: no fetch here
    read[len(read) - 1]
    assert first not in read.cache._open and later in read.cache._open

    folder = read.cache.directory
    gone = folder / ".fetch+host-1-dead+0a1b"  # a download of a reader killed: no .alive lock
    mine = folder / f".fetch+{read.cache._readers.announce()}+2c3d"  # a live reader's, in progress
    left = [folder / ".alive-host-1-dead", folder / ".pins-host-1-dead"]  # its announcement
    for path in (gone, mine, *left):
        path.write_bytes(b"[]")
    ShardedDataset(str(tmp_path / "shards"), cache_dir=str(tmp_path / "cache"))
    assert not any(p.exists() for p in (gone, *left)) and mine.exists()
    assert (folder / f".alive-{read.cache._readers.id}").exists()

    (tmp_path / "shards" / read.shards[1]["name"]).unlink()
    fresh = ShardedDataset(str(tmp_path / "shards"), cache_dir=str(tmp_path / "other"))
    with pytest.raises(ShardError, match=f"shard {read.shards[1]['name']} is missing from"):
        fresh[read.shard_ends[0]]


def test_at_the_end_of_an_epoch_the_next_one_s_first_shards_are_fetched_ahead(tmp_path):
    """The prefetch window runs into the next epoch: its first step need not wait."""
    write(Samples(), str(tmp_path / "shards"), 2048, {})
    read = ShardedDataset(str(tmp_path / "shards"), cache_dir=str(tmp_path / "cache"))
    sampler = ResumableBatchSampler(len(read), 8, seed=2, groups=read.shard_ends, window=2)
    last_step = None
    for plan in prefetching(sampler, read, steps=3):
        last_step = {read.locate(i)[0] for i in plan}
    sampler.next_epoch()
    first_steps = {read.locate(i)[0] for plan in list(sampler)[:2] for i in plan}
    assert not first_steps <= last_step  # (else this would show nothing)
    assert first_steps | last_step == read.cache.pinned


def test_the_batches_data_loader_workers_still_hold_keep_their_shards_pinned(tmp_path):
    """A DataLoader with workers takes micro-batches from the sampler ahead of reading them:
    the shards of the last `in_flight` handed out stay pinned after the sampler moved on."""
    write(Samples(), str(tmp_path / "shards"), 2048, {})
    read = ShardedDataset(str(tmp_path / "shards"), cache_dir=str(tmp_path / "cache"))
    sampler = ResumableBatchSampler(len(read), 8, seed=2, groups=read.shard_ends, window=1)
    batches = iter(prefetching(sampler, read, steps=1, in_flight=3))
    handed = [next(batches) for _ in range(5)]
    shards = [{read.locate(i)[0] for i in batch} for batch in handed]
    assert not set().union(*shards[1:4]) <= shards[4]  # (else this would show nothing)
    assert set().union(*shards[1:]) == read.cache.pinned  # the 3 before the step handed out
