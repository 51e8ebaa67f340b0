"""EvoPrune inside a ViT tower (CLIP, SigLIP): the tower's encoder, encoder layers and attention modules get
mixins (`evoprune_ext.swap`) and share one `EvoPruneState`, which is how a `ViTTower` patches it.

    model = transformers.CLIPVisionModel.from_pretrained("openai/clip-vit-large-patch14-336")
    evoprune_ext.patch(model, keep_ratio=0.25)
    out = model(pixel_values)                  # out.last_hidden_state: [B, 1 + 144, 1024] instead of [B, 577, 1024]
    model.evoprune_state.slot                  # [B, 577]: where each input token went (-1: dropped)

How (SPEC.md section 7), in the manner of ToMe's `tome/patch/timm.py`: at a scheduled layer the patched attention
also hands the state the importance (the attention probabilities it computed with eager attention;
`importance_from_qk` on its q and k with SDPA or FlashAttention, so no N x N matrix is stored) and the keys
averaged over heads (the similarity metric); the patched layer then prunes after the attention's residual add,
before the MLP. Token sizes carry from step to step, and with `proportional_attention` every later attention adds
log(size) to the keys' logits.

One forward pass at a time per patched model: the state records the last pass. Training with gradient
checkpointing is not supported (the recomputation would prune twice).
"""

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from evoprune_ext.pruning import Step, evoprune_step, resolve_alpha
from evoprune_ext.schedule import check_budget, check_keep_ratio, resolve_layers, schedule_keeps
from evoprune_ext.swap import swap

__all__ = ["METRICS", "EvoPruneState", "PruneStep", "ViTTower"]

