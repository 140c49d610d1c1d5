"""Train on spot instances: `python train.py [hydra overrides]`.

The story of a run: validate the config, find the run directory from the run's identity, build
model, data and optimizer, resume from the newest verified checkpoint (or start), train with
checkpoints on the configured interval, save a final checkpoint and mark the run complete.
The machinery lives in `spot/`; edit `compute_loss` and the configs for your own task.
"""

from __future__ import annotations

import logging
import os
import sys
import time
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

from spot import identity, storage
from spot.checkpoint import CheckpointManager, CheckpointUnusable, CheckpointWriteError
from spot.config import ConfigError, training_view, validate
from spot.events import EventLog
from spot.exitcodes import (
    EXIT_BAD_CONFIG,
    EXIT_CHECKPOINT_UNUSABLE,
    EXIT_CHECKPOINT_WRITE_FAILED,
    EXIT_COMPLETE,
)
from spot.failpoints import failpoint
from spot.fsutil import atomic_write_bytes
from spot.interval import CheckpointSchedule
from spot.ledger import Ledger
from spot.metrics import make_logger
from spot.preflight import validate_command_line
from spot.progress import Progress
from spot.rng import seed_everything
from spot.sampler import ResumableBatchSampler
from spot.schedule import build_scheduler
from spot.state import TrainingState

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
        message = " ".join(str(cause).split())
        raise ConfigError(key, f"{type(cause).__name__}: {message}") from None


