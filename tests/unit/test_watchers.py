"""Each cloud's watcher against the emulator over real HTTP on loopback (in-process, fast)."""

from __future__ import annotations

import json
import time
import urllib.request

import pytest

from spot.interruption import InterruptionMonitor
from spot.run.config import CloudConfig
from spot.tools.emulate import EmulatorServer


@pytest.fixture
def emulator(request):
    server = EmulatorServer(request.param).start()
    yield server
    server.stop()


def control(server: EmulatorServer, action: str, **args) -> dict:
    req = urllib.request.Request(
        f"{server.url}/_emulator/{action}", data=json.dumps(args).encode(), method="POST"
    )
    with urllib.request.urlopen(req, timeout=5) as resp:
        return json.loads(resp.read())


def watch(server: EmulatorServer, poll: float = 0.05) -> InterruptionMonitor:
    cloud = CloudConfig(name=server.cloud, metadata_url=server.url, poll_seconds=poll)
    return InterruptionMonitor(cloud, poll_metadata=True, install_signals=False)


def wait_until(predicate, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


@pytest.mark.parametrize("emulator", ["aws"], indirect=True)
def test_aws_imdsv2_notice_rebalance_and_token_expiry(emulator):
    emulator.emulator.token_ttl_cap = 1  # tokens live 1 s: refreshed ahead, or a 401 drops one
    monitor = watch(emulator)
    try:
        assert wait_until(lambda: monitor.watcher.polls >= 10)
        assert monitor.notice is None and monitor.take_rebalance() is None
        time.sleep(1.5)
        control(emulator, "rebalance")
        assert wait_until(lambda: monitor._rebalance is not None)
        assert monitor.take_rebalance() is not None and monitor.take_rebalance() is None
        assert monitor.notice is None  # a recommendation is not a notice
        sent = control(emulator, "notice", in_seconds=-5)["notice"]  # a time already past
        assert wait_until(lambda: monitor.notice is not None)
        notice = monitor.notice
        assert (notice.source, notice.kind) == ("aws", "terminate")
        assert notice.deadline < time.time() and notice.detail == sent
        assert monitor.watcher.tokens_fetched >= 2 and monitor.watcher.errors == 0
        assert emulator.emulator.stats["tokens"] == monitor.watcher.tokens_fetched
    finally:
        monitor.close()


@pytest.mark.parametrize("emulator", ["gcp"], indirect=True)
def test_gcp_hanging_get_sees_preemption_at_once(emulator):
    monitor = watch(emulator, poll=5.0)  # the hanging GET, not the poll interval, matters
    try:
        assert wait_until(lambda: emulator.emulator.stats["hanging"] >= 1)
        time.sleep(0.3)
        sent = time.time()
        control(emulator, "notice")
        assert wait_until(lambda: monitor.notice is not None, timeout=5)
        assert monitor.notice.received_at - sent < 1.0
        assert monitor.notice.deadline == pytest.approx(monitor.notice.received_at + 30)
    finally:
        monitor.close()


@pytest.mark.parametrize("emulator", ["azure"], indirect=True)
def test_azure_ignores_other_vms_and_acknowledges_its_own(emulator):
    monitor = watch(emulator)
    try:
        control(emulator, "other-vm-notice")
        assert wait_until(lambda: monitor.watcher.polls >= 5)
        assert monitor.notice is None  # another VM's eviction
        event = control(emulator, "notice")["notice"]
        assert wait_until(lambda: monitor.notice is not None)
        assert monitor.notice.detail["EventId"] == event["EventId"]
        monitor.acknowledge()
        assert control(emulator, "state")["acknowledged"] == [event["EventId"]]
    finally:
        monitor.close()


@pytest.mark.parametrize("emulator", ["aws", "gcp", "azure"], indirect=True)
@pytest.mark.parametrize("mode", ["500", "garbage", "hang"])
def test_a_broken_endpoint_raises_no_alarm_and_kills_no_watcher(emulator, mode):
    control(emulator, "misbehave", mode=mode)
    monitor = watch(emulator)
    try:
        time.sleep(2.5 if mode == "hang" else 1.0)
        assert monitor.notice is None
        assert monitor.watcher.is_alive()
        if mode != "hang":
            assert monitor.watcher.errors >= 1
        control(emulator, "misbehave", mode="ok")
        control(emulator, "notice")  # once healthy again, a notice still gets through
        assert wait_until(lambda: monitor.notice is not None, timeout=10)
    finally:
        monitor.close()


def test_a_checkpoint_slower_than_half_the_window_is_announced(tmp_path):
    from spot.interruption import previous_commit_seconds, warn_if_window_at_risk
    from spot.run.events import EventLog, read_events

    earlier = [
        {"event": "checkpoint", "persist_seconds": 9.0},
        {"event": "upload", "seconds": 20.0},
        {"event": "checkpoint", "persist_seconds": 12.0},
    ]
    assert previous_commit_seconds(earlier, with_upload=False) == 12.0
    assert previous_commit_seconds(earlier, with_upload=True) == 32.0
    assert previous_commit_seconds([], with_upload=True) is None
    log = EventLog(tmp_path / "events.jsonl")
    gcp = CloudConfig(name="gcp", notice_seconds=30)
    assert not warn_if_window_at_risk(12.0, gcp, log)
    assert warn_if_window_at_risk(32.0, gcp, log)
    log.close()
    (event,) = read_events(tmp_path / "events.jsonl")
    assert event["event"] == "notice_window_at_risk" and event["commit_seconds"] == 32.0
