"""EvoPrune inside a vision encoder: patch a Hugging Face CLIP or SigLIP tower so that it prunes and merges its
patch tokens at a few layers, and every later layer (and the language model after it) sees fewer tokens.

    model = transformers.CLIPVisionModel.from_pretrained("openai/clip-vit-large-patch14-336")
    evoprune_ext.patch(model, keep_ratio=0.25)
    out = model(pixel_values)                  # out.last_hidden_state: [B, 1 + 144, 1024] instead of [B, 577, 1024]
    model.evoprune_state.slot                  # [B, 577]: where each input token went (-1: dropped)
    evoprune_ext.unpatch(model)

How (SPEC.md section 7), in the manner of ToMe's `tome/patch/timm.py`: `patch` swaps the classes of the tower's
encoder, encoder layers and attention modules for subclasses defined here, and hangs one `EvoPruneState` on them
and on the model. At a scheduled layer the patched attention also returns the importance (the attention
probabilities it computed with eager attention; `importance_from_qk` on its q and k with SDPA or FlashAttention,
so no N x N matrix is stored) and the keys averaged over heads (the similarity metric); the patched layer then
prunes after the attention's residual add, before the MLP. Token sizes carry from step to step, and with
`proportional_attention` every later attention adds log(size) to the keys' logits.

One forward pass at a time per patched model: the state records the last pass. Training with gradient
checkpointing is not supported (the recomputation would prune twice).
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from evoprune_ext.defaults import DEFAULT_ALPHA

__all__ = [
    "DEFAULT_EVERY",
    "DEFAULT_FIRST_LAYER",
    "DEFAULT_MAX_STEPS",
    "EvoPruneState",
    "PruneStep",
    "default_layers",
    "evoprune_step",
    "kept_tokens",
    "patch",
    "schedule_keeps",
    "unpatch",
]

# The default skip schedule: prune at layers DEFAULT_FIRST_LAYER, + DEFAULT_EVERY, ... (0-based), at most
# DEFAULT_MAX_STEPS times and never in the last layer, keeping the same fraction of the patches at each step.
# That is layers 1, 2, 3, 4 of any encoder of 6 layers or more: early, gentle, repeated steps. Chosen by the
# quality benchmark (bench/eval_quality.py, docs/BENCHMARKS.md): at equal final token counts, pruning from layer 1
# at every layer beat every-other-layer, a single step at layer 1 or 2, and the first guess (2, 5, 8, 11); on the
# seven-digit task, where 28 of 64 patches carry the answer, it is still the best beyond the paired 95% interval.
DEFAULT_FIRST_LAYER = 1
DEFAULT_EVERY = 1
DEFAULT_MAX_STEPS = 4

METRICS = ("keys", "hidden")

# step(hidden, metric, importance, sizes, *, keep, protect, alpha, merge) -> (hidden, sizes, slot[, index])
Step = Callable[..., tuple]


def default_layers(num_layers: int) -> list[int]:
    """The layers (0-based) where the default schedule prunes, for an encoder of `num_layers` layers.

    The last layer never prunes: LLaVA reads the penultimate layer's output, which must already have the final
    token count. Shallow encoders start earlier so that they still prune once."""
    last = max(num_layers - 2, 0)
    return list(range(min(DEFAULT_FIRST_LAYER, last), last + 1, DEFAULT_EVERY))[:DEFAULT_MAX_STEPS]


def kept_tokens(num_patches: int, keep_ratio: float, protect: int = 0) -> int:
    """Tokens a patched encoder outputs: `protect + round(num_patches * keep_ratio)` (Python's round)."""
    return protect + round(num_patches * keep_ratio)


def schedule_keeps(num_tokens: int, protect: int, keep_ratio: float, steps: int) -> list[int]:
    """Tokens left after each of `steps` pruning steps (protected ones included): every step keeps the same
    fraction keep_ratio ** (1 / steps) of the patches, and the last one lands exactly on `kept_tokens`."""
    patches = num_tokens - protect
    keeps = [kept_tokens(patches, keep_ratio ** ((i + 1) / steps), protect) for i in range(steps)]
    keeps[-1] = kept_tokens(patches, keep_ratio, protect)
    return keeps


def evoprune_step(
    hidden: Tensor,
    metric: Tensor,
    importance: Tensor,
    sizes: Tensor,
    *,
    keep: int,
    protect: int,
    alpha: float,
    merge: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The default step: EvoPrune's selection and merge (torch.ops.evoprune.prune).

    hidden [B,N,D], metric [B,N,Dm], importance [B,N] float32, sizes [B,N] float32 (ones at the first step).
    Returns (hidden [B,keep,D], sizes [B,keep], slot [B,N], index [B,keep]). A replacement (`patch(step=...)`)
    returns the same, index optional: it is how other methods run at the same layers of the same encoder."""
    out, index, sizes_out, slot = torch.ops.evoprune.prune(
        hidden, importance, keep=keep, metric=metric, sizes=sizes, alpha=alpha, protect=protect, merge=merge
    )
    return out, sizes_out, slot, index


@dataclass
class PruneStep:
    """What one pruning step did in the last forward pass.

    `index` and `slot` refer to the step's input tokens (as returned by the step); `original_index` and
    `original_slot` to the encoder's input tokens (CLS first for CLIP), composed over all steps so far."""

    layer: int
    index: Tensor | None  # [B,K] kept positions among the step's input; None if the step gives none
    slot: Tensor  # [B,N] output position carrying each input token, -1 if dropped
    sizes: Tensor  # [B,K] float32: how many original patches each output token stands for
    original_index: Tensor | None  # [B,K] encoder-input position of each output token
    original_slot: Tensor  # [B,N0] output position carrying each encoder-input token, -1 if dropped


class EvoPruneState:
    """The configuration of a patched model (`model.evoprune_state`) and what its last forward pass did.

    After a forward pass: `steps` (one `PruneStep` per scheduled layer), `slot` [B,N0] (the output position of
    each encoder-input token, -1 if dropped), `index` [B,K] (the encoder-input position of each output token's
    kept token, None if a custom step gave no index) and `sizes` [B,K] (patches per output token). With CLIP the
    input tokens are the CLS then the patches in raster order, so `slot[:, 1:].view(B, rows, cols)` is the map
    from image patches to output tokens; SigLIP has no CLS. With `merge=False` a dropped token's slot still names
    the kept token most similar to it, which did not absorb it."""

    def __init__(
        self, *, keep_ratio, layers, alpha, merge, proportional_attention, metric, step, adapter, processor=None
    ):
        self.keep_ratio = keep_ratio
        self.layers = layers
        self.alpha = alpha
        self.merge = merge
        self.proportional_attention = proportional_attention
        self.metric = metric
        self.step = step
        self.adapter = adapter
        self.protect = adapter.protect
        self.processor = processor  # the processor `patch` was given, restored by `unpatch`
        self._reset()

    def _reset(self):
        self.steps: list[PruneStep] = []
        self.sizes: Tensor | None = None
        self.slot: Tensor | None = None
        self.index: Tensor | None = None
        self._keeps: dict[int, int] = {}  # layer -> tokens left after its step
        self._pending = None  # (importance, keys metric) from the attention of the layer about to prune

    def begin(self, hidden: Tensor) -> None:
        """Start a forward pass on the encoder input `hidden` [B,N0,D]."""
        self._reset()
        batch, tokens = hidden.shape[:2]
        if round((tokens - self.protect) * self.keep_ratio) < 1:
            raise ValueError(f"keep_ratio={self.keep_ratio} keeps no patch of {tokens - self.protect}")
        keeps = schedule_keeps(tokens, self.protect, self.keep_ratio, len(self.layers))
        # A step that would keep every token is skipped, so that keep_ratio=1 runs the unpatched model's exact
        # arithmetic (no log(1) bias, no identity merge) and reproduces its outputs bit for bit.
        self._keeps = {layer: keep for layer, keep in zip(self.layers, keeps) if keep < tokens}
        self.slot = torch.arange(tokens, device=hidden.device).expand(batch, tokens)
        self.index = self.slot

    def prunes_at(self, layer: int) -> bool:
        return layer in self._keeps

    def attention_bias(self, dtype: torch.dtype) -> Tensor | None:
        """log(size) [B,1,1,N] to add to the attention logits (proportional attention), or None."""
        if not self.proportional_attention or self.sizes is None:
            return None
        return self.sizes.log().to(dtype)[:, None, None, :]

    def prune(self, layer: int, hidden: Tensor) -> Tensor:
        """Run the step of `layer` on `hidden` [B,N,D] (after its attention) and record it."""
        importance, keys = self._pending
        self._pending = None
        keep = self._keeps[layer]
        # Under autocast the keys come out of a linear in the autocast dtype while the residual stream
        # stays float32; the ops want the metric in the tokens' dtype.
        metric = hidden if self.metric == "hidden" else keys.to(hidden.dtype)
        sizes = self.sizes if self.sizes is not None else hidden.new_ones(hidden.shape[:2], dtype=torch.float32)
        out, sizes, slot, *index = self.step(
            hidden, metric, importance, sizes, keep=keep, protect=self.protect, alpha=self.alpha, merge=self.merge
        )
        if out.shape[1] != keep or slot.shape != hidden.shape[:2]:
            raise RuntimeError(
                f"the pruning step at layer {layer} returned {tuple(out.shape)} tokens and slot {tuple(slot.shape)}; "
                f"expected {keep} tokens and slot {tuple(hidden.shape[:2])}"
            )
        index = index[0] if index else None
        self.slot = torch.where(self.slot >= 0, slot.gather(1, self.slot.clamp(min=0)), -1)
        self.index = None if index is None or self.index is None else self.index.gather(1, index)
        self.sizes = sizes
        self.steps.append(PruneStep(layer, index, slot, sizes, self.index, self.slot))
        return out


class _Encoder:
    """Mixed into CLIPEncoder / SiglipEncoder: every forward pass starts a new record."""

    def forward(self, inputs_embeds, attention_mask=None, **kwargs):
        if attention_mask is not None:
            raise ValueError("an EvoPrune-patched vision encoder takes no attention_mask: pruning changes the tokens")
        self._evoprune.begin(inputs_embeds)
        return super().forward(inputs_embeds, attention_mask, **kwargs)


class _EncoderLayer:
    """Mixed into CLIPEncoderLayer / SiglipEncoderLayer: prunes between the attention and the MLP."""

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        state = self._evoprune
        residual = hidden_states
        hidden_states, _ = self.self_attn(
            hidden_states=self.layer_norm1(hidden_states), attention_mask=attention_mask, **kwargs
        )
        hidden_states = residual + hidden_states
        if state.prunes_at(self._evoprune_layer):
            hidden_states = state.prune(self._evoprune_layer, hidden_states)
        return hidden_states + self.mlp(self.layer_norm2(hidden_states))


class _Attention:
    """Mixed into CLIPAttention / SiglipAttention: adds log(size) to the logits, and at a pruning layer hands the
    importance and the keys to the state."""

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        state = self._evoprune
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        queries = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        keys = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        values = self.v_proj(hidden_states).view(shape).transpose(1, 2)

        bias = state.attention_bias(queries.dtype)
        mask = attention_mask if bias is None else bias if attention_mask is None else attention_mask + bias
        implementation = self.config._attn_implementation
        if bias is not None and implementation not in ("eager", "sdpa"):
            implementation = "sdpa"  # flash and flex kernels take no additive float mask
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, state.adapter.eager_attention)
        attn_output, attn_weights = attention(
            self,
            queries,
            keys,
            values,
            mask,
            scaling=self.scale,
            dropout=0.0 if not self.training else self.dropout,
            **kwargs,
        )
        if state.prunes_at(self._evoprune_layer):
            probabilities = attn_weights if implementation == "eager" else None
            state._pending = (
                self._importance(queries, keys, probabilities, bias),
                keys.mean(dim=1) if state.metric == "keys" else None,
            )
        attn_output = attn_output.reshape(*hidden_states.shape[:-1], -1).contiguous()
        return self.out_proj(attn_output), attn_weights

    def _importance(self, queries, keys, probabilities, bias):
        """[B,N] float32: the attention of the CLS row (CLIP) or of all rows (SigLIP) that each token receives."""
        rows = slice(0, 1) if self._evoprune.adapter.cls_importance else slice(None)
        # Importance only steers the selection, which has no gradient.
        if probabilities is not None:
            return torch.ops.evoprune.importance(probabilities[:, :, rows].detach())
        queries, keys = queries[:, :, rows].detach(), keys.detach()
        if bias is not None:
            # scale * [q, 1] . [k, log(s) / scale] = scale * q.k + log(s): the bias rides along as one more dimension.
            ones = queries.new_ones(*queries.shape[:-1], 1)
            queries = torch.cat([queries, ones], dim=-1)
            column = (bias / self.scale).transpose(-1, -2).expand(-1, keys.shape[1], -1, -1)
            keys = torch.cat([keys, column], dim=-1)
        return torch.ops.evoprune.importance_from_qk(queries, keys, self.scale)


_classes: dict[tuple[type, type], type] = {}


def _swap(module: nn.Module, mixin: type, state: EvoPruneState, layer: int | None = None) -> None:
    """Give `module` the class mixin + its class (made once per pair) and the state."""
    base = type(module)
    if (mixin, base) not in _classes:
        _classes[mixin, base] = type(f"EvoPrune{base.__name__}", (mixin, base), {"_evoprune_base": base})
    module.__class__ = _classes[mixin, base]
    module._evoprune = state
    if layer is not None:
        module._evoprune_layer = layer


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
) -> nn.Module:
    """Make the vision tower in `model` prune its tokens with EvoPrune, in place; returns `model`.

    keep_ratio: fraction of the patches left at the end; the encoder outputs exactly
        `kept_tokens(num_patches, keep_ratio, protect)` tokens (protect = 1 for CLIP's CLS, 0 for SigLIP).
    processor: the multimodal LLM's processor (LLaVA, LLaVA-OneVision), patched in place too so that it emits one
        placeholder per token the pruned tower keeps, counted from the input sizes alone; `unpatch` restores it.
    layers: the 0-based layers that prune (after their attention, before their MLP), each keeping the same
        fraction of the patches; None for `default_layers`.
    alpha: weight of attention importance against diversity (SPEC.md section 3); None for DEFAULT_ALPHA.
    merge: merge every dropped token into its most similar kept one (True) or drop it (False).
    proportional_attention: later attentions add log(size) to the logits of merged tokens.
    metric: similarity of tokens: "keys" (the layer's keys averaged over heads) or "hidden" (the hidden states).
    step: replaces EvoPrune's selection and merge at each scheduled layer; see `evoprune_step`.

    Patching a patched model replaces the first patch. Supported: see `evoprune_ext.adapters.SUPPORTED`.
    """
    from evoprune_ext.adapters import find_family

    unpatch(model)
    inner, family = find_family(model)
    if processor is not None and (family is None or not isinstance(processor, family.processor)):
        expected = "no processor" if family is None else f"a {family.processor.__name__}"
        raise TypeError(f"processor: {type(model).__name__} takes {expected}, got {type(processor).__name__}")
    if not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
    alpha = DEFAULT_ALPHA if alpha is None else float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    layers = None if layers is None else sorted({int(layer) for layer in layers})

    if family is not None and family.patch_tower is not None:
        options = dict(merge=merge, proportional_attention=proportional_attention, metric=metric, step=step)
        changed = [name for name, value in options.items() if value != _TOWER_OPTION_DEFAULTS[name]]
        if changed:
            raise ValueError(f"{', '.join(changed)}: not supported for {family.name}'s tower; leave the default")
        state = family.patch_tower(inner, keep_ratio=keep_ratio, layers=layers, alpha=alpha)
        state.processor = processor
    else:
        state = _patch_tower(model, inner if family is not None else None, keep_ratio=keep_ratio, layers=layers,
                             alpha=alpha, merge=merge, proportional_attention=proportional_attention, metric=metric,
                             step=step, processor=processor)
    # At keep_ratio 1 nothing is pruned: the family's model and processor keep their own layout and counts.
    if family is not None and keep_ratio < 1:
        if family.model_mixin is not None:
            _swap(inner, family.model_mixin, state)
        if processor is not None:
            _swap(processor, family.processor_mixin, state)
    model.evoprune_state = state
    return model


