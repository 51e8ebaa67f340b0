"""EvoPrune inside vLLM's Qwen2.5-VL (`vllm/model_executor/models/qwen2_5_vl.py`), selected by
`hf_overrides={"architectures": ["EvoPruneQwen2_5_VLForConditionalGeneration"], "evoprune": {"keep_ratio": 0.25}}`
("evoprune" may also name "layers" and "alpha", as `evoprune_ext.patch` does).

Three pieces, each a subclass of vLLM's own (what Qwen3-VL shares with them: `qwen_vl.py`):
- the multimodal processor emits `t * round(h/2 * w/2 * keep_ratio)` placeholders per image or video (the counts
  the tower will keep), from the grid alone, before the encoder runs;
- the tower (`Qwen2_5_VisionTransformer`) runs the plumbing of `evoprune_ext/towers/packed.py`: whole 2x2 units
  pruned per frame after the attention of the scheduled blocks, window bookkeeping rebuilt after each step;
- the model splits the tower's output by the kept counts and appends to each kept unit its original M-RoPE position
  (t, h, w) and the extent of the full grid (as base-256 digits, exact in bfloat16), vLLM's `SupportsMultiModalPruning` channels: the
  runner's `recompute_mrope_positions` then places the kept units where they were, and the text after a visual
  block where it would be unpruned (after the full grid). The runner only does so when told (`evoprune_ext.vllm`).
"""

from dataclasses import replace
from functools import partial

import torch
from torch import Tensor
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VisionTransformer,
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.video_prune.evs import recompute_mrope_positions
from vllm.utils.gpu_sync_debug import gpu_sync_allowed

from evoprune_ext.schedule import MERGE, UNIT, frame_units, kept_tokens
from evoprune_ext.towers.packed import PackedTower, WindowUnits, kept_units
from evoprune_ext.vllm.qwen_vl import (
    EvoPruneQwenVL,
    _attention_metadata,
    _block_then_prune,
    _mrope_positions,
    evoprune_options,
    split_positions,
)

__all__ = ["EvoPruneQwen2_5_VLForConditionalGeneration", "EvoPruneQwen2_5_VLMultiModalProcessor", "evoprune_options"]


