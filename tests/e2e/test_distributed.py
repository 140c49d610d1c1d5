"""The collectives of `spot.distributed.world.World` in real gloo process groups on loopback. The
other elastic helpers (LR scaling, batch splits, gradient accumulation): tests/unit/."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from spot.distributed import elastic
from spot.distributed import world as distributed
from tests.helpers import free_port, gloo_world

# ---- real process groups --------------------------------------------------------------------


def _worker(rank: int, world_size: int, port: int, out: str) -> None:
    world = gloo_world(rank, world_size, port)
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
