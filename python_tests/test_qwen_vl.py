"""Qwen2.5-VL and Qwen3-VL end to end on tiny random models (no downloads): the patched processor emits one
placeholder per kept merge unit, each kept unit keeps its original M-RoPE position, Qwen3-VL's deepstack features
line up with the placeholders, and keep_ratio=1 gives the unpatched tokens."""

import numpy
import pytest
import torch

import evoprune_ext
from evoprune_ext.schedule import frame_split

pytest.importorskip("transformers")
from evoprune_ext import random_models  # noqa: E402

NEW_TOKENS = 4
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"


def image(height, width, seed=0):
    from PIL import Image

    return Image.fromarray(numpy.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=numpy.uint8))


def video(frames, seed=0):
    return numpy.random.default_rng(seed).integers(0, 256, (frames, 32, 32, 3), dtype=numpy.uint8)


# Grids in patches (t, h, w) that the tiny processor makes of these inputs, and their units per frame.
REQUESTS = {
    "images": dict(images=[image(40, 56), image(24, 24, seed=1)],
                   text=[f"USER : {IMAGE} what is in this image ASSISTANT :", f"USER : {IMAGE} describe ASSISTANT :"]),
    "video": dict(videos=[video(4)], text=[f"USER : {VIDEO} describe the scene ASSISTANT :"]),
    "images and video in one prompt": dict(
        images=[image(40, 56), image(24, 32, seed=1)], videos=[video(4, seed=2)],
        text=[f"USER : {IMAGE} {VIDEO} left {IMAGE} right ASSISTANT :"],
    ),
}
# Qwen3-VL's processor writes a video frame by frame (a timestamp, then the frame between vision start / end),
# and positions each frame as a block of its own: the same requests test that layout.
FAMILIES = dict(qwen2_5_vl=random_models.qwen2_5_vl, qwen3_vl=random_models.qwen3_vl)
family = pytest.mark.parametrize("build", FAMILIES.values(), ids=FAMILIES.keys())


def model_and_processor(build, **kwargs):
    model, processor = build(**kwargs)
    if processor is None:
        pytest.skip("the Qwen-VL processors need torchvision (make check-cuda has it)")
    return model, processor


