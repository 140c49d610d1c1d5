"""Several elastic nodes on loopback, each a real `python train.py elastic=elastic ...` (an agent
and its workers), optionally with its own emulated cloud metadata endpoint and its own disk; and
the rendezvous store in its own process (`python -m spot rendezvous`)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from spot.distributed.ledger import read_ledger
from spot.run.events import read_events
from spot.tools.emulate import EmulatorServer

from ..helpers import FAST, REPO, train_env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def elastic_args(port: int, steps: int, *, store: str = "external", min_nodes: int = 1):
    return [
        *FAST,
        "elastic=elastic",
        f"elastic.min_nodes={min_nodes}",
        "elastic.max_nodes=3",
        "elastic.nproc_per_node=1",
        f"elastic.rdzv_endpoint=127.0.0.1:{port}",
        f"elastic.rdzv_store_host={store}",
        "elastic.local_addr=127.0.0.1",
        "elastic.rdzv_last_call_seconds=1",
        "elastic.monitor_interval_seconds=0.2",
        "elastic.max_restarts=10",
        "elastic.collective_timeout_seconds=20",
        f"trainer.max_steps={steps}",
        "trainer.log_every=1",
        "data.ledger=true",
    ]


class Cluster:
    """Nodes by name; `roots` are their run.root (one shared, or one each: node-local disks)."""

    def __init__(self, tmp_path: Path, env: dict | None = None):
        self.tmp = tmp_path
        self.port = free_port()
        self.procs: dict[str, subprocess.Popen] = {}
        self.roots: dict[str, Path] = {}
        self.emulators: dict[str, EmulatorServer] = {}
        self.env = {
            **(env or train_env()),
            "SPOT_FAILPOINTS": "train.step@sleep=0.08",
            "LOGLEVEL": "INFO",
        }

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

    def store(self) -> subprocess.Popen:
        """The rendezvous store, external to every node; returns once it listens."""
        proc = self.start(
            "rendezvous",
            [sys.executable, "-m", "spot", "rendezvous", "--host", "127.0.0.1"]
            + ["--port", str(self.port)],
        )
        deadline = time.monotonic() + 60
        while "listening" not in (self.tmp / "rendezvous.log").read_text():
            assert proc.poll() is None and time.monotonic() < deadline, self.logs()
            time.sleep(0.05)
        return proc

    def wait_for_store(self, timeout: float = 120) -> None:
        """Until something listens on the rendezvous port (an agent hosting the store)."""
        deadline = time.monotonic() + timeout
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            assert time.monotonic() < deadline, f"no rendezvous store:\n{self.logs()}"
            time.sleep(0.1)

    def node(
        self, name: str, args: list[str], root: Path, cloud: str | None = None
    ) -> subprocess.Popen:
        """A node training with `args`, its checkpoints under `root`; with `cloud`, its own
        metadata endpoint of that cloud, polled every 0.1 s."""
        self.roots[name] = root
        extra = [f"run.root={root}"]
        if cloud:
            server = self.emulators[name] = EmulatorServer(cloud).start()
            extra += [
                f"cloud={cloud}",
                f"cloud.metadata_url={server.url}",
                "cloud.poll_seconds=0.1",
            ]
        return self.start(name, [sys.executable, str(REPO / "train.py"), *args, *extra])

    def notice(self, name: str) -> float:
        """The cloud tells node `name` it is reclaimed in 60 s. Returns when (time.time())."""
        at = time.time()
        self.emulators[name].control("notice", {"in_seconds": 60})
        return at

    def run_dirs(self) -> list[Path]:
        roots = set(self.roots.values())
        return sorted(d for r in roots for d in r.glob("*/*") if d.is_dir())  # <name>/<id>

    def events(self) -> list[dict]:
        """Every node's events, in time order (node-local disks each hold a part)."""
        found = [e for d in self.run_dirs() for e in read_events(d / "events.jsonl")]
        return sorted(found, key=lambda e: e["time"])

    def ledger_by_epoch(self) -> dict[int, list[int]]:
        by_epoch: dict[int, list[int]] = {}
        for run_dir in self.run_dirs():
            for path in (run_dir / "ledger").glob("rank-*.jsonl"):
                for entry in read_ledger(path):
                    by_epoch.setdefault(entry["epoch"], []).extend(entry["indices"])
        return by_epoch

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

    def assert_completed(self, but: tuple[str, ...] = ()) -> None:
        """Every process but `but` (and the rendezvous store) ends with 0: the run is complete."""
        for name, proc in self.procs.items():
            if name not in (*but, "rendezvous"):
                assert proc.wait(timeout=240) == 0, f"node {name} failed:\n{self.logs()}"

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for server in self.emulators.values():
            server.stop()


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


def assert_each_sample_once(by_epoch: dict[int, list[int]], dataset_size: int = 4096) -> None:
    """Every completed epoch holds each sample once, the unfinished last one none twice."""
    last = max(by_epoch)
    for epoch, seen in by_epoch.items():
        if epoch < last:
            assert sorted(seen) == list(range(dataset_size)), f"epoch {epoch}"
        assert len(seen) == len(set(seen)), f"epoch {epoch} repeats samples"
