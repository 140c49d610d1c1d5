"""A data set whose content changed between two runs of the same config (other bytes on another
machine): its identity comes from the environment, not from the config, so the config digest
cannot tell."""

from __future__ import annotations

import os

from data.synthetic import SyntheticVectors


class EditedVectors(SyntheticVectors):
    @property
    def identity(self) -> str | None:
        return os.environ.get("EDITED_DATA_IDENTITY")
