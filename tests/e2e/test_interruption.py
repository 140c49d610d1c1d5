"""Interruption notices end to end, real train.py processes: a notice through each cloud's
emulated metadata endpoint over HTTP, or a signal, stops training at a step every rank agrees
on, commits an emergency checkpoint, exits 75; the same command resumes with zero steps lost and
ends bitwise equal to an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from spot.distributed.ledger import read_ledger
from spot.run.events import read_events
from spot.run.exitcodes import EXIT_PREEMPTED
from spot.tools.emulate import EmulatorServer

from ..helpers import (
    FAST,
    REPO,
    assert_bitwise_equal,
    completed_run,
    final_state,
    run_dir_of,
    run_train,
    start_train,
    train_env,
    wait_for_step,
)

pytestmark = pytest.mark.slow

STEPS = 120
ARGS = [*FAST, f"trainer.max_steps={STEPS}", "checkpoint.every_steps=25", "trainer.log_every=1"]
SLOW = {"SPOT_FAILPOINTS": "train.step@sleep=0.03"}  # time to act mid-training


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    return completed_run(ARGS, tmp_path_factory.mktemp("reference"))


def control(server: EmulatorServer, action: str, **args) -> dict:
    req = urllib.request.Request(
        f"{server.url}/_emulator/{action}", data=json.dumps(args).encode(), method="POST"
    )
    with urllib.request.urlopen(req, timeout=5) as resp:
        return json.loads(resp.read())


def start(args: list[str], env: dict | None = None) -> subprocess.Popen:
    return start_train(args, {**train_env(), **SLOW, **(env or {})})


def finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, out


def assert_zero_lost_and_bitwise(root: Path, reference: Path, args: list[str]) -> dict:
    """The interrupted run stopped with an emergency checkpoint; the same command resumes from
    exactly that step and ends bitwise equal to the uninterrupted reference."""
    run_dir = run_dir_of(root)
    events = read_events(run_dir / "events.jsonl")
    (emergency,) = [e for e in events if e["event"] == "emergency_checkpoint"]
    stopped_at = max(e["step"] for e in events if e["event"] == "train")
    assert emergency["step"] == stopped_at  # the step it stopped at is the step it saved
    result = run_train(args)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    events = read_events(run_dir / "events.jsonl")
    resume = [e for e in events if e["event"] == "resume"][-1]
    assert resume["step"] == emergency["step"]  # zero steps lost
    assert_bitwise_equal(final_state(run_dir), final_state(reference))
    return emergency


def notice_args(cloud: str, server: EmulatorServer, root: Path) -> list[str]:
    """train.py polling `server`, the emulated metadata service of `cloud`, every 0.1 s."""
    return [
        *ARGS,
        f"cloud={cloud}",
        f"cloud.metadata_url={server.url}",
        "cloud.poll_seconds=0.1",
        f"run.root={root}",
    ]


@pytest.mark.parametrize("cloud", ["aws", "gcp", "azure"])
def test_cloud_notice_stops_commits_and_resumes_bitwise(cloud, reference, tmp_path):
    server = EmulatorServer(cloud).start()
    if cloud == "aws":
        server.emulator.token_ttl_cap = 1  # IMDSv2 tokens expire during the run: refreshed
    args = notice_args(cloud, server, tmp_path)
    try:
        proc = start(args)
        wait_for_step(tmp_path, 20, proc)
        if cloud == "azure":
            control(server, "other-vm-notice")  # another VM's eviction: ignored
            time.sleep(0.5)
            assert proc.poll() is None
        if cloud == "aws":
            time.sleep(1.5)  # past the first token's life
            control(server, "rebalance")  # early warning: checkpoint now, keep training
            time.sleep(0.5)
            assert proc.poll() is None
            control(server, "rebalance")  # again, with the notice: the notice wins
            control(server, "notice", in_seconds=-10)  # a notice whose time already passed
        else:
            control(server, "notice")
        code, out = finish(proc)
        assert code == EXIT_PREEMPTED, out[-3000:]
        state = control(server, "state")
    finally:
        server.stop()
    events = read_events(run_dir_of(tmp_path) / "events.jsonl")
    (notice,) = [e for e in events if e["event"] == "notice"]
    assert notice["source"] == cloud and notice["heard_by"] == [0]
    if cloud == "aws":
        assert notice["deadline"] < notice["received_at"]  # late, and still saved
        assert [e for e in events if e["event"] == "checkpoint" and e["reason"] == "rebalance"]
        assert state["tokens"] >= 2  # the 1-second tokens were renewed
    if cloud == "azure":
        assert state["acknowledged"] == [notice["detail"]["EventId"]]
    emergency = assert_zero_lost_and_bitwise(tmp_path, reference, args[:-2] + args[-1:])
    assert emergency["window_seconds"] > 0 or cloud == "aws"


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGUSR1"])
def test_signal_to_the_process_group_with_data_workers(signame, reference, tmp_path):
    """The signal goes to the whole process group, data-loader workers included (as a container
    stop or SLURM would): the workers ignore it and the main process saves first."""
    args = [*ARGS, "data.num_workers=2", f"run.root={tmp_path}"]
    proc = start(args)
    wait_for_step(tmp_path, 20, proc)
    os.killpg(proc.pid, getattr(signal, signame))
    code, out = finish(proc)
    assert code == EXIT_PREEMPTED, out[-3000:]
    events = read_events(run_dir_of(tmp_path) / "events.jsonl")
    (notice,) = [e for e in events if e["event"] == "notice"]
    assert (notice["source"], notice["kind"]) == ("signal", signame)
    assert_zero_lost_and_bitwise(tmp_path, reference, args)


def test_a_second_sigterm_during_the_emergency_write_changes_nothing(reference, tmp_path):
    args = [*ARGS, "checkpoint.every_steps=1000", f"run.root={tmp_path}"]
    # Each component write of a checkpoint takes 0.5 s more: the second signal lands mid-write.
    proc = start(args, env={"SPOT_FAILPOINTS": "checkpoint.component_written@sleep=0.5"})
    wait_for_step(tmp_path, 20, proc)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.7)
    proc.send_signal(signal.SIGTERM)
    code, out = finish(proc)
    assert code == EXIT_PREEMPTED, out[-3000:]
    assert_zero_lost_and_bitwise(tmp_path, reference, args)


@pytest.mark.serial
def test_a_broken_endpoint_neither_stops_nor_slows_training(tmp_path):
    """The same run with no cloud, and with cloud=aws against an endpoint that hangs, answers
    500 or garbage: no notice, exit 0, and the training steps per second side by side (from the
    `train` events: start-up not counted)."""
    args = [*FAST, "trainer.max_steps=600", "trainer.log_every=50", "checkpoint.every_steps=1000"]

    def steps_per_second(extra: list[str], root: Path) -> float:
        result = run_train([*args, *extra, f"run.root={root}"])
        assert result.returncode == 0, result.stderr[-2000:]
        events = read_events(run_dir_of(root) / "events.jsonl")
        assert not [e for e in events if e["event"] == "notice"]
        trained = [e for e in events if e["event"] == "train"]
        first, last = trained[0], trained[-1]  # steps 50 and 600
        return (last["step"] - first["step"]) / (last["time"] - first["time"])

    rates = {"healthy": steps_per_second([], tmp_path / "local")}
    for mode in ("hang", "500", "garbage"):
        server = EmulatorServer("aws").start()
        control(server, "misbehave", mode=mode)
        try:
            extra = ["cloud=aws", f"cloud.metadata_url={server.url}", "cloud.poll_seconds=0.05"]
            rates[mode] = steps_per_second(extra, tmp_path / mode)
            assert server.requests > 0  # the watcher did call the broken endpoint
        finally:
            server.stop()
    ratios = {mode: rate / rates["healthy"] for mode, rate in rates.items()}
    print("steps/s relative to no endpoint:", {k: round(v, 2) for k, v in ratios.items()})
    # A watcher that blocked or starved the loop would show as a large drop; noise is ~10-20%.
    assert min(ratios.values()) > 0.5, ratios


def worker_pid(root: Path, rank: int) -> int:
    """The pid of the worker with this RANK, as the run's newest `start` event says."""
    starts = [e for e in read_events(run_dir_of(root) / "events.jsonl") if e["event"] == "start"]
    return starts[-1]["pids"][rank]


