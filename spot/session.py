"""One attempt at a run, as a worker sees it: what it opens, restores and closes.

train.py tells the story (set up, restore, loop, finish); this module holds the machinery behind
each chapter, so that the story stays short and a forker edits only the story:

    job = Job.from_config(cfg, overrides)    # spot/job.py: settings, identity, directory, bucket
    world = join(job)                        # this worker's process group (or a world of one)
    with Session(job, world, device) as run: # directory, config, events, checkpoints, metrics
        restored = run.restore()             # the newest verified checkpoint, on every rank
        plan = run.plan(dataset, restored)   # each step needs what the one before returns
        state = run.resume(model, optimizer, scheduler, plan, amp, data_identity)
        ... the loop: run.checkpointer, run.monitor, run.record(...), run.log(...)
        run.finish() or run.stop()

Everything the session opens is closed on every way out, in reverse order (an ExitStack).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from omegaconf import OmegaConf

from spot.buckets import BucketError, remote_options
from spot.checkpoint import parts, sharded, storage
from spot.checkpoint.best import BestCheckpoint
from spot.checkpoint.checkpointer import Checkpointer
from spot.checkpoint.interval import CheckpointSchedule
from spot.checkpoint.manager import CheckpointManager, CheckpointUnusable
from spot.checkpoint.manifest import CorruptCheckpoint
from spot.checkpoint.sharded import ShardGroup
from spot.checkpoint.source import load_named
from spot.checkpoint.state import TrainingState
from spot.distributed import elastic, membership, recovery
from spot.distributed import world as distributed
from spot.distributed.ledger import Ledger, truncate_ledgers
from spot.distributed.sampler import ResumableBatchSampler
from spot.evaluation import evaluate, figure_names
from spot.fsutil import atomic_write_bytes
from spot.interruption import InterruptionMonitor
from spot.job import Job
from spot.run.config import ConfigError, keys_added, one_line
from spot.run.datawait import DataWait
from spot.run.events import EventLog
from spot.run.metrics import make_tracker, subscribe_metrics
from spot.run.progress import Progress
from spot.run.schedule import TrainingLength
from spot.run.start import Initial, Plan, Restored, Unusable, receive, send

log = logging.getLogger("train")


class Session(contextlib.ExitStack):
    """One attempt at a run on one rank: opened by `with`, closed on every way out."""

    def __init__(self, job: Job, world: distributed.World, device: torch.device):
        super().__init__()
        self.job, self.world, self.s, self.device = job, world, job.settings, device
        self.paths = job.paths
        self.checkpoints: CheckpointManager | None = None  # rank 0's: the others hold replicas
        self.replica: CheckpointManager | None = None  # a node-local disk's emergency copies
        self.shard_writer: CheckpointManager | None = None  # fsdp, ranks > 0: their shards
        self.shards: ShardGroup | None = None  # fsdp: the ranks writing and reading shards
        self.uploader = None  # rank 0's, with a bucket: started after the restore
        self.initial: Initial | None = None  # init.checkpoint's weights, for a run with none
        self.reclaimed = False  # the cloud takes this node: its agent must not restart workers
        self._own_disk = False  # this rank's run directory is not rank 0's (node-local disks)
        self._data_wait = DataWait()
        self._logged_step = 0  # the step of the last "train" event, or of the start

    def __enter__(self) -> Session:
        super().__enter__()
        try:
            self._open()
        except BaseException:
            self.close()
            raise
        return self

    def _open(self) -> None:
        s, job, leader = self.s, self.job, self.world.is_leader
        self.paths.dir.mkdir(parents=True, exist_ok=True)
        self.events = EventLog(self.paths.events if leader else None)
        self.callback(self.events.close)
        # What "the best checkpoint" is, before anything can upload or delete one.
        places = ("disk", "bucket") if job.remote else ("disk",)
        self.best = BestCheckpoint(s.checkpoint.keep_best, self.events, places)
        separate_disk = membership.separate_disk(self.world, self.paths.dir)
        self._own_disk = separate_disk
        if leader:
            atomic_write_bytes(self.paths.config, OmegaConf.to_yaml(job.cfg, resolve=True).encode())
        remote = (
            leader
            and job.remote
            and storage.RemoteCheckpoints(job.remote, self.events, s.storage.alert_after_failures)
        )
        if s.trainer.strategy == "fsdp":
            self.shards = self._shard_group(separate_disk)
        keeps_replica = separate_disk and self.world.local_rank == 0 and self.shards is None
        if leader or keeps_replica or self.shards is not None:
            manager = CheckpointManager(
                self.paths.checkpoints,
                keep_last=s.checkpoint.keep_last,
                async_save=s.checkpoint.async_save and (leader or self.shards is not None),
                on_corrupt=s.checkpoint.on_corrupt,
                on_error=s.checkpoint.on_error,
                when_busy=s.checkpoint.when_busy,
                events=self.events,
                meta={
                    "run": {"name": s.run.name, "id": job.run_id},
                    "world_size": self.world.world_size,
                    "config_digest": job.digest,
                    "training_config": job.training_config,
                },
                remote=remote or None,
                spared=self.best.spared,
                shards=self.shards,
            )
            if leader:
                manager.remove_stale()
                self.checkpoints = manager
            elif self.shards is not None:
                self.shard_writer = manager
            else:
                manager.remove_stale()
                self.replica = manager

    def _shard_group(self, own_disk: bool) -> ShardGroup:
        """The ranks writing sharded checkpoints (trainer.strategy=fsdp). On node-local disks
        (any node's run directory is not rank 0's) no disk holds a whole checkpoint: each rank
        also puts its shards in the bucket, where the checkpoint meets (spot.checkpoint.parts)."""
        publisher = None
        if self.world.agree(own_disk)[0]:  # one node knows it: every rank says so
            if self.job.remote is None:
                raise ConfigError(
                    "storage",
                    f"fsdp on node-local disks ({self.paths.dir} is not the same directory on "
                    "every node) needs a bucket (storage=s3, gcs or azure), where each node's "
                    "shards meet; or use a shared file system for run.root",
                )
            keep = self.s.checkpoint.keep_last
            publisher = parts.Publisher(self.job.remote, self.paths.checkpoints, own_disk, keep)
        return ShardGroup(
            self.world.background_group(), self.world.rank, self.world.share, publisher
        )

    def restore(self) -> Restored | None:
        """The newest verified checkpoint, local or in the bucket, on every rank (rank 0 loads
        it, the others receive it); None to start from scratch (then `initial` holds
        init.checkpoint's weights, if configured). CheckpointUnusable if the newest cannot be
        used."""
        self._began = time.perf_counter()
        # After a membership change: when each node stopped, regrouped and started (recovery).
        self._notes = self.world.gather(recovery.take_node_notes(self.world.local_rank))
        found = self._find() if self.checkpoints is not None else None
        if self.checkpoints is not None and not isinstance(found, Unusable):
            self._start_uploads(found)
        found = receive(self.world.share(send(found)))
        if isinstance(found, Unusable):
            self.events.emit("checkpoint_unusable", reason=found.reason)
            raise CheckpointUnusable(found.reason)
        # A node with a disk of its own holds its ranks' ledgers and shards: they lose what the
        # restored step had not reached there too (rank 0's did on its disk), before any rank
        # appends or writes.
        problem = None
        if self._own_disk and self.world.local_rank == 0:
            step = found.step if isinstance(found, Restored) else 0
            try:
                if self.s.data.ledger:
                    truncate_ledgers(self.paths, step)
                if self.shards is not None and self.shards.publisher is not None:
                    self.shards.publisher.abandon_after(step)
            except OSError as exc:
                problem = f"{self.paths.dir} on this node: {one_line(exc)}"
        if self.world.agree(problem is not None)[0]:  # (every rank waits for every node's)
            raise OSError(problem or "another node could not catch up with the restore")
        if isinstance(found, Initial):  # weights to start from, not a run to resume
            self.initial = found
            return None
        if found is not None and self.checkpoints is None:  # rank 0's knows it already
            self.best.restore(found.best)
        return found

    def _find(self) -> Restored | Initial | Unusable | None:
        """Rank 0: what this attempt starts from."""
        try:
            loaded = self.checkpoints.load_latest(
                self.job.digest, self.job.training_config, keys_added()
            )
        except CheckpointUnusable as exc:
            return Unusable(str(exc))
        if loaded is not None:
            best = loaded.manifest.get("best") or loaded.state["trainer"].get("best")
            m = loaded.manifest
            files = m.files if m.sharded and self.checkpoints.meets_in_bucket else None
            return Restored(loaded.step, str(loaded.path), loaded.state, best, m.sharded, files)
        if not self.s.init.checkpoint:
            return None
        init = self.s.init
        try:
            options = remote_options(self.s.storage, init.checkpoint)
            source, where = load_named(init.checkpoint, **options)
        except (CorruptCheckpoint, storage.RemoteError, BucketError) as exc:
            return Unusable(f"init.checkpoint {init.checkpoint}: {one_line(exc)}")
        keep = ("model", "optimizer") if init.optimizer else ("model",)
        return Initial(where, source.step, {k: source.state[k] for k in keep})

    def _start_uploads(self, found: Restored | Initial | None) -> None:
        """Rank 0, once it knows what it restores: retention learns the best first, then
        uploads start (what the restore moved aside or could not download is neither queued
        nor counted), and the ledgers lose what the restored step had not reached."""
        restored = found if isinstance(found, Restored) else None
        if restored is not None:
            self.best.restore(restored.best)
        self.uploader = self.checkpoints.start_uploads()
        if self.uploader is not None:  # closed on every way out, also before the checkpointer's
            self.callback(self.uploader.close)
        if self.s.data.ledger:
            truncate_ledgers(self.paths, restored.step if restored else 0)

    def plan(self, dataset, restored: Restored | None) -> Plan:
        """The data order, batch and run length at this world size, from what restore() found.
        The reference world size (for which the config's LR and batch are meant) is the config's,
        else the one the run started with. `data.order=shards` orders by the data set's shards
        (its `shard_ends`: spot/shards/dataset.py)."""
        s, world = self.s, self.world
        dataset_size, groups = len(dataset), None
        if s.data.order == "shards":
            groups = getattr(dataset, "shard_ends", None)
            if groups is None:
                raise ConfigError(
                    "data.order", "shards needs a data set stored as shards (data=shards)"
                )
        if s.data.partitions > 1 and s.data.partitions > len(groups):
            raise ConfigError(
                "data.partitions",
                f"{s.data.partitions}: at most the data set's {len(groups)} shards",
            )
        saved = restored.state["trainer"] if restored else {}
        reference = (
            s.elastic.reference_world_size or saved.get("reference_world_size") or world.world_size
        )
        sampler = ResumableBatchSampler(
            dataset_size,
            s.trainer.batch_size,
            seed=s.seed,
            shuffle=s.data.shuffle,
            rank=world.rank,
            world_size=world.world_size,
            global_batch=elastic.global_batch(
                s.elastic.batch_policy,
                s.trainer.batch_size,
                world.world_size,
                reference,
                s.trainer.global_batch_size,
            ),
            same_micro_batches=s.trainer.strategy == "fsdp",
            groups=groups,
            window=s.data.window_shards,
            partitions=s.data.partitions,
        )
        # The length in steps at this world size (an epoch's steps depend on it under scale_lr):
        # the progress bar's total. Training stops on the configured bounds, and the LR schedule
        # follows the share of training done (TrainingLength), not this estimate.
        epoch_steps = s.trainer.max_epochs and s.trainer.max_epochs * sampler.steps_per_epoch()
        max_steps = min(x for x in (s.trainer.max_steps, epoch_steps) if x)
        length = TrainingLength(
            s.trainer.max_steps,
            s.trainer.max_epochs,
            dataset_size,
            schedule_steps=saved.get("schedule_steps") or max_steps,
        )
        return Plan(sampler, length, reference, max_steps, restored)

    def resume(self, model, optimizer, scheduler, plan: Plan, amp=None, data_identity=None):
        """The training state, loaded from the planned checkpoint if any, with the LR scaled to
        this world size; the tracker started; `resume`, `world_size_change` and `start` events
        emitted."""
        s, world, events = self.s, self.world, self.events
        restored, sampler, reference = plan.restored, plan.sampler, plan.reference_world_size
        saved = restored.state["trainer"] if restored else {}
        # Metrics follow the events; the tracker's run is the one the checkpoint names.
        tracker_run_id = saved.get("tracker_run_id") or f"{s.run.name}-{self.job.run_id}"
        config = {**OmegaConf.to_container(self.job.cfg, resolve=True)}
        tracker = make_tracker(
            s.logger,
            self.paths.dir,
            tracker_run_id,
            {**config, "world_size": world.world_size},
            rank=world.rank,
        )
        self.callback(subscribe_metrics(events, tracker, s.cloud).close)
        config_lrs = list(scheduler.base_lrs)
        state = TrainingState(
            model,
            optimizer,
            scheduler,
            sampler,
            seed=s.seed,
            rank=world.rank,
            world_size=world.world_size,
            reference_world_size=reference,
            tracker_run_id=tracker_run_id,
            schedule_steps=plan.length.schedule_steps,
            precision=amp,
            best=self.best,
            data_identity=data_identity,  # a resume on other data is refused
            sharded=s.trainer.strategy == "fsdp",
        )
        if restored or self.initial:
            try:  # refuses one that does not fit
                if restored:
                    shards = Path(restored.path) if restored.sharded else None
                    group = self.shards and self.shards.group
                    fetch = self._fetcher(restored) if restored.files else None
                    if fetch is not None:
                        shards = fetch.directory
                    state.load_state_dict(restored.state, shards, group, fetch)
                    if fetch is not None:
                        self._report_fetched(fetch)
                else:
                    source = {"source": self.initial.source, "step": self.initial.step}
                    state.load_weights(self.initial.state, source)
            except CheckpointUnusable as exc:
                events.emit("checkpoint_unusable", reason=str(exc))
                raise
        if self.initial:
            events.emit("init", **state.init, optimizer=self.s.init.optimizer)
            log.info("weights from %s (step %d)", state.init["source"], state.init["step"])
        if restored:
            events.emit(
                "resume",
                step=state.step,
                epoch=state.epoch,
                samples_in_epoch=sampler.consumed,
                checkpoint=restored.path,
                restore_seconds=round(time.perf_counter() - self._began, 6),
            )
            log.info("resumed from %s (step %d, epoch %d)", restored.path, state.step, state.epoch)
        # From the config's base LRs after every load: never compounded across changes.
        fixed = s.trainer.global_batch_size
        lr_scale = elastic.lr_scale(s.elastic, world.world_size, reference, fixed)
        elastic.apply_lr_scale(scheduler, config_lrs, lr_scale)
        split = elastic.describe_split(sampler)
        if restored and state.saved_world_size != world.world_size:
            events.emit(
                "world_size_change",
                step=state.step,
                previous=state.saved_world_size,
                world_size=world.world_size,
                batch_policy=s.elastic.batch_policy,
                reference_world_size=reference,
                lr_scale=lr_scale,
                **split,
            )
            log.info(
                "world size %d -> %d: %s; LR scale %g",
                state.saved_world_size,
                world.world_size,
                split["text"],
                lr_scale,
            )
        events.emit(
            "start",
            step=state.step,
            run_dir=str(self.paths.dir),
            device=str(self.device),
            world_size=world.world_size,
            lr_scale=lr_scale,
            restart=world.restart_count,
            node_rank=int(os.environ.get("GROUP_RANK", 0)),
            nodes=int(os.environ.get("GROUP_WORLD_SIZE", 1)),
            agent_pid=distributed.agent_pid(),
            pids=[n["pid"] for n in self._notes] if self._notes else None,  # by rank
            precision=str(s.trainer.precision),
            compile=s.trainer.compile,
            **split,
        )
        log.info("run directory: %s (%s)", self.paths.dir, split["text"])
        self._start(state, plan.max_steps)
        self._resumed_at = time.time()
        # torch.compile compiles at the first forward and backward (lazily: compiling ahead would
        # draw from the RNG and touch buffers): the first step's time is the compilation's, which
        # counts against a notice window and the recovery time.
        self._compiling_since = time.perf_counter() if s.trainer.compile else None
        return state

    def _fetcher(self, restored: Restored):
        """Node-local disks: the checkpoint's `.metadata` on this rank's disk now (every rank
        agreeing it is), and a way for DCP to fetch the shards this rank reads, each from this
        disk where the copy here matches the manifest, else from the bucket."""
        here = self.paths.checkpoints / Path(restored.path).name  # this node's disk
        fetch = parts.ShardSource(self.job.remote, here, restored.step, restored.files)
        problem = None
        try:
            fetch.whole([sharded.METADATA])
        except (CorruptCheckpoint, OSError) as exc:
            problem = f"checkpoint {here}: {one_line(exc)}"
        if self.world.agree(problem is not None)[0]:
            raise CheckpointUnusable(problem or "another rank could not fetch the checkpoint")
        return fetch

    def _report_fetched(self, fetch: parts.ShardSource) -> None:
        """What each rank read from the bucket of the checkpoint it restored (node-local disks):
        at an unchanged world not its own file (its node kept it), only the few values of other
        ranks' files DCP saved once for every rank."""
        by_rank = self.world.gather(fetch.fetched)
        if by_rank is not None:
            total = sum(n for fetched in by_rank for n in fetched.values())
            self.events.emit("shards_fetched", step=fetch.step, files=by_rank, bytes=total)

    def _start(self, state: TrainingState, max_steps: int) -> None:
        """What the loop talks to: the checkpointer, the interruption monitor, the ledger and
        the progress line."""
        s, world = self.s, self.world
        self.state = state
        self._logged_step = state.step
        self.ledger = Ledger(self.paths, rank=world.rank) if s.data.ledger else None
        if self.ledger is not None:
            self.callback(self.ledger.close)
        self.checkpointer = Checkpointer(
            world,
            state,
            CheckpointSchedule(s.checkpoint, s.cloud.interruption_rate_per_hour, self.events),
            self.events,
            s.cloud,
            manager=self.checkpoints,
            replica=self.replica,
            shard_writer=self.shard_writer,
            uploader=self.uploader,
            final_upload_timeout_seconds=s.storage.final_upload_timeout_seconds,
            overlap=s.checkpoint.overlap,
            best=self.best,
        )
        self.callback(self.checkpointer.close)
        self.progress = Progress(max_steps, state.step) if world.is_leader else None
        if self.progress is not None:
            self.events.subscribe(self.progress.on_event)
        self.callback(self._end_progress)
        # Interruption notices: signals on every rank, the cloud's metadata on one rank per node.
        self.monitor = InterruptionMonitor(s.cloud, poll_metadata=world.local_rank == 0)
        self.callback(self.monitor.close)

    def finished(self) -> bool:
        """Training is done: the configured steps or epochs are reached. At the last step of an
        epoch it counts as done already (the loop moves to the next epoch after its last step):
        the final evaluation and log line come at that step."""
        t, state = self.s.trainer, self.state
        epochs = state.epoch + (1 if state.sampler.epoch_finished else 0)
        return bool(t.max_steps and state.step >= t.max_steps) or bool(
            t.max_epochs and epochs >= t.max_epochs
        )

    def eval_due(self) -> bool:
        """Every `eval.every_steps`, and at the end."""
        every = self.s.eval.every_steps
        return bool(every) and (self.state.step % every == 0 or self.finished())

    def check_keep_best(self, model, dataset, batch_fn, amp=None) -> None:
        """Before the first step: checkpoint.keep_best's metric must be a figure evaluation
        reports (only `batch_fn` on a validation batch tells), else one line and exit 2 now
        rather than at the first evaluation."""
        if self.best.metric is not None:
            batch_size = self.s.eval.batch_size or self.s.trainer.batch_size
            self.best.check(
                figure_names(model, dataset, _under_autocast(amp, batch_fn), batch_size)
            )

    def evaluate(self, model, dataset, batch_fn, amp=None) -> None:
        """Validation figures, reduced over all ranks, as an `eval` event (val/* metrics).
        An interruption notice stops it at once: no figures, the loop stops at this step."""
        e = self.s.eval
        figures = evaluate(
            model,
            dataset,
            _under_autocast(amp, batch_fn),
            self.world,
            batch_size=e.batch_size or self.s.trainer.batch_size,
            max_batches=e.max_batches,
            interrupted=lambda: self.monitor.stop_requested,
        )
        if figures is not None:
            self.events.emit("eval", step=self.state.step, **figures)
            measured = {
                f"val/{k}": v for k, v in figures.items() if k not in ("samples", "seconds")
            }
            self.checkpointer.consider(measured)

    def record(self, indices: list[int]) -> None:
        """The samples this rank trained on in the step just taken (data.ledger=true)."""
        if self.ledger is not None:
            self.ledger.record(self.state.step, self.state.epoch, indices)

    def batches(self, loader) -> Iterator:
        """The loader's batches, the wait for each counted: `log` reports the data wait."""
        return self._data_wait.over(loader)

    def log(self, loss_sum: torch.Tensor, samples: int, lr: float, skipped: bool = False) -> None:
        """Every `trainer.log_every` steps and at the end: the mean loss over all ranks, the
        data wait per step since the last log (the slowest rank's: every rank waits for it) and
        the bytes the data set downloaded on all ranks. A step whose update the fp16 scaler
        skipped (inf or nan gradients) is an event of its own."""
        step = self.state.step
        if self._resumed_at is not None:  # the first step since the start: after a membership
            recovery.report(self.events, self._notes, self._resumed_at, step)  # change, its time
            self._resumed_at = None
        if self._compiling_since is not None:  # the first step since the start: it compiled
            seconds = round(time.perf_counter() - self._compiling_since, 6)
            self.events.emit("compiled", step=step, seconds=seconds)
            self._compiling_since = None
        if skipped:
            self.events.emit("step_skipped", step=step, scale=self.state.precision.scale_value())
        if step % self.s.trainer.log_every and not self.finished():
            return  # .item() would sync a GPU every step
        waited, fetched = self._data_wait.take()
        loss, fetched = self.world.sums([float(loss_sum), fetched])
        wait = round(self.world.max(waited) / max(step - self._logged_step, 1), 6)
        self._logged_step = step
        if self.progress is not None:
            self.progress.update(step, loss=loss / samples, lr=lr)
        self.events.emit(
            "train",
            step=step,
            loss=loss / samples,
            lr=lr,
            data_wait_seconds=wait,
            data_fetched_bytes=int(fetched),
        )

    def _end_progress(self) -> None:
        if self.progress is not None:
            self.progress.close()
            self.progress = None

    def stop(self) -> None:
        """An interruption notice: every rank stopped at this step. The emergency checkpoint,
        kept on every node that stays (its own disk) and uploaded within the notice; then which
        nodes leave, and whether the others go on without them (spot.distributed.membership)."""
        self._end_progress()
        monitor = self.monitor
        leaving = membership.departure(self.world, monitor.notice, self.s.elastic.min_nodes)
        self.checkpointer.emergency(leaving.notices, keep_here=not leaving.this_node)
        monitor.acknowledge()  # Azure: the event may start now
        if self.world.local_rank == 0:  # this node's next workers report when it stopped
            recovery.note_stop(leaving.notices)
        leaving.report(self.events, self.state.step)
        # A node with a cloud notice: its agent stops rather than restart workers on a machine
        # that is going away; every agent does when too few nodes would stay.
        self.reclaimed = leaving.this_node or leaving.group_stops

    def finish(self) -> None:
        """The end of training: the final checkpoint commits (and uploads), then COMPLETE."""
        self._end_progress()
        self.checkpointer.finish()
        if self.world.is_leader:
            state = self.state
            atomic_write_bytes(self.paths.complete, f"{state.step}\n".encode())
            self.events.emit("complete", step=state.step, epoch=state.epoch)
            log.info("run complete at step %d: %s", state.step, self.paths.dir)


def _under_autocast(amp, batch_fn):
    """`batch_fn` under the run's autocast (trainer.precision), as training computes."""

    def in_precision(module, batch):
        with amp.autocast() if amp else contextlib.nullcontext():
            return batch_fn(module, batch)

    return in_precision
