"""The elastic helpers: LR scaling, batch splits, gradient accumulation. The collectives of
`spot.distributed.world.World` in real gloo process groups: tests/e2e/test_distributed.py."""

from __future__ import annotations

import os

import pytest
import torch

from spot.distributed import elastic
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


def test_the_environment_handed_to_forked_workers(monkeypatch):
    """What the agent set or removed since its forkserver started (hydra.job.env_set, a user's
    CUDA_VISIBLE_DEVICES) reaches its forked workers; torch's per-worker keys stay torch's."""
    from spot.distributed import launch

    monkeypatch.setenv("KEPT_AWAY", "1")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(launch, "_forkserver_environment", dict(os.environ))
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "lo")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,0")
    monkeypatch.setenv("RANK", "7")
    monkeypatch.delenv("KEPT_AWAY")
    handed = launch.handed_down()
    assert handed["NCCL_SOCKET_IFNAME"] == "lo" and handed["CUDA_VISIBLE_DEVICES"] == "1,0"
    assert handed["KEPT_AWAY"] is None and "RANK" not in handed


def _join_as_an_agents_worker(rank: int, env: dict, results) -> None:
    os.environ.update(env, RANK=str(rank), LOCAL_RANK=str(rank))
    from spot.distributed import world as distributed

    distributed.join(10, 30, cuda=False)
    total = torch.tensor([float(rank + 1)])
    torch.distributed.all_reduce(total)
    results.put((rank, total.item()))
    torch.distributed.destroy_process_group()


def test_one_node_workers_meet_though_their_master_port_was_taken(tmp_path):
    """torch's agent picks MASTER_PORT by binding port 0 and closing it; any connection on the
    machine may take that port before worker rank 0 listens on it. One node's workers (spot's
    agent) meet without a port, so a port taken meanwhile (held here) does not stop them."""
    import multiprocessing
    import socket

    from spot.distributed.recovery import NOTES_ENV
    from spot.distributed.world import AGENT_PID_ENV

    with socket.create_server(("127.0.0.1", 0)) as taken:
        env = {
            "WORLD_SIZE": "2",
            "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(taken.getsockname()[1]),
            "TORCHELASTIC_RUN_ID": "port-taken",
            "TORCHELASTIC_RESTART_COUNT": "0",
            AGENT_PID_ENV: str(os.getpid()),
            NOTES_ENV: str(tmp_path / "notes"),
        }
        context = multiprocessing.get_context("spawn")
        results = context.Queue()
        workers = [
            context.Process(target=_join_as_an_agents_worker, args=(rank, env, results))
            for rank in range(2)
        ]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(60)
        assert [worker.exitcode for worker in workers] == [0, 0]
        assert sorted(results.get(timeout=5) for _ in workers) == [(0, 3.0), (1, 3.0)]
