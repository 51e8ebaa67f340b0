"""Pure-PyTorch reference of the ops defined in SPEC.md.

This file is where the algorithm is meant to be read: it is vectorized over the batch and runs one Python
step per greedy iteration, with no fusion and no cleverness. The CPU and CUDA kernels follow it exactly,
including the conventions SPEC.md leaves open:

- accumulation dtype ("acc"): float64 when the inputs are float64, else float32 (also for float16/bfloat16);
- norms of the metric are taken in float64 before the unit vectors are cast to acc;
- a merged output position whose group is just its kept token, or whose sizes sum to 0, is that token copied
  bit for bit.

It materializes the N x N similarity and the attention, so it is meant for tests, not for large inputs.
"""

import math

import torch
from torch import Tensor

from evoprune_ext.defaults import DEFAULT_ALPHA


def _acc_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------------------
# SPEC 1 and 6: importance


def importance(attn: Tensor) -> Tensor:
    """[B,H,Q,N] attention probabilities -> [B,N] float32 mean over heads and query rows."""
    if attn.dim() != 4:
        raise ValueError(f"attn must have shape [B,H,Q,N], got {tuple(attn.shape)}")
    return attn.to(_acc_dtype(attn)).mean(dim=(1, 2)).float()


def importance_from_qk(q: Tensor, k: Tensor, scale: float) -> Tensor:
    """importance(softmax(scale * q @ k^T)) for q [B,H,Q,d], k [B,H,N,d].

    The kernels never store the Q x N attention; the reference does, because that is the definition.
    """
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must have shape [B,H,Q,d] and [B,H,N,d], got {tuple(q.shape)} and {tuple(k.shape)}")
    acc = _acc_dtype(q)
    logits = scale * (q.to(acc) @ k.to(acc).transpose(-1, -2))
    return logits.softmax(dim=-1).mean(dim=(1, 2)).float()


# --------------------------------------------------------------------------------------------------------
# SPEC 1-3: the pieces of the greedy selection


def _normalized_importance(imp: Tensor, protect: int) -> Tensor:
    """ti of SPEC 1 in imp's dtype, [B,N]. Protected positions get -inf: they are never candidates."""
    ti = torch.full_like(imp, -math.inf)
    candidates = imp[:, protect:]
    if candidates.shape[1] == 0:
        return ti
    finite = candidates.isfinite()
    # Largest finite importance among the candidates; -inf when there is none.
    largest = candidates.masked_fill(~finite, -math.inf).amax(dim=1, keepdim=True)
    # Dividing by a non-positive (or missing) maximum would flip or blow up the order, so importance is ignored.
    scaled = torch.where(largest > 0, candidates / largest, 0.0)
    # A NaN or infinite importance must never make a token preferred, whatever the maximum is.
    ti[:, protect:] = scaled.masked_fill(~finite, -math.inf)
    return ti


def _unit_vectors(metric: Tensor, acc: torch.dtype) -> Tensor:
    """u of SPEC 2. The norm is taken in float64 so float16/bfloat16/float32 metrics neither overflow nor lose it."""
    m64 = metric.double()
    return (m64 / m64.norm(dim=-1, keepdim=True).clamp_min(1e-6)).to(acc)


def _first_argmax(score: Tensor, available: Tensor) -> Tensor:
    """Per row: index of the largest score, smallest index on ties (what torch.argmax returns);
    the smallest available index when every score is -inf (then argmax could return an unavailable one)."""
    best = score.argmax(dim=1)
    stuck = score.amax(dim=1) == -math.inf
    first_available = available.to(torch.uint8).argmax(dim=1)
    return torch.where(stuck, first_available, best)


