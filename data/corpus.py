"""A real text corpus every machine has without a download: the running Python's standard
library sources, at byte level (256 symbols, no tokenizer to fetch).

The files (found with `sysconfig`; tests and site-packages left out) are sorted, and split into
train and validation by file (a digest of the path picks about 1 in 20 for validation, so the
split does not move when a file is added). The bytes of each split are written once into a file
in `cache_dir` (atomically and durably: ranks that build it at the same time write the same
bytes) with the digest of their content in meta.json, and every rank and every restart reads
that file through a memory map. A damaged cache of any kind (a torn or garbage meta.json, a
missing, truncated or altered split file) is built again. The digest is the data set's
`identity` (spot/run/data_identity.py): recorded in checkpoints, compared on resume and across
ranks, since another Python's standard library is other data under the same config. Windows
are fixed (`block_size + 1` bytes at a stride of `block_size`), so the data set is map-style and
the resumable sampler's exactly-once order and elastic resharding work on it unchanged.
"""

from __future__ import annotations

import hashlib
import json
import sysconfig
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from spot.fsutil import atomic_write_bytes, fsync_dir

EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}


def stdlib_files() -> tuple[Path, list[Path]]:
    root = Path(sysconfig.get_paths()["stdlib"]).resolve()
    files = [
        p
        for p in root.rglob("*.py")
        if not EXCLUDED_DIRS & set(p.relative_to(root).parts[:-1])
        and not p.name.startswith("test_")
    ]
    return root, sorted(files, key=lambda p: p.relative_to(root).as_posix())


def in_validation(relative: str) -> bool:
    return hashlib.sha256(relative.encode()).digest()[0] < 13  # ~1 in 20 files


def _build(cache: Path) -> None:
    """Write both splits and then meta.json, each durably and atomically (a temporary name,
    fsync, rename, fsync of the directory): a crash leaves the old file or the new one, and
    ranks that build at the same time write the same bytes under their own temporary names."""
    root, files = stdlib_files()
    parts: dict[str, list[bytes]] = {"train": [], "val": []}
    for path in files:
        relative = path.relative_to(root).as_posix()
        parts["val" if in_validation(relative) else "train"].append(path.read_bytes())
    cache.mkdir(parents=True, exist_ok=True)
    fsync_dir(cache.parent)
    meta: dict = {}
    for split, chunks in parts.items():
        data = b"".join(chunks)
        meta[split] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        atomic_write_bytes(cache / f"{split}.bin", data)
    meta["files"] = len(files)
    atomic_write_bytes(cache / "meta.json", json.dumps(meta, indent=1).encode())


def _read(cache: Path, split: str) -> tuple[np.memmap, str] | None:
    """The split's bytes and digest if the cache holds them intact; None for anything else (no
    cache, a torn or foreign meta.json, a missing, truncated or altered split file)."""
    try:
        entry = json.loads((cache / "meta.json").read_bytes())[split]
        size, digest = int(entry["bytes"]), str(entry["sha256"])
        path = cache / f"{split}.bin"
        if path.stat().st_size != size or size == 0:  # np.memmap cannot map an empty file
            return None
        data = np.memmap(path, dtype=np.uint8, mode="r")
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None
    return (data, digest) if hashlib.sha256(data).hexdigest() == digest else None


def _load(cache: Path, split: str) -> tuple[np.memmap, str]:
    """The split's bytes (memory-mapped) and their digest, built first if missing or damaged."""
    found = _read(cache, split)
    if found is None:
        _build(cache)
        found = _read(cache, split)
    if found is None:
        raise RuntimeError(f"corpus cache {cache} does not match its digest after a rebuild")
    return found


class StdlibBytes(Dataset):
    """Windows of the standard library's source bytes: (inputs, targets), targets shifted by
    one byte."""

    def __init__(self, cache_dir: str, block_size: int = 128, split: str = "train"):
        if split not in ("train", "val"):
            raise ValueError(f"split {split!r} is not allowed; allowed: train, val")
        self.block_size = block_size
        self.data, self.digest = _load(Path(cache_dir).expanduser(), split)

    @property
    def identity(self) -> str:
        """What the windows are cut from (spot/run/data_identity.py): another Python's standard
        library is other data under the same config, refused on resume and across ranks."""
        return f"sha256:{self.digest}"

    def __len__(self) -> int:
        return (len(self.data) - 1) // self.block_size

    def __getitem__(self, index: int):
        return next_byte_pairs(self.stored(index))

    def stored(self, index: int) -> torch.Tensor:
        """The window as `python -m spot data write` stores it: its block_size + 1 bytes, 16
        times smaller than the int64 pairs; `next_byte_pairs` makes the pairs again (the
        reader's `data.dataset.transform`: conf/data/stdlib_shards.yaml)."""
        start = index * self.block_size
        return torch.from_numpy(np.array(self.data[start : start + self.block_size + 1]))


def next_byte_pairs(window: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) of a window of bytes: targets shifted by one, as int64 class indices."""
    window = window.to(torch.int64)
    return window[:-1], window[1:]
