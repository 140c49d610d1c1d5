"""Live elastic agents on loopback: three nodes (an agent and one worker each, every one its own
`python train.py elastic=elastic ...`), one SIGKILLed mid-training, then a new one joining.

The rendezvous store runs in its own process (`python -m spot rendezvous`), as it must in a real
deployment: on a node that is not reclaimed. The node killed is the one whose worker is rank 0
(the checkpoint writer): the hardest case.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spot.distributed.ledger import read_ledger
from spot.run.events import read_events

from ..helpers import FAST, REPO, run_dir_of, train_env

pytestmark = [pytest.mark.slow, pytest.mark.serial]

STEPS = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_args(port: int, root: Path) -> list[str]:
    return [
        *FAST,
        "elastic=elastic",
        "elastic.min_nodes=1",
        "elastic.max_nodes=3",
        "elastic.nproc_per_node=1",
        f"elastic.rdzv_endpoint=127.0.0.1:{port}",
        "elastic.rdzv_store_host=external",
        "elastic.local_addr=127.0.0.1",
        "elastic.rdzv_last_call_seconds=2",
        "elastic.rdzv_keep_alive_seconds=1",
        "elastic.monitor_interval_seconds=0.2",
        "elastic.max_restarts=10",
        "elastic.collective_timeout_seconds=20",
        f"trainer.max_steps={STEPS}",
        "checkpoint.every_steps=5",
        "trainer.log_every=1",
        "data.ledger=true",
        f"run.root={root}",
    ]


class Cluster:
    def __init__(self, tmp_path: Path):
        self.tmp = tmp_path
        self.port = free_port()
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = {**train_env(), "SPOT_FAILPOINTS": "train.step@sleep=0.08", "LOGLEVEL": "INFO"}

    def start(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "w")  # noqa: SIM115 - the process owns it
        proc = subprocess.Popen(
            argv,
            cwd=REPO,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.procs[name] = proc
        return proc

    def node(self, name: str) -> subprocess.Popen:
        args = node_args(self.port, self.tmp / "runs")
        return self.start(name, [sys.executable, str(REPO / "train.py"), *args])

    def events(self) -> list[dict]:
        files = list((self.tmp / "runs").glob("*/*/events.jsonl"))
        return read_events(files[0]) if files else []

    def wait_for(self, what: str, predicate, timeout: float = 180):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = predicate(self.events())
            if found:
                return found
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}:\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text()[-2500:]}" for p in sorted(self.tmp.glob("*.log"))
        )

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def starts(events: list[dict], world_size: int, after: float = 0.0) -> list[dict]:
    return [
        e
        for e in events
        if e["event"] == "start" and e["world_size"] == world_size and e["time"] > after
    ]


def trained_since(events: list[dict], start: dict, steps: int) -> bool:
    return any(
        e["event"] == "train" and e["time"] > start["time"] and e["step"] >= start["step"] + steps
        for e in events
    )


def test_three_agents_lose_one_then_gain_one(tmp_path):
    cluster = Cluster(tmp_path)
    try:
        store = cluster.start(
            "rendezvous",
            [sys.executable, "-m", "spot", "rendezvous", "--host", "127.0.0.1"]
            + ["--port", str(cluster.port)],
        )
        deadline = time.monotonic() + 60
        while "listening" not in (tmp_path / "rendezvous.log").read_text():
            assert store.poll() is None and time.monotonic() < deadline, cluster.logs()
            time.sleep(0.05)
        for name in ("a", "b", "c"):
            cluster.node(name)

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
        cluster.node("d")
        three_again = cluster.wait_for(
            "world size 3 after the join", lambda ev: starts(ev, 3, joined_at)
        )[0]
        scale_up = three_again["time"] - joined_at

        for name, proc in cluster.procs.items():
            if name not in (victim, "rendezvous"):
                assert proc.wait(timeout=240) == 0, f"node {name} failed:\n{cluster.logs()}"
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
    run_dir = run_dir_of(tmp_path / "runs")
    by_epoch: dict[int, list[int]] = {}
    for path in (run_dir / "ledger").glob("rank-*.jsonl"):
        for entry in read_ledger(path):
            by_epoch.setdefault(entry["epoch"], []).extend(entry["indices"])
    last = max(by_epoch)
    for epoch, seen in by_epoch.items():
        if epoch < last:
            assert sorted(seen) == list(range(4096)), f"epoch {epoch}"
        assert len(seen) == len(set(seen)), f"epoch {epoch} repeats samples"
    print(f"scale-down: {scale_down:.1f} s from SIGKILL to training at world size 2")
    print(f"scale-up: {scale_up:.1f} s from the new agent's start to world size 3")
