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
        # This rank's own generator only: a rank uses one device (its local rank's), and the
        # rank, not the device index, is what a restart on another machine shape keeps.
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def own_cuda_state(cuda: torch.Tensor | list | None, device_index: int) -> torch.Tensor | None:
    """The CUDA generator state a rank restores on its own device, from what it saved: its own
    generator (one tensor), or, from checkpoints that saved every device's (a list), the one of
    the device this rank uses if the saving process had it, else the first."""
    if cuda is None:
        return None
    if isinstance(cuda, torch.Tensor):
        return cuda
    if not cuda:
        return None
    return cuda[device_index] if device_index < len(cuda) else cuda[0]


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
    if state.get("cuda") is not None and torch.cuda.is_available():  # a CPU run: no CUDA context
        device = torch.cuda.current_device()
        own = own_cuda_state(state["cuda"], device)
        if own is not None:
            torch.cuda.set_rng_state(own.clone(), device)


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
