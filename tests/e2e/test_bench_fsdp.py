"""`python -m spot bench --strategy fsdp`: a real run (two gloo processes, a tiny state, one
repetition) reports ours beside DCP's async_save, every figure measured."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import REPO, train_env


@pytest.mark.slow  # spawns ranks: not a unit test; measures nothing it asserts: not serial
def test_fsdp_bench_reports_ours_beside_dcp_at_two_ranks(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "spot",
            "bench",
            "--strategy",
            "fsdp",
            "--ranks",
            "2",
            "--size-gib",
            "0.005",
            "--repeats",
            "1",
            "--dir",
            str(tmp_path),
            "--json",
            str(tmp_path / "bench.json"),
        ],
        cwd=REPO,
        env=train_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "fsdp, 2 ranks" in result.stdout
    assert "ours (CheckpointManager)" in result.stdout and "DCP async_save" in result.stdout
    for label in ("stall (save call)", "persist (request to commit)", "restore (cold)"):
        row = next(line for line in result.stdout.splitlines() if line.startswith(label))
        ratio = float(row.split()[-1])  # ours/DCP: both columns were measured
        assert ratio > 0, row
    [figures] = json.loads((tmp_path / "bench.json").read_text())
    assert figures["ranks"] == 2 and len(figures["local_bytes"]) == 2
    assert sum(figures["local_bytes"]) == figures["state_bytes"] > 0
    for side in ("ours", "dcp"):
        for name in ("stall", "persist", "restore"):
            samples = figures["seconds"][f"{side}_{name}"]
            assert len(samples) == 1 and samples[0] > 0, (side, name)
    assert figures["seconds"]["ours_verify"][0] > 0
    assert [p.name for p in tmp_path.iterdir()] == ["bench.json"]  # its work directory removed
