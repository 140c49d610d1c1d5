"""The sharded data set format: a directory (on disk or in a bucket) of shard files and an index.

    index.json            {"format": 1, "samples": N, "digest": ..., "shards": [
                              {"name": "shard-00000.bin", "samples": n, "bytes": b, "digest": d},
                              ...]}
    shard-00000.bin       sample 0, sample 1, ..., then the samples' offsets, then a footer

A sample is a tuple of tensors (what a map-style `Dataset` returns: `(inputs, targets)`; a Python
int or float becomes a 0-dim tensor, which a DataLoader collates the same). Each tensor is its
dtype, shape and raw bytes, so reading one is a slice of the shard: no pickle, nothing
executable. The offsets table at the end gives random access by index within a shard, and the
index's per-shard counts give it across shards: the data set is map-style, so the sampler, the
ledger and the resume rules apply unchanged. Digests are xxh3-128 (spot.fsutil), the index's
`digest` one over every shard's: the data set's identity (spot/run/data_identity.py).

Why our own: the reader needs random access by global index, a checksum per shard it can check
after each download, and a size it knows before fetching; mosaic's MDS has all three but comes
with its own streaming runtime (and pins numpy < 2.2), litdata's chunks likewise; WebDataset tars
are sequential only. This is ~100 lines, read with numpy/torch alone.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import torch

from spot.fsutil import digest_bytes

FORMAT = 1
INDEX = "index.json"
FOOTER = struct.Struct("<QQ")  # the offsets table's position, the number of samples
_DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
    torch.uint16,  # token ids of a vocabulary up to 65536, half of int32's bytes
    torch.uint32,
]  # (codes are stored: new ones only at the end)
_CODE = {dtype: code for code, dtype in enumerate(_DTYPES)}


class ShardError(ValueError):
    """A shard or index that is not what it should be; str() is one line."""


def shard_name(number: int) -> str:
    return f"shard-{number:05d}.bin"


def encode(sample) -> bytes:
    fields = sample if isinstance(sample, tuple | list) else (sample,)
    out = [struct.pack("<B", len(fields))]
    for field in fields:
        tensor = field if isinstance(field, torch.Tensor) else torch.tensor(field)
        tensor = tensor.detach().cpu().contiguous()
        if tensor.dtype not in _CODE:
            raise ShardError(f"a sample's tensor of dtype {tensor.dtype} cannot be stored")
        raw = tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
        out.append(struct.pack("<BB", _CODE[tensor.dtype], tensor.dim()))
        out.append(struct.pack(f"<{tensor.dim()}q", *tensor.shape))
        out.append(struct.pack("<Q", len(raw)))
        out.append(raw)
    return b"".join(out)


def decode(view: memoryview):
    (count,) = struct.unpack_from("<B", view, 0)
    at, fields = 1, []
    for _ in range(count):
        code, dims = struct.unpack_from("<BB", view, at)
        shape = struct.unpack_from(f"<{dims}q", view, at + 2)
        at += 2 + 8 * dims
        (size,) = struct.unpack_from("<Q", view, at)
        at += 8
        if size == 0:
            fields.append(torch.empty(shape, dtype=_DTYPES[code]))
            continue
        raw = np.frombuffer(view[at : at + size], dtype=np.uint8).copy()
        at += size
        fields.append(torch.from_numpy(raw).view(_DTYPES[code]).reshape(shape))
    return tuple(fields) if count > 1 else fields[0]


class ShardWriter:
    """Samples in order into shard files of about `shard_bytes` each in `directory`; `close()`
    writes the index last and returns it."""

    def __init__(self, directory: Path, shard_bytes: int):
        self.directory, self.shard_bytes = Path(directory), max(1, shard_bytes)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.shards: list[dict] = []
        self._samples: list[bytes] = []
        self._size = 0

    def add(self, sample) -> None:
        data = encode(sample)
        if self._samples and self._size + len(data) > self.shard_bytes:
            self._flush()
        self._samples.append(data)
        self._size += len(data)

    def _flush(self) -> None:
        offsets, at = [], 0
        for data in self._samples:
            offsets.append(at)
            at += len(data)
        body = b"".join(self._samples)
        table = np.asarray(offsets + [at], dtype="<u8").tobytes()
        blob = body + table + FOOTER.pack(len(body), len(self._samples))
        name = shard_name(len(self.shards))
        (self.directory / name).write_bytes(blob)
        entry = {"samples": len(self._samples), "bytes": len(blob), "digest": digest_bytes(blob)}
        self.shards.append({"name": name, **entry})
        self._samples, self._size = [], 0

    def close(self) -> dict:
        if self._samples:
            self._flush()
        index = build_index(self.shards)
        (self.directory / INDEX).write_bytes(json.dumps(index, indent=1).encode())
        return index


def build_index(shards: list[dict]) -> dict:
    lines = "".join(f"{s['name']} {s['samples']} {s['digest']}\n" for s in shards)
    total = sum(s["samples"] for s in shards)
    return {
        "format": FORMAT,
        "samples": total,
        "digest": digest_bytes(lines.encode()),
        "shards": shards,
    }


def parse_index(body: bytes, where: str) -> dict:
    """The index, checked: plain shard names, counts, its digest over them. ShardError else."""
    try:
        index = json.loads(body)
        shards = index["shards"]
        ok = index.get("format") == FORMAT and all(
            isinstance(s["name"], str)
            and s["name"] == Path(s["name"]).name
            and not s["name"].startswith(".")
            and int(s["samples"]) > 0
            for s in shards
        )
    except (ValueError, KeyError, TypeError):
        raise ShardError(f"{where}: not a shard index (format {FORMAT})") from None
    if not ok or build_index(shards) != {
        k: index[k] for k in ("format", "samples", "digest", "shards")
    }:
        raise ShardError(f"{where}: the index does not add up (names, counts or digest)")
    return index


class ShardFile:
    """One shard on disk, read by sample number (memory-mapped)."""

    def __init__(self, path: Path):
        data = np.memmap(path, dtype=np.uint8, mode="r")
        table_at, count = FOOTER.unpack(bytes(data[-FOOTER.size :]))
        self._view = memoryview(data)
        self._offsets = np.frombuffer(data, dtype="<u8", count=count + 1, offset=table_at)
        self.count = count

    def __getitem__(self, number: int):
        start, end = int(self._offsets[number]), int(self._offsets[number + 1])
        return decode(self._view[start:end])
