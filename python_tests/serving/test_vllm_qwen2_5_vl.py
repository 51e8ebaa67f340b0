"""vLLM's Qwen2.5-VL with EvoPrune in its tower (evoprune_ext/vllm/qwen2_5_vl.py), on a tiny random model saved
locally: keep_ratio=1 gives vLLM's own tokens; 0.5 and 0.25 give prompts of the expected visual token counts, and
generation runs. One engine at a time, each in a subprocess (vllm_engine.py)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from vllm_engine import ENV

from evoprune_ext import random_models

IMAGE_PAD = "<|image_pad|>"
RATIOS = [None, 1.0, 0.5, 0.25]  # None: vLLM's own Qwen2_5_VLForConditionalGeneration


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    # vLLM's CPU attention needs a head_dim of 32, 64, 80, ...: 64 / 2 heads.
    model, processor = random_models.qwen2_5_vl(text=dict(num_attention_heads=2))
    path = tmp_path_factory.mktemp("qwen2_5_vl")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def runs(model_dir, tmp_path_factory) -> dict:
    results = {}
    for ratio in RATIOS:
        out = tmp_path_factory.mktemp("run") / "out.json"
        args = [sys.executable, str(Path(__file__).parent / "vllm_engine.py"), str(model_dir), str(out)]
        subprocess.run(args + ([] if ratio is None else [str(ratio)]), env=ENV, check=True, timeout=600)
        results[ratio] = json.loads(out.read_text())
    return results


def _image_blocks(prompt: list[int], image_pad: int) -> list[int]:
    """Lengths of the runs of image placeholders."""
    blocks, run = [], 0
    for token in prompt + [None]:
        if token == image_pad:
            run += 1
        elif run:
            blocks, run = blocks + [run], 0
    return blocks


def test_keep_ratio_one_is_vllm(runs):
    assert runs[1.0] == runs[None]


@pytest.mark.parametrize("ratio", [0.5, 0.25])
def test_pruned_prompt_counts_and_generation(runs, model_dir, ratio):
    image_pad = random_models.tokenizer().convert_tokens_to_ids(IMAGE_PAD)
    for full, pruned in zip(runs[None], runs[ratio]):
        units = _image_blocks(full["prompt"], image_pad)
        assert units and _image_blocks(pruned["prompt"], image_pad) == [round(n * ratio) for n in units]
        assert len(pruned["output"]) == 8
