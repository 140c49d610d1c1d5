"""Sharded checkpoints (spot/checkpoint/sharded.py) in a world of one rank, no process group:
DCP's files committed by CheckpointManager like any other, verified file by file before anything
is read, read without unpickling anything outside an allow-list, refused whole when they do not
fit. With real ranks and resharding: tests/e2e/test_fsdp_reshard.py, tests/e2e/test_fsdp.py."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from spot.checkpoint import manifest, sharded
from spot.checkpoint.manager import (
    CheckpointManager,
    CheckpointUnusable,
    CheckpointWriteError,
    list_step_dirs,
)
from spot.checkpoint.manifest import CorruptCheckpoint
from spot.checkpoint.sharded import METADATA, ShardGroup
from spot.checkpoint.state import TrainingState
from spot.distributed.sampler import ResumableBatchSampler
from spot.fsutil import digest_file
from spot.run.events import EventLog, read_events
from spot.tree import first_difference
from tests.helpers import assert_bitwise_equal, rewrite_manifest

SHARD = "__0_0.distcp"
DIGEST = "x"

# torch.distributed.checkpoint says so on every save and load without a process group
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


def net(hidden: int = 8, extra: bool = False) -> nn.Sequential:
    layers = [nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, 2)]
    return nn.Sequential(*layers, nn.ReLU(), nn.Linear(2, 2)) if extra else nn.Sequential(*layers)


def training_state(seed: int, lr: float = 0.01, **shape) -> TrainingState:
    torch.manual_seed(seed)
    model = net(**shape)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=lr * 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    sampler = ResumableBatchSampler(64, 8, seed=0)
    return TrainingState(model, optimizer, scheduler, sampler, seed=seed, sharded=True)


def trained(seed: int, steps: int = 2) -> TrainingState:
    state = training_state(seed)
    for _ in range(steps):
        state.optimizer.zero_grad()
        state.model(torch.randn(8, 4)).square().mean().backward()
        state.optimizer.step()
        state.scheduler.step()
    state.step = steps
    return state


def manager(root: Path, on_corrupt: str = "previous") -> CheckpointManager:
    return CheckpointManager(
        root,
        keep_last=5,
        async_save=False,
        on_corrupt=on_corrupt,
        events=EventLog(root.parent / "events.jsonl"),
        meta={"config_digest": DIGEST, "training_config": {}, "world_size": 1},
        shards=ShardGroup(None, 0),
    )


def save(root: Path, state: TrainingState, step: int) -> Path:
    state.step = step
    manager(root).save(step, state.state_dict(), {"reason": "test"})
    return root / manifest.step_dir_name(step)


@pytest.fixture
def checkpoints(tmp_path) -> tuple[Path, dict[int, TrainingState]]:
    """Two sharded checkpoints, at steps 1 and 2, of different states (same shapes)."""
    root = tmp_path / "ck"
    states = {step: trained(seed=step) for step in (1, 2)}
    for step, state in states.items():
        save(root, state, step)
    return root, states


def full(state: TrainingState) -> dict:
    """The live model and optimizer by parameter name: what the checkpoint holds."""
    return sharded.state_dicts(state.model, state.optimizer)


# ---- .metadata goes through an allow-list ------------------------------------------------------


class Opens:
    """A pickle that calls open() when loaded (creating `path`): a callable no checkpoint needs."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


# The last names an allowed module and a dotted name: pickle would walk it to the os module that
# module imported (protocol 4's STACK_GLOBAL).
FORBIDDEN = [
    "os.system",
    "io.open",
    "builtins.getattr",
    "torch.distributed.checkpoint.metadata.os.system",
]


def _stack_global(module: str, name: str, argument: str) -> bytes:
    def text(t: str) -> bytes:
        return b"\x8c" + bytes([len(t)]) + t.encode()

    return b"\x80\x04" + text(module) + text(name) + b"\x93" + text(argument) + b"\x85R."


