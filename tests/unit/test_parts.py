"""Sharded checkpoints on node-local disks (spot/checkpoint/parts.py), on every back end against
its protocol server on loopback (moto's S3, gcp-storage-emulator behind a proxy that serves its
preconditions, Azurite: tests/unit/test_buckets.py's fixtures): what a rank puts in the bucket, what the commit checks of it, what a rank reads back
from its own disk and what from the bucket. The whole flow with train.py:
tests/e2e/test_fsdp_local_disks.py and the fsdp set-up of tests/e2e/test_elastic_notice.py."""

from __future__ import annotations

import pytest

from spot.checkpoint import manifest, parts
from spot.checkpoint.manager import CheckpointManager, SaveKind
from spot.checkpoint.manifest import MANIFEST, CorruptCheckpoint, step_dir_name
from spot.checkpoint.sharded import METADATA, ShardGroup
from spot.checkpoint.storage import RemoteCheckpoints
from spot.checkpoint.upload import remote_problem
from spot.fsutil import digest_file
from spot.run.events import EventLog, read_events
from spot.tools.cli import cmd_list
from tests.helpers import assert_bitwise_equal
from tests.unit import test_buckets
from tests.unit.test_sharded import DIGEST, full, trained, training_state

service = test_buckets.service  # its fixtures: a server per back end, a new bucket a test
bucket = test_buckets.bucket
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")

STEP = 30
NAME = step_dir_name(STEP)
SMALL = (".metadata", "scheduler.bin", "scheduler.pt", "trainer.bin", "trainer.pt")  # rank 0's


def entry(path, rank: int) -> dict:
    size, digest = digest_file(path)
    return {"bytes": size, "digest": digest, "rank": rank}


def a_part(directory, rank: int, payload: bytes) -> dict[str, dict]:
    """One rank's shard file written into `directory`, as ShardGroup.write reports it."""
    directory.mkdir(parents=True, exist_ok=True)
    file = f"__{rank}_0.distcp"
    (directory / file).write_bytes(payload)
    return {file: entry(directory / file, rank)}


@pytest.fixture
def store(bucket):
    with test_buckets.preconditions(bucket) as (endpoint, _):
        store = test_buckets.store_of(bucket, endpoint)
        store.claim()  # the run's writer: it may commit
        yield store


def published_checkpoint(store, tmp_path) -> tuple:
    """Two ranks on two disks publish their shards of step 30; rank 0 commits its disk's part
    (its shard, .metadata, trainer, scheduler) with a manifest naming every file. Returns
    (rank 0's dir, rank 1's publisher, the manifest's files)."""
    disk0, disk1 = tmp_path / "disk0", tmp_path / "disk1"
    first = parts.Publisher(store, disk0, own_disk=False, keep=2)
    second = parts.Publisher(store, disk1, own_disk=True, keep=2)
    tmp = disk0 / f".tmp-{NAME}"
    files = first.publish(tmp, a_part(tmp, 0, b"rank zero " * 1000), STEP)
    files.update(second.publish(second.directory(tmp, STEP), a_part(disk1 / NAME, 1, b"one" * 999), STEP))  # fmt: skip
    for small in SMALL:  # rank 0's own: its uploader sends them
        (tmp / small).write_bytes(f"{small} of step 30".encode())
        files[small] = entry(tmp / small, 0)
    (tmp / MANIFEST).write_bytes(
        manifest.build(files, {"step": STEP, "sharded": ["model", "optimizer"]})
    )
    tmp.rename(disk0 / NAME)
    return disk0 / NAME, second, files


def test_a_commit_names_every_rank_s_object_and_verifies(store, tmp_path):
    local, _, files = published_checkpoint(store, tmp_path)
    assert set(manifest.published(files)) == {"__0_0.distcp", "__1_0.distcp"}
    store.upload(local, STEP)  # sends rank 0's small files, the manifest; finds the shards
    (listed,) = store.list_checkpoints()
    assert listed.committed and remote_problem(store, listed) is None
    fresh = store.download(STEP, tmp_path / "fresh")  # a fresh machine: every file, verified
    assert manifest.verify(fresh).files == files


@pytest.mark.parametrize("damage", ["missing", "rewritten"])
def test_a_published_shard_that_is_not_the_one_reported_is_never_committed(store, tmp_path, damage):
    """Rank 1's object is gone, or another writer replaced it (the same size, other bytes: a
    new ETag or generation): rank 0's upload refuses the checkpoint, and no manifest reaches the bucket."""
    local, _, _ = published_checkpoint(store, tmp_path)
    key = store.key(NAME, "__1_0.distcp")
    if damage == "missing":
        store.bucket.delete([key])
    else:
        store.bucket.put(key, b"eno" * 999)
    with pytest.raises(CorruptCheckpoint, match="__1_0.distcp"):
        store.upload(local, STEP)
    assert not [c for c in store.list_checkpoints() if c.committed]