_TOWER_OPTION_DEFAULTS = dict(merge=True, proportional_attention=True, metric="keys", step=None)


def _patch_tower(model, inner, *, keep_ratio, layers, alpha, merge, proportional_attention, metric, step, processor):
    """Patch the CLIP or SigLIP tower in `model` (`inner`: the multimodal LLM around it, or None); its state."""
    from evoprune_ext.adapters import find_tower

    tower, adapter = find_tower(model)
    encoder_layers = tower.encoder.layers
    layers = default_layers(len(encoder_layers)) if layers is None else layers
    if not layers or not all(0 <= layer < len(encoder_layers) for layer in layers):
        raise ValueError(f"layers must be a non-empty list of layers in [0, {len(encoder_layers)}), got {layers}")
    if inner is not None:
        _check_feature_layers(inner.config, layers, len(encoder_layers))
    state = EvoPruneState(
        keep_ratio=keep_ratio,
        layers=layers,
        alpha=alpha,
        merge=merge,
        proportional_attention=proportional_attention,
        metric=metric,
        step=evoprune_step if step is None else step,
        adapter=adapter,
        processor=processor,
    )
    _swap(tower.encoder, _Encoder, state)
    for i, layer in enumerate(encoder_layers):
        _swap(layer, _EncoderLayer, state, i)
        _swap(layer.self_attn, _Attention, state, i)
    head = getattr(tower, adapter.head, None) if adapter.head else None
    if head is not None:
        _swap(head, adapter.head_mixin, state)
    tower.evoprune_state = state
    return state


