"""Shrink on notice, live: three elastic nodes on loopback (an agent and one worker each), every
node with its own emulated cloud metadata endpoint. The cloud tells one node it is reclaimed;
that node takes part in the emergency checkpoint and exits 75, its agent leaving the rendezvous on
the way out, and the other two train on at world size 2 from that checkpoint: nothing trained
twice, every sample seen once. A node started later brings the group back to three.

Set-ups: the external rendezvous store (the recommended one) with the notice to the node whose
worker is rank 0 (the checkpoint writer), with trainer.strategy=fsdp on a shared disk (every
node writes its shards of the emergency checkpoint) and with DDP on node-local disks with S3; the agent-hosted store with a GCP notice to a node that holds neither rank 0 nor the
store; and `min_nodes=3`, where the same notice stops every node (75) and the job resumes when
started again.

The keep-alive is 10 s x 3: a survivor that waited for the departing node's heartbeat to expire
would regroup at least 20 s after it left (its last heartbeat is at most 10 s old); the tests
show it does not wait.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from spot.checkpoint.manager import CheckpointManager, committed_checkpoints
from spot.run.exitcodes import EXIT_PREEMPTED

from ..helpers import CREDENTIALS, train_env
from .cluster import Cluster, assert_each_sample_once, elastic_args, starts, trained_since
from .test_s3 import s3_endpoint  # noqa: F401 - the fixture

pytestmark = [pytest.mark.slow, pytest.mark.serial]

STEPS = 400  # room for a node that starts alone on a busy machine, then the join
KEEP_ALIVE = ["elastic.rdzv_keep_alive_seconds=10", "elastic.rdzv_keep_alive_max_attempt=3"]
KEEP_ALIVE_WAIT = 10 * (3 - 1)  # the least time a silent node is still counted in


def rank0_node(cluster: Cluster, start: dict) -> str:
    return next(n for n, p in cluster.procs.items() if p.pid == start["agent_pid"])


SETUPS = {
    # name: (store, cloud, node-local disks with S3, who gets the notice, more arguments)
    # fsdp on node-local disks: every rank writes its shards of the emergency checkpoint and
    # puts them in the bucket, the leaving one's too, where the survivors read them (ddp's rank 0
    # leaving is the set-up below; ddp on a shared disk, the third)
    "external-aws-rank0-fsdp-local-disks-s3": (
        "external",
        "aws",
        True,
        "rank0",
        ["trainer.strategy=fsdp"],
    ),
    "external-aws-rank0-local-disks-s3": ("external", "aws", True, "rank0", []),
    "agent-store-gcp-other-node": ("agent", "gcp", False, "other", []),
}


@pytest.mark.parametrize("setup", list(SETUPS))
def test_a_notice_to_one_node_costs_that_node_only(setup, tmp_path, request):
    store, cloud, local_disks, victim_is, more = SETUPS[setup]
    env = train_env(**CREDENTIALS)
    cluster = Cluster(tmp_path, env)
    args = elastic_args(cluster.port, STEPS, store=store) + KEEP_ALIVE + more
    if local_disks:
        endpoint = request.getfixturevalue("s3_endpoint")
        bucket = _bucket(endpoint, setup)
        args += ["storage=s3", f"storage.bucket={bucket}", f"storage.endpoint_url={endpoint}"]

    def root(name: str):
        return tmp_path / (f"disk-{name}" if local_disks else "shared")

    try:
        if store == "external":
            cluster.store()
        for i, name in enumerate(("a", "b", "c")):
            cluster.node(name, args, root(name), cloud)
            if i == 0 and store == "agent":  # "a" hosts the store: the first agent to bind it
                cluster.wait_for_store()
        three = cluster.wait_for(
            "world size 3", lambda ev: [s for s in starts(ev, 3) if trained_since(ev, s, 10)]
        )[-1]
        first = rank0_node(cluster, three)
        victim = first if victim_is == "rank0" else next(n for n in "bc" if n != first)
        noticed_at = cluster.notice(victim)

        assert cluster.procs[victim].wait(timeout=120) == EXIT_PREEMPTED, cluster.logs()
        two = cluster.wait_for(
            "world size 2 after the notice",
            lambda ev: [s for s in starts(ev, 2, noticed_at) if trained_since(ev, s, 3)],
        )[0]
        events = cluster.events()
        # (On a busy machine a node may start alone and the group form in two steps: the
        # checkpoint that matters is the one the notice caused.)
        saves = [e for e in events if e["event"] == "emergency_checkpoint"]
        (emergency,) = [e for e in saves if e["time"] > noticed_at]
        resume = [e for e in events if e["event"] == "resume" and e["time"] > noticed_at][0]
        assert resume["step"] == emergency["step"] == two["step"]  # from the emergency checkpoint
        if "trainer.strategy=fsdp" in more:  # every node's rank wrote its part, the leaving one's
            files = CheckpointManager.load(Path(resume["checkpoint"])).manifest.files
            assert {files[f]["rank"] for f in files if f.endswith(".distcp")} == {0, 1, 2}
        trained = [e["step"] for e in events if e["event"] == "train"]
        assert len(trained) == len(set(trained)), "a step was trained twice"
        change = [e for e in events if e["event"] == "world_size_change"][-1]
        assert (change["previous"], change["world_size"]) == (3, 2)
        # Linear, against the world size the run started with (3, or 1 if a node began alone).
        assert change["lr_scale"] == pytest.approx(2 / change["reference_world_size"])
        (recovered,) = [e for e in events if e["event"] == "recovery" and e["time"] > noticed_at]
        assert recovered["kind"] == "notice" and recovered["world_size"] == 2
        # The survivors did not wait for the departing node's heartbeat to expire.
        assert recovered["rendezvous_seconds"] < KEEP_ALIVE_WAIT, recovered
        assert "left the rendezvous" in (tmp_path / f"{victim}.log").read_text()
        if local_disks:
            uploads = [e["step"] for e in events if e["event"] == "upload"]
            assert emergency["step"] in uploads  # by the departing rank 0, within the notice
            downloads = [e for e in events if e["event"] == "download" and e["time"] > noticed_at]
            if "trainer.strategy=fsdp" in more:  # the checkpoint met in the bucket: from there
                assert [e["step"] for e in downloads] == [emergency["step"]]
            else:  # the new rank 0 restored its own copy: nothing downloaded
                assert not downloads

        joined_at = time.time()
        cluster.node("d", args, root("d"), cloud)
        cluster.wait_for("world size 3 after the join", lambda ev: starts(ev, 3, joined_at))
        cluster.assert_completed(but=(victim,))
    finally:
        cluster.stop_all()

    events = cluster.events()
    assert events[-1]["event"] == "complete" and events[-1]["step"] == STEPS
    joins = [e for e in events if e["event"] == "recovery" and e["kind"] == "join"]
    assert joins and joins[-1]["world_size"] == 3
    final = [d for d in cluster.run_dirs() if (d / "COMPLETE").exists()]
    step, path = max(committed_checkpoints(final[0] / "checkpoints"))
    assert step == STEPS and CheckpointManager.load(path).step == STEPS  # verifies
    assert_each_sample_once(cluster.ledger_by_epoch())
    print(f"{setup}: notice -> training at world size 2: {_split(recovered)}")
    print(f"{setup}: new node -> training at world size 3: {_split(joins[-1])}")


def test_fewer_nodes_than_min_nodes_stop_every_node_and_resume(tmp_path):
    cluster = Cluster(tmp_path)
    args = elastic_args(cluster.port, 100, min_nodes=3)
    shared = tmp_path / "shared"
    try:
        cluster.store()
        for name in ("a", "b", "c"):
            cluster.node(name, args, shared, "aws")
        three = cluster.wait_for(
            "world size 3", lambda ev: [s for s in starts(ev, 3) if trained_since(ev, s, 10)]
        )[-1]
        victim = next(n for n in "abc" if n != rank0_node(cluster, three))
        noticed_at = cluster.notice(victim)
        for name in "abc":  # every node stops: two would be fewer than min_nodes
            assert cluster.procs[name].wait(timeout=120) == EXIT_PREEMPTED, cluster.logs()
        events = cluster.events()
        saves = [e for e in events if e["event"] == "emergency_checkpoint"]
        (emergency,) = [e for e in saves if e["time"] > noticed_at]
        (departure,) = [e for e in events if e["event"] == "departure"]
        assert departure["group_stops"] and departure["nodes"] == 3

        restarted_at = time.time()  # the job started again: three fresh nodes
        for name in ("a2", "b2", "c2"):
            cluster.node(name, args, shared, "aws")
        cluster.assert_completed(but=("a", "b", "c"))
    finally:
        cluster.stop_all()
    events = cluster.events()
    resume = [e for e in events if e["event"] == "resume" and e["time"] > restarted_at][0]
    assert resume["step"] == emergency["step"]
    assert events[-1]["event"] == "complete" and events[-1]["step"] == 100
    assert_each_sample_once(cluster.ledger_by_epoch())


def test_a_notice_to_the_node_hosting_the_store_ends_the_job_with_75(tmp_path):
    """The agent-hosted store has no other home: when its node is reclaimed, every node exits 75
    once the store is gone (the others may regroup while its process is still exiting: then
    their agents stop them with one more checkpoint). Nothing trained is lost; nothing hangs."""
    cluster = Cluster(tmp_path)
    args = elastic_args(cluster.port, STEPS, store="agent")
    shared = tmp_path / "shared"
    try:
        cluster.node("a", args, shared, "aws")
        cluster.wait_for_store()  # "a" hosts the store: the first agent to bind its port
        cluster.node("b", args, shared, "aws")
        cluster.wait_for(
            "world size 2", lambda ev: [s for s in starts(ev, 2) if trained_since(ev, s, 5)]
        )
        cluster.notice("a")
        for name in "ab":
            assert cluster.procs[name].wait(timeout=120) == EXIT_PREEMPTED, cluster.logs()
    finally:
        cluster.stop_all()
    events = cluster.events()
    saved = [e["step"] for e in events if e["event"] == "emergency_checkpoint"]
    assert saved and saved[-1] == max(e["step"] for e in events if e["event"] == "train")
    assert "rendezvous at" in (tmp_path / "b.log").read_text()  # said why it stopped


def _split(recovered: dict) -> str:
    parts = [f"{k[:-8]} {v:.2f}" for k, v in recovered.items() if k.endswith("_seconds")]
    return ", ".join(parts)


def _bucket(endpoint: str, name: str) -> str:
    import boto3

    bucket = f"elastic-{name}"[:60]
    boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
    ).create_bucket(Bucket=bucket)
    return bucket
