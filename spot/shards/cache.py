"""The local cache of a sharded data set: verified shards on disk, at most `limit` bytes of
them, shared by every process that reads the same directory (the ranks of a node and their
DataLoader workers).

- **Fetch.** A shard is downloaded to a temporary name, checked against its index entry (size,
  xxh3) and renamed into place; one that does not match is fetched once more, then `ShardError`
  (one line). One fetch per shard on the node: threads of a process wait on the shard's lock,
  processes on a lock file (`.lock-<k>`, one of 1024 stripes), and find the file there after it.
- **Evict.** After each fetch, until the directory is under the limit: the shards this process
  used, least recently first, then any other (another process's, or an earlier one's), oldest
  first; never one the coming steps of any live reader need (`pinned`), nor the one just
  fetched. A shard another process evicted is fetched again when needed; a process forgets
  (and unmaps) shards no longer on disk, so their blocks are freed.
- **Readers.** Each process publishes what it pinned (`.pins-<id>`), and holds `.alive-<id>`
  locked while it lives: a reader whose lock is free is gone, and its pins with it. Locks, not
  process ids, and ids with a random part: containers with their own pid namespaces cannot
  mistake each other.

The directory must be on a node-local disk: on NFS, flock is emulated with per-process POSIX
locks (two threads of a process would both hold a stripe) and a shard another node deleted
faults the mapping that reads it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
import zlib
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from spot.buckets import BucketError
from spot.fsutil import digest_file
from spot.shards.format import ShardError, ShardFile

log = logging.getLogger(__name__)
STRIPES = 1024  # lock files for fetches across processes (never removed: a removed lock file
# would let two processes each lock their own)


class DataUnavailable(RuntimeError):
    """The data's bucket is unreachable after the client's retries: retry later (exit 75)."""


class ShardCache:
    """`fetch(name, target)` downloads one shard; `shards` are the index's entries; `threads`
    fetch ahead."""

    def __init__(
        self, directory: Path, limit: int, fetch: Callable, shards: list[dict], threads: int = 4
    ):
        self.directory, self.limit, self.fetch, self.shards = directory, limit, fetch, shards
        self._numbers = {shard["name"]: number for number, shard in enumerate(shards)}
        self.directory.mkdir(parents=True, exist_ok=True)
        self.threads = threads  # fetching ahead
        self.pinned: set[int] = set()
        self.fetched_bytes = 0  # downloaded by this process
        self.waited_seconds = 0.0  # reads that waited for a fetch
        self._warned = False
        self._used: OrderedDict[int, None] = OrderedDict()  # verified here, least recent first
        self._fresh()
        _remove_stale(self.directory)

    def __getstate__(self):
        state = dict(self.__dict__)
        state.update(_open={}, _pending={}, _locks={}, _lock=None, _pool=None, _readers=None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._fresh()

    def _fresh(self) -> None:
        """This process's own locks, threads, open files and name among the readers: a
        DataLoader worker forked while a prefetch thread held a lock would otherwise wait on it
        for ever."""
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._locks: dict[int, threading.Lock] = {}
        self._pending: dict[int, Future] = {}
        self._open: dict[int, ShardFile] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._readers = Readers(self.directory)

    def _here(self) -> None:
        if self._pid != os.getpid():
            self._fresh()

    def _path(self, shard: int) -> Path:
        return self.directory / self.shards[shard]["name"]

    # ---- reading --------------------------------------------------------------------------

    def open(self, shard: int) -> ShardFile:
        self._here()
        opened = self._open.get(shard)
        if opened is None:
            self._forget_evicted()
            began = time.perf_counter()
            for attempt in range(1, 4):
                try:
                    opened = ShardFile(self._ensure(shard))
                    break
                except FileNotFoundError:  # another reader evicted it just now: fetch again
                    if attempt == 3:
                        raise
            self.waited_seconds += time.perf_counter() - began
            self._open[shard] = opened
        with self._lock:
            self._used[shard] = None
            self._used.move_to_end(shard)
        return opened

    def prefetch(self, needed: list[int]) -> None:
        """Pin `needed` (in the order the coming steps read them) and fetch on background
        threads those not here."""
        self._here()
        with self._lock:
            if set(needed) != self.pinned:
                self.pinned = set(needed)
                self._readers.publish(self.pinned)
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="shard-fetch")
            for shard in needed:
                done = self._pending.get(shard)
                here = shard in self._used and self._path(shard).exists()
                if not here and (done is None or done.done()):
                    self._pending[shard] = self._pool.submit(self._ensure, shard)

    def _forget_evicted(self) -> None:
        """Drop (and unmap) the shards another process evicted: a mapping would keep their
        blocks on the disk."""
        with self._lock:
            for shard in [s for s in self._used if not self._path(s).exists()]:
                self._used.pop(shard)
                self._open.pop(shard, None)

    # ---- fetching ---------------------------------------------------------------------------

    def _ensure(self, shard: int) -> Path:
        """The shard's verified path here, fetched once: a thread asking for a shard another
        is fetching waits for it (the shard's lock); so does a process (`Readers.fetching`)."""
        with self._lock:
            lock = self._locks.setdefault(shard, threading.Lock())
        with lock:
            entry, path = self.shards[shard], self._path(shard)
            if self._present(shard):
                return path
            with self._readers.fetching(entry["name"]):
                if self._present(shard):  # another process fetched it meanwhile
                    return path
                self._download(entry, path)
            with self._lock:
                self.fetched_bytes += entry["bytes"]
                self._used[shard] = None
            self._evict(keep=shard)
            return path

    def _present(self, shard: int) -> bool:
        path, entry = self._path(shard), self.shards[shard]
        if shard in self._used and path.exists():
            return True
        try:
            if not (path.exists() and _matches(path, entry)):
                return False
        except FileNotFoundError:  # evicted by another reader while being checked
            return False
        with self._lock:
            self._used.setdefault(shard, None)
        return True

    def _download(self, entry: dict, path: Path) -> None:
        for attempt in (1, 2):
            part = self.directory / f".fetch+{self._readers.announce()}+{uuid.uuid4().hex[:8]}"
            try:
                self.fetch(entry["name"], part)
                if _matches(part, entry):
                    os.replace(part, path)
                    return
                log.warning(
                    "shard %s does not match its index (attempt %d)", entry["name"], attempt
                )
            except BucketError as exc:
                raise DataUnavailable(f"shard {entry['name']} unreachable: {exc}") from None
            except OSError as exc:
                if exc.errno == errno.ENOSPC:
                    raise ShardError(
                        f"the shard cache {self.directory} is on a full disk"
                    ) from None
                raise
            finally:
                part.unlink(missing_ok=True)
        raise ShardError(
            f"shard {entry['name']} does not match its index (size or xxh3), downloaded twice"
        )

    # ---- evicting ---------------------------------------------------------------------------

    def _on_disk(self) -> dict[int, tuple[int, float]]:
        """The shards in the directory, every reader's: {number: (bytes, when fetched)}."""
        found = {}
        for entry in os.scandir(self.directory):
            number = self._numbers.get(entry.name)
            if number is not None:
                try:
                    stat = entry.stat()
                except FileNotFoundError:
                    continue
                found[number] = (stat.st_size, stat.st_mtime)
        return found

    def _evict(self, keep: int) -> None:
        """Until the directory is under the limit: the shards this reader used, least recently
        first, then the others' (or an earlier process's), oldest first; never one pinned by any
        live reader, nor `keep`."""
        with self._lock:
            on_disk = self._on_disk()
            for shard in [s for s in self._used if s not in on_disk]:  # evicted by another
                self._used.pop(shard)
                self._open.pop(shard, None)
            total = sum(size for size, _ in on_disk.values())
            self._warn_if_pinned_exceed_the_limit()
            if total <= self.limit:
                return
            spared = {keep, *self.pinned, *self._readers.pinned_elsewhere()}
            others = sorted((at, n) for n, (_, at) in on_disk.items() if n not in self._used)
            for shard in [*self._used, *(n for _, n in others)]:
                if total <= self.limit:
                    break
                if shard in spared:
                    continue
                self._used.pop(shard, None)
                self._open.pop(shard, None)
                self._path(shard).unlink(missing_ok=True)
                total -= on_disk[shard][0]

    def _warn_if_pinned_exceed_the_limit(self) -> None:
        pinned = sum(self.shards[s]["bytes"] for s in self.pinned)
        if pinned > self.limit and not self._warned:
            self._warned = True
            log.warning(
                "the shards of the next steps (%.0f MiB) exceed data.cache_limit_gb (%.0f MiB): "
                "the cache holds them anyway; fewer data.prefetch_steps or a larger limit",
                pinned / 2**20,
                self.limit / 2**20,
            )

    def cached_bytes(self) -> int:
        """The shards in the directory, every reader's."""
        return sum(size for size, _ in self._on_disk().values())


def _matches(path: Path, entry: dict) -> bool:
    size, digest = digest_file(path)
    return size == entry["bytes"] and digest == entry["digest"]


def _remove_stale(directory: Path) -> None:
    """Temporary files of readers gone (killed mid-download, or writing its pins): each is
    named after its reader (`+<id>+`), whose `.alive-<id>` lock is free once it is gone. (Not
    by age: a download hard-linked from a local data set keeps its source's old mtime.)"""
    for path in directory.glob(".*+*+*"):
        if not _lives(directory / f".alive-{path.name.split('+')[1]}"):
            path.unlink(missing_ok=True)
    for alive in directory.glob(".alive-*"):  # (a reader that fetched but never pinned)
        if not _lives(alive):
            (directory / f".pins-{alive.name[len('.alive-') :]}").unlink(missing_ok=True)
            alive.unlink(missing_ok=True)


class Readers:
    """This process among the readers of a cache directory: what it pinned, for the others;
    what the live others pinned; a lock per stripe of shards while one is fetched."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self._alive = None  # the locked file that says this reader lives (from its first need)

    def publish(self, pinned: set[int]) -> None:
        part = self.directory / f".pins+{self.announce()}+tmp"
        part.write_text(json.dumps(sorted(pinned)))
        os.replace(part, self.directory / f".pins-{self.id}")

    def announce(self) -> str:
        """This reader's id, `.alive-<id>` locked by this process while it lives (created
        locked: its lock is taken on the open file before the name appears, so no other reader
        sees it unlocked and takes it for a gone reader's)."""
        if self._alive is None:
            part = self.directory / f".new-alive-{self.id}"  # (not a temporary file's name)
            alive = open(part, "wb")  # noqa: SIM115 (held open, locked, for the process's life)
            fcntl.flock(alive, fcntl.LOCK_EX)
            os.replace(part, self.directory / f".alive-{self.id}")
            self._alive = alive
        return self.id

    def pinned_elsewhere(self) -> set[int]:
        """The shards the other live readers pinned; a gone reader's files are removed."""
        pinned: set[int] = set()
        for path in self.directory.glob(".pins-*"):
            other = path.name[len(".pins-") :]
            if other == self.id:
                continue
            if not _lives(self.directory / f".alive-{other}"):
                path.unlink(missing_ok=True)
                (self.directory / f".alive-{other}").unlink(missing_ok=True)
                continue
            try:
                shards = json.loads(path.read_text())
                pinned.update(int(s) for s in shards)
            except (OSError, ValueError, TypeError):
                continue  # replaced or removed meanwhile
        return pinned

    @contextmanager
    def fetching(self, name: str):
        """Hold the lock of `name`'s stripe: one process fetches a shard, the others wait."""
        stripe = zlib.crc32(name.encode()) % STRIPES
        with open(self.directory / f".lock-{stripe}", "ab") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


def _lives(alive: Path) -> bool:
    """Whether the reader of `alive` still holds its lock (a missing file: gone)."""
    try:
        with open(alive, "rb") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(handle, fcntl.LOCK_UN)
            return False
    except FileNotFoundError:
        return False
