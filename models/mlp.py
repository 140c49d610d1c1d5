import torch
from torch import nn


class MLP(nn.Module):
    """A small multilayer perceptron for vector inputs (dropout makes RNG restore matter)."""

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        hidden: int = 128,
        depth: int = 2,
        dropout: float = 0.1,
    ):
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout)]
            width = hidden
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
