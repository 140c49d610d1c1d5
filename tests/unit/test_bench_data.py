"""`python -m spot bench-data`'s in-process readers at a tiny size, against its own moto server:
what the table reports must add up (every sample read once, the bytes an epoch fetches)."""

from __future__ import annotations

import argparse

from spot.tools.bench_data import add_arguments, measure, report

SAMPLES = 96


def test_readers_read_every_sample_once_and_fetch_the_data_set_once(tmp_path):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        [
            f"--samples={SAMPLES}",
            "--sample-kb=4",
            "--shard-mb=0.03",  # about 7 samples a shard: 14 shards
            "--batch-size=8",
            "--step-ms=1",
            "--prefetch-steps=2",
            "--cache-limit-mb=100",  # holds the whole data set: nothing fetched twice
            "--ranks=2",
            "--no-mosaic",
        ]
    )
    results = measure(args, tmp_path)
    info, rows = results["dataset"], results["rows"]
    assert info["samples"] == SAMPLES and info["shards"] >= 8
    assert set(rows) == {"local disk", "bucket", "bucket, 2 nodes"}
    for name, row in rows.items():
        assert sorted(row["labels"]) == list(range(SAMPLES)), name  # each sample exactly once
        assert row["samples"] == row["distinct"] == SAMPLES
        assert row["size_bytes"] == info["size_bytes"]
        wait = row["wait"]
        assert 0 <= wait["p50"] <= wait["p95"] <= wait["p100"] and wait["mean"] <= wait["p100"]
        hits, reads = row["hits"]
        assert 0 <= hits <= reads
    # One reader: every shard read at least once, each downloaded exactly once.
    assert rows["bucket"]["hits"][1] >= info["shards"]
    assert rows["bucket"]["fetched_bytes"] == info["size_bytes"]
    assert rows["local disk"]["fetched_bytes"] == 0
    # Two nodes without partitions: each reads from most shards, none from all of them twice.
    assert 0 < rows["bucket, 2 nodes"]["fetched_bytes"] <= info["size_bytes"]
    assert rows["bucket"]["samples_per_s"] > 0
    table = report(results)
    assert "bucket, 2 nodes" in table and "NO" not in table