METRICS = ("keys", "hidden")


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
    """The configuration of a patched ViT tower (`model.evoprune_state`) and what its last forward pass did.

    After a forward pass: `steps` (one `PruneStep` per scheduled layer), `slot` [B,N0] (the output position of
    each encoder-input token, -1 if dropped), `index` [B,K] (the encoder-input position of each output token's
    kept token, None if a custom step gave no index) and `sizes` [B,K] (patches per output token). With CLIP the
    input tokens are the CLS then the patches in raster order, so `slot[:, 1:].view(B, rows, cols)` is the map
    from image patches to output tokens; SigLIP has no CLS. With `merge=False` a dropped token's slot still names
    the kept token most similar to it, which did not absorb it.

    Video under `budget="clip"`: inside `with state.clips(frames=F):` the inputs are videos of F consecutive
    frames, and the first pruning step pools the frames of each video into one sequence of F * N tokens (frame
    after frame), of which the video keeps `kept_tokens(F * N, keep_ratio)` wherever they are. The tower then
    outputs [videos, K, D]; `slot` [videos, F * N] and `index` [videos, K] refer to positions in that pool, so
    `index // N` is the frame of each output token and `index % N` its patch. Attention stays within a frame."""

    def __init__(
        self, *, keep_ratio, layers, alpha, merge, proportional_attention, metric, step, adapter, budget="frame",
        processor=None,
    ):
        self.keep_ratio = keep_ratio
        self.budget = budget
        self.layers = layers
        self.alpha = alpha
        self.merge = merge
        self.proportional_attention = proportional_attention
        self.metric = metric
        self.step = step
        self.adapter = adapter  # the tower's ViTTower
        self.protect = adapter.protect
        self.processor = processor  # the processor `patch` was given, restored by `unpatch`
        self._clip_frames: int | None = None  # frames per video of the inputs, inside `clips`
        self._reset()

    @contextmanager
    def clips(self, frames: int) -> Iterator["EvoPruneState"]:
        """Within this block the tower's inputs are videos of `frames` consecutive frames each; under the clip
        budget each video's frames share one budget. No effect under the frame budget."""
        if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
            raise ValueError(f"frames must be a positive int, got {frames!r}")
        outer, self._clip_frames = self._clip_frames, frames
        try:
            yield self
        finally:
            self._clip_frames = outer

    def _reset(self):
        self.steps: list[PruneStep] = []
        self.sizes: Tensor | None = None
        self.slot: Tensor | None = None
        self.index: Tensor | None = None
        self._keeps: dict[int, int] = {}  # layer -> tokens left after its step
        self._pending = None  # (importance, keys metric) from the attention of the layer about to prune
        self.frames: int | None = None  # frames per video pooled by this pass (clip budget), else None
        self._frame_tokens = 0  # tokens per frame at the encoder input
        # After the first clip step: per video, the tokens of each of its frames (attention stays within them).
        self.frame_lengths: list[list[int]] | None = None

    def begin(self, hidden: Tensor) -> None:
        """Start a forward pass on the encoder input `hidden` [B,N0,D]."""
        self._reset()
        batch, tokens = hidden.shape[:2]
        frames = self._clip_frames if self.budget == "clip" else None
        if frames is not None:
            if batch % frames:
                raise ValueError(f"the tower got {batch} frames, not a whole number of videos of {frames} frames")
            batch, tokens = batch // frames, tokens * frames  # one pool per video
        if round((tokens - self.protect) * self.keep_ratio) < 1:
            raise ValueError(f"keep_ratio={self.keep_ratio} keeps no patch of {tokens - self.protect}")
        keeps = schedule_keeps(tokens, self.protect, self.keep_ratio, len(self.layers))
        # A step that would keep every token is skipped, so that keep_ratio=1 runs the unpatched model's exact
        # arithmetic (no log(1) bias, no identity merge) and reproduces its outputs bit for bit.
        self._keeps = {layer: keep for layer, keep in zip(self.layers, keeps) if keep < tokens}
        self.frames, self._frame_tokens = frames, hidden.shape[1]
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
        if self.frames is not None and self.frame_lengths is None:  # the first clip step: pool each video's frames
            hidden, metric, importance, sizes = (
                None if t is None else t.reshape(t.shape[0] // self.frames, -1, *t.shape[2:])
                for t in (hidden, metric, importance, sizes)
            )
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
        if self.frames is not None:
            if self.index is None:
                raise RuntimeError("budget='clip' needs a pruning step that returns the kept index: without it the "
                                   "frame of each kept token is unknown")
            frame = self.index // self._frame_tokens  # ascending: each frame's tokens are contiguous
            counts = torch.zeros(frame.shape[0], self.frames, dtype=torch.long, device=frame.device)
            self.frame_lengths = counts.scatter_add_(1, frame, torch.ones_like(frame)).tolist()
        return out


class PrunedEncoder:
    """Mixed into CLIPEncoder / SiglipEncoder: every forward pass starts a new record."""

    def forward(self, inputs_embeds, attention_mask=None, **kwargs):
        if attention_mask is not None:
            raise ValueError("an EvoPrune-patched vision encoder takes no attention_mask: pruning changes the tokens")
        self._evoprune.begin(inputs_embeds)
        return super().forward(inputs_embeds, attention_mask, **kwargs)


class PrunedEncoderLayer:
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


class PrunedAttention:
    """Mixed into CLIPAttention / SiglipAttention: adds log(size) to the logits, and at a pruning layer hands the
    importance and the keys to the state."""

    def forward(self, hidden_states, attention_mask=None, **kwargs):
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
        prunes = state.prunes_at(self._evoprune_layer)

        def attend(queries, keys, values, mask, bias):
            output, weights = attention(
                self, queries, keys, values, mask, scaling=self.scale,
                dropout=0.0 if not self.training else self.dropout, **kwargs,
            )
            if not prunes:
                return output, weights, None
            probabilities = weights if implementation == "eager" else None
            return output, weights, self._importance(queries, keys, probabilities, bias)

        if state.frame_lengths is None:
            attn_output, attn_weights, importance = attend(queries, keys, values, mask, bias)
        else:
            attn_output, importance = _attend_per_frame(attend, state.frame_lengths, queries, keys, values, bias)
            attn_weights = None  # ragged: one matrix per frame
        if prunes:
            state._pending = (importance, keys.mean(dim=1) if state.metric == "keys" else None)
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


def _attend_per_frame(attend, frame_lengths, queries, keys, values, bias):
    """Attention within each frame of pooled videos (clip budget): row v of queries, keys, values [V,H,K,d] and
    bias [V,1,1,K] holds video v's frames one after the other, `frame_lengths[v]` tokens each. Returns the
    attention output [V,K,H,d] and the importance [V,K] (None when `attend` gives none)."""
    outputs, importances = [], []
    for video, lengths in enumerate(frame_lengths):
        pieces = [t[video : video + 1].split(lengths, dim=2) for t in (queries, keys, values)]
        biases = [None] * len(lengths) if bias is None else bias[video : video + 1].split(lengths, dim=3)
        frames = [attend(q, k, v, b, b) for q, k, v, b, n in zip(*pieces, biases, lengths) if n]
        outputs.append(torch.cat([output for output, _, _ in frames], dim=1))
        importances.append(None if frames[0][2] is None else torch.cat([imp for _, _, imp in frames], dim=1))
    importance = None if importances[0] is None else torch.cat(importances)
    return torch.cat(outputs), importance


@dataclass(frozen=True)
class ViTTower:
    """What EvoPrune must know of a family of ViT towers; its adapter (`adapters/clip.py`, `adapters/siglip.py`)
    fills it in. A tower is the module that holds `embeddings` and `encoder` (in transformers 5,
    `CLIPVisionModel` and `SiglipVisionModel`; in older releases their `vision_model`)."""

    family: str
    embeddings: type  # class of the tower's `embeddings`: this is how a tower is recognized
    protect: int  # leading tokens always kept (CLIP's CLS)
    cls_importance: bool  # importance = attention of the CLS query row (True) or mean over all query rows (False)
    eager_attention: Callable  # the family's eager attention function (returns the probabilities)
    head: str | None = None  # attribute of an attention-pooling head that should see the token sizes
    head_mixin: type | None = None  # class mixed into that head to make it size-aware

    def recognizes(self, module: nn.Module) -> bool:
        return isinstance(getattr(module, "embeddings", None), self.embeddings) and hasattr(module, "encoder")

    def depth(self, tower: nn.Module) -> int:
        return len(tower.encoder.layers)

    def patch(
        self,
        tower: nn.Module,
        *,
        keep_ratio: float,
        layers: list[int] | None,
        alpha: float | None,
        merge: bool,
        proportional_attention: bool,
        metric: str,
        step: Step | None,
        budget: str = "frame",
    ) -> EvoPruneState:
        """Make `tower` prune after the attention of `layers` (the options of `evoprune_ext.patch`); its state
        (also `tower.evoprune_state`)."""
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        if check_budget(budget) == "clip" and self.protect:
            raise ValueError(f"budget='clip' needs a tower without protected tokens; {self.family} has {self.protect}")
        state = EvoPruneState(
            keep_ratio=check_keep_ratio(keep_ratio),
            layers=resolve_layers(layers, self.depth(tower)),
            alpha=resolve_alpha(alpha),
            merge=merge,
            proportional_attention=proportional_attention,
            metric=metric,
            step=evoprune_step if step is None else step,
            adapter=self,
            budget=budget,
        )
        swap(tower.encoder, PrunedEncoder, state)
        for i, layer in enumerate(tower.encoder.layers):
            swap(layer, PrunedEncoderLayer, state, layer=i)
            swap(layer.self_attn, PrunedAttention, state, layer=i)
        head = getattr(tower, self.head, None) if self.head else None
        if head is not None:
            swap(head, self.head_mixin, state)
        tower.evoprune_state = state
        return state
