"""Train on spot instances: `python train.py [hydra overrides]`.

The story of a run: validate the config, find the run directory from the run's identity, build
model, data and optimizer, resume from the newest verified checkpoint (or start), train with
checkpoints on the configured interval, save a final checkpoint and mark the run complete.
The machinery lives in `spot/`; edit `compute_loss` and the configs for your own task.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import traceback
from functools import partial
from pathlib import Path

import hydra
import torch
import torch.nn.functional as F
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from spot.checkpoint import storage
from spot.checkpoint.checkpointer import Checkpointer
from spot.checkpoint.interval import CheckpointSchedule
from spot.checkpoint.manager import CheckpointManager, CheckpointUnusable, CheckpointWriteError
from spot.checkpoint.rng import seed_everything, seed_rank
from spot.checkpoint.state import TrainingState
from spot.distributed import elastic, launch, slurm
from spot.distributed import world as distributed
from spot.distributed.ledger import Ledger, truncate_ledgers
from spot.distributed.sampler import ResumableBatchSampler
from spot.failpoints import failpoint
from spot.fsutil import atomic_write_bytes
from spot.interruption import (
    InterruptionMonitor,
    ignore_in_data_workers,
)
from spot.run import identity
from spot.run.config import ConfigError, one_line, training_view, validate
from spot.run.events import EventLog
from spot.run.exitcodes import (
    EXIT_BAD_CONFIG,
    EXIT_CHECKPOINT_UNUSABLE,
    EXIT_CHECKPOINT_WRITE_FAILED,
    EXIT_COMPLETE,
    EXIT_PREEMPTED,
)
from spot.run.metrics import make_tracker, subscribe_metrics
from spot.run.preflight import validate_command_line
from spot.run.progress import Progress
from spot.run.schedule import TrainingLength, build_scheduler, set_position

log = logging.getLogger("train")
CONFIG_DIR = Path(__file__).resolve().parent / "conf"
COMPLETE_MARKER = "COMPLETE"


def compute_loss(model: torch.nn.Module, batch, device: torch.device) -> torch.Tensor:
    inputs, targets = (t.to(device, non_blocking=True) for t in batch)
    return F.cross_entropy(model(inputs), targets)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("trainer.device", f"{name!r} requested but CUDA is not available here")
    return torch.device(name)


def build(node: DictConfig, key: str):
    """Instantiate a `_target_` node; a wrong argument is a config error, not a traceback."""
    try:
        return instantiate(node)
    except InstantiationException as exc:
        cause = exc.__cause__ or exc
        message = one_line(cause)
        raise ConfigError(key, f"{type(cause).__name__}: {message}") from None


def train(cfg: DictConfig, overrides: list[str]) -> int:
    s = validate(cfg)
    run_id = s.run.id or identity.run_id_from_overrides(overrides)
    run_dir = identity.run_dir(s.run.root, s.run.name, run_id)
    remote = storage.connect(s.storage, s.run.name, run_id)  # checks the bucket now
    device = pick_device(s.trainer.device)
    world = distributed.join(
        s.elastic.collective_timeout_seconds,
        s.elastic.restore_timeout_seconds,
        cuda=device.type == "cuda",
    )
    device = world.device(device)
    if not world.is_leader:  # rank 0 alone logs; the others say only what goes wrong
        logging.getLogger().setLevel(logging.WARNING)
    complete = (run_dir / COMPLETE_MARKER).exists() or (remote and storage.remote_complete(remote))
    if world.agree(complete)[0]:
        where = remote.url if remote else run_dir
        log.info("run %s/%s is already complete (%s): nothing to do", s.run.name, run_id, where)
        return EXIT_COMPLETE

    # More than one process: torch's elastic agent runs this script in every worker.
    if launch.needs_agent(s.elastic):
        resolved = OmegaConf.merge(cfg, {"run": {"id": run_id}})
        script = Path(__file__).resolve()
        return launch.run_agent(
            s.elastic,
            s.cloud,
            f"{s.run.name}-{run_id}",
            script,
            OmegaConf.to_yaml(resolved, resolve=True),
            complete=lambda: (
                (run_dir / COMPLETE_MARKER).exists()
                or bool(remote and storage.remote_complete(remote))
            ),
        )
    if s.trainer.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    training_config = training_view(cfg)
    digest = identity.config_digest(training_config)
    world.check_same_job(f"{s.run.name}/{run_id}/{digest}")

    # Model, data and optimizer, all from the config; the same weights on every rank.
    seed_everything(s.seed)
    dataset = build(cfg.data.dataset, "data.dataset")
    model = build(cfg.model, "model").to(device)
    seed_rank(s.seed, world.rank)  # after the weights: each rank its own dropout masks
    model = world.wrap(model, device)
    optimizer = instantiate(cfg.optimizer)(model.parameters())

    # Everything opened from here on is closed on every way out (an exception too), in reverse.
    reclaimed = False
    with contextlib.ExitStack() as teardown:
        # The run directory, its config and its event log: the same for every rank and restart.
        run_dir.mkdir(parents=True, exist_ok=True)
        events = EventLog(run_dir / "events.jsonl" if world.is_leader else None)
        teardown.callback(events.close)
        checkpoints = uploader = None  # rank 0's alone: the other ranks hold replicas
        if world.is_leader:
            atomic_write_bytes(
                run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True).encode()
            )
            ckpt_root = (
                Path(s.storage.dir) / s.run.name / run_id
                if s.storage.dir
                else run_dir / "checkpoints"
            )
            checkpoints = CheckpointManager(
                ckpt_root,
                keep_last=s.checkpoint.keep_last,
                async_save=s.checkpoint.async_save,
                on_corrupt=s.checkpoint.on_corrupt,
                on_error=s.checkpoint.on_error,
                when_busy=s.checkpoint.when_busy,
                events=events,
                meta={
                    "run": {"name": s.run.name, "id": run_id},
                    "world_size": world.world_size,
                    "config_digest": digest,
                    "training_config": training_config,
                },
            )
            checkpoints.remove_stale()
            checkpoints.remote = remote  # the restore looks in the bucket too

        # Find the newest checkpoint that verifies, local or remote: rank 0 loads it, every other
        # rank receives it from rank 0.
        began = time.perf_counter()
        restored = None
        if world.is_leader:
            restored = restore_latest(checkpoints, digest, training_config)
            # Uploads start after the restore: what it moved aside or could not download is
            # neither queued nor counted as uploaded.
            uploader = remote and storage.attach(
                checkpoints, remote, events, s.storage.alert_after_failures
            )
            if s.data.ledger and not (restored and restored.get("error")):
                truncate_ledgers(run_dir, restored["step"] if restored else 0)
        restored = world.share(restored)
        if restored and restored.get("error"):
            events.emit("checkpoint_unusable", reason=restored["error"])
            raise CheckpointUnusable(restored["error"])
        saved = restored["state"]["trainer"] if restored else {}

        # Metrics follow the events; the tracker's run is the one the checkpoint names.
        tracker_run_id = saved.get("tracker_run_id") or f"{s.run.name}-{run_id}"
        tracker = make_tracker(
            s.logger,
            run_dir,
            tracker_run_id,
            {**OmegaConf.to_container(cfg, resolve=True), "world_size": world.world_size},
            rank=world.rank,
        )
        metrics = subscribe_metrics(events, tracker, s.cloud)
        teardown.callback(metrics.close)

        # The batch and LR for this world size. The reference world size (for which the config's LR
        # and batch are meant) is the config's, else the one the run started with.
        reference = (
            s.elastic.reference_world_size or saved.get("reference_world_size") or world.world_size
        )
        sampler = ResumableBatchSampler(
            len(dataset),
            s.trainer.batch_size,
            seed=s.seed,
            shuffle=s.data.shuffle,
            rank=world.rank,
            world_size=world.world_size,
            global_batch=elastic.global_batch(
                s.elastic.batch_policy, s.trainer.batch_size, world.world_size, reference
            ),
        )
        # The run's length in steps at this world size; an epoch's steps depend on the world size
        # (scale_lr), so a run bounded by epochs stops on the epoch count, and the LR schedule
        # follows the share of training done (TrainingLength), not this estimate.
        max_steps = s.trainer.max_steps or s.trainer.max_epochs * sampler.steps_per_epoch()
        if s.trainer.max_epochs:
            max_steps = min(max_steps, s.trainer.max_epochs * sampler.steps_per_epoch())
        length = TrainingLength(
            s.trainer.max_steps,
            s.trainer.max_epochs,
            len(dataset),
            schedule_steps=saved.get("schedule_steps") or max_steps,
        )
        scheduler = build_scheduler(instantiate(cfg.scheduler), optimizer, length.schedule_steps)
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
            schedule_steps=length.schedule_steps,
        )
        if restored:
            try:
                state.load_state_dict(restored["state"])  # refuses one that does not fit
            except CheckpointUnusable as exc:
                events.emit("checkpoint_unusable", reason=str(exc))
                raise
            if checkpoints is not None:
                checkpoints.last_committed_step = state.step
            events.emit(
                "resume",
                step=state.step,
                epoch=state.epoch,
                samples_in_epoch=sampler.consumed,
                checkpoint=restored["path"],
                restore_seconds=round(time.perf_counter() - began, 6),
            )
            log.info(
                "resumed from %s (step %d, epoch %d)", restored["path"], state.step, state.epoch
            )
        # From the config's base LRs after every load: never compounded across changes.
        lr_scale = elastic.lr_scale(s.elastic, world.world_size, reference)
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
            run_dir=str(run_dir),
            device=str(device),
            world_size=world.world_size,
            lr_scale=lr_scale,
            restart=world.restart_count,
            node_rank=int(os.environ.get("GROUP_RANK", 0)),
            nodes=int(os.environ.get("GROUP_WORLD_SIZE", 1)),
            agent_pid=os.getppid() if distributed.launched_by_torch_elastic() else None,
            **split,
        )
        log.info("run directory: %s (%s)", run_dir, split["text"])

        ledger = Ledger(run_dir, rank=world.rank) if s.data.ledger else None
        if ledger is not None:
            teardown.callback(ledger.close)
        checkpointer = Checkpointer(
            world,
            state,
            CheckpointSchedule(s.checkpoint, s.cloud.interruption_rate_per_hour, events),
            events,
            s.cloud,
            manager=checkpoints,
            uploader=uploader,
            final_upload_timeout_seconds=s.storage.final_upload_timeout_seconds,
            overlap=s.checkpoint.overlap,
        )
        teardown.callback(checkpointer.close)
        progress = Progress(max_steps, state.step) if world.is_leader else None
        if progress is not None:
            events.subscribe(progress.on_event)
        loss_fn = partial(compute_loss, device=device)
        # Interruption notices: signals on every rank, the cloud's metadata on one rank per node.
        monitor = InterruptionMonitor(s.cloud, poll_metadata=world.local_rank == 0)
        teardown.callback(monitor.close)

        def finished() -> bool:
            return state.step >= (s.trainer.max_steps or 1e18) or (
                state.epoch >= (s.trainer.max_epochs or 1e18)
            )

        stop = False
        model.train()
        while not finished() and not stop:
            batches = iter(
                DataLoader(
                    dataset,
                    batch_sampler=sampler,
                    num_workers=s.data.num_workers,
                    pin_memory=device.type == "cuda",
                    generator=torch.Generator().manual_seed(
                        s.seed
                    ),  # keeps the global RNG untouched
                    worker_init_fn=ignore_in_data_workers,  # a SIGTERM to the group: save first
                )
            )
            while not sampler.epoch_finished:
                step_samples, share = sampler.step_size(), sampler.current_indices()
                optimizer.zero_grad(set_to_none=True)
                loss_sum = elastic.accumulate_gradients(
                    model, batches, sampler.current_plan(), len(share), step_samples, world, loss_fn
                )
                if s.trainer.grad_clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), s.trainer.grad_clip)
                checkpointer.before_update()  # a checkpoint still copying this state finishes first
                optimizer.step()
                if ledger is not None:
                    ledger.record(state.step + 1, state.epoch, share)
                state.step += 1
                sampler.advance()
                set_position(scheduler, length.position(state.step, state.epoch, sampler.consumed))
                wanted = checkpointer.after_update()  # rank 0's vote: a checkpoint is due
                if state.step % s.trainer.log_every == 0 or finished():  # .item() syncs a GPU
                    loss = world.sum(float(loss_sum)) / step_samples  # the mean over all ranks
                    lr = scheduler.get_last_lr()[0]
                    if progress is not None:
                        progress.update(state.step, loss=loss, lr=lr)
                    events.emit("train", step=state.step, loss=loss, lr=lr)
                failpoint("train.step", state.step, rank=world.rank)
                if finished():
                    break
                # Every rank agrees on how this step ends: a checkpoint, a stop, or neither.
                due, rebalance, stop = world.agree(
                    wanted, monitor.take_rebalance() is not None, monitor.stop_requested
                )
                if stop:
                    break
                if due or rebalance:
                    checkpointer.save("interval" if due else "rebalance")
            if sampler.epoch_finished:
                sampler.next_epoch()
        if progress is not None:
            progress.close()

        if stop:  # an interruption notice: every rank stopped at this step
            checkpointer.emergency(
                world.gather(monitor.notice.as_dict() if monitor.notice else None)
            )
            monitor.acknowledge()  # Azure: the event may start now
            reclaimed = monitor.notice is not None and monitor.notice.source != "signal"
        else:
            checkpointer.finish()  # the final checkpoint commits (and uploads) before "complete"
            if world.is_leader:
                atomic_write_bytes(run_dir / COMPLETE_MARKER, f"{state.step}\n".encode())
                events.emit("complete", step=state.step, epoch=state.epoch)
                log.info("run complete at step %d: %s", state.step, run_dir)

    if reclaimed:
        # The cloud says this node is going away: its agent stops rather than restarting the
        # workers. (A signal came from the agent itself, regrouping or stopping, or reached it.)
        distributed.stop_agent()
    return EXIT_PREEMPTED if stop else EXIT_COMPLETE


def restore_latest(checkpoints: CheckpointManager, digest: str, training_config: dict):
    """The newest verified checkpoint as {step, path, state}, None, or {error} if unusable."""
    try:
        loaded = checkpoints.load_latest(digest, training_config)
    except CheckpointUnusable as exc:
        return {"error": str(exc)}
    if loaded is None:
        return None
    return {"step": loaded.step, "path": str(loaded.path), "state": loaded.state}


def run(cfg: DictConfig, overrides: list[str]) -> int:
    """train(), with each known failure turned into its documented exit code and one line."""
    try:
        return train(cfg, overrides)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EXIT_BAD_CONFIG
    except CheckpointWriteError as exc:  # the previous checkpoint is intact
        print(f"checkpoint error: {exc}", file=sys.stderr)
        return EXIT_CHECKPOINT_WRITE_FAILED
    except CheckpointUnusable as exc:  # nothing was trained or written
        print(f"checkpoint error: {exc}", file=sys.stderr)
        return EXIT_CHECKPOINT_UNUSABLE
    except storage.RemoteError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    except Exception:
        if not torch.distributed.is_initialized():
            raise
        # A crashed worker (a peer lost, a collective timed out) must still exit: see
        # distributed.exit_process. Its agent then restarts the group.
        traceback.print_exc()
        return 1


SWEEP_FAILURES: list[int] = []  # exit codes of a sweep's failed jobs


@hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    sweep = hydra_cfg.mode == RunMode.MULTIRUN
    try:
        code = run(cfg, list(hydra_cfg.overrides.task))
    except Exception:
        if not sweep:
            raise
        traceback.print_exc()
        code = 1
    if not sweep or code == EXIT_PREEMPTED:
        # One run; or a sweep on a machine being reclaimed: stop now, the same command resumes
        # the sweep (finished jobs are skipped, this one continues from its checkpoint).
        if code == EXIT_PREEMPTED:
            slurm.requeue_submitit_job()  # a submitit SLURM job: requeued, resumes from here
        distributed.exit_process(code)
    if code != EXIT_COMPLETE:
        log.error(
            "sweep job %s failed with exit code %d; the other jobs go on", hydra_cfg.job.num, code
        )
        SWEEP_FAILURES.append(code)


def worker_main() -> int:
    """A worker of our own elastic agent: the agent's resolved config, no Hydra composition."""
    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(
        level=logging.INFO,
        format=f"[%(asctime)s][rank {rank}][%(name)s][%(levelname)s] - %(message)s",
        stream=sys.stdout,
    )
    return run(OmegaConf.load(os.environ[launch.RESOLVED_CONFIG_ENV]), overrides=[])


if __name__ == "__main__":
    if launch.RESOLVED_CONFIG_ENV in os.environ and distributed.launched_by_torch_elastic():
        distributed.exit_process(worker_main())
    validate_command_line(sys.argv[1:], CONFIG_DIR)
    # The task by its module name, not __main__'s: a launcher that pickles it (submitit on
    # SLURM) then pickles a reference, which the job imports, rather than this module's globals.
    import train as task

    task.main()
    sys.exit(task.SWEEP_FAILURES[0] if task.SWEEP_FAILURES else EXIT_COMPLETE)  # all finished?
