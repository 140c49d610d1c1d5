"""`python -m spot data write OUT [--shard-mb 64] [-- OVERRIDES]`: the data set the config names
(`data.dataset`, or `data.val` with `--split val`) as shards (spot/shards/format.py) in OUT, a
directory or a bucket URL (s3://, gs://, az://; `--endpoint-url`, `--region`, `--account`).

Into a bucket, the shards are written in a local temporary directory first, then uploaded as
checkpoints are (each object completed only once its bytes matched the index), and the index
last: a reader never sees an index whose shards are missing. Then
`python train.py data=shards data.dataset.url=OUT` trains from them.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from spot.buckets import BucketError, add_remote_arguments, is_url, open_bucket, parse_url
from spot.shards.format import INDEX, ShardWriter

CONF = Path(__file__).resolve().parents[2] / "conf"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True)
    write = actions.add_parser("write", help="write the config's data set as shards")
    write.add_argument("out", help="a directory, or s3://, gs://, az://bucket/prefix")
    write.add_argument("--shard-mb", type=float, default=64.0, help="about this size each")
    write.add_argument("--split", choices=("dataset", "val"), default="dataset")
    add_remote_arguments(write)
    write.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. data=stdlib")


def dataset_of(overrides: list[str], split: str):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    node = cfg.data.get(split)
    if node is None:
        raise SystemExit(f"error: data.{split} is not set by this config")
    return instantiate(node)


def samples(dataset):
    """What is stored of each sample: `dataset.stored(i)` where the data set defines it (a
    compact form, e.g. a window of tokens as uint16 rather than int64 pairs, which the reader's
    `data.dataset.transform` expands again), else `dataset[i]`."""
    stored = getattr(dataset, "stored", dataset.__getitem__)
    return (stored(number) for number in range(len(dataset)))


def write(dataset, out: str, shard_bytes: int, remote: dict) -> dict:
    if not is_url(out):
        writer = ShardWriter(Path(out).expanduser(), shard_bytes)
        for sample in samples(dataset):
            writer.add(sample)
        return writer.close()
    from spot.checkpoint.upload import send_files

    backend, name, prefix = parse_url(out)
    bucket = open_bucket(backend, name, **remote)
    bucket.check_access()
    with tempfile.TemporaryDirectory(prefix="spot-shards-") as tmp:
        writer = ShardWriter(Path(tmp), shard_bytes)
        for sample in samples(dataset):
            writer.add(sample)
        index = writer.close()
        keys = {s["name"]: f"{prefix}/{s['name']}".lstrip("/") for s in index["shards"]}
        send_files(bucket, keys, Path(tmp), {s["name"]: s for s in index["shards"]})
        bucket.put(f"{prefix}/{INDEX}".lstrip("/"), (Path(tmp) / INDEX).read_bytes())
    return index


def command(args: argparse.Namespace) -> int:
    from spot.checkpoint.manifest import CorruptCheckpoint

    dataset = dataset_of(args.overrides, args.split)
    remote = {"endpoint_url": args.endpoint_url, "region": args.region, "account": args.account}
    try:
        index = write(dataset, args.out, int(args.shard_mb * 2**20), remote)
    except (BucketError, CorruptCheckpoint, OSError) as exc:
        print(f"error: {args.out}: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    size = sum(s["bytes"] for s in index["shards"])
    print(
        f"wrote {index['samples']} samples in {len(index['shards'])} shards "
        f"({size / 2**20:.1f} MiB) to {args.out}; identity shards:{index['digest']}"
    )
    return 0
