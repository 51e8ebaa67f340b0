"""The clip budget inside a ViT tower (SigLIP): the frames of a video are one pool with one budget; attention
stays within each frame. Checked against a dense re-derivation written here from the reference ops."""

import pytest
import torch

pytest.importorskip("transformers")

from evoprune_ext import kept_tokens, patch, reference  # noqa: E402
from evoprune_ext.schedule import schedule_keeps  # noqa: E402
from test_encoder import PATCHES, pixels, tower  # noqa: E402

FRAMES = 3


def clip_by_hand(model, x, keep_ratio, layers, alpha):
    """SigLIP's encoder with the clip budget, written densely: a block-diagonal mask keeps attention within
    frames, importance is the attention each token receives from its own frame's queries, the pools are pruned
    by the reference. Returns (last_hidden_state [V,K,D], index [V,K])."""
    vision = model  # transformers 5: the SiglipVisionModel holds embeddings, encoder, post_layernorm
    hidden = vision.embeddings(x)  # [V*F, N, D]
    videos = hidden.shape[0] // FRAMES
    frame = torch.arange(FRAMES).repeat_interleave(PATCHES).expand(videos, -1)  # of each pooled token
    index = torch.arange(FRAMES * PATCHES).expand(videos, -1)
    sizes = torch.ones(videos, FRAMES * PATCHES)
    keeps = dict(zip(layers, schedule_keeps(FRAMES * PATCHES, 0, keep_ratio, len(layers))))
    hidden = hidden.reshape(videos, FRAMES * PATCHES, -1)  # attention is masked per frame from the start
    for i, layer in enumerate(vision.encoder.layers):
        attention = layer.self_attn
        normed = layer.layer_norm1(hidden)
        heads = attention.num_heads
        q, k, v = (p(normed).view(videos, -1, heads, attention.head_dim).transpose(1, 2)
                   for p in (attention.q_proj, attention.k_proj, attention.v_proj))
        same = frame[:, :, None] == frame[:, None, :]
        logits = attention.scale * q @ k.transpose(-1, -2) + sizes.log()[:, None, None, :]
        probabilities = logits.masked_fill(~same[:, None], float("-inf")).softmax(-1)
        out = (probabilities @ v).transpose(1, 2).reshape(videos, -1, heads * attention.head_dim)
        hidden = hidden + attention.out_proj(out)
        if i in keeps:
            per_frame = torch.zeros(videos, FRAMES).scatter_add_(1, frame, torch.ones_like(sizes))
            importance = probabilities.sum((1, 2)) / (heads * per_frame.gather(1, frame))
            hidden, kept, sizes, _ = reference.prune(hidden, importance, keep=keeps[i], metric=k.mean(1),
                                                     sizes=sizes, alpha=alpha)
            index, frame = index.gather(1, kept), frame.gather(1, kept)
        hidden = hidden + layer.mlp(layer.layer_norm2(hidden))
    return vision.post_layernorm(hidden), index


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("keep_ratio,layers", [(0.25, [1]), (0.25, [1, 2]), (0.1, [0, 1, 2])])
def test_clip_budget_equals_the_dense_derivation(attention, keep_ratio, layers):
    model = tower("siglip", attention)
    x = pixels(2 * FRAMES)
    with torch.inference_mode():
        want, want_index = clip_by_hand(model, x, keep_ratio, layers, alpha=0.1)
    state = patch(model, keep_ratio=keep_ratio, layers=layers, alpha=0.1, budget="clip").evoprune_state
    with torch.inference_mode(), state.clips(frames=FRAMES):
        got = model(pixel_values=x).last_hidden_state
    assert got.shape == (2, kept_tokens(FRAMES * PATCHES, keep_ratio), 32)
    assert torch.equal(state.index, want_index)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert [sum(lengths) for lengths in state.frame_lengths] == [got.shape[1]] * 2


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_a_static_video_keeps_one_frame_and_merges_the_repeats(attention):
    """Later frames that repeat the first are exact ties: they lose (ties go to the smallest index), so the clip
    spends its whole budget on distinct tokens, and a frame left empty does not break later attention."""
    model = tower("siglip", attention)
    x = pixels(1).expand(FRAMES, -1, -1, -1)
    # One step: a second one would see twins that differ (a kept token that absorbed copies has a larger size).
    state = patch(model, keep_ratio=0.25, layers=[1], budget="clip").evoprune_state
    with torch.inference_mode(), state.clips(frames=FRAMES):
        out = model(pixel_values=x).last_hidden_state
    assert state.frame_lengths == [[kept_tokens(FRAMES * PATCHES, 0.25), 0, 0]]
    assert state.sizes.sum() == FRAMES * PATCHES and (state.sizes >= FRAMES).all() and out.isfinite().all()


def test_frame_budget_and_one_frame_clips_are_the_per_frame_pruning():
    x = pixels(2 * FRAMES)
    outputs = []
    for budget, frames in (("frame", FRAMES), ("clip", 1)):
        model = tower("siglip")
        state = patch(model, keep_ratio=0.25, budget=budget).evoprune_state
        with torch.inference_mode(), state.clips(frames=frames):
            outputs.append(model(pixel_values=x).last_hidden_state)
    assert outputs[0].shape == (2 * FRAMES, kept_tokens(PATCHES, 0.25), 32)
    assert torch.equal(outputs[0], outputs[1])


def test_clip_budget_bad_input():
    with pytest.raises(ValueError, match="budget='clip' needs a tower without protected tokens; CLIP has 1"):
        patch(tower("clip"), keep_ratio=0.5, budget="clip")
    with pytest.raises(ValueError, match=r"budget must be one of \('frame', 'clip'\), got 'clips'"):
        patch(tower("siglip"), keep_ratio=0.5, budget="clips")
    model = tower("siglip")
    state = patch(model, keep_ratio=0.5, budget="clip").evoprune_state
    for frames in (0, 2.0, True):
        with pytest.raises(ValueError, match=f"frames must be a positive int, got {frames!r}"):
            with state.clips(frames=frames):
                pass
    with pytest.raises(ValueError, match="the tower got 5 frames, not a whole number of videos of 3 frames"):
        with torch.inference_mode(), state.clips(frames=FRAMES):
            model(pixel_values=pixels(5))


def test_a_step_without_index_is_refused_under_the_clip_budget():
    def step_without_index(hidden, metric, importance, sizes, *, keep, **options):
        out, _, sizes, slot = reference.prune(hidden, importance, keep=keep, metric=metric, sizes=sizes)
        return out, sizes, slot

    model = tower("siglip")
    state = patch(model, keep_ratio=0.25, budget="clip", step=step_without_index).evoprune_state
    with pytest.raises(RuntimeError, match="budget='clip' needs a pruning step that returns the kept index"):
        with torch.inference_mode(), state.clips(frames=FRAMES):
            model(pixel_values=pixels(FRAMES))
