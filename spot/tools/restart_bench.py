"""`python -m spot bench-restart`: how soon an elastic group trains again after its workers are
restarted, with workers forked from the agent's preloaded forkserver and with workers spawned
afresh (each importing torch), side by side in one run.

Each start method runs `train.py` as a real elastic agent on this machine (`--nproc` workers, a
small model, one checkpoint every 5 steps) whose workers fail on purpose at step 7 (a failpoint)
until the agent's `--restarts` are spent; each restart's `recovery` event (rank 0, after the
first step) says where the time went: rendezvous, worker start, restore, first step.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from spot.run.events import read_events

TRAIN = Path(__file__).resolve().parents[2] / "train.py"
METHODS = ("spawn", "forkserver")
PARTS = ("rendezvous", "worker_start", "restore", "first_step", "total")


def restarts(method: str, nproc: int, count: int, root: Path) -> list[dict]:
    """The `recovery` events of a run whose workers fail at step 7 until `count` restarts."""
    args = [
        "logger=none",
        "model.hidden=32",
        "trainer.batch_size=64",
        "trainer.max_steps=1000",
        "checkpoint.every_steps=5",
        "checkpoint.async_save=false",
        f"elastic.nproc_per_node={nproc}",
        f"elastic.max_restarts={count}",
        f"elastic.start_method={method}",
        "elastic.monitor_interval_seconds=0.1",
        f"run.root={root}",
    ]
    env = {**os.environ, "SPOT_FAILPOINTS": "train.step@step=7@raise", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(TRAIN), *args], env=env, capture_output=True, text=True, timeout=900
    )
    events = [e for path in root.glob("*/*/events.jsonl") for e in read_events(path)]
    found = [e for e in events if e["event"] == "recovery"]
    if len(found) != count:
        tail = (done.stdout + done.stderr)[-3000:]
        raise RuntimeError(f"{method}: {len(found)} of {count} restarts recorded:\n{tail}")
    return found


def report(results: dict[str, list[dict]]) -> str:
    lines = [
        f"{'seconds (median of ' + str(len(results[METHODS[0]])) + ')':<26}"
        + "".join(f"{m:>12}" for m in METHODS)
        + f"{'ratio':>10}"
    ]
    for part in PARTS:
        medians = [statistics.median(e[f"{part}_seconds"] for e in results[m]) for m in METHODS]
        ratio = medians[0] / medians[1] if medians[1] else float("inf")
        lines.append(f"{part:<26}" + "".join(f"{v:>12.2f}" for v in medians) + f"{ratio:>9.1f}x")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nproc", type=int, default=2, help="workers (default 2)")
    parser.add_argument("--restarts", type=int, default=3, help="per start method (default 3)")


def command(args) -> int:
    if args.nproc < 1 or args.restarts < 1:
        print("bench-restart: --nproc and --restarts must be at least 1", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="spot-bench-restart-") as tmp:
        results = {m: restarts(m, args.nproc, args.restarts, Path(tmp) / m) for m in METHODS}
    print(
        f"worker-group restarts, {args.nproc} worker(s), spawn vs forkserver (ratio: spawn / forkserver)"
    )
    print(report(results))
    return 0
