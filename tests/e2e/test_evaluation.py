"""spot.evaluation.evaluate with real ranks (a gloo group of two processes on loopback): a notice
heard by one rank stops every rank within a round, whatever the split's length; the figures are
the same samples' at world size 1 and 2. In-process checks: tests/unit/test_evaluation.py; a
notice to one rank of a real train.py run: tests/e2e/test_training_features.py."""

from __future__ import annotations

import itertools
import json
import math
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from data.synthetic import SyntheticVectors
from spot.distributed import world as distributed
from spot.distributed.world import World
from spot.evaluation import evaluate
from tests.helpers import free_port, gloo_world
from tests.unit.test_evaluation import VAL, batch_fn, model

# name: (data set, batch size, max_batches); figures over the same samples at any world size.
FIGURES = {
    "subset": (VAL, 16, 3),  # the first 48 samples: 2 batches per rank at world size 2
    "uneven": (SyntheticVectors(33, 8, 3, split="val", train_size=200), 16, None),  # 2 and 1
}
LONG = (400, 4000)  # split lengths, in batches of one sample
NOTICE_AT = 3  # rank 1 hears the notice before its fourth batch


def long_split(length: int) -> SyntheticVectors:
    return SyntheticVectors(length, 8, 3, seed=1, split="val", train_size=200)


def figures(world: World) -> dict[str, dict | None]:
    return {
        name: evaluate(
            model(),
            data,
            batch_fn,
            world,
            batch_size=size,
            max_batches=most,
            interrupted=lambda: False,
        )
        for name, (data, size, most) in FIGURES.items()
    }


def stopped_by_a_notice(world: World, length: int) -> dict:
    """How many batches this rank evaluated in a split of `length` when rank 1 alone hears a
    notice before its (NOTICE_AT + 1)-th batch."""
    evaluated = itertools.count()
    calls = itertools.count()

    def counting(module, batch):
        next(evaluated)
        return batch_fn(module, batch)

    def heard() -> bool:
        return world.rank == 1 and next(calls) >= NOTICE_AT

    result = evaluate(
        model(),
        long_split(length),
        counting,
        world,
        batch_size=1,
        max_batches=None,
        interrupted=heard,
    )
    return {"figures": result, "batches": next(evaluated)}


def _worker(rank: int, world_size: int, port: int, out: str) -> None:
    world = gloo_world(rank, world_size, port)
    results = {"figures": figures(world)}
    results["stopped"] = {n: stopped_by_a_notice(world, n) for n in LONG}
    Path(out, f"rank-{rank}.json").write_text(json.dumps(results))
    distributed.exit_process(0)  # as train.py's workers end (see exit_process)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ranks")
    mp.start_processes(_worker, args=(2, free_port(), str(out)), nprocs=2, start_method="spawn")
    return [json.loads((out / f"rank-{r}.json").read_text()) for r in range(2)]


@pytest.mark.serial
def test_a_notice_to_one_rank_stops_every_rank_within_a_round_of_any_split(two_ranks):
    """Rank 1 hears it before batch 3 and evaluates no more; rank 0, which never hears it, stops
    after the batch it was computing (batch 3), in a split of 200 batches per rank as in one of
    2000. Both return no figures."""
    for n in LONG:
        rank0, rank1 = (r["stopped"][str(n)] for r in two_ranks)
        assert rank1 == {"figures": None, "batches": NOTICE_AT}
        assert rank0 == {"figures": None, "batches": NOTICE_AT + 1}


@pytest.mark.serial
def test_the_figures_at_two_ranks_are_those_at_one_over_the_same_samples(two_ranks):
    """eval.max_batches=3 of 16 is the first 48 samples at either world size; a split whose
    ranks have different numbers of batches (33 samples: 2 and 1) completes. The figures are
    equal up to the order of the float sums."""
    alone = figures(World())
    assert alone["subset"]["samples"] == 48 and alone["uneven"]["samples"] == 33
    for results in two_ranks:
        for name, one in alone.items():
            two = results["figures"][name]
            assert two["samples"] == one["samples"], name
            for key in ("loss", "accuracy"):
                assert math.isclose(two[key], one[key], rel_tol=1e-6), (name, key)


