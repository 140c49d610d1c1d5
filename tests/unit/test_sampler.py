"""The resumable sampler: exactly-once within an epoch across stops and world-size changes."""

from __future__ import annotations

import bisect
import itertools

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from spot.distributed.sampler import ResumableBatchSampler


def samplers(n, batch, world, seed=0, **order):
    return [
        ResumableBatchSampler(n, batch, seed=seed, rank=r, world_size=world, **order)
        for r in range(world)
    ]


SHARDS = {"groups": [10, 25, 40, 52, 70, 81, 95, 103], "window": 2}  # shards of uneven sizes
PARTITIONS = {**SHARDS, "partitions": 3}  # streams of uneven lengths


def consume(group, steps):
    """Run `steps` steps on every rank; return the indices each step handed out."""
    seen = []
    iters = [iter(s) for s in group]
    for _ in range(steps):
        for it in iters:
            seen += next(it)
        for s in group:
            s.advance()
    return seen


def test_order_depends_only_on_seed_and_epoch():
    a, b = ResumableBatchSampler(100, 10, seed=3), ResumableBatchSampler(100, 10, seed=3)
    assert torch.equal(a.epoch_order(2), b.epoch_order(2))
    assert not torch.equal(a.epoch_order(2), a.epoch_order(3))
    assert not torch.equal(a.epoch_order(2), ResumableBatchSampler(100, 10, seed=4).epoch_order(2))


@pytest.mark.parametrize("order", [{}, SHARDS, PARTITIONS], ids=["uniform", "shards", "partitions"])
@pytest.mark.parametrize("before,after", [(1, 1), (2, 3), (4, 1), (3, 2)])
def test_exactly_once_across_world_size_change(before, after, order):
    n, batch = 103, 4  # not divisible: a short last step
    first = samplers(n, batch, before, **order)
    seen = consume(first, 5)
    state = first[0].state_dict()
    second = samplers(n, batch, after, **order)
    for s in second:
        s.load_state_dict(state)
    seen += [i for s in second for step in s for i in step]
    assert sorted(seen) == list(range(n))
    # And in the same global order as an uninterrupted single process.
    assert sorted(seen[: 5 * before * batch]) == sorted(
        first[0].epoch_order(0)[: 5 * before * batch].tolist()
    )


def test_resume_skips_without_loading_skipped_samples():
    loaded = []

    class Recording(TensorDataset):
        def __getitem__(self, i):
            loaded.append(i)
            return super().__getitem__(i)

    data = Recording(torch.arange(50))
    sampler = ResumableBatchSampler(50, 5, seed=0)
    sampler.load_state_dict({**sampler.state_dict(), "consumed": 40})
    batches = [b.tolist() for (b,) in DataLoader(data, batch_sampler=sampler)]
    assert len(batches) == 2 and len(loaded) == 10
    assert sorted(loaded) == sorted(sampler.epoch_order(0)[40:].tolist())


def test_epochs_advance_and_reshuffle():
    s = ResumableBatchSampler(10, 3, seed=1)
    first = [i for b in s for i in b]
    for _ in range(len(s)):
        s.advance()
    assert s.epoch_finished
    s.next_epoch()
    second = [i for b in s for i in b]
    assert sorted(first) == sorted(second) == list(range(10)) and first != second


def test_mismatched_data_is_refused():
    s = ResumableBatchSampler(10, 3, seed=1)
    with pytest.raises(ValueError, match="dataset_size"):
        s.load_state_dict({**s.state_dict(), "dataset_size": 11})


def test_a_rank_without_samples_gets_a_stand_in_that_is_not_consumed():
    # 7 samples, 3 ranks of 2: the second step has 1 sample, ranks 1 and 2 have none.
    group = samplers(7, 2, 3)
    for s in group:
        s.advance()
    assert [len(s.current_indices()) for s in group] == [1, 0, 0]
    first = group[0].current_indices()
    assert [s.current_plan() for s in group] == [[first], [first], [first]]
    assert [len(list(s)) for s in group] == [1, 1, 1]  # every rank fetches one micro-batch


def test_global_batch_larger_than_a_rank_is_split_into_micro_batches():
    s = ResumableBatchSampler(100, 8, seed=0, rank=1, world_size=2, global_batch=40)
    assert [len(b) for b in s.current_plan()] == [7, 7, 6]  # a share of 20, <= 8 each
    assert sorted(i for b in s.current_plan() for i in b) == sorted(s.current_indices())


def test_same_micro_batches_pads_a_short_share_with_stand_ins():
    """FSDP: every rank runs the largest share's count of micro-batches; the stand-ins come after
    the rank's own samples (which accumulate_gradients weights, the stand-ins 0)."""
    plans = [
        ResumableBatchSampler(
            130, 32, seed=0, rank=r, world_size=2, global_batch=65, same_micro_batches=True
        ).current_plan()
        for r in (0, 1)
    ]
    assert [len(p) for p in plans] == [2, 2]
    assert [len(m) for m in plans[0]] == [17, 16] and [len(m) for m in plans[1]] == [32, 1]
    ddp = ResumableBatchSampler(130, 32, seed=0, rank=1, world_size=2, global_batch=65)
    assert [len(m) for m in ddp.current_plan()] == [32]


