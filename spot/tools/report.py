"""`python -m spot report RUN_DIR`: one picture of a run, from its `events.jsonl`.

Top: the loss over steps, each attempt in turn; steps an interruption lost (trained again after
the restart) in grey, interruptions as red lines, restarts (the step resumed from) as green
lines, world-size changes as purple ones. Middle: a time line of wall time: training that
survived, training that was lost, checkpoint stalls, restarting. Bottom: what it cost.
Prints the same summary as `python -m spot cost RUN_DIR`.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from spot.run.events import read_events
from spot.run.goodput import run_accounting, split_attempts, step_times, summary_lines
from spot.run.identity import RunPaths

# Fixed colours, so a reader (or a test) can find each kind of mark.
KEPT, LOST, STALL, RESTART_GAP = "#1f77b4", "#9e9e9e", "#ff7f0e", "#d62728"
INTERRUPTION, RESTART, WORLD_SIZE = "#d62728", "#2ca02c", "#9467bd"


def marks(events: list[dict]) -> dict[str, list[int]]:
    """Steps to mark: where each interrupted attempt stopped, where each restart resumed, and
    where the world size changed."""
    attempts = [a for a in split_attempts(events) if a]
    interrupted = [max((e["step"] for e in a if "step" in e), default=0) for a in attempts[:-1]]
    restarts = [
        next(e["step"] for e in a if e["event"] == "start")
        for a in attempts[1:]
        if any(e["event"] == "start" for e in a)
    ]
    resized = [e["step"] for e in events if e["event"] == "world_size_change"]
    return {"interruptions": interrupted, "restarts": restarts, "world_size_changes": resized}


def plot(run_dir: Path, out: Path) -> dict:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a training machine
    import matplotlib.pyplot as plt

    events = read_events(RunPaths.at(run_dir).events)
    cloud, a = run_accounting(run_dir)
    attempts = [x for x in split_attempts(events) if x]
    resumed_at = [
        next((e["step"] for e in x if e["event"] == "start"), math.inf) for x in attempts[1:]
    ] + [math.inf]
    found = marks(events)
    t0 = attempts[0][0]["time"] if attempts else 0.0

    fig, (loss_ax, time_ax, cost_ax) = plt.subplots(
        3, 1, figsize=(10, 8), gridspec_kw={"height_ratios": [3, 1, 1]}
    )
    fig.suptitle(f"{run_dir.parent.name}/{run_dir.name} on {cloud.name} ({cloud.instance_type})")

    for i, attempt in enumerate(attempts):
        points = [(e["step"], e["loss"]) for e in attempt if e["event"] == "train"]
        kept = [(s, v) for s, v in points if s <= resumed_at[i]]
        lost = [(s, v) for s, v in points if s >= resumed_at[i]]
        for part, colour, label, z in ((kept, KEPT, "loss", 2), (lost, LOST, "lost steps", 3)):
            if part:  # lost steps on top: the next attempt trains the same steps again
                loss_ax.plot(*zip(*part, strict=True), color=colour, lw=1.5, label=label, zorder=z)
    # Interruptions wide, below the others: a restart at the same step (no step lost) shows both.
    for steps, colour, style, width, label in (
        (found["interruptions"], INTERRUPTION, "-", 4, "interruption"),
        (found["restarts"], RESTART, "--", 1.5, "restart from checkpoint"),
        (found["world_size_changes"], WORLD_SIZE, ":", 1.5, "world size change"),
    ):
        for j, step in enumerate(steps):
            loss_ax.axvline(step, color=colour, ls=style, lw=width, label=None if j else label)
    handles = dict(zip(*reversed(loss_ax.get_legend_handles_labels()), strict=True))
    loss_ax.legend(handles.values(), handles.keys(), loc="upper right", fontsize=8)
    loss_ax.set_xlabel("step")
    loss_ax.set_ylabel("loss")

    # The time line: one row per kind of time, in seconds since the run began.
    rows = {"trained, kept": [], "trained, lost": [], "checkpoint stall": [], "restarting": []}
    for i, attempt in enumerate(attempts):
        for step, begin, end in step_times(attempt):
            row = "trained, lost" if step > resumed_at[i] else "trained, kept"
            rows[row].append((begin - t0, end - begin))
        for e in attempt:
            if e["event"] == "checkpoint" and e.get("stall_seconds"):
                rows["checkpoint stall"].append((e["time"] - t0, e["stall_seconds"]))
        if i + 1 < len(attempts):
            gap_start = attempt[-1]["time"]
            rows["restarting"].append((gap_start - t0, attempts[i + 1][0]["time"] - gap_start))
    colours = (KEPT, LOST, STALL, RESTART_GAP)
    for y, (spans, colour) in enumerate(zip(rows.values(), colours, strict=True)):
        time_ax.broken_barh(spans, (y - 0.4, 0.8), color=colour)
    time_ax.set_yticks(range(len(rows)), list(rows))
    time_ax.set_xlabel(f"wall time (s): goodput {a.goodput:.1%}")

    bars = {"spot": a.spot_usd, "on demand": a.on_demand_usd}
    cost_ax.barh(list(bars), list(bars.values()), color=[KEPT, LOST])
    cost_ax.set_xlabel(
        f"USD: saved ${a.saved_usd:.4f}; {a.interruptions} interruptions, {a.lost_steps} lost steps"
    )
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return {"accounting": a, "cloud": cloud, "marks": found}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a run directory (<run.root>/<run.name>/<run.id>)")
    parser.add_argument("--out", help="the PNG to write (default RUN_DIR/report.png)")


def command(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    out = Path(args.out) if args.out else run_dir / "report.png"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("report: needs matplotlib: pip install -e '.[report]'")
        return 2
    try:
        result = plot(run_dir, out)
    except FileNotFoundError as exc:
        print(f"report: {exc}")
        return 2
    print("\n".join(summary_lines(run_dir, result["cloud"], result["accounting"])))
    m = result["marks"]
    print(
        f"  marked: interruptions at steps {m['interruptions']}, restarts from steps "
        f"{m['restarts']}, world size changes at steps {m['world_size_changes']}"
    )
    print(f"report: {out}")
    return 0
