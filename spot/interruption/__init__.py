"""Interruption notices: the cloud's metadata endpoint (one module per cloud) and signals, behind
one monitor the training loop asks once per step.

A watcher runs in a daemon thread and only sets flags; it survives an unreachable, slow or
garbled endpoint (short timeouts, errors counted and logged, never raised), so a broken endpoint
can neither stop nor slow training. Signal handlers only set a flag too. The loop turns the flags
into a coordinated stop (every rank agrees on the step) and an emergency checkpoint.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class Notice:
    source: str  # aws | gcp | azure | signal
    kind: str  # terminate, stop, hibernate, preempt, SIGTERM, ...
    received_at: float  # time.time() when this process saw it
    deadline: float | None = None  # when the machine goes away, if the notice says
    detail: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class InterruptionMonitor:
    """The configured cloud's watcher (when `poll_metadata`) and the signal handlers."""

    def __init__(self, cloud, *, poll_metadata: bool, install_signals: bool = True):
        self.cloud = cloud
        self._lock = threading.Lock()
        self.notice: Notice | None = None
        self.signals_received = 0
        self._rebalance: dict | None = None
        self._rebalances_seen: set[str] = set()
        self.watcher = None
        self._previous_handlers = {}
        if install_signals:
            for name in cloud.signals:
                signum = getattr(signal, name)
                self._previous_handlers[signum] = signal.signal(signum, self._on_signal)
        if poll_metadata and cloud.name in ("aws", "gcp", "azure") and cloud.metadata_url:
            self.watcher = _watcher_for(cloud, self)
            self.watcher.start()

    # ---- set by watchers and handlers ---------------------------------------------------

    def _on_signal(self, signum, frame) -> None:  # only sets a flag: safe in a handler
        self.signals_received += 1
        if self.notice is None:
            self.notice = Notice("signal", signal.Signals(signum).name, time.time())
            if self.cloud.notice_seconds:
                self.notice.deadline = self.notice.received_at + self.cloud.notice_seconds

    def report_notice(self, notice: Notice) -> None:
        with self._lock:
            if self.notice is None:
                self.notice = notice
                log.warning("interruption notice from %s: %s", notice.source, notice.kind)

    def report_rebalance(self, key: str, detail: dict) -> None:
        """An early warning (AWS rebalance recommendation): checkpoint now, keep training."""
        with self._lock:
            if key not in self._rebalances_seen:
                self._rebalances_seen.add(key)
                self._rebalance = detail
                log.warning("rebalance recommendation: checkpointing now, training goes on")

    # ---- read by the training loop -------------------------------------------------------

    @property
    def stop_requested(self) -> bool:
        return self.notice is not None

    def take_rebalance(self) -> dict | None:
        with self._lock:
            detail, self._rebalance = self._rebalance, None
            return detail

    def acknowledge(self) -> None:
        """Tell the cloud the checkpoint is committed (Azure: start the event now)."""
        if self.watcher is not None:
            self.watcher.acknowledge()

    def close(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()
        for signum, handler in self._previous_handlers.items():  # the next job of a sweep
            signal.signal(signum, handler)  # installs its own
        self._previous_handlers = {}


def _watcher_for(cloud, monitor: InterruptionMonitor):
    if cloud.name == "aws":
        from spot.interruption.aws import AwsWatcher as cls
    elif cloud.name == "gcp":
        from spot.interruption.gcp import GcpWatcher as cls
    else:
        from spot.interruption.azure import AzureWatcher as cls
    return cls(cloud.metadata_url, cloud.poll_seconds, monitor)


def previous_commit_seconds(events: list[dict], with_upload: bool) -> float | None:
    """How long the newest checkpoint of an earlier attempt took to commit (and upload)."""
    saves = [e for e in events if e.get("event") == "checkpoint"]
    if not saves:
        return None
    seconds = saves[-1].get("persist_seconds", 0.0)
    uploads = [e for e in events if e.get("event") == "upload"]
    if with_upload and uploads:
        seconds += uploads[-1].get("seconds", 0.0)
    return seconds


def warn_if_window_at_risk(commit_seconds: float | None, cloud, events) -> bool:
    """Say so when a checkpoint takes more than half the notice window: an emergency checkpoint
    may not fit. Returns whether it warned."""
    if commit_seconds is None or commit_seconds <= 0.5 * cloud.notice_seconds:
        return False
    log.warning(
        "a checkpoint takes %.1f s to commit, more than half the %g s notice window of "
        "cloud=%s: an emergency checkpoint may not fit (a smaller state, faster storage, or "
        "checkpoint more often)",
        commit_seconds,
        cloud.notice_seconds,
        cloud.name,
    )
    events.emit(
        "notice_window_at_risk", commit_seconds=commit_seconds, notice_seconds=cloud.notice_seconds
    )
    return True


def record_emergency(
    notices: list[dict | None], step: int, notice_seconds: float, uploader, events
) -> None:
    """On rank 0, after the emergency checkpoint committed: upload it in the time the notice
    leaves (when a remote is configured), then record `notice` and `emergency_checkpoint`.
    `notices`: each rank's notice (or None), in rank order."""
    heard = [{**n, "rank": r} for r, n in enumerate(notices) if n]
    first = min(heard, key=lambda n: n["received_at"])
    deadline = first["deadline"] or first["received_at"] + notice_seconds
    uploaded = None
    if uploader:
        uploaded = uploader.drain(max(0.0, deadline - time.time()))
        uploader.close()
    committed_at = time.time()
    events.emit("notice", step=step, heard_by=[n["rank"] for n in heard], **first)
    events.emit(
        "emergency_checkpoint",
        step=step,
        seconds=round(committed_at - first["received_at"], 6),
        window_seconds=round(deadline - first["received_at"], 6),
        seconds_left=round(deadline - committed_at, 6),
        uploaded=uploaded,
    )
    log.warning(
        "interruption (%s %s): checkpoint of step %d committed %.1f s after the notice, "
        "%.1f s before the deadline; exiting 75",
        first["source"],
        first["kind"],
        step,
        committed_at - first["received_at"],
        deadline - committed_at,
    )


def ignore_in_data_workers(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: data workers ignore the interruption signals. A SIGTERM sent
    to the whole process group (a container stop, `kill -- -PGID`, SLURM) would otherwise kill
    them at once, and the main process would die on its next batch before saving. They still
    exit with the main process (PyTorch's workers watch their parent)."""
    for name in ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT", "SIGHUP"):
        signal.signal(getattr(signal, name), signal.SIG_IGN)
