"""EvoPrune inside vLLM's Qwen3-VL (`vllm/model_executor/models/qwen3_vl.py`), selected by
`hf_overrides={"architectures": ["EvoPruneQwen3VLForConditionalGeneration"], "evoprune": {"keep_ratio": 0.25}}`
("evoprune" may also name "layers", "alpha" and "budget", as `evoprune_ext.patch` does).

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
  depend on what was pruned, so only the kept units' rows are rewritten, each from its block's start;
- the clip budget (one pool per video, docs/ALGORITHM.md "Clip budget"): the prompt fixes every frame's count
  before the tower has chosen, so, as vLLM's EVS does, the whole replacement of a video (timestamps, vision start /
  end tokens, placeholders) is its embedding. The prompt holds the even split of the video's kept units
  (`schedule.frame_split`); after the tower the model writes the span itself (`_clip_span`): each frame's block
  holds the units kept of that frame (possibly none), the text between them moves along, and every row carries its
  position, so that `recompute_mrope_positions` places text and units alike (`_place_spans`).
"""

import itertools
from dataclasses import replace
from functools import partial

import torch
from torch import Tensor, nn
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

from evoprune_ext.schedule import MERGE, frame_split, frame_units, kept_tokens
from evoprune_ext.towers.packed import PackedTower, Units, kept_units
from evoprune_ext.vllm.qwen_vl import (
    EvoPruneQwenVL,
    _attention_metadata,
    _block_then_prune,
    _mrope_positions,
    encode_positions,
    evoprune_options,
    split_positions,
)

__all__ = ["EvoPruneQwen3VLForConditionalGeneration", "EvoPruneQwen3VLMoeForConditionalGeneration",
           "EvoPruneQwen3VLMultiModalProcessor"]


def _cut_runs(replacement, token: int, units: int, counts: list[int]):
    """`replacement` (token ids, or PromptUpdateDetails) with its runs of `token`, each one frame of `units`
    placeholders, cut to their first `counts[i]`."""
    full = replacement.full if isinstance(replacement, PromptUpdateDetails) else replacement
    cut, counts = [], iter(counts)
    for is_token, run in itertools.groupby(full, key=lambda token_id: token_id == token):
        run = list(run)
        if is_token and len(run) != units:
            raise ValueError(f"a frame of {len(run)} placeholders, expected {units} (h/2 * w/2 of its grid)")
        cut += run[: next(counts)] if is_token else run
    return replace(replacement, full=cut) if isinstance(replacement, PromptUpdateDetails) else cut


