"""Test helpers: run train.py as a real subprocess, stop it at a failpoint, read its results,
compare state bitwise. Imported by the tests (`from tests.helpers import ...`); the fixtures are in
conftest.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from spot.tree import first_difference

REPO = Path(__file__).resolve().parents[1]

# Small and fast, but crossing epoch boundaries (4096 samples / 64 per step = 64 steps per epoch).
FAST = [
    "logger=none",
    "trainer.batch_size=64",
    "trainer.log_every=1000",
    "model.hidden=32",
]


def train_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SPOT_", "HYDRA_")) and k != "WANDB_API_KEY"
    }
    env.update({"OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


def run_train(args: list[str], *, timeout: float = 180, env: dict | None = None, cwd: Path = REPO):
    return subprocess.run(
        [sys.executable, str(REPO / "train.py"), *args],
        cwd=cwd,
        env=env or train_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_armed(
    args: list[str], failpoint: str, marker_dir: Path, env: dict | None = None
) -> tuple[subprocess.Popen, Path]:
    """Start train.py in its own session, armed with a failpoint. Returns the process and the
    marker file it writes when it reaches the failpoint (see spot/failpoints.py)."""
    marker = marker_dir / failpoint.split("@")[0]
    marker.unlink(missing_ok=True)
    env = {
        **(env or train_env()),
        "SPOT_FAILPOINTS": failpoint,
        "SPOT_FAILPOINT_DIR": str(marker_dir),
    }
    return start_train(args, env), marker


def start_train(args: list[str], env: dict | None = None) -> subprocess.Popen:
    """train.py (or `-m` sweeps) in its own session, output merged into `.stdout`."""
    return subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), *args],
        cwd=REPO,
        env=env or train_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def wait_for_step(root: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Until the run under `root` has logged a `train` event at `step` or later."""
    from spot.run.events import read_events

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        files = list(root.glob("*/*/events.jsonl"))
        if files and any(
            e["event"] == "train" and e["step"] >= step for e in read_events(files[0])
        ):
            return
        time.sleep(0.05)
    raise AssertionError(f"never reached step {step}")


def await_marker(proc: subprocess.Popen, marker: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not marker.exists():
        if proc.poll() is not None:
            raise AssertionError(
                f"train.py exited {proc.returncode} before {marker.name}:\n{proc.stdout.read()}"
            )
        if time.monotonic() > deadline:
            raise AssertionError(f"train.py never reached {marker.name}")
        time.sleep(0.02)


def run_until_failpoint(
    args: list[str], failpoint: str, marker_dir: Path, timeout: float = 180, env: dict | None = None
):
    """Start train.py armed with a failpoint; when it reaches it, SIGKILL it and every process it
    started (elastic agent, workers, data-loader workers), as a reclaimed machine would. Returns
    the step."""
    proc, marker = start_armed(args, failpoint, marker_dir, env)
    try:
        await_marker(proc, marker, timeout)
        os.killpg(proc.pid, signal.SIGKILL)  # no handler, no cleanup, like a reclaimed machine
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()
    assert proc.returncode == -9
    return int(marker.read_text())


def completed_run(args: list[str], root: Path) -> Path:
    """Run train.py to completion (an uninterrupted reference run); return its run directory."""
    result = run_train([*args, f"run.root={root}"])
    assert result.returncode == 0, result.stderr
    return run_dir_of(root)


def run_dir_of(root: Path) -> Path:
    """The single run directory under a run root (<root>/<name>/<id>)."""
    dirs = [p for p in root.glob("*/*") if p.is_dir() and not p.name.startswith(".")]
    assert len(dirs) == 1, dirs
    return dirs[0]


def final_state(run_dir: Path) -> dict:
    """The newest checkpoint's components, verified, as loaded tensors (a sharded checkpoint's
    model and optimizer gathered whole)."""
    from spot.checkpoint.manager import CheckpointManager, list_step_dirs

    step, path = list_step_dirs(run_dir / "checkpoints")[0]
    return CheckpointManager.load(path, whole=True).state


def assert_bitwise_equal(a, b, where: str = "") -> None:
    """Recursively compare state trees; tensors must be identical bit for bit (spot.tree)."""
    difference = first_difference(a, b, where)
    assert difference is None, difference


def rewrite_manifest(ckpt: Path, change_files) -> None:
    """Rewrite a checkpoint's manifest, self-consistent (its own checksum updated), after
    `change_files(files)` edits the file table: how a buggy or hostile writer would do it."""
    from spot.checkpoint import manifest

    body = manifest.read(ckpt).body
    files = dict(body["files"])
    change_files(files)
    generated = ("format", "library_version", "hash", "components", "files")
    meta = {k: v for k, v in body.items() if k not in generated}
    (ckpt / "manifest.json").write_bytes(manifest.build(files, meta))


# ---- shared by a test file's unit half (tests/unit/) and its end-to-end half (tests/e2e/) ----

# The moto S3 server's credentials (test_s3, test_s3_integrity; the `credentials` fixture).
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}

