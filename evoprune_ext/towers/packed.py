"""EvoPrune inside a packed vision tower: the plumbing Qwen-VL-style towers share (Qwen2.5-VL, Qwen3-VL, in
transformers and in vLLM).

Such a tower has no batch: every image and video frame of a request is packed into one sequence of patch tokens,
full attention runs per frame (`cu_seqlens`), rotary embeddings give each token its (h, w) position, and a merger
fuses each 2x2 unit of 4 consecutive tokens into one feature. So pruning here
- keeps whole units: a unit is one row of its 4 tokens' features, `[units, UNIT * D]`, and a dropped unit merges
  element-wise into the kept unit most similar to it (`pruning.prune_units`, one sequence per frame);
- keeps `round(units * keep_ratio)` units of every frame, a static count reached step by step
  (`schedule.frame_keeps`); under the clip budget the frames of a video are one pool that keeps
  `round(frames * units * keep_ratio)` wherever they are, and attention still runs per frame over the units each
  frame has left (a frame may keep none); unit sizes carry from step to step (hierarchical merging), attention is
  not made size-aware;
- measures a unit by its 4 tokens: metric, the mean of their keys averaged over heads, taken before the rotary
  embedding so that it compares content, not position (each kept unit keeps its own position anyway);
  importance, the attention its 4 tokens receive within their frame (`importance_from_qk_packed` on the rotated
  queries and keys the attention used), summed;
- tracks each unit left by its global raster id over (t, h/2, w/2), grid_thw row after row: the state's `kept`.

An adapter (`adapters/qwen2_5_vl.py`, `adapters/qwen3_vl.py`, and vLLM's in `vllm/`) writes its tower's forward
with these pieces in a mixin and describes the tower with a `PackedTower`; it says only what differs: window
attention and window order (2.5), learned positions and deepstack mergers (3).
"""

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn

from evoprune_ext.pruning import prune_units, resolve_alpha
from evoprune_ext.schedule import MERGE, UNIT, check_budget, check_keep_ratio, frame_keeps, frame_units, resolve_layers
from evoprune_ext.swap import swap

__all__ = ["PackedState", "PackedTower", "Units", "WindowUnits", "attention_then_prune",
           "kept_units", "prune_after_attention"]


