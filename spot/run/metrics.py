"""The run's metrics, driven by its events: what `events.jsonl` records becomes the contract's
`spot/*`, `ckpt/*`, `elastic/*` and `cost/*` figures, handed to a tracker.

A tracker is anything with `log(figures, step)` and `close()`: W&B (`spot.run.wandb_tracker`) or
nothing. Another one (TensorBoard, MLflow) is one new module and one line in `TRACKERS`.
"""

from __future__ import annotations

import importlib
import logging
import re
from typing import Any, Protocol

from spot.distributed.recovery import SEGMENTS
from spot.run.config import LoggerConfig
from spot.run.events import EventLog, read_events
from spot.run.goodput import account

log = logging.getLogger(__name__)
STEP_KEY = "trainer/step"  # every figure's x-axis: the training step it describes
EVENT_KEY = "spot/event_index"  # the row's event in events.jsonl: what a tracker already holds

# logger.backend -> "module:class". The class takes (cfg, run_dir, run_id, config).
TRACKERS = {"wandb": "spot.run.wandb_tracker:WandbTracker"}
# What a tracker imports when it starts (wandb: 1.4 s here): an elastic agent's forkserver
# imports it once, so a worker started after a membership change does not.
TRACKER_IMPORTS = {"wandb": ("spot.run.wandb_tracker", "wandb")}


class Tracker(Protocol):
    def log(self, figures: dict[str, float], step: int) -> None:
        """`figures` describe training step `step`; called in the order things happen (a
        resumed run describes some steps again: the ones its interruption lost)."""

    def logged_events(self) -> int:
        """How many of the run's events (from the start of `events.jsonl`) this tracker already
        holds, from its own records; the rest are sent again."""

    def close(self) -> None: ...


class NullTracker:
    def log(self, figures: dict[str, float], step: int) -> None:
        pass

    def logged_events(self) -> int:
        return 1 << 62  # nothing to send again

    def close(self) -> None:
        pass


def tracker_imports(cfg: LoggerConfig) -> list[str]:
    if cfg.backend == "none" or cfg.mode == "disabled":
        return []
    return list(TRACKER_IMPORTS.get(cfg.backend, ()))


def make_tracker(cfg: LoggerConfig, run_dir, run_id: str, config: dict, rank: int) -> Tracker:
    if rank != 0 or cfg.backend == "none" or cfg.mode == "disabled":
        return NullTracker()
    module, name = TRACKERS[cfg.backend].split(":")
    return getattr(importlib.import_module(module), name)(cfg, run_dir, run_id, config)


def accounting_figures(events: list[dict], spot_per_hour: float, on_demand_per_hour: float):
    a = account(events, spot_per_hour, on_demand_per_hour)
    return {
        "spot/interruptions": a.interruptions,
        "spot/lost_steps": a.lost_steps,
        "spot/recovery_seconds": a.recovery_seconds,
        "spot/goodput": a.goodput,
        "spot/wall_seconds": a.wall_seconds,
        "cost/spot_usd": a.spot_usd,
        "cost/on_demand_usd": a.on_demand_usd,
        "cost/saved_usd": a.saved_usd,
    }


# An event's own figures under the contract's names: {event: {metric: field of the event}}.
_FIELDS = {
    "train": {
        "train/loss": "loss",
        "train/lr": "lr",
        "data/wait_seconds": "data_wait_seconds",
        "data/fetched_bytes": "data_fetched_bytes",
    },
    "checkpoint": {
        "ckpt/stall_seconds": "stall_seconds",
        "ckpt/persist_seconds": "persist_seconds",
        "ckpt/bytes": "bytes",
    },
    "upload": {"ckpt/upload_seconds": "seconds", "ckpt/upload_bytes": "bytes"},
    "start": {
        "elastic/world_size": "world_size",
        "elastic/lr_scale": "lr_scale",
        "elastic/nodes": "nodes",
    },
    "world_size_change": {"elastic/world_size": "world_size"},
    # After a membership change: notice (or join) to training again, and where the time went.
    "recovery": {
        "elastic/recovery_seconds": "total_seconds",
        **{f"elastic/recovery_{part}_seconds": f"{part}_seconds" for part in SEGMENTS},
    },
    "step_skipped": {"train/grad_scale": "scale"},
    "compiled": {"train/compile_seconds": "seconds"},
    "eval": {"val/loss": "loss", "val/accuracy": "accuracy"},  # fp16: the scale after the skip
    "emergency_checkpoint": {
        "ckpt/emergency_seconds": "seconds",
        "spot/notice_seconds_left": "seconds_left",
    },
}
_MARKS = {
    "notice": "spot/notice",
    "corrupt_checkpoint_skipped": "ckpt/corrupt_skipped",
    "step_skipped": "train/skipped_step",
}


