"""The published peers of EvoPrune, written from their papers as pruning steps of the encoder wrapper.

Every peer here is a *step*, the callable that `evoprune_ext.patch(model, ..., step=...)` runs at each
scheduled pruning layer in place of EvoPrune's own `torch.ops.evoprune.prune`:

    step(hidden[B,N,D], metric[B,N,Dm], importance[B,N] float32 or None, sizes[B,N] float32,
         *, keep, protect, alpha, merge)
      -> (hidden_out[B,keep,D], sizes_out[B,keep] float32, slot[B,N] int64, index[B,keep] int64)

`slot[b, j]` is the output position that carries original token j, or -1 if the token was dropped; `index[b, p]`
the input position of the token kept at output position p (ascending), as EvoPrune's own step returns it, so
every peer also runs under the clip budget (`patch(..., budget="clip")`, where the index gives each token's frame).
Common to every peer, so that the benchmarks compare selection rules and nothing else:
- the first `protect` tokens (CLS, registers) are kept, stay first, and nothing is merged into them;
- kept tokens stay in ascending original order (as EvoPrune's, so the spatial order survives);
- the output has exactly `keep` tokens; `sizes` are carried, so proportional attention keeps working;
- `alpha` is EvoPrune's and ignored here; `merge` is honoured where the method merges (ToMe, VisionZip):
  with `merge=False` the would-be-merged tokens are dropped, their slot still naming their destination.

`PEERS` maps a name to its step; every benchmark swaps methods through it. `VIDEO_PEERS` holds the steps that
need the clip's frames (a `frames=F` keyword): they take a whole clip pool [B, F*N, D] (frame-major, N patches a
frame, no protected tokens).
"""

import torch

__all__ = ["PEERS", "VIDEO_PEERS", "tome", "divprune", "visionzip", "topk_attention", "random_selection", "evs",
           "temporal_merge"]


def _check(hidden, importance, sizes, keep, protect, needs_importance=False, name="step"):
    if hidden.dim() != 3:
        raise ValueError(f"{name}: hidden must be [B, N, D], got shape {tuple(hidden.shape)}")
    n = hidden.shape[1]
    if not 0 <= protect <= keep <= n:
        raise ValueError(f"{name}: expected 0 <= protect <= keep <= N={n}, got protect={protect}, keep={keep}")
    if sizes.shape != hidden.shape[:2]:
        raise ValueError(f"{name}: sizes must be [B, N] = {tuple(hidden.shape[:2])}, got {tuple(sizes.shape)}")
    if needs_importance and importance is None:
        raise ValueError(f"{name}: importance [B, N] is required (the method ranks tokens by attention)")


def _unit(metric):
    """Rows scaled to unit L2 norm, in float32 (zero rows stay zero), as SPEC.md section 2."""
    metric = metric.float()
    return metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-6)


def _slot_of_kept(index, n):
    """slot[b, j] = p where index[b, p] = j, -1 for every token not in index."""
    slot = torch.full((index.shape[0], n), -1, dtype=torch.long, device=index.device)
    positions = torch.arange(index.shape[1], device=index.device).expand_as(index)
    return slot.scatter_(1, index, positions)


def _gather(hidden, sizes, index):
    """Pure pruning: the rows `index[b]` of hidden and sizes."""
    rows = index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
    return hidden.gather(1, rows), sizes.gather(1, index).float()


def _merge(hidden, sizes, index, slot):
    """Size-weighted merge: out[b, p] = sum_{slot=p} s x / sum_{slot=p} s, sizes_out[b, p] = sum_{slot=p} s.

    Accumulates in float32 (or float64 for float64 inputs); a kept token whose group has zero total
    size is copied as it is.
    """
    b, n, d = hidden.shape
    acc = torch.promote_types(hidden.dtype, torch.float32)
    w = torch.where(slot >= 0, sizes.to(acc), torch.zeros((), dtype=acc, device=hidden.device))
    dst = slot.clamp_min(0)
    k = index.shape[1]
    total = torch.zeros(b, k, dtype=acc, device=hidden.device).scatter_add_(1, dst, w)
    summed = torch.zeros(b, k, d, dtype=acc, device=hidden.device)
    summed.scatter_add_(1, dst.unsqueeze(-1).expand(-1, -1, d), hidden.to(acc) * w.unsqueeze(-1))
    kept, _ = _gather(hidden, sizes, index)
    out = torch.where(total.unsqueeze(-1) > 0, summed / total.clamp_min(1e-30).unsqueeze(-1), kept.to(acc))
    return out.to(hidden.dtype), total.float()


def _finish(hidden, sizes, index, slot, merge):
    """Outputs of a step from the kept `index` (sorted) and the full `slot` map."""
    if merge:
        out, sizes_out = _merge(hidden, sizes, index, slot)
    else:
        out, sizes_out = _gather(hidden, sizes, index)
    return out, sizes_out, slot, index


