"""Deterministic synthetic classification data generated in code: no downloads, no files.

Labels come from a fixed random "teacher" so that a model can actually learn them and the loss
falls, which makes a training run on a laptop meaningful. `split="val"` draws other samples of
the same task (the same teacher or blobs) from a stream of their own: a validation split.
"""

import math

import torch
from torch.utils.data import Dataset

VAL_STREAM = 1_000_003  # added to the seed: validation samples never repeat training ones


class SyntheticVectors(Dataset):
    def __init__(
        self,
        size: int,
        num_features: int,
        num_classes: int,
        seed: int = 0,
        noise: float = 0.1,
        split: str = "train",
        train_size: int | None = None,
    ):
        """`split="val"`: `size` samples labelled by the teacher of the training split (whose
        size, `train_size`, fixes the teacher's place in the stream)."""
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(train_size if split == "val" else size, num_features, generator=g)
        teacher = torch.randn(num_features, num_classes, generator=g)
        if split == "val":
            g = torch.Generator().manual_seed(seed + VAL_STREAM)
            self.x = torch.randn(size, num_features, generator=g)
        logits = self.x @ teacher + noise * torch.randn(size, num_classes, generator=g)
        self.y = logits.argmax(dim=1)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int):
        return self.x[index], self.y[index]


class SyntheticImages(Dataset):
    """Images whose class decides a blob's position, plus noise: learnable by a small CNN."""

    def __init__(
        self,
        size: int,
        channels: int,
        image_size: int,
        num_classes: int,
        seed: int = 0,
        split: str = "train",
    ):
        g = torch.Generator().manual_seed(seed + (VAL_STREAM if split == "val" else 0))
        self.y = torch.randint(num_classes, (size,), generator=g)
        self.x = 0.5 * torch.randn(size, channels, image_size, image_size, generator=g)
        coords = torch.linspace(-1, 1, image_size)
        yy, xx = torch.meshgrid(coords, coords, indexing="ij")
        for c in range(num_classes):
            angle = 2 * math.pi * c / num_classes
            blob = torch.exp(
                -((xx - 0.5 * math.cos(angle)) ** 2 + (yy - 0.5 * math.sin(angle)) ** 2) / 0.1
            )
            self.x[self.y == c] += blob

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int):
        return self.x[index], self.y[index]
