"""EvoPrune inside the Qwen2.5-VL vision tower (transformers' `Qwen2_5_VisionTransformerPretrainedModel`).

    visual = model.model.visual                          # or a bare tower
    evoprune_ext.patch(visual, keep_ratio=0.25)
    out = visual(pixel_values, grid_thw=grid_thw)        # out.pooler_output: the kept merge units, raster order
    visual.evoprune_state.kept                           # per grid_thw row: raster indices of the kept units
    evoprune_ext.unpatch(visual)

How whole 2x2 units are pruned per frame of the packed sequence: evoprune_ext/towers/packed.py. What differs here:
tokens run in window order (`window_index`), and most blocks attend within windows (`cu_window_seqlens`), only
`fullatt_block_indexes` over whole frames. Kept units stay in window order, and the bookkeeping is rebuilt for
them after each step: `cu_seqlens` (per frame), `cu_window_seqlens` (a window that lost all its units
disappears), the rotary embeddings (gathered per kept unit) and the units' global raster ids, whose argsort
restores the raster order of the kept units after the merger, as `argsort(window_index)` does unpruned.

A bare tower patched alone returns the kept units only; `evoprune_ext.patch` on the whole model also recounts
the placeholders and positions them (`qwen_vl.py`).
"""

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

from evoprune_ext.schedule import UNIT, frame_units
from evoprune_ext.towers.packed import PackedTower, WindowUnits, attention_then_prune, kept_units

__all__ = ["TOWER", "PrunedQwen2_5_VisionTower"]


@merge_with_config_defaults
@capture_outputs
def _forward(self, hidden_states: Tensor, grid_thw: Tensor, **kwargs) -> BaseModelOutputWithPooling:
    """Qwen2_5_VisionTransformerPretrainedModel.forward with pruning steps at the scheduled layers."""
    state = self._evoprune
    grid = grid_thw.tolist()
    frames = frame_units(grid)
    keeps = state.keeps(grid)

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
    units = WindowUnits(
        ids=window_index.to(device),
        frames=frames,
        pools=state.pools(grid),
        sizes=hidden_states.new_ones(len(window_index), dtype=torch.float32),
        position_embeddings=position_embeddings,
        window=torch.repeat_interleave(torch.arange(len(window_units), device=device), window_units),
    )

    for layer_num, block in enumerate(self.blocks):
        full = layer_num in self.fullatt_block_indexes
        attention = dict(
            cu_seqlens=cu_seqlens if full else cu_window_seqlens, max_seqlen=max_seqlen if full else max_window_seqlen
        )
        if layer_num not in keeps:
            hidden_states = block(hidden_states, position_embeddings=units.position_embeddings, **attention, **kwargs)
            continue
        hidden_states, units, _ = attention_then_prune(
            block, hidden_states, units, keeps[layer_num], state.alpha, apply_rotary_pos_emb_vision, [],
            **attention, **kwargs,
        )
        cu_seqlens, cu_window_seqlens = units.cu_seqlens(), units.cu_window_seqlens()
        max_seqlen = get_max_seqlen(cu_seqlens, self.config)
        max_window_seqlen = get_max_seqlen(cu_window_seqlens, self.config)

    state.kept = kept_units(units, grid)
    merged_hidden_states = self.merger(hidden_states)[torch.argsort(units.ids)]
    return BaseModelOutputWithPooling(last_hidden_state=hidden_states, pooler_output=merged_hidden_states)


class PrunedQwen2_5_VisionTower:
    """Mixed into Qwen2_5_VisionTransformerPretrainedModel: its forward with pruning steps at the scheduled
    layers."""

    forward = _forward


TOWER = PackedTower("Qwen2.5-VL", Qwen2_5_VisionTransformerPretrainedModel, PrunedQwen2_5_VisionTower)
