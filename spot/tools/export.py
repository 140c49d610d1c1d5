"""`python -m spot export CHECKPOINT OUT [--format safetensors|torch]`: a checkpoint's model
weights in a standard format, for inference or another framework.

CHECKPOINT is a step directory, a run or checkpoints directory (its newest checkpoint that
verifies), or a bucket's run URL, s3://, gs:// or az:// (spot/checkpoint/source.py;
`--endpoint-url`, `--region`, `--account` as `list`, `verify` and `inspect` take them; a bucket
that cannot be used is one line and exit 2). The weights are the model's state dict with no wrapper prefixes (checkpoints hold
the bare module's keys: no DDP `module.`, no torch.compile `_orig_mod.`), so
`model.load_state_dict(safetensors.torch.load_file(OUT))` or
`model.load_state_dict(torch.load(OUT, weights_only=True))` loads them into the model class.
The checkpoint is verified (every byte against its manifest) before anything is written, and
OUT is written atomically.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import torch

from spot.buckets import add_remote_arguments, remote_arguments
from spot.checkpoint.manifest import CorruptCheckpoint
from spot.checkpoint.source import load_named
from spot.fsutil import atomic_write_bytes
from spot.run.config import one_line


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "checkpoint", help="a step-* directory, a run/checkpoints dir or a bucket run URL"
    )
    p.add_argument("out", type=Path, help="the file to write")
    p.add_argument("--format", choices=("safetensors", "torch"), default="safetensors")
    add_remote_arguments(p)


def command(args: argparse.Namespace) -> int:
    from spot.buckets import BucketError
    from spot.checkpoint.storage import RemoteError

    try:
        loaded, where = load_named(args.checkpoint, **remote_arguments(args))
    except CorruptCheckpoint as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (RemoteError, BucketError) as exc:  # the bucket, as `list` says it
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    # Owned, contiguous copies: a checkpoint's tensors are views of one buffer, which
    # safetensors refuses (shared memory) and torch.save would write whole.
    weights = {k: v.detach().clone().contiguous() for k, v in loaded.state["model"].items()}
    meta = {"step": str(loaded.step), "source": where}
    if args.format == "safetensors":
        from safetensors.torch import save

        data = save(weights, metadata=meta)
    else:
        buffer = io.BytesIO()
        torch.save(weights, buffer)
        data = buffer.getvalue()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(args.out, data)
    size = sum(t.numel() * t.element_size() for t in weights.values())
    print(f"{args.out}: {len(weights)} tensors, {size} bytes of weights, step {loaded.step}")
    return 0
