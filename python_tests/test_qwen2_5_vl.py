"""EvoPrune inside a tiny random Qwen2.5-VL vision tower built locally: several images and a video in one call."""

import pytest
import torch

pytest.importorskip("transformers")
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig  # noqa: E402
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (  # noqa: E402
    Qwen2_5_VisionTransformerPretrainedModel,
)

from evoprune_ext import patch, unpatch  # noqa: E402
from evoprune_ext.towers.packed import WindowUnits  # noqa: E402

# Two images of different sizes and a 3-frame video (grid in patches: t, h, w); windows of 2x2 units.
GRID = torch.tensor([[1, 8, 12], [1, 6, 6], [3, 4, 10]])
UNITS = [24, 9, 30]  # t * h/2 * w/2
FRAME_UNITS = [24, 9, 10, 10, 10]


def make_tower(attn="sdpa", dtype=torch.float32, depth=6):
    torch.manual_seed(0)
    config = Qwen2_5_VLVisionConfig(depth=depth, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=2,
                                    temporal_patch_size=2, window_size=8, out_hidden_size=24,
                                    fullatt_block_indexes=[2, depth - 1])
    config._attn_implementation = attn
    tower = Qwen2_5_VisionTransformerPretrainedModel(config).eval().to(dtype)
    pixels = torch.randn(int(GRID.prod(-1).sum()), 3 * 2 * 2 * 2, generator=torch.Generator().manual_seed(1))
    return tower, pixels.to(dtype)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_keep_ratio_one_reproduces_the_tower(attn, dtype):
    tower, pixels = make_tower(attn, dtype)
    with torch.no_grad():
        want = tower(pixels, grid_thw=GRID)
        patch(tower, keep_ratio=1.0)
        got = tower(pixels, grid_thw=GRID)
    assert torch.equal(got.pooler_output, want.pooler_output)
    assert torch.equal(got.last_hidden_state, want.last_hidden_state)
    assert [k.tolist() for k in tower.evoprune_state.kept] == [list(range(n)) for n in UNITS]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("keep_ratio", [0.5, 0.25])
def test_every_frame_keeps_its_static_count(attn, dtype, keep_ratio):
    tower, pixels = make_tower(attn, dtype)
    patch(tower, keep_ratio=keep_ratio)
    with torch.no_grad():
        out = tower(pixels, grid_thw=GRID)
    frame_keeps = [round(n * keep_ratio) for n in FRAME_UNITS]
    per_entry = [frame_keeps[0], frame_keeps[1], sum(frame_keeps[2:])]
    kept = tower.evoprune_state.kept
    assert [len(k) for k in kept] == per_entry
    assert out.pooler_output.shape == (sum(per_entry), 24)
    assert out.last_hidden_state.shape == (4 * sum(per_entry), 32)
    assert out.pooler_output.isfinite().all()
    for ids, units in zip(kept, UNITS):
        assert ids.dtype == torch.int64 and (ids[1:] > ids[:-1]).all() and 0 <= ids.min() and ids.max() < units
    video = kept[2]  # every frame of the video keeps its own count
    assert [int(((video >= 10 * f) & (video < 10 * f + 10)).sum()) for f in range(3)] == frame_keeps[2:]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("keep_ratio", [1.0, 0.5, 0.25, 0.1])
def test_clip_budget_keeps_one_count_per_video(attn, keep_ratio):
    tower, pixels = make_tower(attn)
    with torch.no_grad():
        want = tower(pixels, grid_thw=GRID).pooler_output
        patch(tower, keep_ratio=keep_ratio, budget="clip")
        out = tower(pixels, grid_thw=GRID)
    kept = tower.evoprune_state.kept
    assert [len(k) for k in kept] == [round(n * keep_ratio) for n in UNITS]  # the video's 3 frames: one pool
    assert out.pooler_output.shape == (sum(len(k) for k in kept), 24) and out.pooler_output.isfinite().all()
    if keep_ratio == 1:
        assert torch.equal(out.pooler_output, want)


