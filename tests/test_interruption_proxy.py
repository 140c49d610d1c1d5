"""Interruption notices with an HTTP proxy in the environment (common in corporate VPCs): the
metadata service is link-local and never proxied, so the notice must still get through.

The proxy here is dead (a closed loopback port) and `no_proxy` is unset: a metadata request that
went to the proxy would fail, the notice would never be seen, and the run would end without its
emergency checkpoint.
"""

from __future__ import annotations

import socket
import urllib.request

import pytest

from spot.checkpoint import manifest
from spot.interruption import InterruptionMonitor
from spot.run.config import CloudConfig
from spot.run.events import read_events
from spot.run.exitcodes import EXIT_PREEMPTED
from spot.tools.emulate import EmulatorServer

from .helpers import run_dir_of, wait_for_step
from .test_interruption import control, finish, notice_args, start
from .test_watchers import wait_until

PROXY_VARS = ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")
NO_PROXY_VARS = ("no_proxy", "NO_PROXY")


def dead_proxy() -> str:
    """An http:// URL on loopback where nothing listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def proxy_environment() -> dict[str, str]:
    """Every proxy variable names the dead proxy; `no_proxy` is empty, which urllib reads as
    unset (the values overlay an environment that may have one)."""
    return {**dict.fromkeys(PROXY_VARS, dead_proxy()), **dict.fromkeys(NO_PROXY_VARS, "")}


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


@pytest.mark.slow
@pytest.mark.parametrize("cloud", ["aws", "gcp"])
def test_a_notice_behind_a_proxy_stops_with_the_emergency_checkpoint(cloud, tmp_path):
    """End to end: train.py with the dead proxy in its environment hears the emulated notice,
    commits the emergency checkpoint at the step it stopped at, and exits 75."""
    server = EmulatorServer(cloud).start()
    args = notice_args(cloud, server, tmp_path)
    try:
        proc = start(args, env=proxy_environment())
        wait_for_step(tmp_path, 20, proc)
        control(server, "notice")  # from the test process, which has no proxy set
        code, out = finish(proc)
    finally:
        server.stop()
    assert code == EXIT_PREEMPTED, out[-3000:]
    run_dir = run_dir_of(tmp_path)
    events = read_events(run_dir / "events.jsonl")
    (notice,) = [e for e in events if e["event"] == "notice"]
    assert notice["source"] == cloud
    (emergency,) = [e for e in events if e["event"] == "emergency_checkpoint"]
    assert emergency["step"] == max(e["step"] for e in events if e["event"] == "train")
    saved = manifest.verify(run_dir / "checkpoints" / manifest.step_dir_name(emergency["step"]))
    assert saved.step == emergency["step"]
