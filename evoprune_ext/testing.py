"""The one checker of selections and merges, used by every test, fuzz run and benchmark of the project.

Kernels accumulate in float32, so where two candidates' scores differ by less than float32 rounding,
CPU, CUDA and the reference may legitimately pick differently (SPEC.md section 5). Comparing indices for
equality would then fail for no reason; instead check_selection replays the greedy in float64 and accepts
every pick whose score is within `atol` of that step's best.
"""

import math

import torch
from torch import Tensor

from evoprune_ext import reference


def _fail(message: str) -> None:
    raise AssertionError(f"check_selection: {message}")


def _first_bad_row(bad: Tensor) -> int | None:
    """First batch row where any entry of bad [B, ...] is set, or None."""
    rows = bad.flatten(1).any(dim=1).nonzero()
    return int(rows[0]) if len(rows) else None


def _check_valid(index: Tensor, slot: Tensor, B: int, N: int, keep: int, protect: int) -> None:
    """SPEC 5: a valid selection whatever the values."""
    if index.dtype != torch.long or slot.dtype != torch.long:
        _fail(f"index and slot must be int64, got {index.dtype} and {slot.dtype}")
    if tuple(index.shape) != (B, keep):
        _fail(f"index must have shape [B,K]=[{B},{keep}], got {tuple(index.shape)}")
    if tuple(slot.shape) != (B, N):
        _fail(f"slot must have shape [B,N]=[{B},{N}], got {tuple(slot.shape)}")
    positions = torch.arange(keep, device=index.device)
    b = _first_bad_row(index[:, :protect] != positions[:protect])
    if b is not None:
        _fail(f"batch {b}: index must start with the protected positions 0..{protect - 1}, got {index[b].tolist()}")
    b = _first_bad_row((index < 0) | (index >= N))
    if b is not None:
        _fail(f"batch {b}: index out of [0, N={N}): {index[b].tolist()}")
    b = _first_bad_row(index[:, 1:] <= index[:, :-1])
    if b is not None:
        _fail(f"batch {b}: index must be strictly ascending (distinct, sorted): {index[b].tolist()}")
    b = _first_bad_row((slot < -1) | (slot >= keep))
    if b is not None:
        _fail(f"batch {b}: slot out of [-1, K={keep}): {slot[b].tolist()}")
    kept_slot = slot.gather(1, index)
    b = _first_bad_row(kept_slot != positions)
    if b is not None:
        p = int((kept_slot[b] != positions).nonzero()[0])
        i = int(index[b, p])
        _fail(f"batch {b}: kept token {i} is at output position {p} but slot[{i}] = {int(slot[b, i])}")


def check_valid(index: Tensor, slot: Tensor, *, keep: int, protect: int) -> None:
    """Raise AssertionError unless (index, slot) is a valid selection (SPEC 5) of slot's B and N tokens.

    Validity only, no replay of the greedy: for inputs whose values make check_selection's float64 replay meaningless.
    """
    if slot.dim() != 2:
        _fail(f"slot must have shape [B,N], got {tuple(slot.shape)}")
    _check_valid(index, slot, slot.shape[0], slot.shape[1], keep, protect)


