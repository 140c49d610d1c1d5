"""Interruption notices with an HTTP proxy in the environment (common in corporate VPCs): the
metadata service is link-local and never proxied, so the notice must still get through.

The proxy here is dead (a closed loopback port) and `no_proxy` is unset: a metadata request that
went to the proxy would fail, the notice would never be seen, and the run would end without its
emergency checkpoint.

Here, train.py end to end. Each cloud's watcher in-process: tests/unit/test_interruption_proxy.py.
"""

from __future__ import annotations

import pytest

from spot.checkpoint import manifest
from spot.run.events import read_events
from spot.run.exitcodes import EXIT_PREEMPTED
from spot.tools.emulate import EmulatorServer

from ..helpers import proxy_environment, run_dir_of, wait_for_step
from .test_interruption import control, finish, notice_args, start


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
