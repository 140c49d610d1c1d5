"""Run identity: the same command finds the same run directory on every restart and every machine."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

from spot.run.config import NON_TRAINING_KEYS, NON_TRAINING_LEAVES


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def affects_training(override: str) -> bool:
    key = _override_key(override)
    return (
        key.split(".")[0].split("/")[0] not in NON_TRAINING_KEYS and key not in NON_TRAINING_LEAVES
    )


def run_id_from_overrides(overrides: Iterable[str]) -> str:
    """A digest of the overrides that change the training, independent of their order."""
    relevant = sorted(ov for ov in overrides if affects_training(ov))
    return hashlib.sha256("\n".join(relevant).encode()).hexdigest()[:12]


def config_digest(training_config: dict) -> str:
    canonical = json.dumps(training_config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def run_dir(root: str | Path, name: str, run_id: str) -> Path:
    return Path(root) / name / run_id
