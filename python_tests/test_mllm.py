"""End to end on tiny random LLaVA-1.5 and LLaVA-OneVision models with their processors (no downloads): the
patched processor emits exactly as many placeholders as the patched model produces features, `generate` works on
the user's unchanged code, and keep_ratio=1 gives the unpatched model's tokens exactly."""

import sys

import numpy
import pytest
import torch

import evoprune_ext

transformers = pytest.importorskip("transformers")
from evoprune_ext import random_models  # noqa: E402  (needs transformers)

PROMPT = "USER : <image> what is in this image ASSISTANT :"
NEW_TOKENS = 6


def image(height, width, seed=0):
    from PIL import Image

    pixels = numpy.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=numpy.uint8)
    return Image.fromarray(pixels)


def video(frames, seed=0):
    return numpy.random.default_rng(seed).integers(0, 256, (frames, 56, 56, 3), dtype=numpy.uint8)


def generate(model, processor, **inputs):
    batch = processor(**inputs, return_tensors="pt", padding=True)
    with torch.inference_mode():
        out = model.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False)
    return batch, out


def placeholders(batch, processor, kind="image"):
    token = processor.image_token_id if kind == "image" else processor.video_token_id
    return (batch["input_ids"] == token).sum(dim=1).tolist()


def needs_onevision_processor():
    """transformers builds LlavaOnevisionProcessor only where torchvision imports (its video processor)."""
    pytest.importorskip("torchvision", reason="LlavaOnevisionProcessor needs torchvision (make check-cuda has it)")


# ---------------------------------------------------------------------------------------------------------
# LLaVA-1.5


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_llava_keep_ratio_one_generates_the_unpatched_tokens(attention, dtype):
    model, processor = random_models.llava(attention=attention)
    model.to(dtype)
    inputs = dict(images=[image(80, 60), image(40, 90, seed=1)], text=[PROMPT, "USER : <image> describe ASSISTANT :"])
    expected_batch, expected = generate(model, processor, **inputs)
    evoprune_ext.patch(model, keep_ratio=1.0, processor=processor)
    batch, got = generate(model, processor, **inputs)
    assert torch.equal(batch["input_ids"], expected_batch["input_ids"])
    assert torch.equal(got, expected)


