"""EvoPrune inside vLLM's Qwen3-VL (`vllm/model_executor/models/qwen3_vl.py`), selected by
`hf_overrides={"architectures": ["EvoPruneQwen3VLForConditionalGeneration"], "evoprune": {"keep_ratio": 0.25}}`
("evoprune" may also name "layers" and "alpha", as `evoprune_ext.patch` does).

The same three pieces as for Qwen2.5-VL (`qwen2_5_vl.py`; what both share: `qwen_vl.py`), and what differs:
- the multimodal processor: Qwen3-VL writes every video frame as a block of its own (a timestamp, then
  `<|vision_start|>`, the frame's placeholders, `<|vision_end|>`); each frame's run of placeholders is cut to
  `round(h/2 * w/2 * keep_ratio)`, the timestamps and vision start / end tokens stay;
- the tower (`Qwen3_VisionTransformer`): no windows, learned positions added before the first block, and deepstack:
  the hidden states after `deepstack_visual_indexes` are carried through the later pruning steps (same selection,
  same merge), so every deepstack feature holds exactly the kept units; vLLM's output layout stays
  `[units, (1 + deepstack) * out_hidden_size]`;
- positions: vLLM positions each frame as an image (t = 0, text resumes after max(h/2, w/2)). Its own
  `recompute_mrope_positions` (EVS's) expects every video as one embedding covering timestamps and frames; ours
  are the kept units only, frames apart in the prompt, so the model recomputes them itself: text positions never
  depend on what was pruned, so only the kept units' rows are rewritten, each from its block's start.
"""

import itertools
from dataclasses import replace
from functools import partial

import torch
from torch import Tensor
from vllm.model_executor.models.qwen3_vl import (
    Qwen3_VisionTransformer,
    Qwen3VLDummyInputsBuilder,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMultiModalProcessor,
    Qwen3VLProcessingInfo,
)
from vllm.model_executor.models.qwen3_vl_moe import Qwen3VLMoeForConditionalGeneration, Qwen3VLMoeProcessingInfo
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.processing import PromptUpdateDetails

from evoprune_ext.schedule import MERGE, frame_units, kept_tokens
from evoprune_ext.towers.packed import PER_FRAME_PROMPT, PackedTower, Units, kept_units
from evoprune_ext.vllm.qwen_vl import (
    EvoPruneQwenVL,
    _attention_metadata,
    _block_then_prune,
    _mrope_positions,
    evoprune_options,
    split_positions,
)

__all__ = ["EvoPruneQwen3VLForConditionalGeneration", "EvoPruneQwen3VLMoeForConditionalGeneration",
           "EvoPruneQwen3VLMultiModalProcessor"]


def _cut_runs(replacement, token: int, units: int, kept: int):
    """`replacement` (token ids, or PromptUpdateDetails) with every run of `token`, one frame of `units`
    placeholders, cut to its first `kept`."""
    full = replacement.full if isinstance(replacement, PromptUpdateDetails) else replacement
    cut = []
    for is_token, run in itertools.groupby(full, key=lambda token_id: token_id == token):
        run = list(run)
        if is_token and len(run) != units:
            raise ValueError(f"a frame of {len(run)} placeholders, expected {units} (h/2 * w/2 of its grid)")
        cut += run[:kept] if is_token else run
    return replace(replacement, full=cut) if isinstance(replacement, PromptUpdateDetails) else cut


