"""EvoPrune inside the Qwen2.5-VL vision tower (transformers' `Qwen2_5_VisionTransformerPretrainedModel`).

    visual = model.model.visual                          # or a bare tower
    patch_qwen2_5_vl_tower(visual, keep_ratio=0.25)
    out = visual(pixel_values, grid_thw=grid_thw)        # out.pooler_output: the kept merge units, raster order
    visual.evoprune_state.kept                           # per grid_thw row: raster indices of the kept units
    unpatch_qwen2_5_vl_tower(visual)

What differs from CLIP and SigLIP (evoprune_ext/encoder.py):
- No batch: every image and video frame of a request is packed into one sequence, so pruning uses the packed ops
  with one sequence per frame (the full-attention segments of `cu_seqlens`), and every frame keeps
  `round(units * keep_ratio)` units, a static count (reached step by step as `encoder.schedule_keeps` says).
- The PatchMerger fuses every 4 consecutive tokens (a 2x2 unit), so whole units are pruned: a unit is one row of
  its 4 tokens' features, `[units, 4 * D]`, and a dropped unit merges element-wise into the kept unit most similar
  to it. Unit metric: the mean of its 4 tokens' keys averaged over heads, taken before the rotary embedding so that
  it compares content, not position (each kept unit keeps its own position anyway). Unit importance: the attention
  its 4 tokens receive within their frame (`importance_from_qk_packed` on the rotated q and k), summed.
- Tokens run in window order (`window_index`). Kept units stay in that order, and the bookkeeping is rebuilt for
  them after each step: `cu_seqlens` (per frame), `cu_window_seqlens` (a window that lost all its units
  disappears), the rotary embeddings (gathered per kept unit) and the units' global raster ids, whose argsort
  restores the raster order of the kept units after the merger, as `argsort(window_index)` does unpruned.
  Unit sizes carry from step to step (hierarchical merging); attention is not made size-aware.

Only the tower is patched: the language model still expects `t*h*w/4` placeholders per image or video.
"""

from dataclasses import dataclass, field
from types import MethodType

import torch
from torch import Tensor
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VisionTransformerPretrainedModel,
    apply_rotary_pos_emb_vision,
)
from transformers.utils.generic import get_max_seqlen, merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs
from transformers.vision_utils import get_vision_attention_seqlens, get_vision_position_ids, get_vision_window_index

from evoprune_ext.defaults import DEFAULT_ALPHA
from evoprune_ext.encoder import default_layers, schedule_keeps

__all__ = ["QwenPruneState", "patch_qwen2_5_vl_tower", "unpatch_qwen2_5_vl_tower"]

UNIT = 4  # tokens per 2x2 merge unit (spatial_merge_size ** 2)


@dataclass
class QwenPruneState:
    """The configuration of a patched tower (`visual.evoprune_state`) and what its last forward pass kept:
    `kept[i]` holds the raster indices (over t, h/2, w/2) of the units kept of grid_thw row i, ascending."""

    keep_ratio: float
    layers: list[int]
    alpha: float
    kept: list[Tensor] = field(default_factory=list)


@dataclass
class _Units:
    """The units left, in window order, and what the tower's attention needs to know about them."""

    ids: Tensor  # [U] global raster id of each unit (the tower's window_index, pruned)
    window: Tensor  # [U] window of each unit (ascending)
    frames: list[int]  # units per frame, frames in order
    sizes: Tensor  # [U] float32: how many original units each unit stands for
    position_embeddings: tuple[Tensor, Tensor]  # rotary cos, sin [UNIT * U, head_dim]

    def cu_seqlens(self) -> Tensor:
        """Full-attention segments: one per frame, in tokens."""
        counts = torch.tensor(self.frames, dtype=torch.int32, device=self.ids.device) * UNIT
        return torch.nn.functional.pad(counts.cumsum(0, dtype=torch.int32), (1, 0))

    def cu_window_seqlens(self) -> Tensor:
        """Window-attention segments, in tokens; windows without units are left out, as the tower does."""
        counts = torch.bincount(self.window) * UNIT
        return torch.nn.functional.pad(counts.cumsum(0, dtype=torch.int32), (1, 0)).unique_consecutive()

    def select(self, index: Tensor, sizes: Tensor, frames: list[int]) -> "_Units":
        """The units at positions `index` (ascending within each frame), with their new sizes."""
        tokens = (index[:, None] * UNIT + torch.arange(UNIT, device=index.device)).flatten()
        cos, sin = self.position_embeddings
        return _Units(self.ids[index], self.window[index], frames, sizes, (cos[tokens], sin[tokens]))


