"""Sharded checkpoints on node-local disks: each node keeps its ranks' shards on its own disk, and
the checkpoint meets in the bucket.

With trainer.strategy=fsdp and a run directory that is not the same on every node, no disk holds a
whole checkpoint. Each rank writes its shards on its own node (on rank 0's node, into the
directory rank 0 commits; on another node, into the step's directory there: a part, with no
manifest), then uploads them itself before it reports them to rank 0 (`Publisher.publish`: hashed
on the way, each object completed only once its bytes matched), so every node uploads in
parallel. Its report carries each object's identity (ETag; GCS: generation), which rank 0's
manifest records; rank 0's
uploader commits the checkpoint in the bucket only once it found each of those objects there,
that object with that size (spot.checkpoint.storage.RemoteStore.upload). Such a checkpoint exists
once its manifest is in the bucket.

On restore, rank 0 fetches the manifest and the small files, every rank the index (`.metadata`);
each rank then reads what its load needs (`ShardSource`) from its own disk where the copy there
matches the manifest (an unchanged world: its own file), and otherwise only those byte ranges,
from the bucket's object that the manifest names.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Collection
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from spot.buckets import BucketError, NotFound, PreconditionFailed
from spot.checkpoint.manifest import (
    MANIFEST,
    PUBLISHED,
    STEP_DIR,
    CorruptCheckpoint,
    step_dir_name,
)
from spot.checkpoint.upload import send_files
from spot.fsutil import digest_file, fsync_file, remove_tree
from spot.run.config import one_line


class Publisher:
    """One rank's way of getting its shards to the bucket, and where on its disk they stay.
    `own_disk`: this rank's node is not rank 0's (its run directory is another disk), so its
    shards go into the step's directory there, of which the newest `keep` are kept."""

    def __init__(self, store, root: Path, own_disk: bool, keep: int):
        self.store, self.root, self.own_disk, self.keep = store, Path(root), own_disk, keep

    def directory(self, tmp: Path, step: int) -> Path:
        """Where this rank writes its shards of `step`: rank 0's temporary directory on its
        node, the step's own directory on another."""
        return self.root / step_dir_name(step) if self.own_disk else tmp

    def publish(self, directory: Path, files: dict[str, dict], step: int) -> dict[str, dict]:
        """Upload this rank's files (their manifest entries: size, digest) from `directory`;
        return the entries with the identity of each object as the store created it."""
        store, name = self.store, step_dir_name(step)
        keys = {file: store.key(name, file) for file in files}
        identities = send_files(store.bucket, keys, directory, files)
        return {file: {**entry, PUBLISHED: identities[file]} for file, entry in files.items()}

    def prune(self, step: int) -> None:
        """After this rank wrote its shards of `step`. On another node's disk (there the bucket
        is the checkpoint; these copies only spare a download): keep the newest `keep` step
        directories up to `step` (a newer one may be another rank's next write). On rank 0's
        node: the older step directories without a manifest (parts, from a time this node was
        another). Every rank of the node may do it at once: a directory another rank removed
        first is gone, as intended."""
        steps = self._steps()
        if self.own_disk:
            older = sorted(s for s in steps if s[0] <= step)
            stale = [p for _, p in older[: -self.keep]]
        else:
            stale = [p for s, p in steps if s < step and not (p / MANIFEST).exists()]
        _remove(stale)

    def abandon_after(self, step: int) -> None:
        """At a restore from `step`, on another node's disk (one rank of the node, before any
        writes): the step directories past it, left by a history the restore abandoned (they
        would push out the new ones), and the leftovers of a time this node held rank 0."""
        if self.own_disk:
            leftovers = [p for p in self._listing() if p.name.startswith((".tmp-", ".download-"))]
            _remove([p for s, p in self._steps() if s > step] + leftovers)

    def _listing(self) -> list[Path]:
        return list(self.root.iterdir()) if self.root.is_dir() else []

    def _steps(self) -> list[tuple[int, Path]]:
        return [(int(m.group(1)), p) for p in self._listing() if (m := STEP_DIR.match(p.name))]


def _remove(paths: list[Path]) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):  # another rank of the node was first
            remove_tree(path)


def _matches(path: Path, entry: dict) -> bool:
    try:
        if path.stat().st_size != entry["bytes"]:
            return False
        return digest_file(path) == (entry["bytes"], entry["digest"])
    except FileNotFoundError:
        return False


