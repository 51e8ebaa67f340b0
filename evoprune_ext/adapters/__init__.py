"""The vision towers and multimodal LLMs `evoprune_ext.patch` knows, and the little that differs between them.

A tower is the module that holds `embeddings` and `encoder` (in transformers 5, `CLIPVisionModel` and
`SiglipVisionModel`; in older releases their `vision_model`, a `CLIPVisionTransformer` / `SiglipVisionTransformer`).
Its encoder layers and attention modules have the same structure in both families and are patched by
`evoprune_ext.encoder` alone; an `Adapter` only says how to recognize the tower and what EvoPrune must know about
its family.

A multimodal LLM around a tower (LLaVA, LLaVA-OneVision, Qwen2.5-VL, Qwen3-VL) is a `Family`: the mixins that
make its processor emit one placeholder per token the pruned tower keeps, and its model pack and position those
tokens where it differs from the unpruned layout; the Qwen-VL families also patch their packed towers
themselves. Each family's module says only that (`llava.py`, `llava_onevision.py`, `qwen_vl.py`).
"""

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

SUPPORTED = (
    "transformers' CLIPVisionModel / CLIPVisionTransformer, SiglipVisionModel / SiglipVisionTransformer, "
    "or a model containing exactly one of them (LLaVA, LLaVA-OneVision, CLIPModel, ...); "
    "Qwen2_5_VLForConditionalGeneration / Qwen2_5_VLModel, Qwen3VLForConditionalGeneration / Qwen3VLModel"
)


@dataclass(frozen=True)
class Adapter:
    family: str
    embeddings: type  # class of the tower's `embeddings`: this is how a tower is recognized
    protect: int  # leading tokens always kept (CLIP's CLS)
    cls_importance: bool  # importance = attention of the CLS query row (True) or mean over all query rows (False)
    eager_attention: Callable  # the family's eager attention function (returns the probabilities)
    head: str | None = None  # attribute of an attention-pooling head that should see the token sizes
    head_mixin: type | None = None  # class mixed into that head to make it size-aware


@dataclass(frozen=True)
class Family:
    name: str
    model: type  # the family's inner model class (holds the tower and the language model): how it is recognized
    processor: type  # the processor class whose placeholders `processor_mixin` recounts
    processor_mixin: type
    model_mixin: type | None = None  # mixed into the inner model where pruned features are packed differently
    # Towers that evoprune_ext.encoder does not patch itself (Qwen-VL's packed, windowed ones):
    # patch_tower(inner, keep_ratio=, layers=, alpha=) -> the tower's state; unpatch_tower(inner) undoes it.
    patch_tower: Callable | None = None
    unpatch_tower: Callable | None = None


def _transformers():
    try:
        import transformers
    except ImportError as error:
        raise ImportError("evoprune_ext.patch needs transformers: pip install evoprune_ext[hf]") from error
    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    if not (5, 17) <= (major, minor) < (6, 0):
        # The families override transformers' processor and model methods (placeholder counts, M-RoPE positions,
        # feature packing); the tests pass from 5.17 to 5.24. 4.x encoder layers return tuples and pick attention
        # classes differently from what encoder.py patches.
        raise ImportError(
            f"evoprune_ext.patch supports transformers>=5.17,<6 (tested 5.17 to 5.24), found {transformers.__version__}"
        )


def _adapters() -> list[Adapter]:
    _transformers()
    from evoprune_ext.adapters import clip, siglip

    return [clip.ADAPTER, siglip.ADAPTER]


def _families() -> list[Family]:
    _transformers()
    from evoprune_ext.adapters import llava, llava_onevision, qwen_vl

    return [llava.FAMILY, llava_onevision.FAMILY, qwen_vl.QWEN2_5_VL, qwen_vl.QWEN3_VL]


def find_family(model: nn.Module) -> tuple[nn.Module, Family] | tuple[None, None]:
    """The inner model of a known multimodal LLM family in `model` and its family, or (None, None)."""
    for module in model.modules():
        for family in _families():
            if isinstance(module, family.model):
                return module, family
    return None, None


def find_tower(model: nn.Module) -> tuple[nn.Module, Adapter]:
    """The one vision tower inside `model` (possibly `model` itself) and its adapter; TypeError otherwise."""
    adapters = _adapters()
    found = [
        (module, adapter)
        for module in model.modules()
        for adapter in adapters
        if isinstance(getattr(module, "embeddings", None), adapter.embeddings) and hasattr(module, "encoder")
    ]
    if not found:
        raise TypeError(f"evoprune_ext.patch supports {SUPPORTED}; got {type(model).__name__}")
    if len(found) > 1:
        names = ", ".join(type(module).__name__ for module, _ in found)
        raise TypeError(f"{type(model).__name__} contains {len(found)} vision towers ({names}): patch each one itself")
    return found[0]
