"""Smoke run of bench/bench_mllm.py on tiny models, so the benchmark cannot rot (nothing is asserted on speed)."""

import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import bench_mllm  # noqa: E402


def test_bench_mllm_quick(tmp_path, capsys):
    rows = bench_mllm.main(["--quick", "--ratios", "0.25", "--peers-at", "0.5", "--json", str(tmp_path / "m.json")])
    settings = [r["setting"] for r in rows if r["model"] == "llava-1.5"]
    assert settings[:2] == ["unpatched", "evoprune 0.25"] and "visionzip after 0.5" in settings
    tokens = {r["setting"]: r["visual_tokens"] for r in rows if r["model"] == "onevision-0.5b"}
    assert tokens["unpatched"] == 2 * 16 + 1  # 2 frames pooled 7 x 7 -> 4 x 4, and the newline
    assert tokens["evoprune 0.25"] == 2 * round(49 * 0.25) + 1
    assert all(r["ttft_ms"] > 0 and r["ideal"] > 0 for r in rows)
    qwen = {r["setting"]: r["visual_tokens"] for r in rows if r["model"] == "qwen2.5-vl-video"}
    assert qwen == {"unpatched": 144, "evoprune 0.25": 36, "evoprune after 0.5": 72}  # 12 x 12 units, 1 frame
    assert "| onevision-0.5b | evoprune 0.25 |" in capsys.readouterr().out
    assert (tmp_path / "m.md").exists()
