"""`python -m spot bench --strategy fsdp --ranks 1,2,4`: sharded checkpoints, side by side with
DCP's own asynchronous path, on real gloo processes on loopback.

For each rank count N, N processes are spawned; each builds the same MLP as the single-writer
bench (`--size-gib` of parameters and AdamW state in all), shards it with FSDP2 (`fully_shard` on
each Linear, then the root, over the gloo group) and takes one training step, so every rank holds
1/N of the state as DTensors. Then, on that same state, alternating which goes first:

- ours: `CheckpointManager(..., async_save=True, shards=ShardGroup(...))`, every rank saving
  together (spot/checkpoint/sharded.py): the stall is what `save()` returns, the persist is the
  time from the request until `wait()` returns (on rank 0 that is the commit, manifest written
  and renamed), the restore is `sharded.load` (every rank reads its shards). Ours also verifies:
  rank 0 hashes every rank's file before a resume; that is a row of its own.
- DCP: `torch.distributed.checkpoint.async_save(state_dict, checkpoint_id=..., process_group=...)`
  with torch's default stager: the stall is until `async_save` returns, the persist until the
  future's `.result()`; the restore is `dcp.load` (then `set_state_dict`, as ours does).

Every figure is the maximum over the ranks of one repetition (the slowest rank holds the others
up), then the median of `--repeats` repetitions with min and max; the first repetition warms up
and is reported apart. Reads are cold: the files' pages are dropped (posix_fadvise) first.

`--strategy ddp --ranks N` asks another question (would DDP, whose state every rank holds whole,
gain from splitting the writing?): rank 0 writing everything the way DDP checkpoints today (one
writer, spot/checkpoint/tensorfile.py) against every rank writing 1/N (the sharded path, the same
total bytes).
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
from pathlib import Path

import torch
from torch import nn

from spot.fsutil import digest_file
from spot.tools.bench import WIDTH, bench_manager, drop_cache, full_state, state_bytes, train_step

DEFAULT_SIZE_GIB = 0.25
DEFAULT_RANKS = [2]


def rank_counts(text: str) -> list[int]:
    """An argparse type: "2" or "1,2,4" (each >= 1)."""
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"{text} is not allowed; give rank counts like 2 or 1,2,4")
    return counts


# ---- in each spawned rank -----------------------------------------------------------------------


def _model(size_bytes: int) -> nn.Sequential:
    """bench.build_state's MLP (the same on every rank: seeded), not yet trained."""
    torch.manual_seed(0)
    per_layer = WIDTH * WIDTH + WIDTH
    layers = max(1, round(size_bytes / 12 / per_layer))
    return nn.Sequential(*[nn.Linear(WIDTH, WIDTH) for _ in range(layers)])


def _trained(model: nn.Module) -> torch.optim.Optimizer:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    torch.manual_seed(1)  # the same batch on every rank
    train_step(model, optimizer)
    return optimizer


def _state(model, optimizer, step: int) -> dict:
    """What the training loop hands a sharded save: model and optimizer by FQN, as DTensors."""
    from spot.checkpoint import sharded

    return {
        **sharded.state_dicts(model, optimizer),
        "scheduler": {"last_epoch": step},
        "trainer": {"step": step, "rng": torch.get_rng_state()},
    }


def _local_bytes(model, optimizer) -> int:
    """This rank's shards of the parameters and the optimizer state, in bytes."""
    from spot.checkpoint import sharded

    local, _ = sharded.local_parts(sharded.state_dicts(model, optimizer))
    return state_bytes(local)


class _Ranks:
    """The collectives the measurements need (nothing in a world of one)."""

    def __init__(self, world):
        self.world = world

    def barrier(self) -> None:
        if self.world.distributed:
            import torch.distributed as dist

            dist.barrier(group=self.world.bulk)

    def drop(self, path: Path) -> None:
        """Every rank's pages of the files under `path` dropped (rank 0 does it), cold reads."""
        self.barrier()
        if self.world.is_leader:
            drop_cache(path)
        self.barrier()


def _since(start: float) -> float:
    return time.perf_counter() - start


def _ours(manager, model, optimizer, step: int, ranks: _Ranks) -> dict[str, float]:
    state = _state(model, optimizer, step)
    ranks.barrier()
    start = time.perf_counter()
    stall = manager.save(step, state, {})
    manager.wait()
    figures = {"stall": stall, "persist": _since(start)}
    if manager.commits:
        figures["background"] = manager.last_persist_seconds
    # Part of the persist: each rank hashes the file it has just written (still in the page
    # cache), which DCP does not; here again, on its own, once rank 0 has committed.
    ranks.barrier()
    mine = manager.root / f"step-{step:09d}" / f"__{manager.shards.rank}_0.distcp"
    start = time.perf_counter()
    digest_file(mine)
    figures["hash"] = _since(start)
    return figures


