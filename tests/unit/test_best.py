"""checkpoint.keep_best's one owner (spot/checkpoint/best.py) and init.optimizer's settings, in
process. In real runs, with a bucket and a kill: tests/e2e/test_best.py."""

from __future__ import annotations

import pytest
import torch

from spot.checkpoint.best import BestCheckpoint
from spot.checkpoint.state import TrainingState
from spot.distributed.sampler import ResumableBatchSampler
from spot.run.config import BestConfig, ConfigError
from spot.run.events import EventLog, read_events
from tests.helpers import assert_bitwise_equal


def owner(tmp_path, metric="val/loss", mode="min") -> BestCheckpoint:
    return BestCheckpoint(BestConfig(metric=metric, mode=mode), EventLog(tmp_path / "e.jsonl"))


def test_a_new_best_spares_the_newest_earlier_one_there_until_it_is_there(tmp_path):
    best = owner(tmp_path)
    assert best.consider({"val/loss": 2.0}, 10) and best.spared({10}) == {10}
    assert not best.consider({"val/loss": 2.5}, 20)  # worse: the record stands
    assert best.consider({"val/loss": 1.5}, 30)
    assert best.consider({"val/loss": 1.2}, 40)  # two new bests before either is anywhere
    assert best.spared({10, 20}) == {10, 40}  # 10 is this place's newest best: it stays
    assert best.spared({10, 20, 30}) == {30, 40}
    assert best.spared({10, 20, 30, 40}) == {40}
    assert best.retention_record == {
        "metric": "val/loss",
        "mode": "min",
        "step": 40,
        "value": 1.2,
        "earlier": [],  # every place (the disk) has 40 now: no earlier one is needed
    }


def test_the_trainer_states_record_is_the_same_whatever_retention_saw(tmp_path):
    """What goes into the trainer state (compared bitwise between an interrupted run and an
    uninterrupted one) holds no bookkeeping of where which checkpoint is."""
    seen, unseen = owner(tmp_path), owner(tmp_path)
    for best in (seen, unseen):
        best.consider({"val/loss": 2.0}, 10)
        best.consider({"val/loss": 1.0}, 20)
    seen.spared({10, 20})
    assert (
        seen.record
        == unseen.record
        == {
            "metric": "val/loss",
            "mode": "min",
            "step": 20,
            "value": 1.0,
        }
    )
    assert seen.retention_record["earlier"] == [] and unseen.retention_record["earlier"] == [10]


def test_earlier_bests_are_kept_in_the_record_until_every_place_has_a_newer_one(tmp_path):
    best = BestCheckpoint(BestConfig(), EventLog(tmp_path / "e.jsonl"), ("disk", "bucket"))
    best.consider({"val/loss": 2.0}, 10)
    best.consider({"val/loss": 1.0}, 20)
    best.spared({10, 20}, "disk")
    assert best.retention_record["earlier"] == [
        10
    ]  # the bucket has not been asked: 10 may be its best
    best.spared({10}, "bucket")
    assert best.retention_record["earlier"] == [10]
    best.spared({10, 20}, "bucket")
    assert best.retention_record["earlier"] == []


def test_the_record_resumes_with_its_rule_and_restarts_when_the_rule_changes(tmp_path):
    saved = owner(tmp_path)
    saved.consider({"val/loss": 2.0, "val/accuracy": 0.4}, 10)
    same = owner(tmp_path)
    same.restore(saved.record)
    assert not same.consider({"val/loss": 2.1}, 20)  # compared with the restored record
    changed = owner(tmp_path, "val/accuracy", "max")
    changed.restore(saved.record)
    assert changed.record["step"] is None and changed.spared({10}) == {10}  # the old best...
    again = owner(tmp_path, "val/accuracy", "max")  # killed before the new rule's first best:
    again.restore(changed.retention_record)  # what its manifest kept names the old best
    assert again.spared({10}) == {10}
    assert again.consider({"val/loss": 2.1, "val/accuracy": 0.1}, 20)  # a new record
    assert again.spared({10, 20}) == {20}  # ...kept until the new rule's first best is there
    events = read_events(tmp_path / "e.jsonl")
    (event,) = [e for e in events if e["event"] == "keep_best_changed"]
    assert event["previous"] == {"metric": "val/loss", "mode": "min"}
    assert event["now"] == {"metric": "val/accuracy", "mode": "max"}


def test_turning_keep_best_off_stops_sparing_the_old_best(tmp_path):
    saved = owner(tmp_path)
    saved.consider({"val/loss": 2.0}, 10)
    off = BestCheckpoint(None, EventLog(tmp_path / "e.jsonl"))
    off.restore(saved.record)
    assert off.spared({10, 20}) == set() and not off.consider({"val/loss": 1.0}, 20)


def test_a_metric_evaluation_does_not_report_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"val/acc is not a validation figure; there are: va"):
        owner(tmp_path, "val/acc").check({"val/loss", "val/accuracy"})
    owner(tmp_path).check({"val/loss"})


def _state(weight_decay: float, betas: tuple[float, float]) -> TrainingState:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=0.1, weight_decay=weight_decay, betas=betas
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    return TrainingState(model, optimizer, scheduler, ResumableBatchSampler(8, 4, seed=0))


def test_init_optimizer_keeps_the_moments_and_takes_every_setting_from_the_config():
    """Fine-tuning from another run's optimizer state: its moments and step counts, but the
    weight decay and betas configured now (load_state_dict alone would bring the source's)."""
    source = _state(0.01, (0.9, 0.999))
    source.model(torch.randn(3, 4)).sum().backward()
    source.optimizer.step()
    saved = source.state_dict()
    target = _state(0.5, (0.5, 0.6))
    configured = [
        {k: v for k, v in g.items() if k != "params"} for g in target.optimizer.param_groups
    ]
    target.load_weights(
        {"model": saved["model"], "optimizer": saved["optimizer"]}, {"source": "a", "step": 1}
    )
    live = [{k: v for k, v in g.items() if k != "params"} for g in target.optimizer.param_groups]
    assert live == configured and live[0]["weight_decay"] == 0.5 and live[0]["betas"] == (0.5, 0.6)
    assert_bitwise_equal(
        saved["optimizer"]["state"], target.optimizer.state_dict()["state"], "optimizer.state"
    )
