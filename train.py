"""Train on spot instances: `python train.py [hydra overrides]`.

The story of a run: validate the config and find the run's directory from its identity, build
model, data and optimizer, resume from the newest verified checkpoint (or start), train with
checkpoints on the configured interval, save a final checkpoint and mark the run complete; or,
on an interruption notice, take the emergency checkpoint and exit 75 to be resumed.
The machinery lives in `spot/` (spot/session.py sets up each step of this story); edit
`compute_loss`, `make_loader` and the configs for your own task.
"""

from __future__ import annotations

import logging
import os
import sys
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
from spot.checkpoint.manager import CheckpointUnusable, CheckpointWriteError
from spot.checkpoint.rng import seed_everything, seed_rank
from spot.distributed import elastic, launch, slurm
from spot.distributed import world as distributed
from spot.failpoints import failpoint
from spot.interruption import ignore_in_data_workers
from spot.job import Job, join
from spot.precision import MixedPrecision
from spot.run.config import ConfigError, Settings, one_line
from spot.run.data_identity import check_same_data
from spot.run.exitcodes import (
    EXIT_BAD_CONFIG,
    EXIT_CHECKPOINT_UNUSABLE,
    EXIT_CHECKPOINT_WRITE_FAILED,
    EXIT_COMPLETE,
    EXIT_PREEMPTED,
)
from spot.run.metrics import tracker_imports
from spot.run.preflight import validate_command_line
from spot.run.schedule import build_scheduler, set_position
from spot.session import Session
from spot.shards.cache import DataUnavailable
from spot.shards.dataset import prefetching
from spot.shards.format import ShardError

log = logging.getLogger("train")
CONFIG_DIR = Path(__file__).resolve().parent / "conf"


def compute_loss(model: torch.nn.Module, batch, device: torch.device) -> torch.Tensor:
    """The mean loss of a batch: classes per sample, or per position of a sequence (GPT)."""
    inputs, targets = (t.to(device, non_blocking=True) for t in batch)
    return F.cross_entropy(model(inputs).flatten(0, -2), targets.flatten())


def eval_batch(model: torch.nn.Module, batch, device: torch.device) -> dict[str, torch.Tensor]:
    """What validation reports, summed over a batch, and the `count` to divide the sums by
    (over the split, all ranks): per target, so a sequence model's loss is per token (per byte
    for GPT on bytes). Edit it with compute_loss."""
    inputs, targets = (t.to(device, non_blocking=True) for t in batch)
    logits, targets = model(inputs).flatten(0, -2), targets.flatten()
    loss = F.cross_entropy(logits, targets, reduction="sum")
    correct = (logits.argmax(dim=-1) == targets).sum()
    return {"loss": loss, "accuracy": correct, "count": torch.tensor(targets.numel())}


def make_loader(dataset, sampler, cfg, device: torch.device) -> DataLoader:
    """One epoch's batches in the sampler's order (it resumes mid-epoch at the saved position)."""
    return DataLoader(
        dataset,
        # data=shards: the shards of the next steps fetched ahead, and kept while the workers'
        # queued batches (2 each: DataLoader's prefetch_factor) still read them
        batch_sampler=prefetching(
            sampler, dataset, cfg.data.prefetch_steps, in_flight=2 * cfg.data.num_workers
        ),
        num_workers=cfg.data.num_workers,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(cfg.seed),  # keeps the global RNG untouched
        worker_init_fn=ignore_in_data_workers,  # a SIGTERM to the process group: save first
    )


def build(node: DictConfig, key: str):
    """Instantiate a `_target_` node; a wrong argument is a config error, not a traceback."""
    try:
        return instantiate(node)
    except InstantiationException as exc:
        cause = exc.__cause__ or exc
        raise ConfigError(key, f"{type(cause).__name__}: {one_line(cause)}") from None


