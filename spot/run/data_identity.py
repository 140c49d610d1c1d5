"""A data set's identity: what its content is, declared by the data set, recorded in every
checkpoint and compared on resume and across ranks.

The config names a data set (its `_target_` and arguments, part of the config digest), not its
content: the same config can read other bytes on another machine (the GPT corpus is the running
Python's standard library; a mounted directory; a file re-exported upstream). Ranks that read
different bytes shuffle different permutations (exactly-once is gone), and a resume on them
trains on other data. A `Dataset` that can say what its content is declares it with an
`identity` attribute or property: a str that changes when the samples do (a digest of the bytes,
a version of the data). Data sets without one (or with None) are not checked.

- Across ranks, at start: the training and validation sets' identities must be the same on every
  rank, else every rank stops with one line (a ConfigError: exit 2, retrying the same machines
  gives the same answer; start every node from the same image and data).
- On resume: the training set's identity is in every checkpoint (`trainer.data_identity`); a
  checkpoint whose identity differs from the data set's is refused (CheckpointUnusable: exit 3).
  A checkpoint without one (written before, or by a data set that declares none) is not checked.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from spot.run.config import ConfigError

if TYPE_CHECKING:
    from spot.distributed.world import World


def identity_of(dataset: Any, key: str = "data.dataset") -> str | None:
    """The identity `dataset` declares, or None (no data set, or none declared)."""
    value = getattr(dataset, "identity", None)
    if value is None or isinstance(value, str):
        return value
    raise ConfigError(key, f"the data set's identity must be a str, not {type(value).__name__}")


def shown(identity: str | None) -> str:
    if identity is None:
        return "none declared"
    return identity if len(identity) <= 40 else f"{identity[:37]}..."


def resume_mismatch(saved: str | None, current: str | None) -> str | None:
    """Why a checkpoint trained on `saved` data cannot resume on `current` data (None: it can)."""
    if saved is None or current is None or saved == current:
        return None
    return (
        f"the checkpoint was trained on other data (data.dataset identity {shown(saved)}, this "
        f"run's {shown(current)}): the data set's content changed under the same config"
    )


def check_same_data(world: World, datasets: dict[str, Any]) -> dict[str, str | None]:
    """Every rank's data sets (by config key; None where not built) must declare the same
    identities as rank 0's: ConfigError on every rank if not. Returns this rank's identities."""
    mine = {key: identity_of(dataset, key) for key, dataset in datasets.items()}
    if not world.distributed:
        return mine
    everyone = world.gather(mine)
    problem = None
    if world.is_leader:
        for rank, theirs in enumerate(everyone):
            key = next((k for k in mine if theirs.get(k) != mine[k]), None)
            if key is not None:
                problem = (
                    key,
                    f"ranks read different data (identity {shown(mine[key])} on rank 0, "
                    f"{shown(theirs.get(key))} on rank {rank}); start every node with the same "
                    "image and data",
                )
                break
    problem = world.share(problem)
    if problem is not None:
        raise ConfigError(*problem)
    return mine
