"""Where a run's wall time went, and what it cost, from its `events.jsonl`.

An attempt is one process's events: from finding its checkpoint (`resume`) through `start` to
its last event. Its steps up to where the next
attempt resumed survived; the ones past it were trained again (lost). The split of wall time:

- productive: time spent on steps that survived (checkpoint stalls taken out),
- lost: time spent on steps that were trained again after an interruption,
- stalled: time the loop was blocked by checkpoints (`stall_seconds`, the emergency checkpoint),
- restarting: from the end of one attempt (its last event) to the next attempt's `start` (which
  comes after its checkpoint is restored),
- other: the rest (the first start-up, the final checkpoint and upload).

goodput = productive / wall. Cost: each attempt's machines (`nodes`) for its duration, and for
the restart gaps, at the cloud's spot price; the on-demand figure is what the surviving work
(productive + stalled) would have cost on demand, with no interruptions to pay for.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass
class Accounting:
    wall_seconds: float = 0.0
    productive_seconds: float = 0.0
    lost_seconds: float = 0.0
    stalled_seconds: float = 0.0
    restarting_seconds: float = 0.0
    other_seconds: float = 0.0
    interruptions: int = 0
    lost_steps: int = 0
    recovery_seconds: float = 0.0  # mean, from an attempt's last event to the next one's start
    goodput: float = 0.0
    spot_usd: float = 0.0
    on_demand_usd: float = 0.0
    saved_usd: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


# Written by an attempt before its `start` event, while it finds and restores its checkpoint.
_BEFORE_START = ("download", "corrupt_checkpoint_skipped", "resume", "world_size_change")


def split_attempts(events: list[dict]) -> list[list[dict]]:
    attempts: list[list[dict]] = [[]]
    for event in events:
        if event["event"] == "start" and any(e["event"] == "start" for e in attempts[-1]):
            current = attempts[-1]
            split = len(current)
            while split > 0 and current[split - 1]["event"] in _BEFORE_START:
                split -= 1
            attempts[-1], new = current[:split], current[split:]
            attempts.append(new)
        attempts[-1].append(event)
    return attempts


def step_times(attempt: list[dict]) -> list[tuple[int, float, float]]:
    """(step, begin, end) for every step the attempt logged, spreading the time between two
    `train` events evenly over the steps between them."""
    start = next((e for e in attempt if e["event"] == "start"), attempt[0])
    previous_step, previous_time = start.get("step", 0), start["time"]
    spans = []
    for event in attempt:
        if event["event"] != "train" or event["step"] <= previous_step:
            continue
        each = (event["time"] - previous_time) / (event["step"] - previous_step)
        for i in range(event["step"] - previous_step):
            begin = previous_time + i * each
            spans.append((previous_step + i + 1, begin, begin + each))
        previous_step, previous_time = event["step"], event["time"]
    return spans


def account(events: list[dict], spot_per_hour: float, on_demand_per_hour: float) -> Accounting:
    a = Accounting()
    attempts = [x for x in split_attempts(events) if x]
    if not attempts:
        return a
    a.wall_seconds = attempts[-1][-1]["time"] - attempts[0][0]["time"]
    # Where each next attempt started (its `start` step: the checkpoint it restored, or 0).
    resumes = [
        next((e["step"] for e in x if e["event"] == "start"), None) for x in attempts[1:]
    ] + [None]
    recoveries = []
    for i, attempt in enumerate(attempts):
        nodes = next((e.get("nodes", 1) for e in attempt if e["event"] == "start"), 1)
        kept_until = resumes[i] if resumes[i] is not None else math.inf
        steps = step_times(attempt)
        stalls = sum(e.get("stall_seconds", 0.0) for e in attempt if e["event"] == "checkpoint")
        stalls += sum(
            e.get("seconds", 0.0) for e in attempt if e["event"] == "emergency_checkpoint"
        )
        trained = sum(end - begin for _, begin, end in steps)
        lost = sum(end - begin for step, begin, end in steps if step > kept_until)
        a.lost_seconds += lost
        a.lost_steps += sum(1 for step, _, _ in steps if step > kept_until)
        a.stalled_seconds += stalls
        a.productive_seconds += max(0.0, trained - lost - stalls)
        duration = attempt[-1]["time"] - attempt[0]["time"]
        a.spot_usd += duration / 3600 * nodes * spot_per_hour
        if i + 1 < len(attempts):
            a.interruptions += 1
            gap = attempts[i + 1][0]["time"] - attempt[-1]["time"]  # to the next `start`
            a.restarting_seconds += gap
            recoveries.append(gap)
            a.spot_usd += gap / 3600 * nodes * spot_per_hour
    a.other_seconds = max(
        0.0,
        a.wall_seconds
        - a.productive_seconds
        - a.lost_seconds
        - a.stalled_seconds
        - a.restarting_seconds,
    )
    a.recovery_seconds = sum(recoveries) / len(recoveries) if recoveries else 0.0
    a.goodput = a.productive_seconds / a.wall_seconds if a.wall_seconds > 0 else 0.0
    nodes_now = next((e.get("nodes", 1) for e in reversed(events) if e["event"] == "start"), 1)
    useful_hours = (a.productive_seconds + a.stalled_seconds) / 3600
    a.on_demand_usd = useful_hours * nodes_now * on_demand_per_hour
    a.saved_usd = a.on_demand_usd - a.spot_usd
    return a


@dataclass
class Economics:
    """The article's back-of-the-envelope, done right: a job of `work_hours` on demand, against
    spot with interruptions at `rate_per_hour`, checkpoints costing `checkpoint_seconds` every
    `interval_seconds`, and `restart_seconds` to come back after each interruption."""

    work_hours: float
    spot_per_hour: float
    on_demand_per_hour: float
    rate_per_hour: float
    checkpoint_seconds: float
    interval_seconds: float
    restart_seconds: float = 0.0

    @property
    def overhead(self) -> float:
        """Extra compute as a share of the work: checkpoint stalls, plus per interruption half
        an interval re-done on average and the restart."""
        per_checkpoint = self.checkpoint_seconds / self.interval_seconds
        per_interruption = (self.interval_seconds / 2 + self.restart_seconds) / 3600
        return per_checkpoint + self.rate_per_hour * per_interruption

    @property
    def spot_hours(self) -> float:
        return self.work_hours * (1 + self.overhead)

    @property
    def spot_usd(self) -> float:
        return self.spot_hours * self.spot_per_hour

    @property
    def on_demand_usd(self) -> float:
        return self.work_hours * self.on_demand_per_hour

    @property
    def break_even_overhead(self) -> float:
        """The overhead at which spot costs as much as on demand."""
        return self.on_demand_per_hour / self.spot_per_hour - 1 if self.spot_per_hour else math.inf

    @property
    def optimal_interval_seconds(self) -> float:
        """Young/Daly: sqrt(2 * C * MTBF)."""
        if self.rate_per_hour <= 0:
            return math.inf
        return math.sqrt(2 * self.checkpoint_seconds * 3600 / self.rate_per_hour)


def run_accounting(run_dir: Path):
    """(the run's cloud config, its Accounting) from `events.jsonl` and `config.yaml`."""
    from omegaconf import OmegaConf

    from spot.run.events import read_events
    from spot.run.identity import RunPaths

    paths = RunPaths.at(run_dir)
    for path in (paths.events, paths.config):
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist (a run directory has it)")
    cloud = OmegaConf.load(paths.config).cloud
    events = read_events(paths.events)
    return cloud, account(events, cloud.price.spot_per_hour, cloud.price.on_demand_per_hour)


def summary_lines(run_dir: Path, cloud, a: Accounting) -> list[str]:
    lines = [f"run {run_dir} on cloud={cloud.name} ({cloud.instance_type})"]
    for key in ("wall", "productive", "lost", "stalled", "restarting", "other"):
        seconds = getattr(a, f"{key}_seconds")
        share = seconds / a.wall_seconds if a.wall_seconds else 0.0
        lines.append(f"  {key:<11} {seconds:10.1f} s  {share:6.1%}")
    lines.append(
        f"  interruptions {a.interruptions}, lost steps {a.lost_steps}, goodput {a.goodput:.1%}"
    )
    lines.append(
        f"  spot ${a.spot_usd:.4f}, the surviving work on demand ${a.on_demand_usd:.4f}, "
        f"saved ${a.saved_usd:.4f}"
    )
    return lines


def add_arguments(parser) -> None:
    """`python -m spot cost [RUN_DIR]`: the spot economics for given figures, or a run's."""
    parser.add_argument("run_dir", nargs="?", help="a run directory: its wall time and cost")
    parser.add_argument("--work-hours", type=float, default=100.0)
    parser.add_argument("--spot", type=float, default=7.35, help="$/h (p3.16xlarge spot)")
    parser.add_argument("--on-demand", type=float, default=24.48, help="$/h (on demand)")
    parser.add_argument("--rate", type=float, default=0.05, help="interruptions per hour")
    parser.add_argument("--checkpoint-seconds", type=float, default=180.0)
    parser.add_argument("--interval-minutes", type=float, default=30.0)
    parser.add_argument("--restart-seconds", type=float, default=300.0)


def command(args) -> int:

    if args.run_dir:
        try:
            cloud, a = run_accounting(Path(args.run_dir))
        except FileNotFoundError as exc:
            print(f"cost: {exc}")
            return 2
        print("\n".join(summary_lines(Path(args.run_dir), cloud, a)))
        return 0

    e = Economics(
        args.work_hours,
        args.spot,
        args.on_demand,
        args.rate,
        args.checkpoint_seconds,
        args.interval_minutes * 60,
        args.restart_seconds,
    )
    print(f"{args.work_hours:g} h of work; spot ${args.spot}/h, on demand ${args.on_demand}/h")
    print(
        f"  overhead {e.overhead:.2%}: checkpoints {args.checkpoint_seconds:g} s every "
        f"{args.interval_minutes:g} min, {args.rate:g} interruptions/h re-doing half an "
        f"interval and restarting in {args.restart_seconds:g} s"
    )
    print(f"  spot: {e.spot_hours:.1f} h, ${e.spot_usd:,.2f}; on demand: ${e.on_demand_usd:,.2f}")
    print(f"  saved ${e.on_demand_usd - e.spot_usd:,.2f} ({1 - e.spot_usd / e.on_demand_usd:.1%})")
    print(f"  break-even overhead: {e.break_even_overhead:.0%} (spot is cheaper below it)")
    print(
        f"  Young/Daly interval for this checkpoint cost: {e.optimal_interval_seconds / 60:.1f} min"
    )
    return 0
