"""Metrics sinks: Weights & Biases (offline by default) or nothing. One W&B run per training run,
resumed after every restart, with the id derived from the run's identity."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from spot.config import LoggerConfig

log = logging.getLogger(__name__)


class NullLogger:
    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def close(self) -> None:
        pass


class WandbLogger:
    def __init__(self, cfg: LoggerConfig, run_dir: Path, run_key: str, config: dict[str, Any]):
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        self._wandb = wandb
        self.run = wandb.init(
            project=cfg.project,
            id=run_key,
            name=run_key,
            resume="allow",
            mode=cfg.mode,
            dir=str(run_dir),
            config=config,
        )

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


def make_logger(cfg: LoggerConfig, run_dir: Path, run_key: str, config: dict[str, Any], rank: int):
    if rank != 0 or cfg.backend == "none" or cfg.mode == "disabled":
        return NullLogger()
    return WandbLogger(cfg, run_dir, run_key, config)
