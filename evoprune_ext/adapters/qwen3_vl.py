"""EvoPrune inside the Qwen3-VL vision tower (transformers' `Qwen3VLVisionModel`).

    visual = model.model.visual                          # or a bare tower
    evoprune_ext.patch(visual, keep_ratio=0.25)
    out = visual(pixel_values, grid_thw=grid_thw)        # out.pooler_output, out.deepstack_features: kept units
    visual.evoprune_state.kept                           # per grid_thw row: raster indices of the kept units
    evoprune_ext.unpatch(visual)

How whole 2x2 units are pruned per frame of the packed sequence: evoprune_ext/towers/packed.py. What differs from
Qwen2.5-VL:
- No windows: tokens run in raster order of their units (the 4 tokens of a unit consecutive) and every block
  attends over whole frames. The kept units of a frame stay ascending, so the kept units stay in raster order and
  the output needs no final reordering.
- Learned positions (interpolated per grid) are added to the patch embeddings before the first block, hence
  before any pruning step: they ride along in the hidden states. The rotary embeddings are gathered per kept unit.
- Deepstack: the mergers of `deepstack_visual_indexes` read the hidden states after those layers. A step at or
  before such a layer has already pruned them; a later step applies the same selection and merge to them (they
  are carried until the last step), so every deepstack feature has exactly the kept units of `pooler_output`, in
  the same order. Their mergers run at the end, on the kept units only.

A bare tower patched alone returns the kept units only; `evoprune_ext.patch` on the whole model also recounts
the placeholders and positions them (`qwen_vl.py`).
"""

import torch
from torch import Tensor
from transformers.models.qwen3_vl.modeling_qwen3_vl import (
    BaseModelOutputWithDeepstackFeatures,
    Qwen3VLVisionModel,
    apply_rotary_pos_emb_vision,
)
from transformers.utils.generic import get_max_seqlen, merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs
from transformers.vision_utils import (
    get_vision_attention_seqlens,
    get_vision_interpolation_indices_and_weights,
    get_vision_position_ids,
)

from evoprune_ext.schedule import frame_units
from evoprune_ext.towers.packed import PackedTower, Units, attention_then_prune, kept_units

__all__ = ["TOWER", "PrunedQwen3VisionTower"]


@merge_with_config_defaults
@capture_outputs
def _forward(self, hidden_states: Tensor, grid_thw: Tensor, **kwargs) -> BaseModelOutputWithDeepstackFeatures:
    """Qwen3VLVisionModel.forward with pruning steps at the scheduled layers."""
    state = self._evoprune
    grid = grid_thw.tolist()
    frames = frame_units(grid)
    keeps = state.keeps(grid)

    interp_indices, interp_weights = get_vision_interpolation_indices_and_weights(
        grid_thw, num_grid_per_side=self.num_grid_per_side, mode=self.interpolation_mode,
        align_corners=self.interpolation_align_corners, spatial_merge_size=self.config.spatial_merge_size,
        kwargs=kwargs,
    )
    position_ids = get_vision_position_ids(grid_thw, self.spatial_merge_size, kwargs=kwargs)
    cu_seqlens, max_seqlen = get_vision_attention_seqlens(grid_thw, self.config, kwargs=kwargs)
    hidden_states = self.patch_embed(hidden_states)
    pos_embeds = (self.pos_embed(interp_indices) * interp_weights[:, :, None]).sum(1)
    hidden_states = hidden_states + pos_embeds.to(hidden_states.dtype)
    units = Units(
        ids=torch.arange(sum(frames), device=hidden_states.device),
        frames=frames,
        pools=state.pools(grid),
        sizes=hidden_states.new_ones(sum(frames), dtype=torch.float32),
        position_embeddings=self.rotary_pos_emb(hidden_states, position_ids),
    )

    deepstack, deepstack_mergers = [], []  # hidden states after each deepstack layer so far, pruned as they go
    for layer_num, block in enumerate(self.blocks):
        attention = dict(cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        if layer_num in keeps:
            hidden_states, units, deepstack = attention_then_prune(
                block, hidden_states, units, keeps[layer_num], state.alpha, apply_rotary_pos_emb_vision, deepstack,
                **attention, **kwargs,
            )
            cu_seqlens = units.cu_seqlens()
            max_seqlen = get_max_seqlen(cu_seqlens, self.config)
        else:
            hidden_states = block(hidden_states, position_embeddings=units.position_embeddings, **attention, **kwargs)
        if layer_num in self.deepstack_visual_indexes:
            deepstack.append(hidden_states)
            deepstack_mergers.append(self.deepstack_merger_list[self.deepstack_visual_indexes.index(layer_num)])

    state.kept = kept_units(units, grid)
    return BaseModelOutputWithDeepstackFeatures(
        last_hidden_state=hidden_states,
        pooler_output=self.merger(hidden_states),
        deepstack_features=[merger(hidden) for merger, hidden in zip(deepstack_mergers, deepstack)],
    )


class PrunedQwen3VisionTower:
    """Mixed into Qwen3VLVisionModel: its forward with pruning steps at the scheduled layers."""

    forward = _forward


TOWER = PackedTower("Qwen3-VL", Qwen3VLVisionModel, PrunedQwen3VisionTower)