def _ours_restore(manager, model, optimizer, step: int, group, ranks: _Ranks) -> dict[str, float]:
    from spot.checkpoint import sharded
    from spot.checkpoint.manager import CheckpointManager

    directory = manager.root / f"step-{step:09d}"
    figures = {}
    ranks.drop(directory)
    start = time.perf_counter()
    sharded.load(directory, model, optimizer, group)
    figures["restore"] = _since(start)
    ranks.drop(directory)
    if ranks.world.is_leader:  # a resume: rank 0 verifies every rank's file first
        start = time.perf_counter()
        CheckpointManager.load(directory)
        figures["verify"] = _since(start)
    return figures


def _dcp(model, optimizer, directory: Path, group, ranks: _Ranks) -> dict[str, float]:
    import torch.distributed.checkpoint as dcp

    from spot.checkpoint import sharded

    state = sharded.state_dicts(model, optimizer)  # outside the stall, as for ours
    ranks.barrier()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = time.perf_counter()
        future = dcp.async_save(state, checkpoint_id=str(directory), process_group=group)
        stall = _since(start)
        future.result()
        persist = _since(start)
    return {"stall": stall, "persist": persist}


def _dcp_restore(model, optimizer, directory: Path, group, ranks: _Ranks) -> dict[str, float]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    from spot.checkpoint import sharded

    ranks.drop(directory)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = time.perf_counter()
        state = sharded.state_dicts(model, optimizer)
        dcp.load(state, checkpoint_id=str(directory), process_group=group)
        set_state_dict(
            model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"]
        )
        restore = _since(start)
    ranks.barrier()
    if ranks.world.is_leader:
        shutil.rmtree(directory, ignore_errors=True)
    return {"restore": restore}


def _single_writer(manager, model, optimizer, step: int, ranks: _Ranks) -> dict[str, float]:
    """DDP's checkpoint: rank 0 alone writes its whole replica; the others go on (wait here)."""
    ranks.barrier()
    figures = {}
    if manager is not None:
        start = time.perf_counter()
        figures["stall"] = manager.save(step, full_state(model, optimizer, step), {})
        manager.wait()
        figures["persist"] = _since(start)
        figures["background"] = manager.last_persist_seconds
    ranks.barrier()
    return figures


def _rank(
    rank: int, world_size: int, port: int, work: str, size_bytes: int, repeats: int, mode: str
) -> None:
    """One spawned rank: build, shard, train a step, measure; its figures into rank-<r>.json."""
    from spot.checkpoint.manager import CheckpointManager
    from spot.checkpoint.sharded import ShardGroup
    from spot.distributed import fsdp
    from spot.distributed import world as distributed
    from spot.run.events import EventLog

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    world = distributed.join_on_loopback(rank, world_size, port, 60, 600)
    work_dir = Path(work)
    ranks = _Ranks(world)
    model = fsdp.shard(_model(size_bytes), world.train, torch.device("cpu"), ["Linear"], True, "32")
    optimizer = _trained(model)
    group = world.background_group()
    manager = CheckpointManager(
        work_dir / "ours",
        keep_last=1,
        async_save=True,
        on_corrupt="fail",
        events=EventLog(None),
        meta={"config_digest": "bench", "world_size": world_size},
        shards=ShardGroup(group, rank, world.share),
    )
    manager.prepare(_state(model, optimizer, 0))
    replica = replica_optimizer = replica_manager = None
    if mode == "ddp" and world.is_leader:  # rank 0's whole replica, and DDP's one writer
        replica = _model(size_bytes)
        replica_optimizer = _trained(replica)
        replica_manager = bench_manager(work_dir / "single", async_save=True)
        replica_manager.prepare(full_state(replica, replica_optimizer, 0))
    figures: dict[str, list[float]] = {}

    def record(prefix: str, rep: int, got: dict[str, float]) -> None:
        for name, seconds in got.items():
            key = f"{'warmup_' if rep == 0 else ''}{prefix}_{name}"
            figures.setdefault(key, []).append(seconds)

    for rep in range(repeats + 1):  # repetition 0 warms up (buffers, page faults, threads)
        step = rep + 1
        ours_first = rep % 2 == 0  # alternating, so that a drifting machine favours neither
        for which in ("ours", "other") if ours_first else ("other", "ours"):
            if which == "ours":
                record("ours", rep, _ours(manager, model, optimizer, step, ranks))
                if mode == "fsdp":
                    record(
                        "ours", rep, _ours_restore(manager, model, optimizer, step, group, ranks)
                    )
            elif mode == "fsdp":
                directory = work_dir / f"dcp-{step}"
                record("dcp", rep, _dcp(model, optimizer, directory, group, ranks))
                record("dcp", rep, _dcp_restore(model, optimizer, directory, group, ranks))
            else:
                got = _single_writer(replica_manager, replica, replica_optimizer, step, ranks)
                record("single", rep, got)
    manager.close()
    if replica_manager is not None:
        replica_manager.close()
    result = {
        "rank": rank,
        "local_bytes": _local_bytes(model, optimizer),
        "parameters": sum(p.numel() for p in model.parameters()),  # global sizes (DTensors)
        "seconds": figures,
    }
    (work_dir / f"rank-{rank}.json").write_text(json.dumps(result))
    ranks.barrier()
    distributed.exit_process(0)


