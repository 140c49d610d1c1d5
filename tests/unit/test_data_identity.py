"""A data set's identity (spot/run/data_identity.py): declared by the data set, recorded in the
checkpoint, a resume on other data refused. Across real gloo ranks and through train.py:
tests/e2e/test_data_identity.py."""

from __future__ import annotations

import pytest
import torch

from spot.checkpoint.manager import CheckpointUnusable
from spot.checkpoint.state import TrainingState
from spot.distributed.sampler import ResumableBatchSampler
from spot.distributed.world import World
from spot.run.config import ConfigError
from spot.run.data_identity import check_same_data, identity_of


def training_state(data_identity: str | None, step: int = 0) -> TrainingState:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    sampler = ResumableBatchSampler(16, 4, seed=0)
    return TrainingState(
        model, optimizer, scheduler, sampler, step=step, data_identity=data_identity
    )


def test_a_resume_on_other_data_is_refused_with_one_line_and_nothing_loaded():
    saved = training_state("sha256:" + "a" * 64, step=7).state_dict()
    assert saved["trainer"]["data_identity"] == "sha256:" + "a" * 64
    other = training_state("sha256:" + "b" * 64)
    with pytest.raises(CheckpointUnusable) as refused:
        other.load_state_dict(saved)
    line = str(refused.value)
    assert "\n" not in line and "other data" in line
    assert "sha256:aaaa" in line and "sha256:bbbb" in line
    assert other.step == 0  # refused whole


@pytest.mark.parametrize(
    "saved,current",
    [("v1", "v1"), (None, "v1"), ("v1", None), (None, None)],
    ids=["the same", "a checkpoint from before", "a data set that declares none", "neither"],
)
def test_the_same_identity_or_an_unknown_one_resumes(saved, current):
    state = training_state(current)
    state.load_state_dict(training_state(saved, step=7).state_dict())
    assert state.step == 7 and state.data_identity == current  # the next checkpoint says ours


class Declared(torch.utils.data.Dataset):
    def __init__(self, identity):
        self.identity = identity


def test_a_data_set_declares_its_identity_or_not():
    assert identity_of(Declared("v2")) == "v2"
    assert identity_of(torch.utils.data.TensorDataset(torch.zeros(2))) is None
    assert identity_of(None) is None  # no validation set
    with pytest.raises(ConfigError, match=r"data\.val: the data set's identity must be a str"):
        identity_of(Declared(3), "data.val")
    mine = check_same_data(World(), {"data.dataset": Declared("v2"), "data.val": None})
    assert mine == {"data.dataset": "v2", "data.val": None}
