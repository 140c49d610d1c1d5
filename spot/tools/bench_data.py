"""`python -m spot bench-data`: training from a sharded data set in a bucket, beside the same
data set on local disk and beside mosaicml-streaming reading the same samples from the same
bucket, in one run, side by side. Only ratios between readers measured together mean anything.

Every reader runs the same steps: take the step's batch from a DataLoader (num_workers=0), then
sleep `--step-ms` for the step's compute. A sleep, not a busy loop: on an accelerator the host
CPU mostly waits for the device during a step, and a busy loop would hold the GIL the prefetch
threads need. The data wait of a step is the time spent in `next(loader)`.

The bucket is moto's S3 server on loopback, in a process of its own (serving must not share a
reader's GIL), unless `--remote s3://...` names a real one. Mosaic cannot be installed beside
this project (it pins numpy < 2.2 and imports torchvision and transformers): it runs in a
virtualenv this tool builds once (`mosaic_venv`), as a subprocess calling `_mosaic_main`; so this
module imports nothing of spot's at the top.
"""

from __future__ import annotations

import argparse
import importlib.machinery
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
import types
from contextlib import contextmanager
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
MOSAIC = "mosaicml-streaming==0.13.0"
# What mosaic imports when `streaming` is imported and an S3 stream is read (found by trying,
# one ModuleNotFoundError at a time), within mosaic's own version ranges; their own
# dependencies resolve normally. Not torch: the project's is linked in (`_link_torch`).
MOSAIC_NEEDS = [
    "numpy>=1.21.5,<2.2",
    "xxhash>=3,<4",
    "zstd>=1.5.2.5,<2",
    "brotli>=1.0.9",
    "python-snappy>=0.6.1,<1",
    "catalogue>=2,<3",
    "tqdm>=4.64,<5",
    "pillow",
    "boto3>=1.21.45,<2",
]
WINDOW = 4  # the sampler's window of shards (data.window_shards' default)
SEED = 0


