"""EvoPrune inside a tiny random Qwen3-VL vision tower built locally: several images and a video in one call,
with deepstack mergers before, at and after the pruning layers."""

import pytest
import torch

pytest.importorskip("transformers")
from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLVisionConfig  # noqa: E402
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel  # noqa: E402

from evoprune_ext import patch, unpatch  # noqa: E402

# Two images of different sizes and a 3-frame video (grid in patches: t, h, w).
GRID = torch.tensor([[1, 8, 12], [1, 6, 6], [3, 4, 10]])
UNITS = [24, 9, 30]  # t * h/2 * w/2
FRAME_UNITS = [24, 9, 10, 10, 10]
# The default schedule of 6 layers prunes at 1, 2, 3, 4: deepstack layer 0 comes before every step, 2 between
# steps (it is one), 5 after the last.
DEEPSTACK = [0, 2, 5]


def make_tower(attn="sdpa", dtype=torch.float32):
    torch.manual_seed(0)
    config = Qwen3VLVisionConfig(depth=6, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=2,
                                 temporal_patch_size=2, out_hidden_size=24, num_position_embeddings=16,
                                 deepstack_visual_indexes=DEEPSTACK)
    config._attn_implementation = attn
    tower = Qwen3VLVisionModel(config).eval().to(dtype)
    pixels = torch.randn(int(GRID.prod(-1).sum()), 3 * 2 * 2 * 2, generator=torch.Generator().manual_seed(1))
    return tower, pixels.to(dtype)


def assert_same_output(got, want):
    assert torch.equal(got.pooler_output, want.pooler_output)
    assert torch.equal(got.last_hidden_state, want.last_hidden_state)
    assert len(got.deepstack_features) == len(want.deepstack_features) == len(DEEPSTACK)
    for got_feature, want_feature in zip(got.deepstack_features, want.deepstack_features):
        assert torch.equal(got_feature, want_feature)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_keep_ratio_one_reproduces_the_tower(attn, dtype):
    tower, pixels = make_tower(attn, dtype)
    with torch.no_grad():
        want = tower(pixels, grid_thw=GRID)
        patch(tower, keep_ratio=1.0)
        got = tower(pixels, grid_thw=GRID)
    assert_same_output(got, want)
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
    assert [feature.shape for feature in out.deepstack_features] == [out.pooler_output.shape] * len(DEEPSTACK)
    assert out.pooler_output.isfinite().all()
    for ids, units in zip(kept, UNITS):
        assert ids.dtype == torch.int64 and (ids[1:] > ids[:-1]).all() and 0 <= ids.min() and ids.max() < units
    video = kept[2]  # every frame of the video keeps its own count
    assert [int(((video >= 10 * f) & (video < 10 * f + 10)).sum()) for f in range(3)] == frame_keeps[2:]


def test_pruned_rows_follow_the_kept_units():
    # Blocks that add nothing, no learned positions, and every frame made of twin units (unit j equals unit
    # j + n/2): keeping half with pure diversity (alpha 0) keeps one unit of each pair and merges its twin into it,
    # which changes no value. So each row of the output and of every deepstack feature (layer 0 before the step at
    # layer 1, carried through it; layers 2 and 5 after it) must be exactly the unpatched tower's row of the unit
    # it is recorded as.
    grid, frame_units, first_unit = torch.tensor([[1, 8, 12], [2, 4, 4]]), [24, 4, 4], [0, 24]
    tower, _ = make_tower(dtype=torch.float64)
    torch.nn.init.zeros_(tower.pos_embed.weight)
    for block in tower.blocks:
        for layer in (block.attn.proj, block.mlp.linear_fc2):
            torch.nn.init.zeros_(layer.weight), torch.nn.init.zeros_(layer.bias)
    g = torch.Generator().manual_seed(2)
    pixels = torch.cat([torch.randn(n // 2, 4, 24, generator=g, dtype=torch.float64).repeat(2, 1, 1).view(-1, 24)
                        for n in frame_units])
    with torch.no_grad():
        want = tower(pixels, grid_thw=grid)
        patch(tower, keep_ratio=0.5, layers=[1], alpha=0.0)
        got = tower(pixels, grid_thw=grid)
    kept = tower.evoprune_state.kept
    assert [len(k) for k in kept] == [12, 4]
    rows = torch.cat([ids + first for ids, first in zip(kept, first_unit)])
    assert torch.equal(got.pooler_output, want.pooler_output[rows])
    for got_feature, want_feature in zip(got.deepstack_features, want.deepstack_features, strict=True):
        assert torch.equal(got_feature, want_feature[rows])
    assert not torch.equal(want.pooler_output[rows], want.pooler_output[:16])  # the test would see a wrong order


def test_deepstack_features_carry_the_same_merges():
    # Blocks that add nothing: the hidden states after every layer are the embeddings, pruned and merged by the
    # steps so far. So if a deepstack layer's hidden states go through exactly the later steps' selection and merge
    # (two steps for layer 0, one for layer 2, none for layer 5), each deepstack feature is its merger applied to
    # the final hidden states. Random units: dropped units merge into different ones, with sizes above 1.
    tower, pixels = make_tower(dtype=torch.float64)
    for block in tower.blocks:
        for layer in (block.attn.proj, block.mlp.linear_fc2):
            torch.nn.init.zeros_(layer.weight), torch.nn.init.zeros_(layer.bias)
    patch(tower, keep_ratio=0.25, layers=[1, 3])
    with torch.no_grad():
        out = tower(pixels.double(), grid_thw=GRID)
        for merger, feature in zip(tower.deepstack_merger_list, out.deepstack_features, strict=True):
            assert torch.equal(feature, merger(out.last_hidden_state))


def test_patch_arguments_and_unpatch():
    tower, pixels = make_tower()
    with torch.no_grad():
        want = tower(pixels, grid_thw=GRID)
    with pytest.raises(ValueError, match=r"keep_ratio must be in \(0, 1\], got 1.5"):
        patch(tower, keep_ratio=1.5)
    with pytest.raises(ValueError, match=r"layers must name at least one layer, each in \[0, 6\), got \[-1\]"):
        patch(tower, keep_ratio=0.5, layers=[-1])
    with pytest.raises(TypeError, match="supports .*Qwen3VLVisionModel.*; got Linear"):
        patch(torch.nn.Linear(2, 2), keep_ratio=0.5)
    patch(tower, keep_ratio=0.02)
    assert tower.evoprune_state.layers == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="keep_ratio=0.02 keeps no unit of a frame of 9 units"):
        tower(pixels, grid_thw=GRID)
    unpatch(tower)
    assert not hasattr(tower, "evoprune_state")
    with torch.no_grad():
        assert_same_output(tower(pixels, grid_thw=GRID), want)
