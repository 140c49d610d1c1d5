"""Atomic, checksummed, optionally asynchronous checkpoints with keep-last-N retention.

A save writes every component into a temporary directory, fsyncs it, writes `manifest.json` last,
and renames the directory to `step-<9 digits>`: a reader sees a whole checkpoint or none.
Retention runs only after a new checkpoint is committed and never touches the one just written.
Loading verifies sizes and checksums before unpickling anything, with `weights_only=True`.
With async_save the training loop only copies the state into a reused host buffer; writing,
fsyncing and committing happen in one background thread, at most one checkpoint in flight.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Collection
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from spot.checkpoint import manifest, sharded, tensorfile
from spot.checkpoint.manifest import MANIFEST, STEP_DIR, CorruptCheckpoint, Manifest, step_dir_name
from spot.checkpoint.sharded import SHARDED
from spot.checkpoint.tensorfile import SnapshotBuffer
from spot.failpoints import failpoint
from spot.fsutil import fsync_dir, lower_priority, remove_tree, write_file_durably
from spot.run.events import EventLog
from spot.tree import shape_misfit

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


def list_step_dirs(root: Path) -> list[tuple[int, Path]]:
    """Every `step-*` directory, newest first, committed or not."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name))]
    return sorted(found, reverse=True)


def committed_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """The `step-*` directories whose manifest reads (sizes and checksums not checked), newest
    first."""
    committed = []
    for step, path in list_step_dirs(root):
        try:
            manifest.read(path)
            committed.append((step, path))
        except CorruptCheckpoint:
            continue
    return committed


def config_difference(
    saved: dict, current: dict, prefix: str = "", added: dict | None = None
) -> list[str]:
    """Dotted keys whose values differ between two nested config dicts. With `added` (keys added
    to the template since, each at the value that trains as before it existed: the same shape),
    a key the saved config lacks that has that value (and type) here is no difference."""
    keys = sorted(set(saved) | set(current))
    diffs = []
    for key in keys:
        a, b = saved.get(key), current.get(key)
        dotted, was = f"{prefix}{key}", (added or {}).get(key)
        new = key not in saved and added is not None
        if isinstance(a, dict) and isinstance(b, dict):
            inner = was if isinstance(was, dict) else ({} if added is not None else None)
            diffs += config_difference(a, b, dotted + ".", inner)
        elif new and isinstance(b, dict) and isinstance(was, dict):
            diffs += config_difference({}, b, dotted + ".", was)
        elif new and key in added and b == was and type(b) is type(was):
            continue
        elif a != b:
            diffs.append(f"{dotted}: {a!r} -> {b!r}")
    return diffs


def check_state_dict_compatible(saved: dict, live: dict, what: str = "model") -> None:
    """Refuse (before anything is loaded) a state dict whose keys or shapes differ from the live one."""

    def shapes(state: dict) -> dict:
        return {
            k: tuple(v.shape) if isinstance(v, torch.Tensor) else None for k, v in state.items()
        }

    detail = shape_misfit(shapes(saved), shapes(live))
    if detail:
        raise CheckpointUnusable(f"checkpoint {what} does not fit this {what}: {detail}")


