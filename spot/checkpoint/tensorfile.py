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
from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from spot.fsutil import lower_priority, new_hasher, write_file_durably
from spot.tree import map_tensors

ALIGN = 64  # each tensor's offset in a component file
BLOCK = (
    4096  # each component's start in the snapshot buffer, and each file's length: O_DIRECT units
)
_CHUNK = 64 * 2**20  # hash and write in pieces so neither holds the GIL for long
_HASHER = ThreadPoolExecutor(1, thread_name_prefix="ckpt-hash", initializer=lower_priority)


class TensorFileError(Exception):
    """A component file that does not match its structure; str() says why."""


def _align(n: int, unit: int = ALIGN) -> int:
    return n + (-n) % unit


def _is_plain(t: torch.Tensor) -> bool:
    return t.layout == torch.strided and not t.is_quantized and t.device.type != "meta"


def _flatten(tree: Any, tensors: list[torch.Tensor]) -> Any:
    """The tree with dense tensors replaced by meta tensors; the tensors appended in order."""

    def placeholder(t: torch.Tensor) -> torch.Tensor:
        if not _is_plain(t):  # sparse, quantized: kept whole in the structure file
            return t.detach().clone()
        tensors.append(t.detach())
        return torch.empty(t.shape, dtype=t.dtype, device="meta")

    return map_tensors(tree, placeholder)


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

    @property
    def data(self) -> torch.Tensor | None:
        """The whole buffer (every component's bytes, as written)."""
        return self._buffer

    def _plan(self, state: dict[str, Any]):
        """Flatten the state, fit the buffer to its layout; return the copies to make."""
        flat = {}
        for name, tree in state.items():
            tensors: list[torch.Tensor] = []
            flat[name] = (_flatten(tree, tensors), tensors)
        layout = [
            (name, [(t.shape, t.dtype, t.device.type) for t in tensors])
            for name, (_, tensors) in flat.items()
        ]
        total = 0
        placements: dict[str, tuple[int, int, list[tuple[int, torch.Tensor]]]] = {}
        for name, (_, tensors) in flat.items():
            start, copies = total, []
            for t in tensors:
                total = start + _align(total - start)
                copies.append((total, t))
                total += t.numel() * t.element_size()
            total = start + _align(total - start, BLOCK)
            placements[name] = (start, total, copies)
        if layout != self._layout:
            self._buffer = None  # free the old one before allocating the new
            on_cuda = any(dev == "cuda" for _, specs in layout for *_, dev in specs)
            # zero_() touches every page now (torch.zeros would map them lazily): a fresh page's
            # first touch costs ~10x a copy on some VMs, and should not happen inside a stall.
            # Over-allocate by a block and start at a block-aligned address: components can then
            # be written with O_DIRECT (no copy into the page cache, almost no CPU).
            raw = torch.empty(total + BLOCK, dtype=torch.uint8, pin_memory=on_cuda)
            skip = (-raw.data_ptr()) % BLOCK
            self._buffer, self._layout = raw[skip : skip + total].zero_(), layout
        return flat, placements

    def reserve(self, state: dict[str, Any]) -> None:
        """Allocate (and fault in) the buffer for this state's layout ahead of the first capture."""
        self._plan(state)

    def capture(
        self, state: dict[str, Any], defer: Collection[str] = ()
    ) -> tuple[dict[str, Component], Callable[[], None]]:
        """Copy the state into the buffer. Components named in `defer` are not copied yet: the
        returned function copies them (from another thread, while the caller goes on, as long as
        nothing changes those tensors until it has returned)."""
        flat, placements = self._plan(state)
        buffer = self._buffer

        def copy(names) -> None:
            for name in names:
                for offset, t in placements[name][2]:
                    n = t.numel() * t.element_size()
                    buffer[offset : offset + n].copy_(_bytes_of(t), non_blocking=True)
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.synchronize()

        copy([name for name in flat if name not in defer])
        components = {
            name: Component(skeleton, buffer[placements[name][0] : placements[name][1]])
            for name, (skeleton, _) in flat.items()
        }
        return components, lambda: copy([name for name in flat if name in defer])


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
        pad = (-offset) % BLOCK
        if pad:
            parts.append(torch.zeros(pad, dtype=torch.uint8))
        components[name] = Component(skeleton, parts)  # a list of views, written in order
    return components


