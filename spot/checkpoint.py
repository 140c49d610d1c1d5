"""Atomic, checksummed, optionally asynchronous checkpoints with keep-last-N retention.

A save writes every component into a temporary directory, fsyncs it, writes `manifest.json` last,
and renames the directory to `step-<9 digits>`: a reader sees a whole checkpoint or none.
Retention runs only after a new checkpoint is committed and never touches the one just written.
Loading verifies sizes and checksums before unpickling anything, with `weights_only=True`.
"""

from __future__ import annotations

import io
import logging
import os
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from spot import manifest
from spot.events import EventLog
from spot.failpoints import failpoint
from spot.fsutil import HashingWriter, fsync_dir, remove_tree, write_file_durably
from spot.manifest import MANIFEST, STEP_DIR, CorruptCheckpoint, Manifest, step_dir_name

log = logging.getLogger(__name__)


class CheckpointUnusable(Exception):
    """No checkpoint can be used and the run must stop (on_corrupt=fail, or another config)."""


class CheckpointWriteError(Exception):
    """A save failed (disk full, permissions...). The previous valid checkpoint is untouched."""


@dataclass
class LoadedCheckpoint:
    path: Path
    manifest: Manifest
    state: dict[str, Any]

    @property
    def step(self) -> int:
        return self.manifest.step


def snapshot(obj: Any) -> Any:
    """A host-memory copy of a state tree, so training can go on while it is written."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: snapshot(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(snapshot(v) for v in obj)
    return obj


def load_component(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def list_step_dirs(root: Path) -> list[tuple[int, Path]]:
    """Every `step-*` directory, newest first, committed or not."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name))]
    return sorted(found, reverse=True)