def _figures(event: dict) -> dict[str, float]:
    fields = _FIELDS.get(event["event"], {})
    figures = {name: event[field] for name, field in fields.items() if field in event}
    if event["event"] in _MARKS:
        figures[_MARKS[event["event"]]] = 1
    return figures


# After these, the wall-time accounting (goodput, cost) is logged again: at every checkpoint,
# when a resumed attempt starts (the previous one's lost steps are known then), and at the end.
_ACCOUNT_AFTER = ("start", "checkpoint", "emergency_checkpoint", "complete")


class RunMetrics:
    """Subscribe to the run's `EventLog`: each event becomes tracker figures at its step.

    Every row carries `spot/event_index` (the event's place in `events.jsonl`), so a tracker
    that lost its last rows (a SIGKILL takes W&B's unflushed buffer with it) is sent them again
    from the events when the run resumes."""

    def __init__(
        self,
        tracker: Tracker,
        history: list[dict],
        spot_per_hour: float,
        on_demand_per_hour: float,
    ):
        self.tracker = tracker
        self.events: list[dict] = []  # every event of the run so far, for goodput and cost
        self._prices = (spot_per_hour, on_demand_per_hour)
        self._step = 0
        self._failed = False
        held = tracker.logged_events()
        for event in history:
            self._take(event, send=len(self.events) >= held)

    def __call__(self, event: dict) -> None:  # EventLog calls it in order, one at a time
        self._take(event, send=True)

    def _take(self, event: dict, send: bool) -> None:
        index = len(self.events)
        self.events.append(event)
        step = self._step = event.get("step", self._step)
        if not send or self._failed:
            return
        figures = _figures(event)
        if event["event"] in _ACCOUNT_AFTER:
            figures |= accounting_figures(self.events, *self._prices)
        if event["event"] == "notice":  # this attempt is ending: count it now
            earlier = accounting_figures(self.events, *self._prices)["spot/interruptions"]
            figures["spot/interruptions"] = earlier + 1
        if not figures:
            return
        try:
            self.tracker.log({**figures, EVENT_KEY: index}, step)
        except Exception as exc:  # a tracker's trouble never stops training
            self._failed = True
            log.warning("metrics tracker failed, no more figures sent to it: %s", exc)

    def close(self) -> None:
        self.tracker.close()


_SECRET_NAME = re.compile(r"(secret|password|passwd|token|credential|api_?key|access_?key)", re.I)
_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")


def without_credentials(value: Any) -> Any:
    """A config for a tracker: keys that name a secret dropped, `user:pass@` taken out of
    URLs. Credentials come from the environment, never from the config; this is the belt to
    that brace."""
    if isinstance(value, dict):
        return {
            k: without_credentials(v) for k, v in value.items() if not _SECRET_NAME.search(str(k))
        }
    if isinstance(value, list):
        return [without_credentials(v) for v in value]
    if isinstance(value, str):
        return _USERINFO.sub("", value)
    return value


def subscribe_metrics(events: EventLog, tracker: Tracker, cloud) -> RunMetrics:
    """From now on, the run's events become figures for `tracker`; the events already in the
    log (earlier attempts) count towards goodput and cost."""
    history = read_events(events.path) if events.path else []
    metrics = RunMetrics(
        tracker, history, cloud.price.spot_per_hour, cloud.price.on_demand_per_hour
    )
    events.subscribe(metrics)
    return metrics