def test_clip_budget_spends_nothing_on_a_static_videos_repeats():
    """Frames that repeat the first are exact ties (Qwen2.5-VL has no absolute positions): the clip keeps units of
    the first frame only, and the frames left empty drop out of the later blocks' attention segments."""
    grid = torch.tensor([[3, 4, 10]])
    tower, _ = make_tower()
    frame = torch.randn(40, 24, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        patch(tower, keep_ratio=0.25, layers=[1], budget="clip")  # one step: 8 of 30 units, all in frame 0
        out = tower(frame.repeat(3, 1), grid_thw=grid).pooler_output
    (kept,) = tower.evoprune_state.kept
    assert len(kept) == 8 and (kept < 10).all() and out.isfinite().all()


def test_pruned_rows_follow_the_kept_units():
    # Blocks that add nothing, and every frame made of twin units (unit j equals unit j + n/2): keeping half with
    # pure diversity (alpha 0) keeps one unit of each pair and merges its twin into it, which changes no value.
    # So each output row must be exactly the unpatched tower's row of the unit it is recorded as: the kept ids,
    # the window-order bookkeeping and the final reordering must agree.
    grid, frame_units, first_unit = torch.tensor([[1, 8, 12], [2, 4, 4]]), [24, 4, 4], [0, 24]
    tower, _ = make_tower(dtype=torch.float64)
    for block in tower.blocks:
        for layer in (block.attn.proj, block.mlp.down_proj):
            torch.nn.init.zeros_(layer.weight), torch.nn.init.zeros_(layer.bias)
    g = torch.Generator().manual_seed(2)
    pixels = torch.cat([torch.randn(n // 2, 4, 24, generator=g, dtype=torch.float64).repeat(2, 1, 1).view(-1, 24)
                        for n in frame_units])
    with torch.no_grad():
        want = tower(pixels, grid_thw=grid).pooler_output
        patch(tower, keep_ratio=0.5, layers=[0], alpha=0.0)
        got = tower(pixels, grid_thw=grid).pooler_output
    kept = tower.evoprune_state.kept
    assert [len(k) for k in kept] == [12, 4]
    rows = torch.cat([ids + first for ids, first in zip(kept, first_unit)])
    assert torch.equal(got, want[rows])
    assert not torch.equal(want[rows], want[:16])  # the test would see a wrong order


def test_units_bookkeeping_drops_empty_windows():
    cos = torch.arange(32.0).view(16, 2)  # rotary rows of 4 units of 4 tokens
    units = WindowUnits(ids=torch.tensor([5, 2, 0, 1]), window=torch.tensor([0, 0, 1, 2]), frames=[4], pools=[4],
                   sizes=torch.ones(4), position_embeddings=(cos, -cos))
    kept = units.select(torch.tensor([1, 3]), torch.tensor([3.0, 1.0]), [2])
    assert kept.ids.tolist() == [2, 1] and kept.window.tolist() == [0, 2]
    assert kept.cu_seqlens().tolist() == [0, 8] and kept.cu_window_seqlens().tolist() == [0, 4, 8]
    assert torch.equal(kept.position_embeddings[0], cos[[4, 5, 6, 7, 12, 13, 14, 15]])
    assert torch.equal(kept.position_embeddings[1], -cos[[4, 5, 6, 7, 12, 13, 14, 15]])
    assert kept.sizes.tolist() == [3.0, 1.0]


def test_patch_arguments_and_unpatch():
    tower, pixels = make_tower()
    with torch.no_grad():
        want = tower(pixels, grid_thw=GRID).pooler_output
    with pytest.raises(ValueError, match=r"keep_ratio must be in \(0, 1\], got 0"):
        patch(tower, keep_ratio=0)
    with pytest.raises(ValueError, match=r"layers must name at least one layer, each in \[0, 6\), got \[6\]"):
        patch(tower, keep_ratio=0.5, layers=[6])
    with pytest.raises(ValueError, match=r"layers must name at least one layer, each in \[0, 6\), got \[\]"):
        patch(tower, keep_ratio=0.5, layers=[])
    with pytest.raises(TypeError, match="supports .*Qwen2_5_VisionTransformerPretrainedModel.*; got Linear"):
        patch(torch.nn.Linear(2, 2), keep_ratio=0.5)
    patch(tower, keep_ratio=0.02)
    assert tower.evoprune_state.layers == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="keep_ratio=0.02 keeps no unit of a frame of 9 units"):
        tower(pixels, grid_thw=GRID)
    unpatch(tower)
    assert not hasattr(tower, "evoprune_state")
    with torch.no_grad():
        assert torch.equal(tower(pixels, grid_thw=GRID).pooler_output, want)
