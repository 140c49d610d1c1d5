"""`python -m spot export`: a checkpoint's weights, loadable into the model class as they are."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from models.mlp import MLP
from spot.checkpoint.manifest import step_dir_name
from spot.checkpoint.state import TrainingState
from spot.distributed.sampler import ResumableBatchSampler
from spot.run.events import EventLog
from spot.tools.cli import main
from tests.helpers import assert_bitwise_equal, checkpoint_manager


def saved_run(tmp_path, compiled: bool):
    """A checkpoint of a model trained one step, saved as train.py saves it (TrainingState),
    the model compiled or not."""
    torch.manual_seed(0)
    model = MLP(8, 3, hidden=16)
    live = torch.compile(model) if compiled else model  # not run: compiling is lazy
    optimizer = torch.optim.AdamW(live.parameters(), lr=0.1)
    model(torch.randn(4, 8)).sum().backward()  # the same parameters either way
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    state = TrainingState(live, optimizer, scheduler, ResumableBatchSampler(16, 4, seed=0), step=1)
    manager = checkpoint_manager(tmp_path / "run" / "checkpoints", EventLog(None))
    manager.save(1, state.state_dict(), {})
    return model


@pytest.mark.parametrize("compiled", [False, True])
def test_safetensors_and_torch_exports_load_into_the_model_class(tmp_path, compiled):
    model = saved_run(tmp_path, compiled)
    run_dir = tmp_path / "run"
    assert main(["export", str(run_dir), str(tmp_path / "w.safetensors")]) == 0
    step_dir = run_dir / "checkpoints" / step_dir_name(1)
    assert main(["export", str(step_dir), str(tmp_path / "w.pt"), "--format", "torch"]) == 0
    for weights in (
        load_file(tmp_path / "w.safetensors"),
        torch.load(tmp_path / "w.pt", weights_only=True),
    ):
        fresh = MLP(8, 3, hidden=16)
        fresh.load_state_dict(weights)  # strict: no `module.` or `_orig_mod.` prefixes
        assert_bitwise_equal(model.state_dict(), fresh.state_dict(), "model")
    with safe_open(tmp_path / "w.safetensors", "pt") as f:
        assert f.metadata()["step"] == "1"


def test_a_corrupt_checkpoint_is_not_exported(tmp_path, capsys):
    saved_run(tmp_path, compiled=False)
    step_dir = tmp_path / "run" / "checkpoints" / step_dir_name(1)
    blob = next(p for p in step_dir.iterdir() if p.name.startswith("model"))
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x01
    blob.write_bytes(bytes(data))
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "w.safetensors")]) == 1
    assert not (tmp_path / "w.safetensors").exists()
    assert "verifies" in capsys.readouterr().err
