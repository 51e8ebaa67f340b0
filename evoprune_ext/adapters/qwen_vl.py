"""The language side of a pruned Qwen-VL tower (Qwen2.5-VL, Qwen3-VL): placeholder counts and M-RoPE positions.

The tower keeps `round(units * keep_ratio)` 2x2 merge units of every frame (`qwen2_5_vl.py`, `qwen3_vl.py`), or
under the clip budget (Qwen2.5-VL) `round(t * units * keep_ratio)` of a video's t frames together, so:
- the processor emits `round(h/2 * w/2 * keep_ratio)` placeholders per frame of an image or video of grid
  (t, h, w), or `round(t * h/2 * w/2 * keep_ratio)` per video under the clip budget, from the grid alone
  (static), and its count helper `_get_num_multimodal_tokens` agrees (`schedule.item_units`);
- the model splits the tower's output by the kept counts, and gives each kept unit the M-RoPE position
  (t, h, w) it had in the full grid: transformers computes the full grid's positions as it always does, and the
  positions of the units the tower dropped are left out. Text after a visual block continues where the model's
  own convention says (after the full grid), so the text positions do not depend on what was pruned.
- `generate()` computes the positions before the tower has chosen its units (transformers'
  `_prepare_position_ids_for_generation`): the model then runs the tower first and recomputes the visual rows of
  the positions from the kept units, before the language model sees them.

What Qwen3-VL changes (`PrunedQwen3Model`): its processor writes each video frame as a block of its own, after a
timestamp and between `<|vision_start|>` / `<|vision_end|>`, and `get_rope_index` positions each frame as an
image of t=1; its tower also returns deepstack features, split by the same kept counts (the tower pruned them
exactly like the main features, so they line up with the kept units' placeholders).
"""

import itertools
import math
import re

import torch
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl, processing_qwen2_5_vl
from transformers.models.qwen3_vl import modeling_qwen3_vl, processing_qwen3_vl

from evoprune_ext.adapters.family import Family
from evoprune_ext.schedule import frame_split, item_units, kept_tokens