def _greedy(ti: Tensor, sim: Tensor, n_choose: int, alpha: float, protect: int) -> tuple[Tensor, Tensor]:
    """SPEC 3 for every sample at once. Returns the picks [B,K'] in pick order and owner [B,N]."""
    B, N = ti.shape
    device = ti.device
    red = torch.full((B, N), -1.0, dtype=sim.dtype, device=device)  # similarity to the closest chosen token
    owner = torch.full((B, N), -1, dtype=torch.long, device=device)
    available = torch.zeros((B, N), dtype=torch.bool, device=device)
    available[:, protect:] = True
    rows = torch.arange(B, device=device)
    picks = []
    for _ in range(n_choose):
        score = alpha * ti + (1 - alpha) * (1 - red) / 2
        # NaN (e.g. 0 * -inf when alpha = 0) counts as -inf; taken tokens and protected ones are out of the race.
        score = score.masked_fill(score.isnan() | ~available, -math.inf)
        pick = _first_argmax(score, available)
        picks.append(pick)
        available[rows, pick] = False
        # Every token (protected ones included) now remembers whether the new pick is its closest chosen token.
        # A token without owner takes the first pick it has a number for (even -1: rounding must not decide whether
        # a token is dropped); afterwards strictly greater, so on equal similarity the earlier owner stays. NaN never wins.
        column = sim[rows, :, pick]
        closer = (column > red) | ((owner < 0) & ~column.isnan())
        red = torch.where(closer, column, red)
        owner = torch.where(closer, pick[:, None], owner)
    chosen = torch.stack(picks, dim=1) if picks else torch.empty((B, 0), dtype=torch.long, device=device)
    return chosen, owner


def _index_and_slot(chosen: Tensor, owner: Tensor, protect: int) -> tuple[Tensor, Tensor]:
    """SPEC 4: index = protected positions then the sorted picks; slot = output position carrying each token."""
    B, N = owner.shape
    device = owner.device
    protected = torch.arange(protect, device=device).expand(B, protect)
    index = torch.cat([protected, chosen.sort(dim=1).values], dim=1)
    K = index.shape[1]
    # position[b, j] = output position of token j if it is kept, else -1.
    position = torch.full((B, N), -1, dtype=torch.long, device=device)
    position.scatter_(1, index, torch.arange(K, device=device).expand(B, K))
    owner_position = position.gather(1, owner.clamp_min(0)).masked_fill(owner < 0, -1)
    slot = torch.where(position >= 0, position, owner_position)
    return index, slot


def _check_counts(N: int, keep: int, protect: int, alpha: float) -> None:
    if not 0 <= protect <= N:
        raise ValueError(f"protect must be in [0, N={N}], got {protect}")
    if not protect <= keep <= N:
        raise ValueError(f"keep must be in [protect={protect}, N={N}], got {keep}")
    if not 0.0 <= alpha <= 1.0:  # also rejects NaN
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")


# --------------------------------------------------------------------------------------------------------
# SPEC 3-4: select


def select(
    metric: Tensor, importance: Tensor | None, *, keep: int, alpha: float = DEFAULT_ALPHA, protect: int = 0
) -> tuple[Tensor, Tensor]:
    """Diversity-aware greedy selection. metric [B,N,Dm], importance [B,N] or None -> index [B,K], slot [B,N]."""
    if metric.dim() != 3:
        raise ValueError(f"metric must have shape [B,N,Dm], got {tuple(metric.shape)}")
    B, N, _ = metric.shape
    if importance is not None and importance.shape != (B, N):
        raise ValueError(f"importance must have shape [B,N]=[{B},{N}], got {tuple(importance.shape)}")
    _check_counts(N, keep, protect, alpha)

    acc = _acc_dtype(metric)
    if importance is None:
        ti = torch.zeros((B, N), dtype=acc, device=metric.device)
    else:
        ti = _normalized_importance(importance.to(acc), protect)
    u = _unit_vectors(metric, acc)
    sim = u @ u.transpose(-1, -2)
    chosen, owner = _greedy(ti, sim, keep - protect, alpha, protect)
    return _index_and_slot(chosen, owner, protect)


# --------------------------------------------------------------------------------------------------------
# SPEC 4: merge


