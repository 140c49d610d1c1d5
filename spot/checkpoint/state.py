"""Everything a resumed run needs, gathered into checkpoint components and put back exactly."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from spot.checkpoint import rng, sharded
from spot.checkpoint.manager import CheckpointUnusable, check_state_dict_compatible
from spot.distributed.sampler import ResumableBatchSampler
from spot.run.data_identity import resume_mismatch


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module whose state dict is saved: without DDP's `module.` or torch.compile's
    `_orig_mod.` prefix, so a checkpoint moves between single-process and distributed runs, and
    between compiled and eager ones."""
    while isinstance(model, torch.nn.parallel.DistributedDataParallel) or hasattr(
        model, "_orig_mod"
    ):
        model = model.module if hasattr(model, "module") else model._orig_mod
    return model


@dataclass
class TrainingState:
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    sampler: ResumableBatchSampler
    step: int = 0
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    reference_world_size: int = 1
    saved_world_size: int | None = None  # of the checkpoint loaded, if any
    tracker_run_id: str | None = None  # the metrics tracker's run (W&B), kept across restarts
    schedule_steps: int | None = None  # the length the LR schedule was built for
    # A spot.precision.MixedPrecision: fp16's gradient scaler is saved with it.
    precision: Any = None
    best: Any = None  # checkpoint.keep_best's owner (spot.checkpoint.best): its record is saved
    init: dict | None = None  # init.checkpoint: {source, step} the run's weights started from
    data_identity: str | None = None  # the training set's (spot/run/data_identity.py)
    sharded: bool = False  # trainer.strategy=fsdp: model and optimizer by name, as DCP shards

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def state_dict(self, rng_states: list[dict] | None = None) -> dict[str, Any]:
        """Components of a checkpoint, taken at a step boundary (after the optimizer step).
        `rng_states`: every rank's RNG, in rank order (dropout differs per rank)."""
        if self.sharded:  # DTensors by parameter name (spot/checkpoint/sharded.py)
            parts = sharded.state_dicts(unwrap(self.model), self.optimizer)
        else:
            parts = {
                "model": unwrap(self.model).state_dict(),
                "optimizer": self.optimizer.state_dict(),
            }
        return {
            **parts,
            "scheduler": self.scheduler.state_dict(),
            "trainer": {
                "step": self.step,
                "sampler": self.sampler.state_dict(),
                "world_size": self.world_size,
                "reference_world_size": self.reference_world_size,
                "rng": rng_states or [rng.capture()],
                "tracker_run_id": self.tracker_run_id,
                "schedule_steps": self.schedule_steps,
                "grad_scaler": self.precision.state_dict() if self.precision else {},
                "best": self.best.record if self.best is not None else None,
                "init": self.init,
                "data_identity": self.data_identity,
            },
        }

    def unchanged_until_update(self) -> tuple[str, ...]:
        """Components that nothing changes before the next optimizer step: safe to copy while the
        next forward and backward run. Not a model with buffers (batch norm updates them in
        forward)."""
        has_buffers = any(True for _ in unwrap(self.model).buffers())
        return ("optimizer",) if has_buffers else ("optimizer", "model")

    def load_weights(self, state: dict[str, Any], source: dict) -> None:
        """A new run's start from another run's checkpoint (init.checkpoint): its model, and its
        optimizer state if `state` has one (moments, step counts); nothing of its position,
        schedule or RNG, and none of its optimizer settings: every hyper-parameter (LR, weight
        decay, betas, ...) stays the configured one."""
        check_state_dict_compatible(state["model"], unwrap(self.model).state_dict())
        if "optimizer" in state:
            self._check_optimizer(state["optimizer"])
        # load_state_dict replaces the param groups, settings included: the config's go back
        configured = [
            {k: v for k, v in group.items() if k != "params"}
            for group in self.optimizer.param_groups
        ]
        if self.sharded:  # whole tensors into shards, each rank keeping its part
            sharded.load_whole(unwrap(self.model), self.optimizer, state)
        else:
            unwrap(self.model).load_state_dict(state["model"])
            if "optimizer" in state:
                self.optimizer.load_state_dict(state["optimizer"])
        for group, settings in zip(self.optimizer.param_groups, configured, strict=True):
            group.update(settings)
        self.init = source

    def _check_optimizer(self, saved: dict) -> None:
        saved_groups, live_groups = saved["param_groups"], self.optimizer.param_groups
        if [len(g["params"]) for g in saved_groups] != [len(g["params"]) for g in live_groups]:
            raise CheckpointUnusable(
                "checkpoint optimizer has other parameter groups than this one"
            )

    def load_state_dict(
        self, state: dict[str, Any], shards: Path | None = None, group=None, fetch=None
    ) -> None:
        """Check everything first, then load: a checkpoint that does not fit is refused whole.
        `shards`: a sharded checkpoint's directory, whose model and optimizer every rank reads
        (over `group`, together) rather than finding them in `state`; `fetch`: where a rank
        reads what is not on its disk (node-local disks: spot.checkpoint.parts.ShardSource)."""
        if shards is not None:
            live = sharded.state_dicts(unwrap(self.model), self.optimizer)
            problem = sharded.mismatch(shards, live)
            if problem:
                raise CheckpointUnusable(problem)
        else:
            check_state_dict_compatible(state["model"], unwrap(self.model).state_dict())
            self._check_optimizer(state["optimizer"])
        mismatch = resume_mismatch(state["trainer"].get("data_identity"), self.data_identity)
        if mismatch:
            raise CheckpointUnusable(mismatch)
        try:
            self.sampler.load_state_dict(state["trainer"]["sampler"])
        except ValueError as exc:
            raise CheckpointUnusable(str(exc)) from None
        if shards is not None:
            try:
                sharded.load(shards, unwrap(self.model), self.optimizer, group, fetch)
            except sharded.ShardReadError as exc:  # verified, yet not loadable: say so
                raise CheckpointUnusable(f"checkpoint {shards}: {exc}") from None
        else:
            unwrap(self.model).load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.precision is not None:
            self.precision.load_state_dict(state["trainer"].get("grad_scaler") or {})
        self.step = int(state["trainer"]["step"])
        self.init = state["trainer"].get("init")
        self.saved_world_size = int(state["trainer"].get("world_size", 1))
        saved_rngs = state["trainer"]["rng"]
        saved_rngs = [saved_rngs] if isinstance(saved_rngs, dict) else saved_rngs
        if self.rank < len(saved_rngs):
            rng.restore(saved_rngs[self.rank])
        else:  # a rank the checkpoint's world did not have: a fresh stream of its own
            rng.seed_rank(self.seed, self.rank, self.step)