def train(job: Job) -> int:
    """One worker of the run: set up, restore, train, finish. Returns the exit code."""
    cfg, s = job.cfg, job.settings
    world = join(job)
    if world.agree(job.is_complete())[0]:
        return job.nothing_to_do()
    if s.trainer.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)

    # Model, data and optimizer, all from the config; the same weights on every rank.
    device = world.device(job.device)
    seed_everything(s.seed)
    dataset = build(cfg.data.dataset, "data.dataset")
    val_dataset = build(cfg.data.val, "data.val") if s.eval.every_steps else None
    # The same data on every rank, by what the data sets declare (spot/run/data_identity.py).
    data_ids = check_same_data(world, {"data.dataset": dataset, "data.val": val_dataset})
    model = build(cfg.model, "model").to(device)
    seed_rank(s.seed, world.rank)  # after the weights: each rank its own dropout masks
    model = world.wrap(model, device, s.trainer)  # DDP, or FSDP2's shards
    if s.trainer.compile:  # checkpoints hold the same keys compiled or not (state.unwrap)
        model = torch.compile(model)
    optimizer = instantiate(cfg.optimizer)(model.parameters())
    amp = MixedPrecision(s.trainer.precision, device)  # autocast; fp16's scaler is checkpointed

    # The run directory, event log, checkpoints and metrics: closed on every way out.
    with Session(job, world, device) as run:
        restored = run.restore()  # the newest verified checkpoint, on every rank; or None
        plan = run.plan(dataset, restored)  # data order, batch and length at this world size
        sampler, length = plan.sampler, plan.length
        scheduler = build_scheduler(instantiate(cfg.scheduler), optimizer, length.schedule_steps)
        state = run.resume(model, optimizer, scheduler, plan, amp, data_ids["data.dataset"])
        checkpointer, monitor = run.checkpointer, run.monitor
        loss_fn, eval_fn = partial(compute_loss, device=device), partial(eval_batch, device=device)
        if val_dataset is not None:  # keep_best's metric is one eval_batch reports, or exit 2
            run.check_keep_best(model, val_dataset, eval_fn, amp)

        stop = False
        model.train()
        while not run.finished() and not stop:
            batches = run.batches(make_loader(dataset, sampler, cfg, device))  # data wait timed
            while not sampler.epoch_finished:
                step_samples, share = sampler.step_size(), sampler.current_indices()
                optimizer.zero_grad(set_to_none=True)
                loss_sum = elastic.accumulate_gradients(
                    model,
                    batches,
                    sampler.current_plan(),
                    len(share),
                    step_samples,
                    world,
                    loss_fn,
                    amp,
                )
                amp.unscale(optimizer)  # fp16: true gradients, for clipping
                if s.trainer.grad_clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), s.trainer.grad_clip)
                checkpointer.before_update()  # a checkpoint still copying this state finishes first
                skipped = amp.step(optimizer)  # fp16: inf/nan gradients skip the update
                state.step += 1
                run.record(share)  # the ledger: which samples this rank trained on
                sampler.advance()
                set_position(scheduler, length.position(state.step, state.epoch, sampler.consumed))
                wanted = checkpointer.after_update()  # rank 0's vote: a checkpoint is due
                run.log(loss_sum, step_samples, scheduler.get_last_lr()[0], skipped)
                failpoint("train.step", state.step, rank=world.rank)
                if run.eval_due():  # leaves the training RNG, sampler and model untouched
                    run.evaluate(model, val_dataset, eval_fn, amp)
                if run.finished():
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

        if stop:
            run.stop()  # the emergency checkpoint, uploaded within the notice
        else:
            run.finish()  # the final checkpoint commits (and uploads) before "complete"

    if run.reclaimed:
        # The cloud says this node is going away: its agent stops rather than restarting the
        # workers. (A signal came from the agent itself, regrouping or stopping, or reached it.)
        distributed.stop_agent()
    return EXIT_PREEMPTED if stop else EXIT_COMPLETE


def run(cfg: DictConfig, overrides: list[str]) -> int:
    """The process decides what it is (one worker, or an agent for several), then each known
    failure becomes its documented exit code and one line."""
    try:
        job = Job.from_config(cfg, overrides)
        if launch.needs_agent(job.settings.elastic):
            return job.run_agent(worker)  # runs `worker` in each worker process
        return train(job)
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
    except DataUnavailable as exc:  # the data's bucket, after its client's retries: not corrupt
        print(f"data unavailable, retry later: {exc}", file=sys.stderr)
        return EXIT_PREEMPTED
    except ShardError as exc:  # a shard that does not match its index, downloaded twice
        print(f"data error: {exc}", file=sys.stderr)
        return EXIT_CHECKPOINT_UNUSABLE
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


def worker(resolved: str, environment: dict[str, str | None]) -> int:
    """A worker of our own elastic agent (forked by torch from a process that imported all of
    the above once): the agent's resolved config, no Hydra composition, and the agent's
    environment as it is now (its `hydra.job.env_set` among it), not the forkserver's."""
    launch.apply_environment(environment)
    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(
        level=logging.INFO,
        format=f"[%(asctime)s][rank {rank}][%(name)s][%(levelname)s] - %(message)s",
        stream=sys.stdout,
        force=True,
    )
    code = run(OmegaConf.create(resolved), overrides=[])
    if code != EXIT_COMPLETE:
        distributed.exit_process(code)  # the agent reads it as the worker's exit code
    return code


def start_workers(jobs: list[Settings]) -> None:
    """One job that is an elastic agent: its workers' forkserver starts importing now, while
    this process checks the rest of the config and joins the rendezvous. (Its values are
    typed and checked by now: spot.run.preflight.)"""
    if len(jobs) == 1:
        launch.start_forkserver(jobs[0].elastic, worker, tracker_imports(jobs[0].logger))


if __name__ == "__main__":
    # The task by its module name, not __main__'s: a launcher that pickles it (submitit on
    # SLURM) then pickles a reference, which the job imports, rather than this module's globals.
    import train as task

    validate_command_line(sys.argv[1:], CONFIG_DIR, composed=task.start_workers)
    task.main()
    sys.exit(task.SWEEP_FAILURES[0] if task.SWEEP_FAILURES else EXIT_COMPLETE)  # all finished?
