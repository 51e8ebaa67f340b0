"""EvoPrune inside vLLM's Qwen2.5-VL (`vllm/model_executor/models/qwen2_5_vl.py`), selected by
`hf_overrides={"architectures": ["EvoPruneQwen2_5_VLForConditionalGeneration"], "evoprune": {"keep_ratio": 0.25}}`
("evoprune" may also name "layers" and "alpha", as `evoprune_ext.patch` does).

Three pieces, each a subclass of vLLM's own:
- the multimodal processor emits `t * round(h/2 * w/2 * keep_ratio)` placeholders per image or video (the counts
  the tower will keep), from the grid alone, before the encoder runs;
- the tower (`Qwen2_5_VisionTransformer`) runs the plumbing of `evoprune_ext/packed_tower.py`: whole 2x2 units
  pruned per frame after the attention of the scheduled blocks, window bookkeeping rebuilt after each step;
- the model splits the tower's output by the kept counts and appends to each kept unit its original M-RoPE position
  (t, h, w) and the extent of the full grid, the 4 channels of vLLM's `SupportsMultiModalPruning` interface: the
  runner's `recompute_mrope_positions` then places the kept units where they were, and the text after a visual
  block where it would be unpruned (after the full grid). The runner only does so when told (`evoprune_ext.vllm`).
"""

from dataclasses import replace
from functools import partial

import numpy as np
import torch
from torch import Tensor
from vllm.model_executor.layers.attention import MMEncoderAttention
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VisionTransformer,
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from evoprune_ext.encoder import kept_tokens
from evoprune_ext.packed_tower import (
    MERGE,
    UNIT,
    WindowUnits,
    frame_units,
    kept_units,
    patch_tower,
    prune_after_attention,
)

__all__ = ["EvoPruneQwen2_5_VLForConditionalGeneration", "EvoPruneQwen2_5_VLMultiModalProcessor", "evoprune_options"]


def evoprune_options(config) -> dict:
    """The "evoprune" entry of the model's hf_overrides: keep_ratio (required), layers, alpha."""
    options = dict(getattr(config, "evoprune", None) or {})
    if "keep_ratio" not in options:
        raise ValueError('EvoPrune models need hf_overrides={"evoprune": {"keep_ratio": ...}}')
    return options


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


def _rotary(block):
    """vLLM's vision rotary embedding (neox style on half-width cos, sin) as `apply_rotary(q, k, cos, sin)`."""
    def apply(queries, keys, cos, sin):
        rotated = block.attn.apply_rotary_emb(torch.stack([queries, keys]).contiguous(), cos, sin)
        return rotated.unbind(0)
    return apply


def _block_then_prune(block, hidden: Tensor, units: WindowUnits, keep: list[int], alpha: float, **attention):
    """Qwen2_5_VisionBlock.forward with a pruning step between its attention and its MLP; hidden is [tokens, 1, D]."""
    captured = []
    hook = block.attn.qkv.register_forward_hook(lambda module, args, output: captured.append(output[0].detach()))
    cos, sin = units.position_embeddings
    try:
        attended = block.attn(block.norm1(hidden), rotary_pos_emb_cos=cos, rotary_pos_emb_sin=sin, **attention)
    finally:
        hook.remove()
    heads, head_dim = block.attn.num_attention_heads_per_partition, block.attn.hidden_size_per_attention_head
    queries, keys, _ = captured[0].reshape(hidden.shape[0], 3, heads, head_dim).unbind(1)
    hidden, units, _ = prune_after_attention(
        (hidden + attended)[:, 0], queries, keys, units, keep, alpha, _rotary(block), head_dim**-0.5, []
    )
    hidden = hidden[:, None]
    return hidden + block.mlp(block.norm2(hidden)), units


def _attention_metadata(tower, cu_seqlens: Tensor) -> dict:
    """What vLLM's encoder attention needs of segments `cu_seqlens` (as prepare_encoder_metadata builds it)."""
    offsets = cu_seqlens.cpu().numpy()
    return dict(
        cu_seqlens=MMEncoderAttention.maybe_recompute_cu_seqlens(
            tower.attn_backend, offsets, tower.hidden_size, tower.tp_size, tower.device,
            fp8_padded_hidden_size=tower.fp8_padded_hidden_size,
        ),
        max_seqlen=torch.tensor(MMEncoderAttention.compute_max_seqlen(tower.attn_backend, offsets), dtype=torch.int32),
        sequence_lengths=MMEncoderAttention.maybe_compute_seq_lens(tower.attn_backend, offsets, tower.device),
    )


