"""LLaVA-1.5 (`LlavaForConditionalGeneration`, CLIP tower): the language model already takes whatever number of
features the tower returns, so only the processor changes: one placeholder per token the pruned tower keeps."""

from transformers.image_utils import get_image_size, to_numpy_array
from transformers.models.llava import modeling_llava, processing_llava

from evoprune_ext.adapters import Family
from evoprune_ext.encoder import kept_tokens


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


FAMILY = Family(
    name="LLaVA",
    model=modeling_llava.LlavaModel,
    processor=processing_llava.LlavaProcessor,
    processor_mixin=PrunedLlavaProcessor,
)
