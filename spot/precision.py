"""Mixed precision (`trainer.precision`): autocast for the forward pass, and for fp16 a gradient
scaler whose state is part of every checkpoint, so a resumed run scales exactly as an
uninterrupted one would.

    with amp.autocast():  loss = compute_loss(...)      # inside accumulate_gradients
    amp.scale(loss).backward()
    amp.unscale(optimizer)                              # true gradients, for clipping
    skipped = amp.step(optimizer)                       # fp16: inf/nan gradients skip the update

fp32 makes every call a no-op; bf16 needs no scaler (its range is fp32's). The parameters and the
optimizer state stay fp32 in every mode: a checkpoint looks the same whatever the precision.
"""

from __future__ import annotations

import contextlib

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class MixedPrecision:
    def __init__(self, precision: str, device: torch.device):
        self.precision = str(precision)
        self.device_type = device.type
        self.dtype = DTYPES.get(self.precision)
        self.scaler = (
            torch.amp.GradScaler(device.type) if self.precision == "fp16" else None
        )  # fp16's narrow range: small gradients would flush to zero unscaled
        self._scale = self.scaler.get_scale() if self.scaler is not None else None

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss if self.scaler is None else self.scaler.scale(loss)

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """The optimizer step; True if the scaler skipped it (inf or nan gradients), in which
        case the scale is lowered for the next step."""
        if self.scaler is None:
            optimizer.step()
            return False
        self.scaler.step(optimizer)
        self.scaler.update()
        # update() lowers the scale only after a skip. One read of it per step (a host sync on
        # CUDA), compared with the last step's.
        before, self._scale = self._scale, self.scaler.get_scale()
        return self._scale < before

    def scale_value(self) -> float | None:
        return self._scale

    def state_dict(self) -> dict:
        return {} if self.scaler is None else self.scaler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)
            self._scale = self.scaler.get_scale()
