"""Sharded checkpoints (trainer.strategy=fsdp): every rank writes its own shards.

The model and optimizer go through torch.distributed.checkpoint (DCP), so DCP's own tools read
them and a load reshards them to any world size. A sharded checkpoint's step directory holds

    __<rank>_0.distcp      each rank's shards of the model and optimizer (DCP's format)
    .metadata              DCP's index of every shard (rank 0, once every rank has written)
    scheduler.*, trainer.* rank 0's components, as in every checkpoint (spot/checkpoint/tensorfile.py)
    manifest.json          last, by rank 0, once every rank has reported its files (size, xxh3)

so the commit is the same as for DDP: no manifest, no checkpoint; a file missing or failing its
checksum, and the checkpoint is skipped as corrupt.

Nothing read back is unpickled freely: `.metadata` goes through an allow-list of DCP's own
classes, and the non-tensor values (the optimizer's hyper-parameters) load with
weights_only=True, as every other checkpoint file does.
"""

from __future__ import annotations

import contextlib
import io
import pickle
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from spot.failpoints import failpoint
from spot.fsutil import digest_file
from spot.run.config import one_line
from spot.tree import map_tensors, shape_misfit

SHARDED = ("model", "optimizer")  # the components DCP writes; the others are rank 0's
# A world of one saves and loads with no process group, as intended: DCP says so at each call.
warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
METADATA = ".metadata"
_SHARD_FILE = re.compile(r"^__(\d+)_\d+\.distcp$")


class ShardWriteError(Exception):
    """Some rank could not write its shards; str() names the rank and why."""


class ShardReadError(Exception):
    """Shards that verified but do not load; str() says why in one line."""


def _dcp_failure():
    """DCP's CheckpointException, which derives from BaseException: `except Exception` misses
    it, so every DCP call here catches it by name."""
    from torch.distributed.checkpoint.api import CheckpointException

    return CheckpointException


def is_shard_file(name: str) -> bool:
    return name == METADATA or bool(_SHARD_FILE.match(name))


def state_dicts(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The model's and optimizer's state as DCP saves and loads it: by parameter name (FQN), each
    tensor a DTensor of which this rank holds its shard (a plain tensor in a world of one)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optimizer_state}


# ---- the host copy: a DTensor is its local shard plus how to put it back -----------------------


def local_parts(tree: Any) -> tuple[Any, list]:
    """The tree with each DTensor replaced by this rank's shard (what a snapshot copies), and
    what `as_dtensors` needs to wrap the copies again, in the tree's order."""
    from torch.distributed.tensor import DTensor

    specs: list = []

    def local(t: torch.Tensor) -> torch.Tensor:
        if isinstance(t, DTensor):
            specs.append((t.device_mesh, t.placements, t.shape, t.stride()))
            return t.to_local().detach()
        specs.append(None)
        return t

    with torch.no_grad():
        return map_tensors(tree, local), specs


def _own_storage(t: torch.Tensor) -> torch.Tensor:
    """The same memory as a tensor whose storage is exactly its own: DCP's writer clones every
    tensor with a larger storage (to not save the rest of it), and a snapshot's tensors are
    slices of one buffer. Aliased, not copied."""
    if t.device.type != "cpu" or not t.is_contiguous() or not t.numel():
        return t
    raw = t.reshape(-1).view(torch.uint8)
    if raw.untyped_storage().nbytes() == raw.numel():
        return t
    own = torch.frombuffer(memoryview(raw.numpy()), dtype=torch.uint8)
    return own.view(t.dtype).reshape(t.shape)


def as_dtensors(tree: Any, specs: list, host_mesh=None) -> Any:
    """`local_parts` undone on copies of the shards (host memory): DCP plans from the DTensors'
    global shapes and offsets, and writes the local data it finds in them. `host_mesh`: the
    mesh for copies in host memory (ShardGroup.host_mesh), where the shards' own is CUDA's."""
    from torch.distributed.tensor import DTensor

    remaining = iter(specs)

    def wrap(t: torch.Tensor) -> torch.Tensor:
        spec = next(remaining)
        t = _own_storage(t)
        if spec is None:
            return t
        mesh, placements, shape, stride = spec
        if host_mesh is not None and mesh.device_type != t.device.type:
            mesh = host_mesh
        return DTensor.from_local(t, mesh, placements, run_check=False, shape=shape, stride=stride)

    return map_tensors(tree, wrap)


# ---- writing ------------------------------------------------------------------------------------


