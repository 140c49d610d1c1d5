"""trainer.strategy=fsdp on node-local disks with storage=s3 (spot/checkpoint/parts.py): two nodes
on loopback (two elastic agents, a worker each, a disk each) and moto's S3 server. No disk holds
a whole checkpoint; each rank puts its shards in the bucket and the checkpoint meets there.
(A notice to one node of three, on node-local disks: tests/e2e/test_elastic_notice.py.)"""

from __future__ import annotations

import os
import signal
import time

import pytest

from spot.checkpoint.manager import CheckpointManager
from spot.checkpoint.upload import remote_problem
from spot.distributed.ledger import read_ledger

from ..helpers import FAST, assert_bitwise_equal, final_state, run_dir_of, run_train, s3_store
from . import test_s3
from .cluster import Cluster, elastic_args

s3_endpoint = test_s3.s3_endpoint  # its fixtures: a moto server for this module, a bucket a test
bucket = test_s3.bucket

pytestmark = [pytest.mark.slow]

STEPS = 40
TRAINING = [
    "trainer.strategy=fsdp",
    "trainer.fsdp.shard=[Linear]",
    f"trainer.max_steps={STEPS}",
    "checkpoint.every_steps=10",
    "data.ledger=true",
    "trainer.log_every=1",
]


def test_a_restart_in_place_reads_each_nodes_own_shards_and_ends_bitwise_equal(
    s3_endpoint, bucket, tmp_path, markers, credentials
):
    """Rank 0's worker is SIGKILLed once step 20 is committed in the bucket (its training held at
    step 21: no newer checkpoint anywhere). The agents restart both workers, which resume from
    the bucket's step 20, each reading its own shards from its own node's disk (the node that is
    not rank 0's downloads the index, `.metadata`). The end is bitwise the
    uninterrupted two-rank run's (the final checkpoint as a fresh machine downloads it whole),
    with the same ledgers; each checkpoint in the bucket verifies."""
    _, name = bucket
    reference = run_train(
        [*FAST, *TRAINING, "elastic.nproc_per_node=2", f"run.root={tmp_path / 'ref'}"],
        timeout=240,
    )
    assert reference.returncode == 0, reference.stdout[-3000:] + reference.stderr[-3000:]

    cluster = Cluster(tmp_path, test_s3.env())
    cluster.env.update(
        SPOT_FAILPOINTS="upload.committed@step=20,train.step@step=21@rank=0",
        SPOT_FAILPOINT_DIR=str(markers),
    )
    args = [
        *elastic_args(cluster.port, STEPS, min_nodes=2),
        *TRAINING,
        "storage=s3",
        f"storage.bucket={name}",
        f"storage.endpoint_url={s3_endpoint}",
    ]
    try:
        cluster.store()
        for node in ("a", "b"):
            cluster.node(node, args, tmp_path / f"disk-{node}")
        marker = markers / "upload.committed"
        deadline = time.monotonic() + 180
        while not (marker.exists() and (markers / "upload.committed.pid").exists()):
            assert time.monotonic() < deadline, cluster.logs()
            time.sleep(0.05)
        os.kill(int((markers / "upload.committed.pid").read_text()), signal.SIGKILL)
        cluster.assert_completed()
    finally:
        cluster.stop_all()

    events = cluster.events()
    assert [e["step"] for e in events if e["event"] == "resume"] == [20], cluster.logs()
    (fetched,) = [e for e in events if e["event"] == "shards_fetched"]
    assert fetched["step"] == 20 and len(fetched["files"]) == 2
    for rank, files in enumerate(fetched["files"]):  # {file: bytes read from the bucket}
        assert f"__{rank}_0.distcp" not in files, fetched  # its own: from its own disk
    # (Of the other rank's file it may read the values DCP saved once for every rank, such as
    # the optimizer's step: byte ranges, tests/unit/test_parts.py.)
    disks = {node: run_dir_of(tmp_path / f"disk-{node}") for node in "ab"}
    finished = [d for d in disks.values() if (d / "COMPLETE").exists()]
    assert len(finished) == 1  # rank 0's node
    ref_dir = run_dir_of(tmp_path / "ref")
    store = s3_store(name, f"checkpoints/default/{finished[0].name}", endpoint_url=s3_endpoint)
    whole = store.download(STEPS, tmp_path / "fresh")  # every file, verified
    got, want = CheckpointManager.load(whole, whole=True).state, final_state(ref_dir)
    for state in (got, want):  # (the run ids differ: the elastic overrides name the run)
        state["trainer"].pop("tracker_run_id")
    assert_bitwise_equal(got, want)
    for rank in (0, 1):
        (ledger,) = [d / f"ledger/rank-{rank}.jsonl" for d in disks.values()
                     if (d / f"ledger/rank-{rank}.jsonl").exists()]  # fmt: skip
        assert read_ledger(ledger) == read_ledger(ref_dir / f"ledger/rank-{rank}.jsonl")
    found = store.list_checkpoints()
    assert [c.step for c in found if c.committed][0] == STEPS
    for c in found:
        if c.committed:
            assert remote_problem(store, c) is None, c.step
            assert {"__0_0.distcp", "__1_0.distcp"} <= set(c.objects)


def test_fsdp_on_node_local_disks_without_a_bucket_is_one_line_and_exit_2(tmp_path):
    """No disk would hold a whole checkpoint: refused on every node, before training. (No
    restarts: torch's agent restarts workers that exit 2 as it does any failed worker.)"""
    cluster = Cluster(tmp_path)
    args = [*elastic_args(cluster.port, STEPS, min_nodes=2), *TRAINING, "elastic.max_restarts=0"]
    try:
        cluster.store()
        for node in ("a", "b"):
            cluster.node(node, args, tmp_path / f"disk-{node}")
        codes = {node: cluster.procs[node].wait(timeout=120) for node in "ab"}
    finally:
        cluster.stop_all()
    assert codes == {"a": 2, "b": 2}, cluster.logs()
    for node in "ab":
        lines = [
            line
            for line in (tmp_path / f"{node}.log").read_text().splitlines()
            if "fsdp on node-local disks" in line
        ]
        assert lines and "storage" in lines[0] and "storage=s3" in lines[0], cluster.logs()
    assert not list((tmp_path / "disk-b").glob("*/*/checkpoints/step-*"))