class EvoPruneQwen3VLMultiModalProcessor(Qwen3VLMultiModalProcessor):
    """One placeholder per merge unit the tower keeps, in every frame's block; under the clip budget the even
    split of the video's units over its frames, and the whole replacement is the video's embedding."""

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        config = self.info.get_hf_config()
        options = evoprune_options(config)
        keep_ratio, clip = options["keep_ratio"], options["budget"] == "clip"
        tokens = {"image": config.image_token_id, "video": config.video_token_id}
        if clip and not self._expands_only_video_token(self.info.get_hf_processor(**hf_processor_mm_kwargs)):
            # recompute_mrope_positions finds a video's span after the prompt's own <|vision_start|>.
            raise ValueError("budget='clip' needs a Qwen3-VL processor that expands the bare <|video_pad|> "
                             "(transformers >= 5.10)")

        def kept(item_idx: int, modality: str, unpruned):
            t, h, w = out_mm_kwargs[modality][item_idx][f"{modality}_grid_thw"].data.tolist()
            units = (h // MERGE) * (w // MERGE)
            if clip and modality == "video":
                split = frame_split(kept_tokens(t * units, keep_ratio), t)
                # Every token of the span is embedded: the model writes timestamps and frames after the tower.
                return PromptUpdateDetails.from_seq(_cut_runs(unpruned(item_idx), tokens[modality], units, split).full)
            return _cut_runs(unpruned(item_idx), tokens[modality], units, [kept_tokens(units, keep_ratio)] * t)

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


TOWER = PackedTower("Qwen3-VL", Qwen3_VisionTransformer, PrunedVisionTower)


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
        stand in until `recompute_mrope_positions` puts the kept ones in; text resumes after the full frame.
        Under the clip budget the frames hold the even split, and the whole span is recomputed."""
        config = self.config
        frames = self._iter_mm_grid_hw(
            input_tokens, mm_features, video_token_id=config.video_token_id,
            vision_start_token_id=config.vision_start_token_id, vision_end_token_id=config.vision_end_token_id,
            spatial_merge_size=config.vision_config.spatial_merge_size,
        )
        blocks, counts = [], []
        for (offset, h, w, count), (feature, expected) in zip(frames, _frame_counts(mm_features, config)):
            # vLLM counts a video frame's placeholders (an image's it takes from the grid).
            if feature.modality == "video" and count != expected:
                raise ValueError(f"input_tokens: a video frame of {count} placeholders, but the prompt should hold "
                                 f"{expected} of its {h * w} units ({evoprune_options(config)})")
            blocks.append((offset, 1, h, w, 1.0))
            counts.append(expected)
        return _mrope_positions(len(input_tokens), blocks, 1.0, "frame", counts)  # blocks of one frame, counted

    def recompute_mrope_positions(self, input_ids, multimodal_embeddings, mrope_positions: Tensor,
                                  num_computed_tokens: int) -> tuple[list[Tensor], Tensor, int]:
        """Strip the position channels of the embeddings the runner gathered for this step (slices of each item's
        kept units, in prompt order from `num_computed_tokens` on) and put those units at their positions: one
        after the token before their block (a vision start, whose position is final), plus their (0, h, w).
        Under the clip budget the rows are those of whole spans, text rows too (`_place_spans`)."""
        split = [split_positions(rows) for rows in multimodal_embeddings]
        embeds = [features for features, _ in split]
        if evoprune_options(self.config)["budget"] == "clip":
            positions = _place_spans(input_ids, [values for _, values in split], mrope_positions,
                                     num_computed_tokens, self.config)
            return embeds, positions, int(positions.max() + 1 - len(input_ids))
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
        items = self._evoprune_embeds("image", image_input, [0.0] * len(image_input["image_grid_thw"]))
        if evoprune_options(self.config)["budget"] == "clip":  # an image's span is its units: index them
            return tuple(_index_rows(*split_positions(rows)) for rows in items)
        return items

    def _process_video_input(self, video_input) -> tuple[Tensor, ...]:
        grid = video_input["video_grid_thw"].tolist()
        if evoprune_options(self.config)["budget"] != "clip":
            return self._evoprune_embeds("video", video_input, [0.0] * len(grid))
        # A scale of 1 on t: each kept unit's position says its frame.
        items = self._evoprune_embeds("video", video_input, [1.0] * len(grid))
        return tuple(self._clip_span(rows, size, timestamps)
                     for rows, size, timestamps in zip(items, grid, video_input["timestamps"]))

    def _clip_span(self, rows: Tensor, grid: list[int], timestamps) -> Tensor:
        """Under the clip budget: the embedding of a video's whole replacement, from the rows of its kept units
        (features, then their (frame, h, w) as position channels). Each frame's block holds the units kept of it
        (vLLM's `get_video_repl` writes the tokens), the text rows hold the tokens' embeddings and no deepstack
        feature (as vLLM's buffers hold none there), and every row its position within the span and its index
        (`_span_positions`): the span keeps the length of the prompt's, whose frames held the even split."""
        features, units = split_positions(rows)
        t, h, w = grid
        config = self.config
        tokens = torch.tensor(Qwen3VLMultiModalProcessor.get_video_repl(
            tokens_per_frame=torch.bincount(units[:, 0], minlength=t).tolist(), timestamps=timestamps,
            tokenizer=self._tokenizer, vision_start_token_id=config.vision_start_token_id,
            vision_end_token_id=config.vision_end_token_id, video_token_id=config.video_token_id,
        ).full)
        is_unit = tokens == config.video_token_id
        text = self.get_language_model().embed_input_ids(tokens.to(features.device))
        span = nn.functional.pad(text.to(features.dtype), (0, features.shape[1] - text.shape[1]))
        span[is_unit.to(features.device)] = features
        values = _span_positions(tokens, units[:, 1:3], max(h, w) // MERGE, config)
        return torch.cat([span, encode_positions(values, span.dtype).to(span.device)], dim=1)


@MULTIMODAL_REGISTRY.register_processor(
    EvoPruneQwen3VLMultiModalProcessor, info=Qwen3VLMoeProcessingInfo, dummy_inputs=Qwen3VLDummyInputsBuilder
)
class EvoPruneQwen3VLMoeForConditionalGeneration(EvoPruneQwen3VLForConditionalGeneration,
                                                 Qwen3VLMoeForConditionalGeneration):
    """Qwen3-VL-MoE: vLLM's subclass builds a mixture-of-experts LM around the same tower and the same
    processing, so EvoPrune's Qwen3-VL pieces apply as they are (the MRO runs vLLM's MoE __init__)."""


def _frame_counts(mm_features, config):
    """(feature, placeholders the prompt holds) of each visual block, in the order `_iter_mm_grid_hw` yields them
    (one per frame): the kept count of each frame, or under the clip budget the even split of the video's."""
    options = evoprune_options(config)
    for feature in sorted(mm_features, key=lambda feature: feature.mm_position.offset):
        t, h, w = feature.data[f"{feature.modality}_grid_thw"].data.tolist()
        units = (h // MERGE) * (w // MERGE)
        if options["budget"] == "clip" and feature.modality == "video":
            counts = frame_split(kept_tokens(t * units, options["keep_ratio"]), t)
        else:
            counts = [kept_tokens(units, options["keep_ratio"])] * t
        yield from zip(itertools.repeat(feature), counts)


def _index_rows(features: Tensor, values: Tensor) -> Tensor:
    """An image's kept units under the clip budget: (0, h, w) from its block's start, and their index in it."""
    values = torch.cat([values[:, :3], torch.arange(len(values), device=values.device)[:, None]], dim=1)
    return torch.cat([features, encode_positions(values, features.dtype).to(features.device)], dim=1)


def _span_positions(tokens: Tensor, units: Tensor, extent: int, config) -> Tensor:
    """[span, 4]: the M-RoPE (t, h, w) of each token of a video's span, counted from one after the token before
    the span, and its index in the span. `units`: the (h, w) of the span's placeholders in order, `extent`: the
    frames' max(h/2, w/2). As vLLM positions unpruned frames: text tokens one after another, each frame's block
    from one after its vision start, a unit at (0, h, w) from there, and the vision end `extent` after the block's
    start however few units the frame kept, so text positions never depend on the pruning."""
    is_unit = tokens == config.video_token_id
    # A text token's position; a unit's is that of its frame's vision start (the last text token before it).
    before = (~is_unit).cumsum(0) - 1 + extent * (tokens == config.vision_end_token_id).cumsum(0)
    positions = before[:, None].repeat(1, 3)
    positions[is_unit] += 1 + nn.functional.pad(units.to(positions), (1, 0))
    return torch.cat([positions, torch.arange(len(tokens))[:, None]], dim=1)


def _place_spans(input_ids, values: list[Tensor], mrope_positions: Tensor, num_computed_tokens: int,
                 config) -> Tensor:
    """Under the clip budget: every gathered row (slices of each item's span, in prompt order from
    `num_computed_tokens` on) carries its position from one after the token before its span, and its index in the
    span. A slice that starts inside its span (begun in an earlier step) starts at `num_computed_tokens`; one that
    starts its span is found in the prompt (`_span_start`). The token before a span is text (the prompt's own
    <|vision_start|>, as a rule), so its position is final."""
    positions = mrope_positions.clone()
    ids = torch.as_tensor(input_ids, dtype=torch.long).cpu()
    cursor = num_computed_tokens
    for rows in values:
        if not len(rows):
            continue
        first = int(rows[0, 3])
        start = num_computed_tokens - first if first else _span_start(ids, cursor, config)
        targets = torch.arange(start + first, start + first + len(rows))
        base = positions[:, start - 1].max() + 1 if start else 0
        positions[:, targets.to(positions.device)] = rows[:, :3].to(positions.device).T + base
        cursor = int(targets[-1]) + 1
    return positions


def _span_start(ids: Tensor, cursor: int, config) -> int:
    """Where the next item's span starts at or after `cursor`: an image's at its first placeholder; a video's after
    the prompt's own <|vision_start|>, the one before its first frame's (which its first placeholder follows: the
    even split gives the first frame at least one)."""
    placeholders = ((ids == config.image_token_id) | (ids == config.video_token_id)).nonzero()[:, 0]
    placeholder = int(placeholders[placeholders >= cursor][0])
    if ids[placeholder] == config.image_token_id:
        return placeholder
    starts = (ids[: placeholder - 1] == config.vision_start_token_id).nonzero()[:, 0]
    return int(starts[-1]) + 1