def _protected(b, protect, device):
    return torch.arange(protect, device=device).expand(b, protect)


def _rank_desc(values):
    """Indices sorting each row by decreasing value, ties by smaller index, NaN last."""
    values = torch.nan_to_num(values.float(), nan=float("-inf"))
    return torch.sort(values, dim=-1, descending=True, stable=True).indices


# --------------------------------------------------------------------------------------------------
# ToMe: Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023.
# --------------------------------------------------------------------------------------------------
def _tome_round(hidden, metric, sizes, r, protect, merge):
    """One bipartite soft matching that removes r tokens.

    Candidates (non-protected tokens) alternate between set A (even offsets) and set B (odd offsets).
    Each A token's edge is its most similar B token (cosine of the metric); the r A tokens with the
    strongest edges are merged (size-weighted) into their B token. Returns the reduced hidden, metric
    and sizes, and the round's slot map.
    """
    b, n, _ = hidden.shape
    device = hidden.device
    a_pos = torch.arange(protect, n, 2, device=device)
    b_pos = torch.arange(protect + 1, n, 2, device=device)
    keep_mask = torch.ones(b, n, dtype=torch.bool, device=device)
    if len(b_pos) == 0:
        # A single candidate and nowhere to merge it: it can only be dropped.
        keep_mask[:, a_pos[:r]] = False
        dst_of_a = None
    else:
        u = _unit(metric)
        scores = u[:, a_pos] @ u[:, b_pos].transpose(1, 2)
        edge, best_b = torch.nan_to_num(scores, nan=-2.0).max(dim=-1)
        merged_a = _rank_desc(edge)[:, :r]
        keep_mask.scatter_(1, a_pos[merged_a], False)
        dst_of_a = b_pos[best_b]
    index = keep_mask.nonzero()[:, 1].view(b, n - r)
    slot = _slot_of_kept(index, n)
    if dst_of_a is not None:
        src = a_pos[merged_a]
        slot.scatter_(1, src, slot.gather(1, dst_of_a.gather(1, merged_a)))
    out, sizes_out, _, _ = _finish(hidden, sizes, index, slot, merge)
    metric_out, _ = _merge(metric, sizes, index, slot) if merge else _gather(metric, sizes, index)
    return out, metric_out, sizes_out, slot, index


