"""EvoPrune inside vLLM's LLaVA-OneVision (`vllm/model_executor/models/llava_onevision.py`), selected by
`hf_overrides={"architectures": ["EvoPruneLlavaOnevisionForConditionalGeneration"], "evoprune": {"keep_ratio": 0.5}}`
("evoprune" may also name "layers", "alpha" and "budget", as `evoprune_ext.patch` does).

Every crop of an image and every frame of a video leaves vLLM's SigLIP tower with `k = round(patches * keep_ratio)`
tokens, packed as the transformers adapter packs them (docs/ALGORITHM.md, "LLaVA-OneVision"):
- an image (anyres): the base crop's k tokens, then each row of grid crops followed by one newline (not unpadded);
- a video: `frames * k` tokens (EvoPrune replaces the 2x2 pooling), then the video's newline; under the clip budget
  its frames are one pool that keeps `round(frames * patches * keep_ratio)` tokens, then the newline.
vLLM gives every image of a prompt its anyres grid, also when the prompt holds several (transformers gives those
their base crop only): the plugin keeps vLLM's choice, each image packed as above.

Three pieces: the processing info counts those placeholders from the image size alone, before the encoder runs; the
tower runs `towers/vit.py`'s plumbing (`EvoPruneState`, its encoder layer) with an attention written for vLLM's fused
qkv projection and its heads split over the tensor-parallel ranks; the model packs the kept tokens. At keep_ratio 1
nothing changes: vLLM's counts, packing and pooling, and the tower's arithmetic (steps that would keep every token
are skipped).
"""

import torch
from torch import Tensor
from transformers.models.llava_onevision.modeling_llava_onevision import get_anyres_image_grid_shape
from vllm.model_executor.models.llava_onevision import (
    LlavaOnevisionDummyInputsBuilder,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionMultiModalProcessor,
    LlavaOnevisionProcessingInfo,
)
from vllm.model_executor.models.siglip import SiglipVisionEmbeddings
from vllm.multimodal import MULTIMODAL_REGISTRY

from evoprune_ext.pruning import evoprune_step, resolve_alpha
from evoprune_ext.schedule import check_keep_ratio, kept_tokens, resolve_layers
from evoprune_ext.swap import swap
from evoprune_ext.towers.vit import EvoPruneState, PrunedAttention, PrunedEncoderLayer, ViTTower, attend_per_frame
from evoprune_ext.vllm.qwen_vl import _all_heads, evoprune_options

__all__ = ["EvoPruneLlavaOnevisionForConditionalGeneration", "EvoPruneLlavaOnevisionProcessingInfo"]


class EvoPruneLlavaOnevisionProcessingInfo(LlavaOnevisionProcessingInfo):
    """The placeholders of the pruned packing (vLLM's multimodal processor sizes each item's replacement here)."""

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        if self._evoprune_keep_ratio() == 1:
            return super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        rows, columns = get_anyres_image_grid_shape(
            (image_height, image_width), self.get_hf_config().image_grid_pinpoints,
            self.get_vision_encoder_info().get_image_size(),
        )
        return self._evoprune_tokens_per_crop() * (1 + rows * columns) + rows  # + a newline per row

    def _get_num_frame_tokens(self, *, image_width: int, image_height: int) -> int:
        """Per frame (`get_num_video_tokens` adds the video's newline): k kept tokens instead of the pooled grid."""
        if self._evoprune_keep_ratio() == 1:
            return super()._get_num_frame_tokens(image_width=image_width, image_height=image_height)
        return self._evoprune_tokens_per_crop()

    def get_num_video_tokens(self, *, image_width: int, image_height: int, num_frames: int) -> int:
        options = evoprune_options(self.get_hf_config())
        if options["budget"] != "clip" or options["keep_ratio"] == 1:
            return super().get_num_video_tokens(image_width=image_width, image_height=image_height,
                                                num_frames=num_frames)
        patches = self.get_vision_encoder_info().get_patch_grid_length() ** 2
        return kept_tokens(num_frames * patches, options["keep_ratio"]) + 1  # the frames' pool, then the newline

    def _evoprune_keep_ratio(self) -> float:
        return evoprune_options(self.get_hf_config())["keep_ratio"]

    def _evoprune_tokens_per_crop(self) -> int:
        return kept_tokens(self.get_vision_encoder_info().get_patch_grid_length() ** 2, self._evoprune_keep_ratio())


