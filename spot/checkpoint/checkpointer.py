"""The one checkpoint component the training loop talks to.

It owns what a step boundary needs from checkpointing: the manager that writes and commits (rank 0;
with DDP the model and optimizer are replicas, so the other ranks only hand over their RNG
states; with FSDP every rank's shard writer writes its shards into the checkpoint rank 0 commits),
the interval schedule, the uploader, the notice-window warning, and the rule that every rank
waits for rank 0's save on the long-timeout group. The loop calls it around each optimizer step:

    checkpointer.before_update()          # a snapshot still being copied finishes first
    optimizer.step(); ...
    wanted = checkpointer.after_update()  # rank 0's vote: a checkpoint is due
    due, ... = world.agree(wanted, ...)
    if due: checkpointer.save("interval")

`consider(figures)` after an evaluation, and `finish()` / `emergency(notices)` at the end. Two
kinds of save: the interval's and a rebalance's (`save`) may be skipped while the one before is
still being written (when_busy=skip); a best, final or emergency checkpoint must commit, whatever
became of the one before. Its collaborators come through the constructor.
"""

from __future__ import annotations

import logging

from spot.checkpoint import rng, storage
from spot.checkpoint.best import BestCheckpoint
from spot.checkpoint.interval import CheckpointSchedule
from spot.checkpoint.manager import CheckpointManager, CheckpointWriteError, SaveKind
from spot.checkpoint.state import TrainingState, unwrap
from spot.distributed.world import World
from spot.interruption import previous_commit_seconds, record_emergency, warn_if_window_at_risk
from spot.run.events import EventLog, read_events

log = logging.getLogger(__name__)


