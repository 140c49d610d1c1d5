"""`python -m spot <command>`: the library's tools (`python -m spot --help` lists them, and
`python -m spot <command> --help` says what each takes). The table is COMMANDS below; each tool
defines its own arguments."""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import sys
from pathlib import Path

import torch

from spot.buckets import add_remote_arguments, is_url, remote_arguments
from spot.checkpoint import manifest
from spot.checkpoint.manager import CheckpointManager, list_step_dirs
from spot.checkpoint.manifest import STEP_DIR, CorruptCheckpoint
from spot.run.identity import RunPaths


def _checkpoint_dirs(path: Path) -> list[Path]:
    if STEP_DIR.match(path.name):
        return [path]
    if RunPaths.at(path).checkpoints.is_dir():
        path = RunPaths.at(path).checkpoints
    if not path.is_dir():
        raise SystemExit(
            f"error: {path} is not a run directory, a checkpoints directory or a step-* directory"
        )
    return [p for _, p in list_step_dirs(path)]


def _when(ts: float | None) -> str:
    return dt.datetime.fromtimestamp(ts).isoformat(timespec="seconds") if ts else "-"


def cmd_list(path: Path, full: bool) -> int:
    dirs = _checkpoint_dirs(path)
    if not dirs:
        print(f"no checkpoints in {path}")
        return 0
    print(f"{'step':>9}  {'epoch':>5}  {'bytes':>12}  {'created':19}  status")
    bad, best = 0, None  # the best so far, as the newest checkpoint records it (keep_best)
    for d in dirs:
        try:
            m = manifest.verify(d, here=True) if full else manifest.read(d)
            best = m.get("best") if best is None else best
            mark = ""
            if best and best["step"] == m.step:
                mark = f", best ({best['metric']} {best['value']:.6g})"
            if absent := manifest.elsewhere(d, m):  # node-local disks: other nodes' shards
                mark += f", {len(absent)} file(s) of other nodes only in the bucket"
            print(
                f"{m.step:>9}  {m.get('epoch', '-'):>5}  {m.total_bytes:>12}  {_when(m.get('created')):19}  valid{mark}"
            )
        except CorruptCheckpoint as exc:
            bad += 1
            print(f"{d.name[5:]:>9}  {'-':>5}  {'-':>12}  {'-':19}  INVALID: {exc}")
    return 1 if bad else 0


def cmd_remote(url: str, command: str, remote: dict) -> int:
    """list / verify / inspect on a run's checkpoints in a bucket (downloads go to a temp dir)."""
    import tempfile

    from spot.buckets import BucketError
    from spot.checkpoint.storage import RemoteError, open_store

    try:
        store = open_store(url, **remote)
        store.check_access()
        found = store.list_checkpoints()
    except (RemoteError, BucketError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not found:
        print(f"no checkpoints in {url}")
        return 0 if command == "list" else 1
    if command == "list":  # the check retention makes (verify reads every byte)
        from spot.checkpoint.upload import remote_problem

        print(f"{'step':>9}  {'bytes':>12}  {'modified':19}  status")
        for c in found:
            if not c.committed:
                status = "INCOMPLETE: no manifest (upload interrupted or in progress)"
            else:
                try:
                    problem = remote_problem(store, c)
                except BucketError as exc:
                    problem = f"unreadable ({exc})"
                status = "uploaded" if problem is None else f"UNVERIFIED: {problem}"
            print(f"{c.step:>9}  {c.bytes:>12}  {_when(c.modified):19}  {status}")
        return 0
    bad = 0
    with tempfile.TemporaryDirectory() as tmp:
        for c in found:
            if not c.committed:
                continue
            try:
                local = store.download(c.step, Path(tmp))
            except CorruptCheckpoint as exc:
                bad += 1
                print(f"{c.step:>9}  INVALID: {exc}")
                continue
            if command == "inspect":
                return cmd_inspect(local)
            print(f"{c.step:>9}  valid")
    return 1 if bad else 0


def cmd_inspect(path: Path) -> int:
    for d in _checkpoint_dirs(path):
        try:
            loaded = CheckpointManager.load(d, whole=True)
        except CorruptCheckpoint as exc:
            print(f"{d.name}: INVALID: {exc}", file=sys.stderr)
            continue
        m = loaded.manifest
        print(f"{d}")
        for key in (
            "step",
            "epoch",
            "samples_in_epoch",
            "world_size",
            "config_digest",
            "library_version",
            "run",
        ):
            print(f"  {key}: {m.get(key)}")
        for file, entry in m.files.items():
            print(f"  {file}: {entry['bytes']} bytes, {m['hash']} {entry['digest']}")
        tensors = [(k, v) for k, v in loaded.state["model"].items() if isinstance(v, torch.Tensor)]
        count = sum(v.numel() for _, v in tensors)
        print(f"  model: {len(tensors)} tensors, {count} parameters and buffers")
        for k, v in tensors[:20]:
            print(f"    {k}: {tuple(v.shape)} {str(v.dtype).removeprefix('torch.')}")
        return 0
    print(f"no valid checkpoint in {path}", file=sys.stderr)
    return 1


def _add_checkpoint_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "path",
        help="a run directory, its checkpoints/, one step-*, or a bucket's run: "
        "s3://, gs:// or az://bucket/prefix/name/id",
    )
    add_remote_arguments(parser)