class ShardGroup:
    """The ranks that write a sharded checkpoint together, and the collectives they need for it:
    `group` a gloo group of every rank (its own, so a write in the background threads never
    meets the training loop's collectives; None in a world of one), `share` the foreground
    broadcast of rank 0's decisions (spot.distributed.world.World.share).

    Every rank takes the same collectives whatever fails where: a rank that cannot even start
    (its directory, a failpoint) says so before DCP's collectives begin, and then no rank
    enters them; every rank reports to rank 0 after, success or failure."""

    def __init__(
        self, group, rank: int, share: Callable[[Any], Any] = lambda obj: obj, publisher=None
    ):
        """`publisher`: on node-local disks, how this rank puts its files in the bucket and
        where on its disk they go (spot.checkpoint.parts.Publisher); None on a shared disk."""
        self.group, self.rank, self.share = group, rank, share
        self.publisher = publisher
        self._host_mesh = None

    @property
    def commits(self) -> bool:
        """Rank 0 writes the manifest: it commits (and retains, and uploads)."""
        return self.rank == 0

    @property
    def size(self) -> int:
        """How many ranks write each checkpoint."""
        if self.group is None:
            return 1
        import torch.distributed as dist

        return dist.get_world_size(self.group)

    @property
    def host_mesh(self):
        """A CPU mesh over this group, for the DTensors of a host snapshot: on a CUDA mesh,
        DTensor.from_local would copy each shard back to a GPU. (Both meshes are every rank in
        order: the same coordinates.) None in a world of one."""
        if self._host_mesh is None and self.group is not None:
            from torch.distributed.device_mesh import DeviceMesh

            self._host_mesh = DeviceMesh.from_group(self.group, "cpu")
        return self._host_mesh

    def write(
        self, directory: Path, make_state: Callable[[], dict[str, Any]], step: int
    ) -> dict[str, dict]:
        """Every rank, together: DCP writes the state `make_state` gives into `directory` (rank
        0's temporary directory; on node-local disks another node's ranks write into the step's
        directory there), each rank its own file, which it then hashes (and, on node-local
        disks, uploads). Returns every rank's files (with size, digest, the rank that wrote it,
        and the ETag if uploaded) on rank 0, {} on the others. ShardWriteError on rank 0 if any
        rank failed, on another rank if it did."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import FileSystemWriter

        mine: dict[str, dict] = {}
        error = None
        where = directory if self.publisher is None else self.publisher.directory(directory, step)
        try:
            failpoint("checkpoint.persist", step, rank=self.rank)
            where.mkdir(parents=True, exist_ok=True)
            state = make_state()
        except Exception as exc:
            error = f"rank {self.rank} could not write its shards: {one_line(exc)}"
        if self._every_rank(error is None):
            try:
                writer = FileSystemWriter(where, single_file_per_rank=True, sync_files=True)
                dcp.save(state, storage_writer=writer, process_group=self.group)
                names = [
                    p.name
                    for p in where.iterdir()
                    if (m := _SHARD_FILE.match(p.name)) and int(m.group(1)) == self.rank
                ]
                if self.commits:
                    names.append(METADATA)
                for name in sorted(names):
                    size, digest = digest_file(where / name)
                    mine[name] = {"bytes": size, "digest": digest, "rank": self.rank}
                if self.publisher is not None:  # (.metadata goes up with rank 0's other files)
                    data = {f: entry for f, entry in mine.items() if f != METADATA}
                    mine.update(self.publisher.publish(where, data, step))
                    failpoint("checkpoint.shards_published", step, rank=self.rank)
            except (Exception, _dcp_failure()) as exc:
                error = f"rank {self.rank} could not write its shards: {one_line(exc)}"
        elif error is None:
            error = "another rank could not start writing its shards"
        reports = self._to_leader((step, directory.name, mine, error))
        if self.publisher is not None:
            self.publisher.prune(step)
        if not self.commits:
            if error:
                raise ShardWriteError(error)
            return {}
        failed = [e for *_, e in reports if e and "another rank" not in e] or [
            e for *_, e in reports if e
        ]
        if failed:
            raise ShardWriteError(failed[0])
        strays = [(s, d) for s, d, *_ in reports if (s, d) != (step, directory.name)]
        if strays:  # a rank out of step with rank 0: never commit such a mix
            raise ShardWriteError(f"a rank wrote step {strays[0][0]} into {strays[0][1]}")
        files: dict[str, dict] = {}
        for *_, part, _ in reports:
            files.update(part)
        return files

    def _every_rank(self, ready: bool) -> bool:
        """Whether every rank is ready (one small all-reduce on the group)."""
        if self.group is None:
            return ready
        import torch.distributed as dist

        flag = torch.tensor([int(ready)], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.group)
        return bool(flag.item())

    def _to_leader(self, report: tuple) -> list | None:
        """Every rank's report on rank 0, in rank order (None elsewhere)."""
        if self.group is None:
            return [report]
        import torch.distributed as dist

        reports = [None] * dist.get_world_size(self.group) if self.commits else None
        dist.gather_object(report, reports, dst=0, group=self.group)
        return reports


