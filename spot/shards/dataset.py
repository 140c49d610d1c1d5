"""A map-style data set over shards in a directory or a bucket (spot/shards/format.py), read
through a local cache of bounded size, with the shards of the coming steps fetched ahead.

`data=shards data.dataset.url=s3://bucket/prefix` (or gs://, az://, a directory). Indices are
global, so the resumable sampler, the ledger and every resume rule apply unchanged; what this adds
is where the bytes come from:

- **Cache.** Each shard is downloaded whole into `<cache_dir>/<data set digest>/`, checked
  against its index entry (size, xxh3) and renamed into place; a shard that does not match is
  fetched once more, then the run stops with one line naming it (`ShardError`). The cache stays
  under `cache_limit_gb`: after each fetch, the least recently used shards go, never one the
  coming steps need (`pinned`) nor the one just fetched.
- **Prefetch.** `prefetch(indices)` (the samples of this rank's next `prefetch_steps` steps, from
  the sampler: `prefetching`) pins their shards and fetches those not cached on background
  threads, in the order they are needed. A read of a shard not yet here waits for it (the data
  wait, `waited_seconds`).
- **Identity.** The index's digest: a data set rewritten in the bucket is other data, refused on
  resume (spot/run/data_identity.py).

DataLoader workers each get a copy (pickled without the client or threads) that reads the same
cache: a shard one of them fetched is there for all (atomic renames). So do the ranks of a node:
each process evicts only shards it used, never one any live reader of the directory pinned
(`.pins-<pid>-<n>` files), and fetches again a shard another one evicted.
"""

from __future__ import annotations

import errno
import itertools
import json
import logging
import os
import shutil
import threading
import time
import uuid
from bisect import bisect_right
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import islice
from pathlib import Path

from torch.utils.data import Dataset

from spot.buckets import BucketError, is_url, open_bucket, parse_url
from spot.fsutil import digest_file
from spot.shards.format import INDEX, ShardError, ShardFile, parse_index

log = logging.getLogger(__name__)
GiB = 2**30


class ShardedDataset(Dataset):
    def __init__(
        self,
        url: str,
        cache_dir: str = "~/.cache/spot-train/shards",
        cache_limit_gb: float = 10.0,
        prefetch_threads: int = 4,
        endpoint_url: str | None = None,
        region: str | None = None,
        account: str | None = None,
        transform: Callable | None = None,
    ):
        """`transform`: what each stored sample becomes (a data set that stores a compact form,
        `stored(i)`, names the function that expands it: conf/data/stdlib_shards.yaml)."""
        if not url:
            raise ValueError("url is not set: the shards' directory or s3://, gs://, az:// URL")
        self.url = url.rstrip("/")
        self.remote = {"endpoint_url": endpoint_url, "region": region, "account": account}
        self.prefetch_threads = prefetch_threads
        self.transform = transform
        self._bucket, self._prefix = None, ""
        body = self._read_index()
        self.index = parse_index(body, f"{self.url}/{INDEX}")
        self.shards = self.index["shards"]
        self._ends, total = [], 0
        for shard in self.shards:
            total += int(shard["samples"])
            self._ends.append(total)
        cache = Path(cache_dir).expanduser() / self.index["digest"][:32]
        self.cache = ShardCache(cache, int(cache_limit_gb * GiB), self._download, self.shards)
        self.cache.threads = prefetch_threads

    # ---- the data set -----------------------------------------------------------------------

    @property
    def identity(self) -> str:
        return f"shards:{self.index['digest']}"

    def __len__(self) -> int:
        return self.index["samples"]

    @property
    def shard_ends(self) -> list[int]:
        """The end of each shard's run of indices (data.order=shards orders by them)."""
        return list(self._ends)

    @property
    def fetched_bytes(self) -> int:
        """Downloaded by this process so far (the data/fetched_bytes metric)."""
        return self.cache.fetched_bytes

    @property
    def size_bytes(self) -> int:
        return sum(int(shard["bytes"]) for shard in self.shards)

    def locate(self, index: int) -> tuple[int, int]:
        """(shard number, sample number in it) of a global index."""
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} of {len(self)}")
        shard = bisect_right(self._ends, index)
        return shard, index - (self._ends[shard - 1] if shard else 0)

    def __getitem__(self, index: int):
        shard, number = self.locate(int(index))
        sample = self.cache.open(shard)[number]
        return sample if self.transform is None else self.transform(sample)

    def prefetch(self, indices: Iterable[int]) -> None:
        """Pin and fetch ahead the shards of `indices` (in the order they are needed)."""
        needed = list(dict.fromkeys(self.locate(int(i))[0] for i in indices))
        self.cache.prefetch(needed)

    # ---- where the bytes come from -----------------------------------------------------------

    def _bucket_of(self):
        if self._bucket is None:
            backend, name, self._prefix = parse_url(self.url)
            self._bucket = open_bucket(backend, name, **self.remote)
        return self._bucket

    def _read_index(self) -> bytes:
        if not is_url(self.url):
            try:
                return (Path(self.url).expanduser() / INDEX).read_bytes()
            except OSError as exc:
                raise ShardError(
                    f"data.dataset.url={self.url}: no {INDEX} ({exc.strerror})"
                ) from None
        bucket = self._bucket_of()
        try:
            return bucket.get(f"{self._prefix}/{INDEX}".lstrip("/"))[0]
        except BucketError as exc:
            raise ShardError(f"data.dataset.url={self.url}: {INDEX} unreadable ({exc})") from None

    def _download(self, name: str, target: Path) -> None:
        if not is_url(self.url):
            source = Path(self.url).expanduser() / name
            try:
                os.link(source, target)
            except OSError:  # another file system (or one without links): a copy
                shutil.copyfile(source, target)
            return
        self._bucket_of().download(f"{self._prefix}/{name}".lstrip("/"), target)

    def __getstate__(self):  # DataLoader workers: no client, no threads; they reopen them
        state = dict(self.__dict__)
        state["_bucket"] = None
        return state