def tome(hidden, metric, importance, sizes, *, keep, protect, alpha=None, merge=True):
    """ToMe's bipartite soft matching, removing N - keep tokens at this layer.

    As published, one matching removes at most |A| = ceil((N - protect) / 2) tokens. To reach any
    `keep` at a single layer (equal final count and layers for every method), the matching is repeated
    on its own output until the count is reached; when N - keep <= |A| this is exactly one ToMe step.
    `importance` is not used; `sizes` weight the merge and are summed.
    """
    _check(hidden, importance, sizes, keep, protect, name="tome")
    n = hidden.shape[1]
    slot = torch.arange(n, device=hidden.device).expand(hidden.shape[0], n).clone()
    index = slot.clone()
    sizes = sizes.float()
    while hidden.shape[1] > keep:
        cur = hidden.shape[1]
        r = min(cur - keep, (cur - protect + 1) // 2)
        hidden, metric, sizes, round_slot, round_index = _tome_round(hidden, metric, sizes, r, protect, merge)
        slot = torch.where(slot >= 0, round_slot.gather(1, slot.clamp_min(0)), slot)
        index = index.gather(1, round_index)
    return hidden, sizes, slot, index


# --------------------------------------------------------------------------------------------------
# DivPrune: Alvar et al., "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal
# Models", CVPR 2025.
# --------------------------------------------------------------------------------------------------
def divprune(hidden, metric, importance, sizes, *, keep, protect, alpha=None, merge=True):
    """DivPrune's greedy for the max-min diversity problem on cosine distance, as published.

    Distance d(i, j) = 1 - cos(metric_i, metric_j) over the candidates. The first pick is the token
    farthest from its nearest neighbour; each later pick maximizes the minimum distance to the
    selected set, and that minimum is recomputed over ALL selected rows at every step (the published
    form: O(K^2 N) per sample, where an incremental running minimum would be O(K N)). Dropped tokens
    are discarded (slot -1), whatever `merge` says; `importance` is not used.
    """
    _check(hidden, importance, sizes, keep, protect, name="divprune")
    b, n, _ = hidden.shape
    device = hidden.device
    k = keep - protect
    picks = torch.empty(b, k, dtype=torch.long, device=device)
    if k > 0:
        u = _unit(metric[:, protect:])
        dist = torch.nan_to_num(1.0 - u @ u.transpose(1, 2), nan=-1.0)
        c = dist.shape[1]
        chosen = torch.zeros(b, c, dtype=torch.bool, device=device)
        eye = torch.eye(c, dtype=torch.bool, device=device)
        nearest = dist.masked_fill(eye, float("inf")).amin(dim=1) if c > 1 else dist.new_zeros(b, c)
        for i in range(k):
            if i == 0:
                score = nearest
            else:
                rows = picks[:, :i].unsqueeze(-1).expand(-1, -1, c)
                score = dist.gather(1, rows).amin(dim=1)
            pick = score.masked_fill(chosen, float("-inf")).argmax(dim=-1)
            picks[:, i] = pick
            chosen[torch.arange(b, device=device), pick] = True
    index = torch.cat([_protected(b, protect, device), protect + picks], dim=1).sort(dim=1).values
    slot = _slot_of_kept(index, n)
    return _finish(hidden, sizes, index, slot, merge=False)


# --------------------------------------------------------------------------------------------------
# VisionZip: Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language Models",
# CVPR 2025.
# --------------------------------------------------------------------------------------------------
CONTEXTUAL_SHARE = 10 / 64  # the paper's split: 54 dominant + 10 contextual of 64 tokens (also 108+20, 162+30)


def visionzip(hidden, metric, importance, sizes, *, keep, protect, alpha=None, merge=True):
    """VisionZip's dominant + contextual tokens, sized so that the output has exactly `keep` tokens.

    Of the K' = keep - protect free places, round(K' * 10/64) (at least one when K' >= 2) go to
    contextual tokens, the rest to dominant ones. Dominant: the highest attention importance.
    Contextual: of the remaining tokens, targets are taken at a uniform stride (as the paper);
    every other remaining token joins the target whose metric is most similar (cosine), and each
    target becomes the size-weighted mean of its group.
    """
    _check(hidden, importance, sizes, keep, protect, needs_importance=True, name="visionzip")
    b, n, _ = hidden.shape
    device = hidden.device
    k = keep - protect
    n_ctx = max(1, round(k * CONTEXTUAL_SHARE)) if k >= 2 else 0
    n_dom = k - n_ctx
    order = protect + _rank_desc(importance[:, protect:])
    dominant = order[:, :n_dom]
    rest = order[:, n_dom:].sort(dim=1).values
    stride = max(1, rest.shape[1] // n_ctx) if n_ctx else 1
    targets = rest[:, ::stride][:, :n_ctx]
    index = torch.cat([_protected(b, protect, device), dominant, targets], dim=1).sort(dim=1).values
    slot = _slot_of_kept(index, n)
    if n_ctx:
        u = _unit(metric)

        def rows(idx):
            return u.gather(1, idx.unsqueeze(-1).expand(-1, -1, u.shape[-1]))

        sim = torch.nan_to_num(rows(rest) @ rows(targets).transpose(1, 2), nan=-2.0)
        nearest_target = targets.gather(1, sim.argmax(dim=-1))
        is_target = slot.gather(1, rest) >= 0
        slot.scatter_(1, rest, torch.where(is_target, slot.gather(1, rest), slot.gather(1, nearest_target)))
    return _finish(hidden, sizes, index, slot, merge)


# --------------------------------------------------------------------------------------------------
# Top-K by attention: FastV (Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", ECCV 2024).
# --------------------------------------------------------------------------------------------------
def topk_attention(hidden, metric, importance, sizes, *, keep, protect, alpha=None, merge=True):
    """Keep the keep - protect tokens with the highest attention importance (ties: smaller index);
    the rest are discarded (slot -1), whatever `merge` says."""
    _check(hidden, importance, sizes, keep, protect, needs_importance=True, name="topk_attention")
    b, n, _ = hidden.shape
    top = protect + _rank_desc(importance[:, protect:])[:, : keep - protect]
    index = torch.cat([_protected(b, protect, hidden.device), top], dim=1).sort(dim=1).values
    return _finish(hidden, sizes, index, _slot_of_kept(index, n), merge=False)


# --------------------------------------------------------------------------------------------------
# Random selection: the floor every method must beat.
# --------------------------------------------------------------------------------------------------
RANDOM_SEED = 0


def random_selection(hidden, metric, importance, sizes, *, keep, protect, alpha=None, merge=True):
    """Keep keep - protect candidates drawn uniformly without replacement; the rest are discarded.

    The draw is seeded from (RANDOM_SEED, N, keep) on a CPU generator, so a run is reproducible and
    does not depend on the order in which layers or methods are evaluated.
    """
    _check(hidden, importance, sizes, keep, protect, name="random_selection")
    b, n, _ = hidden.shape
    gen = torch.Generator().manual_seed(RANDOM_SEED * 1_000_003 + n * 1_009 + keep)
    draw = torch.rand(b, n - protect, generator=gen).argsort(dim=1)[:, : keep - protect]
    index = torch.cat([_protected(b, protect, "cpu"), protect + draw], dim=1).sort(dim=1).values
    index = index.to(hidden.device)
    return _finish(hidden, sizes, index, _slot_of_kept(index, n), merge=False)


PEERS = {
    "tome": tome,
    "divprune": divprune,
    "visionzip": visionzip,
    "topk": topk_attention,
    "random": random_selection,
}


# --------------------------------------------------------------------------------------------------
# Video peers: they see a whole clip pool [B, F*N, D], frames consecutive, and use its frame structure.
# --------------------------------------------------------------------------------------------------
def _frames(hidden, protect, frames, name):
    b, n, _ = hidden.shape
    if protect != 0 or frames < 1 or n % frames:
        raise ValueError(f"{name}: a clip pool of {n} tokens, no protected token, is not {frames} equal frames")
    return n // frames


def evs(hidden, metric, importance, sizes, *, keep, protect, frames, alpha=None, merge=True):
    """vLLM's Efficient Video Sampling (`vllm/multimodal/evs.py`, `compute_retention_mask`), after the encoder.

    Each token of a later frame scores its dissimilarity 1 - cos to the token at the same patch of the previous
    frame (on `metric`; vLLM uses the output embeddings, so pass them); the first frame's tokens score highest.
    The `keep` tokens of highest score are kept (ties: smaller index, so the first frame in raster order), the
    rest discarded. vLLM never keeps fewer than one frame's tokens; here, for equal counts, a budget below one
    frame keeps the first `keep` tokens of the first frame.
    """
    _check(hidden, importance, sizes, keep, protect, name="evs")
    per = _frames(hidden, protect, frames, "evs")
    b, n, _ = hidden.shape
    u = _unit(metric).view(b, frames, per, -1)
    dissimilarity = 1.0 - (u[:, 1:] * u[:, :-1]).sum(dim=-1)
    first = dissimilarity.new_full((b, 1, per), float("inf"))
    index = _rank_desc(torch.cat([first, dissimilarity], dim=1).flatten(1))[:, :keep].sort(dim=1).values
    return _finish(hidden, sizes, index, _slot_of_kept(index, n), merge=False)


def temporal_merge(hidden, metric, importance, sizes, *, keep, protect, frames, alpha=None, merge=True):
    """A DyCoke / FastVID-style temporal merge: tokens that repeat an earlier frame go first, into what they repeat.

    After DyCoke's temporal token merging (Tao et al., CVPR 2025) and FastVID's anchor frames (Shen et al.,
    2025), to an exact budget: a token of frame t >= 1 is as redundant as its highest cosine similarity (of
    `metric`) to any token of frame t - 1; the first frame is the anchor, its tokens rank below every later one
    (among themselves by their highest similarity within the frame). The `keep` least redundant tokens are kept
    (ties: smaller index); each other token merges (size-weighted; dropped with `merge=False`) into its most
    similar kept token of an earlier frame, a first-frame token into one of the first frame.
    """
    _check(hidden, importance, sizes, keep, protect, name="temporal_merge")
    per = _frames(hidden, protect, frames, "temporal_merge")
    b, n, _ = hidden.shape
    u = _unit(metric)
    by_frame = u.view(b, frames, per, -1)
    later = (by_frame[:, 1:] @ by_frame[:, :-1].transpose(-1, -2)).amax(dim=-1)
    eye = torch.eye(per, dtype=torch.bool, device=hidden.device)
    within = (by_frame[:, 0] @ by_frame[:, 0].transpose(-1, -2)).masked_fill(eye, -1.0).amax(dim=-1)
    redundancy = torch.cat([within[:, None] - 3.0, later], dim=1).flatten(1)
    index = _rank_desc(-redundancy)[:, :keep].sort(dim=1).values
    slot = _slot_of_kept(index, n)
    frame = torch.arange(n, device=hidden.device) // per
    kept_frame = frame[index]  # [B, keep]
    allowed = (kept_frame[:, None, :] < frame[None, :, None]) | (
        (kept_frame[:, None, :] == 0) & (frame[None, :, None] == 0))
    similarity = u @ u.gather(1, index.unsqueeze(-1).expand(-1, -1, u.shape[-1])).transpose(1, 2)
    target = torch.nan_to_num(similarity, nan=-2.0).masked_fill(~allowed, -3.0).argmax(dim=-1)
    slot = torch.where(slot >= 0, slot, target)
    return _finish(hidden, sizes, index, slot, merge)


VIDEO_PEERS = {
    "evs": evs,
    "temporal merge": temporal_merge,
}