def test_the_shard_order_reads_a_few_shards_per_step_and_depends_on_seed_and_epoch_only():
    """data.order=shards: a permutation of every index from (seed, epoch) alone, whose steps
    each read at most two windows' shards, where a uniform order's read nearly all of them."""
    ends = list(range(50, 5001, 50))  # 100 shards of 50
    a = ResumableBatchSampler(5000, 64, seed=1, groups=ends, window=4)
    b = ResumableBatchSampler(5000, 64, seed=1, groups=ends, window=4)
    order = a.epoch_order(3)
    assert torch.equal(order, b.epoch_order(3)) and not torch.equal(order, a.epoch_order(4))
    assert sorted(order.tolist()) == list(range(5000))
    uniform = ResumableBatchSampler(5000, 64, seed=1).epoch_order(3)

    def shards_per_step(o):
        return max(len({i // 50 for i in o[at : at + 64].tolist()}) for at in range(0, 5000, 64))

    assert shards_per_step(order) <= 8 < 30 < shards_per_step(uniform)


def test_a_position_saved_under_another_order_is_refused():
    shards = ResumableBatchSampler(103, 4, seed=0, **SHARDS)
    with pytest.raises(ValueError, match="order="):
        ResumableBatchSampler(103, 4, seed=0).load_state_dict(shards.state_dict())


def shards_read(group, ends) -> list[set[int]]:
    """The shards each of `group`'s ranks reads in an epoch."""
    read = [set() for _ in group]
    for rank, sampler in enumerate(group):
        for plan in sampler.remaining_plans():
            read[rank] |= {bisect.bisect_right(ends, i) for batch in plan for i in batch}
    return read


@pytest.mark.parametrize("nodes,share", [(4, 1 / 4), (2, 1 / 2), (1, 1.0)])
def test_with_partitions_a_node_reads_only_its_share_of_the_shards(nodes, share):
    """data.partitions=4: with 4 nodes (or 2: a divisor), each node's ranks read only the
    shards of their partitions in an epoch, 1/nodes of the data set, where one partition has
    every node read nearly every shard. Still every index once."""
    ends, per_node = list(range(40, 40 * 32 + 1, 40)), 2  # 32 shards of 40
    group = samplers(ends[-1], 8, nodes * per_node, seed=5, groups=ends, window=2, partitions=4)
    read = shards_read(group, ends)
    for node in range(nodes):
        mine = set().union(*read[node * per_node : (node + 1) * per_node])
        assert len(mine) == 32 * share, (node, sorted(mine))
    seen = [i for s in group for plan in s.remaining_plans() for b in plan for i in b]
    assert sorted(seen) == list(range(ends[-1]))
    single = samplers(ends[-1], 8, 4 * per_node, seed=5, groups=ends, window=2)
    whole = shards_read(single, ends)
    assert min(len(set().union(*whole[n * 2 : n * 2 + 2])) for n in range(4)) > 24


def test_partitions_need_shards_and_are_part_of_the_order():
    with pytest.raises(ValueError, match="partitions=2"):
        ResumableBatchSampler(103, 4, seed=0, partitions=2)
    with pytest.raises(ValueError, match="partitions=9"):
        ResumableBatchSampler(103, 4, seed=0, **{**SHARDS, "partitions": 9})
    two = ResumableBatchSampler(103, 4, seed=0, **PARTITIONS)
    with pytest.raises(ValueError, match="order="):
        ResumableBatchSampler(103, 4, seed=0, **SHARDS).load_state_dict(two.state_dict())


def test_what_a_world_size_change_costs_with_partitions():
    """data.partitions=4, 2 ranks a node, 64 shards: at 3 nodes (not a divisor of 4) a node reads
    half the shards, not a third; from 4 nodes to 3 at half the epoch, the nodes together fetch
    1.25 times the data set in that epoch (a node keeps its cache), 1.0 without the change."""
    ends = list(range(100, 6401, 100))

    def group(nodes, state=None):
        ranks = samplers(6400, 16, 2 * nodes, seed=1, groups=ends, window=4, partitions=4)
        for sampler in ranks if state else ():
            sampler.load_state_dict(state)
        return ranks

    def by_node(read):
        return [set().union(*read[n : n + 2]) for n in range(0, len(read), 2)]

    assert max(len(s) for s in by_node(shards_read(group(3), ends))) == 32
    four = group(4)
    half = four[0].steps_per_epoch() // 2
    before = by_node(shards_read([_Steps(s, half) for s in four], ends))
    for sampler in four:
        for _ in range(half):
            sampler.advance()
    after = by_node(shards_read(group(3, four[0].state_dict()), ends))
    fetched = sum(map(len, before)) + sum(
        len(a - b) for a, b in zip(after, before[:3], strict=True)
    )
    assert fetched == 80 and sum(map(len, by_node(shards_read(group(4), ends)))) == 64


class _Steps:
    """A sampler's first `steps` steps only."""

    def __init__(self, sampler, steps: int):
        self.sampler, self.steps = sampler, steps

    def remaining_plans(self):
        return itertools.islice(self.sampler.remaining_plans(), self.steps)


def test_partitions_drain_together_when_the_batch_does_not_divide():
    """A global batch of 10 over 4 partitions: the extra samples go to the streams with the
    most left, so no stream runs ahead (each node keeps reading its own shards to the end)."""
    ends = list(range(10, 401, 10))
    sampler = ResumableBatchSampler(400, 10, seed=0, groups=ends, window=2, partitions=4)
    for _ in range(35):
        sampler.advance()
        assert max(sampler.taken) - min(sampler.taken) <= 1, sampler.taken
    for taken in ([100, 100, 100, 60], [110, 100, 90, 50], [350]):  # sum, bounds, count
        with pytest.raises(ValueError, match="does not fit"):
            sampler.load_state_dict({**sampler.state_dict(), "taken": taken})
