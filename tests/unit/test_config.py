"""Configuration: every group composes with Hydra's compose API, and every bad value is refused
with one line naming the key, a non-zero exit, and no run directory."""

from __future__ import annotations

import json
import types
import typing
from concurrent.futures import ThreadPoolExecutor
from enum import Enum
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from spot.run.config import (
    ConfigError,
    Settings,
    schema_defaults,
    schema_type,
    training_view,
    validate,
)
from spot.run.exitcodes import EXIT_BAD_CONFIG
from spot.run.identity import run_id_from_overrides
from spot.run.preflight import validate_command_line
from tests.helpers import REPO, run_train

CONF = REPO / "conf"


def composed(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_contract_groups_and_options_exist():
    expected = {
        "cloud": {"local", "aws", "gcp", "azure", "slurm"},
        "storage": {"local", "s3"},
        "checkpoint": {"default"},
        "elastic": {"single", "elastic"},
        "logger": {"wandb", "none"},
        "experiment": {"example"},
    }
    for group, wanted in expected.items():
        assert wanted <= set(options(group)), group
    for group in ("model", "data", "optimizer", "scheduler", "trainer"):
        assert options(group), group


@pytest.mark.parametrize(
    "group,option",
    [
        (g, o)
        for g in (
            "cloud",
            "storage",
            "elastic",
            "logger",
            "model",
            "data",
            "optimizer",
            "scheduler",
        )
        for o in options(g)
    ],
)
def test_every_option_composes_and_validates(group, option):
    extra = {
        "storage": ["storage.bucket=my-bucket", "storage.account=myaccount"],
        "model": {"cnn": ["data=images"], "gpt": ["data=stdlib"]}.get(option, []),
        "data": {
            "images": ["model=cnn"],
            "stdlib": ["model=gpt"],
            "shards": ["data.dataset.url=s3://b/ds", "model.in_features=8", "model.num_classes=2"],
            "stdlib_shards": ["data.dataset.url=s3://b/ds", "model=gpt", "model.block_size=128"],
        }.get(option, []),
    }
    cfg = composed(f"{group}={option}", *extra.get(group, []))
    settings = validate(cfg)
    assert isinstance(settings, Settings)


def test_defaults_match_the_contract():
    s = validate(composed())
    assert (s.cloud.name, s.storage.backend, s.logger.backend, s.logger.mode) == (
        "local",
        "local",
        "wandb",
        "offline",
    )
    assert (s.checkpoint.every_minutes, s.checkpoint.keep_last, s.checkpoint.async_save) == (
        15,
        3,
        True,
    )
    assert (s.checkpoint.policy, s.checkpoint.on_corrupt) == ("fixed", "previous")
    assert (s.trainer.device, s.run.root, s.run.id) == ("auto", "runs", None)
    aws = validate(composed("cloud=aws")).cloud
    assert (aws.notice_seconds, aws.price.on_demand_per_hour, aws.price.spot_per_hour) == (
        120,
        24.48,
        7.35,
    )
    assert validate(composed("cloud=gcp")).cloud.notice_seconds == 30


def test_experiment_sets_run_name():
    cfg = composed("+experiment=example")
    assert cfg.run.name == "example"
    validate(cfg)


def test_validate_raises_one_line_naming_the_key():
    with pytest.raises(ConfigError) as err:
        validate(composed("checkpoint.every_minutes=0"))
    assert err.value.key == "checkpoint.every_minutes"
    assert "\n" not in str(err.value)


def test_run_id_is_stable_and_ignores_non_training_keys():
    a = run_id_from_overrides(["optimizer.lr=0.1", "trainer.max_steps=10"])
    assert a == run_id_from_overrides(["trainer.max_steps=10", "optimizer.lr=0.1"])
    assert a == run_id_from_overrides(
        [
            "optimizer.lr=0.1",
            "trainer.max_steps=10",
            "cloud=aws",
            "storage=s3",
            "storage.bucket=b",
            "elastic=elastic",
            "logger=none",
            "run.root=/x",
            "checkpoint.every_steps=5",
            "data.ledger=true",
        ]
    )
    assert a != run_id_from_overrides(["optimizer.lr=0.2", "trainer.max_steps=10"])


def test_where_the_shards_are_read_from_and_cached_is_not_another_run():
    """data=shards on a new node: another endpoint, region, account, cache limit or prefetch
    depth resume the same run; another data set (URL) or order does not."""
    base = ["data=shards", "model.in_features=32", "data.dataset.url=s3://a/ds"]
    a = run_id_from_overrides(base)
    assert a == run_id_from_overrides(
        [
            *base,
            "data.dataset.endpoint_url=http://127.0.0.1:9000",
            "data.dataset.region=eu-west-1",
            "data.dataset.account=acct",
            "data.cache_limit_gb=50",
            "data.prefetch_steps=16",
        ]
    )
    assert a != run_id_from_overrides([*base, "data.partitions=2"])
    assert a != run_id_from_overrides([*base[:2], "data.dataset.url=s3://a/other"])
    # ... but a copy elsewhere, given the run's run.id, is not another training config:
    shards = [*base[:2], "model.num_classes=2"]
    here, there = (training_view(composed(*shards, f"data.dataset.url={u}")) for u in "ab")
    assert here == there
    assert len(a) == 12 and a.isalnum()


# Each: the override, the key the one-line message must name. Checked in-process by validate().
BAD = [
    ("trainer.precision=fp8", "trainer.precision"),
    ("trainer.global_batch_size=0", "trainer.global_batch_size"),
    ("eval.every_steps=0", "eval.every_steps"),
    ("checkpoint.keep_best={metric: val/loss, mode: mid}", "checkpoint.keep_best.mode"),
    ("checkpoint.keep_best={metric: loss}", "checkpoint.keep_best.metric"),
    ("checkpoint.keep_best={metric: val/loss}", "checkpoint.keep_best"),  # no evaluation
    ("checkpoint.every_steps=-5", "checkpoint.every_steps"),
    ("checkpoint.every_minutes=0", "checkpoint.every_minutes"),
    ("checkpoint.keep_last=0", "checkpoint.keep_last"),
    ("checkpoint.policy=sometimes", "checkpoint.policy"),
    ("checkpoint.on_corrupt=ignore", "checkpoint.on_corrupt"),
    ("elastic.min_nodes=3", "elastic.min_nodes"),
    ("storage=s3", "storage.bucket"),
    ("trainer.device=tpu", "trainer.device"),
    ("trainer.batch_size=abc", "trainer.batch_size"),
    ("trainer.max_steps=0", "trainer.max_steps"),
    ("elastic.lr_scaling=cubic", "elastic.lr_scaling"),
    ("elastic.batch_policy=grow", "elastic.batch_policy"),
    ("elastic.rdzv_store_host=cloud", "elastic.rdzv_store_host"),
    ("elastic.start_method=fork", "elastic.start_method"),
    ("elastic.collective_timeout_seconds=0", "elastic.collective_timeout_seconds"),
    ("elastic.reference_world_size=0", "elastic.reference_world_size"),
    ("elastic.rdzv_endpoint=nohostport", "elastic.rdzv_endpoint"),
    ("logger.mode=loud", "logger.mode"),
    ("logger.mode=online", "logger.mode"),  # no W&B key here (train_env drops WANDB_API_KEY)
    ("cloud.metadata_url=ftp://x", "cloud.metadata_url"),
    ("run.name=../escape", "run.name"),
    ("optimizer.lr=-1", "optimizer"),
    ("model._target_=nowhere.Model", "model._target_"),
    # enumerations and rules the schema's types carry
    ("cloud.name=ibm", "cloud.name"),
    ("cloud.name=null", "cloud.name"),
    ("cloud.signals=[SIGTERM,SIGFOO]", "cloud.signals"),
    ("storage.backend=minio", "storage.backend"),
    ("storage.backend=gcs", "storage.bucket"),  # no bucket
    ("storage=azure", "storage.bucket"),
    (("storage=azure", "storage.bucket=box--es", "storage.account=acct"), "storage.bucket"),
    (("storage=gcs", "storage.bucket=-x-"), "storage.bucket"),
    (("storage=azure", "storage.bucket=boxes"), "storage.account"),  # nor a connection string
    (("storage=azure", "storage.bucket=boxes", "storage.account=No_Account"), "storage.account"),
    ("storage.bucket=Not_A_Bucket", "storage.bucket"),
    ("storage.prefix=a/../b", "storage.prefix"),
    ("checkpoint.on_error=maybe", "checkpoint.on_error"),
    ("checkpoint.when_busy=never", "checkpoint.when_busy"),
    ("elastic.rdzv_backend=zookeeper", "elastic.rdzv_backend"),
    ("elastic.rdzv_keep_alive_seconds=0.5", "elastic.rdzv_keep_alive_seconds"),
    ("elastic.max_restarts=-1", "elastic.max_restarts"),
    ("logger.backend=tensorboard", "logger.backend"),
    ("run.id=a/b", "run.id"),
    ("+storage.nonsense=1", "storage.nonsense"),
]

# The whole program, as a user runs it: the ones only the command line check, Hydra's
# composition or building the objects catch, and a few of the above end to end.
BAD_COMMAND_LINES = [
    ("cloud=foo", "cloud"),
    ("trainer.nonsense=1", "trainer.nonsense"),
    ("+experiment=nope", "experiment"),
    ("data.dataset.size=-3", "data.dataset"),
    ("model.hidden=abc", "model"),
    ("storage=s3", "storage.bucket"),
    ("elastic.min_nodes=3", "elastic.min_nodes"),
    ("logger.mode=online", "logger.mode"),
    ("checkpoint.policy=sometimes", "checkpoint.policy"),
    # read by the command line's own start (the workers' forkserver) before the other checks
    ("elastic.nproc_per_node=two", "elastic.nproc_per_node"),
    ("elastic.max_nodes=x", "elastic.max_nodes"),
]


@pytest.mark.parametrize(("override", "key"), BAD)
def test_bad_value_is_one_line_naming_the_key(override, key, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", "/nonexistent")
    monkeypatch.delenv("AZURE_STORAGE_CONNECTION_STRING", raising=False)
    with pytest.raises(ConfigError) as err:
        validate(composed(*(override if isinstance(override, tuple) else (override,))))
    assert err.value.key == key and "\n" not in str(err.value)


def test_bad_configuration_table(tmp_path: Path):
    def attempt(case):
        override, key = case
        root = tmp_path / key.replace("/", "_")
        return case, root, run_train([override, f"run.root={root}"], timeout=120)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(attempt, BAD_COMMAND_LINES))
    for (override, key), root, result in results:
        lines = result.stderr.strip().splitlines()
        assert result.returncode == EXIT_BAD_CONFIG, (override, result.returncode, result.stderr)
        assert len(lines) == 1, (override, lines)
        assert lines[0].startswith(f"config error: {key}:"), (override, lines[0])
        assert "Traceback" not in result.stderr
        assert not root.exists(), f"{override} created {root}"
    assert not (tmp_path / ".multirun").exists()


def test_the_command_line_check_hands_on_only_typed_checked_values(capsys):
    """What starts before the slower checks (train.start_workers: the forkserver) is handed the
    typed settings, never the composed strings, and only once every value has its type: a
    quoted number is a number, and a word where a number goes stops with one line first."""
    seen: list[Settings] = []
    validate_command_line(["elastic.nproc_per_node='2'", "logger=none"], CONF, composed=seen.extend)
    (settings,) = seen
    assert type(settings.elastic.nproc_per_node) is int and settings.elastic.nproc_per_node == 2
    for override, key in (("elastic.nproc_per_node=two", "nproc_per_node"), ("-m", "max_nodes")):
        argv = [override, "elastic.max_nodes=1,x"] if override == "-m" else [override]
        with pytest.raises(SystemExit) as done:
            validate_command_line(argv, CONF, composed=seen.extend)
        assert done.value.code == EXIT_BAD_CONFIG and len(seen) == 1, argv
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line.startswith(f"config error: elastic.{key}: "), line


def test_bad_value_in_one_multirun_job_stops_before_any_job(tmp_path: Path):
    result = run_train(
        [
            "-m",
            "trainer.batch_size=8,0",
            "logger=none",
            "trainer.max_steps=2",
            f"run.root={tmp_path}",
        ]
    )
    assert result.returncode == EXIT_BAD_CONFIG
    assert (
        result.stderr.strip() == "config error: trainer.batch_size: 0 is not allowed; must be > 0"
    )
    assert not any(tmp_path.iterdir())


def test_resolved_config_round_trips(tmp_path: Path):
    cfg = composed("+experiment=example")
    path = tmp_path / "c.yaml"
    OmegaConf.save(cfg, path)
    assert validate(OmegaConf.load(path)).run.name == "example"


def _leaves(node, prefix: str = "") -> dict:
    """Dotted key -> value of a plain nested dict."""
    out = {}
    for key, value in node.items():
        if isinstance(value, dict):
            out |= _leaves(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def _conforms(value, kind) -> bool:
    """A YAML value of the schema's type as written, with no conversion (an int for a float)."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        return any(_conforms(value, k) for k in typing.get_args(kind))
    if typing.get_origin(kind) is list:
        return isinstance(value, list) and all(
            _conforms(v, typing.get_args(kind)[0]) for v in value
        )
    if isinstance(kind, type) and issubclass(kind, Enum):
        return isinstance(value, str) and value in {m.value for m in kind}
    if kind is float:
        kind = int | float
    return isinstance(value, kind) and (kind is bool or not isinstance(value, bool))


def test_the_schema_and_the_yaml_defaults_cannot_drift():
    """Every default is one value, the schema's (spot/run/config.py): it composes, with the
    default options, to exactly what `python train.py --cfg job` prints (types and order too);
    every key an option file sets exists in the schema with the schema's type and differs from
    the schema's default (an option holds only what differs); every option validates."""
    from dataclasses import fields

    schema = OmegaConf.to_container(OmegaConf.structured(Settings))
    plain = schema_defaults()
    typed = [f.name for f in fields(Settings) if f.name not in ("model", "optimizer", "scheduler")]
    default = OmegaConf.to_container(composed(), resolve=False)

    def defaults(tree: dict) -> dict:  # the data sets are `_target_` nodes: not in the schema
        leaves = _leaves({g: tree[g] for g in typed})
        return {k: v for k, v in leaves.items() if not k.startswith(("data.dataset", "data.val"))}

    got, want = defaults(default), defaults(schema)
    assert got == want, {
        k: (got.get(k), want.get(k)) for k in got.keys() | want.keys() if got.get(k) != want.get(k)
    }
    exact = defaults(plain)
    assert [(k, type(v), v) for k, v in got.items()] == [(k, type(v), v) for k, v in exact.items()]
    assert list(default) == list(plain)  # the groups in the schema's order
    for key, value in exact.items():
        assert _conforms(value, schema_type(key)), f"the schema's {key} = {value!r}"

    printed = run_train(["--cfg", "job"], timeout=120)
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout == OmegaConf.to_yaml(composed())

    for group in ("cloud", "storage", "checkpoint", "elastic", "logger", "trainer", "data"):
        known = _leaves(schema[group])
        for option in options(group):
            where = f"conf/{group}/{option}.yaml"
            own = OmegaConf.to_container(OmegaConf.load(CONF / group / f"{option}.yaml")) or {}
            own.pop("defaults", None)
            for key, value in _leaves(own).items():
                if group == "data" and key.startswith(("dataset", "val")):
                    continue
                assert key in known, f"{where}: {key} is not in the schema"
                kind = schema_type(f"{group}.{key}")
                assert _conforms(value, kind), f"{where}: {key}: {value!r} is not a {kind}"
                assert value != exact[f"{group}.{key}"], f"{where}: {key} repeats the default"
            extra = {
                "s3": ["storage.bucket=my-bucket"],
                "gcs": ["storage.bucket=my-bucket"],
                "azure": ["storage.bucket=my-container", "storage.account=myaccount"],
                "images": ["model=cnn"],
                "stdlib": ["model=gpt"],
                "shards": ["data.dataset.url=s3://b/ds", "model.in_features=8"]
                + ["model.num_classes=2"],
                "stdlib_shards": ["data.dataset.url=s3://b/ds", "model=gpt"]
                + ["model.block_size=128"],
            }.get(option, [])
            composed_option = composed(f"{group}={option}", *extra)
            for key in _leaves(OmegaConf.to_container(composed_option[group], resolve=False)):
                assert key in known or key.startswith(("dataset", "val")), (
                    f"{where}: {key} not in schema"
                )
            validate(composed_option)


def test_a_value_outside_an_enumeration_names_what_is_allowed():
    cases = {
        "checkpoint.policy=sometimes": "checkpoint.policy: 'sometimes' is not allowed; "
        "allowed: fixed, young_daly",
        "cloud.signals=[SIGTERM,SIGFOO]": "cloud.signals: 'SIGFOO' is not allowed; "
        "allowed: SIGTERM, SIGUSR1, SIGUSR2, SIGINT, SIGHUP",
        "elastic.rdzv_backend=zk": "elastic.rdzv_backend: 'zk' is not allowed; "
        "allowed: c10d, etcd, etcd-v2, static",
        "elastic.rdzv_keep_alive_seconds=1.5": "elastic.rdzv_keep_alive_seconds: 1.5 is not "
        "allowed; must be a whole number of seconds >= 1",
    }
    for override, message in cases.items():
        with pytest.raises(ConfigError) as err:
            validate(composed(override))
        assert str(err.value) == f"config error: {message}"


def test_enumerations_are_typed_and_read_as_their_values():
    """What validate() returns is typed; a member still reads as its string wherever the
    settings go (comparisons, registries keyed by name, log lines, event JSON)."""
    s = validate(composed("cloud=slurm", "elastic=elastic", "elastic.rdzv_backend=etcd-v2"))
    assert isinstance(s.checkpoint.on_corrupt, Enum) and s.checkpoint.on_corrupt == "previous"
    assert f"{s.cloud.name}" == str(s.cloud.name) == "slurm"
    assert json.dumps([s.elastic.rdzv_backend, *s.cloud.signals]) == (
        '["etcd-v2", "SIGUSR1", "SIGUSR2", "SIGTERM"]'
    )
    assert {"etcd-v2": 1}[s.elastic.rdzv_backend] == 1