def _checkpoints(args: argparse.Namespace) -> int:
    if is_url(args.path):
        return cmd_remote(args.path, args.command, remote_arguments(args))
    if args.command == "inspect":
        return cmd_inspect(Path(args.path))
    return cmd_list(Path(args.path), full=args.command == "verify")


# name: (help, the module that defines its arguments and runs it, its add-arguments and run
# functions). Each tool's arguments and --help are its own.
COMMANDS = {
    "list": ("list checkpoints (manifests only: fast)", __name__, None, None),
    "verify": ("verify every checkpoint completely; exit 1 if any is bad", __name__, None, None),
    "inspect": ("show the newest valid checkpoint (or the one PATH names)", __name__, None, None),
    "data": (
        "data sets as shards: python -m spot data write OUT [-- OVERRIDES]",
        "spot.shards.write",
        "add_arguments",
        "command",
    ),
    "bench": (
        "checkpoint performance on this machine",
        "spot.tools.bench",
        "add_arguments",
        "command",
    ),
    "cost": (
        "spot economics, or a finished run's wall time and cost",
        "spot.run.goodput",
        "add_arguments",
        "command",
    ),
    "report": (
        "a PNG of a run: loss, interruptions, wall time, cost (needs matplotlib)",
        "spot.tools.report",
        "add_arguments",
        "command",
    ),
    "chaos": (
        "train under random interruptions, compare bitwise (python -m spot chaos -- OVERRIDES)",
        "spot.tools.chaos",
        "add_arguments",
        "command",
    ),
    "bench-data": (
        "a data set of shards from a bucket vs local disk vs mosaic streaming, side by side",
        "spot.tools.bench_data",
        "add_arguments",
        "command",
    ),
    "bench-restart": (
        "elastic worker restarts, forkserver vs spawn, side by side: where the time goes",
        "spot.tools.restart_bench",
        "add_arguments",
        "command",
    ),
    "emulate": (
        "a local AWS/GCP/Azure metadata endpoint that can issue notices or misbehave",
        "spot.tools.emulate",
        "add_arguments",
        "command",
    ),
    "export": (
        "a checkpoint's model weights as safetensors or a torch state dict",
        "spot.tools.export",
        "add_arguments",
        "command",
    ),
    "rendezvous": (
        "serve the c10d rendezvous store (elastic.rdzv_store_host=external)",
        "spot.distributed.rendezvous",
        "add_rendezvous_arguments",
        "rendezvous",
    ),
}


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="python -m spot", description="the library's tools")
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, module, add, run) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if add is None:  # list, verify, inspect: here
            _add_checkpoint_arguments(p)
            p.set_defaults(func=_checkpoints)
        else:
            tool = importlib.import_module(module)
            getattr(tool, add)(p)
            p.set_defaults(func=getattr(tool, run))
    return top


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    after: list[str] = []
    if "--" in argv:  # the Hydra overrides of a tool that takes them: argparse alone drops them
        at = argv.index("--")  # after an option that follows a positional (`write OUT --x 1 --`)
        argv, after = argv[:at], argv[at + 1 :]
    tools = parser()
    args = tools.parse_args(argv)
    if after:
        if not hasattr(args, "overrides"):
            tools.error(f"{args.command} takes no overrides after --")
        args.overrides = [*args.overrides, *after]
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
