"""Every random number generator that influences training, captured and restored as tensors and
plain values (so it loads with weights_only=True)."""

from __future__ import annotations

import random

import numpy as np
import torch


def capture() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss_next = random.getstate()
    state = {
        "python": {"version": version, "state": list(py_state), "gauss_next": gauss_next},
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore(state: dict) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    npst = state["numpy"]
    np.random.set_state(
        (
            npst["kind"],
            npst["keys"].numpy().astype(np.uint32),
            npst["pos"],
            npst["has_gauss"],
            npst["cached_gaussian"],
        )
    )
    # clone(): a restored state may be a slice of a larger buffer, and set_rng_state reads the
    # storage from its start (it crashes on a view with an offset).
    torch.set_rng_state(state["torch"].clone())
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([c.clone() for c in cuda])
        else:  # another machine shape: restore what maps one to one, the current device
            torch.cuda.set_rng_state(cuda[0].clone())


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_rank(seed: int, rank: int, step: int = 0) -> None:
    """Give a rank other than 0 its own stream (its own dropout masks), after the model is built
    (the same weights on every rank). Rank 0 keeps the stream a single-process run has."""
    if rank == 0 and step == 0:
        return
    seed_everything((seed * 1_000_003 + rank * 1_000_033 + step) % 2**63)
