"""Run identity: the same command finds the same run directory on every restart and every machine.

`RunPaths` is the one description of what a run directory holds; nothing else spells its layout.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from spot.run.config import NON_TRAINING_KEYS, NON_TRAINING_LEAVES


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def affects_training(override: str) -> bool:
    key = _override_key(override)
    return key.split(".")[0].split("/")[0] not in NON_TRAINING_KEYS and not any(
        key == leaf or key.startswith(f"{leaf}.") for leaf in NON_TRAINING_LEAVES
    )


def run_id_from_overrides(overrides: Iterable[str]) -> str:
    """A digest of the overrides that change the training, independent of their order."""
    relevant = sorted(ov for ov in overrides if affects_training(ov))
    return hashlib.sha256("\n".join(relevant).encode()).hexdigest()[:12]


def config_digest(training_config: dict) -> str:
    canonical = json.dumps(training_config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


COMPLETE = "COMPLETE"  # written last, holding the final step: the run needs no more training


@dataclass(frozen=True)
class RunPaths:
    """`<run.root>/<run.name>/<run id>/` and what it holds. Checkpoints live in its `checkpoints/`
    unless `storage.dir` names another disk (then `<storage.dir>/<name>/<id>/`)."""

    dir: Path
    checkpoints: Path

    @classmethod
    def of(cls, root: str | Path, name: str, run_id: str, storage_dir: str | None = None):
        run_dir = Path(root) / name / run_id
        ckpts = Path(storage_dir) / name / run_id if storage_dir else run_dir / "checkpoints"
        return cls(run_dir, ckpts)

    @classmethod
    def at(cls, run_dir: str | Path) -> RunPaths:
        """An existing run directory, with its checkpoints in the default place."""
        return cls(Path(run_dir), Path(run_dir) / "checkpoints")

    @staticmethod
    def under(root: str | Path) -> Iterator[RunPaths]:
        """Every run directory under a `run.root` that has an event log."""
        for events in sorted(Path(root).glob("*/*/events.jsonl")):
            yield RunPaths.at(events.parent)

    @property
    def events(self) -> Path:
        return self.dir / "events.jsonl"

    @property
    def config(self) -> Path:
        return self.dir / "config.yaml"  # the resolved config the run trains with

    @property
    def complete(self) -> Path:
        return self.dir / COMPLETE

    @property
    def ledger(self) -> Path:
        return self.dir / "ledger"

    def ledger_file(self, rank: int) -> Path:
        return self.ledger / f"rank-{rank}.jsonl"

    @property
    def tracker(self) -> Path:
        return self.dir / "wandb"
