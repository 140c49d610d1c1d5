"""A real text corpus every machine has without a download: the running Python's standard
library sources, at byte level (256 symbols, no tokenizer to fetch).

The files (found with `sysconfig`; tests and site-packages left out) are sorted, and split into
train and validation by file (a digest of the path picks about 1 in 20 for validation, so the
split does not move when a file is added). The bytes of each split are written once into a file
in `cache_dir` (atomically: ranks that build it at the same time write the same bytes) with the
digest of their content, and every rank and every restart reads that file through a memory
map; a file whose bytes no longer match its digest is built again. Windows are fixed
(`block_size + 1` bytes at a stride of `block_size`), so the data set is map-style and the
resumable sampler's exactly-once order and elastic resharding work on it unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

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
    root, files = stdlib_files()
    parts: dict[str, list[bytes]] = {"train": [], "val": []}
    for path in files:
        relative = path.relative_to(root).as_posix()
        parts["val" if in_validation(relative) else "train"].append(path.read_bytes())
    cache.mkdir(parents=True, exist_ok=True)
    meta = {}
    for split, chunks in parts.items():
        data = b"".join(chunks)
        meta[split] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        tmp = cache / f".{split}.bin.{os.getpid()}"
        tmp.write_bytes(data)
        os.replace(tmp, cache / f"{split}.bin")
    meta["files"] = len(files)
    tmp = cache / f".meta.json.{os.getpid()}"
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, cache / "meta.json")


def _load(cache: Path, split: str) -> tuple[np.memmap, str]:
    """The split's bytes (memory-mapped) and their digest, built first if missing or stale."""
    for attempt in (0, 1):
        meta_path, data_path = cache / "meta.json", cache / f"{split}.bin"
        if meta_path.exists() and data_path.exists():
            meta = json.loads(meta_path.read_text())[split]
            data = np.memmap(data_path, dtype=np.uint8, mode="r")
            if hashlib.sha256(data).hexdigest() == meta["sha256"]:
                return data, meta["sha256"]
        if attempt == 0:
            _build(cache)
    raise RuntimeError(f"corpus cache {cache} does not match its digest after a rebuild")


class StdlibBytes(Dataset):
    """Windows of the standard library's source bytes: (inputs, targets), targets shifted by
    one byte."""

    def __init__(self, cache_dir: str, block_size: int = 128, split: str = "train"):
        if split not in ("train", "val"):
            raise ValueError(f"split {split!r} is not allowed; allowed: train, val")
        self.block_size = block_size
        self.data, self.digest = _load(Path(cache_dir).expanduser(), split)

    def __len__(self) -> int:
        return (len(self.data) - 1) // self.block_size

    def __getitem__(self, index: int):
        start = index * self.block_size
        window = torch.from_numpy(self.data[start : start + self.block_size + 1].astype(np.int64))
        return window[:-1], window[1:]