def _frame_units(grid_thw: list[list[int]], merge: int) -> list[int]:
    return [(h // merge) * (w // merge) for t, h, w in grid_thw for _ in range(t)]


def _frame_keeps(frames: list[int], keep_ratio: float, steps: int) -> list[list[int]]:
    """keeps[step][frame]: units each frame keeps after each step; the last step lands on round(units * keep_ratio)."""
    if any(round(n * keep_ratio) < 1 for n in frames):
        raise ValueError(f"keep_ratio={keep_ratio} keeps no unit of a frame of {min(frames)} units")
    per_frame = [schedule_keeps(n, 0, keep_ratio, steps) for n in frames]
    return [list(step) for step in zip(*per_frame)]


def _attention_then_prune(block, hidden: Tensor, units: _Units, keep: list[int], alpha: float, **attention_kwargs):
    """One block with a pruning step between its attention and its MLP. Returns (hidden, units left)."""
    captured = []
    hook = block.attn.qkv.register_forward_hook(lambda module, args, output: captured.append(output.detach()))
    try:
        hidden = hidden + block.attn(
            block.norm1(hidden), position_embeddings=units.position_embeddings, **attention_kwargs
        )
    finally:
        hook.remove()
    tokens, dim = hidden.shape
    queries, keys, _ = captured[0].reshape(tokens, 3, block.attn.num_heads, -1).unbind(1)  # [tokens, H, d]
    metric = keys.float().mean(1).view(-1, UNIT, keys.shape[-1]).mean(1).to(hidden.dtype)
    # Importance from the logits the attention computed: rotated queries and keys.
    queries, keys = apply_rotary_pos_emb_vision(queries, keys, *units.position_embeddings)
    frame_tokens = [n * UNIT for n in units.frames]
    importance = torch.ops.evoprune.importance_from_qk_packed(
        queries.transpose(0, 1), keys.transpose(0, 1), block.attn.scaling, q_lengths=frame_tokens,
        k_lengths=frame_tokens,
    )
    out, index, sizes, _ = torch.ops.evoprune.prune_packed(
        hidden.reshape(-1, UNIT * dim), importance.view(-1, UNIT).sum(1), lengths=units.frames, keep=keep,
        metric=metric, sizes=units.sizes, alpha=alpha,
    )
    hidden = out.view(-1, dim)
    return hidden + block.mlp(block.norm2(hidden)), units.select(index, sizes, keep)


@merge_with_config_defaults
@capture_outputs
def _forward(self, hidden_states: Tensor, grid_thw: Tensor, **kwargs) -> BaseModelOutputWithPooling:
    """Qwen2_5_VisionTransformerPretrainedModel.forward with pruning steps at the scheduled layers."""
    state = self.evoprune_state
    grid = grid_thw.tolist()
    frames = _frame_units(grid, self.spatial_merge_size)
    keeps = dict(zip(state.layers, _frame_keeps(frames, state.keep_ratio, len(state.layers))))

    position_ids = get_vision_position_ids(grid_thw, self.spatial_merge_size, kwargs=kwargs)
    cu_seqlens, max_seqlen = get_vision_attention_seqlens(grid_thw, self.config, kwargs=kwargs)
    window_index, cu_window_seqlens = get_vision_window_index(
        grid_thw, spatial_merge_size=self.spatial_merge_size, window_size=self.window_size,
        patch_size=self.patch_size, kwargs=kwargs,
    )
    max_window_seqlen = get_max_seqlen(cu_window_seqlens, self.config, kwargs=kwargs, kwarg_name="max_window_seqlen")
    hidden_states = self.patch_embed(hidden_states)
    seq_len = hidden_states.shape[0]
    hidden_states = self.permute_input_for_window_attn(hidden_states, window_index, seq_len=seq_len)
    position_embeddings = tuple(
        self.permute_input_for_window_attn(freq, window_index, seq_len=seq_len)
        for freq in self.rotary_pos_emb(hidden_states, position_ids)
    )
    # transformers builds window_index on the CPU: the bookkeeping lives on the tokens' device.
    device = hidden_states.device
    window_units = (cu_window_seqlens.diff() // UNIT).to(device, torch.int64)
    units = _Units(
        ids=window_index.to(device),
        window=torch.repeat_interleave(torch.arange(len(window_units), device=device), window_units),
        frames=frames,
        sizes=hidden_states.new_ones(len(window_index), dtype=torch.float32),
        position_embeddings=position_embeddings,
    )

    for layer_num, block in enumerate(self.blocks):
        full = layer_num in self.fullatt_block_indexes
        attention = dict(
            cu_seqlens=cu_seqlens if full else cu_window_seqlens, max_seqlen=max_seqlen if full else max_window_seqlen
        )
        if layer_num not in keeps:
            hidden_states = block(hidden_states, position_embeddings=units.position_embeddings, **attention, **kwargs)
            continue
        hidden_states, units = _attention_then_prune(block, hidden_states, units, keeps[layer_num], state.alpha,
                                                     **attention, **kwargs)
        cu_seqlens, cu_window_seqlens = units.cu_seqlens(), units.cu_window_seqlens()
        max_seqlen = get_max_seqlen(cu_seqlens, self.config)
        max_window_seqlen = get_max_seqlen(cu_window_seqlens, self.config)

    # The kept units' raster ids, split per grid_thw row (its frames' final counts) and made local to it.
    kept_ids = units.ids.sort().values.split([sum(units.frames[f : f + t]) for f, t in _first_frames(grid)])
    state.kept = [ids - first_unit for ids, first_unit in zip(kept_ids, _first_units(grid, self.spatial_merge_size))]
    merged_hidden_states = self.merger(hidden_states)[torch.argsort(units.ids)]
    return BaseModelOutputWithPooling(last_hidden_state=hidden_states, pooler_output=merged_hidden_states)


def _first_frames(grid: list[list[int]]) -> list[tuple[int, int]]:
    """(first frame, frames) of each grid_thw row."""
    starts = [sum(t for t, _, _ in grid[:i]) for i in range(len(grid))]
    return [(start, t) for start, (t, _, _) in zip(starts, grid)]


def _first_units(grid: list[list[int]], merge: int) -> list[int]:
    """Global raster id of the first unit of each grid_thw row."""
    units = [t * (h // merge) * (w // merge) for t, h, w in grid]
    return [sum(units[:i]) for i in range(len(units))]


def patch_qwen2_5_vl_tower(
    visual: Qwen2_5_VisionTransformerPretrainedModel,
    *,
    keep_ratio: float,
    layers: list[int] | None = None,
    alpha: float | None = None,
) -> Qwen2_5_VisionTransformerPretrainedModel:
    """Make `visual` prune after the attention of `layers` (default: `encoder.default_layers`, early layers), so
    that each frame keeps `round(units * keep_ratio)` of its 2x2 merge units. Returns `visual`."""
    if not isinstance(visual, Qwen2_5_VisionTransformerPretrainedModel):
        raise TypeError(f"visual must be a Qwen2_5_VisionTransformerPretrainedModel, got {type(visual).__name__}")
    if not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
    if visual.spatial_merge_size ** 2 != UNIT:
        raise ValueError(f"the tower must merge 2x2 patches, got spatial_merge_size={visual.spatial_merge_size}")
    depth = len(visual.blocks)
    layers = default_layers(depth) if layers is None else sorted(set(layers))
    if not layers or any(not 0 <= layer < depth for layer in layers):
        raise ValueError(f"layers must name at least one layer, each in [0, {depth}), got {layers}")
    visual.evoprune_state = QwenPruneState(keep_ratio, layers, DEFAULT_ALPHA if alpha is None else alpha)
    visual.forward = MethodType(_forward, visual)
    return visual


def unpatch_qwen2_5_vl_tower(visual: Qwen2_5_VisionTransformerPretrainedModel) -> None:
    """Undo patch_qwen2_5_vl_tower."""
    del visual.forward
    del visual.evoprune_state
