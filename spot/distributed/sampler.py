"""Exactly-once data order that survives restarts and world-size changes.

The order of an epoch's samples depends only on (seed, epoch). A step consumes the next
`global_batch` samples of that order (by default `world_size * batch_size`), rank r taking its
contiguous share, split into micro-batches of at most `batch_size` when the share is larger
(gradient accumulation). The position is one number, the samples of the epoch consumed so far: a
restart with any world size hands out exactly the rest, re-sharded over the ranks it has now, and
loads none of what it skips.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch


class ResumableBatchSampler:
    """A batch sampler for `DataLoader(batch_sampler=...)` that can be stopped and resumed.

    The training loop calls `advance()` after each optimizer step (not when a batch is fetched:
    a DataLoader prefetches ahead), and `next_epoch()` when the iterator is exhausted.
    """

    def __init__(
        self,
        dataset_size: int,
        batch_size: int,
        *,
        seed: int,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        global_batch: int | None = None,
        same_micro_batches: bool = False,
        groups: Sequence[int] | None = None,
        window: int = 1,
        partitions: int = 1,
    ):
        """`same_micro_batches`: every rank runs as many micro-batches per step as the rank
        with the largest share (FSDP2 gathers and reduce-scatters in every forward and backward,
        so the counts must match; DDP synchronizes once per step, and needs no padding).
        `groups`: the end of each run of consecutive indices stored together (a data set's
        shards); with it, the order streams (`shard_streams`): groups shuffled, samples shuffled
        within each `window` of consecutive groups. `partitions`: the groups dealt among this
        many streams, each step taking an equal part from each, in stream order: with as many
        nodes as partitions (or a divisor of it), a node's ranks read only their partitions'
        groups."""
        if dataset_size < 1 or batch_size < 1:
            raise ValueError(
                f"dataset_size={dataset_size} and batch_size={batch_size} must be >= 1"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.groups = list(groups) if groups else None
        if self.groups and (self.groups[-1] != dataset_size or window < 1):
            raise ValueError(
                f"groups end at {self.groups[-1]}, not {dataset_size}; window {window}"
            )
        if partitions < 1 or (partitions > 1 and partitions > len(self.groups or ())):
            raise ValueError(
                f"partitions={partitions}: from 1 up to the number of shards "
                f"({len(self.groups or ())}), and above 1 only in the shard order"
            )
        self.dataset_size = dataset_size
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.global_batch = global_batch or world_size * batch_size
        self.same_micro_batches = same_micro_batches
        self.window = window
        self.partitions = partitions
        self.epoch = 0
        self.taken = [0] * partitions  # the position: how far each stream has been read
        self._streams: tuple[int, list[torch.Tensor]] | None = None

    # ---- the epoch's order ------------------------------------------------------------------

    def epoch_streams(self, epoch: int) -> list[torch.Tensor]:
        """The epoch's samples as `partitions` streams, each read in order: a function of
        (seed, epoch) only, never of the world size."""
        if self._streams is not None and self._streams[0] == epoch:
            return self._streams[1]
        generator = None
        if self.shuffle:
            generator = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % 2**63)
        if self.groups:
            streams = shard_streams(self.groups, self.window, self.partitions, generator)
        elif generator is not None:
            streams = [torch.randperm(self.dataset_size, generator=generator)]
        else:
            streams = [torch.arange(self.dataset_size)]
        self._streams = (epoch, streams)
        return streams

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """The epoch's samples in the order steps of this global batch consume them (one
        partition: the same at any global batch)."""
        streams, taken, steps = self.epoch_streams(epoch), [0] * self.partitions, []
        while sum(taken) < self.dataset_size:
            step, taken = self._step(streams, taken)
            steps.append(step)
        return torch.cat(steps)

    def _step(self, streams: list[torch.Tensor], taken: list[int]):
        """The samples of the step that starts at position `taken`, and the position after it:
        near-equal parts of the global batch from each stream that has samples left, one
        stream's part after the other's."""
        left = [len(stream) - at for stream, at in zip(streams, taken, strict=True)]
        parts = _split(min(self.global_batch, sum(left)), left)
        pieces = [s[at : at + n] for s, at, n in zip(streams, taken, parts, strict=True) if n]
        step = torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.long)
        return step, [at + n for at, n in zip(taken, parts, strict=True)]

    # ---- a rank's part of a step ------------------------------------------------------------

    def micro_batches(self, share: torch.Tensor) -> list[list[int]]:
        """A share split into the fewest near-equal micro-batches of at most `batch_size`."""
        if len(share) == 0:
            return []
        return [part.tolist() for part in share.tensor_split(-(-len(share) // self.batch_size))]

    def _share(self, step: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous share of a step's samples. Shares differ by at most one
        sample; in an epoch's short last step a rank may get none."""
        return step.tensor_split(self.world_size)[self.rank]

    def _plan(self, step: torch.Tensor) -> list[list[int]]:
        """This rank's micro-batches of a step. A rank with no share (fewer samples than ranks
        in an epoch's short last step) gets the step's first sample as a stand-in: it must still
        run forward and backward to join DDP's all-reduce, and its loss is weighted 0
        (`elastic.accumulate_gradients`), so the sample counts once. With `same_micro_batches`,
        stand-ins follow a short share's micro-batches too."""
        plan = self.micro_batches(self._share(step)) or [step[:1].tolist()]
        if self.same_micro_batches:  # the largest share's count, stand-ins after this rank's
            largest = -(-len(step) // self.world_size)
            plan += [step[:1].tolist()] * (-(-largest // self.batch_size) - len(plan))
        return plan

    def _current_step(self) -> torch.Tensor:
        return self._step(self.epoch_streams(self.epoch), self.taken)[0]

    def current_plan(self) -> list[list[int]]:
        """This rank's micro-batches of the step the sampler's position is at."""
        return self._plan(self._current_step())

    def current_indices(self) -> list[int]:
        """This rank's indices of the step the sampler's position is at."""
        return self._share(self._current_step()).tolist()

    def step_size(self, consumed: int | None = None) -> int:
        """Samples of the epoch (all ranks together) that the step starting at `consumed` takes."""
        consumed = self.consumed if consumed is None else consumed
        return min(self.global_batch, self.dataset_size - consumed)

    def steps_per_epoch(self) -> int:
        return -(-self.dataset_size // self.global_batch)

    def remaining_plans(self) -> Iterator[list[list[int]]]:
        """This rank's plan (micro-batches) of each step left in the epoch, in order."""
        streams, taken = self.epoch_streams(self.epoch), self.taken
        while sum(taken) < self.dataset_size:
            step, taken = self._step(streams, taken)
            yield self._plan(step)

    def __iter__(self) -> Iterator[list[int]]:
        """Every micro-batch of this rank for the rest of the epoch, in step order."""
        for plan in self.remaining_plans():
            yield from plan

    def __len__(self) -> int:
        return sum(len(plan) for plan in self.remaining_plans())

    # ---- the position -------------------------------------------------------------------------

    @property
    def consumed(self) -> int:
        """Samples of the epoch consumed so far (all ranks together)."""
        return sum(self.taken)

    def advance(self) -> None:
        self.taken = self._step(self.epoch_streams(self.epoch), self.taken)[1]

    @property
    def epoch_finished(self) -> bool:
        return self.consumed >= self.dataset_size

    def next_epoch(self) -> None:
        self.epoch += 1
        self.taken = [0] * self.partitions

    def state_dict(self) -> dict:
        state = {
            "epoch": self.epoch,
            "consumed": self.consumed,
            "dataset_size": self.dataset_size,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "order": self.order_name,
        }
        if self.partitions > 1:
            state["taken"] = list(self.taken)
        return state

    @property
    def order_name(self) -> str:
        if not self.groups:
            return "uniform"
        name = f"shards:{len(self.groups)}x{self.window}"
        return f"{name}/{self.partitions}" if self.partitions > 1 else name

    def load_state_dict(self, state: dict) -> None:
        state = {"order": "uniform", **state}  # (checkpoints from before: uniform)
        for key in ("dataset_size", "seed", "shuffle", "order"):
            mine = self.order_name if key == "order" else getattr(self, key)
            if state[key] != mine:
                raise ValueError(
                    f"data position was saved with {key}={state[key]!r}, this run has "
                    f"{mine!r}: the remaining samples cannot be matched"
                )
        taken = [int(n) for n in state.get("taken", [state["consumed"]])]
        streams = self.epoch_streams(int(state["epoch"]))
        if (
            len(taken) != self.partitions
            or sum(taken) != state["consumed"]
            or not all(0 <= n <= len(s) for n, s in zip(taken, streams, strict=True))
        ):
            raise ValueError(
                f"data position {taken} does not fit {self.partitions} partition(s) and "
                f"{state['consumed']} samples consumed"
            )
        self.epoch = int(state["epoch"])
        self.taken = taken


def _split(total: int, left: list[int]) -> list[int]:
    """`total` samples taken from streams with `left` samples each: near-equal parts, one more
    from the streams with the most left where it does not divide (so the streams drain
    together); a stream short of its part gives the rest to the others."""
    parts = [0] * len(left)
    while total:
        open_ = [i for i, n in enumerate(left) if parts[i] < n]
        base, extra = divmod(total, len(open_))
        fuller = set(sorted(open_, key=lambda i: (parts[i] - left[i], i))[:extra])
        for i in open_:
            give = min(base + (i in fuller), left[i] - parts[i])
            parts[i] += give
            total -= give
    return parts


def shard_streams(
    ends: Sequence[int], window: int, partitions: int, generator: torch.Generator | None
) -> list[torch.Tensor]:
    """An epoch's order that streams: the groups (shards, ending at `ends`) in a random order,
    dealt in turn to `partitions` streams; in each stream, the samples of each `window` of
    consecutive groups in a random order among themselves (no generator: in index order). Each
    index in exactly one stream, a function of the generator's seed only, so exactly-once and
    resume at any world size hold as for a uniform order; a step then reads about `window`
    shards per partition, not nearly all of them."""
    starts = [0, *ends[:-1]]
    count = len(ends)
    groups = torch.randperm(count, generator=generator) if generator else torch.arange(count)
    groups = groups.tolist()
    streams = []
    for partition in range(partitions):
        mine, pieces = groups[partition::partitions], []
        for at in range(0, len(mine), window):
            block = torch.cat([torch.arange(starts[g], ends[g]) for g in mine[at : at + window]])
            if generator is not None:
                block = block[torch.randperm(len(block), generator=generator)]
            pieces.append(block)
        streams.append(torch.cat(pieces))
    return streams
