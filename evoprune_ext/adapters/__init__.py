"""The vision towers and multimodal LLM families `evoprune_ext.patch` knows: one module per family says only what
differs (docs/ARCHITECTURE.md says how to add one).

- towers: `clip.py`, `siglip.py` (`ViTTower`s, patched by `towers/vit.py`), `qwen2_5_vl.py`, `qwen3_vl.py`
  (`PackedTower`s, written with `towers/packed.py`);
- families around a tower (`Family`): `llava.py`, `llava_onevision.py`, `qwen_vl.py` (both Qwen-VL families).

Importing this package imports transformers (`evoprune_ext.patch` checks its version first).
"""

from torch import nn

from evoprune_ext.adapters import clip, llava, llava_onevision, qwen2_5_vl, qwen3_vl, qwen_vl, siglip
from evoprune_ext.adapters.family import Family

__all__ = ["FAMILIES", "SUPPORTED", "TOWERS", "find_family", "find_tower"]

TOWERS = (clip.TOWER, siglip.TOWER, qwen2_5_vl.TOWER, qwen3_vl.TOWER)
FAMILIES = (llava.FAMILY, llava_onevision.FAMILY, qwen_vl.QWEN2_5_VL, qwen_vl.QWEN3_VL)

SUPPORTED = (
    "transformers' CLIPVisionModel / CLIPVisionTransformer, SiglipVisionModel / SiglipVisionTransformer, "
    "Qwen2_5_VisionTransformerPretrainedModel, Qwen3VLVisionModel, or a model containing exactly one of them "
    "(LLaVA, LLaVA-OneVision, Qwen2_5_VLForConditionalGeneration, Qwen3VLForConditionalGeneration, CLIPModel, ...)"
)


def find_family(model: nn.Module) -> tuple[nn.Module, Family] | tuple[None, None]:
    """The inner model of a known multimodal LLM family in `model` and its family, or (None, None)."""
    for module in model.modules():
        for family in FAMILIES:
            if isinstance(module, family.model):
                return module, family
    return None, None


def find_tower(model: nn.Module):
    """The one vision tower inside `model` (possibly `model` itself) and its `ViTTower` / `PackedTower`;
    TypeError otherwise."""
    found = [(module, tower) for module in model.modules() for tower in TOWERS if tower.recognizes(module)]
    if not found:
        raise TypeError(f"evoprune_ext.patch supports {SUPPORTED}; got {type(model).__name__}")
    if len(found) > 1:
        names = ", ".join(type(module).__name__ for module, _ in found)
        raise TypeError(f"{type(model).__name__} contains {len(found)} vision towers ({names}): patch each one itself")
    return found[0]
