"""How long the group took to train again after its membership changed, and where the time went.

A node's agent and its workers share a small file of notes (in the agent's launch directory,
named by `SPOT_NOTES`): when the agent started, when its last rendezvous began and ended, and
when its workers stopped for a notice and had the emergency checkpoint committed. The workers
started after a rendezvous add when they joined the process group; rank 0 gathers every rank's
notes and, after the first step, the session emits one `recovery` event that splits the time
from its cause to training again, boundary by boundary:

    cause        a cloud notice received (kind "notice"), a new node's agent started ("join"),
                 or, for a worker failure, the first agent's new rendezvous ("restart")
    stop         -> the emergency checkpoint committed (every rank stopped at one step)
    departure    -> the first agent begins its new rendezvous (workers exit, the agent sees it)
    agent_start  -> a joining node's agent begins its rendezvous (its imports, Hydra, checks)
    rendezvous   -> the last node's rendezvous is complete
    worker_start -> the last worker has joined the process group (start-up, imports)
    restore      -> the checkpoint is loaded on every rank
    first_step   -> the first step at the new world size is done

Times are wall-clock (time.time()): across machines they are as good as the clocks' sync.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from spot.fsutil import atomic_write_bytes

log = logging.getLogger(__name__)
NOTES_ENV = "SPOT_NOTES"
SEGMENTS = (
    "stop",
    "departure",
    "agent_start",
    "rendezvous",
    "worker_start",
    "restore",
    "first_step",
)


def notes_path() -> Path | None:
    path = os.environ.get(NOTES_ENV)
    return Path(path) if path else None


def read_notes() -> dict:
    path = notes_path()
    try:
        return json.loads(path.read_text()) if path else {}
    except (OSError, ValueError):
        return {}


def note(**changes) -> None:
    """Add to this node's notes (None removes a key). One writer at a time: the agent between
    worker groups, and local rank 0 of a group."""
    path = notes_path()
    if path is None:
        return
    notes = {**read_notes(), **changes}
    notes = {k: v for k, v in notes.items() if v is not None}
    atomic_write_bytes(path, json.dumps(notes).encode())


def rendezvous_done(began: float) -> None:
    """The agent completed a rendezvous: its workers start next."""
    note(rendezvous=[began, time.time()], rounds=read_notes().get("rounds", 0) + 1)


def take_node_notes(local_rank: int) -> dict:
    """What a worker that just joined reports: when it joined, its pid, and (local rank 0, for
    its node) the agent's notes; a stop it reports is then taken, so no later restart reports
    it again."""
    mine = {"joined_at": time.time(), "pid": os.getpid()}
    if local_rank == 0:
        notes = read_notes()
        mine.update(notes)
        if "stopped" in notes:
            note(stopped=None)
    return mine


def note_stop(notices: list[dict | None]) -> None:
    """This node's workers stopped for these notices (by rank) and the emergency checkpoint is
    committed: its next workers report when, if the group then regroups."""
    received = [n for n in notices if n]
    first = min(received, key=lambda n: n["received_at"]) if received else None
    stopped = first and {
        "source": first["source"],
        "notice_at": first["received_at"],
        "committed_at": time.time(),
    }
    note(stopped=stopped)


def report(events, gathered: list[dict] | None, resumed_at: float, step: int) -> None:
    """Rank 0, after the first step: a `recovery` event (and a log line) if this start followed
    a membership change."""
    fields = gathered and split(gathered, resumed_at, time.time())
    if not fields:
        return
    events.emit("recovery", step=step, world_size=len(gathered), **fields)
    parts = [
        f"{k.removesuffix('_seconds')} {v:g} s"
        for k, v in fields.items()
        if k not in ("kind", "total_seconds")
    ]
    log.info(
        "training again %.1f s after the %s (%s)",
        fields["total_seconds"],
        fields["kind"],
        ", ".join(parts),
    )


def split(gathered: list[dict], restored_at: float, stepped_at: float) -> dict | None:
    """The `recovery` event's fields from every rank's notes, or None when this start is not a
    recovery (the job's first start, a start by hand with fresh agents, no agent of ours)."""
    nodes = [n for n in gathered if "rendezvous" in n]
    if not any(n.get("rounds", 0) > 1 for n in nodes):
        return None
    began = min(n["rendezvous"][0] for n in nodes)
    notices = [
        n["stopped"] for n in nodes if n.get("stopped", {}).get("source") not in (None, "signal")
    ]
    bounds: dict[str, float] = {}
    if notices:
        kind, cause = "notice", min(s["notice_at"] for s in notices)
        bounds["stop"] = max(s["committed_at"] for s in notices)
        bounds["departure"] = began
    elif any(n.get("rounds") == 1 for n in nodes):  # a node in its first round: it joined
        newest = max(nodes, key=lambda n: n.get("agent_started_at", 0))
        kind, cause = "join", newest["agent_started_at"]
        bounds["agent_start"] = newest["rendezvous"][0]
    else:
        kind, cause = "restart", began
    bounds["rendezvous"] = max(n["rendezvous"][1] for n in nodes)
    bounds["worker_start"] = max(n["joined_at"] for n in gathered)
    bounds["restore"] = restored_at
    bounds["first_step"] = stepped_at
    fields, previous = {"kind": kind}, cause
    for name, at in bounds.items():
        fields[f"{name}_seconds"] = round(max(at - previous, 0.0), 3)
        previous = max(at, previous)
    fields["total_seconds"] = round(stepped_at - cause, 3)
    return fields


def process_started_at() -> float:
    """When this process started (Linux: from /proc, so its imports count); else now."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: starttime
        with open("/proc/uptime") as f:  # seconds since boot, to 10 ms (btime: whole seconds)
            uptime = float(f.read().split()[0])
        return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.time()