# ---- in the bench's own process -----------------------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def measure(ranks: int, size_bytes: int, repeats: int, mode: str, base: Path) -> dict:
    """Spawn `ranks` gloo processes that measure; return the figures, each repetition's the
    maximum over the ranks, and the state's sizes."""
    import torch.multiprocessing as mp

    work = Path(tempfile.mkdtemp(prefix=".spot-bench-fsdp-", dir=base))
    try:
        mp.start_processes(
            _rank,
            args=(ranks, _free_port(), str(work), size_bytes, repeats, mode),
            nprocs=ranks,
            start_method="spawn",
        )
        results = [json.loads((work / f"rank-{r}.json").read_text()) for r in range(ranks)]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    seconds: dict[str, list[float]] = {}
    for key in results[0]["seconds"]:
        per_rank = [r["seconds"][key] for r in results if key in r["seconds"]]
        seconds[key] = [max(rep) for rep in zip(*per_rank, strict=True)]
    local = [r["local_bytes"] for r in results]
    return {
        "ranks": ranks,
        "mode": mode,
        "repeats": repeats,
        "parameters": results[0]["parameters"],
        "state_bytes": sum(local),
        "local_bytes": local,
        "seconds": seconds,
    }


def _cell(samples: list[float] | None) -> str:
    if not samples:
        return f"{'-':>28}"
    median = statistics.median(samples)
    return f"{median:8.3f} s [{min(samples):.3f} - {max(samples):.3f}]".rjust(28)


def report(figures: dict) -> str:
    s = figures["seconds"]
    n = figures["ranks"]
    local = max(figures["local_bytes"]) / 2**30
    first, second = ("ours", "dcp") if figures["mode"] == "fsdp" else ("single", "ours")
    heads = (
        ("ours (CheckpointManager)", "DCP async_save", "ours/DCP")
        if figures["mode"] == "fsdp"
        else ("rank 0 writes all", f"each rank writes 1/{n}", "1/N vs rank 0")
    )
    lines = [
        f"{figures['mode']}, {n} rank{'s' if n > 1 else ''}: {figures['state_bytes'] / 2**30:.3f} GiB "
        f"in all ({figures['parameters'] / 1e6:.1f}M parameters + AdamW state), "
        f"{local:.3f} GiB per rank{' (split; replicated: all of it)' if n > 1 and figures['mode'] == 'ddp' else ''}; "
        "each repetition the slowest rank's, "
        f"median [min - max] of {figures['repeats']}",
        f"{'':28s} {heads[0]:>28s} {heads[1]:>28s} {heads[2]:>14s}",
    ]
    rows = [("stall", "stall (save call)"), ("persist", "persist (request to commit)")]
    if figures["mode"] == "fsdp":
        rows.append(("restore", "restore (cold)"))
    for key, label in rows:
        a, b = s.get(f"{first}_{key}"), s.get(f"{second}_{key}")
        ratio = ""
        if a and b:
            top, bottom = (a, b) if figures["mode"] == "fsdp" else (b, a)
            ratio = f"{statistics.median(top) / statistics.median(bottom):14.3f}"
        lines.append(f"{label:28s} {_cell(a)} {_cell(b)} {ratio}")
    split = "ours" if figures["mode"] == "fsdp" else f"1/{n}"
    extra = [
        ("ours_hash", f"  {split}: hashing its own file (warm), slowest rank"),
        ("ours_verify", f"  {split}: rank 0 verifies every file (cold), before a resume"),
        ("ours_background", f"  {split}: background write to commit (rank 0)"),
        ("single_background", "  rank 0 alone: background write to commit"),
    ]
    for key, label in extra:
        if key in s:
            lines.append(f"{label:57s} {_cell(s[key])}")
    warm = [
        f"{name} {s[f'warmup_{key}_stall'][0]:.3f} s"
        for key, name in ((first, heads[0]), (second, heads[1]))
        if f"warmup_{key}_stall" in s
    ]
    if warm:
        lines.append(f"  first save's stall (warm-up, not in the medians): {', '.join(warm)}")
    return "\n".join(lines)


def command(args: argparse.Namespace) -> int:
    counts = args.ranks or DEFAULT_RANKS
    size_gib = args.size_gib if args.size_gib is not None else DEFAULT_SIZE_GIB
    base = args.dir or Path.cwd()
    base.mkdir(parents=True, exist_ok=True)
    print(
        f"disk: {base}, {os.cpu_count()} CPUs; ranks are gloo processes on loopback, "
        f"{args.repeats} repetitions after a warm-up",
        flush=True,
    )
    everything = []
    for n in counts:
        figures = measure(n, int(size_gib * 2**30), args.repeats, args.strategy, base)
        everything.append(figures)
        print("\n" + report(figures), flush=True)
    if args.json:
        args.json.write_text(json.dumps(everything, indent=1))
    return 0
