"""vLLM's Qwen3-VL with EvoPrune in its tower (evoprune_ext/vllm/qwen3_vl.py), on a tiny random model saved
locally (two deepstack layers): keep_ratio=1 gives vLLM's own tokens; 0.5 and 0.25 give prompts of the expected
visual token counts per block (an image, or one video frame after its timestamp) for images, videos and several
of each, and generation runs; chunked prefill and a warm prefix cache change nothing.
One engine at a time, each in a subprocess (vllm_engine.py)."""

from pathlib import Path

import pytest
import torch
import transformers
from vllm.model_executor.models.qwen3_vl import Qwen3VLForConditionalGeneration
from vllm.multimodal.inputs import (
    MultiModalFeatureSpec,
    MultiModalFieldConfig,
    MultiModalFieldElem,
    MultiModalKwargsItem,
    PlaceholderRange,
)
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
from evoprune_ext.vllm.qwen3_vl import EvoPruneQwen3VLForConditionalGeneration, _cut_runs
from evoprune_ext.vllm.qwen_vl import _kept_positions, encode_positions

ARCHITECTURE = "EvoPruneQwen3VLForConditionalGeneration"
REQUESTS = [
    request(f"USER : {IMAGE} what is in this image ASSISTANT :", images=1),
    request(f"USER : {IMAGE} {IMAGE} what is in this image ASSISTANT :", images=2, seed=1),
    request(f"USER : {VIDEO} what is in this video ASSISTANT :", videos=1),
    request(f"USER : {IMAGE} {VIDEO} {IMAGE} {VIDEO} what is in this video ASSISTANT :", images=2, videos=2,
            seed=2),
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory, random_models.qwen3_vl)


@pytest.fixture(scope="module")
def runs(model_dir, tmp_path_factory) -> dict:
    return runs_by_ratio(tmp_path_factory, model_dir, REQUESTS, ARCHITECTURE)


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


def test_same_tokens_as_transformers(model_dir, tmp_path):
    """The image prompts pruned at 0.5 by the transformers adapter (evoprune_ext.patch) and in vLLM, both in
    float32: the same prompt tokens and the same greedy answer. Not the video prompts: there vLLM's own unpruned
    Qwen3-VL already answers otherwise than transformers' on this model (same prompt tokens; docs/VLLM.md, Limits)."""
    images_only = [spec for spec in REQUESTS if not spec["videos"]]
    served = run_engine(tmp_path, model=model_dir, requests=images_only, architecture=ARCHITECTURE, keep_ratio=0.5,
                        dtype="float32")
    assert run_transformers(model_dir, "Qwen3VLForConditionalGeneration", images_only, keep_ratio=0.5) == served


def _feature(modality: str, grid: list[int], offset: int, length: int) -> MultiModalFeatureSpec:
    field = MultiModalFieldElem(data=torch.tensor(grid), field=MultiModalFieldConfig.batched(modality).field)
    return MultiModalFeatureSpec(data=MultiModalKwargsItem({f"{modality}_grid_thw": field}), modality=modality,
                                 identifier=modality, mm_position=PlaceholderRange(offset=offset, length=length))