def _check_feature_layers(config, layers: list[int], num_layers: int) -> None:
    """The language model reads the tower's hidden states at `config.vision_feature_layer`: each must come after
    the last pruning layer, or its token count would not be the pruned one the processor announces."""
    chosen = config.vision_feature_layer
    for feature_layer in [chosen] if isinstance(chosen, int) else chosen:
        # hidden_states[i] is the output of layer i - 1 (hidden_states[0]: the embeddings).
        produced_by = (feature_layer % (num_layers + 1)) - 1
        if produced_by < layers[-1]:
            raise ValueError(
                f"layers: the model reads vision_feature_layer={feature_layer} (the output of layer {produced_by}), "
                f"so every pruning layer must be <= {produced_by}; got {layers}"
            )


def _restore(obj) -> None:
    """Give `obj` its class back and drop what the patch stored on it (every `_evoprune*` attribute)."""
    obj.__class__ = obj._evoprune_base
    for name in [name for name in vars(obj) if name.startswith("_evoprune")]:
        delattr(obj, name)


def unpatch(model: nn.Module) -> nn.Module:
    """Undo `patch` in place, on the model and the processor it patched (a no-op on a model that is not
    patched); returns `model`."""
    from evoprune_ext.adapters import find_family

    state = vars(model).get("evoprune_state")
    if state is not None:
        if state.processor is not None and "_evoprune" in vars(state.processor):
            _restore(state.processor)
        inner, family = find_family(model)
        if family is not None and family.unpatch_tower is not None:
            family.unpatch_tower(inner)
    for module in model.modules():
        if "_evoprune" in vars(module):
            _restore(module)
        vars(module).pop("evoprune_state", None)
    return model
