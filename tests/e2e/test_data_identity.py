"""A data set's identity (spot/run/data_identity.py) across real gloo ranks, and through train.py:
a resume on other data under the same config is refused with one line and exit 3."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch.multiprocessing as mp

from spot.checkpoint.manager import list_step_dirs
from spot.distributed import world as distributed
from spot.run.config import ConfigError
from spot.run.data_identity import check_same_data
from spot.run.events import read_events
from spot.run.exitcodes import EXIT_CHECKPOINT_UNUSABLE
from tests.helpers import (
    FAST,
    free_port,
    gloo_world,
    run_dir_of,
    run_train,
    run_until_failpoint,
    train_env,
)


class Declared:
    def __init__(self, identity):
        self.identity = identity


def _worker(rank: int, world_size: int, port: int, out: str) -> None:
    world = gloo_world(rank, world_size, port)
    results = {"same": check_same_data(world, {"data.dataset": Declared("v1"), "data.val": None})}
    try:  # the validation set differs on the last rank
        val = Declared("v1" if rank < world_size - 1 else "v2")
        check_same_data(world, {"data.dataset": Declared("v1"), "data.val": val})
    except ConfigError as exc:
        results["error"] = str(exc)
    Path(out, f"rank-{rank}.json").write_text(json.dumps(results))
    distributed.exit_process(0)


@pytest.mark.serial
def test_ranks_that_read_different_data_stop_with_one_line_on_every_rank(tmp_path):
    world_size = 2
    mp.start_processes(
        _worker,
        args=(world_size, free_port(), str(tmp_path)),
        nprocs=world_size,
        start_method="spawn",
    )
    for rank in range(world_size):
        results = json.loads((tmp_path / f"rank-{rank}.json").read_text())
        assert results["same"] == {"data.dataset": "v1", "data.val": None}
        assert results["error"] == (
            "config error: data.val: ranks read different data (identity v1 on rank 0, v2 on "
            "rank 1); start every node with the same image and data"
        )


@pytest.mark.slow
def test_a_resume_on_other_data_under_the_same_config_exits_3(tmp_path, markers):
    """The data's content changed, not its config (same digest): the checkpoint is refused with
    one line and exit 3, and nothing is written over it."""
    args = [
        *FAST,
        "trainer.max_steps=20",
        "checkpoint.every_steps=10",
        "data.dataset._target_=tests.edited_data.EditedVectors",
        f"run.root={tmp_path}",
    ]
    first = train_env(EDITED_DATA_IDENTITY="v1")
    run_until_failpoint(args, "checkpoint.committed@step=10", markers, env=first)
    run_dir = run_dir_of(tmp_path)
    result = run_train(args, env=train_env(EDITED_DATA_IDENTITY="v2"))
    assert result.returncode == EXIT_CHECKPOINT_UNUSABLE, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("checkpoint error:")]
    assert "other data" in line and "identity v1, this run's v2" in line, line
    events = read_events(run_dir / "events.jsonl")
    assert [e["event"] for e in events].count("checkpoint_unusable") == 1
    assert [s for s, _ in list_step_dirs(run_dir / "checkpoints")] == [10]
