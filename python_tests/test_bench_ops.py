"""Smoke run of bench/bench_ops.py, so the benchmark cannot rot (it measures; nothing is asserted on speed)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import bench_ops  # noqa: E402


def test_bench_ops_quick_runs_with_every_peer(capsys):
    rows = bench_ops.main(["--quick", "--peers", "tome,divprune,visionzip,topk,random", "--repeats", "2"])
    assert len(rows) == 1 and rows[0]["op"]["median_ms"] > 0
    assert all(f"speedup_vs_{p}" in rows[0] for p in ("tome", "divprune", "visionzip", "topk", "random"))
    assert "| Q1 tiny |" in capsys.readouterr().out


def test_profile_splits_the_op_into_stages_and_its_floor(capsys):
    bench_ops.main(["--quick", "--profile", "--scaling"])
    out = capsys.readouterr().out
    assert "op / floor" in out and "with 1 thread" in out
    row = bench_ops.profile(bench_ops.QUICK["Q1"], repeats=2)
    assert row["floor"] == row["K rows"] + row["read tokens"] + row["read attn"]  # Q1 has 4-d attention
    assert all(row[stage] > 0 for stage in ("op", "importance", "select", "merge"))


def test_targets_table_says_met_or_not_with_the_floor():
    import report  # bench/report.py

    ops = [{"shape": "S1 CLIP-L/336", "speedup_vs_reference": 9.0, "op_over_bmm": 4.0},
           {"shape": "S4 high-res", "speedup_vs_reference": 2.5, "op_over_bmm": 1.0}]
    profile = [{"shape": "S1 CLIP-L/336", "op_over_floor": 1.1}, {"shape": "S4 high-res", "op_over_floor": 1.05}]
    sweep = [{"shape": "sweep N=576", "speedup_vs_tome": 4.0}, {"shape": "sweep N=16384", "speedup_vs_tome": 0.9}]
    encoder = [{"encoder": "siglip-so400m-384", "method": "evoprune", "ops_share": 0.015},
               {"encoder": "siglip-so400m-384", "method": "tome", "ops_share": 0.05}]
    table = report.targets(ops, profile, sweep, {"threads": 2, "scaling": 1.8}, encoder)
    assert "| S1 CLIP-L/336: op at least 8x the reference | 9.0x | yes |" in table
    assert "| S4 high-res: op at least 4x the reference | 2.5x | no (op / floor 1.05) |" in table
    assert "| S1 CLIP-L/336: op / bmm at most 1.5 | 4.00 | no (op / floor 1.10) |" in table
    assert "sweep N=16384, 0.90x ToMe's speed | yes |" in table  # 0.9 >= 1 / 1.2
    assert "| our ops at most 2% of SigLIP encoder time | at most 1.5% | yes |" in table
    assert "| 1 to 2 threads at least 1.7x at S3 | 1.80x | yes |" in table


def test_report_reuses_only_the_long_sections():
    import report  # bench/report.py

    for bad in (["--reuse", "ops"], ["--reuse", "quality", "--quick"]):
        with pytest.raises(SystemExit):
            report.main(bad)


def test_importance_floor_covers_the_four_pruning_layers():
    row = bench_ops.importance_floor(repeats=1)
    assert row["token_counts"][0] == 729 and len(row["token_counts"]) == 4
    assert row["token_counts"] == sorted(row["token_counts"], reverse=True)
    assert row["importance_from_qk ms"] > 0 and row["q @ k^T ms"] > 0
