"""vLLM's Qwen3-VL with EvoPrune in its tower (evoprune_ext/vllm/qwen3_vl.py), on a tiny random model saved
locally (two deepstack layers): keep_ratio=1 gives vLLM's own tokens; 0.5 and 0.25 give prompts of the expected
visual token counts per block (an image, or one video frame after its timestamp) for images, videos and several
of each, and generation runs; chunked prefill and a warm prefix cache change nothing. Under budget="clip" (one pool
per video; the prompt's frames hold the even split until the model writes the frames the tower kept): keep_ratio=1
gives vLLM's own prompts, tokens and logprobs, 0.5 and 0.25 the clip counts, the transformers adapter's prompts (and
its answers to the image prompts), and chunked prefill changes nothing.
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
    assert_same,
    request,
    run_engine,
    run_transformers,
    runs_by_ratio,
    save_tiny_model,
    visual_blocks,
)

from evoprune_ext import random_models
from evoprune_ext.schedule import frame_split
from evoprune_ext.vllm.qwen3_vl import (
    EvoPruneQwen3VLForConditionalGeneration,
    _cut_runs,
    _index_rows,
    _span_positions,
)
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


def test_clip_positions_are_those_of_the_kept_units(model_dir):
    """Under the clip budget: get_mrope_input_positions on the prompt the processor writes (each video frame holding
    the even split), then recompute_mrope_positions chunk by chunk (5 tokens a step) on the rows the model writes
    after the tower (whole spans: a video's timestamps, vision start / end tokens and its frames as the tower kept
    them, one frame keeping nothing): exactly vLLM's unpruned positions of the tokens the served prompt keeps."""
    config = transformers.AutoConfig.from_pretrained(model_dir)
    config.evoprune = {"keep_ratio": 0.25, "budget": "clip"}
    model = object.__new__(EvoPruneQwen3VLForConditionalGeneration)  # the position methods need only the config
    object.__setattr__(model, "config", config)
    start, end = config.vision_start_token_id, config.vision_end_token_id
    image, video = config.image_token_id, config.video_token_id
    # An image of 4 x 6 units; a video of 3 frames of 4 x 4 units, each frame after a 2-token timestamp.
    grids = {"image": [1, 8, 12], "video": [3, 8, 8]}
    generator = torch.Generator().manual_seed(0)
    kept = {"image": torch.randperm(24, generator=generator)[:6].sort().values,  # round(24 * 0.25)
            "video": torch.cat([torch.randperm(16, generator=generator)[:count].sort().values + 16 * frame
                                for frame, count in enumerate([7, 0, 5])])}  # round(48 * 0.25), frame 1 empty
    timestamps = [[20 + 2 * frame, 21 + 2 * frame] for frame in range(3)]

    def prompt(image_count: int, frame_counts: list[int]) -> tuple[list[int], int, int]:
        """The token ids, the offset and length of the video's span."""
        tokens = [30, 31, 32, start, *[image] * image_count, end, 33, 34, start]
        offset = len(tokens)
        for stamp, count in zip(timestamps, frame_counts):
            tokens += [*stamp, start, *[video] * count, end]
        return [*tokens, end, 35], offset, len(tokens) - offset

    full_tokens, full_offset, full_length = prompt(24, [16] * 3)
    full, _ = Qwen3VLForConditionalGeneration._get_mrope_input_positions(
        full_tokens, [_feature("image", grids["image"], 4, 24),
                      _feature("video", grids["video"], full_offset, full_length)], config)
    placeholder = torch.tensor([t in (image, video) for t in full_tokens])
    keep = ~placeholder
    keep[placeholder.nonzero()[:, 0][torch.cat([kept["image"], 24 + kept["video"]])]] = True
    served = torch.tensor(full_tokens)[keep]  # the prompt as the language model reads it

    tokens, offset, length = prompt(6, frame_split(12, 3))
    assert len(tokens) == len(served) and offset == full_offset - 18
    positions, delta = model.get_mrope_input_positions(
        tokens, [_feature("image", grids["image"], 4, 6), _feature("video", grids["video"], offset, length)])
    image_rows = _index_rows(torch.zeros(6, 8), _kept_positions(grids["image"], kept["image"], 0.0))
    units = _kept_positions(grids["video"], kept["video"], 1.0)[:, 1:3]
    span = _span_positions(served[offset : offset + length], units, 4, config)
    video_rows = torch.cat([torch.zeros(length, 8), encode_positions(span, torch.float32)], dim=1)
    for computed in range(0, len(tokens), 5):
        slices = [rows[max(computed - first, 0) : computed + 5 - first]
                  for rows, first in ((image_rows, 4), (video_rows, offset)) if computed + 5 > first]
        slices = [rows for rows in slices if len(rows)]
        embeds, positions, delta = model.recompute_mrope_positions(tokens, slices, positions, computed)
        assert [tuple(rows.shape) for rows in embeds] == [(len(rows), 8) for rows in slices]
    assert positions.tolist() == full[:, keep].tolist()
    assert delta == int(full.max()) + 1 - len(tokens)