def train(cfg: DictConfig, overrides: list[str]) -> int:
    s = validate(cfg)
    run_id = s.run.id or identity.run_id_from_overrides(overrides)
    run_dir = identity.run_dir(s.run.root, s.run.name, run_id)
    remote = storage.connect(s.storage, s.run.name, run_id)  # checks the bucket now
    if (run_dir / COMPLETE_MARKER).exists() or (remote and storage.remote_complete(remote)):
        where = remote.url if remote else run_dir
        log.info("run %s/%s is already complete (%s): nothing to do", s.run.name, run_id, where)
        return EXIT_COMPLETE
    device = pick_device(s.trainer.device)
    if s.trainer.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)

    # Model, data, optimizer and schedule, all from the config.
    seed_everything(s.seed)
    dataset = build(cfg.data.dataset, "data.dataset")
    model = build(cfg.model, "model").to(device)
    optimizer = instantiate(cfg.optimizer)(model.parameters())
    sampler = ResumableBatchSampler(
        len(dataset), s.trainer.batch_size, seed=s.seed, shuffle=s.data.shuffle
    )
    max_steps = s.trainer.max_steps or s.trainer.max_epochs * sampler.steps_per_epoch()
    if s.trainer.max_epochs:
        max_steps = min(max_steps, s.trainer.max_epochs * sampler.steps_per_epoch())
    scheduler = build_scheduler(instantiate(cfg.scheduler), optimizer, max_steps)
    state = TrainingState(model, optimizer, scheduler, sampler)

    # The run directory, its config and its event log: the same for every restart.
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True).encode())
    events = EventLog(run_dir / "events.jsonl")
    training_config = training_view(cfg)
    digest = identity.config_digest(training_config)
    ckpt_root = (
        Path(s.storage.dir) / s.run.name / run_id if s.storage.dir else run_dir / "checkpoints"
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
            "world_size": 1,
            "config_digest": digest,
            "training_config": training_config,
        },
    )
    checkpoints.remove_stale()
    uploader = remote and storage.attach(
        checkpoints, remote, events, s.storage.alert_after_failures
    )

    # Resume from the newest checkpoint that verifies, or start fresh.
    began = time.perf_counter()
    try:
        loaded = checkpoints.load_latest(digest, training_config)
        if loaded is not None:
            state.load_state_dict(loaded.state)
    except CheckpointUnusable as exc:
        print(f"checkpoint error: {exc}", file=sys.stderr)
        events.emit("checkpoint_unusable", reason=str(exc))
        return EXIT_CHECKPOINT_UNUSABLE
    if loaded is not None:
        checkpoints.last_committed_step = loaded.step
        events.emit(
            "resume",
            step=state.step,
            epoch=state.epoch,
            samples_in_epoch=sampler.consumed,
            checkpoint=str(loaded.path),
            restore_seconds=round(time.perf_counter() - began, 6),
        )
        log.info("resumed from %s (step %d, epoch %d)", loaded.path, state.step, state.epoch)
    events.emit("start", step=state.step, run_dir=str(run_dir), device=str(device), world_size=1)
    log.info("run directory: %s", run_dir)

    metrics = make_logger(s.logger, run_dir, f"{s.run.name}-{run_id}", training_config, rank=0)
    ledger = Ledger(run_dir, rank=0, resumed_step=state.step) if s.data.ledger else None
    schedule = CheckpointSchedule(s.checkpoint, s.cloud.interruption_rate_per_hour, events)
    schedule.start(state.step)
    first_step = state.step
    progress = Progress(max_steps, state.step)

    def finished() -> bool:
        return state.step >= max_steps or (s.trainer.max_epochs or 1e18) <= state.epoch

    overlap = state.unchanged_until_update() if s.checkpoint.overlap else ()

    def save(reason: str) -> None:
        info = {"reason": reason, "epoch": state.epoch, "samples_in_epoch": sampler.consumed}
        final = reason == "final"
        if (
            checkpoints.save(state.step, state.state_dict(), info, final=final, defer=overlap)
            is not None
        ):
            schedule.saved(state.step)  # None: skipped, the previous is still being written

    model.train()
    while not finished():
        loader = DataLoader(
            dataset,
            batch_sampler=sampler,
            num_workers=s.data.num_workers,
            pin_memory=device.type == "cuda",
            generator=torch.Generator().manual_seed(s.seed),  # keeps the global RNG untouched
        )
        for batch in loader:
            loss = compute_loss(model, batch, device)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if s.trainer.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), s.trainer.grad_clip)
            checkpoints.before_update()  # a checkpoint still copying this state finishes first
            optimizer.step()
            scheduler.step()
            if ledger is not None:
                ledger.record(state.step + 1, state.epoch, sampler.current_indices())
            state.step += 1
            sampler.advance()
            checkpoints.poll()
            if state.step == first_step + 1:  # the state's layout is known: allocate its snapshot
                checkpoints.prepare(state.state_dict())
            for step, stall, persist in checkpoints.measurements():
                schedule.measured(stall, persist, step)
                metrics.log(
                    {"ckpt/stall_seconds": stall, "ckpt/persist_seconds": persist}, step=step
                )

            if state.step % s.trainer.log_every == 0 or finished():  # .item() syncs a GPU
                figures = {"loss": loss.item(), "lr": scheduler.get_last_lr()[0]}
                progress.update(state.step, **figures)
                metrics.log({f"train/{k}": v for k, v in figures.items()}, step=state.step)
            failpoint("train.step", state.step)
            if finished():
                break
            if schedule.due(state.step):
                save("interval")
        if sampler.epoch_finished:
            sampler.next_epoch()
    progress.close()

    # The final checkpoint commits before the run is marked complete.
    if checkpoints.last_committed_step != state.step:
        save("final")
    checkpoints.close()
    if uploader:
        if not uploader.drain(s.storage.final_upload_timeout_seconds):
            raise CheckpointWriteError(
                f"the final checkpoint (step {state.step}) is committed locally but not uploaded "
                f"to {remote.url} in {s.storage.final_upload_timeout_seconds:g} s"
            )
        uploader.close()
        storage.mark_remote_complete(remote, state.step)
    atomic_write_bytes(run_dir / COMPLETE_MARKER, f"{state.step}\n".encode())
    events.emit("complete", step=state.step, epoch=state.epoch)
    log.info("run complete at step %d: %s", state.step, run_dir)
    if ledger is not None:
        ledger.close()
    metrics.close()
    events.close()
    return EXIT_COMPLETE


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    try:
        code = train(cfg, list(hydra_cfg.overrides.task))
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        code = EXIT_BAD_CONFIG
    except CheckpointWriteError as exc:  # the previous checkpoint is intact
        print(f"checkpoint error: {exc}", file=sys.stderr)
        code = EXIT_CHECKPOINT_WRITE_FAILED
    except storage.RemoteError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        code = EXIT_BAD_CONFIG
    if hydra_cfg.mode == RunMode.RUN or code not in (EXIT_COMPLETE,):
        sys.exit(code)


if __name__ == "__main__":
    validate_command_line(sys.argv[1:], CONFIG_DIR)
    main()
