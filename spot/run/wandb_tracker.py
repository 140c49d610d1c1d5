"""Weights & Biases: one W&B run per training run, resumed after every restart.

The W&B run id is the training run's (`<run.name>-<run.id>`, kept in every checkpoint), so each
restart continues the same W&B run. Offline (the default), each restart writes one more segment
`offline-run-<time>-<id>/` beside the earlier ones in `<run dir>/wandb/`; `wandb sync` uploads
the segments of one id, in order, as one run. W&B's own step (`_step`) must never go backwards,
and a resumed run trains some steps again, so `_step` counts logged rows across all segments and
every figure is plotted against `trainer/step`.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

from spot.run.config import LoggerConfig
from spot.run.identity import RunPaths
from spot.run.metrics import EVENT_KEY, STEP_KEY, without_credentials

# W&B's transaction log (`run-<id>.wandb`): LevelDB's log format, 32 KiB blocks of records
# framed as crc32 (of type byte + payload), length, type; a 7-byte ":W&B" header first.
_BLOCK = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def read_records(path: Path) -> Iterator:
    """Every complete record of a `.wandb` file, as W&B's own protobuf `Record`; stops at a
    torn tail (a process killed while writing)."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    ident, magic, _version = struct.unpack("<4sHB", data[:7])
    if ident != b":W&B" or magic != 0xBEE1:
        raise ValueError(f"{path} is not a W&B transaction log (header {data[:7]!r})")
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left_in_block = _BLOCK - pos % _BLOCK
        if left_in_block < 7:  # too small for a record header: padding
            pos += left_in_block
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            pos += left_in_block
            continue
        payload = data[pos + 7 : pos + 7 + length]
        if len(payload) < length or zlib.crc32(bytes([kind]) + payload) != crc:
            return
        pos += 7 + length
        pending = payload if kind in (_FULL, _FIRST) else pending + payload
        if kind in (_FULL, _LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def offline_segments(wandb_dir: Path, run_id: str) -> list[Path]:
    """The offline segments of one W&B run, oldest first."""
    return sorted(Path(wandb_dir).glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))


def offline_history(wandb_dir: Path, run_id: str) -> list[dict]:
    """Every history row of every offline segment of a run, in order, values decoded."""
    rows = []
    for segment in offline_segments(wandb_dir, run_id):
        for record in read_records(segment):
            if record.WhichOneof("record_type") == "history":
                rows.append(
                    {
                        item.key or "/".join(item.nested_key): json.loads(item.value_json)
                        for item in record.history.item
                    }
                )
    return rows


class WandbTracker:
    def __init__(self, cfg: LoggerConfig, run_dir: Path, run_id: str, config: dict):
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        wandb_dir = RunPaths.at(run_dir).tracker
        wandb_dir.mkdir(parents=True, exist_ok=True)
        earlier = offline_history(wandb_dir, run_id) if cfg.mode == "offline" else []
        self.run = wandb.init(
            project=cfg.project,
            id=run_id,
            name=run_id,
            resume="allow",
            mode=cfg.mode,
            dir=str(run_dir),
            config=without_credentials(config),
            settings=wandb.Settings(x_disable_stats=True, console="off"),
        )
        self.run.define_metric(STEP_KEY)
        self.run.define_metric("*", step_metric=STEP_KEY)
        # Online, W&B knows where a resumed run's `_step` is; offline, the earlier segments do.
        self._next = max(self.run.starting_step, max((r["_step"] for r in earlier), default=-1) + 1)
        held = self.run.summary.get(EVENT_KEY, -1) if self.run.resumed else -1
        self._logged_events = 1 + max(held, *(r.get(EVENT_KEY, -1) for r in earlier), -1)

    def logged_events(self) -> int:
        return self._logged_events

    def log(self, figures: dict[str, float], step: int) -> None:
        self.run.log({STEP_KEY: step, **figures}, step=self._next)
        self._next += 1

    def close(self) -> None:
        self.run.finish()
