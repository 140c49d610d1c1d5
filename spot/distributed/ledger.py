"""The data ledger (`data.ledger=true`): which dataset indices each rank consumed at each step.

`<run dir>/ledger/rank-<r>.jsonl` (RunPaths.ledger_file), one line per step. On resume, lines past the restored step
are dropped, so the ledger always describes the surviving run and can prove exactly-once.
"""

from __future__ import annotations

import json
from pathlib import Path

from spot.fsutil import atomic_write_bytes
from spot.run.identity import RunPaths


def read_ledger(path: Path) -> list[dict]:
    entries = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:  # a line torn by a kill
                continue
    return entries


def truncate_ledgers(paths: RunPaths, resumed_step: int) -> None:
    """Drop every rank's lines past the restored step, ranks that no longer exist included.
    The leader calls it before any rank appends."""
    for path in sorted(paths.ledger.glob("rank-*.jsonl")):
        kept = [e for e in read_ledger(path) if e.get("step", 0) <= resumed_step]
        atomic_write_bytes(path, "".join(json.dumps(e) + "\n" for e in kept).encode())


class Ledger:
    def __init__(self, paths: RunPaths, rank: int):
        self.path = paths.ledger_file(rank)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", buffering=1)  # noqa: SIM115 - closed in close()

    def record(self, step: int, epoch: int, indices: list[int]) -> None:
        self._file.write(json.dumps({"step": step, "epoch": epoch, "indices": indices}) + "\n")

    def close(self) -> None:
        self._file.close()