@dataclass
class PackedState:
    """The configuration of a patched packed tower (`visual.evoprune_state`) and what its last forward pass kept:
    `kept[i]` holds the raster indices (over t, h/2, w/2) of the units kept of grid_thw row i, ascending."""

    keep_ratio: float
    layers: list[int]
    alpha: float
    budget: str = "frame"
    kept: list[Tensor] = field(default_factory=list)
    processor: object | None = None  # the processor `evoprune_ext.patch` recounted, restored by `unpatch`

    def pools(self, grid: list[list[int]]) -> list[int]:
        """Units of each pruning pool of the (t, h, w) grids `grid`: every frame, or under the clip budget every
        grid_thw row (a video's frames together; an image)."""
        if self.budget == "clip":
            return [t * (h // MERGE) * (w // MERGE) for t, h, w in grid]
        return frame_units(grid)

    def keeps(self, grid: list[list[int]]) -> dict[int, list[int]]:
        """{layer: units each pool keeps after that layer's step}; the last step lands on round(units * keep_ratio)."""
        return frame_keeps(self.pools(grid), self.keep_ratio, self.layers)


@dataclass
class Units:
    """The units left, in the tower's token order, and what its attention needs to know about them."""

    ids: Tensor  # [U] global raster id of each unit
    frames: list[int]  # units per frame, frames in order (each frame's units are consecutive)
    pools: list[int]  # units per pruning pool, pools in order: frames, or a video's frames (PackedState.pools)
    sizes: Tensor  # [U] float32: how many original units each unit stands for
    position_embeddings: tuple[Tensor, Tensor]  # rotary cos, sin [UNIT * U, head_dim]

    def cu_seqlens(self) -> Tensor:
        """Full-attention segments: one per frame that has units left, in tokens."""
        counts = torch.tensor(self.frames, dtype=torch.int32, device=self.ids.device) * UNIT
        return nn.functional.pad(counts.cumsum(0, dtype=torch.int32), (1, 0)).unique_consecutive()

    def select(self, index: Tensor, sizes: Tensor, pools: list[int]) -> "Units":
        """The units at positions `index` (ascending within each pool), with their new sizes; `pools`: how many
        each pool kept."""
        tokens = (index[:, None] * UNIT + torch.arange(UNIT, device=index.device)).flatten()
        cos, sin = self.position_embeddings
        frames = pools
        if self.pools != self.frames:  # pools span frames: count what each frame kept
            frame = torch.repeat_interleave(torch.tensor(self.frames, device=index.device))
            frames = torch.bincount(frame[index], minlength=len(self.frames)).tolist()
        return replace(self, ids=self.ids[index], frames=frames, pools=pools, sizes=sizes,
                       position_embeddings=(cos[tokens], sin[tokens]))


@dataclass
class WindowUnits(Units):
    """Units in window order, with the window of each (Qwen2.5-VL's window attention, in transformers and vLLM)."""

    window: Tensor  # [U] window of each unit (ascending)

    def cu_window_seqlens(self) -> Tensor:
        """Window-attention segments, in tokens; windows without units are left out, as the tower does."""
        counts = torch.bincount(self.window) * UNIT
        return nn.functional.pad(counts.cumsum(0, dtype=torch.int32), (1, 0)).unique_consecutive()

    def select(self, index: Tensor, sizes: Tensor, pools: list[int]) -> "WindowUnits":
        return replace(super().select(index, sizes, pools), window=self.window[index])


def attention_then_prune(
    block: nn.Module,
    hidden: Tensor,
    units: Units,
    keep: list[int],
    alpha: float,
    apply_rotary,
    carried: list[Tensor],
    **attention_kwargs,
) -> tuple[Tensor, Units, list[Tensor]]:
    """One tower block (norm1, attn with qkv, norm2, mlp) with a pruning step between its attention and its MLP,
    each pool keeping `keep[pool]` units. `apply_rotary(q, k, cos, sin)` is the family's rotary embedding.
    `carried`: earlier hidden states of the same units (Qwen3-VL's deepstack inputs), which undergo the same
    selection and merge. Returns (hidden, the units left, carried)."""
    captured = []
    hook = block.attn.qkv.register_forward_hook(lambda module, args, output: captured.append(output.detach()))
    try:
        hidden = hidden + block.attn(
            block.norm1(hidden), position_embeddings=units.position_embeddings, **attention_kwargs
        )
    finally:
        hook.remove()
    queries, keys, _ = captured[0].reshape(hidden.shape[0], 3, block.attn.num_heads, -1).unbind(1)  # [tokens, H, d]
    hidden, units, carried = prune_after_attention(
        hidden, queries, keys, units, keep, alpha, apply_rotary, block.attn.scaling, carried
    )
    return hidden + block.mlp(block.norm2(hidden)), units, carried


def prune_after_attention(
    hidden: Tensor,
    queries: Tensor,
    keys: Tensor,
    units: Units,
    keep: list[int],
    alpha: float,
    apply_rotary,
    scaling: float,
    carried: list[Tensor],
    all_heads=None,
) -> tuple[Tensor, Units, list[Tensor]]:
    """The pruning step of `attention_then_prune`, for a tower whose blocks are written differently (vLLM's):
    `hidden` [tokens, D], the residual stream after the attention; `queries`, `keys` [tokens, H, d], the
    attention's projections before the rotary embedding. `all_heads`, where these are only some of the heads
    (tensor parallelism: the others are on other ranks): maps a float32 mean over these heads, [units, C], to the
    mean over all heads. Returns (hidden of the units left, those units, carried)."""
    dim = hidden.shape[1]
    metric = keys.float().mean(1).view(-1, UNIT, keys.shape[-1]).mean(1)
    # Importance from the logits the attention computed: rotated queries and keys.
    queries, keys = apply_rotary(queries, keys, *units.position_embeddings)
    frame_tokens = [n * UNIT for n in units.frames]
    importance = torch.ops.evoprune.importance_from_qk_packed(
        queries.transpose(0, 1), keys.transpose(0, 1), scaling, q_lengths=frame_tokens, k_lengths=frame_tokens,
    ).view(-1, UNIT).sum(1)
    if all_heads is not None:
        # Both are means over heads: one call for the two, and every rank holding heads then selects alike.
        both = all_heads(torch.cat([metric, importance[:, None]], dim=1))
        metric, importance = both[:, :-1], both[:, -1]
    out, index, sizes, carried = prune_units(
        hidden.reshape(-1, UNIT * dim), importance, metric.to(hidden.dtype), units.sizes, units.pools, keep,
        alpha, [rows.reshape(-1, UNIT * dim) for rows in carried],
    )
    carried = [rows.view(-1, dim) for rows in carried]
    return out.view(-1, dim), units.select(index, sizes, keep), carried


def kept_units(units: Units, grid: list[list[int]]) -> list[Tensor]:
    """The raster ids of the units left, one ascending LongTensor per grid_thw row, local to that row."""
    starts = [sum(t for t, _, _ in grid[:i]) for i in range(len(grid))]  # first frame of each row
    per_row = units.ids.sort().values.split([sum(units.frames[s : s + t]) for s, (t, _, _) in zip(starts, grid)])
    row_units = [t * (h // MERGE) * (w // MERGE) for t, h, w in grid]
    return [ids - sum(row_units[:i]) for i, ids in enumerate(per_row)]


# What the packed step does, in the terms of `evoprune_ext.patch`'s ViT options: it merges, by the keys, with
# EvoPrune's own step. (Its attention does not add log(size); proportional_attention is accepted as the default.)
PACKED_OPTIONS = dict(merge=True, proportional_attention=True, metric="keys", step=None)


@dataclass(frozen=True)
class PackedTower:
    """A packed tower class and the mixin whose `forward` prunes it (written with the pieces above)."""

    family: str
    tower: type
    mixin: type

    def recognizes(self, module: nn.Module) -> bool:
        return isinstance(module, self.tower)

    def depth(self, visual: nn.Module) -> int:
        return len(visual.blocks)

    def patch(self, visual: nn.Module, *, keep_ratio: float, layers: list[int] | None, alpha: float | None,
              budget: str = "frame", **options) -> PackedState:
        """Make `visual` prune after the attention of `layers`, each frame keeping `round(units * keep_ratio)` of
        its 2x2 merge units; its state (also `visual.evoprune_state`). `options` (`evoprune_ext.patch`'s ViT
        options) are accepted only at what this plumbing does (`PACKED_OPTIONS`)."""
        changed = [name for name, value in options.items() if value != PACKED_OPTIONS[name]]
        if changed:
            raise ValueError(f"{', '.join(changed)}: not supported for {self.family}'s tower; leave the default")
        if not self.recognizes(visual):
            raise TypeError(f"visual must be a {self.tower.__name__}, got {type(visual).__name__}")
        if visual.spatial_merge_size != MERGE:
            raise ValueError(f"the tower must merge 2x2 patches, got spatial_merge_size={visual.spatial_merge_size}")
        state = PackedState(check_keep_ratio(keep_ratio), resolve_layers(layers, self.depth(visual)),
                            resolve_alpha(alpha), check_budget(budget))
        swap(visual, self.mixin, state)
        visual.evoprune_state = state
        return state