def test_two_ranks_a_signal_to_rank_one_only_stops_both_at_one_step(tmp_path):
    two = [*ARGS, "elastic.nproc_per_node=2", "data.ledger=true"]
    reference = completed_run(two, tmp_path / "reference")
    args = [*two, f"run.root={tmp_path / 'run'}"]
    proc = start(args)
    wait_for_step(tmp_path / "run", 20, proc)
    os.kill(worker_pid(tmp_path / "run", rank=1), signal.SIGUSR1)  # SLURM-style, one process only
    code, out = finish(proc)
    assert code == EXIT_PREEMPTED, out[-3000:]  # the agent stopped too: this node is going
    run_dir = run_dir_of(tmp_path / "run")
    events = read_events(run_dir / "events.jsonl")
    (notice,) = [e for e in events if e["event"] == "notice"]
    assert notice["heard_by"] == [1] and notice["kind"] == "SIGUSR1"
    (emergency,) = [e for e in events if e["event"] == "emergency_checkpoint"]
    last = [read_ledger(run_dir / f"ledger/rank-{r}.jsonl")[-1]["step"] for r in (0, 1)]
    assert last == [emergency["step"], emergency["step"]]  # both ranks stopped at that step
    assert_zero_lost_and_bitwise(tmp_path / "run", reference, args)


def test_chaos_reports_bitwise_equality(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "spot",
            "chaos",
            "--interruptions",
            "3",
            "--seed",
            "3",
            "--step-delay",
            "0.02",
            "--max-wait",
            "0.5",
            "--workdir",
            str(tmp_path),
            "--",
            *FAST,
            "trainer.max_steps=150",
            "checkpoint.every_steps=20",
        ],
        cwd=REPO,
        env=train_env(),
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = {
        line.split()[0]: line.split()
        for line in result.stdout.splitlines()
        if line.split()[:1] and line.split()[0] in ("notice", "sigterm", "sigkill")
    }
    assert set(rows) == {"notice", "sigterm", "sigkill"}, result.stdout
    assert rows["notice"][2] == "0" and rows["sigterm"][2] == "0"  # a notice loses no step
    assert "bitwise equal to the uninterrupted run: yes" in result.stdout
