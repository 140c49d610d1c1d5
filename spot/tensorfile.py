"""Checkpoint component files, and the host-memory snapshot the training loop copies state into.

A component (model, optimizer, ...) is stored as two files:
  <name>.pt   the structure: a small `torch.save` of the state tree in which every dense tensor is
              replaced by a meta tensor (shape and dtype, no data), loaded with weights_only=True;
  <name>.bin  the tensors' bytes, back to back, each at a 64-byte aligned offset, in tree order.

Why not one `torch.save` per component: its zip writer goes through Python for every record and
computes a CRC32 of everything, which makes it several times slower than the disk; here the bytes
are written in one sequential pass straight from the snapshot buffer and hashed with xxh3 on the
way, and a load reads each blob in one call into one buffer whose slices become the tensors.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from spot.fsutil import new_hasher, write_file_durably

ALIGN = 64
_CHUNK = 64 * 2**20  # hash and write in pieces so neither holds the GIL for long


class TensorFileError(Exception):
    """A component file that does not match its structure; str() says why."""


def _align(n: int) -> int:
    return n + (-n) % ALIGN


def _is_plain(t: torch.Tensor) -> bool:
    return t.layout == torch.strided and not t.is_quantized and t.device.type != "meta"


def _flatten(tree: Any, tensors: list[torch.Tensor]) -> Any:
    """The tree with dense tensors replaced by meta tensors; the tensors appended in order."""
    if isinstance(tree, torch.Tensor) and _is_plain(tree):
        tensors.append(tree.detach())
        return torch.empty(tree.shape, dtype=tree.dtype, device="meta")
    if isinstance(tree, dict):
        return {k: _flatten(v, tensors) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return type(tree)(_flatten(v, tensors) for v in tree)
    if isinstance(tree, torch.Tensor):  # sparse, quantized: kept whole in the structure file
        return tree.detach().clone()
    return tree


def _bytes_of(t: torch.Tensor) -> torch.Tensor:
    """A 1-D uint8 view of a contiguous tensor's data."""
    return t.contiguous().reshape(-1).view(torch.uint8)


@dataclass
class Component:
    """One component ready to write: its structure and its tensor bytes (a uint8 view)."""

    skeleton: Any
    data: torch.Tensor


class SnapshotBuffer:
    """Host memory the state is copied into at a step boundary, reused between checkpoints.

    One allocation holds every tensor of every component at its final file offset, so a component
    is written with one sequential write. The buffer is reallocated only when the state's layout
    changes (the first optimizer step creates its state); it is pinned when the state is on CUDA
    so the device-to-host copies are asynchronous DMA. It costs one copy of the state.
    """

    def __init__(self) -> None:
        self._buffer: torch.Tensor | None = None
        self._layout: list | None = None

    @property
    def nbytes(self) -> int:
        return 0 if self._buffer is None else self._buffer.numel()

    def capture(self, state: dict[str, Any]) -> dict[str, Component]:
        flat = {}
        for name, tree in state.items():
            tensors: list[torch.Tensor] = []
            flat[name] = (_flatten(tree, tensors), tensors)
        layout = [
            (name, [(t.shape, t.dtype, t.device.type) for t in tensors])
            for name, (_, tensors) in flat.items()
        ]
        regions, total = {}, 0
        for name, (_, tensors) in flat.items():
            start = total
            for t in tensors:
                total = _align(total) + t.numel() * t.element_size()
            total = _align(total)
            regions[name] = (start, total)
        if layout != self._layout:
            self._buffer = None  # free the old one before allocating the new
            on_cuda = any(dev == "cuda" for _, specs in layout for *_, dev in specs)
            self._buffer = torch.zeros(total, dtype=torch.uint8, pin_memory=on_cuda)
            self._layout = layout
        components = {}
        for name, (skeleton, tensors) in flat.items():
            start, end = regions[name]
            offset = start
            for t in tensors:
                offset = _align(offset)
                n = t.numel() * t.element_size()
                self._buffer[offset : offset + n].copy_(_bytes_of(t), non_blocking=True)
                offset += n
            components[name] = Component(skeleton, self._buffer[start:end])
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        return components


