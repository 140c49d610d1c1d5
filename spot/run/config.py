"""Typed view of the Hydra config, and validation of every value before anything is written.

The YAML groups under conf/ stay plain YAML (easy to fork); the dataclasses below are their
schema. `validate()` merges a composed config into them, so a type error, an unknown key or an
out-of-range value is caught in one place and reported as one line naming the key.
"""

from __future__ import annotations

import importlib
import os
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (botocore's and Hydra's span several)."""
    return " ".join(str(exc).split())


class ConfigError(ValueError):
    """A configuration value that is not allowed; str() is the one line shown to the user."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"config error: {key}: {message}")


@dataclass
class Price:
    spot_per_hour: float = 0.0
    on_demand_per_hour: float = 0.0


@dataclass
class CloudConfig:
    name: str = "local"
    notice_seconds: float = 60.0
    poll_seconds: float = 5.0
    metadata_url: str | None = None
    instance_type: str = "local"
    price: Price = field(default_factory=Price)
    interruption_rate_per_hour: float = 0.0
    signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])


@dataclass
class StorageConfig:
    backend: str = "local"
    dir: str | None = None
    bucket: str | None = None
    prefix: str = ""
    endpoint_url: str | None = None
    region: str | None = None
    max_attempts: int = 5
    alert_after_failures: int = 3
    final_upload_timeout_seconds: float = 600.0


@dataclass
class CheckpointConfig:
    every_steps: int | None = None
    every_minutes: float | None = 15.0
    policy: str = "fixed"
    keep_last: int = 3
    async_save: bool = True
    overlap: bool = True
    on_corrupt: str = "previous"
    on_error: str = "stop"
    when_busy: str = "wait"


@dataclass
class ElasticConfig:
    min_nodes: int = 1
    max_nodes: int = 1
    nproc_per_node: int = 1
    rdzv_backend: str = "c10d"
    rdzv_endpoint: str = "localhost:29400"
    max_restarts: int = 0
    lr_scaling: str = "linear"
    batch_policy: str = "scale_lr"
    reference_world_size: int | None = None  # None: the world size the run started with
    rdzv_store_host: str = "agent"  # agent: the agent on the endpoint's host serves it | external
    rdzv_join_timeout_seconds: float = 600.0
    rdzv_last_call_seconds: float = 30.0
    rdzv_keep_alive_seconds: float = 5.0  # torch's keep_alive_interval: whole seconds
    rdzv_keep_alive_max_attempt: int = 3  # a node silent this many intervals is dropped
    monitor_interval_seconds: float = 0.5
    shutdown_timeout_seconds: int = 30
    local_addr: str | None = None
    collective_timeout_seconds: float = 120.0
    restore_timeout_seconds: float = 1800.0


@dataclass
class LoggerConfig:
    backend: str = "wandb"
    project: str = "spot-train"
    mode: str = "offline"


@dataclass
class DataConfig:
    dataset: Any = None
    num_workers: int = 0
    shuffle: bool = True
    ledger: bool = False


@dataclass
class TrainerConfig:
    max_steps: int | None = 200
    max_epochs: int | None = None
    batch_size: int = 32
    device: str = "auto"
    log_every: int = 20
    deterministic: bool = True
    grad_clip: float | None = None


@dataclass
class RunConfig:
    name: str = "default"
    id: str | None = None
    root: str = "runs"


