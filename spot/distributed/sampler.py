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
    ):
        """`same_micro_batches`: every rank runs as many micro-batches per step as the rank
        with the largest share (FSDP2 gathers and reduce-scatters in every forward and backward,
        so the counts must match; DDP synchronizes once per step, and needs no padding).
        `groups`: the end of each run of consecutive indices stored together (a data set's
        shards); with it, the order streams (`shard_order`): groups shuffled, samples shuffled
        within each `window` of consecutive groups."""
        if dataset_size < 1 or batch_size < 1:
            raise ValueError(
                f"dataset_size={dataset_size} and batch_size={batch_size} must be >= 1"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.dataset_size = dataset_size
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.global_batch = global_batch or world_size * batch_size
        self.same_micro_batches = same_micro_batches
        self.groups = list(groups) if groups else None
        if self.groups and (self.groups[-1] != dataset_size or window < 1):
            raise ValueError(
                f"groups end at {self.groups[-1]}, not {dataset_size}; window {window}"
            )
        self.window = window
        self.epoch = 0
        self.consumed = 0
        self._order: tuple[int, torch.Tensor] | None = None

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """The global order of the epoch's samples: a function of (seed, epoch) only."""
        if self._order is not None and self._order[0] == epoch:
            return self._order[1]
        if self.shuffle:
            generator = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % 2**63)
            if self.groups:
                order = shard_order(self.groups, self.window, generator)
            else:
                order = torch.randperm(self.dataset_size, generator=generator)
        else:
            order = torch.arange(self.dataset_size)
        self._order = (epoch, order)
        return order

    def rank_share(self, order: torch.Tensor, consumed: int) -> torch.Tensor:
        """This rank's indices of the step that starts at `consumed`. Shares differ by at most
        one sample; in an epoch's short last step a rank may get none."""
        step = order[consumed : consumed + self.step_size(consumed)]
        return step.tensor_split(self.world_size)[self.rank]

    def micro_batches(self, share: torch.Tensor) -> list[list[int]]:
        """A share split into the fewest near-equal micro-batches of at most `batch_size`."""
        if len(share) == 0:
            return []
        return [part.tolist() for part in share.tensor_split(-(-len(share) // self.batch_size))]

    def plan(self, order: torch.Tensor, consumed: int) -> list[list[int]]:
        """This rank's micro-batches of the step that starts at `consumed`. A rank with no share
        (fewer samples than ranks in an epoch's short last step) gets the step's first sample as
        a stand-in: it must still run forward and backward to join DDP's all-reduce, and its loss
        is weighted 0 (`elastic.accumulate_gradients`), so the sample counts once. With
        `same_micro_batches`, stand-ins follow a short share's micro-batches too."""
        share = self.rank_share(order, consumed)
        plan = self.micro_batches(share) or [order[consumed : consumed + 1].tolist()]
        if self.same_micro_batches:  # the largest share's count, stand-ins after this rank's
            largest = -(-self.step_size(consumed) // self.world_size)
            plan += [order[consumed : consumed + 1].tolist()] * (
                -(-largest // self.batch_size) - len(plan)
            )
        return plan

    def current_plan(self) -> list[list[int]]:
        """This rank's micro-batches of the step the sampler's position is at."""
        return self.plan(self.epoch_order(self.epoch), self.consumed)

    def current_indices(self) -> list[int]:
        """This rank's indices of the step the sampler's position is at."""
        return self.rank_share(self.epoch_order(self.epoch), self.consumed).tolist()

    def step_size(self, consumed: int | None = None) -> int:
        """Samples of the epoch (all ranks together) that the step starting at `consumed` takes."""
        consumed = self.consumed if consumed is None else consumed
        return min(self.global_batch, self.dataset_size - consumed)

    def steps_per_epoch(self) -> int:
        return -(-self.dataset_size // self.global_batch)

    def remaining_plans(self) -> Iterator[list[list[int]]]:
        """This rank's plan (micro-batches) of each step left in the epoch, in order."""
        order = self.epoch_order(self.epoch)
        position = self.consumed
        while position < self.dataset_size:
            yield self.plan(order, position)
            position += self.step_size(position)

    def __iter__(self) -> Iterator[list[int]]:
        """Every micro-batch of this rank for the rest of the epoch, in step order."""
        for plan in self.remaining_plans():
            yield from plan

    def __len__(self) -> int:
        return sum(len(plan) for plan in self.remaining_plans())

    def advance(self) -> None:
        self.consumed += self.step_size()

    @property
    def epoch_finished(self) -> bool:
        return self.consumed >= self.dataset_size

    def next_epoch(self) -> None:
        self.epoch += 1
        self.consumed = 0

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "consumed": self.consumed,
            "dataset_size": self.dataset_size,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "order": self.order_name,
        }

    @property
    def order_name(self) -> str:
        return f"shards:{len(self.groups)}x{self.window}" if self.groups else "uniform"

    def load_state_dict(self, state: dict) -> None:
        state = {"order": "uniform", **state}  # (checkpoints from before: uniform)
        for key in ("dataset_size", "seed", "shuffle", "order"):
            mine = self.order_name if key == "order" else getattr(self, key)
            if state[key] != mine:
                raise ValueError(
                    f"data position was saved with {key}={state[key]!r}, this run has "
                    f"{mine!r}: the remaining samples cannot be matched"
                )
        self.epoch = int(state["epoch"])
        self.consumed = int(state["consumed"])


def shard_order(ends: Sequence[int], window: int, generator: torch.Generator) -> torch.Tensor:
    """An epoch's order that streams: the groups (shards, ending at `ends`) in a random order,
    and the samples of each `window` of consecutive groups in a random order among themselves.
    A permutation of every index, a function of the generator's seed only, so exactly-once and
    resume at any world size hold as for a uniform order; a step then reads about `window`
    shards, not nearly all of them."""
    starts = [0, *ends[:-1]]
    groups = torch.randperm(len(ends), generator=generator).tolist()
    pieces = []
    for at in range(0, len(groups), window):
        block = torch.cat([torch.arange(starts[g], ends[g]) for g in groups[at : at + window]])
        pieces.append(block[torch.randperm(len(block), generator=generator)])
    return torch.cat(pieces)