@pytest.mark.parametrize("keep_ratio", [0.5, 0.25, 0.1])
def test_llava_placeholders_match_the_pruned_features(keep_ratio):
    model, processor = random_models.llava()
    patches = (random_models.TINY_IMAGE // random_models.TINY_CLIP["patch_size"]) ** 2
    evoprune_ext.patch(model, keep_ratio=keep_ratio, processor=processor)
    batch, out = generate(model, processor, images=[image(80, 60)], text=[PROMPT])
    assert placeholders(batch, processor) == [round(patches * keep_ratio)]
    assert processor._get_num_multimodal_tokens(image_sizes=[[80, 60]]).num_image_tokens == [
        round(patches * keep_ratio)
    ]
    with torch.inference_mode():
        features = model.model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output
    assert [len(f) for f in features] == [round(patches * keep_ratio)]
    assert out.shape == (1, batch["input_ids"].shape[1] + NEW_TOKENS)


def test_llava_pruning_shortens_the_prefill():
    model, processor = random_models.llava()
    full, _ = generate(model, processor, images=[image(80, 60)], text=[PROMPT])
    evoprune_ext.patch(model, keep_ratio=0.25, processor=processor)
    pruned, _ = generate(model, processor, images=[image(80, 60)], text=[PROMPT])
    patches = (random_models.TINY_IMAGE // random_models.TINY_CLIP["patch_size"]) ** 2
    assert full["input_ids"].shape[1] - pruned["input_ids"].shape[1] == patches - round(patches * 0.25)


def test_llava_batch_with_several_images_per_prompt():
    model, processor = random_models.llava()
    evoprune_ext.patch(model, keep_ratio=0.5, processor=processor)
    texts = ["USER : <image> <image> count objects ASSISTANT :", PROMPT]
    images = [image(80, 60), image(60, 60, seed=1), image(30, 100, seed=2)]
    batch, out = generate(model, processor, images=images, text=texts)
    assert placeholders(batch, processor) == [2 * round(49 * 0.5), round(49 * 0.5)]
    assert out.shape[0] == 2


def test_unpatch_restores_model_and_processor():
    model, processor = random_models.llava()
    before, expected = generate(model, processor, images=[image(80, 60)], text=[PROMPT])
    classes = (type(processor), type(model.model.vision_tower.encoder))
    evoprune_ext.patch(model, keep_ratio=0.25, processor=processor)
    assert type(processor) is not classes[0]
    evoprune_ext.unpatch(model)
    assert (type(processor), type(model.model.vision_tower.encoder)) == classes
    after, got = generate(model, processor, images=[image(80, 60)], text=[PROMPT])
    assert torch.equal(after["input_ids"], before["input_ids"]) and torch.equal(got, expected)


def test_repatching_follows_the_new_keep_ratio():
    model, processor = random_models.llava()
    evoprune_ext.patch(model, keep_ratio=0.25, processor=processor)
    evoprune_ext.patch(model, keep_ratio=0.5, processor=processor)
    batch, _ = generate(model, processor, images=[image(80, 60)], text=[PROMPT])
    assert placeholders(batch, processor) == [round(49 * 0.5)]


def test_processor_of_another_family_is_rejected():
    model, _ = random_models.llava()
    with pytest.raises(TypeError, match="processor: LlavaForConditionalGeneration takes a LlavaProcessor"):
        evoprune_ext.patch(model, keep_ratio=0.5, processor=random_models.tokenizer())
    tower = model.model.vision_tower
    with pytest.raises(TypeError, match="processor: CLIPVisionModel takes no processor"):
        evoprune_ext.patch(tower, keep_ratio=0.5, processor=random_models.llava()[1])


def test_pruning_after_the_feature_layer_is_rejected():
    model, processor = random_models.llava()  # 4 layers, features from hidden_states[-2] = layer 2's output
    with pytest.raises(ValueError, match=r"layers: .*vision_feature_layer=-2 .* must be <= 2; got \[1, 3\]"):
        evoprune_ext.patch(model, keep_ratio=0.5, processor=processor, layers=[1, 3])
    assert not hasattr(model, "evoprune_state")


# ---------------------------------------------------------------------------------------------------------
# LLaVA-OneVision: the model side (no processor needed)

TOKENS_PER_CROP = 49  # 56 / 8 = 7 x 7 patches


def onevision_features(model, image_sizes, crops):
    pixels = torch.randn(len(image_sizes), crops, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        return model.model.get_image_features(pixels, torch.tensor(image_sizes)).pooler_output


@pytest.mark.parametrize("keep_ratio", [0.5, 0.25])
def test_onevision_packs_pruned_crops_by_rows_of_the_grid(keep_ratio):
    model, _ = random_models.llava_onevision()
    frames = torch.randn(2, 3, 3, 56, 56)
    with torch.inference_mode():
        pooled = model.model.get_video_features(frames).pooler_output.shape[1]  # 3 x 16 (+ the newline, by version)
    evoprune_ext.patch(model, keep_ratio=keep_ratio)
    k = round(TOKENS_PER_CROP * keep_ratio)
    # 80 x 60 picks the 2 x 2 grid (112 x 112), 50 x 130 the 1 x 2 grid (56 x 112).
    features = onevision_features(model, [[80, 60], [50, 130]], crops=5)
    assert [len(f) for f in features] == [k * 5 + 2, k * 3 + 1]
    newline = model.model.image_newline
    assert torch.equal(features[0][k + 2 * k], newline) and torch.equal(features[0][-1], newline)
    with torch.inference_mode():
        videos = model.model.get_video_features(frames).pooler_output
    assert videos.shape[:2] == (2, pooled - 3 * 16 + 3 * k)  # each frame's 16 pooled tokens become k kept ones


@pytest.mark.parametrize("keep_ratio", [0.25, 0.1])
def test_onevision_clip_budget_keeps_one_count_per_video(keep_ratio):
    model, _ = random_models.llava_onevision()
    frames = torch.randn(2, 3, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    frames[1] = frames[1, :1]  # a static video: its three frames are the same
    evoprune_ext.patch(model, keep_ratio=keep_ratio, budget="clip", layers=[1])  # one step: no twin differs
    with torch.inference_mode():
        videos = model.model.get_video_features(frames).pooler_output
    kept = round(3 * TOKENS_PER_CROP * keep_ratio)
    assert videos.shape[:2] == (2, kept + 1)
    assert torch.equal(videos[:, -1], model.model.image_newline.expand(2, -1))
    state = model.model.vision_tower.evoprune_state
    frame = state.index // TOKENS_PER_CROP
    assert state.index.shape == (2, kept) and (state.index.diff() > 0).all()
    # The static video spends nothing on the repeats: it keeps first-frame tokens only (ties go to the smallest
    # index), and each of them absorbs its copies in the other frames.
    assert (frame[1] == 0).all() and state.sizes[1].sum() == 3 * TOKENS_PER_CROP and (state.sizes[1] >= 3).all()
    assert frame[0].unique().tolist() == [0, 1, 2]  # the random video keeps tokens of every frame
    with torch.inference_mode():  # outside `clips` (images) the tower prunes every input on its own
        alone = model.model.vision_tower(frames[0]).last_hidden_state
    assert alone.shape[:2] == (3, round(TOKENS_PER_CROP * keep_ratio))


# ---------------------------------------------------------------------------------------------------------
# LLaVA-OneVision end to end (images with anyres, several images per prompt, video)

ONEVISION_INPUTS = {
    "anyres images": dict(images=[image(80, 60), image(50, 130, seed=1)], text=[PROMPT, PROMPT.replace("what", "how")]),
    "several images": dict(
        images=[[image(80, 60), image(40, 40, seed=1)]], text=["USER : <image> <image> left right ASSISTANT :"]
    ),
    "video": dict(videos=[video(4)], text=["USER : <video> describe the scene ASSISTANT :"]),
    "two videos": dict(
        videos=[video(4), video(4, seed=1)],  # transformers stacks videos: equal frame counts
        text=["USER : <video> describe ASSISTANT :", "USER : <video> how many objects ASSISTANT :"],
    ),
}


@pytest.mark.parametrize("kind", list(ONEVISION_INPUTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_onevision_keep_ratio_one_generates_the_unpatched_tokens(kind, dtype):
    needs_onevision_processor()
    model, processor = random_models.llava_onevision()
    model.to(dtype)
    expected_batch, expected = generate(model, processor, **ONEVISION_INPUTS[kind])
    evoprune_ext.patch(model, keep_ratio=1.0, processor=processor)
    batch, got = generate(model, processor, **ONEVISION_INPUTS[kind])
    assert torch.equal(batch["input_ids"], expected_batch["input_ids"])
    assert torch.equal(got, expected)


@pytest.mark.parametrize("kind,budget", [(kind, "frame") for kind in ONEVISION_INPUTS]
                         + [("video", "clip"), ("two videos", "clip"), ("anyres images", "clip")])
@pytest.mark.parametrize("keep_ratio", [0.5, 0.25])
def test_onevision_placeholders_match_the_pruned_features(kind, budget, keep_ratio):
    needs_onevision_processor()
    model, processor = random_models.llava_onevision()
    full, _ = generate(model, processor, **ONEVISION_INPUTS[kind])
    evoprune_ext.patch(model, keep_ratio=keep_ratio, processor=processor, budget=budget)
    batch, out = generate(model, processor, **ONEVISION_INPUTS[kind])  # fails if counts and features differ
    if "video" not in kind:  # unpatched frames are pooled 49 -> 16 tokens: fewer than round(49 * 0.5)
        assert batch["input_ids"].shape[1] < full["input_ids"].shape[1]
    k = round(TOKENS_PER_CROP * keep_ratio)
    if "video" in kind:
        frames = [len(v) for v in ONEVISION_INPUTS[kind]["videos"]]
        expected = [(round(f * TOKENS_PER_CROP * keep_ratio) if budget == "clip" else f * k) + 1 for f in frames]
        assert placeholders(batch, processor, "video") == expected
        counted = processor._get_num_multimodal_tokens(video_sizes=[[f, 56, 56] for f in frames])
        assert counted.num_video_tokens == expected
    elif kind == "anyres images":
        assert placeholders(batch, processor) == [k * 5 + 2, k * 3 + 1]
        counted = processor._get_num_multimodal_tokens(image_sizes=[[80, 60], [50, 130]])
        assert counted.num_image_tokens == [k * 5 + 2, k * 3 + 1]
    else:
        assert placeholders(batch, processor) == [2 * (k + 1)]
    assert out.shape[1] == batch["input_ids"].shape[1] + NEW_TOKENS


def test_onevision_unpatch_restores_the_processor():
    needs_onevision_processor()
    model, processor = random_models.llava_onevision()
    before, _ = generate(model, processor, **ONEVISION_INPUTS["video"])
    evoprune_ext.patch(model, keep_ratio=0.25, processor=processor)
    evoprune_ext.unpatch(model)
    after, _ = generate(model, processor, **ONEVISION_INPUTS["video"])
    assert torch.equal(after["input_ids"], before["input_ids"])


@pytest.mark.parametrize("version", ["4.57.1", "5.16.0", "6.0.0"])
def test_transformers_outside_the_supported_range_is_named(monkeypatch, version):
    model, processor = random_models.llava()
    # The module as imported now: transformers' lazy loading may have replaced the one this file imported.
    monkeypatch.setattr(sys.modules["transformers"], "__version__", version)
    with pytest.raises(ImportError, match=rf"supports transformers>=5.17,<6 \(tested 5.17 to 5.24\), found {version}"):
        evoprune_ext.patch(model, keep_ratio=0.5, processor=processor)