def hostile_metadata(path: Path, callable_name: str, marker: Path) -> None:
    """Replace a checkpoint's `.metadata` by a pickle naming `callable_name` (loading it would
    create `marker`), and its manifest entry to match: what a hostile writer would commit."""
    pickles = {
        "os.system": f"cos\nsystem\n(S'touch {marker}'\ntR.".encode(),  # GLOBAL os system
        "io.open": pickle.dumps(Opens(marker)),  # builtins.open is io.open
        "builtins.getattr": pickle.dumps(getattr),
        "torch.distributed.checkpoint.metadata.os.system": _stack_global(
            "torch.distributed.checkpoint.metadata", "os.system", f"touch {marker}"
        ),
    }
    (path / METADATA).write_bytes(pickles[callable_name])

    def restamp(files: dict) -> None:
        size, digest = digest_file(path / METADATA)
        files[METADATA] = {**files[METADATA], "bytes": size, "digest": digest}

    rewrite_manifest(path, restamp)


@pytest.mark.parametrize("callable_name", FORBIDDEN)
def test_metadata_naming_a_forbidden_callable_is_refused(tmp_path, checkpoints, callable_name):
    """read_metadata says which callable it refused, and never calls it; a checkpoint whose
    `.metadata` is hostile but consistent with its manifest is refused whole by a resume,
    in one line, before anything is loaded."""
    root, _ = checkpoints
    marker = tmp_path / "ran"
    path = root / manifest.step_dir_name(2)
    hostile_metadata(path, callable_name, marker)
    with pytest.raises(ValueError, match=rf"{callable_name} is not allowed"):
        sharded.read_metadata(path)
    with pytest.raises(CorruptCheckpoint, match=rf"{callable_name} is not allowed"):
        CheckpointManager.load(path)  # the checksums agree, yet it is refused: resume falls back
    m = manifest.read(path)
    components = {name: manifest.load_component(path, m, name) for name in m.components}
    problem = sharded.mismatch(path, full(training_state(0)))
    assert f"{callable_name} is not allowed" in problem and "\n" not in problem
    live = training_state(seed=5)
    before = full(live)
    with pytest.raises(CheckpointUnusable, match=rf"{callable_name} is not allowed"):
        live.load_state_dict(components, shards=path)
    assert_bitwise_equal(before, full(live))
    with pytest.raises(BaseException, match=rf"{callable_name} is not allowed"):
        CheckpointManager.load(path, whole=True)
    assert not marker.exists()


@pytest.mark.parametrize("callable_name", FORBIDDEN)
def test_whole_load_of_hostile_metadata_is_corrupt(tmp_path, checkpoints, callable_name):
    """`CheckpointManager.load(whole=True)`: "checksummed files that still do not load are
    corrupt" (CorruptCheckpoint, which export and init.checkpoint report)."""
    root, _ = checkpoints
    path = root / manifest.step_dir_name(2)
    hostile_metadata(path, callable_name, tmp_path / "ran")
    with pytest.raises(CorruptCheckpoint, match=rf"{callable_name} is not allowed"):
        CheckpointManager.load(path, whole=True)


def test_genuine_metadata_loads(checkpoints):
    from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

    root, states = checkpoints
    metadata = sharded.read_metadata(root / manifest.step_dir_name(1))
    assert isinstance(metadata, Metadata)
    weight = metadata.state_dict_metadata["model.0.weight"]
    assert isinstance(weight, TensorStorageMetadata) and tuple(weight.size) == (8, 4)
    assert weight.properties.dtype == torch.float32


def test_metadata_that_does_not_parse_is_a_value_error(checkpoints):
    root, _ = checkpoints
    path = root / manifest.step_dir_name(1)
    (path / METADATA).write_bytes((path / METADATA).read_bytes()[:-7])
    with pytest.raises(ValueError, match=r"\.metadata does not load"):
        sharded.read_metadata(path)


# ---- verified before anything is read ----------------------------------------------------------


def test_a_sharded_checkpoint_loads(checkpoints):
    """Verified, its own components loaded; its model and optimizer left to the ranks unless
    whole, when they are the saved ones bit for bit (the optimizer's moments and its
    hyper-parameters); and a fresh state (other init, other LR) loads them exactly."""
    root, states = checkpoints
    path = root / manifest.step_dir_name(2)
    loaded = CheckpointManager.load(path)
    assert loaded.manifest.sharded and loaded.step == 2
    assert set(loaded.state) == {"scheduler", "trainer"}
    files = loaded.manifest.files
    assert {f["rank"] for n, f in files.items() if sharded.is_shard_file(n)} == {0}
    saved = full(states[2])
    whole = CheckpointManager.load(path, whole=True).state
    assert_bitwise_equal(saved, {k: whole[k] for k in sharded.SHARDED}, "whole")

    fresh = training_state(seed=9, lr=0.5)
    assert first_difference(saved, full(fresh)) is not None
    fresh.load_state_dict(loaded.state, shards=path)
    assert_bitwise_equal(saved, full(fresh))
    assert fresh.optimizer.param_groups[0]["lr"] == 0.01 and fresh.step == 2


