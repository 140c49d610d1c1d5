"""`manifest.json`: the commit marker of a checkpoint. A checkpoint without a valid one does not exist.

The manifest names every component file with its size and checksum, the step, epoch, world size,
config digest and library version, and carries a checksum of itself, so a flipped byte in the
manifest is caught like one in a component.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spot import __version__
from spot.fsutil import HASH_ALGORITHM, digest_bytes

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
    """files: {component: {"file": name, "bytes": n, "sha256": hex}}; meta: step, epoch, ..."""
    body = {
        "format": FORMAT_VERSION,
        "library_version": __version__,
        "hash": HASH_ALGORITHM,
        **meta,
        "components": files,
    }
    body["manifest_digest"] = _self_digest(body)
    return json.dumps(body, indent=1, sort_keys=True).encode()


@dataclass
class Manifest:
    path: Path
    body: dict

    @property
    def step(self) -> int:
        return int(self.body["step"])

    @property
    def components(self) -> dict[str, dict]:
        return self.body["components"]

    def __getitem__(self, key: str) -> Any:
        return self.body[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.body.get(key, default)

    @property
    def total_bytes(self) -> int:
        return sum(int(c["bytes"]) for c in self.components.values())


def read(ckpt_dir: Path) -> Manifest:
    """Parse and check the manifest itself (not yet the files it names)."""
    path = ckpt_dir / MANIFEST
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise CorruptCheckpoint("no manifest.json (never committed, or torn)") from None
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
    components = body.get("components")
    if not isinstance(components, dict):
        raise CorruptCheckpoint("manifest has no components")
    missing = [c for c in REQUIRED_COMPONENTS if c not in components]
    if missing:
        raise CorruptCheckpoint(f"manifest lacks component(s): {', '.join(missing)}")
    for name, entry in components.items():
        file = entry.get("file", "") if isinstance(entry, dict) else ""
        if not _SAFE_FILE.match(file) or file == MANIFEST:
            raise CorruptCheckpoint(f"component {name!r} names an unsafe file {file!r}")
    match = STEP_DIR.match(ckpt_dir.name)
    if match and int(match.group(1)) != body.get("step"):
        raise CorruptCheckpoint(
            f"directory says step {int(match.group(1))}, manifest {body.get('step')}"
        )
    return Manifest(path=path, body=body)


def read_component(ckpt_dir: Path, manifest: Manifest, name: str) -> bytes:
    """The component's bytes, checked against the manifest's size and checksum."""
    entry = manifest.components[name]
    path = ckpt_dir / entry["file"]
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CorruptCheckpoint(f"{entry['file']} is missing") from None
    if len(data) != int(entry["bytes"]):
        raise CorruptCheckpoint(
            f"{entry['file']} has {len(data)} bytes, manifest says {entry['bytes']}"
        )
    if digest_bytes(data) != entry[HASH_ALGORITHM]:
        raise CorruptCheckpoint(f"{entry['file']} fails its {HASH_ALGORITHM} checksum")
    return data


def verify(ckpt_dir: Path) -> Manifest:
    """Full check: the manifest and every file it names. Raises CorruptCheckpoint."""
    manifest = read(ckpt_dir)
    for name in manifest.components:
        read_component(ckpt_dir, manifest, name)
    return manifest