@dataclass
class Settings:
    seed: int = 0
    run: RunConfig = field(default_factory=RunConfig)
    cloud: CloudConfig = field(default_factory=CloudConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    elastic: ElasticConfig = field(default_factory=ElasticConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    # `_target_` groups: free-form, checked for an importable target below.
    model: Any = None
    optimizer: Any = None
    scheduler: Any = None


# Groups that do not change what is trained: they are left out of the run id and config digest,
# so the same job resumes on another cloud, storage, world size or logger.
NON_TRAINING_KEYS = ("cloud", "storage", "elastic", "logger", "checkpoint", "run", "hydra")
NON_TRAINING_LEAVES = ("data.ledger", "data.num_workers", "trainer.log_every")

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=,+-]{0,127}$")
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def _whole_seconds(key: str, value: float) -> None:
    if value < 1 or value != int(value):
        raise ConfigError(key, f"{value!r} is not allowed; must be a whole number of seconds >= 1")


def _one_of(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(key, f"{value!r} is not allowed; allowed: {', '.join(map(str, allowed))}")


def _positive(key: str, value: float | None, allow_none: bool = False, allow_zero: bool = False):
    if value is None:
        if allow_none:
            return
        raise ConfigError(key, "must be set")
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(key, f"{value!r} is not allowed; must be {bound}")


def _url(key: str, value: str | None) -> None:
    if value is None:
        return
    parsed = urlparse(value)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ConfigError(key, f"{value!r} is not an http(s) URL")


def _target(key: str, node: Any) -> None:
    if not isinstance(node, dict | DictConfig) or "_target_" not in node:
        raise ConfigError(key, "needs a `_target_` (the class or function to instantiate)")
    path = str(node["_target_"])
    module, _, attr = path.rpartition(".")
    try:
        obj = importlib.import_module(module) if module else None
    except ImportError as exc:
        raise ConfigError(f"{key}._target_", f"cannot import {path!r} ({exc})") from None
    if obj is None or not hasattr(obj, attr):
        raise ConfigError(f"{key}._target_", f"{path!r} not found")


def _typed(cfg: DictConfig) -> Settings:
    """Merge into the schema; OmegaConf's type errors become one line naming the key."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Settings), cfg)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "config"
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(key, first) from None


def _wandb_key_present() -> bool:
    """W&B's own places for a key: the environment, or the netrc entry `wandb login` writes
    (`$NETRC`, else ~/.netrc)."""
    import netrc
    from urllib.parse import urlparse

    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def validate(cfg: DictConfig) -> Settings:
    """Check every value; return the typed settings or raise ConfigError (one line)."""
    cfg = cfg.copy()
    OmegaConf.set_struct(cfg, False)
    cfg.pop("hydra", None)
    s = _typed(cfg)

    for key in ("name", "id"):
        value = getattr(s.run, key)
        if value is not None and not _NAME.match(value):
            raise ConfigError(
                f"run.{key}", f"{value!r} is not allowed; use letters, digits and . _ - = , +"
            )
    if not s.run.root:
        raise ConfigError("run.root", "must be a directory path")

    c = s.cloud
    _one_of("cloud.name", c.name, ("local", "aws", "gcp", "azure", "slurm"))
    _positive("cloud.notice_seconds", c.notice_seconds)
    _positive("cloud.poll_seconds", c.poll_seconds)
    _url("cloud.metadata_url", c.metadata_url)
    _positive("cloud.price.spot_per_hour", c.price.spot_per_hour, allow_zero=True)
    _positive("cloud.price.on_demand_per_hour", c.price.on_demand_per_hour, allow_zero=True)
    _positive("cloud.interruption_rate_per_hour", c.interruption_rate_per_hour, allow_zero=True)
    for sig in c.signals:
        _one_of("cloud.signals", sig, ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT", "SIGHUP"))

    st = s.storage
    _one_of("storage.backend", st.backend, ("local", "s3"))
    if st.backend == "s3" and not st.bucket:
        raise ConfigError("storage.bucket", "storage=s3 needs a bucket (storage.bucket=NAME)")
    if st.bucket is not None and not re.match(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$", st.bucket):
        raise ConfigError("storage.bucket", f"{st.bucket!r} is not a valid S3 bucket name")
    if ".." in st.prefix.split("/"):
        raise ConfigError("storage.prefix", f"{st.prefix!r} may not contain '..'")
    _url("storage.endpoint_url", st.endpoint_url)
    _positive("storage.max_attempts", st.max_attempts)
    _positive("storage.alert_after_failures", st.alert_after_failures)
    _positive("storage.final_upload_timeout_seconds", st.final_upload_timeout_seconds)

    ck = s.checkpoint
    _positive("checkpoint.every_steps", ck.every_steps, allow_none=True)
    _positive("checkpoint.every_minutes", ck.every_minutes, allow_none=True)
    _one_of("checkpoint.policy", ck.policy, ("fixed", "young_daly"))
    if ck.policy == "fixed" and ck.every_steps is None and ck.every_minutes is None:
        raise ConfigError(
            "checkpoint.every_steps", "policy=fixed needs every_steps or every_minutes set"
        )
    if ck.policy == "young_daly" and c.interruption_rate_per_hour <= 0:
        raise ConfigError(
            "cloud.interruption_rate_per_hour",
            "checkpoint.policy=young_daly needs an interruption rate > 0 (choose a cloud)",
        )
    if ck.keep_last < 1:
        raise ConfigError("checkpoint.keep_last", f"{ck.keep_last} is not allowed; must be >= 1")
    _one_of("checkpoint.on_corrupt", ck.on_corrupt, ("previous", "fail"))
    _one_of("checkpoint.on_error", ck.on_error, ("stop", "continue"))
    _one_of("checkpoint.when_busy", ck.when_busy, ("wait", "skip"))

    e = s.elastic
    _positive("elastic.min_nodes", e.min_nodes)
    _positive("elastic.max_nodes", e.max_nodes)
    if e.min_nodes > e.max_nodes:
        raise ConfigError(
            "elastic.min_nodes",
            f"min_nodes={e.min_nodes} > max_nodes={e.max_nodes}; need min <= max",
        )
    _positive("elastic.nproc_per_node", e.nproc_per_node)
    _positive("elastic.max_restarts", e.max_restarts, allow_zero=True)
    _one_of("elastic.rdzv_backend", e.rdzv_backend, ("c10d", "etcd", "etcd-v2", "static"))
    if not re.match(r"^[A-Za-z0-9.\-\[\]:]+:\d{1,5}$", e.rdzv_endpoint):
        raise ConfigError("elastic.rdzv_endpoint", f"{e.rdzv_endpoint!r} is not HOST:PORT")
    _one_of("elastic.lr_scaling", e.lr_scaling, ("linear", "sqrt", "none"))
    _one_of("elastic.batch_policy", e.batch_policy, ("scale_lr", "keep_global_batch"))
    _positive("elastic.reference_world_size", e.reference_world_size, allow_none=True)
    _one_of("elastic.rdzv_store_host", e.rdzv_store_host, ("agent", "external"))
    for key in (
        "rdzv_join_timeout_seconds",
        "rdzv_last_call_seconds",
        "rdzv_keep_alive_seconds",
        "monitor_interval_seconds",
        "shutdown_timeout_seconds",
        "collective_timeout_seconds",
        "restore_timeout_seconds",
    ):
        _positive(f"elastic.{key}", getattr(e, key))
    # torch's rendezvous reads these as ints: a keep-alive of 0.5 would become 0 (a heartbeat
    # timer that never waits), 1.5 silently 1, a last call of 0.5 none at all.
    for key in ("rdzv_join_timeout_seconds", "rdzv_last_call_seconds", "rdzv_keep_alive_seconds"):
        _whole_seconds(f"elastic.{key}", getattr(e, key))
    if e.rdzv_keep_alive_max_attempt < 1:
        raise ConfigError(
            "elastic.rdzv_keep_alive_max_attempt",
            f"{e.rdzv_keep_alive_max_attempt!r} is not allowed; must be >= 1",
        )

    lg = s.logger
    _one_of("logger.backend", lg.backend, ("wandb", "none"))
    _one_of("logger.mode", lg.mode, ("offline", "online", "disabled"))
    if lg.backend == "wandb" and lg.mode == "online" and not _wandb_key_present():
        raise ConfigError(
            "logger.mode",
            "online needs a W&B API key: set WANDB_API_KEY or run `wandb login`; "
            "or use logger.mode=offline (then `wandb sync`)",
        )

    t = s.trainer
    _positive("trainer.max_steps", t.max_steps, allow_none=True)
    _positive("trainer.max_epochs", t.max_epochs, allow_none=True)
    if t.max_steps is None and t.max_epochs is None:
        raise ConfigError("trainer.max_steps", "set max_steps or max_epochs (or both)")
    _positive("trainer.batch_size", t.batch_size)
    _positive("trainer.log_every", t.log_every)
    _positive("trainer.grad_clip", t.grad_clip, allow_none=True)
    if not _DEVICE.match(t.device):
        raise ConfigError(
            "trainer.device", f"{t.device!r} is not allowed; allowed: auto, cpu, cuda, cuda:N"
        )

    _positive("data.num_workers", s.data.num_workers, allow_zero=True)
    _target("data.dataset", s.data.dataset)
    _target("model", s.model)
    _target("optimizer", s.optimizer)
    _target("scheduler", s.scheduler)
    _try_optimizer_and_scheduler(cfg)
    return s


def _try_optimizer_and_scheduler(cfg: DictConfig) -> None:
    """Build the optimizer and schedule on one dummy parameter: catches a bad lr or a wrong
    argument now, not after the run directory exists. (Model and data may be expensive to build.)"""
    import torch
    from hydra.utils import instantiate

    from spot.run.schedule import build_scheduler

    param = torch.nn.Parameter(torch.zeros(1))
    for key in ("optimizer", "scheduler"):
        try:
            if key == "optimizer":
                optimizer = instantiate(cfg.optimizer)([param])
            else:
                build_scheduler(instantiate(cfg.scheduler), optimizer, total_steps=10)
        except Exception as exc:  # whatever the user's target raises, reported as one line
            cause = exc.__cause__ or exc
            message = one_line(cause) or type(cause).__name__
            raise ConfigError(key, message) from None


def training_view(cfg: DictConfig) -> dict:
    """The resolved config minus what does not change the training (for the config digest)."""
    container = OmegaConf.to_container(cfg, resolve=True)
    for key in NON_TRAINING_KEYS:
        container.pop(key, None)
    for leaf in NON_TRAINING_LEAVES:
        group, _, name = leaf.partition(".")
        if isinstance(container.get(group), dict):
            container[group].pop(name, None)
    return container