class SaveKind(enum.Enum):
    """What a save may do when the one before is still being written, or failed."""

    MAY_SKIP = "may skip"  # the interval's, a rebalance's: skipped while busy (when_busy=skip)
    MUST_COMMIT = "must commit"  # a best: never skipped; its own failure raised
    LAST = "last"  # final, emergency: must commit, and tried whatever became of the one before


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
        on_error: str = "stop",
        when_busy: str = "wait",
        remote=None,
        spared: Callable[[Collection[int], str], set[int]] = lambda _present, _place: set(),
        shards: sharded.ShardGroup | None = None,
    ):
        """meta (config_digest, training_config, world_size, run) goes into every manifest.
        remote: a spot.checkpoint.storage.RemoteCheckpoints (a restore looks there too, commits
        are copied there once `start_uploads()` is called), or None for local storage only.

        on_error: "stop" raises a failed save's error in the training loop; "continue" logs it,
        counts it and goes on (the previous checkpoint stays the newest). when_busy: "wait" makes a
        new checkpoint wait for the one in flight; "skip" skips it instead. spared(present, place):
        the steps a retention ("disk", "bucket") keeps whatever keep_last says, given the steps
        present there (spot.checkpoint.best.BestCheckpoint.spared).
        """
        self.root = Path(root)
        self.keep_last = keep_last
        self.on_corrupt = on_corrupt
        self.on_error = on_error
        self.when_busy = when_busy
        self.events = events
        self.meta = meta
        self._executor = (
            ThreadPoolExecutor(1, thread_name_prefix="ckpt", initializer=lower_priority)
            if async_save
            else None
        )
        self._buffer = SnapshotBuffer()
        self._pending: tuple[int, Future] | None = None
        self._copied: threading.Event | None = None
        self._copy_wait = 0.0
        self._measured: deque[tuple[int, float, float]] = deque()
        self.last_committed_step: int | None = None
        self.last_persist_seconds: float | None = None
        self.failures = 0
        self.skipped = 0
        self.remote = remote
        self._retain_lock = threading.Lock()
        self.spared = spared
        # Sharded checkpoints (trainer.strategy=fsdp): a manager on every rank, each writing its
        # own shards into the step's directory; rank 0's alone commits it.
        self.shards = shards

    @property
    def snapshot_bytes(self) -> int:
        """Host memory held for snapshots: one copy of the state (0 for synchronous saves)."""
        return self._buffer.nbytes

    # ---- saving ---------------------------------------------------------------------------

    def save(
        self,
        step: int,
        state: dict[str, Any],
        info: dict[str, Any],
        *,
        kind: SaveKind = SaveKind.MAY_SKIP,
        defer: Collection[str] = (),
    ) -> float | None:
        """Checkpoint `state` at `step`; return the seconds the caller was blocked so far, or
        None if skipped because the previous one is still being written (when_busy=skip).

        Asynchronous: wait for the previous save, copy the state into the snapshot buffer,
        persist in the background. Components named in `defer` (state that does not change until
        the next optimizer step) are copied in the background too, while training goes on: the
        caller must call `before_update()` before it changes them. Synchronous: persist before
        returning. `kind`: see SaveKind (a save that must commit is never skipped; its own
        failure is raised when it is collected: `wait()`).
        """
        start = time.perf_counter()
        must_commit = kind is not SaveKind.MAY_SKIP
        tmp = self.root / f".tmp-{step_dir_name(step)}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        if self.shards is None:
            verdict = self._admit(step, kind)
        else:  # every rank writes, or none: rank 0's verdict (a failure too), and its tmp name
            verdict, tmp = self.shards.share((self._admit_leading(step, kind), tmp))
            if isinstance(verdict, CheckpointWriteError):
                raise verdict
            if verdict == "write" and not self.commits:  # its own previous write is done
                self._collect(raise_it=False)
        if verdict == "skip":
            return None
        if verdict == "stands":
            return 0.0
        info = {**info, "requested_at": round(time.time(), 6)}
        state, specs = self._host_view(state)
        rest = {k: v for k, v in state.items() if specs is None or k not in SHARDED}
        if self._executor is None:
            try:
                live = lambda: sharded.as_dtensors({k: state[k] for k in SHARDED}, specs)  # noqa: E731
                shards = None if specs is None else live
                self._persist(step, tmp, tensorfile.direct(rest), info, start, shards=shards)
            except CheckpointWriteError as exc:
                raise_it = (must_commit or self.on_error == "stop") and self.commits
                self._failed(step, exc, raise_it=raise_it)
            return time.perf_counter() - start
        components, copy_deferred = self._buffer.capture(state, defer=() if must_commit else defer)
        copied = threading.Event()
        self._copied, self._copy_wait = copied, 0.0
        stall = time.perf_counter() - start

        def copy_then_persist() -> None:
            try:
                copy_deferred()
            finally:
                copied.set()

            def snapshot_shards() -> dict[str, Any]:  # as DTensors again, data in the snapshot
                copies = {
                    k: tensorfile.rebuild(components[k].skeleton, components[k].data)
                    for k in SHARDED
                }
                return sharded.as_dtensors(copies, specs, self.shards.host_mesh)

            shards = None if specs is None else snapshot_shards
            rest = {k: c for k, c in components.items() if specs is None or k not in SHARDED}
            self._persist(step, tmp, rest, info, None, stall, shards=shards)

        self._pending = (step, self._executor.submit(copy_then_persist))
        return stall

    def _admit(self, step: int, kind: SaveKind) -> str:
        """Rank 0's decision on a save at this step: "write", "skip" (the one before is still
        being written, when_busy=skip), or "stands" (this step is committed or being written)."""
        if kind is not SaveKind.MAY_SKIP:
            failpoint("checkpoint.must_commit", step)
            self._collect(raise_it=self._raises_previous(kind))
            if step == self.last_committed_step:  # an interval save at this step stands
                return "stands"
            return "write"
        if step == self._newest_step():  # one commit per step: the one in flight stands
            return "stands"
        busy = self._pending is not None and not self._pending[1].done()
        if busy and self.when_busy == "skip":
            self.skipped += 1
            self.events.emit("checkpoint_skipped", step=step, reason="previous still being written")
            return "skip"
        self._collect(raise_it=self._raises_previous(kind))
        return "write"

    def _admit_leading(self, step: int, kind: SaveKind) -> str | CheckpointWriteError | None:
        """`_admit` on rank 0 of a sharded save, its failure (the save before failed, with
        on_error=stop) returned to be shared, so that every rank raises it at this save; None
        on the other ranks, which follow rank 0."""
        if not self.commits:
            return None
        try:
            return self._admit(step, kind)
        except CheckpointWriteError as exc:
            return exc

    def _raises_previous(self, kind: SaveKind) -> bool:
        """Whether the failure of the save before this one stops the run now: by on_error,
        except before a last save (the work since the last good checkpoint is still to save)."""
        if kind is SaveKind.LAST:
            return False
        return self.on_error == "stop"

    @property
    def commits(self) -> bool:
        """This manager writes manifests (and retains, and uploads): not a shard writer of a
        rank other than 0."""
        return self.shards is None or self.shards.commits

    def _host_view(self, state: dict[str, Any]) -> tuple[dict[str, Any], list | None]:
        """What this manager writes of `state`, and, for a sharded checkpoint, how its local
        shards become DTensors again (spot.checkpoint.sharded.local_parts): rank 0 writes every
        component, another rank only its shards."""
        if self.shards is None:
            return state, None
        local, specs = sharded.local_parts({k: state[k] for k in SHARDED})
        rest = {k: v for k, v in state.items() if k not in SHARDED} if self.commits else {}
        return {**rest, **local}, specs

    def _newest_step(self) -> int | None:
        """The step of the checkpoint being written, else of the last one committed."""
        if self._pending is not None and self._pending[0] >= 0:
            return self._pending[0]
        return self.last_committed_step

    def before_update(self) -> float:
        """Wait until the background copy of deferred state is done (call before the optimizer
        step); return the seconds waited, which count as stall."""
        copied, self._copied = self._copied, None
        if copied is None or copied.is_set():
            return 0.0
        start = time.perf_counter()
        copied.wait()
        waited = time.perf_counter() - start
        self._copy_wait += waited
        return waited

    def prepare(self, state: dict[str, Any]) -> None:
        """Allocate the snapshot buffer for this state in the background, before it is needed."""
        if self._executor is not None and self._pending is None:
            state, _ = self._host_view(state)
            self._pending = (-1, self._executor.submit(self._buffer.reserve, state))

    def measurements(self) -> list[tuple[int, float, float]]:
        """(step, stall, persist seconds) of checkpoints committed since the last call."""
        done = []
        while self._measured:
            done.append(self._measured.popleft())
        return done

    def wait(self) -> None:
        """Block until any background save has committed; its failure is always raised. (A
        shard writer of a rank other than 0: until its shards are written and reported; rank 0
        commits after that.)"""
        self._collect(raise_it=True)

    def poll(self) -> None:
        """Handle a finished background save's failure now, without waiting for a running one."""
        if self._pending is not None and self._pending[1].done():
            self._collect(raise_it=self.on_error == "stop")

    def _collect(self, raise_it: bool) -> None:
        pending, self._pending = self._pending, None
        if pending is None:
            return
        step, future = pending
        try:
            future.result()
        except CheckpointWriteError as exc:  # a shard writer's failure reaches rank 0: it decides
            self._failed(step, exc, raise_it and self.commits)

    def _failed(self, step: int, exc: CheckpointWriteError, raise_it: bool) -> None:
        """Count and report a failed save; raise it (the caller decides: on_error, or a save
        that must commit) or go on with the next one."""
        self.failures += 1
        self.events.emit("checkpoint_failed", step=step, error=str(exc), failures=self.failures)
        if raise_it:
            raise exc
        log.warning("%s (training goes on; the next checkpoint is tried all the same)", exc)

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)

    def _persist(
        self,
        step: int,
        tmp: Path,
        components: dict[str, tensorfile.Component],
        info: dict,
        start: float | None,
        stall: float | None = None,
        shards: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        """Write into `tmp`, then commit as step-N: the manifest last. `shards`: makes the model
        and optimizer, which every rank writes into the same `tmp` together (rank 0 commits)."""
        began = time.perf_counter()
        final = self.root / step_dir_name(step)
        try:
            files = {}
            if shards is not None:  # (the persist failpoint and the directory: in write)
                files.update(self.shards.write(tmp, shards, step))
                failpoint("checkpoint.shards_written", step, rank=self.shards.rank)
                if not self.commits:
                    return
            else:
                failpoint("checkpoint.persist", step)
                tmp.mkdir(parents=True)
            for name, component in components.items():
                files.update(tensorfile.write_component(tmp, name, component))
                failpoint("checkpoint.component_written", step)
            meta = {**self.meta, **info, "step": step, "created": time.time()}
            if shards is not None:
                meta["sharded"] = list(SHARDED)
                meta.setdefault("world_size", self.shards.size)
                problem = sharded.layout_problem(tmp, files, self.shards.size)
                if problem:  # never a manifest for a checkpoint without every rank's part
                    raise sharded.ShardWriteError(problem)
            body = manifest.build(files, meta)
            write_file_durably(tmp / MANIFEST, body)
            fsync_dir(tmp)
            if final.exists() and self._kept_existing(final, step):
                remove_tree(tmp)
                return
            remove_tree(final)  # an uncommitted or corrupt leftover at this step, if any
            os.replace(tmp, final)
            fsync_dir(self.root)
        except Exception as exc:
            if self.commits:  # another rank's shards are rank 0's to clear
                with contextlib.suppress(OSError):
                    remove_tree(tmp)
            failpoint("checkpoint.write_failed", step)
            raise CheckpointWriteError(f"checkpoint at step {step} failed: {exc}") from exc
        persist = time.perf_counter() - began
        self.last_committed_step = step
        self.last_persist_seconds = persist
        if stall is None:
            stall = time.perf_counter() - start
        else:  # asynchronous: add the wait for the deferred copy (before_update), if any yet
            stall += self._copy_wait
        self._measured.append((step, stall, persist))
        total = sum(f["bytes"] for f in files.values())
        self.events.emit(
            "checkpoint",
            step=step,
            path=str(final),
            bytes=total,
            stall_seconds=round(stall, 6),
            persist_seconds=round(persist, 6),
            **{k: info[k] for k in ("reason", "epoch", "requested_at") if k in info},
        )
        failpoint("checkpoint.committed", step)
        if self.remote is not None:
            self.remote.committed(step)
        self.retain()

    def _kept_existing(self, path: Path, step: int) -> bool:
        """A verified checkpoint already committed at this step (by an earlier process) stays:
        replacing it would leave no checkpoint at all between the two renames. The state at a
        step is the same whoever saved it. (Not on node-local disks, sharded: there the ranks
        have just replaced their shards in the bucket, which the new manifest names.)"""
        if self.meets_in_bucket:
            return False
        try:
            manifest.verify(path)
        except CorruptCheckpoint:
            return False
        log.info("checkpoint %s is already committed and verifies: kept", path)
        self.last_committed_step = step
        return True

    def retain(self) -> None:
        """Keep the newest `keep_last` committed checkpoints. With a remote, also keep every one
        newer than the newest completely uploaded (it may exist only on this disk)."""
        with self._retain_lock:
            committed = committed_checkpoints(self.root)
            if not committed:
                return
            limit = committed[0][0]  # only ever delete ones older than the newest committed
            if self.remote is not None:
                limit = min(limit, self.remote.newest_uploaded() or -1)
            spared = self.spared({step for step, _ in committed}, "disk")
            for step, path in committed[self.keep_last :]:
                if step < limit and step not in spared:
                    remove_tree(path)

    def start_uploads(self):
        """Start copying every commit to the remote, if there is one; call it after the restore
        (see RemoteCheckpoints.start). Returns the Uploader, or None for local storage."""
        if self.remote is None:
            return None
        return self.remote.start(
            self.root, self.keep_last, lambda _step: self.retain(), self.spared
        )

    def remove_stale(self) -> None:
        """Delete temporary directories left by a process killed mid-save, mid-delete or
        mid-download. Call before training."""
        if self.root.is_dir():
            for path in self.root.iterdir():
                if path.name.startswith((".tmp-", ".trash-", ".download-")):
                    remove_tree(path)

    # ---- loading --------------------------------------------------------------------------

    def load_latest(
        self, config_digest: str, training_config: dict, added: dict | None = None
    ) -> LoadedCheckpoint | None:
        """The newest checkpoint that verifies, local or remote, loaded into memory; or None.

        A remote checkpoint newer than every local one is downloaded into the checkpoint
        directory, verified, and used. A corrupt one is reported and moved aside (local) or
        skipped (remote) with on_corrupt=previous, or stops the run (fail). A valid one written
        by a different training config is refused: resuming it would train something else
        (one whose only differences are keys `added` to the template since, at the values that
        train as before, is not).
        """
        # On node-local disks a sharded checkpoint is whole only in the bucket: each node's disk
        # holds its own ranks' shards, which the ranks read from there where they match.
        local = {} if self.meets_in_bucket else dict(list_step_dirs(self.root))
        remote = set(self.remote.committed_steps()) if self.remote is not None else set()
        if self.meets_in_bucket and self.remote.complete_commits(
            self.root, max(remote, default=-1)
        ):
            remote = set(self.remote.committed_steps())
        candidates = [(step, "local") for step in local] + [(step, "remote") for step in remote]
        candidates.sort(key=lambda c: (c[0], c[1] == "local"), reverse=True)
        for step, source in candidates:
            path = local.get(step) if source == "local" else None
            try:
                if path is None:
                    began = time.perf_counter()
                    path = self.remote.download(step, self.root, self.meets_in_bucket)
                    self.events.emit(
                        "download",
                        step=step,
                        url=f"{self.remote.url}/{step_dir_name(step)}/",
                        seconds=round(time.perf_counter() - began, 6),
                    )
                loaded = self.load(path)
                if self.meets_in_bucket:  # the shards each rank will read there: still those
                    self.remote.check_published(step, loaded.manifest.files)
            except CorruptCheckpoint as exc:
                if source == "local" and not path.exists():
                    continue  # deleted by retention since it was listed: gone, not corrupt
                where = (
                    str(path) if source == "local" else f"{self.remote.url}/{step_dir_name(step)}"
                )
                self.events.emit(
                    "corrupt_checkpoint_skipped",
                    step=step,
                    path=where,
                    source=source,
                    reason=str(exc),
                )
                log.warning("skipping checkpoint %s: %s", where, exc)
                if self.on_corrupt == "fail":
                    raise CheckpointUnusable(
                        f"checkpoint {where} is corrupt ({exc}); checkpoint.on_corrupt=fail"
                    ) from None
                if source == "local":
                    self._quarantine(path)
                continue
            saved = loaded.manifest.get("training_config", {})
            if loaded.manifest.get("config_digest") != config_digest:
                diffs = config_difference(saved, training_config, added=added)
                if saved and not diffs:
                    log.info("checkpoint %s: keys added since, at their old values", path)
                else:
                    raise CheckpointUnusable(
                        f"checkpoint {path} was written by a different training config "
                        f"({'; '.join(diffs[:4]) or 'digest differs'}); use another "
                        "run.name/run.id or restore the config"
                    )
            self.last_committed_step = step  # a save at this step again would be a copy
            if self.meets_in_bucket:
                self._abandon_newer(step)
            return loaded
        if self.meets_in_bucket:
            self._abandon_newer(-1)
        return None

    def _abandon_newer(self, step: int) -> None:
        """Node-local disks, sharded: a commit on this disk newer than the bucket's checkpoint
        just restored never became one (its upload could not be completed: see
        RemoteCheckpoints.complete_commits; the ranks' shards of it in the bucket are
        overwritten as training reaches its step again). Removed, so that it is neither
        uploaded nor kept in place of the new one."""
        for newer, path in list_step_dirs(self.root):
            if newer > step:
                log.info("%s: never committed in the bucket; removed", path)
                remove_tree(path)

    @property
    def meets_in_bucket(self) -> bool:
        """Sharded checkpoints on node-local disks (spot.checkpoint.parts): committed in the
        bucket, the only place that holds every rank's shards."""
        return self.shards is not None and self.shards.publisher is not None

    @staticmethod
    def load(path: Path, whole: bool = False) -> LoadedCheckpoint:
        """Verify every file against the manifest, then rebuild each component. A sharded
        checkpoint's model and optimizer are left to the ranks that read their shards (those
        its ranks published, spot.checkpoint.parts, each rank checks as it reads them), unless
        `whole`: then they are gathered here, unsharded (export, inspect, init.checkpoint)."""
        m = manifest.read(path)
        elsewhere = set() if whole else set(manifest.elsewhere(path, m))
        shards = [f for f in m.files if sharded.is_shard_file(f) and f not in elsewhere]
        if shards:  # one reader thread per file (up to 8): the read and xxh3 release the GIL
            with ThreadPoolExecutor(min(8, len(shards)), thread_name_prefix="verify") as pool:
                list(pool.map(lambda file: manifest.check_file(path, m, file), shards))
        if m.sharded and (problem := sharded.layout_problem(path, m.files, m.get("world_size", 1))):
            raise CorruptCheckpoint(problem)
        state = {name: manifest.load_component(path, m, name) for name in m.components}
        if whole and m.sharded:
            try:
                state.update(sharded.load_full(path))
            except sharded.ShardReadError as exc:  # checksummed files that do not load: corrupt
                raise CorruptCheckpoint(str(exc)) from None
        return LoadedCheckpoint(path=path, manifest=m, state=state)

    def _quarantine(self, path: Path) -> None:
        """Move a corrupt checkpoint aside (kept for inspection), out of resume and retention."""
        target = path.with_name(f".corrupt-{path.name}-{uuid.uuid4().hex[:8]}")
        with contextlib.suppress(FileNotFoundError):  # retention got to it first
            os.replace(path, target)
