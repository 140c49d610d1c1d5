"""`python -m spot bench`: checkpoint performance on this machine and this disk, side by side.

Every figure is measured in the same run on the same state (an MLP with AdamW state, about
`--size-gib` in all) and printed as the median of `--repeats` repetitions with min and max, next
to the ratio the project's targets are stated in. Reads are cold: the files' pages are dropped
from the page cache (posix_fadvise DONTNEED) before each load.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from torch import nn

from spot.buckets import add_remote_arguments, remote_arguments
from spot.checkpoint.manager import CheckpointManager
from spot.checkpoint.tensorfile import SnapshotBuffer
from spot.fsutil import fsync_file
from spot.run.events import EventLog
from spot.tree import map_tensors

WIDTH = 1024


def build_state(size_bytes: int, seed: int = 0):
    """A model plus AdamW state of about `size_bytes` (parameters, exp_avg, exp_avg_sq: 12 B each)."""
    torch.manual_seed(seed)
    per_layer = WIDTH * WIDTH + WIDTH
    layers = max(1, round(size_bytes / 12 / per_layer))
    model = nn.Sequential(*[nn.Linear(WIDTH, WIDTH) for _ in range(layers)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    train_step(model, optimizer)
    return model, optimizer


def bench_manager(root: Path, async_save: bool = True) -> CheckpointManager:
    return CheckpointManager(
        root,
        keep_last=1,
        async_save=async_save,
        on_corrupt="fail",
        events=EventLog(None),
        meta={"config_digest": "bench", "world_size": 1},
    )


def forward_backward(model: nn.Module, optimizer: torch.optim.Optimizer, batch: int = 8) -> None:
    loss = model(torch.randn(batch, WIDTH)).square().mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    forward_backward(model, optimizer)
    optimizer.step()


def checkpointed_step(manager: CheckpointManager, model, optimizer, step: int) -> float:
    """Checkpoint at a step boundary the way train.py does, then the next step; return the stall
    (the save call plus any wait for the deferred copy before the optimizer step)."""
    # The benchmark model has no buffers: model and optimizer both stay unchanged until the step.
    state = full_state(model, optimizer, step)
    stall = manager.save(step, state, {}, defer=("optimizer", "model"))
    forward_backward(model, optimizer)
    stall += manager.before_update()
    optimizer.step()
    return stall


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> dict:
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": {"last_epoch": step},
        "trainer": {"step": step, "rng": torch.get_rng_state()},
    }


def state_bytes(state) -> int:
    sizes: list[int] = []
    map_tensors(state, lambda t: sizes.append(t.numel() * t.element_size()))
    return sum(sizes)


def drop_cache(path: Path) -> None:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for file in files:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _raw_write(path: Path, data: torch.Tensor, direct: bool = False) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if direct else 0)
    fd = os.open(path, flags, 0o644)
    try:
        view, written = memoryview(data.numpy()), 0
        while written < len(view):
            written += os.write(fd, view[written : written + 2**30])
        os.fsync(fd)
    finally:
        os.close(fd)


def _torch_save(state: dict, path: Path) -> None:
    torch.save(state, path)
    fsync_file(path)


def _cold(fn: Callable[[Path], object], path: Path) -> float:
    drop_cache(path)
    return timed(lambda: fn(path))


def measure(model, optimizer, work: Path, repeats: int, with_dcp: bool) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {}
    manager = bench_manager(work / "project", async_save=True)
    manager.prepare(full_state(model, optimizer, 0))
    buffer = SnapshotBuffer()
    buffer.reserve(full_state(model, optimizer, 0))
    raw_file, torch_file = work / "raw.bin", work / "torch.pt"
    for rep in range(repeats + 1):  # repetition 0 warms up (first page faults, allocator)
        step = rep + 1
        stall = checkpointed_step(manager, model, optimizer, step)
        manager.wait()
        figures = {"stall": stall, "persist": manager.last_persist_seconds}
        state = full_state(model, optimizer, step)
        figures["memory_copy"] = timed(partial(buffer.capture, state))
        figures["raw_write_fsync"] = timed(partial(_raw_write, raw_file, buffer.data))
        figures["raw_direct_fsync"] = timed(partial(_raw_write, raw_file, buffer.data, direct=True))
        figures["torch_save_fsync"] = timed(partial(_torch_save, state, torch_file))
        figures["restore_verify"] = _cold(CheckpointManager.load, manager.root / f"step-{step:09d}")
        figures["torch_load"] = _cold(
            partial(torch.load, map_location="cpu", weights_only=True), torch_file
        )
        if with_dcp:
            figures["dcp_stall"], figures["dcp_total"] = measure_dcp(model, optimizer, work / "dcp")
        for name, seconds in figures.items():
            results.setdefault(f"warmup_{name}" if rep == 0 else name, []).append(seconds)
    manager.close()
    return results


def measure_dcp(model, optimizer, path: Path) -> tuple[float, float]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = time.perf_counter()
        model_sd, optim_sd = get_state_dict(model, optimizer)
        future = dcp.async_save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path))
        stall = time.perf_counter() - start
        future.result()
        total = time.perf_counter() - start
    shutil.rmtree(path, ignore_errors=True)
    return stall, total


def throughput(model, optimizer, work: Path, every: float, pairs: int) -> dict:
    """Training throughput with a checkpoint every `every` seconds versus none.

    Measured in adjacent pairs of blocks `every` seconds long, one without a checkpoint and one
    with a checkpoint at its start, in alternating order, so that the machine's drift (a shared
    VM's speed wanders by 10% over minutes) cancels; the loss is 1 - the median of the pairs'
    rate ratios."""
    manager = bench_manager(work / "e2e", async_save=True)
    step = 0

    def block(checkpoint: bool) -> float:
        nonlocal step
        start, steps = time.perf_counter(), 0
        while time.perf_counter() - start < every:
            step += 1
            if checkpoint and steps == 0:
                checkpointed_step(manager, model, optimizer, step)
            else:
                train_step(model, optimizer)
            steps += 1
        rate = steps / (time.perf_counter() - start)
        manager.wait()  # a persist still running at the block's end would be mis-attributed
        return rate

    block(True)  # warm-up: allocates the snapshot buffer
    ratios, rates = [], {"none": [], "checkpoint": []}
    for pair in range(pairs):
        order = (False, True) if pair % 2 == 0 else (True, False)
        got = {flag: block(flag) for flag in order}
        rates["none"].append(got[False])
        rates["checkpoint"].append(got[True])
        ratios.append(got[True] / got[False])
    manager.close()
    return {
        "steps_per_second_none": statistics.median(rates["none"]),
        "steps_per_second_checkpoint": statistics.median(rates["checkpoint"]),
        "loss": 1 - statistics.median(ratios),
        "checkpoints": pairs,
    }


def measure_upload(ckpt_dir: Path, target: str, endpoint: str | None, repeats: int) -> dict:
    """This project's upload of a checkpoint beside `aws s3 cp --recursive` of the same files to
    the same endpoint, alternating. target: s3://bucket/prefix, or "local" for a moto S3 server
    started here on loopback."""
    import socket
    import subprocess
    import sys

    from spot.checkpoint.storage import open_store

    server = None
    env = dict(os.environ)
    if target == "local":
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        server = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        endpoint = f"http://127.0.0.1:{port}"
        for key, value in (
            ("AWS_ACCESS_KEY_ID", "bench"),
            ("AWS_SECRET_ACCESS_KEY", "bench"),
            ("AWS_DEFAULT_REGION", "us-east-1"),
        ):
            os.environ.setdefault(key, value)
            env.setdefault(key, value)
        target = "s3://spot-bench/bench"
    try:
        store = open_store(f"{target.rstrip('/')}/spot", endpoint_url=endpoint)
        bucket, prefix = store.bucket.name, store.prefix.rsplit("/", 1)[0]
        if server is not None:
            for _ in range(100):
                try:
                    store.bucket.client.create_bucket(Bucket=bucket)
                    break
                except Exception:
                    time.sleep(0.1)
        store.check_access()
        store.claim()
        aws = shutil.which("aws")
        results: dict[str, list[float]] = {"upload": [], "aws_s3_cp": []}
        step = int(ckpt_dir.name.split("-")[1])
        for _ in range(repeats):
            results["upload"].append(timed(partial(store.upload, ckpt_dir, step)))
            if aws:
                command = [
                    aws,
                    "s3",
                    "cp",
                    "--recursive",
                    "--only-show-errors",
                    str(ckpt_dir),
                    f"s3://{bucket}/{prefix}/awscli/{ckpt_dir.name}/",
                ]
                if endpoint:
                    command += ["--endpoint-url", endpoint]
                results["aws_s3_cp"].append(
                    timed(partial(subprocess.run, command, env=env, check=True))
                )
        return {k: v for k, v in results.items() if v}
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=10)


def summarize(samples: list[float]) -> str:
    return f"{statistics.median(samples):8.3f} s  [{min(samples):.3f} - {max(samples):.3f}]"


def report(results: dict, e2e: dict | None, info: dict) -> str:
    med = {k: statistics.median(v) for k, v in results.items()}
    lines = [
        f"state: {info['state_gib']:.2f} GiB ({info['parameters'] / 1e6:.1f}M parameters + AdamW state), "
        f"disk: {info['dir']}, {info['repeats']} repetitions, median [min - max]",
        "",
    ]
    rows = [
        ("stall", "training-loop stall, this project (async)"),
        ("warmup_stall", "  first checkpoint (warm-up, not in the median)"),
        ("torch_save_fsync", "torch.save + fsync (synchronous)"),
        ("dcp_stall", "DCP async_save: stall until it returns"),
        ("dcp_total", "DCP async_save: total"),
        ("memory_copy", "memory copy into reused buffers (floor)"),
        ("raw_write_fsync", "raw sequential write + fsync (floor)"),
        ("raw_direct_fsync", "  the same with O_DIRECT"),
        ("persist", "background persist, this project"),
        ("restore_verify", "restore + verify, this project (cold)"),
        ("torch_load", "torch.load, weights_only (cold)"),
        ("upload", "upload, this project (hashed as sent, multipart)"),
        ("aws_s3_cp", "upload, aws s3 cp --recursive (same files)"),
        ("client_upload", "upload, the client's own transfer (same files)"),
        ("download", "download + verify, this project"),
        ("client_download", "download, the client's own transfer"),
    ]
    for key, label in rows:
        if key in results:
            lines.append(f"{label:46s} {summarize(results[key])}")
    lines += ["", "targets (ratios of medians):"]

    def ratio(a: str, b: str, limit: float, text: str) -> None:
        if a in med and b in med:
            r = med[a] / med[b]
            lines.append(
                f"  {text:52s} {r:6.3f}  (target <= {limit})  {'ok' if r <= limit else 'MISSED'}"
            )

    ratio("stall", "torch_save_fsync", 0.10, "stall / torch.save+fsync")
    ratio("stall", "dcp_stall", 1.0, "stall / DCP async_save stall")
    ratio("persist", "raw_write_fsync", 1.25, "background persist / raw write+fsync")
    ratio("persist", "raw_direct_fsync", 1.25, "background persist / raw O_DIRECT write+fsync")
    ratio("restore_verify", "torch_load", 1.3, "restore+verify / torch.load")
    ratio("upload", "aws_s3_cp", 1.0, "upload / aws s3 cp")
    ratio("upload", "client_upload", 1.25, "upload / the client's own upload")
    ratio("download", "client_download", 1.25, "download+verify / the client's own download")
    lines.append(
        f"  {'snapshot host memory / state size':52s} {info['snapshot_ratio']:6.3f}  (target <= 1.0)"
    )
    if e2e:
        lines.append(
            f"  {'throughput loss, checkpoint every ' + str(info['every']) + ' s':52s} "
            f"{100 * e2e['loss']:5.1f}%  (target <= 3%)  "
            f"[{e2e['steps_per_second_none']:.3f} vs {e2e['steps_per_second_checkpoint']:.3f} steps/s, "
            f"median of {e2e['checkpoints']} pairs]"
        )
    return "\n".join(lines)


def _at_least(convert, low: float, strict: bool = False):
    """An argparse type: a number >= low (> low when strict), else one line saying so."""

    def parse(text: str):
        value = convert(text)
        if value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(
                f"{text} is not allowed; must be {'>' if strict else '>='} {low}"
            )
        return value

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from spot.tools.bench_fsdp import rank_counts

    parser.add_argument(
        "--size-gib",
        type=_at_least(float, 0, strict=True),
        default=None,
        help="state size (default 1.0; 0.25 with --ranks or --strategy fsdp)",
    )
    parser.add_argument(
        "--strategy",
        choices=("ddp", "fsdp"),
        default="ddp",
        help="fsdp: sharded checkpoints on --ranks gloo processes, beside DCP's async_save; "
        "ddp with --ranks: rank 0 writing everything beside every rank writing 1/N",
    )
    parser.add_argument(
        "--ranks",
        type=rank_counts,
        default=None,
        help="rank counts to spawn, one after the other, e.g. 1,2,4 (default 2 with fsdp)",
    )
    parser.add_argument("--repeats", type=_at_least(int, 1), default=5)
    parser.add_argument(
        "--dir", type=Path, default=None, help="where to write (default: a temp dir in the cwd)"
    )
    parser.add_argument("--no-dcp", action="store_true", help="skip torch.distributed.checkpoint")
    parser.add_argument(
        "--every",
        type=_at_least(float, 0, strict=True),
        default=10.0,
        help="checkpoint interval, e2e run",
    )
    parser.add_argument(
        "--pairs", type=_at_least(int, 0), default=6, help="e2e block pairs (0 skips it)"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument(
        "--s3",
        default=None,
        help='upload column: s3://bucket/prefix, or "local" for a moto server on loopback',
    )
    parser.add_argument(
        "--remote",
        default=None,
        help="upload and download columns beside the client's own transfer: s3://, gs:// or "
        "az://bucket/prefix (spot/tools/bench_remote.py)",
    )
    add_remote_arguments(parser)


def command(args: argparse.Namespace) -> int:
    if args.strategy == "fsdp" or args.ranks:  # several ranks: spot/tools/bench_fsdp.py
        from spot.tools import bench_fsdp

        return bench_fsdp.command(args)
    args.size_gib = 1.0 if args.size_gib is None else args.size_gib
    model, optimizer = build_state(int(args.size_gib * 2**30))
    base = args.dir or Path.cwd()
    base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".spot-bench-", dir=base))
    try:
        results = measure(model, optimizer, work, args.repeats, with_dcp=not args.no_dcp)
        if args.s3:
            upload_dir = work / "upload"
            manager = bench_manager(upload_dir, async_save=False)
            manager.save(1, full_state(model, optimizer, 1), {})
            results.update(
                measure_upload(
                    upload_dir / "step-000000001", args.s3, args.endpoint_url, args.repeats
                )
            )
        if args.remote:
            from spot.tools.bench_remote import measure_remote

            remote_dir = work / "remote"
            manager = bench_manager(remote_dir, async_save=False)
            manager.save(1, full_state(model, optimizer, 1), {})
            checkpoint = remote_dir / "step-000000001"
            options = remote_arguments(args)
            results.update(measure_remote(checkpoint, args.remote, options, args.repeats, timed))
        e2e = None
        if args.pairs > 0:
            e2e = throughput(model, optimizer, work, args.every, args.pairs)
        size = state_bytes(full_state(model, optimizer, 0))
        snapshot = SnapshotBuffer()
        snapshot.capture(full_state(model, optimizer, 0))
        info = {
            "state_gib": size / 2**30,
            "parameters": sum(p.numel() for p in model.parameters()),
            "dir": str(base),
            "repeats": args.repeats,
            "every": args.every,
            "snapshot_ratio": snapshot.nbytes / size,
        }
        print(report(results, e2e, info))
        if args.json:
            args.json.write_text(
                json.dumps({"info": info, "seconds": results, "e2e": e2e}, indent=1)
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0