class EvoPruneQwen3VLMultiModalProcessor(Qwen3VLMultiModalProcessor):
    """One placeholder per merge unit the tower keeps, in every frame's block."""

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        config = self.info.get_hf_config()
        keep_ratio = evoprune_options(config)["keep_ratio"]
        tokens = {"image": config.image_token_id, "video": config.video_token_id}

        def kept(item_idx: int, modality: str, unpruned):
            _, h, w = out_mm_kwargs[modality][item_idx][f"{modality}_grid_thw"].data.tolist()
            units = (h // MERGE) * (w // MERGE)
            return _cut_runs(unpruned(item_idx), tokens[modality], units, kept_tokens(units, keep_ratio))

        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        return [replace(update, replacement=partial(kept, modality=update.modality, unpruned=update.replacement))
                for update in updates]


def _forward(self, x: Tensor, grid_thw, *, encoder_metadata=None) -> Tensor:
    """Qwen3_VisionTransformer.forward with pruning steps at the scheduled layers: the kept units' features and
    deepstack features side by side, in raster order of (item, t, h/2, w/2)."""
    if encoder_metadata is not None:
        raise NotImplementedError("EvoPrune's tower runs eagerly (no encoder CUDA graphs)")
    state = self._evoprune
    grid = [[int(v) for v in row] for row in grid_thw]
    frames = frame_units(grid)
    keeps = state.keeps(grid)
    metadata = self.prepare_encoder_metadata(grid)

    hidden = self.patch_embed(self.input_norm(x.to(device=self.device), self.dtype)) + metadata["pos_embeds"]
    hidden = hidden[:, None]  # [tokens, 1, D], as vLLM's blocks take it
    units = Units(
        ids=torch.arange(sum(frames), device=hidden.device),
        frames=frames,
        pools=state.pools(grid),
        sizes=hidden.new_ones(sum(frames), dtype=torch.float32),
        position_embeddings=(metadata["rotary_pos_emb_cos"], metadata["rotary_pos_emb_sin"]),
    )
    attention = dict(cu_seqlens=metadata["cu_seqlens"], max_seqlen=metadata["max_seqlen"],
                     sequence_lengths=metadata["sequence_lengths"])

    deepstack, deepstack_mergers = [], []  # hidden states after each deepstack layer so far, pruned as they go
    for layer_num, block in enumerate(self.blocks):
        if layer_num in keeps:
            hidden, units, deepstack = _block_then_prune(block, hidden, units, keeps[layer_num], state.alpha,
                                                         deepstack, **attention)
            attention = _attention_metadata(self, units.cu_seqlens())
        else:
            cos, sin = units.position_embeddings
            hidden = block(hidden, rotary_pos_emb_cos=cos, rotary_pos_emb_sin=sin, **attention)
        if layer_num in self.deepstack_visual_indexes:
            deepstack.append(hidden)
            deepstack_mergers.append(self.deepstack_merger_list[self.deepstack_visual_indexes.index(layer_num)])

    state.kept = kept_units(units, grid)
    return torch.cat([self.merger(hidden)] + [merger(rows) for merger, rows in zip(deepstack_mergers, deepstack)],
                     dim=1)


class PrunedVisionTower:
    """Mixed into vLLM's Qwen3_VisionTransformer."""

    forward = _forward


TOWER = PackedTower("Qwen3-VL", Qwen3_VisionTransformer, PrunedVisionTower, clip_refusal=PER_FRAME_PROMPT)


@MULTIMODAL_REGISTRY.register_processor(
    EvoPruneQwen3VLMultiModalProcessor, info=Qwen3VLProcessingInfo, dummy_inputs=Qwen3VLDummyInputsBuilder
)
class EvoPruneQwen3VLForConditionalGeneration(EvoPruneQwenVL, Qwen3VLForConditionalGeneration):
    """Qwen3-VL whose tower keeps `round(units * keep_ratio)` merge units of each frame (deepstack features too)."""

    def __init__(self, *, vllm_config, prefix: str = "model"):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        if self.video_pruning_method is not None or self.video_pruning_rate:
            raise ValueError("EvoPrune prunes in the tower: leave video_pruning_rate (EVS) unset, "
                             f"got video_pruning_rate={self.video_pruning_rate}")
        self._evoprune_patch(TOWER)

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features) -> tuple[Tensor, int]:
        """vLLM's positions, computed before the encoder, for frames of the pruned counts: each frame's first units
        stand in until `recompute_mrope_positions` puts the kept ones in; text resumes after the full frame."""
        keep_ratio = evoprune_options(self.config)["keep_ratio"]
        config = self.config
        frames = self._iter_mm_grid_hw(
            input_tokens, mm_features, video_token_id=config.video_token_id,
            vision_start_token_id=config.vision_start_token_id, vision_end_token_id=config.vision_end_token_id,
            spatial_merge_size=config.vision_config.spatial_merge_size,
        )
        blocks = []
        for (offset, h, w, count), feature in zip(frames, _frame_features(mm_features)):
            # vLLM counts a video frame's placeholders (an image's it takes from the grid).
            if feature.modality == "video" and count != kept_tokens(h * w, keep_ratio):
                raise ValueError(f"input_tokens: a video frame of {count} placeholders, but the tower keeps "
                                 f"{kept_tokens(h * w, keep_ratio)} of its {h * w} units (keep_ratio={keep_ratio})")
            blocks.append((offset, 1, h, w, 1.0))
        return _mrope_positions(len(input_tokens), blocks, keep_ratio)

    def recompute_mrope_positions(self, input_ids, multimodal_embeddings, mrope_positions: Tensor,
                                  num_computed_tokens: int) -> tuple[list[Tensor], Tensor, int]:
        """Strip the position channels of the embeddings the runner gathered for this step (slices of each item's
        kept units, in prompt order from `num_computed_tokens` on) and put those units at their positions: one
        after the token before their block (a vision start, whose position is final), plus their (0, h, w)."""
        split = [split_positions(rows) for rows in multimodal_embeddings]
        embeds = [features for features, _ in split]
        relative = [units[:, :-1] for _, units in split]
        count = sum(len(rows) for rows in relative)
        positions = mrope_positions.clone()
        if count:
            ids = torch.as_tensor(input_ids, dtype=torch.long).cpu()
            visual = (ids == self.config.image_token_id) | (ids == self.config.video_token_id)
            previous = torch.cat([ids.new_full((1,), -1), ids[:-1]])
            starts = visual & (ids != previous)
            block_start = torch.where(starts, torch.arange(len(ids)), 0).cummax(0).values
            targets = visual.nonzero()[:, 0]
            targets = targets[targets >= num_computed_tokens][:count]
            if len(targets) != count:
                raise ValueError(f"input_ids: {len(targets)} placeholders from token {num_computed_tokens} on, "
                                 f"but {count} kept units to place")
            before = (block_start[targets] - 1).to(positions.device)
            base = torch.where(before >= 0, positions[0, before.clamp(min=0)] + 1, 0)
            positions[:, targets.to(positions.device)] = (
                torch.cat(relative).to(positions.device, torch.long).T + base
            )
        return embeds, positions, int(positions.max() + 1 - len(input_ids))

    def _process_image_input(self, image_input) -> tuple[Tensor, ...]:
        # Each frame is positioned as an image (t = 0): a scale of 0 on t gives positions relative to the frame.
        return self._evoprune_embeds("image", image_input, [0.0] * len(image_input["image_grid_thw"]))

    def _process_video_input(self, video_input) -> tuple[Tensor, ...]:
        return self._evoprune_embeds("video", video_input, [0.0] * len(video_input["video_grid_thw"]))


@MULTIMODAL_REGISTRY.register_processor(
    EvoPruneQwen3VLMultiModalProcessor, info=Qwen3VLMoeProcessingInfo, dummy_inputs=Qwen3VLDummyInputsBuilder
)
class EvoPruneQwen3VLMoeForConditionalGeneration(EvoPruneQwen3VLForConditionalGeneration,
                                                 Qwen3VLMoeForConditionalGeneration):
    """Qwen3-VL-MoE: vLLM's subclass builds a mixture-of-experts LM around the same tower and the same
    processing, so EvoPrune's Qwen3-VL pieces apply as they are (the MRO runs vLLM's MoE __init__)."""


def _frame_features(mm_features):
    """The feature of each visual block, in the order `_iter_mm_grid_hw` yields them (one per frame)."""
    for feature in sorted(mm_features, key=lambda feature: feature.mm_position.offset):
        frames = feature.data["video_grid_thw"].data[0] if feature.modality == "video" else 1
        yield from itertools.repeat(feature, int(frames))