class PrunedVllmEncoder:
    """Mixed into vLLM's SiglipEncoder: every forward pass starts a new record."""

    def forward(self, inputs_embeds: Tensor, return_all_hidden_states: bool):
        self._evoprune.begin(inputs_embeds)
        return super().forward(inputs_embeds, return_all_hidden_states)


class PrunedVllmEncoderLayer(PrunedEncoderLayer):
    """Mixed into vLLM's SiglipEncoderLayer: `towers/vit.py`'s layer, answering as vLLM's does (with None)."""

    def forward(self, hidden_states: Tensor) -> tuple[Tensor, None]:
        return super().forward(hidden_states), None


class PrunedVllmAttention(PrunedAttention):
    """Mixed into vLLM's SiglipAttention: vLLM's own attention until a step has merged tokens; then torch's SDPA
    with log(size) added to the logits (vLLM's encoder attention takes no mask). At a pruning layer it hands the
    state the importance and the keys metric, both means over the heads, over all heads: each tensor-parallel rank
    holds `num_heads_per_partition` of them, and ranks that selected from their own heads would keep different
    tokens (`_all_heads`, one all-reduce per step)."""

    def forward(self, hidden_states: Tensor, attention_mask=None) -> tuple[Tensor, None]:
        """`attention_mask`: towers/vit.py's layer passes one, always None here (vLLM's SigLIP takes none)."""
        state = self._evoprune
        bias = state.attention_bias(hidden_states.dtype)
        prunes = state.prunes_at(self._evoprune_layer)
        if bias is None and not prunes and state.frame_lengths is None:
            return self._evoprune_base.forward(self, hidden_states)
        qkv, _ = self.qkv_proj(hidden_states)
        queries, keys, values = (x.unflatten(-1, (-1, self.head_dim)).transpose(1, 2) for x in qkv.chunk(3, dim=-1))

        def attend(queries, keys, values, mask, bias):
            out = torch.nn.functional.scaled_dot_product_attention(queries, keys, values, attn_mask=mask,
                                                                   scale=self.scale).transpose(1, 2)
            return out, None, self._importance(queries, keys, None, bias) if prunes else None

        if state.frame_lengths is not None:  # a video's frames pooled (clip budget): attention within each frame
            out, importance = attend_per_frame(attend, state.frame_lengths, queries, keys, values, bias)
        elif bias is None:  # nothing merged yet: vLLM's own attention
            out = self.attn(*qkv.chunk(3, dim=-1))
            importance = self._importance(queries, keys, None, None) if prunes else None
        else:
            out, _, importance = attend(queries, keys, values, bias, bias)
        out = out.flatten(2)
        if prunes:
            metric = keys.mean(dim=1)
            all_heads = _all_heads(self.tp_size)
            if all_heads is not None:
                both = all_heads(torch.cat([metric.float(), importance[..., None]], dim=-1))
                importance, metric = both[..., -1], both[..., :-1].to(metric.dtype)
            state._pending = (importance, metric)
        return self.out_proj(out)[0], None


# What EvoPruneState asks of its tower: SigLIP has no CLS to protect and takes importance from all query rows.
TOWER = ViTTower(family="SigLIP (vLLM)", embeddings=SiglipVisionEmbeddings, protect=0, cls_importance=False,
                 eager_attention=None)


