"""Durable file-system primitives: write, fsync, rename. Nothing here knows about checkpoints."""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from pathlib import Path

HASH_ALGORITHM = "sha256"


class HashingWriter:
    """A write-only file wrapper that hashes and counts bytes as they go to disk (one pass)."""

    def __init__(self, path: Path):
        self._file = open(path, "wb")  # noqa: SIM115 - closed in close()
        self._hash = hashlib.new(HASH_ALGORITHM)
        self.bytes = 0

    def write(self, data) -> int:
        view = memoryview(data)
        self._hash.update(view)
        self.bytes += view.nbytes
        return self._file.write(view)

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> str:
        """Flush, fsync and close; return the hex digest."""
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        return self._hash.hexdigest()


def digest_bytes(data: bytes | memoryview) -> str:
    return hashlib.new(HASH_ALGORITHM, data).hexdigest()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_durably(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary name, fsync, rename over `path`: readers see old or new, never half."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    write_file_durably(tmp, data)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def remove_tree(path: Path) -> None:
    """Rename aside first (atomic), then delete: a crash mid-delete never leaves a torn directory
    under the original name."""
    if not path.exists():
        return
    trash = path.with_name(f".trash-{path.name}-{uuid.uuid4().hex[:8]}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)