# ---- reading ------------------------------------------------------------------------------------

_METADATA_CLASSES = {
    *(
        ("torch.distributed.checkpoint.metadata", name)
        for name in (
            "Metadata",
            "MetadataIndex",
            "ChunkStorageMetadata",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "TensorProperties",
            "StorageMeta",
            "_MEM_FORMAT_ENCODING",
        )
    ),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "Path"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's `.metadata` is a pickle: only DCP's metadata classes, torch's sizes, dtypes and
    layouts, and paths may be named in it (a pickle can name any callable)."""

    def find_class(self, module: str, name: str) -> Any:
        # Exact names only: pickle resolves a dotted name attribute by attribute, so an allowed
        # module's "os.system" would reach whatever that module imported.
        if (module, name) in _METADATA_CLASSES:
            return super().find_class(module, name)
        if (
            module == "torch"
            and "." not in name
            and isinstance(getattr(torch, name, None), torch.dtype)
        ):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in checkpoint metadata")


def read_metadata(directory: Path):
    """DCP's index of a sharded checkpoint, read through the allow-list, and checked: every
    byte range it points to lies in a shard file of this directory (DCP's reader would open
    any path it names: an absolute one, or `../`). ValueError if not, or if it does not parse."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import Metadata

    try:
        metadata = _MetadataUnpickler(io.BytesIO((directory / METADATA).read_bytes())).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError) as exc:
        raise ValueError(f"{METADATA} does not load: {one_line(exc)}") from None
    if not isinstance(metadata, Metadata) or not isinstance(metadata.storage_data, dict):
        raise ValueError(f"{METADATA} is not DCP's metadata")
    for info in metadata.storage_data.values():
        where = getattr(info, "relative_path", None)
        if (
            not isinstance(info, _StorageInfo)
            or not isinstance(where, str)
            or not _SHARD_FILE.match(where)
            or any(not isinstance(n, int) or n < 0 for n in (info.offset, info.length))
            or info.transform_descriptors
        ):
            raise ValueError(f"{METADATA} points outside this checkpoint's shards ({where!r})")
    return metadata


def layout_problem(directory: Path, files: dict[str, dict], world_size: int) -> str | None:
    """Why a sharded checkpoint's files are not one per rank of the world that wrote it, each
    listed in the manifest, with `.metadata` naming no other (one line); None if they are."""
    listed = {f for f in files if _SHARD_FILE.match(f)}
    expected = {f"__{rank}_0.distcp" for rank in range(world_size)}
    if not expected <= listed:
        return f"no shard file of rank(s) {sorted(expected - listed)} (world size {world_size})"
    try:
        named = {info.relative_path for info in read_metadata(directory).storage_data.values()}
    except (OSError, ValueError) as exc:
        return one_line(exc)
    if not named <= listed:
        return f"{METADATA} names files the manifest does not: {sorted(named - listed)[:3]}"
    return None


class _Elsewhere:
    """A shard file this rank reads from elsewhere: its ranges are in `ranges`."""

    def __init__(self, ranges: dict[tuple[int, int], bytes]):
        self.ranges = ranges