# test_metrics: spot and on-demand prices per hour.
PRICES = (3.0, 10.0)

# test_interruption_proxy: a dead HTTP proxy in the environment.
PROXY_VARS = ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")
NO_PROXY_VARS = ("no_proxy", "NO_PROXY")


def dead_proxy() -> str:
    """An http:// URL on loopback where nothing listens."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def proxy_environment() -> dict[str, str]:
    """Every proxy variable names the dead proxy; `no_proxy` is empty, which urllib reads as
    unset (the values overlay an environment that may have one)."""
    return {**dict.fromkeys(PROXY_VARS, dead_proxy()), **dict.fromkeys(NO_PROXY_VARS, "")}


def committed_steps(events_path: Path) -> list[int]:
    """test_lost_work: the steps of the `checkpoint` events, in order."""
    from spot.run.events import read_events

    return [e["step"] for e in read_events(events_path) if e["event"] == "checkpoint"]


def seeded_state(seed: int) -> dict:
    """test_s3_integrity, test_s3_download_faults: a small training state, the same per seed."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return {
        "model": {"w": torch.randn(256, generator=g)},
        "optimizer": {"m": torch.randn(256, generator=g)},
        "scheduler": {"n": seed},
        "trainer": {"step": seed},
    }


def checkpoint_manager(
    root: Path, events, keep_last: int = 3, store=None, alert_after: int = 3, best=None
):
    """test_s3_integrity: a synchronous CheckpointManager that falls back to the previous
    checkpoint (config digest "x"); with `store` (an S3Store), checkpoints also go there once
    its `start_uploads()` is called; with `best` (a BestCheckpoint), both retentions spare it."""
    from spot.checkpoint.manager import CheckpointManager
    from spot.checkpoint.storage import RemoteCheckpoints

    return CheckpointManager(
        root,
        keep_last=keep_last,
        async_save=False,
        on_corrupt="previous",
        events=events,
        meta={"config_digest": "x", "training_config": {}},
        remote=store and RemoteCheckpoints(store, events, alert_after),
        **({"spared": best.spared} if best is not None else {}),
    )


def verifies(store, step: int, into: Path) -> bool:
    """test_s3_integrity: whether the remote checkpoint at `step` downloads verified."""
    from spot.checkpoint import manifest

    try:
        store.download(step, into)
        return True
    except manifest.CorruptCheckpoint:
        return False


def free_port() -> int:
    """A free TCP port on loopback (for a test's own process group or server)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def gloo_world(rank: int, world_size: int, port: int):
    """In a test's spawned process: join a real gloo group of `world_size` on loopback, as a
    torchrun worker would (spot.distributed.world.join)."""
    from spot.distributed import world as distributed

    return distributed.join_on_loopback(rank, world_size, port, 10, 30)


def s3_store(bucket: str, run_prefix: str, **options):
    """A run's RemoteStore in an S3 bucket (options: S3Bucket's, e.g. endpoint_url)."""
    from spot.buckets.s3 import S3Bucket
    from spot.checkpoint.storage import RemoteStore

    return RemoteStore(S3Bucket(bucket, **options), run_prefix)
