"""Where an attempt starts, as typed results: what rank 0 found (a checkpoint to resume, another
run's weights, or nothing usable), sent to every rank; then the plan at this world size. Each
step of Session's restore -> plan -> resume takes what the one before returned."""

from __future__ import annotations

from dataclasses import dataclass

from spot.distributed.sampler import ResumableBatchSampler
from spot.run.schedule import TrainingLength


@dataclass(frozen=True)
class Restored:
    """The checkpoint this attempt resumes from, the same on every rank."""

    step: int
    path: str
    state: dict
    best: dict | None = None  # checkpoint.keep_best's record, from the manifest (checkpoint.best)
    sharded: bool = False  # every rank reads its model and optimizer shards from `path`
    # Node-local disks (spot.checkpoint.parts): the manifest's files, of which each rank fetches
    # what it reads into `path` on its own disk; None where `path` holds them all.
    files: dict | None = None


@dataclass(frozen=True)
class Plan:
    """This attempt at this world size: the data order and batch, the run's length, the world
    size the config's LR and batch are meant for; and the checkpoint it resumes from, if any."""

    sampler: ResumableBatchSampler
    length: TrainingLength
    reference_world_size: int
    max_steps: int  # the progress line's total
    restored: Restored | None


@dataclass(frozen=True)
class Initial:
    """init.checkpoint: another run's verified weights, for a run with no checkpoint of its own."""

    source: str
    step: int
    state: dict


@dataclass(frozen=True)
class Unusable:
    """The newest checkpoint (or init.checkpoint) cannot be used: the run stops with exit 3."""

    reason: str


_FOUND = {kind.__name__: kind for kind in (Restored, Initial, Unusable)}


def send(found) -> tuple | None:
    """What rank 0 found, for World.share: its fields as a dict, whose tensors travel as raw
    buffers (a dataclass would be pickled whole)."""
    return None if found is None else (type(found).__name__, dict(vars(found)))


def receive(sent: tuple | None):
    return None if sent is None else _FOUND[sent[0]](**sent[1])