def _forward(self, x: Tensor, grid_thw, *, encoder_metadata=None) -> Tensor:
    """Qwen2_5_VisionTransformer.forward with pruning steps at the scheduled layers: the kept units' features,
    in raster order of (item, t, h/2, w/2)."""
    if encoder_metadata is not None:
        raise NotImplementedError("EvoPrune's tower runs eagerly (no encoder CUDA graphs)")
    state = self.evoprune_state
    grid = [[int(v) for v in row] for row in grid_thw]
    keeps = state.keeps(frame_units(grid))
    metadata = self.prepare_encoder_metadata(grid)

    hidden = self.patch_embed(self.input_norm(x.to(device=self.device), self.dtype))
    window_index = metadata["window_index"]
    hidden = hidden.view(-1, UNIT, hidden.shape[-1])[window_index].view(-1, 1, hidden.shape[-1])
    window_units = (metadata["cu_window_seqlens"].diff() // UNIT).to(hidden.device, torch.int64)
    units = WindowUnits(
        ids=window_index,
        frames=frame_units(grid),
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
        hidden, units = _block_then_prune(block, hidden, units, keeps[layer_num], state.alpha, **attention)
        full = _attention_metadata(self, units.cu_seqlens())
        windowed = _attention_metadata(self, units.cu_window_seqlens())

    state.kept = kept_units(units, grid)
    return self.merger(hidden)[torch.argsort(units.ids)]


def _grid_positions(t: int, h: int, w: int, t_factor: float) -> np.ndarray:
    """[3, t*h*w]: (t, h, w) of each unit of a grid of merge units, t scaled as get_mrope_input_positions does."""
    positions = np.indices((t, h, w)).reshape(3, -1)
    if t_factor != 1.0:
        positions[0] = (positions[0] * t_factor).astype(np.int64)
    return positions


def _kept_positions(grid: list[int], kept: Tensor, t_factor: float) -> Tensor:
    """[kept, 4]: the M-RoPE (t, h, w) of each kept unit relative to its block's start, as vLLM's
    get_mrope_input_positions gives it unpruned, and the full grid's extent (where the text after it resumes)."""
    t, h, w = grid
    positions = _grid_positions(t, h // MERGE, w // MERGE, t_factor)
    extent = positions.max() + 1
    positions = torch.from_numpy(positions)[:, kept.cpu()]
    return torch.cat([positions, torch.full_like(positions[:1], extent)]).T


@MULTIMODAL_REGISTRY.register_processor(
    EvoPruneQwen2_5_VLMultiModalProcessor, info=Qwen2_5_VLProcessingInfo, dummy_inputs=Qwen2_5_VLDummyInputsBuilder
)
class EvoPruneQwen2_5_VLForConditionalGeneration(Qwen2_5_VLForConditionalGeneration):
    """Qwen2.5-VL whose tower keeps `round(units * keep_ratio)` merge units of each frame."""

    evoprune_prunes_positions = True  # the runner must recompute M-RoPE positions (evoprune_ext.vllm)

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        options = evoprune_options(self.config)
        if self.use_data_parallel:
            raise NotImplementedError("EvoPrune's tower does not run data-parallel (mm_encoder_tp_mode='data')")
        patch_tower(self.visual, Qwen2_5_VisionTransformer, _forward, keep_ratio=options["keep_ratio"],
                    layers=options.get("layers"), alpha=options.get("alpha"))
        # embed_multimodal appends positions (our _process_*_input) and recompute_mrope_positions strips them.
        self.is_multimodal_pruning_enabled = True

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features) -> tuple[Tensor, int]:
        """vLLM's positions, computed before the encoder, for blocks of the pruned counts: each frame's first units
        stand in until `recompute_mrope_positions` puts the kept ones in; text resumes after the full grid."""
        keep_ratio = evoprune_options(self.config)["keep_ratio"]
        pieces, start, position = [], 0, 0
        for offset, t, h, w, t_factor in self.iter_mm_grid_thw(mm_features):
            text = offset - start
            pieces.append(np.broadcast_to(np.arange(text), (3, text)) + position)
            per_frame = kept_tokens(h * w, keep_ratio)
            grid = _grid_positions(t, h, w, t_factor)
            pieces.append(grid.reshape(3, t, h * w)[:, :, :per_frame].reshape(3, -1) + position + text)
            position += text + grid.max() + 1
            start = offset + t * per_frame
        text = len(input_tokens) - start
        pieces.append(np.broadcast_to(np.arange(text), (3, text)) + position)
        positions = np.concatenate(pieces, axis=1)
        return torch.from_numpy(positions), int(positions.max() + 1 - len(input_tokens))

    def _process_image_input(self, image_input) -> tuple[Tensor, ...]:
        return self._evoprune_embeds("image", image_input, [1.0] * len(image_input["image_grid_thw"]))

    def _process_video_input(self, video_input) -> tuple[Tensor, ...]:
        seconds = video_input.get("second_per_grid_ts")
        per_second = getattr(self.config.vision_config, "tokens_per_second", 1.0)
        grid = video_input["video_grid_thw"]
        factors = [1.0] * len(grid) if seconds is None else [float(s) * per_second for s in seconds.tolist()]
        return self._evoprune_embeds("video", video_input, factors)

    def _postprocess_image_embeds_evs(self, embeds, image_input):
        return embeds  # positions were appended by _process_image_input

    def _postprocess_video_embeds_evs(self, embeds, video_input):
        return embeds

    def _evoprune_embeds(self, modality: str, inputs, t_factors: list[float]) -> tuple[Tensor, ...]:
        if inputs["type"] != f"pixel_values{'_videos' if modality == 'video' else ''}":
            raise NotImplementedError(f"EvoPrune prunes inside the tower: {modality} embeddings cannot be pruned")
        grid = inputs[f"{modality}_grid_thw"].tolist()
        pixels = inputs["pixel_values_videos" if modality == "video" else "pixel_values"]
        embeds = self.visual(pixels, grid_thw=grid)
        kept = self.visual.evoprune_state.kept
        return tuple(
            torch.cat([rows, _kept_positions(size, units, factor).to(rows)], dim=1)
            for rows, size, units, factor in zip(embeds.split([len(u) for u in kept]), grid, kept, t_factors)
        )
