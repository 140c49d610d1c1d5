"""The elastic helpers: LR scaling, batch splits, gradient accumulation, and the collectives of
`spot.distributed.world.World` in real gloo process groups on loopback."""

from __future__ import annotations

import json
import math
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from spot.distributed import elastic
from spot.distributed import world as distributed
from spot.distributed.sampler import ResumableBatchSampler
from spot.distributed.world import World
from spot.run.config import ConfigError, ElasticConfig
from spot.run.schedule import warmup_cosine


def scheduler_at(step: int, lr: float = 0.1):
    param = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.SGD([param], lr=lr)
    scheduler = warmup_cosine(optimizer, total_steps=50, warmup_steps=5, min_ratio=0.1)
    for _ in range(step):
        optimizer.step()
        scheduler.step()
    return optimizer, scheduler


@pytest.mark.parametrize(
    "policy,rule,world,expected",
    [
        ("scale_lr", "linear", 4, 2.0),
        ("scale_lr", "sqrt", 8, 2.0),
        ("scale_lr", "none", 8, 1.0),
        ("keep_global_batch", "linear", 8, 1.0),
    ],
)
def test_lr_scale_rules(policy, rule, world, expected):
    cfg = ElasticConfig(batch_policy=policy, lr_scaling=rule)
    assert elastic.lr_scale(cfg, world, reference=2) == expected


def test_lr_scale_is_recomputed_not_compounded_and_survives_optimizer_load():
    optimizer, scheduler = scheduler_at(7)
    config_lrs = list(scheduler.base_lrs)
    schedule_value = scheduler.lr_lambdas[0](scheduler.last_epoch)
    elastic.apply_lr_scale(scheduler, config_lrs, 0.5)  # 2 ranks -> 1 (linear, reference 2)
    saved = optimizer.state_dict()  # a checkpoint taken at world size 1 holds the halved LR
    restored, scheduler2 = scheduler_at(0)
    restored.load_state_dict(saved)
    scheduler2.load_state_dict(scheduler.state_dict())
    elastic.apply_lr_scale(scheduler2, config_lrs, 1.5)  # then 3 ranks
    assert restored.param_groups[0]["lr"] == pytest.approx(0.1 * schedule_value * 1.5, rel=1e-15)
    restored.step()
    scheduler2.step()  # the schedule goes on from the scaled base, not from the loaded LR
    next_value = scheduler2.lr_lambdas[0](scheduler2.last_epoch)
    assert restored.param_groups[0]["lr"] == pytest.approx(0.1 * next_value * 1.5, rel=1e-15)


def test_scale_one_leaves_the_lr_bit_for_bit():
    optimizer, scheduler = scheduler_at(9)
    before = optimizer.param_groups[0]["lr"]
    elastic.apply_lr_scale(scheduler, list(scheduler.base_lrs), 1.0)
    assert optimizer.param_groups[0]["lr"] == before


def test_a_chainable_scheduler_cannot_be_scaled():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3)
    elastic.apply_lr_scale(scheduler, [0.1], 1.0)  # nothing to do: fine
    with pytest.raises(ConfigError, match="closed-form"):
        elastic.apply_lr_scale(scheduler, [0.1], 2.0)


def test_split_says_what_it_chose_when_not_divisible():
    sampler = ResumableBatchSampler(1000, 16, seed=0, rank=0, world_size=3, global_batch=64)
    split = elastic.describe_split(sampler)
    assert split["per_rank_samples"] == [22, 21, 21]
    assert split["micro_batches"] == [2, 2, 2]
    assert "not divisible by 3" in split["text"] and "1/64" in split["text"]
    assert [len(b) for b in sampler.current_plan()] == [11, 11]