def test_positions_are_those_of_the_kept_units(model_dir):
    """get_mrope_input_positions, then recompute_mrope_positions chunk by chunk (5 tokens a step, as the runner
    gathers the kept units' rows): exactly vLLM's unpruned positions of the tokens the pruned prompt keeps."""
    config = transformers.AutoConfig.from_pretrained(model_dir)
    config.evoprune = {"keep_ratio": 0.5}
    model = object.__new__(EvoPruneQwen3VLForConditionalGeneration)  # the position methods need only the config
    object.__setattr__(model, "config", config)
    start, end = config.vision_start_token_id, config.vision_end_token_id
    image, video = config.image_token_id, config.video_token_id
    # An image of 4 x 6 units, then a video of 2 frames of 4 x 4 units, each after a 2-token timestamp.
    grids = {"image": [1, 8, 12], "video": [2, 8, 8]}
    generator = torch.Generator().manual_seed(0)
    kept = {"image": torch.randperm(24, generator=generator)[:12].sort().values,
            "video": torch.cat([torch.randperm(16, generator=generator)[:8].sort().values + 16 * f for f in (0, 1)])}
    words = iter(range(20, 40))  # token ids of no special token

    def text(count: int) -> list[int]:
        return [next(words) for _ in range(count)]

    tokens = [*text(3), start, *[image] * 24, end, *text(2)]
    video_offset = len(tokens)
    for _ in range(2):  # each frame: a timestamp, then its block
        tokens += [*text(2), start, *[video] * 16, end]
    tokens += text(1)
    features = [_feature("image", grids["image"], 4, 24), _feature("video", grids["video"], video_offset, 40)]
    full, _ = Qwen3VLForConditionalGeneration._get_mrope_input_positions(tokens, features, config)

    placeholder = torch.tensor([t in (image, video) for t in tokens])
    keep = ~placeholder
    keep[placeholder.nonzero()[:, 0][torch.cat([kept["image"], 24 + kept["video"]])]] = True
    pruned_tokens = torch.tensor(tokens)[keep].tolist()
    pruned_features = [_feature("image", grids["image"], 4, 12),
                       _feature("video", grids["video"], video_offset - 12, 24)]
    positions, delta = model.get_mrope_input_positions(pruned_tokens, pruned_features)
    # Each item's kept units: 8 features, then the position channels.
    rows = [torch.cat([torch.zeros(len(kept[modality]), 8),
                       encode_positions(_kept_positions(grids[modality], kept[modality], 0.0), torch.float32)], dim=1)
            for modality in ("image", "video")]
    row_tokens = [i for i, t in enumerate(pruned_tokens) if t in (image, video)]  # the token of each kept unit
    first = [0, len(kept["image"])]  # each item's first row in row_tokens
    for computed in range(0, len(pruned_tokens), 5):
        step = [k for k, i in enumerate(row_tokens) if computed <= i < computed + 5]
        slices = [item[[k - offset for k in step if 0 <= k - offset < len(item)]] for item, offset in zip(rows, first)]
        slices = [item for item in slices if len(item)]
        embeds, positions, delta = model.recompute_mrope_positions(pruned_tokens, slices, positions, computed)
        assert [tuple(item.shape) for item in embeds] == [(len(item), 8) for item in slices]
    assert positions.tolist() == full[:, keep].tolist()
    assert delta == int(full.max()) + 1 - len(pruned_tokens)


def test_cut_runs_checks_frames():
    assert _cut_runs([1, 5, 5, 5, 5, 2, 1, 5, 5, 5, 5, 2], 5, 4, 1) == [1, 5, 2, 1, 5, 2]
    with pytest.raises(ValueError, match="a frame of 3 placeholders, expected 4"):
        _cut_runs([1, 5, 5, 5, 2], 5, 4, 1)


def save_published_moe(tmp_path_factory) -> Path:
    """The tiny Qwen3-VL-MoE saved as the published checkpoints hold it: transformers (5.19) saves the fused
    experts as it holds them, [experts, out, in], but the checkpoints, which vLLM's loader reads as they are and
    transformers' loader transposes, hold [experts, in, out]. Checked: transformers reads back the same weights."""
    from safetensors.torch import load_file, save_file

    model_dir = save_tiny_model(tmp_path_factory, random_models.qwen3_vl_moe)
    path = model_dir / "model.safetensors"
    weights = load_file(path)
    save_file({name: weight.transpose(1, 2).contiguous() if ".mlp.experts." in name else weight
               for name, weight in weights.items()}, path, metadata={"format": "pt"})
    loaded = transformers.Qwen3VLMoeForConditionalGeneration.from_pretrained(model_dir).state_dict()
    assert all(torch.equal(loaded[name], weight) for name, weight in weights.items())
    return model_dir


def test_moe_keep_ratio_one_is_vllm_and_pruned_counts(tmp_path_factory):
    """Qwen3-VL-MoE (vLLM's subclass: a mixture-of-experts LM around the same tower): keep_ratio=1 gives vLLM's own
    tokens, 0.5 the pruned count in every image and frame."""
    model_dir = save_published_moe(tmp_path_factory)
    runs = {ratio: run_engine(tmp_path_factory.mktemp("moe"), model=model_dir, requests=REQUESTS, keep_ratio=ratio,
                              architecture=None if ratio is None else "EvoPruneQwen3VLMoeForConditionalGeneration")
            for ratio in (None, 1.0, 0.5)}
    assert runs[1.0] == runs[None]
    for full, pruned in zip(runs[None], runs[0.5]):
        assert visual_blocks(pruned["prompt"]) == [(name, round(n * 0.5)) for name, n in visual_blocks(full["prompt"])]
        assert len(pruned["output"]) == 8
