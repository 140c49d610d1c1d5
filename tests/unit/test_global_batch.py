"""trainer.global_batch_size: one mechanism with keep_global_batch (spot/distributed/elastic.py)."""

from __future__ import annotations

import pytest

from spot.distributed import elastic
from spot.distributed.sampler import ResumableBatchSampler
from spot.run.config import ElasticConfig


@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
def test_a_global_batch_size_holds_at_any_world_size_with_the_config_lr(world_size):
    cfg = ElasticConfig(lr_scaling="linear", batch_policy="scale_lr")
    total = elastic.global_batch(cfg.batch_policy, 32, world_size, reference=2, fixed=128)
    assert total == 128
    assert elastic.lr_scale(cfg, world_size, reference=2, fixed=128) == 1.0
    samplers = [
        ResumableBatchSampler(4096, 32, seed=0, rank=r, world_size=world_size, global_batch=total)
        for r in range(world_size)
    ]
    plans = [s.current_plan() for s in samplers]
    assert sum(len(b) for plan in plans for b in plan) == 128  # the step's samples, once each
    assert len({i for plan in plans for b in plan for i in b}) == 128
    assert all(len(b) <= 32 for plan in plans for b in plan)  # the micro-batch bound
    assert samplers[0].steps_per_epoch() == 32


def test_keep_global_batch_is_the_same_mechanism():
    cfg = ElasticConfig(batch_policy="keep_global_batch")
    for world_size in (1, 2, 4):
        assert elastic.global_batch(cfg.batch_policy, 32, world_size, 4) == elastic.global_batch(
            "scale_lr", 32, world_size, 4, fixed=128
        )


def test_without_a_global_batch_size_scale_lr_follows_the_world_size():
    cfg = ElasticConfig(lr_scaling="linear", batch_policy="scale_lr")
    assert elastic.global_batch(cfg.batch_policy, 32, 3, 2) == 96
    assert elastic.lr_scale(cfg, 3, reference=2) == 1.5