def test_accumulated_micro_batches_give_the_full_batch_gradient():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    inputs, targets = torch.randn(5, 4), torch.tensor([0, 1, 2, 1, 0])

    def loss_fn(m, batch):
        x, y = batch
        return torch.nn.functional.cross_entropy(m(x), y)

    torch.nn.functional.cross_entropy(model(inputs), targets).backward()
    full = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    plan = [[0, 1, 2], [3, 4]]
    batches = iter([(inputs[i], targets[i]) for i in plan])
    total = elastic.accumulate_gradients(model, batches, plan, 5, 5, World(), loss_fn)
    for p, g in zip(model.parameters(), full, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-6, atol=1e-7)
    assert float(total) / 5 == pytest.approx(loss_fn(model, (inputs, targets)).item(), rel=1e-6)


# ---- real process groups --------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, out: str) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        TORCHELASTIC_RUN_ID="test",
    )
    world = distributed.join(10, 30, cuda=False)
    results = {"rank": world.rank, "world_size": world.world_size}

    # share(): the leader's state on every rank, views of one storage included.
    storage = torch.arange(12, dtype=torch.float32) * (rank + 1)  # differs per rank
    state = {
        "model": {"w": storage[:6].view(2, 3), "b": storage[6:8]},
        "opt": [torch.tensor([rank], dtype=torch.int64), {"lr": 0.1 * (rank + 1)}],
        "step": 7 * (rank + 1),
    }
    shared = world.share(state if world.is_leader else None)
    results["shared_w"] = shared["model"]["w"].tolist()
    results["shared_b"] = shared["model"]["b"].tolist()
    results["shared_opt"] = [shared["opt"][0].tolist(), shared["opt"][1]]
    results["shared_step"] = shared["step"]

    # agree(): true everywhere when any rank says so.
    results["agree"] = list(world.agree(rank == world_size - 1, False))
    results["gather"] = world.gather({"rank": rank})
    results["sum"] = world.sum(float(rank + 1))

    # DDP where the last rank has no share (an epoch's tail shorter than the world): it runs the
    # sampler's stand-in with weight 0 and the gradient is the mean over the 6 real samples.
    torch.manual_seed(0)
    model = world.wrap(torch.nn.Linear(4, 3), torch.device("cpu"))
    inputs, targets = torch.randn(6, 4), torch.tensor([0, 1, 2, 1, 0, 2])
    plan = [[0, 1, 2], [3, 4, 5], [0]][rank]  # rank 2: a stand-in
    share = 0 if rank == 2 else 3
    batches = iter([(inputs[plan], targets[plan])])

    def loss_fn(m, batch):
        return torch.nn.functional.cross_entropy(m(batch[0]), batch[1])

    elastic.accumulate_gradients(model, batches, [plan], share, 6, world, loss_fn)
    results["grad"] = model.module.weight.grad.flatten().tolist()
    reference = torch.nn.Linear(4, 3)
    reference.load_state_dict(model.module.state_dict())
    torch.nn.functional.cross_entropy(reference(inputs), targets).backward()
    results["reference_grad"] = reference.weight.grad.flatten().tolist()
    Path(out, f"rank-{rank}.json").write_text(json.dumps(results))
    distributed.exit_process(0)  # as train.py's workers end (see exit_process)


@pytest.mark.serial
def test_world_collectives_in_a_real_gloo_group(tmp_path):
    world_size = 3
    mp.start_processes(
        _worker,
        args=(world_size, free_port(), str(tmp_path)),
        nprocs=world_size,
        start_method="spawn",
    )
    results = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in range(world_size)]
    for r, res in enumerate(results):
        assert res["rank"] == r and res["world_size"] == world_size
        assert res["shared_w"] == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]  # rank 0's, bit for bit
        assert res["shared_b"] == [6.0, 7.0]
        assert res["shared_opt"] == [[0], {"lr": 0.1}] and res["shared_step"] == 7
        assert res["agree"] == [True, False]
        assert res["sum"] == 6.0
        for got, want in zip(res["grad"], res["reference_grad"], strict=True):
            assert math.isclose(got, want, rel_tol=1e-5, abs_tol=1e-7)
    assert results[0]["gather"] == [{"rank": r} for r in range(world_size)]
    assert results[1]["gather"] is None