class ShardSource:
    """Where one rank reads a checkpoint's shard files from, for DCP's load
    (spot.checkpoint.sharded.load): a file on this disk whose copy matches the manifest is read
    there; of any other, only the byte ranges this rank's load needs are read from the bucket,
    from the object the manifest names (conditional on its identity: the object whose bytes its writer
    checked before creating it), a few ranges in parallel. A rank's load also reads values
    other ranks wrote (DCP saves a value every rank holds, such as the optimizer's step, once):
    a few bytes of their files, not the files. `fetched`: the bytes read from the bucket, by
    file."""

    GAP = 2**20  # ranges closer than this are read in one request

    def __init__(self, store, directory: Path, step: int, files: dict[str, dict]):
        self.store, self.directory, self.step, self.files = store, directory, step, files
        self.fetched: dict[str, int] = {}
        self._here: dict[str, bool] = {}

    def whole(self, names: Collection[str]) -> None:
        """Whole files on this disk (the index every rank reads first), as `fetch` makes them."""
        for name in fetch(self.store, self.directory, self.step, self.files, names):
            self.fetched[name] = self.files[name]["bytes"]

    def __call__(self, needed: dict[str, list[tuple[int, int]]]) -> dict[str, dict]:
        """For `needed` ({file: [(offset, length), ...]}), the bytes of each range of each file
        not read from this disk: {file: {(offset, length): bytes}}. CorruptCheckpoint (one line)
        if one cannot be read as the manifest names it."""
        remote = {name: spans for name, spans in needed.items() if not self._is_here(name)}
        requests = [(name, *run) for name, spans in remote.items() for run in _runs(spans)]
        out: dict[str, dict] = {name: {} for name in remote}
        if not requests:
            return out
        with ThreadPoolExecutor(min(self.store.bucket.concurrency, len(requests))) as pool:
            for name, start, data, members in pool.map(lambda r: self._get(*r), requests):
                self.fetched[name] = self.fetched.get(name, 0) + len(data)
                for offset, length in members:
                    out[name][(offset, length)] = data[offset - start : offset - start + length]
        return out

    def _is_here(self, name: str) -> bool:
        if name not in self._here:
            entry = self.files.get(name)
            if entry is None:
                raise CorruptCheckpoint(
                    f"{name} is not in the manifest of {step_dir_name(self.step)}"
                )
            self._here[name] = _matches(self.directory / name, entry)
        return self._here[name]

    def _get(self, name: str, start: int, end: int, members: list) -> tuple:
        entry, store = self.files[name], self.store
        if end > entry["bytes"]:
            raise CorruptCheckpoint(f"{name}: a range past its {entry['bytes']} bytes")
        key = store.key(step_dir_name(self.step), name)
        for attempt in range(3):  # the client retries the request, not a body cut off mid-read
            try:
                data = store.bucket.get_range(key, start, end, entry.get(PUBLISHED))
                break
            except PreconditionFailed:
                raise CorruptCheckpoint(f"{name} in the bucket was written again since") from None
            except NotFound:
                raise CorruptCheckpoint(f"remote {name} is gone") from None
            except BucketError as exc:  # after the client's retries of the request
                if attempt == 2:
                    raise CorruptCheckpoint(f"remote {name} unreadable ({one_line(exc)})") from None
        if len(data) != end - start:
            raise CorruptCheckpoint(f"{name}: {len(data)} bytes where {end - start} were asked")
        return name, start, data, members


def _runs(spans: list[tuple[int, int]]) -> list[tuple[int, int, list]]:
    """(start, end, members): the ranges in order, those within GAP of each other together."""
    runs: list[tuple[int, int, list]] = []
    for offset, length in sorted(set(spans)):
        if runs and offset <= runs[-1][1] + ShardSource.GAP:
            start, end, members = runs[-1]
            runs[-1] = (start, max(end, offset + length), [*members, (offset, length)])
        else:
            runs.append((offset, offset + length, [(offset, length)]))
    return runs


def fetch(store, directory: Path, step: int, files: dict[str, dict], names: Collection[str]):
    """Make each of `names` (files of the manifest `files`) present in `directory` and matching
    its entry: a copy there that matches is used as it is; any other is downloaded from the
    bucket, checked, and renamed into place.
    Returns the names downloaded. CorruptCheckpoint (one line) if one cannot be."""
    directory.mkdir(parents=True, exist_ok=True)
    fetched = []
    for name in sorted(names):
        entry = files.get(name)
        if entry is None:
            raise CorruptCheckpoint(f"{name} is not in the manifest of {step_dir_name(step)}")
        target = directory / name
        if _matches(target, entry):
            continue
        part = directory / f".fetch-{name}-{uuid.uuid4().hex[:8]}"  # ranks of a node may race
        try:  # (a download takes no condition: the checksum below is the check)
            store.bucket.download(store.key(step_dir_name(step), name), part)
            if not _matches(part, entry):
                raise CorruptCheckpoint(f"{name} in the bucket does not match the manifest")
            fsync_file(part)
            os.replace(part, target)
        except BucketError as exc:  # after the client's retries
            raise CorruptCheckpoint(f"remote {name} unreadable ({one_line(exc)})") from None
        finally:
            part.unlink(missing_ok=True)
        fetched.append(name)
    return fetched
