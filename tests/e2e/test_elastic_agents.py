"""Live elastic agents on loopback: three nodes (an agent and one worker each, every one its own
`python train.py elastic=elastic ...`), one SIGKILLed mid-training, then a new one joining.

The rendezvous store runs in its own process (`python -m spot rendezvous`), as it must in a real
deployment: on a node that is not reclaimed. The node killed is the one whose worker is rank 0
(the checkpoint writer): the hardest case.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from .cluster import Cluster, assert_each_sample_once, elastic_args, starts, trained_since

pytestmark = [pytest.mark.slow, pytest.mark.serial]

STEPS = 300
ARGS = ["elastic.rdzv_keep_alive_seconds=1", "checkpoint.every_steps=5"]


def test_three_agents_lose_one_then_gain_one(tmp_path):
    cluster = Cluster(tmp_path)
    args, root = elastic_args(cluster.port, STEPS) + ARGS, tmp_path / "runs"
    try:
        cluster.store()
        for name in ("a", "b", "c"):
            cluster.node(name, args, root)

        # Three nodes train together.
        three = cluster.wait_for(
            "world size 3",
            lambda ev: [s for s in starts(ev, 3) if trained_since(ev, s, 10)],
        )[-1]
        # Reclaim the node whose worker is rank 0: its agent dies, and its worker with it.
        victim = next(n for n, p in cluster.procs.items() if p.pid == three["agent_pid"])
        killed_at = time.time()
        os.killpg(cluster.procs[victim].pid, signal.SIGKILL)
        cluster.procs[victim].wait()

        # The survivors re-rendezvous and resume from the last checkpoint with world size 2.
        two = cluster.wait_for(
            "world size 2 after the kill",
            lambda ev: [s for s in starts(ev, 2, killed_at) if trained_since(ev, s, 3)],
        )[0]
        scale_down = two["time"] - killed_at

        # A new node joins; the group grows back to 3.
        joined_at = time.time()
        cluster.node("d", args, root)
        three_again = cluster.wait_for(
            "world size 3 after the join", lambda ev: starts(ev, 3, joined_at)
        )[0]
        scale_up = three_again["time"] - joined_at

        cluster.assert_completed(but=(victim,))
    finally:
        cluster.stop_all()

    events = cluster.events()
    assert events[-1]["event"] == "complete" and events[-1]["step"] == STEPS
    changes = [
        (e["previous"], e["world_size"]) for e in events if e["event"] == "world_size_change"
    ]
    assert (3, 2) in changes and changes[-1] == (2, 3), changes
    assert 0 < two["step"] <= three_again["step"]  # each regrouping resumed a checkpoint

    # Exactly-once data across 3 -> 2 -> 3 ranks: every completed epoch holds each sample once,
    # the unfinished last one none twice.
    assert_each_sample_once(cluster.ledger_by_epoch())
    print(f"scale-down: {scale_down:.1f} s from SIGKILL to training at world size 2")
    print(f"scale-up: {scale_up:.1f} s from the new agent's start to world size 3")