def patch_tower(tower, config, options: dict) -> EvoPruneState:
    """Make vLLM's SiglipVisionTransformer `tower` prune as `evoprune_ext.patch` makes transformers' (its defaults:
    merge, proportional attention, the keys as the metric). The default schedule is that of the whole tower, as in
    transformers, though vLLM builds it only up to the feature layer, which must come after the last step."""
    layers = resolve_layers(options.get("layers"), config.vision_config.num_hidden_layers)
    if not isinstance(config.vision_feature_layer, int):
        raise ValueError(f"EvoPrune reads one vision_feature_layer, got {config.vision_feature_layer}")
    if layers[-1] >= len(tower.encoder.layers):
        raise ValueError(f"layers: the model reads vision_feature_layer={config.vision_feature_layer} (the output of "
                         f"layer {len(tower.encoder.layers) - 1}), so every pruning layer must be <= "
                         f"{len(tower.encoder.layers) - 1}; got {layers}")
    if config.vision_feature_select_strategy != "full":
        raise ValueError("EvoPrune's LLaVA-OneVision needs vision_feature_select_strategy='full' (SigLIP has no CLS), "
                         f"got {config.vision_feature_select_strategy!r}")
    state = EvoPruneState(keep_ratio=check_keep_ratio(options["keep_ratio"]), layers=layers,
                          alpha=resolve_alpha(options.get("alpha")), merge=True, proportional_attention=True,
                          metric="keys", step=evoprune_step, adapter=TOWER, budget=options["budget"])
    swap(tower.encoder, PrunedVllmEncoder, state)
    for i, layer in enumerate(tower.encoder.layers):
        swap(layer, PrunedVllmEncoderLayer, state, layer=i)
        swap(layer.self_attn, PrunedVllmAttention, state, layer=i)
    tower.evoprune_state = state
    return state


@MULTIMODAL_REGISTRY.register_processor(LlavaOnevisionMultiModalProcessor, info=EvoPruneLlavaOnevisionProcessingInfo,
                                        dummy_inputs=LlavaOnevisionDummyInputsBuilder)
class EvoPruneLlavaOnevisionForConditionalGeneration(LlavaOnevisionForConditionalGeneration):
    """LLaVA-OneVision whose tower keeps `round(patches * keep_ratio)` tokens of each crop and frame. vLLM runs its
    tower split by heads also under mm_encoder_tp_mode="data" (it does not support that mode for this model)."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.evoprune_state = patch_tower(self.vision_tower.vision_model, self.config, evoprune_options(self.config))

    def _merge_image_patch_embeddings(self, image_size: Tensor, patch_embeddings: Tensor, *, strategy: str,
                                      image_newline=None, **kwargs) -> Tensor:
        """[crops, k, D] -> the base crop's k tokens, then each row of grid crops and a newline."""
        if self.evoprune_state.keep_ratio == 1:
            return super()._merge_image_patch_embeddings(image_size, patch_embeddings, strategy=strategy,
                                                         image_newline=image_newline, **kwargs)
        base, grid = patch_embeddings[0], patch_embeddings[1:]
        rows, columns = 1, 0  # a lone base crop: its newline follows it
        if len(grid):
            rows, columns = get_anyres_image_grid_shape(image_size.tolist(), self.config.image_grid_pinpoints,
                                                        self.config.vision_config.image_size)
        grid = grid[: rows * columns].reshape(rows, columns * base.shape[0], base.shape[1])  # crops padded for batching
        newline = image_newline.to(grid.device, grid.dtype).expand(rows, 1, -1)
        return torch.cat((base, torch.cat((grid, newline), dim=1).flatten(0, 1)))

    def _process_video_pixels(self, inputs):
        """Under the clip budget each video's frames are one pool (`EvoPruneState.clips`): its kept tokens, then
        its newline. Videos of one length share a pass (vLLM stacks them), others run one by one."""
        state = self.evoprune_state
        if state.budget != "clip" or state.keep_ratio == 1:
            return super()._process_video_pixels(inputs)
        pixels = inputs["pixel_values_videos"]
        batches = [pixels] if isinstance(pixels, Tensor) else [video[None] for video in pixels]
        newline = self.image_newline[None, None, :]
        videos = []
        for batch in batches:
            with state.clips(batch.shape[1]):
                features = self._video_pixels_to_features(self.vision_tower, batch.flatten(0, 1))
            videos.append(torch.cat((features, newline.expand(len(features), -1, -1)), dim=1))
        return videos[0] if isinstance(pixels, Tensor) else videos

    def apply_pooling(self, image_features: Tensor, stride: int = 2) -> Tensor:
        if self.evoprune_state.keep_ratio == 1:
            return super().apply_pooling(image_features, stride)
        return image_features  # the kept tokens replace the pooled grid