CLIP_RATIOS = [None, 1.0, 0.5, 0.25]  # None: vLLM's own model class


def run_clip(tmp_path_factory, model_dir, ratio: float | None, **options) -> list[dict]:
    return run_engine(tmp_path_factory.mktemp("clip"), model=model_dir, requests=REQUESTS, keep_ratio=ratio,
                      architecture=None if ratio is None else ARCHITECTURE, budget="clip", dtype="float32",
                      logprobs=3, **options)


@pytest.fixture(scope="module")
def clip_runs(model_dir, tmp_path_factory) -> dict:
    """{ratio: results under budget="clip"}, float32 with the top-3 logprobs of each step."""
    return {ratio: run_clip(tmp_path_factory, model_dir, ratio) for ratio in CLIP_RATIOS}


def test_clip_keep_ratio_one_is_vllm(clip_runs):
    """Every token of a video's span comes from the model's own rows: at keep_ratio=1 they are vLLM's prompt."""
    assert_same(clip_runs[1.0], clip_runs[None])


@pytest.mark.parametrize("ratio", [0.5, 0.25])
def test_clip_prompt_counts_and_generation(clip_runs, ratio):
    """Each video holds round(frames * units * ratio) placeholders, split evenly over its frames' blocks (the
    model moves them to the frames the tower kept them in); images keep round(units * ratio); the text, timestamps
    and vision start / end tokens are vLLM's."""
    tokenizer = random_models.tokenizer()
    placeholders = {tokenizer.convert_tokens_to_ids(name) for name in ("<|image_pad|>", "<|video_pad|>")}
    for spec, full, pruned in zip(REQUESTS, clip_runs[None], clip_runs[ratio]):
        blocks, expected = iter(visual_blocks(full["prompt"])), []
        for name, units in blocks:  # a video: 4 frames -> t = 2 blocks of 64 units
            frames = [(name, units)] if name == "<|image_pad|>" else [(name, units), next(blocks)]
            expected += [(name, count) for count in frame_split(round(len(frames) * units * ratio), len(frames))]
        assert visual_blocks(pruned["prompt"]) == expected
        assert [t for t in pruned["prompt"] if t not in placeholders] == \
            [t for t in full["prompt"] if t not in placeholders]
        assert len(pruned["output"]) == 8


def test_clip_chunked_prefill_and_prefix_cache_change_nothing(clip_runs, model_dir, tmp_path_factory):
    """Chunks of 16 tokens cut the spans (timestamps, frames) anywhere; the second pass reads its prefix from the
    cache: the prompts, tokens and logprobs of one unchunked pass."""
    chunked = run_clip(tmp_path_factory, model_dir, 0.5, passes=2,
                       engine=dict(enable_prefix_caching=True, enable_chunked_prefill=True,
                                   max_num_batched_tokens=16, max_num_seqs=1))
    assert_same(chunked, clip_runs[0.5] + clip_runs[0.5])


def test_clip_same_as_transformers(clip_runs, model_dir):
    """The transformers adapter under budget="clip" (evoprune_ext.patch), float32, at 0.5: the same prompts (each
    video's frames holding the even split) and, for the image prompts, the same tokens and top-3 logprobs. Not the
    video answers: vLLM's own unpruned Qwen3-VL already answers the video prompts otherwise than transformers' on
    this model (docs/VLLM.md, Limits); the clip budget's answers differ from transformers' as those do."""
    adapter = run_transformers(model_dir, "Qwen3VLForConditionalGeneration", REQUESTS, keep_ratio=0.5,
                               budget="clip", logprobs=3)
    served = clip_runs[0.5]
    assert [result["prompt"] for result in adapter] == [result["prompt"] for result in served]
    images_only = [i for i, spec in enumerate(REQUESTS) if not spec["videos"]]
    assert_same([adapter[i] for i in images_only], [served[i] for i in images_only])


def test_cut_runs_checks_frames():
    assert _cut_runs([1, 5, 5, 5, 5, 2, 1, 5, 5, 5, 5, 2], 5, 4, [1, 1]) == [1, 5, 2, 1, 5, 2]
    assert _cut_runs([1, 5, 5, 5, 5, 2, 1, 5, 5, 5, 5, 2], 5, 4, [0, 3]) == [1, 2, 1, 5, 5, 5, 2]
    with pytest.raises(ValueError, match="a frame of 3 placeholders, expected 4"):
        _cut_runs([1, 5, 5, 5, 2], 5, 4, [1])


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
