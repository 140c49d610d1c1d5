"""The config's schema, the one place of every default, and validation before anything is written.

The dataclasses are registered in Hydra's ConfigStore as `schema` (defaults as plain values, written
as `--cfg job` prints them); conf/config.yaml composes it first, and a group's options hold only
what differs. Composing stays untyped: `validate()` merges the result into the dataclasses, so a
wrong type, an unknown key, a value outside an enumeration or breaking a rule is one line naming
the key. Import this module before composing (train.py and the preflight do): it registers `schema`.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import types
import typing
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, is_dataclass
from enum import Enum, StrEnum
from typing import Annotated, Any, NamedTuple
from urllib.parse import urlparse

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from spot.buckets import is_url


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (botocore's and Hydra's span several)."""
    return " ".join(str(exc).split())


class ConfigError(ValueError):
    """A configuration value that is not allowed; str() is the one line shown to the user."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"config error: {key}: {message}")


def _choices(name: str, *values: str) -> type[StrEnum]:
    """Members named as their values (OmegaConf looks up names); each is a str (`== "aws"`)."""
    return StrEnum(name, [(v, v) for v in values], module=__name__, qualname=name)


CloudName = _choices("CloudName", "local", "aws", "gcp", "azure", "slurm")
Signal = _choices("Signal", "SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT", "SIGHUP")
StorageBackend = _choices("StorageBackend", "local", "s3", "gcs", "azure")
CheckpointPolicy = _choices("CheckpointPolicy", "fixed", "young_daly")
DataOrder = _choices("DataOrder", "uniform", "shards")
OnCorrupt = _choices("OnCorrupt", "previous", "fail")
OnError = _choices("OnError", "stop", "continue")
WhenBusy = _choices("WhenBusy", "wait", "skip")
RdzvBackend = _choices("RdzvBackend", "c10d", "etcd", "etcd-v2", "static")
StoreHost = _choices("StoreHost", "agent", "external")
StartMethod = _choices("StartMethod", "forkserver", "spawn")
LrScaling = _choices("LrScaling", "linear", "sqrt", "none")
BatchPolicy = _choices("BatchPolicy", "scale_lr", "keep_global_batch")
LoggerBackend = _choices("LoggerBackend", "wandb", "none")
LoggerMode = _choices("LoggerMode", "offline", "online", "disabled")
Precision = _choices("Precision", "fp32", "bf16", "fp16")
Strategy = _choices("Strategy", "ddp", "fsdp")
Mode = _choices("Mode", "min", "max")


class Rule(NamedTuple):
    """A field's constraint in its `Annotated` type; the error is `<value!r> <text>`."""

    breaks: Callable[[Any], bool]
    text: str


def _matches(pattern: str, text: str) -> Rule:
    return Rule(lambda v: not re.match(pattern, v), text)