class EvoPruneQwen2_5_VLMultiModalProcessor(Qwen2_5_VLMultiModalProcessor):
    """One placeholder per merge unit the tower keeps."""

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        keep_ratio = evoprune_options(self.info.get_hf_config())["keep_ratio"]

        def kept(item_idx: int, modality: str, unpruned):
            t, h, w = out_mm_kwargs[modality][item_idx][f"{modality}_grid_thw"].data.tolist()
            return unpruned(item_idx)[: t * kept_tokens((h // MERGE) * (w // MERGE), keep_ratio)]

        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        return [replace(update, replacement=partial(kept, modality=update.modality, unpruned=update.replacement))
                for update in updates]


def _forward(self, x: Tensor, grid_thw, *, encoder_metadata=None) -> Tensor:
    """Qwen2_5_VisionTransformer.forward with pruning steps at the scheduled layers: the kept units' features,
    in raster order of (item, t, h/2, w/2)."""
    if encoder_metadata is not None:
        raise NotImplementedError("EvoPrune's tower runs eagerly (no encoder CUDA graphs)")
    state = self._evoprune
    grid = [[int(v) for v in row] for row in grid_thw]
    keeps = state.keeps(grid)
    metadata = self.prepare_encoder_metadata(grid)

    hidden = self.patch_embed(self.input_norm(x.to(device=self.device), self.dtype))
    window_index = metadata["window_index"]
    hidden = hidden.view(-1, UNIT, hidden.shape[-1])[window_index].view(-1, 1, hidden.shape[-1])
    window_units = (metadata["cu_window_seqlens"].diff() // UNIT).to(hidden.device, torch.int64)
    units = WindowUnits(
        ids=window_index,
        frames=frame_units(grid),
        pools=state.pools(grid),
        sizes=hidden.new_ones(len(window_index), dtype=torch.float32),
        position_embeddings=(metadata["rotary_pos_emb_cos"], metadata["rotary_pos_emb_sin"]),
        window=torch.repeat_interleave(torch.arange(len(window_units), device=hidden.device), window_units),
    )
    full = dict(cu_seqlens=metadata["cu_seqlens"], max_seqlen=metadata["max_seqlen_full"],
                sequence_lengths=metadata["sequence_lengths_full"])
    windowed = dict(cu_seqlens=metadata["cu_window_seqlens"], max_seqlen=metadata["max_seqlen_window"],
                    sequence_lengths=metadata["sequence_lengths_window"])

    for layer_num, block in enumerate(self.blocks):
        attention = full if layer_num in self.fullatt_block_indexes else windowed
        if layer_num not in keeps:
            cos, sin = units.position_embeddings
            hidden = block(hidden, rotary_pos_emb_cos=cos, rotary_pos_emb_sin=sin, **attention)
            continue
        hidden, units, _ = _block_then_prune(block, hidden, units, keeps[layer_num], state.alpha, [], **attention)
        full = _attention_metadata(self, units.cu_seqlens())
        windowed = _attention_metadata(self, units.cu_window_seqlens())

    state.kept = kept_units(units, grid)
    return self.merger(hidden)[torch.argsort(units.ids)]


class PrunedVisionTower:
    """Mixed into vLLM's Qwen2_5_VisionTransformer."""

    forward = _forward


TOWER = PackedTower("Qwen2.5-VL", Qwen2_5_VisionTransformer, PrunedVisionTower)


@MULTIMODAL_REGISTRY.register_processor(
    EvoPruneQwen2_5_VLMultiModalProcessor, info=Qwen2_5_VLProcessingInfo, dummy_inputs=Qwen2_5_VLDummyInputsBuilder
)
class EvoPruneQwen2_5_VLForConditionalGeneration(EvoPruneQwenVL, Qwen2_5_VLForConditionalGeneration):
    """Qwen2.5-VL whose tower keeps `round(units * keep_ratio)` merge units of each frame."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._evoprune_patch(TOWER)

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features) -> tuple[Tensor, int]:
        """vLLM's positions, computed before the encoder, for blocks of the pruned counts: each frame's first units
        stand in until `recompute_mrope_positions` puts the kept ones in; text resumes after the full grid."""
        return _mrope_positions(len(input_tokens), self.iter_mm_grid_thw(mm_features),
                                evoprune_options(self.config)["keep_ratio"])

    def recompute_mrope_positions(self, input_ids, multimodal_embeddings, mrope_positions: Tensor,
                                  num_computed_tokens: int) -> tuple[list[Tensor], Tensor, int]:
        """vLLM's own recompute (`video_prune/evs.py`), fed the positions decoded from our channels (qwen_vl.py)."""
        split = [split_positions(rows) for rows in multimodal_embeddings]
        device = multimodal_embeddings[0].device if multimodal_embeddings else mrope_positions.device
        ids = torch.as_tensor(input_ids, dtype=torch.long, device=device)
        with gpu_sync_allowed():
            positions, delta = recompute_mrope_positions(
                ids, [units.T for _, units in split], mrope_positions, num_computed_tokens,
                self.config.vision_start_token_id, self.config.image_token_id, self.config.video_token_id,
            )
        return [features for features, _ in split], positions, delta

    def _process_image_input(self, image_input) -> tuple[Tensor, ...]:
        return self._evoprune_embeds("image", image_input, [1.0] * len(image_input["image_grid_thw"]))

    def _process_video_input(self, video_input) -> tuple[Tensor, ...]:
        seconds = video_input.get("second_per_grid_ts")
        per_second = getattr(self.config.vision_config, "tokens_per_second", 1.0)
        grid = video_input["video_grid_thw"]
        factors = [1.0] * len(grid) if seconds is None else [float(s) * per_second for s in seconds.tolist()]
        return self._evoprune_embeds("video", video_input, factors)
