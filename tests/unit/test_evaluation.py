"""spot.evaluation.evaluate, in-process: figures over the split, and training left untouched.
With real ranks (a notice heard by one, the same samples at any world size):
tests/e2e/test_evaluation.py."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data.synthetic import SyntheticVectors
from spot.checkpoint import rng
from spot.distributed.world import World
from spot.evaluation import evaluate, share
from tests.helpers import assert_bitwise_equal

VAL = SyntheticVectors(100, 8, 3, seed=0, split="val", train_size=200)


def batch_fn(model, batch):
    x, y = batch
    logits = model(x)
    return {
        "loss": F.cross_entropy(logits, y, reduction="sum"),
        "accuracy": (logits.argmax(1) == y).sum(),
    }


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.Dropout(0.5), torch.nn.Linear(16, 3)
    )


def test_the_figures_are_means_over_the_whole_split_in_eval_mode():
    m = model()
    figures = evaluate(
        m, VAL, batch_fn, World(), batch_size=32, max_batches=None, interrupted=lambda: False
    )
    m.eval()
    with torch.no_grad():
        logits = m(VAL.x)
    assert figures["samples"] == 100
    assert abs(figures["loss"] - F.cross_entropy(logits, VAL.y).item()) < 1e-6  # no dropout
    assert figures["accuracy"] == (logits.argmax(1) == VAL.y).sum().item() / 100


def test_training_state_and_rng_are_untouched():
    m = model()
    m.train()
    before = ({k: v.clone() for k, v in m.state_dict().items()}, torch.get_rng_state())
    evaluate(m, VAL, batch_fn, World(), batch_size=16, max_batches=2, interrupted=lambda: False)
    assert m.training  # back in training mode
    assert_bitwise_equal(before[0], m.state_dict(), "model")
    assert torch.equal(before[1], torch.get_rng_state())  # dropout drew nothing from it


def test_max_batches_limits_the_samples():
    figures = evaluate(
        model(), VAL, batch_fn, World(), batch_size=16, max_batches=2, interrupted=lambda: False
    )
    assert figures["samples"] == 32


def test_an_interruption_stops_it_with_no_figures():
    seen = []

    def interrupted() -> bool:
        seen.append(1)
        return len(seen) > 2  # a notice arrives during the third batch's wait

    assert (
        evaluate(
            model(),
            VAL,
            batch_fn,
            World(),
            batch_size=16,
            max_batches=None,
            interrupted=interrupted,
        )
        is None
    )
    assert len(seen) == 3  # it stopped at once, not after the split's 7 batches


class Augmented(torch.utils.data.Dataset):
    """VAL with noise drawn from Python's `random`, numpy and torch, as crops and jitter do."""

    def __len__(self) -> int:
        return len(VAL)

    def __getitem__(self, index: int):
        x, y = VAL[index]
        noise = random.gauss(0, 0.01) + np.random.normal(0, 0.01) + 0.01 * torch.randn(())
        return x + float(noise), y


def test_every_rng_a_checkpoint_captures_is_untouched():
    before = rng.capture()
    evaluate(
        model(),
        Augmented(),
        batch_fn,
        World(),
        batch_size=16,
        max_batches=None,
        interrupted=lambda: False,
    )
    assert_bitwise_equal(before, rng.capture(), "rng")


@pytest.mark.parametrize("max_batches", [None, 3])
@pytest.mark.parametrize("length", [0, 1, 33, 100])
def test_the_subset_is_the_same_at_every_world_size_and_every_rank_runs_the_same_rounds(
    length, max_batches
):
    """`max_batches` counts batches over all ranks: the union of the ranks' shares is the same
    first samples at any world size; the rounds every rank runs are the most batches any has."""
    subset = list(range(length if max_batches is None else min(length, max_batches * 16)))
    for world_size in (1, 2, 3, 5):
        shares = [share(length, 16, max_batches, World(r, world_size)) for r in range(world_size)]
        assert sorted(i for indices, _ in shares for i in indices) == subset
        rounds = {r for _, r in shares}
        assert rounds == {max(-(-len(indices) // 16) for indices, _ in shares)}
