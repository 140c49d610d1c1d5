"""Validate a command line before Hydra runs it, so a bad value costs one line and writes nothing.

Hydra reports composition errors as several lines plus a hint about HYDRA_FULL_ERROR, and only
after its launcher has started. Here every job of the command (one, or each of a multirun sweep)
is composed with Hydra's compose API and validated first; the first problem is printed as one line
naming the key and what is allowed, and the process exits with EXIT_BAD_CONFIG.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra._internal.utils import get_args_parser
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from spot.run.config import ConfigError, Settings, one_line, typed_settings, validate
from spot.run.exitcodes import EXIT_BAD_CONFIG

# Flags after which Hydra prints something and runs no job: nothing to validate.
_INFO_FLAGS = ("help", "hydra_help", "info", "cfg", "shell_completion", "experimental_rerun")


def _group_options(config_dir: Path, group: str) -> list[str]:
    return sorted(p.stem for p in (config_dir / group).glob("*.yaml"))


def _explain(exc: Exception, overrides: list[str], config_dir: Path) -> str:
    """Turn a Hydra/OmegaConf exception into one line naming the key."""
    if isinstance(exc, ConfigError):
        return str(exc)
    text = one_line(exc)
    if isinstance(exc, MissingConfigException) or "Could not find" in text:
        for ov in overrides:
            key, _, value = ov.lstrip("+~").partition("=")
            if "/" not in key and "." not in key and (config_dir / key).is_dir():
                options = _group_options(config_dir, key)
                if value not in options:
                    allowed = ", ".join(options)
                    return f"config error: {key}: {value!r} is not an option; allowed: {allowed}"
    cause = exc.__cause__
    full_key = getattr(exc, "full_key", None) or getattr(cause, "full_key", None)
    if "not in struct" in text or "Could not override" in text:
        bad = next((ov for ov in overrides if ov.split("=")[0].lstrip("+~") in text), None)
        key = (bad or full_key or "override").split("=")[0]
        return f"config error: {key.lstrip('+~')}: no such key (check the spelling; see --cfg job)"
    first = text.split(". ")[0] if len(text) > 240 else text
    return f"config error: {full_key or 'command line'}: {first}"


def validate_command_line(
    argv: list[str],
    config_dir: Path,
    config_name: str = "config",
    composed: Callable[[list[Settings]], None] | None = None,
) -> list[DictConfig]:
    """Exit with one line and EXIT_BAD_CONFIG if any job of this command line is invalid; else
    return every job's composed config (none for Hydra's --help, --cfg, ...). `composed` is
    called with every job's typed settings as soon as each value has its type and passes its
    own rule, before the slower checks (imports, building the optimizer): nothing reads a value
    before its type is checked (`elastic.nproc_per_node=two` is one line, not a traceback)."""
    args, _unknown = get_args_parser().parse_known_args(argv)
    if any(getattr(args, flag, None) for flag in _INFO_FLAGS):
        return []
    config_dir = Path(args.config_dir or config_dir).resolve()
    config_name = args.config_name or config_name
    overrides = [ov for ov in args.overrides if not ov.lstrip("+~").startswith("hydra")]
    try:
        if args.multirun:
            parsed = OverridesParser.create().parse_overrides(overrides)
            jobs = [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
        else:
            jobs = [overrides]
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
            configs = [compose(config_name=config_name, overrides=list(job)) for job in jobs]
            settings = [typed_settings(cfg) for cfg in configs]
            if composed is not None:
                composed(settings)
            for cfg in configs:
                validate(cfg)
    except (ConfigError, HydraException, OmegaConfBaseException, ValueError) as exc:
        print(_explain(exc, overrides, config_dir), file=sys.stderr)
        sys.exit(EXIT_BAD_CONFIG)
    finally:
        GlobalHydra.instance().clear()
    return configs