def test_a_rank_reads_its_own_disk_s_copy_and_of_others_only_the_ranges_it_needs(store, tmp_path):
    local, _, files = published_checkpoint(store, tmp_path)
    store.upload(local, STEP)
    disk1 = tmp_path / "disk1" / NAME
    source = parts.ShardSource(store, disk1, STEP, files)
    needed = {"__1_0.distcp": [(0, 10)], "__0_0.distcp": [(10, 10), (5000, 20)]}
    got = source(needed)  # its own file from its disk; two ranges of rank 0's, in one request
    assert got == {"__0_0.distcp": {(10, 10): b"rank zero ", (5000, 20): b"rank zero " * 2}}
    assert source.fetched == {"__0_0.distcp": 5010}
    assert not (disk1 / "__0_0.distcp").exists()  # ranges in memory, not a copy of the file
    copy = bytearray((disk1 / "__1_0.distcp").read_bytes())
    copy[1] ^= 1  # a bit flipped on this disk: the copy is not read, the bucket's ranges are
    (disk1 / "__1_0.distcp").write_bytes(bytes(copy))
    again = parts.ShardSource(store, disk1, STEP, files)
    assert again({"__1_0.distcp": [(0, 6)]}) == {"__1_0.distcp": {(0, 6): b"oneone"}}
    assert again.fetched == {"__1_0.distcp": 6}
    with pytest.raises(CorruptCheckpoint, match="not in the manifest"):
        again({"__7_0.distcp": [(0, 1)]})
    with pytest.raises(CorruptCheckpoint, match="past its"):
        again({"__0_0.distcp": [(9990, 20)]})


def test_a_range_of_an_object_written_again_since_the_commit_is_refused(store, tmp_path):
    """Another writer replaced rank 0's object after the commit (the same size): the ranges a
    rank reads are of the object the manifest names (conditional on its identity), so the read
    is refused."""
    local, _, files = published_checkpoint(store, tmp_path)
    store.upload(local, STEP)
    key = store.key(NAME, "__0_0.distcp")
    store.bucket.put(key, b"rank zer0 " * 1000)
    source = parts.ShardSource(store, tmp_path / "fresh" / NAME, STEP, files)
    with pytest.raises(CorruptCheckpoint, match="__0_0.distcp in the bucket was written again"):
        source({"__0_0.distcp": [(0, 10)]})


def test_a_shard_whose_bucket_copy_does_not_match_is_refused_in_one_line(store, tmp_path):
    local, _, files = published_checkpoint(store, tmp_path)
    store.upload(local, STEP)
    key = store.key(NAME, "__0_0.distcp")
    store.bucket.put(key, b"rank zer0 " * 1000)
    fresh = tmp_path / "fresh" / NAME
    with pytest.raises(CorruptCheckpoint, match="__0_0.distcp in the bucket does not match"):
        parts.fetch(store, fresh, STEP, files, ["__0_0.distcp"])
    assert not (fresh / "__0_0.distcp").exists()
    assert [p.name for p in fresh.iterdir()] == []  # no partial download left behind
    with pytest.raises(CorruptCheckpoint, match="not in the manifest"):
        parts.fetch(store, fresh, STEP, files, ["../elsewhere"])


def test_rank_zero_s_restore_leaves_the_shards_to_the_ranks_and_keeps_this_disk_s(store, tmp_path):
    """The download a restore does on node-local disks: the manifest and rank 0's own files,
    not the shards; a copy of a shard already on this disk stays where it was."""
    local, _, files = published_checkpoint(store, tmp_path)
    store.upload(local, STEP)
    got = store.download(STEP, tmp_path / "disk0", leave_published=True)
    assert got == local
    names = sorted(p.name for p in got.iterdir())
    assert names == sorted([".metadata", "__0_0.distcp", MANIFEST, *SMALL[1:]])
    manifest.check_file(got, manifest.read(got), "__0_0.distcp")
    elsewhere = store.download(STEP, tmp_path / "disk2", leave_published=True)
    assert sorted(p.name for p in elsewhere.iterdir()) == sorted([MANIFEST, *SMALL])


def test_another_node_keeps_the_newest_parts_only(store, tmp_path):
    """At a restore from 20, the parts past it (a history the restore abandoned: they must not
    push out the new ones) and a leftover of a time as rank 0's node go; after each write, the
    newest `keep` up to the step written stay (one past it may be another rank's next write)."""
    publisher = parts.Publisher(store, tmp_path, own_disk=True, keep=2)
    for step in (10, 20, 30, 90):
        a_part(publisher.directory(tmp_path / "unused", step), 1, b"x")
    (tmp_path / ".tmp-step-000000040-1-ab").mkdir()
    publisher.abandon_after(20)
    assert sorted(p.name for p in tmp_path.iterdir()) == [step_dir_name(10), step_dir_name(20)]
    for step in (30, 40):
        a_part(tmp_path / step_dir_name(step), 1, b"x")
    publisher.prune(30)  # 40: being written by another rank of this node
    names = [step_dir_name(s) for s in (20, 30, 40)]
    assert sorted(p.name for p in tmp_path.iterdir()) == names
    (tmp_path / step_dir_name(40) / MANIFEST).write_bytes(b"{}")  # rank 0's commit, if this
    on_rank0_node = parts.Publisher(store, tmp_path, own_disk=False, keep=1)  # node is its now
    on_rank0_node.prune(40)  # older parts without a manifest go; the commits are the manager's
    assert sorted(p.name for p in tmp_path.iterdir()) == [step_dir_name(40)]