class Synthetic:
    """`samples` samples of `sample_kb` KiB of floats, the same in every reader and format, each
    labelled with its own index (so a reader's labels say which samples it read)."""

    def __init__(self, samples: int, sample_kb: float):
        self.samples, self.floats = samples, max(1, int(sample_kb * 1024) // 4)

    def __len__(self) -> int:
        return self.samples

    def __getitem__(self, index: int):
        generator = torch.Generator().manual_seed(index)
        return torch.randn(self.floats, generator=generator), torch.tensor(index)


def drive(loader, steps: int, step_s: float) -> dict:
    """`steps` steps of a simulated training loop: the waits for each batch, the labels read."""
    batches, waits, labels = iter(loader), [], []
    began = time.perf_counter()
    for _ in range(steps):
        asked = time.perf_counter()
        try:
            batch = next(batches)
        except StopIteration:
            break
        waits.append(time.perf_counter() - asked)
        labels += (batch["y"] if isinstance(batch, dict) else batch[1]).tolist()
        time.sleep(step_s)  # the step's compute (the host is free meanwhile)
    seconds = time.perf_counter() - began
    waits.sort()
    wait = {f"p{q}": waits[round(q / 100 * (len(waits) - 1))] for q in (50, 95, 100)}
    wait["mean"] = sum(waits) / len(waits)
    row = {"samples": len(labels), "distinct": len(set(labels)), "labels": labels}
    return row | {"seconds": seconds, "samples_per_s": len(labels) / seconds, "wait": wait}


# ---- the project's reader (in this process) ---------------------------------------------------


def read_shards(url: str, remote: dict, cache: Path, args, rank: int = 0, world: int = 1):
    """One node's reader: a ShardedDataset with an empty cache, prefetching over the sampler's
    shard order, for one epoch (or `--steps`)."""
    from torch.utils.data import DataLoader

    from spot.buckets import is_url
    from spot.distributed.sampler import ResumableBatchSampler
    from spot.shards.dataset import ShardedDataset, prefetching

    dataset = ShardedDataset(
        url, cache_dir=str(cache), cache_limit_gb=args.cache_limit_mb / 1024, **remote
    )
    reads = count_reads(dataset)
    extra = {"partitions": args.partitions} if args.partitions > 1 else {}
    sampler = ResumableBatchSampler(
        len(dataset), args.batch_size, seed=SEED, rank=rank, world_size=world,
        groups=dataset.shard_ends, window=WINDOW, **extra,
    )  # fmt: skip
    loader = DataLoader(
        dataset, batch_sampler=prefetching(sampler, dataset, args.prefetch_steps), num_workers=0
    )
    steps = min(args.steps or math.inf, sampler.steps_per_epoch())
    row = drive(loader, steps, args.step_ms / 1000)
    # A directory's shards are hard-linked into the cache, not downloaded: no remote bytes.
    fetched = dataset.cache.fetched_bytes if is_url(url) else 0
    size = sum(int(shard["bytes"]) for shard in dataset.shards)
    return {**row, "hits": reads, "fetched_bytes": fetched, "size_bytes": size}


def count_reads(dataset) -> list[int]:
    """[hits, first reads]: a first read of a shard (also after its eviction) is one that added
    to the cache's `waited_seconds`; a hit if the shard's verified file was already there (it
    appears only after its checksum matched), else it waited for a download."""
    cache, counts = dataset.cache, [0, 0]
    open_shard = cache.open

    def counted(shard: int):
        here = (cache.directory / dataset.shards[shard]["name"]).exists()
        before = cache.waited_seconds
        opened = open_shard(shard)
        if cache.waited_seconds > before:
            counts[0] += here
            counts[1] += 1
        return opened

    cache.open = counted  # ShardedDataset.__getitem__ reads through it
    return counts


def measure(args, work: Path) -> dict:
    """The whole benchmark but its printing: the data set written to the bucket and to `work`,
    then each reader in turn. Rows: {reader: drive()'s figures, hits, bytes}."""
    from spot.shards.write import write

    with bucket_url(args) as (url, remote):
        data = Synthetic(args.samples, args.sample_kb)
        shard_bytes = int(args.shard_mb * 2**20)
        index = write(data, str(work / "local"), shard_bytes, {})
        write(data, f"{url}/shards", shard_bytes, remote)
        rows = {"local disk": read_shards(str(work / "local"), {}, work / "cache-local", args)}
        rows["bucket"] = read_shards(f"{url}/shards", remote, work / "cache-bucket", args)
        if args.ranks > 1:  # each node its own cache, one after the other
            nodes = [
                read_shards(f"{url}/shards", remote, work / f"cache-node{r}", args, r, args.ranks)
                for r in range(args.ranks)
            ]
            rows[f"bucket, {args.ranks} nodes"] = merge(nodes)
        notes = []
        if not args.no_mosaic:
            try:
                rows[f"mosaic {MOSAIC.split('==')[1]}"] = read_mosaic(args, url, remote, work)
            except MosaicUnavailable as exc:
                notes.append(f"mosaic not measured: {exc}")
    info = {"samples": index["samples"], "shards": len(index["shards"])}
    info["size_bytes"] = sum(s["bytes"] for s in index["shards"])
    return {"dataset": info, "rows": rows, "notes": notes}


def merge(nodes: list[dict]) -> dict:
    """Several nodes' rows as one: totals; samples/s and bytes per node; the worst waits."""
    labels = [label for node in nodes for label in node["labels"]]
    mean = lambda key: sum(node[key] for node in nodes) / len(nodes)  # noqa: E731
    return {
        "samples": len(labels),
        "distinct": len(set(labels)),
        "labels": labels,
        "samples_per_s": mean("samples_per_s"),
        "wait": {k: max(node["wait"][k] for node in nodes) for k in nodes[0]["wait"]},
        "hits": [sum(node["hits"][i] for node in nodes) for i in (0, 1)],
        "fetched_bytes": mean("fetched_bytes"),  # per node
        "size_bytes": nodes[0]["size_bytes"],
    }


@contextmanager
def bucket_url(args):
    """(s3:// URL, the bucket's options): a prefix of `--remote`, deleted afterwards, or a fresh
    moto server's bucket with fake credentials in the environment while it runs (the mosaic
    subprocess inherits them)."""
    if args.remote:
        from spot.buckets import open_bucket, parse_url

        url, remote = f"{args.remote.rstrip('/')}/spot-bench-data-{os.getpid()}", {}
        remote["endpoint_url"] = args.endpoint_url
        try:
            yield url, remote
        finally:
            _, name, prefix = parse_url(url)
            bucket = open_bucket("s3", name, **remote)
            bucket.delete([info.key for info in bucket.list(prefix)])
        return
    import socket

    import boto3

    fake = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    fake |= {"AWS_DEFAULT_REGION": "us-east-1", "AWS_SHARED_CREDENTIALS_FILE": os.devnull}
    saved = dict(os.environ)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        os.environ.update(fake)
        for _ in range(300):  # until it listens
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        endpoint = f"http://127.0.0.1:{port}"
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
        yield "s3://bench", {"endpoint_url": endpoint}
    finally:
        server.terminate()
        server.wait(timeout=10)
        os.environ.clear()
        os.environ.update(saved)


# ---- mosaic (in a virtualenv of its own) ------------------------------------------------------


class MosaicUnavailable(RuntimeError):
    pass


def mosaic_venv(venv: Path) -> Path:
    """The bench venv's python, built on first use: mosaic without its dependencies (they would
    pull torchvision, transformers, a numpy < 2.2 build of everything), the few it imports, and
    the project's torch linked in rather than downloaded again."""
    python, stamp = venv / "bin" / "python", venv / "spot-bench-data.json"
    wanted = json.dumps([MOSAIC, *MOSAIC_NEEDS, torch.__version__, sys.prefix])
    if stamp.exists() and stamp.read_text() == wanted:
        return python

    def run(*command) -> None:
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            last = (done.stderr.strip() or done.stdout.strip() or "?").splitlines()[-1]
            raise MosaicUnavailable(f"{' '.join(map(str, command[:4]))}...: {last}")

    run(sys.executable, "-m", "venv", "--clear", venv)
    run(python, "-m", "pip", "install", "-q", "--no-deps", MOSAIC)
    run(python, "-m", "pip", "install", "-q", *MOSAIC_NEEDS)
    site = subprocess.check_output([python, "-c", "import site; print(site.getsitepackages()[0])"])
    _link_torch(Path(site.decode().strip()))
    run(python, "-c", _MOSAIC_CALL, json.dumps({"check": True}))
    stamp.write_text(wanted)
    return python


def _link_torch(site: Path) -> None:
    """Symlink this interpreter's torch and what it requires (filelock, sympy, jinja2, ...) into
    `site`; setuptools stays the venv's own (torch needs it only to build extensions)."""
    from importlib import metadata

    todo, seen = ["torch"], {"setuptools"}
    while todo:
        dist = metadata.distribution(todo.pop())
        name = dist.metadata["Name"].lower()
        if name in seen:
            continue
        seen.add(name)
        needs = [r for r in dist.requires or [] if "extra ==" not in r]
        todo += [re.split(r"[\s;<>=!~\[]", need, maxsplit=1)[0] for need in needs]
        for top in {Path(str(file)).parts[0] for file in dist.files or []}:
            source = Path(dist.locate_file(top))
            if top.startswith("..") or top == "__pycache__" or (site / top).exists():
                continue
            (site / top).symlink_to(source)


_MOSAIC_CALL = (
    f"import sys; sys.path.insert(0, {str(REPO)!r}); "
    "from spot.tools.bench_data import _mosaic_main; _mosaic_main()"
)


def read_mosaic(args, url: str, remote: dict, work: Path) -> dict:
    python = mosaic_venv(Path(args.venv_dir).expanduser())
    config = {k: v for k, v in vars(args).items() if isinstance(v, int | float | str | None)}
    config |= {"url": f"{url}/mds", "local": str(work / "cache-mosaic")}
    env = dict(os.environ, PYTHONNOUSERSITE="1")
    if remote.get("endpoint_url"):
        env["S3_ENDPOINT_URL"] = remote["endpoint_url"]  # how mosaic's S3 client takes one
    done = subprocess.run(
        [python, "-c", _MOSAIC_CALL, json.dumps(config)], capture_output=True, text=True, env=env
    )
    if done.returncode or not done.stdout.strip():
        raise MosaicUnavailable(f"its reader failed: {(done.stderr or '?').strip()[-300:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


class _Unused:
    """An import hook: empty modules (any name in them a bare class) for transformers and
    torchvision, which mosaic's package imports unconditionally (`streaming/__init__` -> text,
    vision, StreamingDataLoader) but StreamingDataset and MDSWriter never use."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("transformers", "torchvision"):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__getattr__ = lambda attr: type(attr, (), {})
        return module

    def exec_module(self, module) -> None:
        pass


def _mosaic_main() -> None:
    """In the bench venv: write the samples as MDS to the bucket, then read them as `drive`
    does; one line of JSON on stdout."""
    config = json.loads(sys.argv[1])
    sys.meta_path.insert(0, _Unused())
    import streaming
    from streaming import MDSWriter, StreamingDataset
    from streaming.base.stream import Stream
    from torch.utils.data import DataLoader

    if config.get("check"):
        return
    data, batch = Synthetic(config["samples"], config["sample_kb"]), config["batch_size"]
    shard_bytes, columns = int(config["shard_mb"] * 2**20), {"x": "ndarray:float32", "y": "int"}
    with MDSWriter(out=config["url"], columns=columns, size_limit=shard_bytes) as out:
        for index in range(len(data)):
            x, y = data[index]
            out.write({"x": x.numpy(), "y": int(y)})
    fetched, download = [0], Stream._download_file

    def counted(self, *args, **kwargs):  # every file mosaic downloads, evicted or not
        path = download(self, *args, **kwargs)
        fetched[0] += os.path.getsize(path)
        return path

    Stream._download_file = counted
    per_shard = max(1, shard_bytes // (data.floats * 4))  # about (a shard's header aside)
    dataset = StreamingDataset(
        remote=config["url"], local=config["local"], batch_size=batch, shuffle=True,
        shuffle_seed=SEED, shuffle_block_size=WINDOW * per_shard, num_canonical_nodes=1,
        predownload=config["prefetch_steps"] * batch,  # samples: as many steps ahead as ours
        cache_limit=int(config["cache_limit_mb"] * 2**20),
    )  # fmt: skip
    steps = min(config["steps"] or math.inf, math.ceil(len(data) / batch))
    row = drive(DataLoader(dataset, batch_size=batch), steps, config["step_ms"] / 1000)
    index = json.loads((Path(config["local"]) / "index.json").read_text())
    size = sum(shard["raw_data"]["bytes"] for shard in index["shards"])
    row |= {"hits": None, "fetched_bytes": fetched[0], "size_bytes": size}
    print(json.dumps({**row, "version": streaming.__version__}))


# ---- the command ------------------------------------------------------------------------------


def report(results: dict) -> str:
    info, rows = results["dataset"], results["rows"]
    local = rows["local disk"]["samples_per_s"]
    row_format = "{:24} {:>9} {:>8} {:>20} {:>7} {:>12} {:>9}"
    lines = [
        f"{info['samples']} samples, {info['size_bytes'] / 2**20:.1f} MiB in {info['shards']} "
        "shards",
        row_format.format(
            "reader", "samples/s", "vs local", "wait ms mean/p95/max", "hits", "fetched/size",
            "read once",
        ),
    ]  # fmt: skip
    for name, row in rows.items():
        wait = "/".join(f"{row['wait'][k] * 1e3:.1f}" for k in ("mean", "p95", "p100"))
        hits = "{}/{}".format(*row["hits"]) if row["hits"] else "-"
        once = "yes" if row["samples"] == row["distinct"] == info["samples"] else "NO"
        lines.append(
            row_format.format(
                name, f"{row['samples_per_s']:.0f}", f"{row['samples_per_s'] / local:.2f}", wait,
                hits, f"{row['fetched_bytes'] / row['size_bytes']:.2f}", once,
            )
        )  # fmt: skip
    lines.append("wait: in next(loader), per step; hits: a shard's first reads that found it here")
    return "\n".join(lines + results["notes"])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.split("\n\n")[0]
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--sample-kb", type=float, default=64.0, help="KiB of floats each")
    parser.add_argument("--shard-mb", type=float, default=4.0)
    parser.add_argument("--steps", type=int, default=None, help="at most (default: one epoch)")
    parser.add_argument("--batch-size", type=int, default=16, help="samples per step and rank")
    parser.add_argument("--step-ms", type=float, default=50.0, help="each step's compute (sleep)")
    parser.add_argument("--prefetch-steps", type=int, default=8, help="data.prefetch_steps")
    parser.add_argument("--cache-limit-mb", type=float, default=32.0, help="each reader's cache")
    parser.add_argument("--ranks", type=int, default=1, help="also this many nodes, one by one")
    parser.add_argument("--partitions", type=int, default=1, help="with --ranks: data.partitions")
    parser.add_argument("--no-mosaic", action="store_true", help="skip mosaicml-streaming")
    parser.add_argument("--venv-dir", default="~/.cache/spot-train/bench-data-venv")
    parser.add_argument("--remote", default=None, help="an s3:// bucket (default: moto's)")
    parser.add_argument("--endpoint-url", default=None, help="with --remote")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")


def command(args: argparse.Namespace) -> int:
    if args.remote and not args.remote.startswith("s3://"):
        print(f"error: --remote {args.remote}: an s3:// URL (mosaic's column reads it too)")
        return 2
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="spot-bench-data-") as work:
        results = measure(args, Path(work))
    print(report(results))
    print(f"({time.perf_counter() - began:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0
