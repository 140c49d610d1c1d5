"""Metrics from events, and the progress line. One W&B run across restarts and the run report:
tests/e2e/test_metrics.py."""

from __future__ import annotations

import pytest

from spot.run.goodput import account
from spot.run.metrics import RunMetrics, without_credentials

from ..helpers import PRICES
from .test_goodput import synthetic_run


class Recorder:
    def __init__(self, holds: int = 0):
        self.rows: list[tuple[int, dict]] = []
        self.holds = holds

    def logged_events(self):
        return self.holds

    def log(self, figures, step):
        self.rows.append((step, figures))

    def close(self):
        pass


def test_events_become_contract_metrics_at_their_steps():
    events = synthetic_run()
    recorder = Recorder()
    metrics = RunMetrics(recorder, [], *PRICES)
    for event in events:
        metrics(event)
    stalls = [(e["step"], e["stall_seconds"]) for e in events if e["event"] == "checkpoint"]
    logged = [(s, f["ckpt/stall_seconds"]) for s, f in recorder.rows if "ckpt/stall_seconds" in f]
    assert logged == stalls and stalls  # each checkpoint's figures at the checkpoint's step
    last_step, last = recorder.rows[-1]
    a = account(events, *PRICES)
    assert last_step == events[-1]["step"]
    assert last["spot/goodput"] == a.goodput and last["cost/saved_usd"] == a.saved_usd
    assert last["spot/interruptions"] == a.interruptions == 1
    assert last["spot/lost_steps"] == a.lost_steps


def test_a_history_counts_towards_goodput_and_what_the_tracker_lost_is_sent_again():
    events = synthetic_run()
    split = next(i for i, e in enumerate(events) if e["event"] == "start" and e["step"] > 0)
    holds = next(i for i, e in enumerate(events) if e["event"] == "checkpoint")
    recorder = Recorder(holds=holds)  # the tracker lost the history's events from `holds` on
    metrics = RunMetrics(recorder, events[:split], *PRICES)
    for event in events[split:]:
        metrics(event)
    sent = [f["spot/event_index"] for _, f in recorder.rows]
    assert sent[0] == holds and sent == sorted(sent)
    assert recorder.rows[0][0] == events[holds]["step"]  # at the lost event's own step
    assert recorder.rows[-1][1]["spot/interruptions"] == 1
    assert RunMetrics(Recorder(holds=len(events)), events, *PRICES).tracker.rows == []


def test_a_failing_tracker_never_stops_training():
    class Broken(Recorder):
        def log(self, figures, step):
            raise ConnectionError("tracker down")

    metrics = RunMetrics(Broken(), [], *PRICES)
    for event in synthetic_run():
        metrics(event)  # no exception


def test_no_credentials_reach_a_tracker():
    config = {
        "storage": {"endpoint_url": "https://user:pa55@minio.local:9000", "bucket": "b"},
        "aws_secret_access_key": "x",
        "nested": [{"api_key": "y", "keep": 1}],
    }
    assert without_credentials(config) == {
        "storage": {"endpoint_url": "https://minio.local:9000", "bucket": "b"},
        "nested": [{"keep": 1}],
    }


def test_progress_shows_rate_eta_and_the_work_since_the_last_checkpoint():
    import io

    from spot.run.progress import Progress

    now = [100.0]
    progress = Progress(1000, 200, stream=io.StringIO(), clock=lambda: now[0])
    now[0] = 110.0  # 100 steps in 10 s
    assert progress.line(300, loss=1.5) == "step 300/1000 loss 1.5 10.0 it/s ETA 1m10s unsaved 10s"
    progress.on_event({"event": "checkpoint", "step": 300})
    now[0] = 3710.0  # 200 steps in 3610 s: 600 more take 10830 s
    assert progress.line(400) == "step 400/1000 0.1 it/s ETA 3h00m unsaved 1h00m"


def test_a_recovery_becomes_its_total_and_its_parts():
    from spot.distributed.recovery import split

    stop = {"source": "aws", "notice_at": 10.0, "committed_at": 10.5}
    gathered = [
        {"rounds": 2, "rendezvous": [11.0, 13.0], "joined_at": 13.4, "stopped": stop},
        {"rounds": 2, "rendezvous": [11.2, 13.1], "joined_at": 13.6},
    ]
    fields = split(gathered, restored_at=13.9, stepped_at=14.0)
    recorder = Recorder()
    RunMetrics(recorder, [], *PRICES)({"event": "recovery", "step": 7, "time": 14.0, **fields})
    ((step, figures),) = recorder.rows
    assert step == 7 and figures["elastic/recovery_seconds"] == 4.0
    assert figures["elastic/recovery_rendezvous_seconds"] == fields["rendezvous_seconds"] == 2.1
    total = "elastic/recovery_seconds"
    parts = [v for k, v in figures.items() if k.startswith("elastic/recovery_") and k != total]
    assert len(parts) == 6 and sum(parts) == pytest.approx(4.0)


def test_the_data_wait_counts_the_time_batches_took_to_arrive_and_the_bytes_fetched():
    """DataWait (the data/wait_seconds and data/fetched_bytes figures): a batch that takes
    0.2 s to arrive is 0.2 s of waiting; the bytes are the data set's, since the last take,
    carried over from one epoch's loader to the next."""
    import time

    from spot.run.datawait import DataWait

    class Slow(list):
        fetched_bytes = 0

        def __iter__(self):
            for item in super().__iter__():
                if item == "slow":
                    time.sleep(0.2)
                Slow.fetched_bytes += 10
                yield item

    loader = Slow(["a", "slow", "b"])
    loader.dataset = loader
    wait = DataWait()
    assert list(wait.over(loader)) == ["a", "slow", "b"]
    seconds, fetched = wait.take()
    assert seconds >= 0.2 and fetched == 30
    assert wait.take() == (0.0, 0)
    assert next(wait.over(loader)) == "a"  # the next epoch's loader, the same data set
    assert wait.take()[1] == 10