class ShardCache:
    """Verified shards on local disk, at most `limit` bytes of them; `fetch(name, target)`
    downloads one."""

    def __init__(self, directory: Path, limit: int, fetch, shards: list[dict]):
        self.directory, self.limit, self.fetch, self.shards = directory, limit, fetch, shards
        self._numbers = {shard["name"]: number for number, shard in enumerate(shards)}
        self.directory.mkdir(parents=True, exist_ok=True)
        self.threads = 4
        self.pinned: set[int] = set()
        self.fetched_bytes = 0  # downloaded by this process
        self.waited_seconds = 0.0  # reads that waited for a fetch
        self._warned = False
        self._used: OrderedDict[int, None] = OrderedDict()  # verified here, least recent first
        self._open: dict[int, ShardFile] = {}
        self._pending: dict[int, Future] = {}
        self._locks: dict[int, threading.Lock] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._fresh()

    def __getstate__(self):
        state = dict(self.__dict__)
        state.update(_open={}, _pending={}, _locks={}, _lock=None, _pool=None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._fresh()

    def _fresh(self) -> None:
        """This process's own locks, threads and open files: a DataLoader worker forked while
        a prefetch thread held a lock would otherwise wait on it for ever."""
        self._pid = os.getpid()
        self._pins = self.directory / f".pins-{self._pid}-{next(_READERS)}"
        self._lock = threading.Lock()
        self._locks, self._pending, self._open, self._pool = {}, {}, {}, None

    def _here(self) -> None:
        if self._pid != os.getpid():
            self._fresh()

    def open(self, shard: int) -> ShardFile:
        self._here()
        opened = self._open.get(shard)
        if opened is None:
            began = time.perf_counter()
            try:
                opened = ShardFile(self._ensure(shard))
            except FileNotFoundError:  # another reader of the directory evicted it just now
                opened = ShardFile(self._ensure(shard))
            self.waited_seconds += time.perf_counter() - began
            self._open[shard] = opened
        with self._lock:
            self._used[shard] = None
            self._used.move_to_end(shard)
        return opened

    def prefetch(self, needed: list[int]) -> None:
        self._here()
        with self._lock:
            if set(needed) != self.pinned:
                self.pinned = set(needed)
                self._publish_pins()
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="shard-fetch")
            for shard in needed:
                done = self._pending.get(shard)
                if shard not in self._used and (done is None or done.done()):
                    self._pending[shard] = self._pool.submit(self._ensure, shard)

    def _ensure(self, shard: int) -> Path:
        """The shard's verified path here, fetched once: a reader asking for a shard a
        prefetch is fetching waits for that fetch (the shard's lock), never fetches it twice."""
        with self._lock:
            lock = self._locks.setdefault(shard, threading.Lock())
        with lock:
            return self._fetched(shard)

    def _fetched(self, shard: int) -> Path:
        entry = self.shards[shard]
        path = self.directory / entry["name"]
        known = shard in self._used and path.exists()  # (another reader may have evicted it)
        if known or (path.exists() and self._matches(path, entry)):
            with self._lock:
                self._used.setdefault(shard, None)
            return path
        for attempt in (1, 2):
            part = self.directory / f".fetch-{entry['name']}-{uuid.uuid4().hex[:8]}"
            try:
                self.fetch(entry["name"], part)
                if self._matches(part, entry):
                    os.replace(part, path)
                    break
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
        else:
            raise ShardError(
                f"shard {entry['name']} does not match its index (size or xxh3), downloaded twice"
            )
        with self._lock:
            self.fetched_bytes += entry["bytes"]
            self._used[shard] = None
        self._evict(keep=shard)
        return path

    @staticmethod
    def _matches(path: Path, entry: dict) -> bool:
        size, digest = digest_file(path)
        return size == entry["bytes"] and digest == entry["digest"]

    def _publish_pins(self) -> None:
        """What this reader's next steps need, for the other readers of the directory."""
        part = self._pins.with_name(f"{self._pins.name}.tmp")
        part.write_text(json.dumps(sorted(self.pinned)))
        os.replace(part, self._pins)

    def _pinned_elsewhere(self) -> set[int]:
        """The shards other live readers of the directory pinned (a dead one's pins go)."""
        pinned: set[int] = set()
        for path in self.directory.glob(".pins-*-*"):
            if path == self._pins or path.suffix == ".tmp":
                continue
            try:
                os.kill(int(path.name.split("-")[1]), 0)
            except ProcessLookupError:
                path.unlink(missing_ok=True)
                continue
            except (PermissionError, ValueError):
                pass  # alive, another user's
            try:
                pinned.update(json.loads(path.read_text()))
            except (OSError, ValueError):
                continue  # removed meanwhile
        return pinned

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
        live reader, nor `keep`. (A reader whose shard another evicted fetches it again.)"""
        with self._lock:
            on_disk = self._on_disk()
            total = sum(size for size, _ in on_disk.values())
            pinned = sum(self.shards[s]["bytes"] for s in self.pinned)
            if pinned > self.limit and not self._warned:
                self._warned = True
                log.warning(
                    "the shards of the next steps (%.0f MiB) exceed data.cache_limit_gb (%.0f "
                    "MiB): the cache holds them anyway; fewer data.prefetch_steps or a larger "
                    "limit",
                    pinned / 2**20,
                    self.limit / 2**20,
                )
            if total <= self.limit:
                return
            spared = {keep, *self.pinned, *self._pinned_elsewhere()}
            others = sorted((at, n) for n, (_, at) in on_disk.items() if n not in self._used)
            for shard in [*self._used, *(n for _, n in others)]:
                if total <= self.limit:
                    break
                if shard in spared or shard not in on_disk:
                    continue
                self._used.pop(shard, None)
                self._open.pop(shard, None)
                (self.directory / self.shards[shard]["name"]).unlink(missing_ok=True)
                total -= on_disk[shard][0]

    def cached_bytes(self) -> int:
        """The shards in the directory, every reader's."""
        return sum(size for size, _ in self._on_disk().values())


_READERS = itertools.count()  # tells apart the readers of one process (each data set's cache)


class DataUnavailable(RuntimeError):
    """The data's bucket is unreachable after the client's retries: retry later (exit 75)."""


def prefetching(sampler, dataset, steps: int) -> Iterator[list[int]]:
    """The sampler's micro-batches, and before each step's first, the shards of this rank's next
    `steps` steps asked for (a data set without `prefetch`: the sampler as it is)."""
    if not hasattr(dataset, "prefetch") or steps < 1:
        return sampler
    return _Prefetching(sampler, dataset, steps)


class _Prefetching:
    def __init__(self, sampler, dataset, steps: int):
        self.sampler, self.dataset, self.steps = sampler, dataset, steps

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[list[int]]:
        plans = self.sampler.remaining_plans()
        window = deque(islice(plans, self.steps))
        while window:
            self.dataset.prefetch(i for plan in window for batch in plan for i in batch)
            yield from window.popleft()
            window.extend(islice(plans, 1))
