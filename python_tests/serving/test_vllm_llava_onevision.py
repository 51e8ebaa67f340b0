"""vLLM's LLaVA-OneVision with EvoPrune in its SigLIP tower (evoprune_ext/vllm/llava_onevision.py), on a tiny random
model saved locally, float32, greedy, top-3 logprobs: keep_ratio=1 gives vLLM's own tokens; at 0.5 every crop and
frame holds the kept count of placeholders and the answer is the transformers adapter's; two ranks give one rank's
(vLLM's own model as the control, opt-in: vllm_engine.control); the clip budget too. Engines run on demand, each
in a subprocess (vllm_engine.py), shared by the tests.
"""

import pytest
from vllm_engine import TWO_RANKS, assert_same, control, request, run_engine, run_transformers, visual_blocks

from evoprune_ext import random_models
from evoprune_ext.schedule import kept_tokens

ARCHITECTURE = "EvoPruneLlavaOnevisionForConditionalGeneration"
PLACEHOLDERS = ("<image>", "<video>")
# (width, height): 80 x 60 pixels take the 2 x 2 grid of 56-pixel crops, 130 x 50 the 1 x 2 grid.
REQUESTS = [
    request("USER : <image> what is in this image ASSISTANT :", images=1, sides=[(80, 60)]),
    request("USER : <video> describe the scene ASSISTANT :", videos=1),
    request("USER : <image> left <image> right ASSISTANT :", images=2, seed=1, sides=[(80, 60), (130, 50)]),
]
PARITY = REQUESTS[:2]  # transformers gives each image of a several-image prompt its base crop only; vLLM does not
PATCHES = 49  # 56-pixel crops of 8-pixel patches: 7 x 7 per crop and per frame
FRAMES = 4
KEEP_RATIO = 0.5
ENGINES = {  # name: (keep_ratio, None for vLLM's own model; more arguments of vllm.LLM)
    "vllm": (None, {}),
    "keep 1": (1.0, {}),
    "keep 0.5": (KEEP_RATIO, {}),
    "vllm, 2 ranks": (None, TWO_RANKS),
    "keep 0.5, 2 ranks": (KEEP_RATIO, TWO_RANKS),
    "keep 0.5, clip": (KEEP_RATIO, {}),
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The tiny LLaVA-OneVision with 2 heads in its LM (head_dim 32, which vLLM's CPU attention takes); its tower has
    4: both split over 2 ranks. Saved as the published checkpoints hold it: transformers (5.19) saves the tower's
    weights as `vision_tower.encoder...`, vLLM reads `vision_tower.vision_model.encoder...` (transformers reads both:
    checked here)."""
    import torch
    import transformers
    from safetensors.torch import load_file, save_file

    model, processor = random_models.llava_onevision(text=dict(random_models.TINY_TEXT, num_attention_heads=2))
    path = tmp_path_factory.mktemp("llava_onevision")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    weights = load_file(path / "model.safetensors")
    save_file({name.replace("vision_tower.", "vision_tower.vision_model.", 1): weight
               for name, weight in weights.items()}, path / "model.safetensors", metadata={"format": "pt"})
    loaded = transformers.LlavaOnevisionForConditionalGeneration.from_pretrained(path).state_dict()
    assert all(torch.equal(loaded[name], weight) for name, weight in model.state_dict().items())
    return path


@pytest.fixture(scope="module")
def engine(model_dir, tmp_path_factory):
    """engine(name) -> the results of ENGINES[name] for REQUESTS, run once for all tests that ask."""
    results = {}

    def run(name: str) -> list[dict]:
        if name not in results:
            keep_ratio, arguments = ENGINES[name]
            results[name] = run_engine(
                tmp_path_factory.mktemp("run"), model=model_dir, requests=REQUESTS, dtype="float32", max_tokens=6,
                logprobs=3, keep_ratio=keep_ratio, architecture=None if keep_ratio is None else ARCHITECTURE,
                engine=arguments, budget="clip" if name.endswith("clip") else "frame",
            )
        return results[name]

    return run


def test_keep_ratio_one_is_vllm(engine):
    assert_same(engine("keep 1"), engine("vllm"), tolerance=1e-5)


def test_placeholders_are_the_kept_counts(engine):
    """Each crop and frame keeps k = round(49 * 0.5) tokens: an image its base crop and rows x columns grid crops,
    a newline after each row (not unpadded); a video its frames, then one newline (more than vLLM's 2x2-pooled 16
    per frame: EvoPrune replaces the pooling)."""
    k = kept_tokens(PATCHES, KEEP_RATIO)
    expected = [
        [("<image>", k * (1 + 2 * 2) + 2)],
        [("<video>", FRAMES * k + 1)],
        [("<image>", k * (1 + 2 * 2) + 2), ("<image>", k * (1 + 1 * 2) + 1)],
    ]
    pruned, full = engine("keep 0.5"), engine("vllm")
    assert [visual_blocks(r["prompt"], PLACEHOLDERS) for r in pruned] == expected
    images = [i for i, spec in enumerate(REQUESTS) if spec["images"]]  # fewer than vLLM's unpadded grids:
    assert all(p < f for i in images for p, f in zip(blocks(pruned[i]), blocks(full[i]), strict=True))
    assert all(len(r["output"]) == 6 for r in pruned)


def blocks(result: dict) -> list[int]:
    return [n for _, n in visual_blocks(result["prompt"], PLACEHOLDERS)]


def test_same_as_transformers(engine, model_dir):
    """An anyres image and a video pruned at 0.5 by the transformers adapter (evoprune_ext.patch) and in vLLM:
    the same prompt, the same tokens, the same top-3 logprobs."""
    served = engine("keep 0.5")[: len(PARITY)]
    expected = run_transformers(model_dir, "LlavaOnevisionForConditionalGeneration", PARITY, keep_ratio=KEEP_RATIO,
                                max_tokens=6, logprobs=3)
    assert_same(served, expected)


@control
def test_vllm_own_model_two_ranks_as_one(engine):
    assert_same(engine("vllm, 2 ranks"), engine("vllm"))


def test_evoprune_tensor_parallel_as_one_rank(engine):
    """Each rank holds 2 of the tower's 4 heads; importance and keys are averaged over all 4 before selecting, so
    both ranks keep the same tokens."""
    assert_same(engine("keep 0.5, 2 ranks"), engine("keep 0.5"))


def test_clip_budget_counts_and_same_as_transformers(engine, model_dir):
    """budget="clip": the video's 4 frames keep round(4 * 49 * 0.5) = 98 tokens between them (4 * 24 = 96 under
    the frame budget), then its newline; images are unchanged; the transformers adapter gives the same prompt,
    tokens and top-3 logprobs."""
    served = engine("keep 0.5, clip")
    frame = engine("keep 0.5")
    assert blocks(served[1]) == [kept_tokens(FRAMES * PATCHES, KEEP_RATIO) + 1] == [99]
    assert [blocks(r) for i, r in enumerate(served) if i != 1] == [blocks(r) for i, r in enumerate(frame) if i != 1]
    expected = run_transformers(model_dir, "LlavaOnevisionForConditionalGeneration", PARITY, keep_ratio=KEEP_RATIO,
                                max_tokens=6, logprobs=3, budget="clip")
    assert_same(served[: len(PARITY)], expected)