def config_difference(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested config dicts."""
    keys = sorted(set(saved) | set(current))
    diffs = []
    for key in keys:
        a, b = saved.get(key), current.get(key)
        dotted = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += config_difference(a, b, dotted + ".")
        elif a != b:
            diffs.append(f"{dotted}: {a!r} -> {b!r}")
    return diffs


def check_state_dict_compatible(saved: dict, live: dict, what: str = "model") -> None:
    """Refuse (before anything is loaded) a state dict whose keys or shapes differ from the live one."""
    missing = sorted(set(live) - set(saved))
    unexpected = sorted(set(saved) - set(live))
    shapes = [
        f"{k} {tuple(saved[k].shape)} vs {tuple(live[k].shape)}"
        for k in sorted(set(saved) & set(live))
        if isinstance(live[k], torch.Tensor) and tuple(saved[k].shape) != tuple(live[k].shape)
    ]
    if missing or unexpected or shapes:
        detail = "; ".join(
            part
            for part in (
                f"missing {missing[:3]}" if missing else "",
                f"unexpected {unexpected[:3]}" if unexpected else "",
                f"shape {shapes[0]}" if shapes else "",
            )
            if part
        )
        raise CheckpointUnusable(f"checkpoint {what} does not fit this {what}: {detail}")


class CheckpointManager:
    def __init__(
        self,
        root: Path,
        *,
        keep_last: int,
        async_save: bool,
        on_corrupt: str,
        events: EventLog,
        meta: dict[str, Any],
    ):
        """meta (config_digest, training_config, world_size, run) goes into every manifest."""
        self.root = Path(root)
        self.keep_last = keep_last
        self.on_corrupt = on_corrupt
        self.events = events
        self.meta = meta
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="ckpt") if async_save else None
        self._pending: Future | None = None
        self.last_committed_step: int | None = None
        self.last_persist_seconds: float | None = None

    # ---- saving ---------------------------------------------------------------------------

    def save(self, step: int, state: dict[str, Any], info: dict[str, Any]) -> float:
        """Checkpoint `state` at `step`; return the seconds the caller was blocked (the stall).

        Asynchronous: wait for the previous save, copy state to host memory, persist in the
        background. Synchronous: persist before returning. Either way a failure of an earlier
        background save is raised here as CheckpointWriteError.
        """
        start = time.perf_counter()
        self.wait()
        if self._executor is None:
            self._persist(step, state, info, start)
            return time.perf_counter() - start
        copy = snapshot(state)
        stall = time.perf_counter() - start
        self._pending = self._executor.submit(self._persist, step, copy, info, None, stall)
        return stall

    def wait(self) -> None:
        """Block until any background save has committed; raise its error if it failed."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def poll(self) -> None:
        """Raise a finished background save's error now, without waiting for a running one."""
        if self._pending is not None and self._pending.done():
            self.wait()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)

    def _persist(
        self, step: int, state: dict, info: dict, start: float | None, stall: float | None = None
    ) -> None:
        began = time.perf_counter()
        final = self.root / step_dir_name(step)
        tmp = self.root / f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            tmp.mkdir(parents=True)
            files = {}
            for name, obj in state.items():
                writer = HashingWriter(tmp / f"{name}.pt")
                try:
                    torch.save(obj, writer)
                finally:
                    digest = writer.close()
                files[name] = {"file": f"{name}.pt", "bytes": writer.bytes, "sha256": digest}
                failpoint("checkpoint.component_written", step)
            body = manifest.build(
                files, {**self.meta, **info, "step": step, "created": time.time()}
            )
            write_file_durably(tmp / MANIFEST, body)
            fsync_dir(tmp)
            if final.exists():  # an uncommitted or corrupt leftover at this step: never a valid one
                remove_tree(final)
            os.replace(tmp, final)
            fsync_dir(self.root)
        except Exception as exc:
            remove_tree(tmp)
            raise CheckpointWriteError(f"checkpoint at step {step} failed: {exc}") from exc
        persist = time.perf_counter() - began
        self.last_committed_step = step
        self.last_persist_seconds = persist
        if stall is None:
            stall = time.perf_counter() - start
        total = sum(f["bytes"] for f in files.values())
        self.events.emit(
            "checkpoint",
            step=step,
            path=str(final),
            bytes=total,
            stall_seconds=round(stall, 6),
            persist_seconds=round(persist, 6),
            **{k: info[k] for k in ("reason", "epoch") if k in info},
        )
        failpoint("checkpoint.committed", step)
        self._retain(step)

    def _retain(self, newest: int) -> None:
        """Keep the newest `keep_last` committed checkpoints; delete only ones older than `newest`."""
        committed = []
        for step, path in list_step_dirs(self.root):
            try:
                manifest.read(path)
                committed.append((step, path))
            except CorruptCheckpoint:
                continue
        keep = {step for step, _ in committed[: self.keep_last]} | {newest}
        for step, path in committed:
            if step < newest and step not in keep:
                remove_tree(path)

    def remove_stale(self) -> None:
        """Delete temporary directories left by a process killed mid-save. Call before training."""
        if self.root.is_dir():
            for path in self.root.iterdir():
                if path.name.startswith((".tmp-", ".trash-")):
                    remove_tree(path)

    # ---- loading --------------------------------------------------------------------------

    def load_latest(self, config_digest: str, training_config: dict) -> LoadedCheckpoint | None:
        """The newest checkpoint that verifies, loaded into memory; None if there is none.

        A corrupt one is reported and moved aside (on_corrupt=previous) or stops the run (fail).
        A valid one written by a different training config is refused: resuming it would
        silently train something else.
        """
        for step, path in list_step_dirs(self.root):
            try:
                loaded = self.load(path)
            except CorruptCheckpoint as exc:
                self.events.emit(
                    "corrupt_checkpoint_skipped", step=step, path=str(path), reason=str(exc)
                )
                log.warning("skipping checkpoint %s: %s", path.name, exc)
                if self.on_corrupt == "fail":
                    raise CheckpointUnusable(
                        f"checkpoint {path} is corrupt ({exc}); checkpoint.on_corrupt=fail"
                    ) from None
                self._quarantine(path)
                continue
            if loaded.manifest.get("config_digest") != config_digest:
                diffs = config_difference(
                    loaded.manifest.get("training_config", {}), training_config
                )
                raise CheckpointUnusable(
                    f"checkpoint {path} was written by a different training config "
                    f"({'; '.join(diffs[:4]) or 'digest differs'}); use another run.name/run.id "
                    "or restore the config"
                )
            return loaded
        return None

    @staticmethod
    def load(path: Path) -> LoadedCheckpoint:
        """Verify every file against the manifest, then unpickle with weights_only=True."""
        m = manifest.read(path)
        state = {}
        for name in m.components:
            data = manifest.read_component(path, m, name)
            try:
                state[name] = load_component(data)
            except Exception as exc:  # a checksummed file that still will not load is corrupt
                raise CorruptCheckpoint(
                    f"{name} does not load: {type(exc).__name__}: {exc}"
                ) from None
        return LoadedCheckpoint(path=path, manifest=m, state=state)

    def _quarantine(self, path: Path) -> None:
        """Move a corrupt checkpoint aside (kept for inspection), out of resume and retention."""
        target = path.with_name(f".corrupt-{path.name}-{uuid.uuid4().hex[:8]}")
        os.replace(path, target)