def direct(state: dict[str, Any]) -> dict[str, Component]:
    """Components that write straight from the live tensors (synchronous saves: no copy)."""
    components = {}
    for name, tree in state.items():
        tensors: list[torch.Tensor] = []
        skeleton = _flatten(tree, tensors)
        parts, offset = [], 0
        for t in tensors:
            pad = (-offset) % ALIGN
            if pad:
                parts.append(torch.zeros(pad, dtype=torch.uint8))
            data = _bytes_of(t.cpu())
            parts.append(data)
            offset += pad + data.numel()
        pad = (-offset) % ALIGN
        if pad:
            parts.append(torch.zeros(pad, dtype=torch.uint8))
        components[name] = Component(skeleton, parts)  # a list of views, written in order
    return components


def _write_blob(path: Path, parts: list[torch.Tensor] | torch.Tensor) -> tuple[int, str]:
    hasher, size = new_hasher(), 0
    with open(path, "wb") as f:
        for part in parts if isinstance(parts, list) else [parts]:
            view = memoryview(part.numpy()) if part.numel() else memoryview(b"")
            for i in range(0, len(view), _CHUNK):
                chunk = view[i : i + _CHUNK]
                f.write(chunk)
                hasher.update(chunk)
            size += len(view)
        f.flush()
        os.fsync(f.fileno())
    return size, hasher.hexdigest()


def write_component(directory: Path, name: str, component: Component) -> dict[str, dict]:
    """Write <name>.bin and <name>.pt durably; return their manifest entries."""
    size, digest = _write_blob(directory / f"{name}.bin", component.data)
    buf = io.BytesIO()
    torch.save(component.skeleton, buf)
    structure = buf.getvalue()
    write_file_durably(directory / f"{name}.pt", structure)
    hasher = new_hasher()
    hasher.update(structure)
    return {
        f"{name}.bin": {"bytes": size, "digest": digest},
        f"{name}.pt": {"bytes": len(structure), "digest": hasher.hexdigest()},
    }


def read_blob(path: Path, size: int) -> tuple[torch.Tensor, str]:
    """The file's bytes in one uint8 tensor (one read call), and their digest."""
    blob = torch.empty(size, dtype=torch.uint8)
    view = memoryview(blob.numpy()) if size else memoryview(bytearray())
    with open(path, "rb") as f:
        got = f.readinto(view)
        extra = f.read(1)
    if got != size or extra:
        raise TensorFileError(
            f"{path.name} has {'more' if extra else got} bytes, manifest says {size}"
        )
    hasher = new_hasher()
    for i in range(0, size, _CHUNK):
        hasher.update(view[i : i + _CHUNK])
    return blob, hasher.hexdigest()


def rebuild(skeleton: Any, blob: torch.Tensor) -> Any:
    """Put the tensors back: slices of `blob` at the offsets the structure implies."""
    offset = 0

    def fill(tree: Any) -> Any:
        nonlocal offset
        if isinstance(tree, torch.Tensor) and tree.device.type == "meta":
            offset = _align(offset)
            n = tree.numel() * tree.element_size()
            if offset + n > blob.numel():
                raise TensorFileError("tensor data is shorter than its structure")
            t = blob[offset : offset + n].view(tree.dtype).reshape(tree.shape)
            offset += n
            return t
        if isinstance(tree, dict):
            return {k: fill(v) for k, v in tree.items()}
        if isinstance(tree, list | tuple):
            return type(tree)(fill(v) for v in tree)
        return tree

    result = fill(skeleton)
    if _align(offset) != blob.numel():
        raise TensorFileError("tensor data is longer than its structure")
    return result