def _reader(directory: Path, source: Callable[[dict], dict] | None = None):
    """DCP's file reader, reading `.metadata` through `read_metadata`. `source(needed)`: given
    the byte ranges this rank's load reads ({file: [(offset, length)]}), the bytes of those it
    does not read from `directory` (node-local disks: spot.checkpoint.parts.ShardSource)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any):
            metadata = read_metadata(Path(self.path))
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

        def read_data(self, plan, planner):
            if source is None:
                return super().read_data(plan, planner)
            needed: dict[str, list] = {}
            for item in plan.items:
                info = self.storage_data[item.storage_index]
                needed.setdefault(info.relative_path, []).append((info.offset, info.length))
            elsewhere = source(needed)
            fs = self.fs
            self.fs = _Streams(fs, {name: _Elsewhere(r) for name, r in elsewhere.items()})
            try:
                return super().read_data(plan, planner)
            finally:
                self.fs = fs

        def _slice_file(self, file, sinfo):
            if isinstance(file, _Elsewhere):
                return io.BytesIO(file.ranges[(sinfo.offset, sinfo.length)])
            return super()._slice_file(file, sinfo)

    return SafeReader(directory)


class _Streams:
    """DCP's file system for one read_data: a file read from elsewhere opens as its ranges."""

    def __init__(self, fs, elsewhere: dict[str, _Elsewhere]):
        self.fs, self.elsewhere = fs, elsewhere

    def concat_path(self, path, suffix):
        return self.fs.concat_path(path, suffix)

    @contextlib.contextmanager
    def create_stream(self, path, mode: str):
        name = Path(path).name
        if name in self.elsewhere:
            yield self.elsewhere[name]
        else:
            with self.fs.create_stream(path, mode) as stream:
                yield stream


def _safe_bytes(planner_class):
    """A DCP load planner whose non-tensor values load with weights_only=True (DCP's own
    default is weights_only=False: any pickle)."""
    from torch.distributed.checkpoint._nested_dict import set_element

    class SafePlanner(planner_class):
        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            obj = torch.load(value, weights_only=True)
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    return SafePlanner


def mismatch(directory: Path, live: dict[str, Any]) -> str | None:
    """Why the checkpoint's model and optimizer do not fit the live ones (names, global shapes),
    in one line; None if they do. Checked before anything is loaded."""
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    try:
        saved = read_metadata(directory).state_dict_metadata
    except (OSError, ValueError) as exc:
        return one_line(exc)
    flat, _ = flatten_state_dict(live)
    live_shapes = {k: tuple(v.shape) for k, v in flat.items() if isinstance(v, torch.Tensor)}
    saved_shapes = {  # the optimizer's entries follow the model's: its names say enough
        k: tuple(v.size)
        for k, v in saved.items()
        if isinstance(v, TensorStorageMetadata) and (k in live_shapes or k.startswith("model."))
    }
    detail = shape_misfit(saved_shapes, live_shapes)
    return f"checkpoint model/optimizer does not fit this one: {detail}" if detail else None


def load(
    directory: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    group,
    source: Callable[[dict], dict] | None = None,
) -> None:
    """Every rank, together: the checkpoint's model and optimizer into the live ones, each rank
    reading the byte ranges of the shards it now holds, whatever the world size that wrote them
    (`source`: see `_reader`). Check `mismatch` first."""
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = state_dicts(model, optimizer)
    _read(directory, state, DefaultLoadPlanner, group, source)
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"]
    )


def load_whole(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Whole (unsharded) tensors from another run (init.checkpoint) into this model, sharded
    or not, and its optimizer if `state` has one, numbered (torch.optim's own) or named (DCP's):
    the template builds the optimizer over model.parameters(), so the n-th number is the n-th
    parameter's name. (A ddp run loads a named one as it is: torch.optim maps by position.)"""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    whole = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, state["model"], options=whole)
    saved = state.get("optimizer")
    if saved:
        if not any(isinstance(k, str) for k in saved["state"]):  # numbered: a ddp run's
            names = [name for name, _ in model.named_parameters()]
            saved = {
                "state": {names[i]: v for i, v in saved["state"].items()},
                "param_groups": [
                    {**g, "params": [names[i] for i in g["params"]]} for g in saved["param_groups"]
                ],
            }
        set_optimizer_state_dict(model, optimizer, saved, options=whole)


def load_full(directory: Path) -> dict[str, Any]:
    """The whole model and optimizer state, unsharded, in this process (no process group):
    for `python -m spot export` and init.checkpoint. Keys are parameter names."""
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner

    state: dict[str, Any] = {}
    _read(directory, state, _EmptyStateDictLoadPlanner, group=None)
    return state


def _read(directory: Path, state: dict, planner_class, group, source=None) -> None:
    """DCP's load into `state`, through the safe reader and planner: every rank of `group`
    together, or this process alone (None: also where a process group exists but only this
    process reads, as init.checkpoint's rank 0 does)."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    try:
        _load_state_dict(
            state,
            storage_reader=_reader(directory, source),
            planner=_safe_bytes(planner_class)(),
            process_group=group,
            no_dist=group is None,
        )
    except (Exception, _dcp_failure()) as exc:
        raise ShardReadError(f"shards do not load: {one_line(exc)}") from None