class PrunedQwenProcessor:
    """Mixed into Qwen2_5_VLProcessor / Qwen3VLProcessor: one placeholder per kept merge unit."""

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        text = super().replace_image_token(image_inputs, image_idx, **kwargs)
        grid = image_inputs["image_grid_thw"][image_idx].tolist()
        return self._evoprune_shrink(text, self.image_token, grid, self.image_processor.merge_size)

    def replace_video_token(self, video_inputs: dict, video_idx: int, **kwargs) -> str:
        text = super().replace_video_token(video_inputs, video_idx, **kwargs)
        grid = video_inputs["video_grid_thw"][video_idx].tolist()
        return self._evoprune_shrink(text, self.video_token, grid, self.video_processor.merge_size)

    def _get_num_multimodal_tokens(self, image_sizes=None, video_sizes=None, **kwargs):
        data = super()._get_num_multimodal_tokens(image_sizes=image_sizes, video_sizes=video_sizes, **kwargs)
        if image_sizes is not None:  # an image is one frame
            data.num_image_tokens = [kept_tokens(units, self._evoprune.keep_ratio) for units in data.num_image_tokens]
        if video_sizes is not None:
            temporal = self.video_processor.temporal_patch_size
            frames = [math.ceil(size[0] / temporal) for size in video_sizes]
            state = self._evoprune
            data.num_video_tokens = [item_units(t, n // t, state.keep_ratio, state.budget)
                                     for n, t in zip(data.num_video_tokens, frames)]
        return data

    def _evoprune_shrink(self, text: str, token: str, grid: list[int], merge: int) -> str:
        """The processor's own expansion `text` with every run of `token` cut to the kept units of its frames:
        Qwen2.5-VL writes one run of t frames per image or video, Qwen3-VL one run per frame (its timestamps and
        vision start / end tokens stay as they are). Under the clip budget Qwen3-VL's frames hold the even split
        of the video's units (`schedule.frame_split`) until the model has run the tower (`PrunedQwen3Model`)."""
        _, h, w = grid
        units = (h // merge) * (w // merge)
        state = self._evoprune
        run = re.compile(f"(?:{re.escape(token)})+")
        frames = [len(found) // len(token) // units for found in run.findall(text)]
        if state.budget == "clip":
            counts = frame_split(kept_tokens(sum(frames) * units, state.keep_ratio), len(frames))
        else:
            counts = [item_units(t, units, state.keep_ratio, state.budget) for t in frames]
        counts = iter(counts)
        return run.sub(lambda found: token * next(counts), text)


VISUAL_TYPES = {1: "image", 2: "video"}  # mm_token_type_ids values


class PrunedQwenModel:
    """Mixed into Qwen2_5_VLModel (and, through PrunedQwen3Model, Qwen3VLModel): splits the tower's output by the
    kept counts and places each kept unit at its original M-RoPE position."""

    def get_image_features(self, pixel_values, image_grid_thw=None, **kwargs):
        return self._evoprune_features("image", pixel_values, image_grid_thw, **kwargs)

    def get_video_features(self, pixel_values_videos, video_grid_thw=None, **kwargs):
        return self._evoprune_features("video", pixel_values_videos, video_grid_thw, **kwargs)

    def _evoprune_features(self, modality: str, pixels, grid_thw, **kwargs):
        outputs = self.visual(pixels.type(self.visual.dtype), grid_thw=grid_thw, **kwargs)
        kept = list(self.visual.evoprune_state.kept)
        # modality -> (grid_thw, kept units per image / video), until the forward pass that uses them ends
        # (generate() encodes before its forward pass, and does not pass the grids to it).
        records = vars(self).setdefault("_evoprune_kept", {})
        records[modality] = (grid_thw, kept)
        # The model's record: images, then videos (the order the model runs the tower in), each in input order.
        self._evoprune.kept = [units for name in VISUAL_TYPES.values() if name in records for units in records[name][1]]
        outputs.pooler_output = torch.split(outputs.pooler_output, [len(units) for units in kept])
        return outputs

    def forward(self, input_ids=None, position_ids=None, **kwargs):
        try:
            return self._evoprune_forward(input_ids, position_ids, **kwargs)
        finally:
            # A later pass that positions its tokens before its tower runs must not see these.
            vars(self).pop("_evoprune_kept", None)

    def _evoprune_forward(self, input_ids, position_ids, **kwargs):
        encoded = dict(kwargs.pop("mm_encoder_outputs", None) or {})
        if kwargs.get("pixel_values") is not None:
            encoded["image"] = self.get_image_features(kwargs.pop("pixel_values"), kwargs.get("image_grid_thw"))
        if kwargs.get("pixel_values_videos") is not None:
            encoded["video"] = self.get_video_features(kwargs.pop("pixel_values_videos"), kwargs.get("video_grid_thw"))
        input_ids = self._evoprune_layout(input_ids, kwargs)
        if position_ids is not None and encoded:
            # generate() computes positions before the tower runs (placeholders, see _evoprune_visual_groups):
            # now that it has, the visual rows are recomputed from the kept units.
            grids = {modality: grid for modality, (grid, _) in vars(self).get("_evoprune_kept", {}).items()}
            vision_rows, self.rope_deltas = self.get_rope_index(
                input_ids,
                mm_token_type_ids=kwargs.get("mm_token_type_ids"),
                image_grid_thw=grids.get("image", kwargs.get("image_grid_thw")),
                video_grid_thw=grids.get("video", kwargs.get("video_grid_thw")),
                second_per_grid_ts=kwargs.get("second_per_grid_ts"),
                attention_mask=kwargs.get("attention_mask"),
            )
            position_ids = torch.cat([position_ids[:-3], vision_rows.to(position_ids)], dim=0)
        return super().forward(input_ids=input_ids, position_ids=position_ids, mm_encoder_outputs=encoded, **kwargs)

    def _evoprune_layout(self, input_ids, kwargs: dict):
        """The prompt the language model reads, once the tower has run: the processor's (Qwen2.5-VL)."""
        return input_ids

    def get_rope_index(self, input_ids, mm_token_type_ids, image_grid_thw=None, video_grid_thw=None,
                       second_per_grid_ts=None, attention_mask=None, **kwargs):
        self._evoprune_selections = iter(self._evoprune_visual_groups(input_ids, mm_token_type_ids, attention_mask))
        try:
            return super().get_rope_index(
                input_ids, mm_token_type_ids, image_grid_thw=image_grid_thw, video_grid_thw=video_grid_thw,
                second_per_grid_ts=second_per_grid_ts, attention_mask=attention_mask, **kwargs,
            )
        finally:
            del self._evoprune_selections

    def get_vision_position_ids(self, start_position, grid_thw, *args, **kwargs):
        positions = super().get_vision_position_ids(start_position, grid_thw, *args, **kwargs)
        return positions[:, next(self._evoprune_selections).to(positions.device)]

    def _evoprune_visual_groups(self, input_ids, mm_token_type_ids, attention_mask) -> list[torch.Tensor]:
        """The units kept of each visual block, in the order get_rope_index meets them (batch rows, then blocks):
        the tower's kept indices once it has run; before (generate's first position pass), the first units of the
        block, as placeholders of the right count."""
        found = vars(self).get("_evoprune_kept", {})
        kept = {code: iter(self._evoprune_blocks(*found[modality]) if modality in found else [])
                for code, modality in VISUAL_TYPES.items()}
        groups = []
        for row, types in enumerate(mm_token_type_ids):
            if attention_mask is not None:
                types = types[attention_mask[row].bool()]
            for modality, block in itertools.groupby(types.tolist()):
                if modality == 0:
                    continue
                count = len(list(block))
                units = next(kept[modality], None)
                if units is not None and len(units) != count:
                    raise ValueError(
                        f"input_ids: a visual block of {count} placeholders, but the tower kept {len(units)} units "
                        "for it; was the processor patched with the model (evoprune_ext.patch(..., processor=...))?"
                    )
                groups.append(torch.arange(count) if units is None else units)
        return groups

    def _evoprune_blocks(self, grid_thw, kept: list[torch.Tensor]) -> list[torch.Tensor]:
        """The kept units of each visual block of one modality: one block per image or video."""
        return kept


class PrunedQwen3Model(PrunedQwenModel):
    """Mixed into Qwen3VLModel: the deepstack features are split like the main ones, and every video frame is a
    visual block of its own. Under the clip budget a frame holds what the tower kept of it, possibly nothing: the
    model moves the processor's stand-in counts to the frames the tower kept units in (`_evoprune_layout`), and a
    frame left empty still takes its full extent of positions, so that no text position depends on the pruning."""

    def _evoprune_features(self, modality: str, pixels, grid_thw, **kwargs):
        outputs = super()._evoprune_features(modality, pixels, grid_thw, **kwargs)
        counts = [len(features) for features in outputs.pooler_output]
        outputs.deepstack_features = [torch.split(features, counts) for features in outputs.deepstack_features]
        return outputs

    def _evoprune_blocks(self, grid_thw, kept: list[torch.Tensor]) -> list[torch.Tensor]:
        """One block per frame that kept units (timestamps separate them; an image is one frame), holding the
        frame's kept units as indices into the frame, which is how get_rope_index positions it (t=1)."""
        merge = self.config.vision_config.spatial_merge_size
        blocks = []
        for (frames, h, w), units in zip(grid_thw.tolist(), kept):
            per_frame = (h // merge) * (w // merge)
            blocks += [units[units // per_frame == frame] - frame * per_frame for frame in range(frames)]
        return [block for block in blocks if len(block)]

    def _evoprune_frame_blocks(self, input_ids, frames: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per row of `input_ids`: where each video frame's block starts and ends (its <|vision_start|> and
        <|vision_end|>), in order; `frames` blocks in all, the videos' frames. A frame block is a start followed by a
        video placeholder or, empty, by the end at once (an image always keeps units)."""
        config = self.config
        blocks = []
        for row in input_ids:
            following = torch.cat([row[1:], row.new_full((1,), -1)])
            starts = ((row == config.vision_start_token_id)
                      & ((following == config.video_token_id) | (following == config.vision_end_token_id)))
            starts = starts.nonzero()[:, 0]
            closes = (row == config.vision_end_token_id).nonzero()[:, 0]
            blocks.append((starts, closes[torch.searchsorted(closes, starts)]))
        found = sum(len(starts) for starts, _ in blocks)
        if found != frames:
            raise ValueError(f"input_ids: {found} video frame blocks (<|vision_start|>, placeholders, "
                             f"<|vision_end|>), but video_grid_thw has {frames} frames")
        return blocks

    def _evoprune_layout(self, input_ids, kwargs: dict):
        """Under the clip budget, once the tower has run: `input_ids` with every video frame's block holding as many
        placeholders as the tower kept units of that frame. The timestamps and start / end tokens move with them;
        the video's span keeps its length, and nothing outside it changes. kwargs' mm_token_type_ids follow."""
        found = vars(self).get("_evoprune_kept", {})
        if self._evoprune.budget != "clip" or "video" not in found or input_ids is None:
            return input_ids
        grid, kept = found["video"]
        merge = self.config.vision_config.spatial_merge_size
        counts = torch.cat([torch.bincount(units // ((h // merge) * (w // merge)), minlength=t)
                            for (t, h, w), units in zip(grid.tolist(), kept)]).tolist()
        blocks = self._evoprune_frame_blocks(input_ids, len(counts))
        counts, rows = iter(counts), []
        for row, (starts, ends) in zip(input_ids, blocks):
            pieces, previous, kept_here = [], 0, 0
            for start, end in zip(starts.tolist(), ends.tolist()):
                count = next(counts)
                pieces += [row[previous : start + 1], row.new_full((count,), self.config.video_token_id)]
                previous, kept_here = end, kept_here + count
            written = int((row == self.config.video_token_id).sum())
            if written != kept_here:
                raise ValueError(
                    f"input_ids: a row's videos hold {written} placeholders, but the tower kept {kept_here} units of "
                    "them; was the processor patched with the model (evoprune_ext.patch(..., processor=...))?"
                )
            rows.append(torch.cat([*pieces, row[previous:]]))
        relaid = torch.stack(rows)
        types = kwargs.get("mm_token_type_ids")
        if types is not None:
            types = torch.zeros_like(types)
            types[relaid == self.config.image_token_id] = 1
            types[relaid == self.config.video_token_id] = 2
            kwargs["mm_token_type_ids"] = types
        return relaid

    def get_rope_index(self, input_ids, mm_token_type_ids, image_grid_thw=None, video_grid_thw=None,
                       attention_mask=None, **kwargs):
        """transformers' positions, except that under the clip budget a video frame left without units still takes
        its full extent (max(h, w) of its merged grid), as it does unpruned: the text after it keeps its position."""
        if self._evoprune.budget != "clip" or video_grid_thw is None:
            return super().get_rope_index(input_ids, mm_token_type_ids, image_grid_thw=image_grid_thw,
                                          video_grid_thw=video_grid_thw, attention_mask=attention_mask, **kwargs)
        merge = self.config.vision_config.spatial_merge_size
        frames = torch.repeat_interleave(video_grid_thw, video_grid_thw[:, 0], dim=0).tolist()
        blocks = self._evoprune_frame_blocks(input_ids, len(frames))
        frames = iter(frames)
        jumps = torch.zeros(input_ids.shape, dtype=torch.long)  # the extent of an empty frame, at its end token
        filled = []  # the grids of the frames that kept units, as get_rope_index meets them
        for row, (starts, ends) in enumerate(blocks):
            for start, end in zip(starts.tolist(), ends.tolist()):
                _, h, w = next(frames)
                if end == start + 1:
                    jumps[row, end] = max(h, w) // merge
                else:
                    filled.append([1, h, w])
        positions, deltas = super().get_rope_index(
            input_ids, mm_token_type_ids, image_grid_thw=image_grid_thw,
            video_grid_thw=video_grid_thw.new_tensor(filled).view(-1, 3), attention_mask=attention_mask, **kwargs,
        )
        shift = jumps.cumsum(1)
        if attention_mask is not None:
            shift = shift * attention_mask.bool().cpu()
        return positions + shift.to(positions), deltas + jumps.sum(1, keepdim=True).to(deltas)


QWEN2_5_VL = Family(
    name="Qwen2.5-VL",
    model=modeling_qwen2_5_vl.Qwen2_5_VLModel,
    processor=processing_qwen2_5_vl.Qwen2_5_VLProcessor,
    processor_mixin=PrunedQwenProcessor,
    model_mixin=PrunedQwenModel,
)

QWEN3_VL = Family(
    name="Qwen3-VL",
    model=modeling_qwen3_vl.Qwen3VLModel,
    processor=processing_qwen3_vl.Qwen3VLProcessor,
    processor_mixin=PrunedQwenProcessor,
    model_mixin=PrunedQwen3Model,
)