def _check_merge_arguments(tokens: Tensor, index: Tensor, slot: Tensor) -> None:
    if tokens.dim() != 3:
        raise ValueError(f"tokens must have shape [B,N,D], got {tuple(tokens.shape)}")
    B, N, _ = tokens.shape
    if index.dim() != 2 or index.shape[0] != B or index.dtype != torch.long:
        raise ValueError(f"index must be int64 of shape [B={B},K], got {index.dtype} {tuple(index.shape)}")
    K = index.shape[1]
    if slot.shape != (B, N) or slot.dtype != torch.long:
        raise ValueError(f"slot must be int64 of shape [B,N]=[{B},{N}], got {slot.dtype} {tuple(slot.shape)}")
    if ((index < 0) | (index >= N)).any():
        raise ValueError(f"index values must be in [0, N={N})")
    if ((slot < -1) | (slot >= K)).any():
        raise ValueError(f"slot values must be in [-1, K={K})")
    if K > 0 and (slot.gather(1, index) != torch.arange(K, device=slot.device)).any():
        raise ValueError("slot must map every kept token to its own position: slot[b, index[b, p]] == p")


def _merge(tokens: Tensor, index: Tensor, slot: Tensor, sizes: Tensor | None) -> tuple[Tensor, Tensor]:
    """Size-weighted average of each output position's group {j : slot[j] = p}, see merge()."""
    B, N, D = tokens.shape
    K = index.shape[1]
    acc = _acc_dtype(tokens)
    if sizes is None:
        sizes = torch.ones((B, N), dtype=torch.float32, device=tokens.device)
    s = sizes.to(acc)
    # Dropped tokens (slot -1) are summed into an extra bin K that is thrown away.
    bins = torch.where(slot >= 0, slot, K)
    total = torch.zeros((B, K + 1), dtype=acc, device=tokens.device).scatter_add(1, bins, s)[:, :K]
    members = torch.zeros((B, K + 1), dtype=torch.long, device=tokens.device)
    members = members.scatter_add(1, bins, torch.ones_like(bins))[:, :K]
    weighted = torch.zeros((B, K + 1, D), dtype=acc, device=tokens.device)
    weighted = weighted.scatter_add(1, bins[..., None].expand(B, N, D), tokens.to(acc) * s[..., None])[:, :K]

    kept = tokens.gather(1, index[..., None].expand(B, K, D))
    # A kept token that received nothing is copied bit for bit (averaging it with itself could round);
    # so is a group whose sizes sum to 0, which has no average.
    copy = (members == 1) | (total == 0)
    # Divide the copied positions by 1 rather than 0, so no NaN reaches the gradient through torch.where.
    averaged = (weighted / torch.where(copy, 1.0, total)[..., None]).to(tokens.dtype)
    out = torch.where(copy[..., None], kept, averaged)
    return out, total.float()


