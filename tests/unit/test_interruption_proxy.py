"""Interruption notices with an HTTP proxy in the environment (common in corporate VPCs): the
metadata service is link-local and never proxied, so the notice must still get through.

The proxy here is dead (a closed loopback port) and `no_proxy` is unset: a metadata request that
went to the proxy would fail, the notice would never be seen, and the run would end without its
emergency checkpoint.

Here, in-process: each cloud's watcher. train.py end to end: tests/e2e/test_interruption_proxy.py.
"""

from __future__ import annotations

import urllib.request

import pytest

from spot.interruption import InterruptionMonitor
from spot.run.config import CloudConfig
from spot.tools.emulate import EmulatorServer

from ..helpers import proxy_environment
from .test_watchers import wait_until


@pytest.fixture
def proxy_in_environment(monkeypatch):
    """This process's environment names the dead proxy. urlopen's default opener reads the
    environment once, when first built: drop it on both sides so no other test inherits it."""
    for key, value in proxy_environment().items():
        monkeypatch.setenv(key, value)
    urllib.request.install_opener(None)
    yield
    urllib.request.install_opener(None)


@pytest.mark.parametrize("cloud", ["aws", "gcp", "azure"])
def test_a_watcher_ignores_the_proxy(cloud, proxy_in_environment):
    """In-process, every cloud: the watcher polls, sees the notice and (Azure) acknowledges it
    without an error, all with the dead proxy in the environment."""
    server = EmulatorServer(cloud).start()
    cfg = CloudConfig(name=cloud, metadata_url=server.url, poll_seconds=0.05)
    monitor = InterruptionMonitor(cfg, poll_metadata=True, install_signals=False)
    try:
        # The polls reach the endpoint itself (GCP's second one hangs until the notice).
        assert wait_until(lambda: server.requests >= 2), f"errors: {monitor.watcher.errors}"
        server.control("notice", {})  # in-process: the test's own requests need no HTTP
        assert wait_until(lambda: monitor.notice is not None), f"errors: {monitor.watcher.errors}"
        assert monitor.notice.source == cloud and monitor.watcher.errors == 0
        monitor.acknowledge()
        if cloud == "azure":
            assert server.control("state", {})["acknowledged"] == [monitor.notice.detail["EventId"]]
    finally:
        monitor.close()
        server.stop()