def _digest(views: list[memoryview]) -> str:
    hasher = new_hasher()
    for view in views:
        for i in range(0, len(view), _CHUNK):
            hasher.update(view[i : i + _CHUNK])
    return hasher.hexdigest()


def _open_for_write(path: Path, views: list[memoryview]) -> tuple[int, bool]:
    """O_DIRECT when the data allows it (one block-aligned buffer, a whole number of blocks) and
    the file system supports it; buffered otherwise (tmpfs, unaligned synchronous saves)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    direct = (
        hasattr(os, "O_DIRECT")
        and len(views) == 1
        and len(views[0]) % BLOCK == 0
        and torch.frombuffer(views[0], dtype=torch.uint8).data_ptr() % BLOCK == 0
    )
    if direct:
        try:
            return os.open(path, flags | os.O_DIRECT, 0o644), True
        except OSError:
            pass
    return os.open(path, flags, 0o644), False


def _write_blob(path: Path, parts: list[torch.Tensor] | torch.Tensor) -> tuple[int, str]:
    """Write the bytes while another thread hashes them (xxhash releases the GIL)."""
    parts = parts if isinstance(parts, list) else [parts]
    views = [memoryview(p.numpy()) for p in parts if p.numel()]
    digest = _HASHER.submit(_digest, views)
    fd, _direct = _open_for_write(path, views)
    try:
        for view in views:
            for i in range(0, len(view), _CHUNK):
                chunk = view[i : i + _CHUNK]
                written = 0
                while written < len(chunk):
                    written += os.write(fd, chunk[written:])
        os.fsync(fd)
    finally:
        os.close(fd)
    return sum(len(v) for v in views), digest.result()


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
    """The file's bytes in one uint8 tensor, and their digest, hashed as the chunks arrive.
    The size is checked against the file before anything is allocated: a manifest claiming
    64 TiB (or a negative size) makes a corrupt checkpoint, not a failed allocation."""
    with open(path, "rb", buffering=0) as f:
        actual = os.fstat(f.fileno()).st_size
        if size < 0 or actual != size:
            raise TensorFileError(f"{path.name} has {actual} bytes, manifest says {size}")
        blob = torch.empty(size, dtype=torch.uint8)
        view = memoryview(blob.numpy()) if size else memoryview(bytearray())
        hasher = new_hasher()
        pending = None
        got = 0
        while got < size:  # the file can still change while it is read: compare at the end
            n = f.readinto(view[got : got + _CHUNK])
            if not n:
                break
            if pending is not None:
                pending.result()
            pending = _HASHER.submit(hasher.update, view[got : got + n])
            got += n
        extra = f.read(1)
    if pending is not None:
        pending.result()
    if got != size or extra:
        raise TensorFileError(
            f"{path.name} has {'more' if extra else got} bytes, manifest says {size}"
        )
    return blob, hasher.hexdigest()


def rebuild(skeleton: Any, blob: torch.Tensor) -> Any:
    """Put the tensors back: slices of `blob` at the offsets the structure implies."""
    offset = 0

    def fill(meta: torch.Tensor) -> torch.Tensor:
        nonlocal offset
        if meta.device.type != "meta":  # a tensor kept whole in the structure file
            return meta
        offset = _align(offset)
        n = meta.numel() * meta.element_size()
        if offset + n > blob.numel():
            raise TensorFileError("tensor data is shorter than its structure")
        t = blob[offset : offset + n].view(meta.dtype).reshape(meta.shape)
        offset += n
        return t

    result = map_tensors(skeleton, fill)
    if _align(offset, BLOCK) != blob.numel():
        raise TensorFileError("tensor data is longer than its structure")
    return result
