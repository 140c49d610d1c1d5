"""`elastic.rdzv_keep_alive_seconds` and `rdzv_keep_alive_max_attempt` reach torch's rendezvous:
a node lost without a word (SIGKILL) is dropped after interval x max_attempt, and only then can
the survivors regroup. Unset, torch uses 5 s x 3 whatever the config says. Here: what reaches
torch, and what the config refuses. Nodes lost for real: tests/e2e/test_rdzv_keepalive.py."""

from __future__ import annotations

from datetime import timedelta

import pytest

from spot.distributed.launch import launch_config
from spot.run.config import CloudConfig, ConfigError, ElasticConfig, validate

from .test_config import composed


def test_the_rendezvous_torch_builds_has_the_configured_keep_alive():
    """The handler torch's launcher builds from our LaunchConfig (as `elastic_launch` does), so a
    misspelt key, which torch would ignore, fails here."""
    from torch.distributed.elastic.rendezvous import RendezvousParameters
    from torch.distributed.elastic.rendezvous import registry as rdzv_registry

    cfg = ElasticConfig(nproc_per_node=2, rdzv_keep_alive_seconds=2, rdzv_keep_alive_max_attempt=4)
    config = launch_config(cfg, CloudConfig(), "keepalive-unit")
    params = RendezvousParameters(
        backend=config.rdzv_backend,
        endpoint=config.rdzv_endpoint,  # one node: 127.0.0.1:0, a private store on a free loopback port
        run_id=config.run_id,
        min_nodes=config.min_nodes,
        max_nodes=config.max_nodes,
        local_addr=config.local_addr,
        **config.rdzv_configs,
    )
    settings = rdzv_registry.get_rendezvous_handler(params).settings
    assert settings.keep_alive_interval == timedelta(seconds=2)
    assert settings.keep_alive_max_attempt == 4


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("elastic.rdzv_keep_alive_seconds=0.5", "elastic.rdzv_keep_alive_seconds"),  # torch: 0
        ("elastic.rdzv_keep_alive_seconds=1.5", "elastic.rdzv_keep_alive_seconds"),  # torch: 1
        ("elastic.rdzv_keep_alive_max_attempt=0", "elastic.rdzv_keep_alive_max_attempt"),
        ("elastic.rdzv_last_call_seconds=0.5", "elastic.rdzv_last_call_seconds"),  # torch: 0
        ("elastic.rdzv_join_timeout_seconds=2.5", "elastic.rdzv_join_timeout_seconds"),
    ],
)
def test_a_keep_alive_torch_cannot_honour_is_refused(override, key):
    with pytest.raises(ConfigError) as err:
        validate(composed(override))
    assert err.value.key == key and "\n" not in str(err.value)
