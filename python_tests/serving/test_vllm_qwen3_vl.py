"""vLLM's Qwen3-VL with EvoPrune in its tower (evoprune_ext/vllm/qwen3_vl.py), on a tiny random model saved
locally (two deepstack layers): keep_ratio=1 gives vLLM's own tokens; 0.5 and 0.25 give prompts of the expected
visual token counts per block (an image, or one video frame after its timestamp) for images, videos and several
of each, and generation runs; chunked prefill and a warm prefix cache change nothing.
One engine at a time, each in a subprocess (vllm_engine.py)."""

import pytest
from vllm_engine import request, run_engine, visual_blocks

from evoprune_ext import random_models

ARCHITECTURE = "EvoPruneQwen3VLForConditionalGeneration"
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"
REQUESTS = [
    request(f"USER : {IMAGE} what is in this image ASSISTANT :", images=1),
    request(f"USER : {IMAGE} {IMAGE} what is in this image ASSISTANT :", images=2, seed=1),
    request(f"USER : {VIDEO} what is in this video ASSISTANT :", videos=1),
    request(f"USER : {IMAGE} {VIDEO} {IMAGE} {VIDEO} what is in this video ASSISTANT :", images=2, videos=2,
            seed=2),
]
RATIOS = [None, 1.0, 0.5, 0.25]  # None: vLLM's own Qwen3VLForConditionalGeneration


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # vLLM's CPU attention needs a head_dim of 32, 64, 80, ...: 64 / 2 heads.
    model, processor = random_models.qwen3_vl(text=dict(num_attention_heads=2))
    path = tmp_path_factory.mktemp("qwen3_vl")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def runs(model_dir, tmp_path_factory) -> dict:
    return {
        ratio: run_engine(tmp_path_factory.mktemp("run"), model=model_dir, requests=REQUESTS, keep_ratio=ratio,
                          architecture=None if ratio is None else ARCHITECTURE)
        for ratio in RATIOS
    }


def test_keep_ratio_one_is_vllm(runs):
    assert runs[1.0] == runs[None]


@pytest.mark.parametrize("ratio", [0.5, 0.25])
def test_pruned_prompt_counts_and_generation(runs, ratio):
    for spec, full, pruned in zip(REQUESTS, runs[None], runs[ratio]):
        blocks = visual_blocks(full["prompt"])
        # Every block is one frame (an image, or a video frame of 64 units): it keeps round(units * ratio).
        assert len(blocks) == spec["images"] + 2 * spec["videos"]  # a video: 4 frames -> t = 2
        assert visual_blocks(pruned["prompt"]) == [(name, round(n * ratio)) for name, n in blocks]
        assert len(pruned["output"]) == 8


def test_text_around_blocks_is_vllm(runs):
    """Pruning removes placeholders only: timestamps, vision start / end tokens and the text stay."""
    tokenizer = random_models.tokenizer()
    placeholders = {tokenizer.convert_tokens_to_ids(name) for name in ("<|image_pad|>", "<|video_pad|>")}
    for full, pruned in zip(runs[None], runs[0.25]):
        assert [t for t in pruned["prompt"] if t not in placeholders] == \
            [t for t in full["prompt"] if t not in placeholders]


def test_chunked_prefill_and_prefix_cache_change_nothing(runs, model_dir, tmp_path):
    """Prompts split into chunks of 16 tokens (frames cut across chunks), each prompt run twice (the second pass
    reads its prefix from the cache): the tokens of one unchunked pass."""
    chunked = run_engine(tmp_path, model=model_dir, requests=REQUESTS, architecture=ARCHITECTURE, keep_ratio=0.5,
                         passes=2, engine=dict(enable_prefix_caching=True, enable_chunked_prefill=True,
                                               max_num_batched_tokens=16, max_num_seqs=1))
    assert chunked == runs[0.5] + runs[0.5]

