"""spot.precision: what the loop calls for mixed precision, on real tensors."""

from __future__ import annotations

import pytest
import torch

from spot.precision import MixedPrecision


def one_param_step(amp: MixedPrecision, grad_value: float):
    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([p], lr=0.1)
    with amp.autocast():
        loss = (p * grad_value).sum()
    amp.scale(loss).backward()
    amp.unscale(opt)
    grad = p.grad.clone()
    skipped = amp.step(opt)
    return p.detach(), grad, skipped


def test_fp16_skips_an_update_with_inf_gradients_and_lowers_the_scale():
    amp = MixedPrecision("fp16", torch.device("cpu"))
    before = amp.scale_value()
    weights, _, skipped = one_param_step(amp, float("inf"))
    assert skipped and torch.equal(weights, torch.ones(2))  # the update did not happen
    assert amp.scale_value() == before / 2


def test_fp16_unscales_before_clipping_and_steps():
    amp = MixedPrecision("fp16", torch.device("cpu"))
    weights, grad, skipped = one_param_step(amp, 3.0)
    assert not skipped
    assert torch.equal(grad, torch.full((2,), 3.0))  # true units, not times 65536
    assert torch.allclose(weights, torch.full((2,), 1 - 0.3))


def test_the_scaler_state_round_trips():
    amp = MixedPrecision("fp16", torch.device("cpu"))
    one_param_step(amp, float("inf"))
    one_param_step(amp, 1.0)
    saved = amp.state_dict()
    fresh = MixedPrecision("fp16", torch.device("cpu"))
    fresh.load_state_dict(saved)
    assert fresh.state_dict() == saved and saved["_growth_tracker"] == 1
    assert saved["scale"] == 32768.0


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_without_a_scaler_nothing_is_scaled_or_skipped(precision):
    amp = MixedPrecision(precision, torch.device("cpu"))
    weights, grad, skipped = one_param_step(amp, 3.0)
    assert not skipped and amp.state_dict() == {} and amp.scale_value() is None
    assert torch.equal(grad, torch.full((2,), 3.0))


def test_bf16_autocast_computes_in_bf16_on_cpu():
    amp = MixedPrecision("bf16", torch.device("cpu"))
    with amp.autocast():
        out = torch.nn.functional.linear(torch.ones(1, 4), torch.ones(3, 4))
    assert out.dtype == torch.bfloat16
