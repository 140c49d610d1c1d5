"""A checkpoint named from outside the run: `init.checkpoint` (fine-tuning from another run's
weights) and `python -m spot export`. A step directory, a run or checkpoints directory (its
newest checkpoint that verifies), or a run URL in a bucket, `s3://`, `gs://` or `az://`
`bucket/prefix/<name>/<id>` (its newest remote checkpoint that downloads verified). Always verified before it is used.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from spot.buckets import is_url
from spot.checkpoint.manager import CheckpointManager, LoadedCheckpoint, list_step_dirs
from spot.checkpoint.manifest import STEP_DIR, CorruptCheckpoint
from spot.run.identity import RunPaths

log = logging.getLogger(__name__)


def load_named(spec: str, **remote) -> tuple[LoadedCheckpoint, str]:
    """The verified checkpoint `spec` names, and where it is (a path or URL); CorruptCheckpoint
    if none verifies. `remote`: a bucket URL's options (endpoint_url, region, account)."""
    if is_url(spec):
        return _load_remote(spec, remote)
    path = Path(spec)
    if not path.exists():
        raise CorruptCheckpoint(f"{spec} does not exist")
    if STEP_DIR.match(path.name):
        return CheckpointManager.load(path, whole=True), str(path)
    root = RunPaths.at(path).checkpoints if RunPaths.at(path).checkpoints.is_dir() else path
    for _step, step_dir in list_step_dirs(root):
        try:
            return CheckpointManager.load(step_dir, whole=True), str(step_dir)
        except CorruptCheckpoint as exc:
            log.warning("skipping %s: %s", step_dir, exc)
    raise CorruptCheckpoint(f"no checkpoint in {spec} verifies")


def _load_remote(url: str, remote: dict) -> tuple[LoadedCheckpoint, str]:
    from spot.checkpoint.storage import open_store

    store = open_store(url, **remote)
    store.check_access()
    with tempfile.TemporaryDirectory(prefix="spot-init-") as tmp:
        for step in sorted(store.committed_steps(), reverse=True):
            try:
                loaded = CheckpointManager.load(store.download(step, Path(tmp)), whole=True)
            except CorruptCheckpoint as exc:
                log.warning("skipping %s step %d: %s", url, step, exc)
                continue
            return loaded, f"{url.rstrip('/')}/{loaded.path.name}"  # the files can go: read
    raise CorruptCheckpoint(f"no checkpoint in {url} verifies")
