"""A map-style data set over shards in a directory or a bucket (spot/shards/format.py), read
through a local cache of bounded size, with the shards of the coming steps fetched ahead.

`data=shards data.dataset.url=s3://bucket/prefix` (or gs://, az://, a directory). Indices are
global, so the resumable sampler, the ledger and every resume rule apply unchanged; what this adds
is where the bytes come from:

- **Cache** (spot/shards/cache.py). Each shard is downloaded whole into
  `<cache_dir>/<data set digest>/`, checked against its index entry (size, xxh3) and renamed
  into place; a shard that does not match is fetched once more, then the run stops with one line
  naming it (`ShardError`). The cache stays under `cache_limit_gb`: after each fetch, the least
  recently used shards go, never one the coming steps need (`pinned`) nor the one just fetched.
- **Prefetch.** `prefetch(indices)` (the samples of this rank's next `prefetch_steps` steps, from
  the sampler: `prefetching`) pins their shards and fetches those not cached on background
  threads, in the order they are needed. A read of a shard not yet here waits for it (the data
  wait, `waited_seconds`).
- **Identity.** The index's digest: a data set rewritten in the bucket is other data, refused on
  resume (spot/run/data_identity.py).

DataLoader workers each get a copy (pickled without the client or threads) that reads the same
cache, and so do the ranks of a node (spot/shards/cache.py: one fetch per shard on the node,
never evicting what another live reader pinned).
"""

from __future__ import annotations

import copy
import os
import shutil
from bisect import bisect_right
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from pathlib import Path

from torch.utils.data import Dataset

from spot.buckets import BucketError, is_url, open_bucket, parse_url
from spot.shards.cache import ShardCache
from spot.shards.format import INDEX, ShardError, parse_index

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
        self.cache = ShardCache(
            cache, int(cache_limit_gb * GiB), self._download, self.shards, prefetch_threads
        )

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
                try:
                    os.link(source, target)
                except OSError:  # another file system (or one without links): a copy
                    shutil.copyfile(source, target)
            except FileNotFoundError:
                raise ShardError(f"shard {name} is missing from {self.url}") from None
            return
        self._bucket_of().download(f"{self._prefix}/{name}".lstrip("/"), target)

    def __getstate__(self):  # DataLoader workers: no client, no threads; they reopen them
        state = dict(self.__dict__)
        state["_bucket"] = None
        return state


def prefetching(sampler, dataset, steps: int, in_flight: int = 0) -> Iterator[list[int]]:
    """The sampler's micro-batches, and before each step's first, the shards of this rank's next
    `steps` steps asked for, into the next epoch's first ones at the end of this one; those of
    the last `in_flight` micro-batches handed out stay pinned (DataLoader workers read them
    after the sampler has moved on: num_workers x prefetch_factor). A data set without
    `prefetch`: the sampler as it is."""
    if not hasattr(dataset, "prefetch") or steps < 1:
        return sampler
    return _Prefetching(sampler, dataset, steps, in_flight)


class _Prefetching:
    def __init__(self, sampler, dataset, steps: int, in_flight: int):
        self.sampler, self.dataset, self.steps, self.in_flight = sampler, dataset, steps, in_flight

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[list[int]]:
        plans = self.sampler.remaining_plans()
        window = deque(islice(plans, self.steps))
        handed: deque[list[int]] = deque(maxlen=self.in_flight)  # (0: keeps none)
        following: list | None = None  # the next epoch's first plans, once this one runs short
        while window:
            ahead = list(window)
            if len(ahead) < self.steps:
                following = following if following is not None else self._next_epoch()
                ahead += following[: self.steps - len(ahead)]
            plans_needed = [list(handed), *ahead]  # (handed: micro-batches, as a plan is)
            self.dataset.prefetch(i for plan in plans_needed for batch in plan for i in batch)
            for batch in window.popleft():
                handed.append(batch)
                yield batch
            window.extend(islice(plans, 1))

    def _next_epoch(self) -> list:
        after = copy.copy(self.sampler)  # (its position and order are replaced, not mutated)
        after.next_epoch()
        return list(islice(after.remaining_plans(), self.steps))
