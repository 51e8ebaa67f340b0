"""LLaVA-1.5 (`LlavaForConditionalGeneration`, CLIP tower): the language model already takes whatever number of
features the tower returns, so only the processor changes: one placeholder per token the pruned tower keeps."""

from transformers.image_utils import get_image_size, to_numpy_array
from transformers.models.llava import modeling_llava, processing_llava

from evoprune_ext.adapters.family import Family
from evoprune_ext.schedule import kept_tokens


class PrunedLlavaProcessor:
    """Mixed into LlavaProcessor: `round(patches * keep_ratio)` placeholders per image instead of `patches`
    (plus the processor's own additional tokens, less the CLS that the "default" strategy drops)."""

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        height, width = get_image_size(to_numpy_array(image_inputs["pixel_values"][image_idx]))
        return self.image_token * self._evoprune_placeholders((height // self.patch_size) * (width // self.patch_size))

    def _get_num_multimodal_tokens(self, image_sizes=None, **kwargs):
        data = super()._get_num_multimodal_tokens(image_sizes, **kwargs)
        if image_sizes is not None:
            extra = self._evoprune_extra_tokens()
            data.num_image_tokens = [self._evoprune_placeholders(count - extra) for count in data.num_image_tokens]
        return data

    def _evoprune_placeholders(self, patches: int) -> int:
        return kept_tokens(patches, self._evoprune.keep_ratio) + self._evoprune_extra_tokens()

    def _evoprune_extra_tokens(self) -> int:
        """Placeholders besides the patches': the tower's additional tokens (CLS), less the one the "default"
        feature strategy drops."""
        return self.num_additional_image_tokens - (self.vision_feature_select_strategy == "default")


def check_feature_layers(config, layers: list[int], depth: int) -> None:
    """The language model reads the tower's hidden states at `config.vision_feature_layer`: each must come after
    the last pruning layer, or its token count would not be the pruned one the processor announces."""
    chosen = config.vision_feature_layer
    for feature_layer in [chosen] if isinstance(chosen, int) else chosen:
        # hidden_states[i] is the output of layer i - 1 (hidden_states[0]: the embeddings).
        produced_by = (feature_layer % (depth + 1)) - 1
        if produced_by < layers[-1]:
            raise ValueError(
                f"layers: the model reads vision_feature_layer={feature_layer} (the output of layer {produced_by}), "
                f"so every pruning layer must be <= {produced_by}; got {layers}"
            )


FAMILY = Family(
    name="LLaVA",
    model=modeling_llava.LlavaModel,
    processor=processing_llava.LlavaProcessor,
    processor_mixin=PrunedLlavaProcessor,
    check_layers=check_feature_layers,
)