# ---- what agreeing on a stop every round costs: `python -m tests.e2e.test_evaluation` ----------


def _no_agreement(world: World, heard: bool):
    return lambda: heard  # each rank runs its own share, as before the ranks agreed


def _blocking_agreement(world: World, heard: bool):
    (stop,) = world.agree(heard)  # waited for before the batch, not overlapped with it
    return lambda: stop


def _bench_cases() -> dict:
    """name: (model, data set, batch size, batch_fn): the example's MLP and the GPT example's
    model on its block size, in eval batches of the training batch size and of one."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from models.gpt import GPT
    from models.mlp import MLP
    from train import eval_batch

    cpu = torch.device("cpu")
    vectors = SyntheticVectors(1024, 32, 10, split="val", train_size=4096)
    tokens = torch.randint(256, (128, 129), generator=torch.Generator().manual_seed(0))
    blocks = torch.utils.data.TensorDataset(tokens[:, :-1], tokens[:, 1:])

    def batch(module, b):
        return eval_batch(module, b, cpu)

    def on_a_device(module, b):  # a batch that leaves the CPU free for 2 ms, as a GPU's does
        time.sleep(0.002)
        return eval_batch(module, b, cpu)

    torch.manual_seed(0)
    mlp, gpt = MLP(32, 10), GPT()
    return {
        "mlp, batch 64": (mlp, vectors, 64, batch),
        "mlp, batch 1": (mlp, vectors, 1, batch),
        "gpt, batch 8": (gpt, blocks, 8, batch),
        "2 ms off-CPU": (mlp, vectors, 16, on_a_device),
    }


def _bench_worker(rank: int, world_size: int, port: int, out: str, repeats: int) -> None:
    from spot import evaluation

    torch.set_num_threads(1)  # a core per rank
    world = gloo_world(rank, world_size, port)
    overlapped = world.agree_later
    variants = {
        "agreed": overlapped,
        "blocking": lambda heard: _blocking_agreement(world, heard),
        "none": lambda heard: _no_agreement(world, heard),
    }
    seconds: dict = {}
    for case, (m, data, size, fn) in _bench_cases().items():
        rounds = evaluation.share(len(data), size, None, world)[1]
        seconds[case] = {"rounds": rounds}
        for repeat in range(repeats):
            names = list(variants)
            for name in names[repeat % 3 :] + names[: repeat % 3]:  # side by side, rotated
                world.agree_later = variants[name]  # this World only, in this process
                world.agree(False)  # start together
                began = time.perf_counter()
                evaluate(
                    m,
                    data,
                    fn,
                    world,
                    batch_size=size,
                    max_batches=None,
                    interrupted=lambda: False,
                )
                seconds[case].setdefault(name, []).append(time.perf_counter() - began)
    if world.is_leader:
        Path(out).write_text(json.dumps(seconds))
    distributed.exit_process(0)


def bench(repeats: int = 15) -> None:
    import statistics
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        out = Path(d, "seconds.json")
        mp.start_processes(
            _bench_worker,
            args=(2, free_port(), str(out), repeats),
            nprocs=2,
            start_method="spawn",
        )
        seconds = json.loads(out.read_text())
    print(f"2 gloo ranks on CPU, a thread each; median of {repeats} evaluations of the split")
    for case, by_variant in seconds.items():
        rounds = by_variant.pop("rounds")
        median = {k: statistics.median(v) for k, v in by_variant.items()}
        base = median["none"]
        print(
            f"{case:>14}, {rounds:3} rounds: none {base * 1e3:7.1f} ms; "
            + "; ".join(
                f"{k} {median[k] * 1e3:7.1f} ms ({(median[k] / base - 1) * 100:+5.1f}%, "
                f"{(median[k] - base) / rounds * 1e6:+5.0f} us/round)"
                for k in ("agreed", "blocking")
            )
        )


if __name__ == "__main__":
    bench()
