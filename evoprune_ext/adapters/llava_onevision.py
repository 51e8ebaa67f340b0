"""LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`, SigLIP tower): every crop of an image and every
frame of a video leaves the tower with `k = round(patches * keep_ratio)` tokens, which the model packs and the
processor counts as follows (docs/ALGORITHM.md, "LLaVA-OneVision"):

- video: EvoPrune replaces the fixed 2x2 bilinear pooling: `frames * k` tokens, then the video's newline; under
  the clip budget the frames are one pool: `round(frames * patches * keep_ratio)` tokens, then the newline;
- one image (anyres): the base crop's `k` tokens, then each row of grid crops (the crops of the row one after the
  other, each in its own raster order) followed by one newline. The grid is neither unpadded nor downsampled: the
  count depends only on the image size, and EvoPrune merges the uniform padding into very few tokens anyway;
- several images per prompt (no anyres): `k` tokens and a newline each.

Only a pruning patch (keep_ratio < 1) installs these; at keep_ratio = 1 the model and processor run unchanged.
"""

import torch
from transformers.image_processing_utils import select_best_resolution
from transformers.models.llava_onevision import modeling_llava_onevision, processing_llava_onevision

from evoprune_ext.adapters.family import Family
from evoprune_ext.adapters.llava import check_feature_layers
from evoprune_ext.schedule import kept_tokens


class PrunedOnevisionModel:
    """Mixed into LlavaOnevisionModel: packs pruned crops without their lost grid, and keeps frames unpooled."""

    def pack_image_features(self, image_features, image_sizes, image_newline=None, vision_aspect_ratio=None):
        packed = []
        for features, image_size in zip(image_features, image_sizes):
            base, grid = features[0], features[1:]
            if len(grid):
                rows, columns = modeling_llava_onevision.get_anyres_image_grid_shape(
                    image_size, self.config.image_grid_pinpoints, self.config.vision_config.image_size
                )
                grid = grid.reshape(rows, columns * grid.shape[1], grid.shape[2])
            else:
                grid = grid.reshape(1, 0, base.shape[-1])  # one image among several: its newline follows it
            if image_newline is not None:
                newline = image_newline.to(grid.device, grid.dtype).expand(grid.shape[0], 1, -1)
                grid = torch.cat((grid, newline), dim=1)
            packed.append(torch.cat((base, grid.flatten(0, 1)), dim=0))
        lengths = torch.tensor([len(f) for f in packed], dtype=torch.long, device=image_features[0].device)
        return packed, lengths

    def apply_pooling(self, image_features):
        return image_features

    def get_video_features(self, pixel_values_videos, vision_feature_layer=None, vision_feature_select_strategy=None,
                           **kwargs):
        state = self._evoprune
        if state.budget != "clip":
            return super().get_video_features(pixel_values_videos, vision_feature_layer=vision_feature_layer,
                                              vision_feature_select_strategy=vision_feature_select_strategy, **kwargs)
        # The tower returns one row of kept tokens per video, which the unpruned method would cut into frames.
        layer = self.config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
        strategy = vision_feature_select_strategy or self.config.vision_feature_select_strategy
        if strategy != "full":
            raise ValueError(f"budget='clip' needs vision_feature_select_strategy='full' (SigLIP has no CLS to "
                             f"drop), got {strategy!r}")
        videos, frames = pixel_values_videos.shape[:2]
        with state.clips(frames):
            outputs = self.vision_tower(pixel_values_videos.flatten(0, 1),
                                        **{**kwargs, "output_hidden_states": True, "return_dict": True})
        layers = [layer] if isinstance(layer, int) else layer
        features = self.multi_modal_projector(torch.cat([outputs.hidden_states[i] for i in layers], dim=-1))
        newline = self.image_newline[None, None, :].expand(videos, 1, -1).to(features)
        outputs.pooler_output = torch.cat((features, newline), dim=1)
        return outputs


class PrunedOnevisionProcessor:
    """Mixed into LlavaOnevisionProcessor: counts the placeholders of `PrunedOnevisionModel`'s packing."""

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        images_per_prompt = [int(n) for n in image_inputs["batch_num_images"] for _ in range(int(n))]
        if images_per_prompt[image_idx] == 1:
            return super().replace_image_token(image_inputs, image_idx, **kwargs)  # -> _get_number_of_features
        count = self._evoprune_tokens_per_crop() + 1
        return self.image_token * (count - (self.vision_feature_select_strategy == "default"))

    def replace_video_token(self, video_inputs: dict, video_idx: int, **kwargs) -> str:
        return self.video_token * self._evoprune_video_tokens(len(video_inputs["pixel_values_videos"][video_idx]))

    def _get_number_of_features(self, orig_height: int, orig_width: int, height: int, width: int) -> int:
        pinpoints = self.image_processor.image_grid_pinpoints
        best_height, best_width = select_best_resolution([orig_height, orig_width], pinpoints)
        rows, columns = best_height // height, best_width // width
        return self._evoprune_tokens_per_crop() * (1 + rows * columns) + rows

    def _get_num_multimodal_tokens(self, image_sizes=None, video_sizes=None, **kwargs):
        data = super()._get_num_multimodal_tokens(image_sizes=image_sizes, video_sizes=video_sizes, **kwargs)
        if video_sizes is not None:
            data.num_video_tokens = [self._evoprune_video_tokens(frames) for frames, _, _ in video_sizes]
        return data

    def _evoprune_tokens_per_crop(self) -> int:
        return kept_tokens(self.num_image_tokens, self._evoprune.keep_ratio)

    def _evoprune_video_tokens(self, frames: int) -> int:
        state = self._evoprune
        if state.budget == "clip":
            return kept_tokens(frames * self.num_image_tokens, state.keep_ratio) + 1  # + the video's newline
        return frames * self._evoprune_tokens_per_crop() + 1


FAMILY = Family(
    name="LLaVA-OneVision",
    model=modeling_llava_onevision.LlavaOnevisionModel,
    processor=processing_llava_onevision.LlavaOnevisionProcessor,
    processor_mixin=PrunedOnevisionProcessor,
    model_mixin=PrunedOnevisionModel,
    check_layers=check_feature_layers,
)