def corrupt_missing(path: Path, name: str, other: Path) -> None:
    (path / name).unlink()


def corrupt_truncated(path: Path, name: str, other: Path) -> None:
    data = (path / name).read_bytes()
    (path / name).write_bytes(data[: len(data) - 5])


def corrupt_flipped(path: Path, name: str, other: Path) -> None:
    data = bytearray((path / name).read_bytes())
    data[len(data) // 2] ^= 0x10
    (path / name).write_bytes(bytes(data))


def corrupt_from_another_step(path: Path, name: str, other: Path) -> None:
    # .metadata too differs between two steps of the same shapes (its storage ids, the
    # optimizer's bytes values): else the copy would be no corruption at all
    assert (other / name).read_bytes() != (path / name).read_bytes()
    shutil.copyfile(other / name, path / name)


CORRUPTIONS = {
    "missing": (corrupt_missing, "is missing"),
    "truncated": (corrupt_truncated, "has .* bytes, manifest says"),
    "flipped byte": (corrupt_flipped, "fails its .* checksum"),
    "from another step": (corrupt_from_another_step, "fails its .* checksum"),
}


@pytest.mark.parametrize("name", [SHARD, METADATA])
@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_a_corrupt_shard_is_caught_and_resume_falls_back(checkpoints, name, corruption):
    root, states = checkpoints
    corrupt, message = CORRUPTIONS[corruption]
    path, previous = (root / manifest.step_dir_name(s) for s in (2, 1))
    corrupt(path, name, previous)
    for whole in (False, True):
        with pytest.raises(CorruptCheckpoint, match=rf"{name} {message}"):
            CheckpointManager.load(path, whole=whole)
    with pytest.raises(CorruptCheckpoint, match=name):
        manifest.verify(path)

    checkpoints_ = manager(root)
    loaded = checkpoints_.load_latest(DIGEST, {})
    assert loaded.step == 1 and loaded.path == previous
    assert not path.exists()
    assert len(list(root.glob(".corrupt-step-000000002-*"))) == 1  # quarantined, kept
    skipped = [e for e in read_events(root.parent / "events.jsonl") if e["event"] != "checkpoint"]
    assert [(e["event"], e["step"]) for e in skipped] == [("corrupt_checkpoint_skipped", 2)]
    fresh = training_state(seed=9)
    fresh.load_state_dict(loaded.state, shards=loaded.path)
    assert_bitwise_equal(full(states[1]), full(fresh))


def test_a_corrupt_shard_stops_the_run_with_on_corrupt_fail(checkpoints):
    root, _ = checkpoints
    corrupt_flipped(root / manifest.step_dir_name(2), SHARD, root)
    with pytest.raises(CheckpointUnusable, match=rf"{SHARD} fails"):
        manager(root, on_corrupt="fail").load_latest(DIGEST, {})
    assert (root / manifest.step_dir_name(2)).exists()


# ---- the manifest of a sharded checkpoint ------------------------------------------------------


def rewrite_meta(path: Path, **changes) -> None:
    """Rewrite the manifest's fields, self-consistent (its own checksum updated)."""
    body = manifest.read(path).body
    generated = ("format", "library_version", "hash", "components", "files")
    meta = {k: v for k, v in body.items() if k not in generated}
    meta.update(changes)
    meta = {k: v for k, v in meta.items() if v is not None}
    (path / manifest.MANIFEST).write_bytes(manifest.build(body["files"], meta))


@pytest.mark.parametrize(
    "listed, message",
    [
        (["model"], "manifest shards"),
        (["model", "optimizer", "scheduler"], "manifest shards"),
        (["model", "optimizer", "extra"], "manifest shards"),
        (["model", "trainer"], "manifest shards"),
        ("model optimizer", "manifest shards"),
        (None, "lacks component.*model, optimizer"),  # not sharded: then where are they?
    ],
)
def test_a_manifest_with_a_wrong_sharded_list_is_refused(checkpoints, listed, message):
    root, _ = checkpoints
    path = root / manifest.step_dir_name(1)
    rewrite_meta(path, sharded=listed)
    with pytest.raises(CorruptCheckpoint, match=message):
        manifest.read(path)
    with pytest.raises(CorruptCheckpoint, match=message):
        manifest.parse((path / manifest.MANIFEST).read_bytes(), path.name)


@pytest.mark.parametrize("dropped", [METADATA, SHARD])
def test_a_sharded_manifest_without_its_index_or_shards_is_refused(checkpoints, dropped):
    root, _ = checkpoints
    path = root / manifest.step_dir_name(1)
    rewrite_manifest(path, lambda files: files.pop(dropped))
    with pytest.raises(CorruptCheckpoint, match="names no .metadata or no .distcp"):
        manifest.read(path)


def test_the_rewritten_manifest_is_otherwise_accepted(checkpoints):
    """The rewrites above change nothing else: unchanged, the same manifest reads and loads."""
    root, _ = checkpoints
    path = root / manifest.step_dir_name(1)
    rewrite_meta(path)
    rewrite_manifest(path, lambda files: None)
    assert manifest.read(path).sharded
    CheckpointManager.load(path, whole=True)


@pytest.mark.parametrize("name", [".", "..", "...", "../step-000000001", "a/b", "manifest.json"])
def test_a_manifest_naming_an_unsafe_file_is_refused(checkpoints, name):
    root, _ = checkpoints
    path = root / manifest.step_dir_name(1)
    entry = {"bytes": 0, "digest": "0" * 16, "rank": 0}
    rewrite_manifest(path, lambda files: files.update({name: entry}))
    with pytest.raises(CorruptCheckpoint, match="unsafe file"):
        manifest.read(path)


# ---- refused whole when it does not fit --------------------------------------------------------


@pytest.mark.parametrize(
    "shape, expected",
    [
        ({"hidden": 9}, "shape model.0.bias (8,) vs (9,)"),
        ({"extra": True}, "missing ['model.4.bias', 'model.4.weight'"),
    ],
)
def test_mismatch_names_what_does_not_fit_in_one_line(checkpoints, shape, expected):
    root, states = checkpoints
    path = root / manifest.step_dir_name(1)
    assert sharded.mismatch(path, full(states[1])) is None
    live = training_state(seed=9, **shape)
    problem = sharded.mismatch(path, full(live))
    assert problem.startswith("checkpoint model/optimizer does not fit this one: ")
    assert expected in problem and "\n" not in problem
    before = full(live)
    with pytest.raises(CheckpointUnusable, match=r"does not fit"):
        live.load_state_dict(CheckpointManager.load(path).state, shards=path)
    assert_bitwise_equal(before, full(live))  # refused before anything was loaded


def test_mismatch_names_a_key_the_live_model_lacks(checkpoints):
    root, _ = checkpoints
    torch.manual_seed(0)
    smaller = nn.Sequential(nn.Linear(4, 8))
    live = sharded.state_dicts(smaller, torch.optim.AdamW(smaller.parameters()))
    problem = sharded.mismatch(root / manifest.step_dir_name(1), live)
    assert "unexpected ['model.2.bias', 'model.2.weight']" in problem and "\n" not in problem


# ---- DCP's non-tensor values load with weights_only=True --------------------------------------


def test_the_optimizers_param_groups_round_trip_through_dcp_bytes(checkpoints):
    """param_groups are a DCP bytes value (torch.save'd): they come back equal through
    load_full, and through a load into a live optimizer whose LR differed."""
    root, states = checkpoints
    path = root / manifest.step_dir_name(2)
    groups = full(states[2])["optimizer"]["param_groups"]
    assert groups[0]["params"] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    whole = sharded.load_full(path)
    assert first_difference(groups, whole["optimizer"]["param_groups"]) is None
    fresh = training_state(seed=3, lr=0.25)
    sharded.load(path, fresh.model, fresh.optimizer, None)
    assert fresh.optimizer.param_groups[0]["lr"] == 0.01
    assert fresh.optimizer.param_groups[0]["weight_decay"] == pytest.approx(0.1)


def hostile_bytes_checkpoint(tmp_path: Path, marker: Path) -> Path:
    """A committed checkpoint whose optimizer hyper-parameters hold an object that unpickles by
    calling open() (creating `marker`): consistent, so only the weights_only load can catch it."""
    components = trained(seed=1).state_dict()
    components["optimizer"]["param_groups"][0]["lr"] = Opens(marker)
    root = tmp_path / "ck"
    manager(root).save(1, components, {"reason": "test"})
    (_, path), *_ = list_step_dirs(root)
    manifest.verify(path)
    return path


def test_a_bytes_value_that_needs_a_free_unpickle_is_never_unpickled(tmp_path):
    """Neither a rank's load nor the whole load calls what the pickle names."""
    marker = tmp_path / "ran"
    path = hostile_bytes_checkpoint(tmp_path, marker)
    fresh = training_state(seed=2)
    with pytest.raises(BaseException, match="Unsupported global: GLOBAL io.open"):
        sharded.load(path, fresh.model, fresh.optimizer, None)
    with pytest.raises(BaseException, match="Unsupported global: GLOBAL io.open"):
        sharded.load_full(path)
    with pytest.raises(BaseException, match="Unsupported global: GLOBAL io.open"):
        CheckpointManager.load(path, whole=True)
    assert not marker.exists()


def test_whole_load_of_a_bytes_value_that_does_not_load_is_corrupt(tmp_path):
    path = hostile_bytes_checkpoint(tmp_path, tmp_path / "ran")
    with pytest.raises(CorruptCheckpoint, match="shards do not load"):
        CheckpointManager.load(path, whole=True)


def test_a_failed_shard_write_is_a_checkpoint_write_error(tmp_path):
    """A rank whose DCP write fails (here a value torch.save cannot pickle; as well a full
    disk) fails the save as CheckpointWriteError: counted, its temporary directory removed,
    on_error obeyed; not an exception that gets past every `except Exception`."""
    components = trained(seed=1).state_dict()
    components["optimizer"]["param_groups"][0]["lr"] = lambda: 0.01  # torch.save refuses it
    root = tmp_path / "ck"
    checkpoints = manager(root)
    with pytest.raises(CheckpointWriteError):
        checkpoints.save(1, components, {"reason": "test"})
    assert checkpoints.failures == 1 and list(root.iterdir()) == []


@pytest.mark.parametrize("where", ["../step-000000001/__0_0.distcp", "/etc/hostname", "x.distcp"])
def test_metadata_pointing_outside_the_shards_is_refused(checkpoints, where):
    """DCP's reader opens whatever path `.metadata` names (absolute, or `../`): a `.metadata`
    consistent with its manifest but pointing elsewhere makes the checkpoint corrupt, and
    nothing is read from there."""
    root, _ = checkpoints
    path = root / manifest.step_dir_name(2)
    metadata = pickle.loads((path / METADATA).read_bytes())  # the genuine one: a trusted read
    index = next(iter(metadata.storage_data))
    metadata.storage_data[index].relative_path = where
    (path / METADATA).write_bytes(pickle.dumps(metadata))

    def restamp(files: dict) -> None:
        size, digest = digest_file(path / METADATA)
        files[METADATA] = {**files[METADATA], "bytes": size, "digest": digest}

    rewrite_manifest(path, restamp)
    with pytest.raises(ValueError, match="points outside this checkpoint's shards"):
        sharded.read_metadata(path)
    with pytest.raises(CorruptCheckpoint, match="points outside"):
        CheckpointManager.load(path)


def test_a_checkpoint_without_every_ranks_shard_does_not_exist(checkpoints):
    """A manifest whose world had two ranks but that names one rank's shard file only (a
    writer that committed without every rank's part): corrupt."""
    root, _ = checkpoints
    path = root / manifest.step_dir_name(2)
    rewrite_meta(path, world_size=2)
    with pytest.raises(CorruptCheckpoint, match=r"no shard file of rank\(s\) \['__1_0.distcp'\]"):
        CheckpointManager.load(path)
