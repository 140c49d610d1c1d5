"""A model whose code changed between two runs of the same config (a forker edited it): its width
comes from the environment, not from the config, so the config digest cannot tell."""

from __future__ import annotations

import os

from models.mlp import MLP


class EditedMLP(MLP):
    def __init__(self, *args, hidden: int = 128, **kwargs):
        super().__init__(*args, hidden=int(os.environ.get("EDITED_MLP_HIDDEN", hidden)), **kwargs)
