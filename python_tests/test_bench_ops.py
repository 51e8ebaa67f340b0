"""Smoke run of bench/bench_ops.py, so the benchmark cannot rot (it measures; nothing is asserted on speed)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import bench_ops  # noqa: E402


def test_bench_ops_quick_runs_with_every_peer(capsys):
    rows = bench_ops.main(["--quick", "--peers", "tome,divprune,visionzip,topk,random", "--repeats", "2"])
    assert len(rows) == 1 and rows[0]["op"]["median_ms"] > 0
    assert all(f"speedup_vs_{p}" in rows[0] for p in ("tome", "divprune", "visionzip", "topk", "random"))
    assert "| Q1 tiny |" in capsys.readouterr().out
