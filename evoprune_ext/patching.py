"""The public `patch` and `unpatch`: the top of the model side (docs/ARCHITECTURE.md).

    model = transformers.LlavaForConditionalGeneration.from_pretrained("llava-hf/llava-1.5-7b-hf")
    evoprune_ext.patch(model, keep_ratio=0.25, processor=processor)   # 576 visual tokens -> 144
    model.evoprune_state                                              # what the last forward pass kept
    evoprune_ext.unpatch(model)                                       # model and processor as they were

`patch` finds the one vision tower in the model and, if the model is a known multimodal LLM, its family
(`evoprune_ext.adapters`); the tower's description patches the tower, and the family's mixins the model and the
processor, all by the same class swap (`evoprune_ext.swap`), which `unpatch` undoes the same way everywhere.
"""

from collections.abc import Sequence

from torch import nn

from evoprune_ext.pruning import Step, resolve_alpha
from evoprune_ext.schedule import check_budget, check_keep_ratio, resolve_layers
from evoprune_ext.swap import is_swapped, restore, swap

__all__ = ["patch", "unpatch"]

TRANSFORMERS = ((5, 17), (6, 0))  # supported: >= the first, < the second


def patch(
    model: nn.Module,
    *,
    keep_ratio: float,
    processor=None,
    layers: Sequence[int] | None = None,
    alpha: float | None = None,
    merge: bool = True,
    proportional_attention: bool = True,
    metric: str = "keys",
    step: Step | None = None,
    budget: str = "frame",
) -> nn.Module:
    """Make the vision tower in `model` prune its tokens with EvoPrune, in place; returns `model`.

    keep_ratio: fraction of the patches left at the end; the encoder outputs exactly
        `kept_tokens(num_patches, keep_ratio, protect)` tokens (protect = 1 for CLIP's CLS, 0 for SigLIP), a
        packed (Qwen-VL) tower `round(units * keep_ratio)` 2x2 merge units of every frame.
    processor: the multimodal LLM's processor, patched in place too so that it emits one placeholder per token the
        pruned tower keeps, counted from the input sizes alone; `unpatch` restores it.
    layers: the 0-based layers that prune (after their attention, before their MLP), each keeping the same
        fraction of the patches; None for `schedule.default_layers`.
    alpha: weight of attention importance against diversity (SPEC.md section 3); None for DEFAULT_ALPHA.
    merge: merge every dropped token into its most similar kept one (True) or drop it (False).
    proportional_attention: later attentions add log(size) to the logits of merged tokens.
    metric: similarity of tokens: "keys" (the layer's keys averaged over heads) or "hidden" (the hidden states).
    step: replaces EvoPrune's selection and merge at each scheduled layer; see `pruning.evoprune_step`.
    (merge, proportional_attention, metric and step: ViT towers only; packed towers take the defaults.)
    budget: how a video's frames share the tokens kept: "frame", each frame keeps its share of its own patches
        (as an image does); "clip", the frames of a video are one pool that keeps `keep_ratio` of all its patches
        wherever they are, so a static background is kept once and every dropped token merges into the kept
        token most similar to it in any frame (docs/ALGORITHM.md, "Clip budget"). Images are not affected.

    Patching a patched model replaces the first patch. Supported: see `evoprune_ext.adapters.SUPPORTED`.
    """
    adapters = _adapters()
    unpatch(model)
    inner, family = adapters.find_family(model)
    if processor is not None and (family is None or not isinstance(processor, family.processor)):
        expected = "no processor" if family is None else f"a {family.processor.__name__}"
        raise TypeError(f"processor: {type(model).__name__} takes {expected}, got {type(processor).__name__}")
    check_keep_ratio(keep_ratio)
    check_budget(budget)
    resolve_alpha(alpha)
    tower, kind = adapters.find_tower(model)
    layers = resolve_layers(layers, kind.depth(tower))
    if family is not None and family.check_layers is not None:
        family.check_layers(inner.config, layers, kind.depth(tower))
    state = kind.patch(tower, keep_ratio=keep_ratio, layers=layers, alpha=alpha, merge=merge,
                       proportional_attention=proportional_attention, metric=metric, step=step, budget=budget)
    state.processor = processor
    # At keep_ratio 1 nothing is pruned: the family's model and processor keep their own layout and counts.
    if family is not None and keep_ratio < 1:
        if family.model_mixin is not None:
            swap(inner, family.model_mixin, state)
        if processor is not None:
            swap(processor, family.processor_mixin, state)
    model.evoprune_state = state
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo `patch` in place, on the model and the processor it patched (a no-op on a model that is not
    patched); returns `model`."""
    state = vars(model).get("evoprune_state")
    if state is not None and state.processor is not None and is_swapped(state.processor):
        restore(state.processor)
    for module in model.modules():
        if is_swapped(module):
            restore(module)
        vars(module).pop("evoprune_state", None)
    return model


def _adapters():
    """`evoprune_ext.adapters`, imported on first use: it needs transformers, an optional extra, in the versions
    whose processor and model methods the adapters override (placeholder counts, M-RoPE positions, feature
    packing; tested 5.17 to 5.24; 4.x encoder layers return tuples and pick attention classes differently)."""
    try:
        import transformers
    except ImportError as error:
        raise ImportError("evoprune_ext.patch needs transformers: pip install evoprune_ext[hf]") from error
    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    low, high = TRANSFORMERS
    if not low <= (major, minor) < high:
        raise ImportError(
            f"evoprune_ext.patch supports transformers>=5.17,<6 (tested 5.17 to 5.24), found {transformers.__version__}"
        )
    from evoprune_ext import adapters

    return adapters
