"""The data wait: how long the training loop waited for its batches, and what the data set
downloaded meanwhile. A step that waits for data is a GPU paid for and idle; with a data set in
a bucket (data=shards) it says whether the prefetch keeps up with the bandwidth."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator


class DataWait:
    """Batches from each epoch's loader, timed in `next()`, since the last `take()`."""

    def __init__(self):
        self._seconds = 0.0
        self._dataset = None
        self._fetched_before = 0  # the data set's count at the last take()

    def over(self, loader: Iterable) -> Iterator:
        """The loader's batches; the time each took to arrive is counted."""
        dataset = getattr(loader, "dataset", None)
        if dataset is not self._dataset:
            self._dataset = dataset
            self._fetched_before = self._fetched()
        return self._timed(iter(loader))

    def _timed(self, batches: Iterator) -> Iterator:
        while True:
            began = time.perf_counter()
            try:
                batch = next(batches)
            except StopIteration:
                return
            finally:
                self._seconds += time.perf_counter() - began
            yield batch

    def _fetched(self) -> int:
        # A data set that downloads (spot/shards/dataset.py) counts the bytes this process
        # fetched; a DataLoader worker's own fetches, on a prefetch miss, are its own.
        return int(getattr(self._dataset, "fetched_bytes", 0))

    def take(self) -> tuple[float, int]:
        """(seconds waited, bytes fetched) since the last take."""
        fetched = self._fetched()
        seconds, self._seconds = self._seconds, 0.0
        fetched, self._fetched_before = fetched - self._fetched_before, fetched
        return seconds, fetched