GT0 = Rule(lambda v: v <= 0, "is not allowed; must be > 0")
GE0 = Rule(lambda v: v < 0, "is not allowed; must be >= 0")
# torch's rendezvous reads its timeouts as ints: a keep-alive of 0.5 would become 0 (a heartbeat
# timer that never waits), 1.5 silently 1, a last call of 0.5 none at all.
WHOLE = Rule(
    lambda v: v < 1 or v != int(v), "is not allowed; must be a whole number of seconds >= 1"
)
Positive = Annotated[float, GT0]
PositiveInt = Annotated[int, GT0]
NonNegative = Annotated[float, GE0]
NonNegativeInt = Annotated[int, GE0]
AtLeastOne = Annotated[int, Rule(lambda v: v < 1, "is not allowed; must be >= 1")]
WholeSeconds = Annotated[float, GT0, WHOLE]
Url = Annotated[str, _matches(r"(?i)^https?://[^/?#]", "is not an http(s) URL")]
_NAME = r"^[A-Za-z0-9][A-Za-z0-9._=,+-]{0,127}$"
RunName = Annotated[str, _matches(_NAME, "is not allowed; use letters, digits and . _ - = , +")]
Device = Annotated[
    str, _matches(r"^(auto|cpu|cuda(:\d+)?)$", "is not allowed; allowed: auto, cpu, cuda, cuda:N")
]
BucketName = Annotated[  # each service's own rule: BUCKET_RULES
    str, _matches(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$", "is not a valid bucket name")
]
BUCKET_RULES = {  # storage.backend -> (pattern, what it allows)
    "s3": (r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$", "3-63 lowercase letters, digits, '.' and '-'"),
    "gcs": (
        r"^[a-z0-9][a-z0-9._-]{1,61}[a-z0-9]$|^(?=.{3,222}$)[a-z0-9][a-z0-9_-]*(\.[a-z0-9_-]+)+$",
        "3-63 lowercase letters, digits, '-', '_' and '.' (222 with dots)",
    ),
    "azure": (
        r"^(?!.*--)[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$",
        "a container: 3-63 lowercase letters, digits and single '-'",
    ),
}
AzureAccount = Annotated[
    str,
    _matches(r"^[a-z0-9]{3,24}$", "is not a storage account name (3-24 lowercase letters, digits)"),
]
S3Prefix = Annotated[str, Rule(lambda v: ".." in v.split("/"), "may not contain '..'")]
HostPort = Annotated[str, _matches(r"^[A-Za-z0-9.\-\[\]:]+:\d{1,5}$", "is not HOST:PORT")]


@dataclass
class Price:
    spot_per_hour: NonNegative = 0.0
    on_demand_per_hour: NonNegative = 0.0


@dataclass
class CloudConfig:
    name: CloudName = CloudName.local
    notice_seconds: Positive = 60  # the warning before reclaim: the emergency checkpoint's time
    poll_seconds: Positive = 5
    metadata_url: Url | None = None  # where the cloud announces a reclaim (null: signals only)
    instance_type: str = "local"
    price: Price = field(default_factory=Price)
    interruption_rate_per_hour: NonNegative = 0.0  # checkpoint.policy=young_daly needs it > 0
    signals: list[Signal] = field(default_factory=lambda: [Signal.SIGTERM, Signal.SIGUSR1])


@dataclass
class StorageConfig:
    backend: StorageBackend = StorageBackend.local
    dir: str | None = None
    bucket: BucketName | None = None  # s3, gcs: the bucket; azure: the container
    prefix: S3Prefix = ""
    endpoint_url: Url | None = None  # S3-compatible services, emulators (Azurite, GCS's)
    region: str | None = None  # s3
    account: AzureAccount | None = None  # azure: the storage account (or the connection string)
    max_attempts: PositiveInt = 5  # per request, each client's retries
    alert_after_failures: PositiveInt = 3  # consecutive failed uploads before the run says so
    final_upload_timeout_seconds: Positive = 600  # the last checkpoint's upload, then exit 4


@dataclass
class BestConfig:
    metric: Annotated[str, _matches(r"^val/\w+$", "is not a validation figure (val/<name>)")] = (
        "val/loss"
    )
    mode: Mode = Mode.min  # min: lower is better (a loss); max: higher (an accuracy)


@dataclass
class CheckpointConfig:
    every_steps: PositiveInt | None = None  # checkpoint every N steps (null: by time only)
    every_minutes: Positive | None = 15  # and/or every M minutes: the most work a reclaim loses
    policy: CheckpointPolicy = CheckpointPolicy.fixed  # young_daly: from save cost and cloud rate
    keep_last: AtLeastOne = 3
    async_save: bool = True  # the loop only copies state to host memory; writing is in background
    overlap: bool = True  # copy the optimizer state (and buffer-free models) during the next step
    on_corrupt: OnCorrupt = OnCorrupt.previous  # previous: resume from the one before a corrupt one
    on_error: OnError = OnError.stop  # a save that fails (disk full...): stop (exit 4) | continue
    when_busy: WhenBusy = WhenBusy.wait  # a checkpoint due while the last is still being written
    keep_best: BestConfig | None = None  # also keep the best by a validation figure (null: off)


@dataclass
class ElasticConfig:
    """One process, no process group (elastic=single; see conf/elastic/*.yaml, docs/elastic.md)."""

    min_nodes: PositiveInt = 1
    max_nodes: PositiveInt = 1
    nproc_per_node: PositiveInt = 1
    rdzv_backend: RdzvBackend = RdzvBackend.c10d  # etcd | etcd-v2: an etcd you run
    rdzv_endpoint: HostPort = "localhost:29400"  # must live on a node that is not reclaimed
    rdzv_store_host: StoreHost = StoreHost.agent  # external: `python -m spot rendezvous` serves it
    rdzv_join_timeout_seconds: WholeSeconds = 600  # wait this long for min_nodes
    rdzv_last_call_seconds: WholeSeconds = 5  # after min_nodes joined, wait this long for more
    rdzv_keep_alive_seconds: WholeSeconds = 5  # each node's heartbeat interval
    rdzv_keep_alive_max_attempt: AtLeastOne = 3  # a node silent this many intervals is dropped
    monitor_interval_seconds: Positive = 0.5  # how often the agent checks its workers
    shutdown_timeout_seconds: PositiveInt = 30  # SIGTERM to workers it stops, then SIGKILL
    local_addr: str | None = None  # this node's address as the others reach it (null: its FQDN)
    max_restarts: NonNegativeInt = 0  # worker-group restarts; a regrouping after a failure uses one
    start_method: StartMethod = StartMethod.forkserver  # spawn: each worker imports torch anew
    collective_timeout_seconds: Positive = 120  # a peer silent this long fails the collective
    restore_timeout_seconds: Positive = 1800  # ranks wait this long for rank 0's checkpoint
    lr_scaling: LrScaling = LrScaling.linear  # applied to world_size / reference_world_size
    batch_policy: BatchPolicy = BatchPolicy.scale_lr
    reference_world_size: PositiveInt | None = None  # the LR's and batch's (null: the first one)


@dataclass
class LoggerConfig:
    backend: LoggerBackend = LoggerBackend.wandb
    project: str = "spot-train"
    mode: LoggerMode = LoggerMode.offline  # `wandb sync` later; online needs WANDB_API_KEY


@dataclass
class DataConfig:
    dataset: Any = None  # a `_target_` node: conf/data/*.yaml
    num_workers: NonNegativeInt = 0
    shuffle: bool = True
    ledger: bool = False  # write <run dir>/ledger/rank-<r>.jsonl: each rank's indices per step
    cache_dir: str = "~/.cache/spot-train"  # a data set built once (data=stdlib) is kept here
    cache_limit_gb: Positive = 10.0  # data=shards: the shards kept on local disk at most
    prefetch_steps: NonNegativeInt = 8  # data=shards: the next steps' shards fetched ahead
    order: DataOrder = DataOrder.uniform  # shards: shards shuffled, samples within a window
    window_shards: PositiveInt = 4  # order=shards: the shards whose samples mix in an epoch
    partitions: PositiveInt = 1  # order=shards: shards dealt to this many streams, one per node
    val: Any = None  # the validation split: a `_target_` node like `dataset` (null: none)


@dataclass
class EvalConfig:
    every_steps: PositiveInt | None = None  # evaluate on data.val every N steps, and at the end
    max_batches: PositiveInt | None = None  # over all ranks, at any world size (null: whole split)
    batch_size: PositiveInt | None = None  # per rank (null: trainer.batch_size)


@dataclass
class FsdpConfig:
    # Module class names whose instances are sharded as units (e.g. the GPT's [Block]); the root
    # module always is. A name that matches no module is an error.
    shard: list[str] = field(default_factory=list)
    reshard_after_forward: bool = True  # free the gathered parameters after forward (less memory)


@dataclass
class TrainerConfig:
    max_steps: PositiveInt | None = 200  # stop after this many optimizer steps (null: by epochs)
    max_epochs: PositiveInt | None = None  # and/or after this many epochs
    batch_size: PositiveInt = 32  # per rank (the micro-batch when global_batch_size is set)
    global_batch_size: PositiveInt | None = None  # per step over all ranks, at any world size
    device: Device = "auto"
    log_every: PositiveInt = 20
    deterministic: bool = True  # resume is bitwise identical where the hardware allows
    grad_clip: Positive | None = None
    precision: Precision = Precision.fp32  # bf16 | fp16: autocast (fp16 with a gradient scaler)
    compile: bool = False  # torch.compile the model; checkpoints are the same either way
    # ddp: every rank holds the whole model and optimizer, rank 0 writes the checkpoint. fsdp:
    # FSDP2 shards parameters, gradients and optimizer state; every rank writes its own shards.
    strategy: Strategy = Strategy.ddp
    fsdp: FsdpConfig = field(default_factory=FsdpConfig)


@dataclass
class RunConfig:
    name: RunName = "default"  # experiment files set this
    id: RunName | None = (
        None  # null: a stable digest of the job's training overrides (no timestamp)
    )
    root: str = "runs"  # the run directory is <root>/<name>/<id>/, the same on every restart


@dataclass
class InitConfig:
    # (`init.from` in the issue that asked for it: `from` cannot name a dataclass field.)
    checkpoint: str | None = (
        None  # a new run starts from these weights: a checkpoint, run dir or bucket run URL
    )
    optimizer: bool = False  # and from its optimizer state too


@dataclass
class Settings:
    """The whole job, in the order `--cfg job` prints it."""

    cloud: CloudConfig = field(default_factory=CloudConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    elastic: ElasticConfig = field(default_factory=ElasticConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    # `_target_` groups: free-form, checked for an importable target below.
    model: Any = None
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: Any = None
    scheduler: Any = None
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    init: InitConfig = field(default_factory=InitConfig)
    seed: int = 0
    run: RunConfig = field(default_factory=RunConfig)


def schema_defaults() -> dict:
    """Every default as a plain value (an enumeration's as its string): the `schema` node."""
    return json.loads(json.dumps(asdict(Settings())))


ConfigStore.instance().store(name="schema", node=schema_defaults(), provider="spot")


def schema_type(key: str) -> Any:
    """The schema's type for a dotted key (`cloud.signals[0]`: an item's); None if free-form."""
    kind: Any = Settings
    for part in key.split("."):
        name, _, index = part.partition("[")
        if typing.get_origin(kind) in (typing.Union, types.UnionType):  # `X | None` holds X's keys
            kind = next(k for k in typing.get_args(kind) if k is not type(None))
        kind = typing.get_type_hints(kind).get(name) if is_dataclass(kind) else None
        if index and typing.get_origin(kind) is list:
            kind = typing.get_args(kind)[0]
    return None if kind is Any else kind


def _check_rules(node: Any, prefix: str = "") -> None:
    """Every field's rules (its `Annotated` metadata), in order; nested dataclasses too."""
    for name, kind in typing.get_type_hints(type(node), include_extras=True).items():
        key, value = f"{prefix}{name}", getattr(node, name)
        if is_dataclass(value):
            _check_rules(value, f"{key}.")
        union = typing.get_origin(kind) in (typing.Union, types.UnionType)
        kinds = typing.get_args(kind) if union else (kind,)  # `PositiveInt | None`: the int's
        for rule in [r for k in kinds for r in getattr(k, "__metadata__", ())]:
            if value is not None and rule.breaks(value):
                raise ConfigError(key, f"{value!r} {rule.text}")


# Groups that do not change what is trained: they are left out of the run id and config digest,
# so the same job resumes on another cloud, storage, world size or logger.
NON_TRAINING_KEYS = ("cloud", "storage", "elastic", "logger", "checkpoint", "run", "hydra", "eval")
NON_TRAINING_LEAVES = (
    "data.ledger",
    "data.num_workers",
    "trainer.log_every",
    "trainer.compile",
    "trainer.fsdp",  # which modules are sharded changes memory and communication, not the math
    "data.val",
    "data.cache_dir",  # where a corpus is cached is not what it holds (its digest says that)
    "data.dataset.cache_dir",
    # data=shards: how the shards are reached and cached, not which they are (their URL names
    # them, and their digest is checked on resume): a new node with another endpoint, region,
    # account or cache resumes the same run.
    "data.cache_limit_gb",
    "data.prefetch_steps",
    "data.dataset.cache_limit_gb",
    "data.dataset.endpoint_url",
    "data.dataset.region",
    "data.dataset.account",
)
# What names a run (its id: another value, another run) but is not compared with a checkpoint's
# config: where a data set of shards is, whose digest the resume checks instead (a copy at
# another URL resumes the run given its run.id).
LOCATION_LEAVES = ("data.dataset.url",)


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
    """Merge into the schema; OmegaConf's errors become one line naming the key (a list's key for
    a bad item), a value outside an enumeration one listing what is allowed."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Settings), cfg)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        full_key = getattr(exc, "full_key", None) or ""
        kind = schema_type(full_key)
        if isinstance(kind, type) and issubclass(kind, Enum):
            message = f"{exc.value!r} is not allowed; allowed: {', '.join(kind)}"
        else:
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(re.sub(r"\[\d+\]$", "", full_key) or "config", message) from None


def _wandb_key_present() -> bool:
    """W&B's own places for a key: the environment, or the netrc entry `wandb login` writes
    (`$NETRC`, else ~/.netrc)."""
    import netrc

    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def _without_hydra(cfg: DictConfig) -> DictConfig:
    cfg = cfg.copy()
    OmegaConf.set_struct(cfg, False)
    cfg.pop("hydra", None)
    return cfg


def typed_settings(cfg: DictConfig) -> Settings:
    """Every value's type and rule checked (ConfigError, one line, otherwise): the typed settings,
    the only form in which anything may read the config. `validate` does this first and then
    checks how values go together, imports the targets and builds the optimizer."""
    s = _typed(_without_hydra(cfg))
    if not s.run.root:
        raise ConfigError("run.root", "must be a directory path")
    _check_rules(s)
    return s


def _check_bucket(storage: StorageConfig) -> None:
    backend = str(storage.backend)
    if backend == "local":
        return
    if not storage.bucket:
        what = "a container" if backend == "azure" else "a bucket"
        raise ConfigError("storage.bucket", f"storage={backend} needs {what} (storage.bucket=NAME)")
    pattern, allowed = BUCKET_RULES[backend]
    if not re.match(pattern, storage.bucket):
        raise ConfigError(
            "storage.bucket", f"{storage.bucket!r} is not a {backend} name: {allowed}"
        )
    if backend == "azure" and not (storage.account or _azure_connection()):
        raise ConfigError(
            "storage.account",
            "storage=azure needs the storage account (storage.account=NAME), or "
            "AZURE_STORAGE_CONNECTION_STRING",
        )


def _azure_connection() -> bool:
    return bool(os.environ.get("AZURE_STORAGE_CONNECTION_STRING"))


def validate(cfg: DictConfig) -> Settings:
    """Check every value; return the typed settings or raise ConfigError (one line)."""
    cfg = _without_hydra(cfg)
    s = typed_settings(cfg)
    _check_bucket(s.storage)

    ck = s.checkpoint
    if ck.policy == CheckpointPolicy.fixed and ck.every_steps is None and ck.every_minutes is None:
        raise ConfigError(
            "checkpoint.every_steps", "policy=fixed needs every_steps or every_minutes set"
        )
    if ck.policy == CheckpointPolicy.young_daly and s.cloud.interruption_rate_per_hour <= 0:
        raise ConfigError(
            "cloud.interruption_rate_per_hour",
            "checkpoint.policy=young_daly needs an interruption rate > 0 (choose a cloud)",
        )

    e = s.elastic
    if e.min_nodes > e.max_nodes:
        raise ConfigError(
            "elastic.min_nodes",
            f"min_nodes={e.min_nodes} > max_nodes={e.max_nodes}; need min <= max",
        )

    lg = s.logger
    online = lg.backend == LoggerBackend.wandb and lg.mode == LoggerMode.online
    if online and not _wandb_key_present():
        raise ConfigError(
            "logger.mode",
            "online needs a W&B API key: set WANDB_API_KEY or run `wandb login`; "
            "or use logger.mode=offline (then `wandb sync`)",
        )

    t = s.trainer
    if t.max_steps is None and t.max_epochs is None:
        raise ConfigError("trainer.max_steps", "set max_steps or max_epochs (or both)")

    _target("data.dataset", s.data.dataset)
    if s.data.partitions > 1 and s.data.order != DataOrder.shards:
        raise ConfigError("data.partitions", "above 1 needs data.order=shards")
    if s.data.val is not None:
        _target("data.val", s.data.val)
    if ck.keep_best is not None and not s.eval.every_steps:
        raise ConfigError("checkpoint.keep_best", "needs evaluation: set eval.every_steps")
    source = s.init.checkpoint
    if source and not is_url(source) and not os.path.exists(source):
        raise ConfigError(
            "init.checkpoint",
            f"{source} does not exist (a checkpoint, a run directory or an s3://, gs:// or "
            "az:// run URL)",
        )
    if s.eval.every_steps and s.data.val is None:
        raise ConfigError("eval.every_steps", "needs a validation split: set data.val")
    for key in ("model", "optimizer", "scheduler"):
        _target(key, getattr(s, key))
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


# Training keys added to the schema after checkpoints were written without them, each with the
# value that trains as the template did before the key existed: a checkpoint whose config lacks
# one resumes when this run has that value (anything else is another training config). Add a
# key here when you add a training key to the schema.
KEYS_ADDED = {"data.order": "uniform", "data.window_shards": 4, "data.partitions": 1}


def keys_added() -> dict:
    """KEYS_ADDED as nested dicts, the shape of `training_view`."""
    nested: dict = {}
    for dotted, value in KEYS_ADDED.items():
        *parents, name = dotted.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[name] = value
    return nested


def training_view(cfg: DictConfig) -> dict:
    """The resolved config minus what does not change the training (for the config digest)."""
    container = OmegaConf.to_container(cfg, resolve=True)
    for key in NON_TRAINING_KEYS:
        container.pop(key, None)
    for leaf in (*NON_TRAINING_LEAVES, *LOCATION_LEAVES):
        *parents, name = leaf.split(".")
        node = container
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(name, None)
    return container