@torch.no_grad()
def check_selection(
    metric: Tensor,
    importance: Tensor | None,
    index: Tensor,
    slot: Tensor,
    *,
    keep: int,
    alpha: float,
    protect: int,
    atol: float = 1e-4,
) -> None:
    """Raise AssertionError unless (index, slot) is a valid selection SPEC.md's greedy could have made.

    metric [B,N,Dm]; importance [B,N], [B,H,Q,N] attention (reduced like prune does) or None.
    """
    B, N, _ = metric.shape
    device = metric.device
    index, slot = index.to(device), slot.to(device)
    _check_valid(index, slot, B, N, keep, protect)

    if importance is not None and importance.dim() == 4:
        importance = reference.importance(importance)
    if importance is None:
        ti = torch.zeros((B, N), dtype=torch.float64, device=device)
    elif tuple(importance.shape) != (B, N):
        _fail(f"importance must have shape [B,N]=[{B},{N}] or [B,H,Q,N], got {tuple(importance.shape)}")
    else:
        ti = reference._normalized_importance(importance.to(device, torch.float64), protect)
    u = reference._unit_vectors(metric, torch.float64)

    rows = torch.arange(B, device=device)
    chosen = torch.zeros((B, N), dtype=torch.bool, device=device)  # S: the kept non-protected tokens
    chosen.scatter_(1, index[:, protect:], True)
    remaining = chosen.clone()  # members of S not replayed yet
    available = torch.zeros((B, N), dtype=torch.bool, device=device)
    available[:, protect:] = True
    red = torch.full((B, N), -1.0, dtype=torch.float64, device=device)
    numbered = torch.zeros((B, N), dtype=torch.bool, device=device)  # has a non-NaN similarity to some pick
    replayed = []

    # The picks' order is lost in the sorted index: at each step take, among the members of S not replayed yet,
    # the best one that scores within atol of the step's maximum over all available candidates.
    for step in range(keep - protect):
        score = alpha * ti + (1 - alpha) * (1 - red) / 2
        score = score.masked_fill(score.isnan() | ~available, -math.inf)
        best = score.amax(dim=1, keepdim=True)
        # When every score is -inf, best - atol is -inf and every remaining member is acceptable,
        # as the greedy then takes the smallest available index.
        acceptable = remaining & (score >= best - atol)
        stuck = ~acceptable.any(dim=1)
        if stuck.any():
            b = int(stuck.nonzero()[0])
            best_j = int(score[b].argmax())
            closest = score[b].masked_fill(~remaining[b], -math.inf)
            closest_j = int(closest.argmax())
            _fail(
                f"batch {b}, step {step} (picks so far {[int(p[b]) for p in replayed]}): "
                f"best candidate {best_j} scores {float(score[b, best_j]):.6g}, but the closest kept token "
                f"{closest_j} scores {float(score[b, closest_j]):.6g} (atol {atol:g})"
            )
        pick = reference._first_argmax(score.masked_fill(~acceptable, -math.inf), acceptable)
        replayed.append(pick)
        remaining[rows, pick] = False
        available[rows, pick] = False
        column = torch.einsum("bnd,bd->bn", u, u[rows, pick])
        red = torch.where(column > red, column, red)
        numbered |= ~column.isnan()

    # red is now max(-1, largest similarity to a member of S), NaN ignored: what each dropped token's owner must reach.
    # Every dropped token with a number for some pick has an owner (SPEC.md section 3, step 4), even at similarity -1.
    dropped = ~chosen
    dropped[:, :protect] = False
    no_owner = dropped & (slot < 0)
    bad = no_owner & numbered
    if bad.any():
        b, j = (int(x) for x in bad.nonzero()[0])
        _fail(f"batch {b}: dropped token {j} has slot -1 but its similarity to a kept token is {float(red[b, j]):.6g}")

    has_owner = dropped & (slot >= 0)
    if not has_owner.any():
        return  # also the case K = 0, where there is no index to look owners up in
    owner = index.gather(1, slot.clamp_min(0))
    into_protected = has_owner & (slot < protect)
    if into_protected.any():
        b, j = (int(x) for x in into_protected.nonzero()[0])
        _fail(f"batch {b}: dropped token {j} is merged into protected position {int(slot[b, j])}")
    owner_sim = (u * u.gather(1, owner[..., None].expand_as(u))).sum(dim=-1)
    bad = has_owner & ~(owner_sim >= red - atol)  # also rejects a NaN similarity
    if bad.any():
        b, j = (int(x) for x in bad.nonzero()[0])
        _fail(
            f"batch {b}: dropped token {j} is merged into token {int(owner[b, j])} (similarity "
            f"{float(owner_sim[b, j]):.6g}) but its closest kept token has similarity {float(red[b, j]):.6g} "
            f"(atol {atol:g})"
        )


@torch.no_grad()
def check_merge(
    tokens: Tensor,
    index: Tensor,
    slot: Tensor,
    sizes: Tensor | None,
    out: Tensor,
    sizes_out: Tensor,
    *,
    rtol: float,
    atol: float,
) -> None:
    """Compare a kernel's merge output with reference.merge on the SAME index and slot.

    Using the kernel's own selection keeps a near-tie in the greedy from cascading into the merged values.
    Positions SPEC 4 copies bit for bit (a kept token that received nothing, or sizes summing to 0) must match exactly.
    """
    expected_out, expected_sizes = reference.merge(tokens, index, slot, sizes)
    if out.dtype != tokens.dtype or out.shape != expected_out.shape:
        raise AssertionError(
            f"check_merge: out must be {tokens.dtype} {tuple(expected_out.shape)}, got {out.dtype} {tuple(out.shape)}"
        )
    if sizes_out.dtype != torch.float32 or sizes_out.shape != expected_sizes.shape:
        raise AssertionError(
            f"check_merge: sizes_out must be float32 {tuple(expected_sizes.shape)}, "
            f"got {sizes_out.dtype} {tuple(sizes_out.shape)}"
        )
    out = out.to(tokens.device)
    sizes_out = sizes_out.to(tokens.device)

    B, K = index.shape
    bins = torch.where(slot >= 0, slot, K)
    members = torch.zeros((B, K + 1), dtype=torch.long, device=tokens.device)
    members = members.scatter_add(1, bins, torch.ones_like(bins))[:, :K]
    copied = (members == 1) | (expected_sizes == 0)
    # Compare bit patterns: NaN payloads and the sign of zero must survive a copy too.
    as_bits = {torch.float64: torch.int64, torch.float32: torch.int32}.get(out.dtype, torch.int16)
    differs = (out.view(as_bits) != expected_out.view(as_bits)).any(dim=-1) & copied
    if differs.any():
        b, p = (int(x) for x in differs.nonzero()[0])
        raise AssertionError(
            f"check_merge: batch {b}, position {p} must be an exact copy of token {int(index[b, p])} "
            "(it received nothing or its sizes sum to 0); "
            f"got {out[b, p].tolist()}, expected {expected_out[b, p].tolist()}"
        )
    torch.testing.assert_close(
        out, expected_out, rtol=rtol, atol=atol, equal_nan=True, msg=lambda m: f"check_merge: out: {m}"
    )
    torch.testing.assert_close(
        sizes_out, expected_sizes, rtol=rtol, atol=atol, equal_nan=True, msg=lambda m: f"check_merge: sizes_out: {m}"
    )
