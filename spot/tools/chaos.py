"""`python -m spot chaos`: train under repeated interruptions and prove nothing was lost.

    python -m spot chaos --interruptions 5 --seed 1 -- +experiment=example trainer.max_steps=400

Runs the training configuration once uninterrupted (the reference), then again under chaos: at
random moments it interrupts the run with a cloud notice (through the metadata emulator, as the
cloud would), a SIGTERM, or a SIGKILL without notice, and restarts the same command each time as
an orchestrator would. At the end it prints, per kind, the interruptions, the steps lost (the
steps trained but not in any checkpoint the next attempt resumed from) and the recovery time
(interruption to training again), and whether the final state is bitwise equal to the reference.
Exit 0 when it is.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from spot.checkpoint.manager import CheckpointManager, list_step_dirs
from spot.run.events import read_events
from spot.run.exitcodes import EXIT_COMPLETE, EXIT_PREEMPTED
from spot.run.identity import RunPaths
from spot.tools.emulate import EmulatorServer, make_emulator
from spot.tree import first_difference

KINDS = ("notice", "sigterm", "sigkill")


def _train(script: Path, args: list[str], env: dict, log) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(script), *args],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # a SIGKILL takes the whole tree, as a reclaimed machine does
    )


def _events(root: Path) -> list[dict]:
    run = next(RunPaths.under(root), None)
    return read_events(run.events) if run else []


def _last_step(events: list[dict]) -> int:
    return max((e["step"] for e in events if e["event"] == "train"), default=0)


def _final_state(root: Path) -> dict:
    run = next(r for r in RunPaths.under(root) if r.complete.exists())
    _, path = list_step_dirs(run.checkpoints)[0]
    return CheckpointManager.load(path).state


def run(args: argparse.Namespace, overrides: list[str]) -> int:
    rng = random.Random(args.seed)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="spot-chaos-"))
    script = Path(args.script).resolve()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline"}
    if args.step_delay:
        env["SPOT_FAILPOINTS"] = f"train.step@sleep={args.step_delay}"
    base = [*overrides, "trainer.log_every=1"]  # every step in events.jsonl: exact accounting

    print(f"chaos: reference run (uninterrupted) in {workdir / 'reference'}", flush=True)
    with open(workdir / "reference.log", "w") as log:
        code = _train(script, [*base, f"run.root={workdir / 'reference'}"], env, log).wait()
    if code != EXIT_COMPLETE:
        print(f"chaos: the reference run failed ({code}); see {workdir / 'reference.log'}")
        return 2

    server = EmulatorServer(args.cloud).start()
    root = workdir / "chaos"
    command = [
        *base,
        f"cloud={args.cloud}",
        f"cloud.metadata_url={server.url}",
        "cloud.poll_seconds=0.2",
        f"run.root={root}",
    ]
    records: list[dict] = []
    pending: list[str] = []
    attempt = 0
    try:
        while True:
            attempt += 1
            server.emulator = make_emulator(args.cloud)  # a new machine: no notice pending
            log = open(workdir / f"attempt-{attempt}.log", "w")  # noqa: SIM115 - closed below
            proc = _train(script, command, env, log)
            if len(records) < args.interruptions:
                if not pending:  # every kind once per round, in a random order
                    pending = rng.sample(args.kinds, len(args.kinds))
                kind = pending.pop()
                resumed = _last_step(_events(root)) if records else 0
                # Wait until this attempt trains, then a random moment more.
                while proc.poll() is None and _last_step(_events(root)) <= resumed:
                    time.sleep(0.02)
                time.sleep(rng.uniform(0, args.max_wait))
                if proc.poll() is None:
                    at = time.time()
                    if kind == "notice":
                        server.control("notice", {})
                    else:
                        os.killpg(proc.pid, signal.SIGTERM if kind == "sigterm" else signal.SIGKILL)
                    code = proc.wait()
                    records.append(
                        {"kind": kind, "at": at, "exit": code, "trained": _last_step(_events(root))}
                    )
                    log.close()
                    continue
            code = proc.wait()
            log.close()
            if code == EXIT_COMPLETE:
                break
            if code != EXIT_PREEMPTED:
                print(f"chaos: attempt {attempt} failed with {code}; see its log in {workdir}")
                return 2
    finally:
        server.stop()

    # Account for each interruption from the events of the attempt that followed it.
    events = _events(root)
    resumes = [e for e in events if e["event"] == "resume"]
    trained = [e for e in events if e["event"] == "train"]
    for record, resume in zip(records, resumes, strict=False):
        record["lost_steps"] = record["trained"] - resume["step"]
        again = [e["time"] for e in trained if e["time"] > resume["time"]]
        record["recovery_seconds"] = (again[0] if again else resume["time"]) - record["at"]

    # Bit for bit; the first difference says the run was not reproduced, and where to look.
    diff = first_difference(_final_state(root), _final_state(workdir / "reference"))
    print(f"\nchaos: {len(records)} interruptions over {attempt} attempts (seed {args.seed})")
    print(f"{'kind':<9} {'count':>5} {'lost steps':>11} {'recovery s (mean)':>18}  exit codes")
    for kind in KINDS:
        rows = [r for r in records if r["kind"] == kind]
        if rows:
            lost = sum(r.get("lost_steps", 0) for r in rows)
            recovery = sum(r.get("recovery_seconds", 0.0) for r in rows) / len(rows)
            codes = sorted({r["exit"] for r in rows})
            print(f"{kind:<9} {len(rows):>5} {lost:>11} {recovery:>18.2f}  {codes}")
    verdict = "yes" if diff is None else f"NO ({diff})"
    print(f"final state bitwise equal to the uninterrupted run: {verdict}")
    print(f"runs and logs: {workdir}")
    return 0 if diff is None else 1


def _kinds(text: str) -> list[str]:
    kinds = text.split(",")
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"{', '.join(unknown)} not allowed; allowed: {', '.join(KINDS)}"
        )
    return kinds


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--interruptions", type=int, default=4)
    parser.add_argument("--kinds", type=_kinds, default=list(KINDS))
    parser.add_argument("--cloud", choices=("aws", "gcp", "azure"), default="aws")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--max-wait", type=float, default=2.0, help="seconds after training resumes"
    )
    parser.add_argument("--step-delay", type=float, default=0.0, help="slow each step (seconds)")
    parser.add_argument("--script", default="train.py")
    parser.add_argument("--workdir", default=None)
    parser.add_argument(
        "overrides", nargs="*", help="after --: the train.py overrides of the run to interrupt"
    )


def command(args: argparse.Namespace) -> int:
    return run(args, args.overrides)