def generate(model, processor, request, positions=None, seen=None):
    """Greedy generation; `positions` and `seen` (if given) record the position ids and all keyword arguments of
    the language model's first pass (the prompt)."""
    batch = processor(**request, return_tensors="pt", padding=True)

    def record(module, args, kwargs):
        if positions is not None and not positions:
            positions.append(kwargs["position_ids"])
        if seen is not None and not seen:
            seen.update(kwargs)

    hook = model.model.language_model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        with torch.inference_mode():
            out = model.generate(**batch, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    finally:
        hook.remove()
    return batch, out


def units(grid):
    t, h, w = grid
    return t, (h // 2) * (w // 2)


@family
@pytest.mark.parametrize("kind", list(REQUESTS))
@pytest.mark.parametrize("attention,dtype", [("sdpa", torch.float32), ("eager", torch.float32),
                                             ("sdpa", torch.bfloat16)])
def test_keep_ratio_one_generates_the_unpatched_tokens(build, kind, attention, dtype):
    model, processor = model_and_processor(build, attention=attention)
    model.to(dtype)
    expected_batch, expected = generate(model, processor, REQUESTS[kind])
    evoprune_ext.patch(model, keep_ratio=1.0, processor=processor)
    batch, got = generate(model, processor, REQUESTS[kind])
    assert torch.equal(batch["input_ids"], expected_batch["input_ids"])
    assert torch.equal(got, expected)


@family
def test_clip_budget_at_keep_ratio_one_generates_the_unpatched_tokens(build):
    model, processor = model_and_processor(build)
    request = REQUESTS["images and video in one prompt"]
    expected_batch, expected = generate(model, processor, request)
    evoprune_ext.patch(model, keep_ratio=1.0, processor=processor, budget="clip")
    batch, got = generate(model, processor, request)
    assert torch.equal(batch["input_ids"], expected_batch["input_ids"])
    assert torch.equal(got, expected)


BUDGETS = [(build, budget) for build in FAMILIES.values() for budget in ("frame", "clip")]


@pytest.mark.parametrize("build,budget", BUDGETS,
                         ids=[f"{build.__name__}-{budget}" for build, budget in BUDGETS])
@pytest.mark.parametrize("kind", list(REQUESTS))
@pytest.mark.parametrize("keep_ratio", [0.5, 0.25, 0.125])
def test_placeholders_positions_and_kept_units(build, budget, kind, keep_ratio):
    check_placeholders_positions_and_kept_units(build, budget, REQUESTS[kind], keep_ratio)


def test_qwen3_clip_budget_frame_left_empty():
    """One unit kept of a video of two frames: one frame's block is empty before the tower (the even split) and
    after it (the frame it did not keep), and the text after it keeps its position all the same."""
    kept = check_placeholders_positions_and_kept_units(random_models.qwen3_vl, "clip", REQUESTS["video"], 1 / 128)
    assert len(kept[0]) == 1


def check_placeholders_positions_and_kept_units(build, budget, request, keep_ratio):
    """Patched at `keep_ratio` under `budget`, `request` generates from the pruned prompt; returns the kept units."""
    model, processor = model_and_processor(build)
    full_positions, pruned_positions, seen = [], [], {}
    full, _ = generate(model, processor, request, full_positions)
    evoprune_ext.patch(model, keep_ratio=keep_ratio, processor=processor, budget=budget)
    batch, out = generate(model, processor, request, pruned_positions, seen)
    assert out.shape[1] == batch["input_ids"].shape[1] + NEW_TOKENS
    assert batch["input_ids"].shape[1] < full["input_ids"].shape[1]

    grids = [*batch.get("image_grid_thw", []), *batch.get("video_grid_thw", [])]
    kept = model.evoprune_state.kept  # images, then videos, each in input order
    n_images = len(batch.get("image_grid_thw", []))
    assert len(kept) == len(grids)
    for item, (ids, grid) in enumerate(zip(kept, grids)):
        frames, per_frame = units(grid.tolist())
        assert len(ids) == (round(frames * per_frame * keep_ratio) if budget == "clip" and item >= n_images
                            else frames * round(per_frame * keep_ratio))
        assert (ids[1:] > ids[:-1]).all() and 0 <= ids.min() and ids.max() < frames * per_frame

    # Placeholders: exactly the kept counts, as the count helper says from the sizes alone.
    image_ids, video_ids = processor.image_token_id, processor.video_token_id
    counts = [len(ids) for ids in kept]
    assert int((batch["input_ids"] == image_ids).sum()) == sum(counts[:n_images])
    assert int((batch["input_ids"] == video_ids).sum()) == sum(counts[n_images:])
    helper = processor._get_num_multimodal_tokens(
        image_sizes=[[im.height, im.width] for im in request.get("images", [])] or None,
        video_sizes=[[len(v), *v.shape[1:3]] for v in request.get("videos", [])] or None,
    )
    assert (helper.num_image_tokens or []) + (helper.num_video_tokens or []) == counts

    # The prompt the language model reads is the unpruned one without the placeholders of the dropped units:
    # the processor's when each frame's count is static; Qwen3-VL under the clip budget moves its stand-in counts
    # (the even split per frame) to the frames the tower kept units in.
    order = _items_in_order(batch, kept, n_images)
    read = _prompt_read(full, kept, grids, order, (image_ids, video_ids))
    moves = build is random_models.qwen3_vl and budget == "clip" and "videos" in request
    embed = model.get_input_embeddings()
    for row, ids in enumerate(read):
        real = batch["attention_mask"][row].bool()
        if not moves:
            assert torch.equal(batch["input_ids"][row][real], ids)
        assert len(ids) == int(real.sum())
        text = (ids != image_ids) & (ids != video_ids)
        with torch.inference_mode():
            assert torch.equal(seen["inputs_embeds"][row][real][text], embed(ids)[text])
    if moves:
        _assert_even_split(batch, grids[n_images:], [len(ids) for ids in kept[n_images:]], processor)

    # M-RoPE: each kept unit sits at its position in the full grid; the text keeps its positions.
    lm_visual = torch.zeros_like(batch["attention_mask"], dtype=torch.bool)
    for row, ids in enumerate(read):
        lm_visual[row, batch["attention_mask"][row].bool()] = (ids == image_ids) | (ids == video_ids)
        full_ids = full["input_ids"][row]
        full_rows, pruned_rows = full_positions[0][-3:, row], pruned_positions[0][-3:, row]
        was_visual = (full_ids == image_ids) | (full_ids == video_ids)
        real = full["attention_mask"][row].bool()
        assert torch.equal(pruned_rows[:, ~lm_visual[row] & batch["attention_mask"][row].bool()],
                           full_rows[:, ~was_visual & real])
    # Visual positions, row after row in token order: the full grid's at the kept units.
    pruned_visual = pruned_positions[0][-3:][:, lm_visual]
    full_visual = full_positions[0][-3:][:, (full["input_ids"] == image_ids) | (full["input_ids"] == video_ids)]
    gathered, offset = [], 0
    for k in order:
        gathered.append(full_visual[:, offset + kept[k]])
        offset += int(grids[k].prod()) // 4
    assert torch.equal(pruned_visual, torch.cat(gathered, dim=1))
    return kept


def _items_in_order(batch, kept, n_images):
    """The index into `kept` of each image and video, in token order row after row: an item's placeholders are
    the next len(kept[item]) visual tokens, whether in one block or (Qwen3-VL video) one block per frame."""
    types = batch["mm_token_type_ids"][batch["mm_token_type_ids"] > 0].tolist()
    following, order, at = {1: 0, 2: n_images}, [], 0
    while at < len(types):
        order.append(following[types[at]])
        following[types[at]] += 1
        at += len(kept[order[-1]])
    return order


def _prompt_read(full, kept, grids, order, visual_ids):
    """Each row of the unpruned prompt `full` (its real tokens) without the placeholders of the units the tower
    dropped: every item holds its units there in raster order, items in token order (`order`)."""
    visual = torch.isin(full["input_ids"], torch.tensor(visual_ids))
    keep = torch.zeros(int(visual.sum()), dtype=torch.bool)
    offset = 0
    for k in order:
        keep[offset + kept[k]] = True
        offset += int(grids[k].prod()) // 4
    dropped = torch.zeros_like(visual)
    dropped[visual] = ~keep
    return [ids[real & ~drop] for ids, real, drop in zip(full["input_ids"], full["attention_mask"].bool(), dropped)]


def _assert_even_split(batch, grids, totals, processor):
    """Qwen3-VL under the clip budget: the processor wrote every frame's block with the even split of its video's
    kept total (schedule.frame_split), before the tower chose."""
    ids = batch["input_ids"][batch["attention_mask"].bool()].tolist()
    starts = [i for i, token in enumerate(ids) if token == processor.vision_start_token_id
              and ids[i + 1] in (processor.video_token_id, processor.vision_end_token_id)]
    written = [ids[start + 1 : ids.index(processor.vision_end_token_id, start)].count(processor.video_token_id)
               for start in starts]
    expected = [count for grid, total in zip(grids, totals) for count in frame_split(total, int(grid[0]))]
    assert written == expected


@pytest.mark.parametrize("budget", ["frame", "clip"])
@pytest.mark.parametrize("kind", list(REQUESTS))
def test_qwen3_deepstack_features_line_up_with_the_placeholders(kind, budget):
    """The language model adds each deepstack feature at the visual positions: it gets one row per placeholder,
    the tower's pruned deepstack rows of each image and video in placeholder order. (Under the clip budget the
    model moves video placeholders between frames: test_placeholders_positions_and_kept_units checks where.)"""
    model, processor = model_and_processor(random_models.qwen3_vl)
    evoprune_ext.patch(model, keep_ratio=0.5, processor=processor, budget=budget)
    batch = processor(**REQUESTS[kind], return_tensors="pt", padding=True)
    seen = {}
    hook = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.update(kwargs), with_kwargs=True
    )
    with torch.inference_mode():
        model(**batch)
        inputs = {"image": "pixel_values", "video": "pixel_values_videos"}
        towers = {modality: model.model.visual(batch[pixels], grid_thw=batch[f"{modality}_grid_thw"])
                  for modality, pixels in inputs.items() if pixels in batch}
    hook.remove()
    ids = batch["input_ids"]
    visual = (ids == processor.image_token_id) | (ids == processor.video_token_id)
    if budget == "frame" or "videos" not in REQUESTS[kind]:
        assert torch.equal(seen["visual_pos_masks"], visual)
    assert int(seen["visual_pos_masks"].sum()) == int(visual.sum())
    is_image = ids[visual] == processor.image_token_id
    embeds = seen["deepstack_visual_embeds"]
    assert len(embeds) == len(model.config.vision_config.deepstack_visual_indexes)
    for layer, rows in enumerate(embeds):
        assert rows.shape[0] == int(visual.sum())
        for modality, tower in towers.items():
            assert torch.equal(rows[is_image if modality == "image" else ~is_image], tower.deepstack_features[layer])


@family
def test_unpatch_restores_processor_and_model(build):
    model, processor = model_and_processor(build)
    request = REQUESTS["images and video in one prompt"]
    before, expected = generate(model, processor, request)
    evoprune_ext.patch(model, keep_ratio=0.25, processor=processor)
    generate(model, processor, request)
    evoprune_ext.unpatch(model)
    after, got = generate(model, processor, request)
    assert torch.equal(after["input_ids"], before["input_ids"]) and torch.equal(got, expected)
    assert type(model.model) is type(build()[0].model) and "forward" not in vars(model.model.visual)


@family
def test_without_processor_hand_made_prompt(build):
    """The model side alone (runs without torchvision): a prompt built with the pruned counts generates, and
    the vision positions are the full grid's at the kept units."""
    model, _ = build()
    grid = torch.tensor([[1, 8, 12], [1, 6, 6]])
    pixels = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * 2 * 2, generator=torch.Generator().manual_seed(0))
    tokens = random_models.tokenizer()
    image_pad, start, end = (tokens.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|vision_start|>",
                                                                       "<|vision_end|>"))

    def prompt(counts):
        ids = [start, *[image_pad] * counts[0], end, start, *[image_pad] * counts[1], end, 30, 31]
        ids = torch.tensor([ids])
        return dict(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=(ids == image_pad).int(),
                    pixel_values=pixels, image_grid_thw=grid)

    with torch.inference_mode():
        full = model.model.get_rope_index(**{k: v for k, v in prompt([24, 9]).items() if "pixel" not in k})[0]
    evoprune_ext.patch(model, keep_ratio=0.5)
    positions = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: positions.append(kwargs["position_ids"]) if not positions else None,
        with_kwargs=True,
    )
    inputs = prompt([12, round(9 * 0.5)])
    with torch.inference_mode():
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    hook.remove()
    kept = model.evoprune_state.kept
    visual = inputs["input_ids"][0] == image_pad
    full_visual = full[:, 0, torch.tensor([1 + i for i in range(24)] + [27 + i for i in range(9)])]
    expected = torch.cat([full_visual[:, kept[0]], full_visual[:, 24 + kept[1]]], dim=1)
    assert torch.equal(positions[0][-3:, 0][:, visual], expected)
    assert torch.equal(positions[0][-3:, 0][:, -2:], full[:, 0, -2:])  # the text after continues as unpruned