# ---- the manager and a load, in a world of one: every piece but the ranks ---------------------


def node_local_manager(root, store) -> CheckpointManager:
    events = EventLog(root / "events.jsonl")
    return CheckpointManager(
        root / "checkpoints",
        keep_last=3,
        async_save=False,
        on_corrupt="previous",
        events=events,
        meta={"config_digest": DIGEST, "training_config": {}, "world_size": 1},
        remote=RemoteCheckpoints(store, events, alert_after=3),
        shards=ShardGroup(
            None, 0, publisher=parts.Publisher(store, root / "checkpoints", False, 3)
        ),
    )


def test_a_checkpoint_that_met_in_the_bucket_restores_on_a_fresh_disk_from_byte_ranges(
    store, tmp_path, capsys
):
    """Saved on one disk (the shard uploaded by its rank, the rest by the uploader, the manifest
    last), restored on another: the download leaves the shard to the rank, which reads its byte
    ranges from the bucket through DCP's load; the state is bitwise the one saved. A commit on
    that disk whose upload never ran is finished at the next restore (its shard is in the
    bucket already), one whose shard is gone is removed; a save at the restored step is that
    checkpoint (not written again)."""
    saved = trained(1)
    first = node_local_manager(tmp_path / "disk0", store)
    uploader = first.start_uploads()
    saved.step = 10
    first.save(10, saved.state_dict(), {"reason": "test"})
    assert uploader.drain(30)
    uploader.close()

    fresh = node_local_manager(tmp_path / "disk1", store)
    loaded = fresh.load_latest(DIGEST, {})
    assert loaded.step == 10 and not (loaded.path / "__0_0.distcp").exists()
    restored = training_state(2)
    source = parts.ShardSource(store, loaded.path, 10, loaded.manifest.files)
    source.whole([METADATA])
    restored.load_state_dict(loaded.state, loaded.path, None, source)
    assert source.fetched["__0_0.distcp"] > 0
    assert_bitwise_equal(full(restored), full(saved))
    with pytest.raises(CorruptCheckpoint, match="__0_0.distcp is missing"):
        manifest.verify(loaded.path)  # not a whole checkpoint here; what is here verifies:
    assert manifest.elsewhere(loaded.path, manifest.verify(loaded.path, here=True)) == [
        "__0_0.distcp"
    ]
    assert cmd_list(loaded.path.parent, full=True) == 0
    assert "1 file(s) of other nodes only in the bucket" in capsys.readouterr().out

    for step in (20, 30):  # committed on this disk, every shard in the bucket, never uploaded
        restored.step = step
        fresh.save(step, restored.state_dict(), {"reason": "test"})
    # 30's shard is gone: its upload cannot be finished
    store.bucket.delete([store.key(step_dir_name(30), "__0_0.distcp")])
    again = node_local_manager(tmp_path / "disk1", store)
    assert again.load_latest(DIGEST, {}).step == 20  # its upload finished at the restore
    assert store.committed_steps() == [20, 10]
    assert not (tmp_path / "disk1/checkpoints" / step_dir_name(30)).exists()  # never uploaded
    assert again.save(20, restored.state_dict(), {"reason": "final"}, kind=SaveKind.LAST) == 0.0


def test_a_restore_skips_a_checkpoint_whose_shard_was_written_again_since(store, tmp_path):
    """Step 20's shard object replaced after its commit (a zombie's upload): the restore finds
    it before any rank reads, reports it, and resumes 10 (checkpoint.on_corrupt=previous)."""
    saved = trained(1)
    first = node_local_manager(tmp_path / "disk0", store)
    uploader = first.start_uploads()
    for step in (10, 20):
        saved.step = step
        first.save(step, saved.state_dict(), {"reason": "test"})
        assert uploader.drain(30)
    uploader.close()
    key = store.key(step_dir_name(20), "__0_0.distcp")
    body = bytearray(store.bucket.get(key)[0])
    body[-1] ^= 1
    store.bucket.put(key, bytes(body))
    fresh = node_local_manager(tmp_path / "disk1", store)
    assert fresh.load_latest(DIGEST, {}).step == 10
    (skipped,) = [e for e in read_events(tmp_path / "disk1/events.jsonl")
                  if e["event"] == "corrupt_checkpoint_skipped"]  # fmt: skip
    assert skipped["step"] == 20 and "not the object its rank wrote" in skipped["reason"]
