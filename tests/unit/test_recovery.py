"""Recovery after a membership change: the departing node leaves the rendezvous (a real c10d
rendezvous on loopback), the notes an agent shares with its workers, and the split of the time
from the cause to training again."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time

import pytest

from spot.distributed import recovery, rendezvous


def _handler(port: int, run_id: str):
    from torch.distributed.elastic.rendezvous import RendezvousParameters
    from torch.distributed.elastic.rendezvous.registry import get_rendezvous_handler

    return get_rendezvous_handler(
        RendezvousParameters(
            rendezvous.backend_name("c10d"),
            f"127.0.0.1:{port}",
            run_id,
            1,
            2,
            "127.0.0.1",
            is_host=False,
            join_timeout=8,
            last_call_timeout=1,
            keep_alive_interval=60,  # a node that does not leave stays counted in for minutes
            keep_alive_max_attempt=3,
        )
    )


@pytest.mark.parametrize("leaves", [True, False])
def test_a_node_that_leaves_lets_the_other_regroup_without_waiting_for_its_heartbeat(leaves):
    from torch.distributed import TCPStore
    from torch.distributed.elastic.rendezvous import RendezvousTimeoutError

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)  # noqa: F841
    a, b = _handler(port, "leave"), _handler(port, "leave")
    assert a.get_backend() == "spot-c10d"
    sizes = {}
    threads = [
        threading.Thread(target=lambda h=h, n=n: sizes.__setitem__(n, h.next_rendezvous()))
        for n, h in (("a", a), ("b", b))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert {n: info.world_size for n, info in sizes.items()} == {"a": 2, "b": 2}

    if leaves:
        a.leave()
        assert b.next_rendezvous().world_size == 1  # a new round of one, after the last call
    else:  # a is still a participant: b waits for its heartbeat to expire, past the timeout
        a._inner._stop_heartbeats()
        with pytest.raises(RendezvousTimeoutError):
            b.next_rendezvous()
    b._inner._stop_heartbeats()


def test_leave_without_a_rendezvous_is_a_no_op():
    rendezvous.leave()  # no handler in this process: nothing happens, nothing raised


def test_static_and_etcd_v1_keep_their_names():
    assert rendezvous.backend_name("static") == "static"
    assert rendezvous.backend_name("etcd") == "etcd"
    assert rendezvous.backend_name("etcd-v2") == "spot-etcd-v2"


# ---- the notes an agent and its workers share -------------------------------------------------


def test_notes_are_shared_and_a_stop_is_reported_once(tmp_path, monkeypatch):
    monkeypatch.setenv(recovery.NOTES_ENV, str(tmp_path / "notes"))
    recovery.note(agent_started_at=100.0)
    recovery.rendezvous_done(began=time.time() - 1)
    recovery.note(stopped={"source": "aws", "notice_at": 1.0, "committed_at": 2.0})
    assert "rendezvous" not in recovery.take_node_notes(local_rank=1)  # only the node's first
    first = recovery.take_node_notes(local_rank=0)
    assert first["agent_started_at"] == 100.0 and first["rounds"] == 1
    assert first["stopped"]["source"] == "aws"
    again = recovery.take_node_notes(local_rank=0)  # the next restart: that stop is not its own
    assert "stopped" not in again and again["rounds"] == 1
    assert json.loads((tmp_path / "notes").read_text())["agent_started_at"] == 100.0


def test_without_an_agent_there_are_no_notes(monkeypatch):
    monkeypatch.delenv(recovery.NOTES_ENV, raising=False)
    recovery.note(agent_started_at=1.0)
    assert set(recovery.take_node_notes(local_rank=0)) == {"joined_at", "pid"}


def test_a_process_start_time_counts_its_imports():
    code = (
        "import time; time.sleep(1.5); "
        "from spot.distributed.recovery import process_started_at as p; print(time.time() - p())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert 1.5 <= float(out.stdout) < 60, out.stderr


# ---- the split ----------------------------------------------------------------------------------


def _node(rounds, rendezvous, joined, started=0.0, stopped=None):
    notes = {"rounds": rounds, "rendezvous": rendezvous, "joined_at": joined}
    notes["agent_started_at"] = started
    if stopped:
        notes["stopped"] = stopped
    return notes


def test_a_notice_is_split_from_the_notice_to_the_first_step():
    stop = {"source": "gcp", "notice_at": 10.0, "committed_at": 10.5}
    gathered = [
        _node(2, [11.0, 13.0], 13.4, stopped=stop),
        _node(2, [11.2, 13.1], 13.6, stopped=stop),
    ]
    fields = recovery.split(gathered, restored_at=13.9, stepped_at=14.0)
    assert fields == {
        "kind": "notice",
        "stop_seconds": 0.5,
        "departure_seconds": 0.5,
        "rendezvous_seconds": 2.1,
        "worker_start_seconds": 0.5,
        "restore_seconds": 0.3,
        "first_step_seconds": 0.1,
        "total_seconds": 4.0,
    }


def test_a_join_counts_from_the_new_node_s_start():
    signal_stop = {"source": "signal", "notice_at": 20.0, "committed_at": 20.2}
    gathered = [
        _node(3, [21.0, 23.0], 23.2, started=1.0, stopped=signal_stop),
        _node(1, [18.0, 23.0], 23.3, started=15.0),  # the newcomer: its first round
    ]
    fields = recovery.split(gathered, restored_at=23.5, stepped_at=23.6)
    assert fields["kind"] == "join" and fields["total_seconds"] == pytest.approx(8.6)
    assert fields["agent_start_seconds"] == 3.0 and fields["rendezvous_seconds"] == 5.0
    parts = [v for k, v in fields.items() if k.endswith("_seconds") and k != "total_seconds"]
    assert sum(parts) == pytest.approx(fields["total_seconds"])


def test_a_failure_counts_from_the_first_rendezvous():
    gathered = [_node(2, [30.0, 31.0], 31.5), _node(2, [30.5, 31.0], 31.2)]
    fields = recovery.split(gathered, restored_at=32.0, stepped_at=32.5)
    assert fields["kind"] == "restart" and fields["total_seconds"] == 2.5


@pytest.mark.parametrize(
    "gathered",
    [
        [_node(1, [1.0, 2.0], 3.0), _node(1, [1.0, 2.0], 3.0)],  # the job's first start
        [{"joined_at": 3.0}],  # no agent of ours (one process, or an outside torchrun)
    ],
)
def test_a_first_start_is_not_a_recovery(gathered):
    assert recovery.split(gathered, restored_at=4.0, stepped_at=5.0) is None