def test_qwen3_clip_budget_prompt_must_come_from_the_patched_processor():
    """Under the clip budget the model moves Qwen3-VL's video placeholders between frames: a prompt whose videos
    hold other counts, or other frame blocks, than the patched processor writes is refused, saying why."""
    model, processor = model_and_processor(random_models.qwen3_vl)
    unpruned = processor(**REQUESTS["video"], return_tensors="pt")
    evoprune_ext.patch(model, keep_ratio=0.5, processor=processor, budget="clip")
    with torch.inference_mode(), pytest.raises(ValueError, match=r"input_ids: a row's videos hold 128 placeholders, "
                                               r"but the tower kept 64 units of them; was the processor patched"):
        model(**unpruned)
    batch = processor(**REQUESTS["video"], return_tensors="pt")
    ids = batch["input_ids"][0].tolist()
    first = ids.index(processor.vision_start_token_id)
    last = len(ids) - ids[::-1].index(processor.vision_start_token_id) - 1  # the second frame's block
    keep = [i for i in range(len(ids)) if not last <= i <= ids.index(processor.vision_end_token_id, last)]
    assert first < last
    cut = {name: value[:, keep] if name in ("input_ids", "attention_mask", "mm_token_type_ids") else value
           for name, value in batch.items()}
    with torch.inference_mode(), pytest.raises(ValueError, match=r"input_ids: 1 video frame blocks .*, but "
                                               r"video_grid_thw has 2 frames"):
        model(**cut)


@family
def test_unknown_budget_is_refused(build):
    model, _ = build()
    with pytest.raises(ValueError, match=r"budget must be one of \('frame', 'clip'\), got 'video'"):
        evoprune_ext.patch(model, keep_ratio=0.5, budget="video")