def merge(tokens: Tensor, index: Tensor, slot: Tensor, sizes: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """out[b,p] = sum_{slot[b,j]=p} s[b,j] x[b,j] / sum_{slot[b,j]=p} s[b,j]; sizes_out[b,p] = that sum (float32).

    index [B,K] in [0,N), slot [B,N] in [-1,K) with slot[b, index[b,p]] == p; sizes [B,N], default all ones.
    """
    _check_merge_arguments(tokens, index, slot)
    return _merge(tokens, index, slot, sizes)


# --------------------------------------------------------------------------------------------------------
# The fused op: importance + select + (merge or gather)


def prune(
    tokens: Tensor,
    attn: Tensor | None,
    *,
    keep: int,
    metric: Tensor | None = None,
    sizes: Tensor | None = None,
    alpha: float = DEFAULT_ALPHA,
    protect: int = 0,
    merge: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Keep `keep` of the N tokens. attn: [B,H,Q,N] attention, [B,N] importance, or None.

    Returns (out [B,K,D], index [B,K], sizes_out [B,K] float32, slot [B,N]).
    """
    if metric is None:
        metric = tokens
    imp = importance(attn) if attn is not None and attn.dim() == 4 else attn
    index, slot = select(metric, imp, keep=keep, alpha=alpha, protect=protect)
    if merge:
        out, sizes_out = _merge(tokens, index, slot, sizes)
    else:
        # Pure pruning: the dropped tokens are lost.
        B, N, D = tokens.shape
        out = tokens.gather(1, index[..., None].expand(B, index.shape[1], D))
        if sizes is None:
            sizes = torch.ones((B, N), dtype=torch.float32, device=tokens.device)
        sizes_out = sizes.gather(1, index).float()
    return out, index, sizes_out, slot


# --------------------------------------------------------------------------------------------------------
# Packed sequences (docs/ALGORITHM.md): several sequences in one [T, ...] tensor, each pruned on its own


def _check_packed(total: int, lengths: list[int], keep: list[int]) -> None:
    if any(n < 0 for n in lengths) or sum(lengths) != total:
        raise ValueError(f"lengths must be >= 0 and sum to T={total}, got {list(lengths)}")
    if len(keep) != len(lengths):
        raise ValueError(f"keep must have one entry per sequence ({len(lengths)}), got {len(keep)}")


def _starts(lengths: list[int]) -> list[int]:
    """Where each sequence starts in the packed tensor."""
    return [sum(lengths[:i]) for i in range(len(lengths))]


def _packed_slot(slot: Tensor, output_start: int) -> Tensor:
    """A sequence's slot [n] in output positions of the whole packed output (-1 stays -1)."""
    return torch.where(slot >= 0, slot + output_start, -1)


def select_packed(
    metric: Tensor,
    importance: Tensor | None,
    *,
    lengths: list[int],
    keep: list[int],
    alpha: float = DEFAULT_ALPHA,
    protect: int = 0,
) -> tuple[Tensor, Tensor]:
    """select on each sequence of metric [T,Dm] (importance [T] or None).

    Returns index [sum(keep)] and slot [T], in positions of the packed input and output.
    """
    _check_packed(metric.shape[0], lengths, keep)
    indexes, slots = [], []
    for start, out_start, n, k in zip(_starts(lengths), _starts(keep), lengths, keep):
        imp = None if importance is None else importance[None, start : start + n]
        index, slot = select(metric[None, start : start + n], imp, keep=k, alpha=alpha, protect=protect)
        indexes.append(index[0] + start)
        slots.append(_packed_slot(slot[0], out_start))
    return torch.cat(indexes), torch.cat(slots)


def prune_packed(
    tokens: Tensor,
    importance: Tensor | None,
    *,
    lengths: list[int],
    keep: list[int],
    metric: Tensor | None = None,
    sizes: Tensor | None = None,
    alpha: float = DEFAULT_ALPHA,
    protect: int = 0,
    merge: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """prune on each sequence of tokens [T,D] (importance [T] or None, metric [T,Dm], sizes [T]).

    Returns (out [sum(keep),D], index [sum(keep)], sizes_out [sum(keep)] float32, slot [T]), in packed positions.
    """
    _check_packed(tokens.shape[0], lengths, keep)
    results = []
    for start, out_start, n, k in zip(_starts(lengths), _starts(keep), lengths, keep):
        piece = slice(start, start + n)
        out, index, sizes_out, slot = prune(
            tokens[None, piece],
            None if importance is None else importance[None, piece],
            keep=k,
            metric=None if metric is None else metric[None, piece],
            sizes=None if sizes is None else sizes[None, piece],
            alpha=alpha,
            protect=protect,
            merge=merge,
        )
        results.append((out[0], index[0] + start, sizes_out[0], _packed_slot(slot[0], out_start)))
    return tuple(torch.cat(parts) for parts in zip(*results))


def importance_from_qk_packed(
    q: Tensor, k: Tensor, scale: float, *, q_lengths: list[int], k_lengths: list[int]
) -> Tensor:
    """importance_from_qk on each sequence: q [H,Tq,d] rows of sequence i attend over its keys of k [H,T,d] -> [T]."""
    if len(q_lengths) != len(k_lengths) or sum(q_lengths) != q.shape[1] or sum(k_lengths) != k.shape[1]:
        raise ValueError(
            f"q_lengths and k_lengths must have one entry per sequence and sum to Tq={q.shape[1]} and T={k.shape[1]}, "
            f"got {list(q_lengths)} and {list(k_lengths)}"
        )
    pieces = []
    for q_start, k_start, nq, nk in zip(_starts(q_lengths), _starts(k_lengths), q_lengths, k_lengths):
        rows, keys = q[None, :, q_start : q_start + nq], k[None, :, k_start : k_start + nk]
        pieces.append(importance_from_qk(rows, keys, scale)[0])
    return torch.cat(pieces)
