"""vLLM's Qwen2.5-VL with EvoPrune in its tower (evoprune_ext/vllm/qwen2_5_vl.py), on a tiny random model saved
locally: keep_ratio=1 gives vLLM's own tokens; 0.5 and 0.25 give prompts of the expected visual token counts for
images, videos and several of each, and generation runs; chunked prefill and a warm prefix cache change nothing.
One engine at a time, each in a subprocess (vllm_engine.py)."""

import pytest
from vllm_engine import (
    IMAGE,
    VIDEO,
    request,
    run_engine,
    run_transformers,
    runs_by_ratio,
    save_tiny_model,
    visual_blocks,
)

from evoprune_ext import random_models

ARCHITECTURE = "EvoPruneQwen2_5_VLForConditionalGeneration"
REQUESTS = [
    request(f"USER : {IMAGE} what is in this image ASSISTANT :", images=1),
    request(f"USER : {IMAGE} {IMAGE} what is in this image ASSISTANT :", images=2, seed=1),
    request(f"USER : {VIDEO} what is in this video ASSISTANT :", videos=1),
    request(f"USER : {IMAGE} {VIDEO} {VIDEO} what is in this video ASSISTANT :", images=1, videos=2, seed=2),
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory, random_models.qwen2_5_vl)


@pytest.fixture(scope="module")
def runs(model_dir, tmp_path_factory) -> dict:
    return runs_by_ratio(tmp_path_factory, model_dir, REQUESTS, ARCHITECTURE)


def test_keep_ratio_one_is_vllm(runs):
    assert runs[1.0] == runs[None]


@pytest.mark.parametrize("ratio", [0.5, 0.25])
def test_pruned_prompt_counts_and_generation(runs, ratio):
    for full, pruned in zip(runs[None], runs[ratio]):
        blocks = visual_blocks(full["prompt"])
        # A video block is t=2 frames of 64 units; each frame keeps round(64 * ratio).
        expected = [(name, 2 * round(n / 2 * ratio) if name == "<|video_pad|>" else round(n * ratio))
                    for name, n in blocks]
        assert blocks and visual_blocks(pruned["prompt"]) == expected
        assert len(pruned["output"]) == 8


def test_chunked_prefill_and_prefix_cache_change_nothing(runs, model_dir, tmp_path):
    """Prompts split into chunks of 16 tokens (visual blocks cut across chunks), each prompt run twice (the second
    pass reads its prefix from the cache): the tokens of one unchunked pass."""
    chunked = run_engine(tmp_path, model=model_dir, requests=REQUESTS, architecture=ARCHITECTURE, keep_ratio=0.5,
                         passes=2, engine=dict(enable_prefix_caching=True, enable_chunked_prefill=True,
                                               max_num_batched_tokens=16, max_num_seqs=1))
    assert chunked == runs[0.5] + runs[0.5]


def test_same_tokens_as_transformers(model_dir, tmp_path):
    """The same prompts pruned at 0.5 by the transformers adapter (evoprune_ext.patch) and in vLLM, both in
    float32: the same prompt tokens and the same greedy answer."""
    served = run_engine(tmp_path, model=model_dir, requests=REQUESTS, architecture=ARCHITECTURE, keep_ratio=0.5,
                        dtype="float32")
    assert run_transformers(model_dir, "Qwen2_5_VLForConditionalGeneration", REQUESTS, keep_ratio=0.5) == served


def test_clip_budget_counts_and_same_tokens_as_transformers(runs, model_dir, tmp_path):
    """budget="clip": a video's t=2 frames of 64 units keep round(128 * 0.4) = 51 units between them (52 per
    frame: 2 * round(25.6)); the same prompts and answers as the transformers adapter, in float32."""
    served = run_engine(tmp_path, model=model_dir, requests=REQUESTS, architecture=ARCHITECTURE, keep_ratio=0.4,
                        dtype="float32", budget="clip")
    for full, pruned in zip(runs[None], served):
        expected = [(name, round(n * 0.4)) for name, n in visual_blocks(full["prompt"])]
        assert visual_blocks(pruned["prompt"]) == expected
    assert ("<|video_pad|>", 51) in visual_blocks(served[2]["prompt"])
    assert run_transformers(model_dir, "Qwen2_5_VLForConditionalGeneration", REQUESTS, keep_ratio=0.4,
                            budget="clip") == served


def test_position_channels_are_exact_in_bfloat16():
    """Positions ride in the embeddings' dtype as two base-256 digits: bfloat16 rounds 257 to 256 (a long video's
    text would resume one position off), the digits do not; values past 65535 are refused."""
    import torch

    from evoprune_ext.vllm.qwen_vl import encode_positions, split_positions

    positions = torch.tensor([[0, 3, 255, 256], [257, 511, 599, 65535]])
    assert not torch.equal(positions.to(torch.bfloat16).long(), positions)
    features = torch.randn(2, 5).to(torch.bfloat16)
    got_features, got = split_positions(torch.cat([features, encode_positions(positions, torch.bfloat16)], dim=1))
    assert torch.equal(got, positions) and torch.equal(got_features, features)
    with pytest.raises(ValueError, match="below 65536"):
        encode_positions(torch.tensor([[65536, 0, 0, 0]]), torch.bfloat16)


def test_evoprune_options_are_checked():
    from types import SimpleNamespace

    from evoprune_ext.vllm.qwen_vl import evoprune_options

    assert evoprune_options(SimpleNamespace(evoprune={"keep_ratio": 0.5}))["budget"] == "frame"
    with pytest.raises(ValueError, match=r"keep_ratio"):
        evoprune_options(SimpleNamespace(evoprune={"budget": "clip"}))
    with pytest.raises(ValueError, match=r"unknown options \['budgets'\]; expected keep_ratio, layers, alpha, budget"):
        evoprune_options(SimpleNamespace(evoprune={"keep_ratio": 0.5, "budgets": "clip"}))
    with pytest.raises(ValueError, match=r"budget must be one of \('frame', 'clip'\), got 'video'"):
        evoprune_options(SimpleNamespace(evoprune={"keep_ratio": 0.5, "budget": "video"}))