class Checkpointer:
    def __init__(
        self,
        world: World,
        state: TrainingState,
        schedule: CheckpointSchedule,
        events: EventLog,
        cloud,
        *,
        manager: CheckpointManager | None,
        replica: CheckpointManager | None = None,
        shard_writer: CheckpointManager | None = None,
        uploader=None,
        final_upload_timeout_seconds: float = 600.0,
        overlap: bool = True,
        best: BestCheckpoint,
    ):
        """`manager`: rank 0's CheckpointManager (None on the other ranks). `replica`: on the
        first rank of a node whose disk is not rank 0's, a manager of that disk's checkpoints,
        where emergency checkpoints are committed too (None elsewhere). `uploader`: rank 0's
        spot.checkpoint.upload.Uploader when checkpoints also go to a bucket, else None.
        `best`: checkpoint.keep_best's owner (the one the manager's retention asks).
        `shard_writer`: with sharded checkpoints (trainer.strategy=fsdp), on a rank other than 0,
        the manager that writes this rank's shards into each checkpoint rank 0 commits."""
        self.world = world
        self.state = state
        self.schedule = schedule
        self.events = events
        self.cloud = cloud
        self.manager = manager
        self.replica = replica
        self.shard_writer = shard_writer
        # Whether any rank keeps copies: then emergency saves hand every rank all RNG states.
        self._replicated = world.agree(replica is not None)[0]
        self.uploader = uploader
        self.final_upload_timeout_seconds = final_upload_timeout_seconds
        self.best = best
        # State that nothing changes before the next optimizer step is copied in the background.
        self._defer = state.unchanged_until_update() if overlap else ()
        self._first_step = state.step
        self._closed = False
        schedule.start(state.step)
        self._window_warned = manager is not None and warn_if_window_at_risk(
            previous_commit_seconds(read_events(events.path), uploader is not None),
            cloud,
            events,
        )

    def before_update(self) -> None:
        """Call before the optimizer changes the state: a background copy of it finishes first."""
        for manager in (self.manager, self.shard_writer):
            if manager is not None:
                manager.before_update()

    def after_update(self) -> bool:
        """Call once the step is done: handles a finished background save, allocates the
        snapshot after the first step, re-estimates the interval. Returns this rank's vote for a
        checkpoint now (rank 0 decides; the loop agrees on it with the other ranks)."""
        manager = self.manager or self.shard_writer
        if manager is None:
            return False
        manager.poll()
        if self.state.step == self._first_step + 1:  # the state's layout is known now
            manager.prepare(self.state.state_dict([rng.capture()] * self.world.world_size))
        if self.manager is None:  # a shard writer: rank 0 votes
            return False
        for step, stall, persist in manager.measurements():
            self.schedule.measured(stall, persist, step)
            if not self._window_warned:
                self._window_warned = warn_if_window_at_risk(persist, self.cloud, self.events)
        return self.schedule.due(self.state.step)

    def consider(self, figures: dict[str, float]) -> None:
        """After an evaluation (the same figures on every rank): a new best by
        checkpoint.keep_best is checkpointed now, and kept whatever keep_last says."""
        if self.best.consider(figures, self.state.step):
            self._save("best", SaveKind.MUST_COMMIT)

    def save(self, reason: str) -> None:
        """A checkpoint the loop asked for (`interval`, `rebalance`), on every rank together:
        skipped if the one before is still being written and checkpoint.when_busy=skip."""
        self._save(reason, SaveKind.MAY_SKIP)

    def _save(
        self, reason: str, kind: SaveKind, replicated: bool = False, keep_here: bool = False
    ) -> None:
        """Checkpoint the state at this step, on every rank together (each hands over its RNG).
        `replicated`: replicas may commit this checkpoint, so every rank builds rank 0's bytes;
        `keep_here`: this rank's replica (if any) does. A best checkpoint is waited for: the
        record that names it goes into every later checkpoint, so it must exist."""
        state = self.state
        rng_states = self.world.gather(rng.capture())  # every rank's RNG goes into the checkpoint
        snapshot = None
        if replicated:
            rng_states = self.world.share(rng_states)
            snapshot = self._as_on_leader(state.state_dict(rng_states))
        managers = [m for m in (self.manager, keep_here and self.replica, self.shard_writer) if m]
        if managers:
            info = {
                "reason": reason,
                "epoch": state.epoch,
                "samples_in_epoch": state.sampler.consumed,
            }
            if self.best.record:  # `python -m spot list` marks it; a restart restores it
                info["best"] = self.best.retention_record
            if state.init:  # where the run's weights started
                info["init"] = state.init
            snapshot = snapshot or state.state_dict(rng_states)
            for manager in managers:
                saved = manager.save(state.step, snapshot, info, kind=kind, defer=self._defer)
                if saved is not None and manager is self.manager:  # None: skipped, busy
                    self.schedule.saved(state.step)
            if kind is SaveKind.MUST_COMMIT and self.manager is not None:
                self.manager.wait()
        # A save can block rank 0 (synchronous, or waiting for the one in flight) for longer
        # than the collective timeout: the others wait for it here, on the group whose timeout
        # is for rank 0's checkpoint I/O, rather than in the next all-reduce.
        self.world.wait_for_leader()

    def _as_on_leader(self, snapshot: dict) -> dict:
        """The state as rank 0 saves it. DDP keeps parameters and optimizer states equal on
        every rank, but not buffers: batch norm's running statistics are updated in each rank's
        forward from its own samples. Rank 0's buffers replace this rank's (a few KiB to MiB)."""
        names = [n for n, _ in unwrap(self.state.model).named_buffers() if n in snapshot["model"]]
        leader = self.world.share({n: snapshot["model"][n] for n in names})
        return {**snapshot, "model": {**snapshot["model"], **leader}}

    def finish(self) -> None:
        """The end of training: the final checkpoint commits (and is uploaded) before the run may
        be marked complete. CheckpointWriteError if it cannot be."""
        manager = self.manager
        needed = manager is not None and manager.last_committed_step != self.state.step
        if self.world.agree(needed)[0]:
            self._save("final", SaveKind.LAST)
        self._closed = True
        for writer in (manager, self.shard_writer):
            if writer is not None:
                writer.close()
        if self.uploader is not None:
            if not self.uploader.drain(self.final_upload_timeout_seconds):
                raise CheckpointWriteError(
                    f"the final checkpoint (step {self.state.step}) is committed locally but not "
                    f"uploaded to {self.uploader.store.url} in {self.final_upload_timeout_seconds:g} s"
                )
            self.uploader.retain_remote()  # once more: the last one may have failed, untried since
            self.uploader.close()
            storage.mark_remote_complete(self.uploader.store, self.state.step)

    def emergency(self, notices: list[dict | None] | None, keep_here: bool = True) -> None:
        """An interruption notice: every rank stopped at this step. Commit the emergency
        checkpoint, upload it in the time the notice leaves, and say how long it all took.
        `keep_here`: this node stays, so its replica (if any) commits the checkpoint too, and
        the next rank 0 here restores it without a download."""
        self._save("emergency", SaveKind.LAST, replicated=self._replicated, keep_here=keep_here)
        self._closed = True
        for writer in (self.replica, self.shard_writer):
            if writer is not None:
                writer.close()
        if self.manager is not None:
            self.manager.close()
        # No rank leaves before the checkpoint is committed: the next attempt's rank 0 (on a
        # node that stays) would otherwise start while it is written, clear it as a leftover or
        # restore the one before. Sharded on node-local disks, it is committed in the bucket
        # (the upload), where every node restores it from.
        in_bucket = self.manager is not None and self.manager.meets_in_bucket  # (rank 0's)
        if in_bucket:
            self._record_emergency(notices)
        self.world.wait_for_leader()
        if self.manager is not None and not in_bucket:
            self._record_emergency(notices)

    def _record_emergency(self, notices: list[dict | None] | None) -> None:
        record_emergency(
            notices, self.state.step, self.cloud.notice_seconds, self.uploader, self.events
        )

    def close(self) -> None:
        """On any other way out (an exception): let a save in flight commit, stop the uploader.
        The previous checkpoint is intact whatever happens here."""
        if self._closed:
            return
        self._closed = True
        try:
            for manager in (self.replica, self.shard_writer, self.manager):
                if manager is not None:
                    manager.close()
        except CheckpointWriteError as exc:
            log.warning("%s", exc)
        finally:
            if self.uploader is not None:
                self.uploader.close()
