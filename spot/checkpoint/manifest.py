"""`manifest.json`: the commit marker of a checkpoint. A checkpoint without a valid one does not exist.

The manifest names every file of every component with its size and checksum (see
`spot/checkpoint/tensorfile.py` for the two files of a component), the step, epoch, world size, config digest
and library version, and carries a checksum of itself, so a flipped byte in the manifest is caught
like one in a component.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from spot import __version__
from spot.checkpoint import tensorfile
from spot.checkpoint.sharded import METADATA, SHARDED, is_shard_file
from spot.fsutil import HASH_ALGORITHM, digest_bytes, digest_file

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
REQUIRED_COMPONENTS = ("model", "optimizer", "scheduler", "trainer")
STEP_DIR = re.compile(r"^step-(\d{9})$")
_SAFE_FILE = re.compile(r"^[A-Za-z0-9_.-]+$")


class CorruptCheckpoint(Exception):
    """A checkpoint that must not be used; str() says why in one line."""


def step_dir_name(step: int) -> str:
    return f"step-{step:09d}"


def _self_digest(body: dict) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return digest_bytes(canonical.encode())


def build(files: dict[str, dict], meta: dict[str, Any]) -> bytes:
    """files: {"model.bin": {"bytes": n, "digest": hex}, ...}; meta: step, epoch, ...

    The components are the names that have both a .pt and a .bin file; a sharded checkpoint's
    model and optimizer are in DCP's files instead (meta's `sharded` names them)."""
    components = sorted({f.rsplit(".", 1)[0] for f in files if not is_shard_file(f)})
    body = {
        "format": FORMAT_VERSION,
        "library_version": __version__,
        "hash": HASH_ALGORITHM,
        **meta,
        "components": components,
        "files": files,
    }
    body["manifest_digest"] = _self_digest(body)
    return json.dumps(body, indent=1, sort_keys=True).encode()


PUBLISHED = "etag"  # a file's entry key: its rank put it in the bucket, as this object (parts.py)


@dataclass
class Manifest:
    path: Path
    body: dict

    @property
    def step(self) -> int:
        return int(self.body["step"])

    @property
    def components(self) -> list[str]:
        return self.body["components"]

    @property
    def files(self) -> dict[str, dict]:
        return self.body["files"]

    @property
    def sharded(self) -> bool:
        """Written by every rank (trainer.strategy=fsdp): the model and optimizer are DCP's files."""
        return bool(self.body.get("sharded"))

    def __getitem__(self, key: str) -> Any:
        return self.body[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.body.get(key, default)

    @property
    def total_bytes(self) -> int:
        return sum(int(f["bytes"]) for f in self.files.values())


def read(ckpt_dir: Path) -> Manifest:
    """Parse and check the manifest itself (not yet the files it names)."""
    path = ckpt_dir / MANIFEST
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise CorruptCheckpoint("no manifest.json (never committed, or torn)") from None
    return parse(raw, ckpt_dir.name, path)


def parse(raw: bytes, dir_name: str, path: Path | None = None) -> Manifest:
    """Check a manifest's bytes (from disk or a bucket); `dir_name` is its step-* directory."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorruptCheckpoint(
            f"manifest.json is not valid JSON ({exc.msg if hasattr(exc, 'msg') else exc})"
        ) from None
    if not isinstance(body, dict):
        raise CorruptCheckpoint("manifest.json is not an object")
    claimed = body.pop("manifest_digest", None)
    if claimed != _self_digest(body):
        raise CorruptCheckpoint("manifest.json fails its own checksum")
    if body.get("format") != FORMAT_VERSION:
        raise CorruptCheckpoint(
            f"manifest format {body.get('format')!r}, expected {FORMAT_VERSION}"
        )
    if body.get("hash") != HASH_ALGORITHM:
        raise CorruptCheckpoint(f"manifest hash {body.get('hash')!r}, expected {HASH_ALGORITHM}")
    components, files = body.get("components"), body.get("files")
    if not isinstance(components, list) or not isinstance(files, dict):
        raise CorruptCheckpoint("manifest has no components or files")
    for file, entry in files.items():
        if not _SAFE_FILE.match(file) or file == MANIFEST or not file.strip("."):
            raise CorruptCheckpoint(f"manifest names an unsafe file {file!r}")
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("bytes"), int)
            or isinstance(entry.get("bytes"), bool)
            or not isinstance(entry.get("digest"), str)
        ):
            raise CorruptCheckpoint(f"manifest entry for {file} lacks bytes or digest")
        if entry["bytes"] < 0:  # a buggy writer or a hostile bucket: never an allocation size
            raise CorruptCheckpoint(f"manifest says {file} has {entry['bytes']} bytes")
    sharded = body.get("sharded") or []
    if sharded:
        if not isinstance(sharded, list) or sorted(map(str, sharded)) != sorted(SHARDED):
            raise CorruptCheckpoint(f"manifest shards {sharded!r}, expected {list(SHARDED)}")
        if METADATA not in files or not any(f.endswith(".distcp") for f in files):
            raise CorruptCheckpoint("sharded manifest names no .metadata or no .distcp file")
    missing = [c for c in REQUIRED_COMPONENTS if c not in components and c not in sharded]
    if missing:
        raise CorruptCheckpoint(f"manifest lacks component(s): {', '.join(missing)}")
    for name in components:
        for suffix in (".pt", ".bin"):
            if f"{name}{suffix}" not in files:
                raise CorruptCheckpoint(f"manifest lists component {name!r} without {name}{suffix}")
    match = STEP_DIR.match(dir_name)
    if match and int(match.group(1)) != body.get("step"):
        raise CorruptCheckpoint(
            f"directory says step {int(match.group(1))}, manifest {body.get('step')}"
        )
    return Manifest(path=path, body=body)


def _matches(manifest: Manifest, file: str, size: int, digest: str) -> None:
    """CorruptCheckpoint unless a file's size and digest are the ones the manifest names."""
    entry = manifest.files[file]
    if size != entry["bytes"]:
        raise CorruptCheckpoint(f"{file} has {size} bytes, manifest says {entry['bytes']}")
    if digest != entry["digest"]:
        raise CorruptCheckpoint(f"{file} fails its {HASH_ALGORITHM} checksum")


def read_file(ckpt_dir: Path, manifest: Manifest, file: str) -> bytes:
    """A small file's bytes, checked against the manifest's size and checksum."""
    try:
        data = (ckpt_dir / file).read_bytes()
    except FileNotFoundError:
        raise CorruptCheckpoint(f"{file} is missing") from None
    _matches(manifest, file, len(data), digest_bytes(data))
    return data


def read_blob(ckpt_dir: Path, manifest: Manifest, file: str) -> torch.Tensor:
    """A tensor blob in one uint8 tensor, checked against the manifest's size and checksum."""
    entry = manifest.files[file]
    try:
        blob, digest = tensorfile.read_blob(ckpt_dir / file, entry["bytes"])
    except FileNotFoundError:
        raise CorruptCheckpoint(f"{file} is missing") from None
    except tensorfile.TensorFileError as exc:
        raise CorruptCheckpoint(str(exc)) from None
    if digest != entry["digest"]:
        raise CorruptCheckpoint(f"{file} fails its {HASH_ALGORITHM} checksum")
    return blob


def load_component(ckpt_dir: Path, manifest: Manifest, name: str) -> Any:
    """Verify a component's two files, then rebuild it (structure loaded with weights_only=True)."""
    structure = read_file(ckpt_dir, manifest, f"{name}.pt")
    blob = read_blob(ckpt_dir, manifest, f"{name}.bin")
    try:
        skeleton = torch.load(io.BytesIO(structure), map_location="cpu", weights_only=True)
        return tensorfile.rebuild(skeleton, blob)
    except Exception as exc:  # a checksummed file that still does not load is corrupt
        raise CorruptCheckpoint(f"{name} does not load: {type(exc).__name__}: {exc}") from None


def check_file(ckpt_dir: Path, manifest: Manifest, file: str) -> None:
    """A file checked against the manifest's size and checksum without holding it (a shard)."""
    try:
        size, digest = digest_file(ckpt_dir / file)
    except FileNotFoundError:
        raise CorruptCheckpoint(f"{file} is missing") from None
    _matches(manifest, file, size, digest)


def published(files: dict[str, dict]) -> dict[str, dict]:
    """The entries of a manifest's files that their ranks put in the bucket themselves
    (node-local disks, spot.checkpoint.parts)."""
    return {file: entry for file, entry in files.items() if PUBLISHED in entry}


def elsewhere(ckpt_dir: Path, manifest: Manifest) -> list[str]:
    """The files of a sharded checkpoint on node-local disks that are not in this directory
    because ranks on other nodes wrote them and put them in the bucket (spot.checkpoint.parts)."""
    return [file for file in published(manifest.files) if not (ckpt_dir / file).exists()]


def verify(ckpt_dir: Path, here: bool = False) -> Manifest:
    """Full check: the manifest and every file it names (`here`: but those `elsewhere`).
    Raises CorruptCheckpoint."""
    manifest = read(ckpt_dir)
    absent = set(elsewhere(ckpt_dir, manifest)) if here else set()
    for file in manifest.files:
        if file in absent:
            continue
        if is_shard_file(file):
            check_file(ckpt_dir, manifest, file)
        elif file.endswith(".bin"):
            read_blob(ckpt_dir, manifest, file)
        else:
            read_file(ckpt_dir, manifest, file)
    return manifest
