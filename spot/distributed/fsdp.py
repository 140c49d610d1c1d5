"""trainer.strategy=fsdp: FSDP2 (`fully_shard`) as the config chooses it.

Each module whose class is named in `trainer.fsdp.shard` becomes a unit whose parameters are
gathered just before it runs and freed after (`reshard_after_forward`); the root module always is
one, holding every parameter no unit took. Between steps every parameter, gradient and optimizer
state is a DTensor of which this rank holds 1/world_size: that is what the checkpoint writes,
each rank its own part (spot/checkpoint/sharded.py).

With trainer.precision=bf16|fp16 FSDP gathers the parameters in that dtype and reduces gradients
in float32; the master weights and the optimizer state stay float32 (autocast still chooses each
operation's dtype, as with DDP).

A world of one rank has nothing to shard: the model stays a plain module, and its checkpoints are
written in the sharded format all the same, so a run moves between 1 and N ranks.
"""

from __future__ import annotations

import torch

from spot.run.config import ConfigError

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether any parameter is a DTensor (fully_shard has run on the model)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def units(model: torch.nn.Module, class_names: list[str]) -> list[torch.nn.Module]:
    """The submodules to shard as units, innermost first (fully_shard wants children before
    their parents). ConfigError for a name that matches no module."""
    present = {type(m).__name__ for m in model.modules()}
    unknown = sorted(set(class_names) - present)
    if unknown:
        raise ConfigError(
            "trainer.fsdp.shard",
            f"{', '.join(unknown)} matches no module of {type(model).__name__}; "
            f"its module classes: {', '.join(sorted(present))}",
        )
    wanted = set(class_names)
    found = [m for m in model.modules() if m is not model and type(m).__name__ in wanted]
    return found[::-1]


def shard(
    model: torch.nn.Module,
    group,
    device: torch.device,
    class_names: list[str],
    reshard_after_forward: bool,
    precision: str,
) -> torch.nn.Module:
    """fully_shard the configured units, then the root, over `group` (the training group).
    `group` None (a world of one): the names are checked, the model is returned as it is."""
    chosen = units(model, class_names)
    if group is None:
        return model
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = DeviceMesh.from_group(group, device.type)
    dtype = _DTYPES.get(str(precision))
    policy = (
        MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        if dtype is not None
        else MixedPrecisionPolicy()
    )
    for module in chosen:
        fully_shard(
            module, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=policy
        )
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=policy)
    return model
