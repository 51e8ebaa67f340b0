"""Python side of the evoprune ops: fake kernels and the friendly ``prune``.

The schemas live in ``csrc/ops.cpp``, the kernels in ``csrc/cpu`` and ``csrc/cuda``, and the
autograd of ``prune`` and ``merge`` in ``csrc/autograd.cpp``. Here:
- ``register_fake`` for every op, so meta tensors, FakeTensor and ``torch.compile`` see the shapes;
- ``prune(...)``, a convenience wrapper over ``torch.ops.evoprune.prune``;
- ``lengths_from_cu_seqlens``, the int lists the ``*_packed`` ops take, from varlen attention's offsets.

The ``*_packed`` ops need no fake kernel or autograd here: csrc/packed.cpp composes them from the
batched ops (CompositeImplicitAutograd).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .defaults import DEFAULT_ALPHA

__all__ = ["Pruned", "lengths_from_cu_seqlens", "prune"]


class Pruned(NamedTuple):
    """Result of :func:`prune`: kept tokens, their original positions, their sizes, and the
    output position that carries each original token (-1 if it was dropped)."""

    out: torch.Tensor
    index: torch.Tensor
    sizes: torch.Tensor
    slot: torch.Tensor


# ---------------------------------------------------------------------------- fake kernels
# Shapes only; the real kernels validate everything (csrc/checks.cpp). Devices are checked here
# too, because a tensor on the meta device beside a real one dispatches to these kernels.


def _check_devices(reference_name, reference, **others):
    for name, t in others.items():
        torch._check(
            t is None or t.device == reference.device,
            lambda: f"{name} must be on the device of {reference_name} ({reference.device}), got {t.device}",
        )


@torch.library.register_fake("evoprune::prune")
def _prune_fake(tokens, attn, *, keep, metric=None, sizes=None, alpha=DEFAULT_ALPHA, protect=0, merge=True):
    torch._check(tokens.dim() == 3, lambda: f"tokens must have shape [B, N, D], got {tuple(tokens.shape)}")
    _check_devices("tokens", tokens, attn=attn, metric=metric, sizes=sizes)
    batch, n, d = tokens.shape
    return (
        tokens.new_empty(batch, keep, d),
        tokens.new_empty(batch, keep, dtype=torch.int64),
        tokens.new_empty(batch, keep, dtype=torch.float32),
        tokens.new_empty(batch, n, dtype=torch.int64),
    )


@torch.library.register_fake("evoprune::select")
def _select_fake(metric, importance, *, keep, alpha=DEFAULT_ALPHA, protect=0):
    torch._check(metric.dim() == 3, lambda: f"metric must have shape [B, N, Dm], got {tuple(metric.shape)}")
    _check_devices("metric", metric, importance=importance)
    batch, n, _ = metric.shape
    return metric.new_empty(batch, keep, dtype=torch.int64), metric.new_empty(batch, n, dtype=torch.int64)


@torch.library.register_fake("evoprune::merge")
def _merge_fake(tokens, index, slot, sizes=None):
    torch._check(tokens.dim() == 3, lambda: f"tokens must have shape [B, N, D], got {tuple(tokens.shape)}")
    torch._check(index.dim() == 2, lambda: f"index must have shape [B, K], got {tuple(index.shape)}")
    _check_devices("tokens", tokens, index=index, slot=slot, sizes=sizes)
    batch, keep = index.shape
    return tokens.new_empty(batch, keep, tokens.shape[2]), tokens.new_empty(batch, keep, dtype=torch.float32)


@torch.library.register_fake("evoprune::importance")
def _importance_fake(attn):
    torch._check(attn.dim() == 4, lambda: f"attn must have shape [B, H, Q, N], got {tuple(attn.shape)}")
    return attn.new_empty(attn.shape[0], attn.shape[3], dtype=torch.float32)


@torch.library.register_fake("evoprune::importance_from_qk")
def _importance_from_qk_fake(q, k, scale):
    torch._check(k.dim() == 4, lambda: f"k must have shape [B, H, N, d], got {tuple(k.shape)}")
    _check_devices("q", q, k=k)
    return q.new_empty(k.shape[0], k.shape[2], dtype=torch.float32)


# ---------------------------------------------------------------------------- friendly API


def prune(
    tokens: torch.Tensor,
    attn: torch.Tensor | None = None,
    *,
    keep: int | None = None,
    ratio: float | None = None,
    metric: torch.Tensor | None = None,
    sizes: torch.Tensor | None = None,
    alpha: float = DEFAULT_ALPHA,
    protect: int = 0,
    merge: bool = True,
) -> Pruned:
    """Keep ``keep`` tokens (or ``protect + round(ratio * (N - protect))``) of ``tokens``.

    ``tokens`` is ``[B, N, D]`` or unbatched ``[N, D]`` (then ``attn`` is ``[H, Q, N]`` or
    ``[N]``, ``metric`` ``[N, Dm]`` and ``sizes`` ``[N]``, and the results are unbatched too).
    ``attn``: attention probabilities ``[B, H, Q, N]``, an importance ``[B, N]``, or None.
    See ``torch.ops.evoprune.prune`` and docs/ALGORITHM.md for the rest.
    """
    if (keep is None) == (ratio is None):
        raise ValueError("pass exactly one of keep (a token count) and ratio (a fraction in [0, 1])")
    unbatched = tokens.dim() == 2
    if unbatched:
        tokens = tokens.unsqueeze(0)
        attn = None if attn is None else attn.unsqueeze(0)
        metric = None if metric is None else metric.unsqueeze(0)
        sizes = None if sizes is None else sizes.unsqueeze(0)
    if ratio is not None:
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"ratio must be in [0, 1], got {ratio}")
        keep = protect + round(ratio * (tokens.shape[1] - protect))
    result = torch.ops.evoprune.prune(
        tokens, attn, keep=keep, metric=metric, sizes=sizes, alpha=alpha, protect=protect, merge=merge
    )
    if unbatched:
        result = tuple(t.squeeze(0) for t in result)
    return Pruned(*result)


def lengths_from_cu_seqlens(cu_seqlens: torch.Tensor) -> list[int]:
    """Sequence lengths from cumulative offsets ``[0, n_0, n_0 + n_1, ...]`` (varlen attention's
    ``cu_seqlens``), as the ``lengths`` of the ``*_packed`` ops. Reads the tensor: one device sync,
    which is why the ops take int lists and not this tensor."""
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must have shape [sequences + 1], got {tuple(cu_seqlens.shape)}")
    offsets = cu_seqlens.tolist()
    lengths = [end - start for start, end in zip(offsets, offsets[1:])]
    if offsets[0] != 0 or min(lengths) < 0:
        raise ValueError(f"cu_seqlens must start at 0 and never decrease, got {offsets}")
    return lengths
