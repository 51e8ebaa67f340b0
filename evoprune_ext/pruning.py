"""The pruning step, on a batch `[B, N, D]` (ViT towers) and on packed sequences of merge units (Qwen-VL towers):
the ops (`torch.ops.evoprune.*`) with the bookkeeping every tower needs around them. Next to `schedule.py`, the
bottom of the model side (docs/ARCHITECTURE.md)."""

from collections.abc import Callable

import torch
from torch import Tensor

from evoprune_ext.defaults import DEFAULT_ALPHA

__all__ = ["Step", "evoprune_step", "prune_units", "resolve_alpha"]

# step(hidden, metric, importance, sizes, *, keep, protect, alpha, merge) -> (hidden, sizes, slot[, index])
Step = Callable[..., tuple]


def resolve_alpha(alpha: float | None) -> float:
    """The weight of importance against diversity (SPEC.md section 3): DEFAULT_ALPHA for None."""
    alpha = DEFAULT_ALPHA if alpha is None else float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    return alpha


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


def prune_units(
    rows: Tensor,
    importance: Tensor,
    metric: Tensor,
    sizes: Tensor,
    lengths: list[int],
    keep: list[int],
    alpha: float,
    carried: list[Tensor],
) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
    """Prune packed sequences of units (one row each, `[U, W]`; sequence i is `lengths[i]` rows and keeps
    `keep[i]`) with `torch.ops.evoprune.prune_packed`: importance [U] float32, metric [U, Dm], sizes [U].
    `carried`: other `[U, W]` states of the same units, given the same selection and merge.
    Returns (the kept rows with the dropped ones merged in, their index among the U rows, their sizes, carried)."""
    out, index, sizes_out, slot = torch.ops.evoprune.prune_packed(
        rows, importance, lengths=lengths, keep=keep, metric=metric, sizes=sizes, alpha=alpha
    )
    # The packed slot never crosses sequences, so all of them merge as one batched sample.
    carried = [torch.ops.evoprune.merge(other[None], index[None], slot[None], sizes[None])[0] for other in carried]
    return out, index, sizes_out, carried
