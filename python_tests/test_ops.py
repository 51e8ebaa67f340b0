"""The torch ops (CPU and, where a GPU exists, CUDA) against the reference and SPEC.md."""

import math
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import evoprune_ext
from evoprune_ext import reference, testing
from evoprune_ext.defaults import DEFAULT_ALPHA

ops = torch.ops.evoprune
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# Merged values agree to the rounding of the tokens' dtype.
MERGE_TOL = {torch.float32: 1e-5, torch.float64: 1e-10, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def make_case(B, N, D, *, Dm=None, H=2, Q=None, attn="4d", dtype=torch.float32, device="cpu", sizes=False,
              strided=False, seed=0):
    """Random inputs for prune; `strided` makes every tensor a non-contiguous view."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, fn=torch.randn):
        full = fn(*shape[:-1], 2 * shape[-1], generator=g) if strided else fn(*shape, generator=g)
        t = full[..., ::2] if strided else full
        return t.to(dtype=dtype, device=device)

    tokens = rand(B, N, D)
    metric = None if Dm is None else rand(B, N, Dm)
    if attn == "4d":
        a = torch.rand(B, H, Q or N, N, generator=g).softmax(-1)
        attn_t = (a.transpose(-1, -2).contiguous().transpose(-1, -2) if strided else a).to(dtype=dtype, device=device)
    elif attn == "2d":
        attn_t = torch.rand(B, N, generator=g).to(device)
    else:
        attn_t = None
    s = (torch.rand(B, N, generator=g) * 3 + 0.5).to(device) if sizes else None
    return tokens, attn_t, metric, s


def check_prune(tokens, attn, metric, sizes, *, keep, alpha, protect, merge):
    before = [t.clone() if t is not None else None for t in (tokens, attn, metric, sizes)]
    out, index, sizes_out, slot = ops.prune(tokens, attn, keep=keep, metric=metric, sizes=sizes, alpha=alpha,
                                            protect=protect, merge=merge)
    for t, b in zip((tokens, attn, metric, sizes), before):
        if t is not None:
            assert torch.equal(t, b), "an input was modified"
    assert out.dtype == tokens.dtype and out.shape == (tokens.shape[0], keep, tokens.shape[2])
    assert sizes_out.dtype == torch.float32
    m = tokens if metric is None else metric
    testing.check_selection(m.cpu(), None if attn is None else attn.cpu(), index.cpu(), slot.cpu(), keep=keep,
                            alpha=alpha, protect=protect)
    tol = MERGE_TOL[tokens.dtype]
    if merge:
        testing.check_merge(tokens.cpu(), index.cpu(), slot.cpu(), None if sizes is None else sizes.cpu(),
                            out.cpu(), sizes_out.cpu(), rtol=tol, atol=tol)
    else:
        B, K, D = out.shape
        assert torch.equal(out, tokens.gather(1, index[..., None].expand(B, K, D)))
        s = torch.ones_like(slot, dtype=torch.float32) if sizes is None else sizes
        assert torch.equal(sizes_out, s.gather(1, index))
    return out, index, sizes_out, slot


# ---------------------------------------------------------------------------- parity with the reference


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("attn", ["4d", "2d", None])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_prune_matches_reference(device, dtype, attn, alpha):
    tokens, a, metric, sizes = make_case(2, 37, 12, Dm=8, attn=attn, dtype=dtype, device=device, sizes=True, seed=1)
    check_prune(tokens, a, metric, sizes, keep=11, alpha=alpha, protect=1, merge=True)


@pytest.mark.parametrize("keep", [4, 40, 60])  # few picks: dot products; many picks: the similarity GEMM
@pytest.mark.parametrize("merge", [True, False])
def test_both_similarity_paths_match_reference_exactly_in_float64(device, keep, merge):
    tokens, a, _, sizes = make_case(3, 64, 16, attn="4d", dtype=torch.float64, device=device, sizes=True, seed=2)
    out, index, sizes_out, slot = check_prune(tokens, a, None, sizes, keep=keep, alpha=0.2, protect=2, merge=merge)
    # float64 random inputs have no near-ties: the selection is exactly the reference's.
    ref = reference.prune(tokens.cpu(), a.cpu(), keep=keep, sizes=sizes.cpu(), alpha=0.2, protect=2, merge=merge)
    assert torch.equal(index.cpu(), ref[1]) and torch.equal(slot.cpu(), ref[3])
    torch.testing.assert_close(out.cpu(), ref[0], rtol=1e-12, atol=1e-12)


def test_non_contiguous_inputs(device):
    tokens, a, metric, sizes = make_case(2, 30, 10, Dm=6, attn="4d", device=device, strided=True, seed=3)
    assert not tokens.is_contiguous() and not metric.is_contiguous() and not a.is_contiguous()
    got = check_prune(tokens, a, metric, sizes, keep=9, alpha=0.5, protect=1, merge=True)
    want = ops.prune(tokens.contiguous(), a.contiguous(), keep=9, metric=metric.contiguous(), alpha=0.5, protect=1)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_expanded_inputs(device):
    row = torch.randn(1, 1, 8, device=device)
    tokens = row.expand(3, 20, 8)  # stride 0 in B and N: all tokens equal
    check_prune(tokens, None, None, None, keep=5, alpha=0.0, protect=1, merge=True)


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    B=st.integers(1, 3), N=st.integers(1, 48), D=st.integers(1, 9), Dm=st.sampled_from([None, 1, 5]),
    protect_frac=st.floats(0, 0.3), keep_frac=st.floats(0, 1), alpha=st.sampled_from([0.0, 0.05, 0.5, 1.0]),
    merge=st.booleans(), attn=st.sampled_from(["4d", "2d", None]), dtype=st.sampled_from(DTYPES),
    sizes=st.booleans(), strided=st.booleans(), seed=st.integers(0, 2**16),
)
def test_prune_random_cases(B, N, D, Dm, protect_frac, keep_frac, alpha, merge, attn, dtype, sizes, strided, seed):
    protect = int(protect_frac * N)
    keep = protect + int(keep_frac * (N - protect))
    tokens, a, metric, s = make_case(B, N, D, Dm=Dm, attn=attn, dtype=dtype, sizes=sizes, strided=strided, seed=seed,
                                     Q=1 if seed % 2 else None)
    check_prune(tokens, a, metric, s, keep=keep, alpha=alpha, protect=protect, merge=merge)


def test_select_matches_prune_and_reference(device):
    tokens, _, metric, _ = make_case(2, 50, 8, Dm=8, attn=None, dtype=torch.float64, device=device, seed=4)
    imp = torch.rand(2, 50, dtype=torch.float64, device=device)
    index, slot = ops.select(metric, imp, keep=12, alpha=0.4, protect=1)
    ref_index, ref_slot = reference.select(metric.cpu(), imp.cpu(), keep=12, alpha=0.4, protect=1)
    assert torch.equal(index.cpu(), ref_index) and torch.equal(slot.cpu(), ref_slot)
    _, p_index, _, p_slot = ops.prune(tokens, imp, keep=12, metric=metric, alpha=0.4, protect=1)
    assert torch.equal(index, p_index) and torch.equal(slot, p_slot)


@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_matches_reference(device, dtype):
    tokens, _, _, sizes = make_case(3, 25, 7, attn=None, dtype=dtype, device=device, sizes=True, seed=5)
    index, slot = reference.select(tokens.cpu(), None, keep=6, alpha=0.0, protect=1)
    index, slot = index.to(device), slot.to(device)
    out, sizes_out = ops.merge(tokens, index, slot, sizes)
    testing.check_merge(tokens.cpu(), index.cpu(), slot.cpu(), sizes.cpu(), out.cpu(), sizes_out.cpu(),
                        rtol=MERGE_TOL[dtype], atol=MERGE_TOL[dtype])


def test_merge_copies_kept_tokens_and_zero_size_groups_exactly(device):
    tokens = torch.randn(1, 4, 3, device=device)
    index = torch.tensor([[0, 2]], device=device)
    slot = torch.tensor([[0, 1, 1, 1]], device=device)
    sizes = torch.tensor([[2.0, 0.0, 0.0, 0.0]], device=device)
    out, sizes_out = ops.merge(tokens, index, slot, sizes)
    assert torch.equal(out[0, 0], tokens[0, 0]) and torch.equal(out[0, 1], tokens[0, 2])
    assert sizes_out.tolist() == [[2.0, 0.0]]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("Q", [1, 5])
def test_importance_matches_reference(device, dtype, Q):
    attn = torch.rand(3, 4, Q, 300).softmax(-1).to(dtype=dtype, device=device)
    torch.testing.assert_close(ops.importance(attn).cpu(), reference.importance(attn.cpu()), rtol=1e-5, atol=1e-7)
    strided = attn.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert torch.equal(ops.importance(strided), ops.importance(attn))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("Q", [1, 17])
def test_importance_from_qk_matches_reference(device, dtype, Q):
    g = torch.Generator().manual_seed(6)
    q = torch.randn(2, 3, Q, 16, generator=g).to(dtype=dtype, device=device)
    k = torch.randn(2, 3, 40, 16, generator=g).to(dtype=dtype, device=device)
    got = ops.importance_from_qk(q, k, 0.25)
    torch.testing.assert_close(got.cpu(), reference.importance_from_qk(q.cpu(), k.cpu(), 0.25), rtol=1e-5, atol=1e-6)
    if dtype == torch.float32:  # equal to importance of the materialized attention
        attn = (0.25 * q @ k.transpose(-1, -2)).softmax(-1)
        torch.testing.assert_close(got, ops.importance(attn), rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------- special cases of SPEC.md


def test_alpha_one_is_top_k_by_importance_lowest_index_on_ties(device):
    imp = torch.tensor([[0.1, 0.5, 0.9, 0.5, 0.5, 0.2]], device=device)
    tokens = torch.randn(1, 6, 4, device=device)
    _, index, _, _ = ops.prune(tokens, imp, keep=3, alpha=1.0)
    assert index.tolist() == [[1, 2, 3]]


def test_alpha_zero_is_farthest_point_selection(device):
    metric = torch.randn(1, 30, 3, dtype=torch.float64)
    u = metric[0] / metric[0].norm(dim=-1, keepdim=True)
    chosen = [0]  # max-min diversity starts from the first candidate, then takes the farthest from all chosen
    for _ in range(7):
        closest = (u @ u[chosen].T).max(dim=1).values
        closest[chosen] = math.inf
        chosen.append(int(closest.argmin()))
    index, slot = ops.select(metric.to(device), None, keep=8, alpha=0.0)
    assert index.tolist() == [sorted(chosen)]
    owner = (u @ u[index[0].cpu()].T).argmax(dim=1)
    assert slot[0].tolist() == owner.tolist()


def _collinear_metric(kind, dtype, seed):
    """[2,N,Dm] metrics whose cosines are all +-1 up to rounding, where the old strict rule dropped tokens."""
    g = torch.Generator().manual_seed(seed)
    direction = torch.randn(1, 1, 64, generator=g, dtype=torch.float64)
    if kind == "rank1":  # random signs and magnitudes along one direction
        scale = torch.randn(2, 64, 1, generator=g, dtype=torch.float64)
    else:  # anti-parallel: tokens alternate between one direction and its opposite
        scale = (torch.arange(64) % 2 * -2 + 1).to(torch.float64).expand(2, 64)[..., None]
    return (scale * direction).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["rank1", "antiparallel"])
@pytest.mark.parametrize("keep,protect", [(1, 0), (2, 0), (3, 1), (5, 2)])
@pytest.mark.parametrize("alpha", [0.0, DEFAULT_ALPHA])
def test_collinear_metrics_drop_no_token(device, dtype, kind, keep, protect, alpha):
    # SPEC.md section 3 step 4: a similarity of -1 (or one rounding just below it) still makes an owner,
    # so every backend keeps every token in some output.
    metric = _collinear_metric(kind, dtype, seed=keep)
    tokens = torch.randn(metric.shape[:2] + (5,), generator=torch.Generator().manual_seed(1)).to(dtype)
    importance = torch.rand(metric.shape[:2], generator=torch.Generator().manual_seed(2))
    out, index, sizes, slot = ops.prune(tokens.to(device), importance.to(device), keep=keep,
                                        metric=metric.to(device), alpha=alpha, protect=protect)
    assert (slot >= 0).all()
    assert sizes.sum(dim=1).tolist() == [64.0, 64.0]
    testing.check_selection(metric, importance, index.cpu(), slot.cpu(), keep=keep, alpha=alpha, protect=protect)
    testing.check_merge(tokens, index.cpu(), slot.cpu(), None, out.cpu(), sizes.cpu(), rtol=MERGE_TOL[dtype],
                        atol=MERGE_TOL[dtype])
    if kind == "antiparallel":
        # Two exact unit vectors, so every similarity is one of two exact values and every tie is exact:
        # the lowest index decides on every backend, and they all agree with the reference bit for bit.
        expected = reference.prune(tokens, importance, keep=keep, metric=metric, alpha=alpha, protect=protect)
        assert torch.equal(index.cpu(), expected[1]) and torch.equal(slot.cpu(), expected[3])
        torch.testing.assert_close(out.cpu(), expected[0], rtol=MERGE_TOL[dtype], atol=MERGE_TOL[dtype])


def test_keep_all_is_identity(device):
    tokens, a, _, sizes = make_case(2, 9, 5, device=device, sizes=True)
    out, index, sizes_out, slot = ops.prune(tokens, a, keep=9, sizes=sizes, protect=2)
    assert torch.equal(out, tokens) and torch.equal(sizes_out, sizes)
    assert index.tolist() == [list(range(9))] * 2 and slot.tolist() == [list(range(9))] * 2


def test_keep_protect_drops_everything_else(device):
    tokens, a, _, _ = make_case(2, 9, 5, device=device)
    out, index, sizes_out, slot = ops.prune(tokens, a, keep=2, protect=2)
    assert torch.equal(out, tokens[:, :2]) and index.tolist() == [[0, 1]] * 2
    assert slot.tolist() == [[0, 1] + [-1] * 7] * 2 and sizes_out.tolist() == [[1.0, 1.0]] * 2


def test_empty_inputs(device):
    out, index, sizes_out, slot = ops.prune(torch.randn(0, 5, 3, device=device), None, keep=2)
    assert out.shape == (0, 2, 3) and slot.shape == (0, 5)
    out, index, sizes_out, slot = ops.prune(torch.randn(2, 0, 3, device=device), None, keep=0)
    assert out.shape == (2, 0, 3) and index.shape == (2, 0)
    assert ops.importance(torch.rand(0, 2, 3, 4, device=device)).shape == (0, 4)


@pytest.mark.parametrize("fill", [math.nan, math.inf, -math.inf, 0.0, 1.0, 1e30, 1e-30])
@pytest.mark.parametrize("imp_fill", [None, math.nan, math.inf, 0.0, -1.0])
def test_degenerate_values_give_a_valid_selection(device, fill, imp_fill):
    tokens = torch.full((2, 12, 4), fill, device=device)
    tokens[1, ::3] = torch.randn(4, 4, device=device)  # half degenerate, half not
    imp = None if imp_fill is None else torch.full((2, 12), imp_fill, device=device)
    for alpha in (0.0, 0.5, 1.0):
        out, index, sizes_out, slot = ops.prune(tokens, imp, keep=5, alpha=alpha, protect=1)
        testing.check_selection(tokens.cpu(), None if imp is None else imp.cpu(), index.cpu(), slot.cpu(), keep=5,
                                alpha=alpha, protect=1)


# ---------------------------------------------------------------------------- the op contract


def _opcheck_cases():
    tokens, a, metric, sizes = make_case(2, 12, 6, Dm=4, attn="4d", sizes=True, seed=7)
    imp = a.mean((1, 2))
    index, slot = ops.select(metric, imp, keep=5, protect=1)
    q, k = torch.randn(2, 2, 3, 4), torch.randn(2, 2, 12, 4)
    grad_tokens = tokens.double().requires_grad_()
    return [
        (ops.prune.default, (tokens, a), dict(keep=5, metric=metric, sizes=sizes, alpha=0.3, protect=1)),
        (ops.prune.default, (grad_tokens, imp.double()), dict(keep=5, merge=False)),
        (ops.prune.default, (grad_tokens, None), dict(keep=4, sizes=sizes)),
        (ops.select.default, (metric, imp), dict(keep=5, protect=1)),
        (ops.select.default, (metric, None), dict(keep=5, alpha=0.0)),
        (ops.merge.default, (grad_tokens, index, slot, sizes), {}),
        (ops.merge.default, (tokens, index, slot), {}),
        (ops.importance.default, (a,), {}),
        (ops.importance_from_qk.default, (q, k, 0.5), {}),
    ]


@pytest.mark.parametrize("case", range(len(_opcheck_cases())))
def test_opcheck(case):
    op, args, kwargs = _opcheck_cases()[case]
    torch.library.opcheck(op, args, kwargs)


def test_default_alpha_matches_schema():
    for op in (ops.prune.default, ops.select.default):
        alpha = next(a for a in op._schema.arguments if a.name == "alpha")
        assert alpha.default_value == DEFAULT_ALPHA


def test_torch_compile_fullgraph():
    tokens, a, metric, _ = make_case(2, 20, 8, Dm=4)

    def encoder_step(x, attn, m):
        out, index, sizes, slot = ops.prune(x * 2, attn, keep=7, metric=m, protect=1)
        return out.relu() * sizes[..., None], slot

    compiled = torch.compile(encoder_step, fullgraph=True, backend="aot_eager")
    got, want = compiled(tokens, a, metric), encoder_step(tokens, a, metric)
    torch.testing.assert_close(got[0], want[0])
    assert torch.equal(got[1], want[1])


AUTOCAST_DTYPES = [torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("autocast", AUTOCAST_DTYPES)
def test_ops_under_autocast_return_what_they_return_without(device, dtype, autocast):
    # Autocast must not reach the GEMMs and softmax inside the ops (csrc/autocast.cpp): the same selection and
    # bitwise the same outputs, in the inputs' dtype.
    tokens, a, metric, sizes = make_case(2, 197, 24, Dm=16, dtype=dtype, device=device, sizes=True, seed=21)
    importance = ops.importance(a)
    g = torch.Generator().manual_seed(22)
    q = torch.randn(2, 3, 5, 16, generator=g).to(dtype=dtype, device=device)
    k = torch.randn(2, 3, 197, 16, generator=g).to(dtype=dtype, device=device)
    calls = {
        "prune": lambda: ops.prune(tokens, a, keep=100, metric=metric, sizes=sizes, protect=1),
        "prune_gather": lambda: ops.prune(tokens, importance, keep=20, protect=1, merge=False),
        "select": lambda: ops.select(metric, importance, keep=100, protect=1),
        "select_dot_products": lambda: ops.select(metric, None, keep=5, protect=1),
        "merge": lambda: ops.merge(tokens, *ops.select(metric, importance, keep=50, protect=1), sizes),
        "importance": lambda: ops.importance(a),
        "importance_from_qk": lambda: ops.importance_from_qk(q, k, 0.25),
    }
    for name, call in calls.items():
        expected = call()
        with torch.autocast(device, dtype=autocast):
            got = call()
        for e, o in zip(expected if isinstance(expected, tuple) else [expected],
                        got if isinstance(got, tuple) else [got]):
            assert o.dtype == e.dtype and torch.equal(o, e), name
    # importance_from_qk keeps float32 accuracy: logits in bf16 would be off by ~1e-4.
    with torch.autocast(device, dtype=autocast):
        got = ops.importance_from_qk(q.float(), k.float(), 0.25)
    want = reference.importance_from_qk(q.cpu().double(), k.cpu().double(), 0.25)
    torch.testing.assert_close(got.cpu().double(), want.double(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("merge", [True, False])
def test_gradcheck(merge):
    tokens, a, metric, sizes = make_case(2, 10, 3, Dm=3, dtype=torch.float64, sizes=True, seed=8)
    tokens.requires_grad_()
    fn = lambda x: ops.prune(x, a, keep=4, metric=metric, sizes=sizes, protect=1, merge=merge)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (tokens,))
    index, slot = ops.select(metric, a.mean((1, 2)), keep=4, protect=1)
    assert torch.autograd.gradcheck(lambda x: ops.merge(x, index, slot, sizes)[0], (tokens,))


def test_friendly_prune_accepts_unbatched_and_ratio():
    tokens, a, metric, sizes = make_case(1, 21, 6, Dm=4, sizes=True)
    batched = evoprune_ext.prune(tokens, a, keep=11, metric=metric, sizes=sizes, protect=1)
    single = evoprune_ext.prune(tokens[0], a[0], ratio=0.5, metric=metric[0], sizes=sizes[0], protect=1)
    assert isinstance(single, evoprune_ext.Pruned) and single.out.shape == (11, 6)
    for b, s in zip(batched, single):
        assert torch.equal(b[0], s)
    with pytest.raises(ValueError, match="exactly one of keep"):
        evoprune_ext.prune(tokens, keep=3, ratio=0.5)
    with pytest.raises(ValueError, match=r"ratio must be in \[0, 1\]"):
        evoprune_ext.prune(tokens, ratio=1.5)


def test_large_n_uses_no_n_by_n_memory():
    # N = 20,000 would need 1.6 GB as a float32 similarity matrix; the dot-product path needs O(N*Dm).
    tokens = torch.randn(1, 20000, 16)
    out, index, sizes_out, slot = ops.prune(tokens, None, keep=32, alpha=0.0)
    assert out.shape == (1, 32, 16) and sizes_out.sum().item() == 20000.0


def test_build_info():
    info = evoprune_ext.build_info()
    assert info["version"] == "0.1.0" and isinstance(info["cuda"], bool) and info["num_threads"] >= 1


# ---------------------------------------------------------------------------- invalid arguments

T = torch.randn(2, 6, 4)
BAD_PRUNE = [
    (dict(tokens=torch.randn(6, 4)), "tokens must have shape [B, N, D]"),
    (dict(tokens=T.int()), "tokens must be float32, float64, float16 or bfloat16"),
    (dict(keep=7), "keep must be in [protect, N] = [0, 6], got 7"),
    (dict(keep=1, protect=2), "keep must be in [protect, N] = [2, 6], got 1"),
    (dict(protect=7, keep=7), "protect must be in [0, N] = [0, 6], got 7"),
    (dict(protect=-1), "protect must be in [0, N] = [0, 6], got -1"),
    (dict(alpha=1.5), "alpha must be in [0, 1], got 1.5"),
    (dict(alpha=-0.1), "alpha must be in [0, 1], got -0.1"),
    (dict(alpha=math.nan), "alpha must be in [0, 1], got nan"),
    (dict(attn=torch.rand(2, 5)), "attn must have shape [B, N] = [2, 6]"),
    (dict(attn=torch.rand(3, 6)), "attn must have shape [B, N] = [2, 6]"),
    (dict(attn=torch.rand(2, 1, 6)), "attn must have shape [B, H, Q, N] or [B, N] = [2, 6]"),
    (dict(attn=torch.rand(2, 1, 6, 5)), "attn as attention must have shape [B, H, Q, N] = [2, H, Q, 6]"),
    (dict(attn=torch.rand(2, 6).half()), "attn must be float32 or the dtype of tokens (Float), got Half"),
    (dict(metric=torch.randn(2, 5, 3)), "metric must have shape [B, N, Dm] with B, N of tokens (2, 6)"),
    (dict(metric=torch.randn(2, 6, 3).double()), "metric must have the dtype of tokens (Float), got Double"),
    (dict(metric=torch.randn(2, 6)), "metric must have shape [B, N, D]"),
    (dict(sizes=torch.ones(2, 5)), "sizes must have shape [B, N] = [2, 6]"),
    (dict(sizes=torch.ones(2, 6).double()), "sizes must be float32, got Double"),
    (dict(sizes=-torch.ones(2, 6)), "sizes must be >= 0"),
    (dict(sizes=torch.full((2, 6), math.nan)), "sizes must be finite"),
    (dict(sizes=torch.full((2, 6), math.inf)), "sizes must be finite"),
    (dict(attn=torch.rand(2, 6, device="meta")), "attn must be on the device of tokens"),
]


@pytest.mark.parametrize("kwargs,message", BAD_PRUNE, ids=[m for _, m in BAD_PRUNE])
def test_prune_rejects_bad_arguments(kwargs, message):
    args = dict(tokens=T, attn=None, keep=3)
    args.update(kwargs)
    tokens, attn = args.pop("tokens"), args.pop("attn")
    with pytest.raises((RuntimeError, ValueError), match=re.escape(message)):
        ops.prune(tokens, attn, **args)


BAD_MERGE = [
    (dict(index=torch.tensor([[0, 6], [0, 1]])), "index must be in [0, N) = [0, 6), got index[0, 1] = 6"),
    (dict(index=torch.tensor([[0, -1], [0, 1]])), "index must be in [0, N) = [0, 6), got index[0, 1] = -1"),
    (dict(slot=torch.tensor([[0, 1, 2, 0, 0, 0], [0, 1, 0, 0, 0, 0]])), "slot must be in [-1, K) = [-1, 2)"),
    (dict(slot=torch.tensor([[0, 0, -2, 0, 0, 0], [0, 1, 0, 0, 0, 0]])), "slot must be in [-1, K) = [-1, 2)"),
    (dict(slot=torch.tensor([[0, 0, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0]])),
     "slot must map each kept token to its own position: expected slot[0, 1] = 1"),
    (dict(index=torch.tensor([[0, 1]]).int()), "index must have shape [B, K] = [2, K <= 6]"),
    (dict(index=torch.tensor([[0, 1], [0, 1]]).int()), "index must be int64, got Int"),
    (dict(slot=torch.zeros(2, 5, dtype=torch.long)), "slot must have shape [B, N] = [2, 6]"),
    (dict(sizes=torch.ones(2, 6) * -1), "sizes must be >= 0"),
]


@pytest.mark.parametrize("kwargs,message", BAD_MERGE, ids=[m for _, m in BAD_MERGE])
def test_merge_rejects_bad_arguments(kwargs, message):
    args = dict(index=torch.tensor([[0, 1], [0, 1]]), slot=torch.tensor([[0, 1, 0, 0, 0, 0], [0, 1, 1, 1, 1, 1]]),
                sizes=None)
    args.update(kwargs)
    with pytest.raises((RuntimeError, ValueError), match=re.escape(message)):
        ops.merge(T, args["index"], args["slot"], args["sizes"])


BAD_OTHERS = [
    (lambda: ops.importance(torch.rand(2, 6)), "attn must have shape [B, H, Q, N] (4 dimensions), got 2"),
    (lambda: ops.importance(torch.rand(2, 1, 1, 6).int()), "attn must be float32, float64, float16 or bfloat16"),
    (lambda: ops.select(torch.randn(2, 6, 3), torch.rand(2, 1, 6, 6), keep=2), "importance must have shape [B, N]"),
    (lambda: ops.select(torch.randn(2, 6, 3), None, keep=9), "keep must be in [protect, N] = [0, 6], got 9"),
    (lambda: ops.importance_from_qk(torch.randn(2, 3, 4), torch.randn(2, 1, 3, 4), 1.0), "q must have shape"),
    (lambda: ops.importance_from_qk(torch.randn(2, 1, 3, 4), torch.randn(2, 1, 3, 5), 1.0),
     "k must have shape [B, H, N, d] with B, H, d of q (2, 1, 4)"),
    (lambda: ops.importance_from_qk(torch.randn(2, 1, 3, 4), torch.randn(2, 1, 3, 4).double(), 1.0),
     "k must have the dtype of q (Float), got Double"),
    (lambda: ops.importance_from_qk(torch.randn(2, 1, 3, 4), torch.randn(2, 1, 3, 4), math.inf),
     "scale must be finite, got inf"),
]


@pytest.mark.parametrize("call,message", BAD_OTHERS, ids=[m for _, m in BAD_OTHERS])
def test_other_ops_reject_bad_arguments(call, message):
    with pytest.raises((RuntimeError, ValueError), match=re.escape(message)):
        call()


@pytest.mark.parametrize("tokens", [64, 300, 64, 3000])  # in this order: the per-thread scratch grows, then is reused
def test_selection_whatever_the_scratch_matches_reference_in_float64(tokens):
    """The CPU kernels keep per-thread scratch for the similarity matrix (csrc/cpu/scratch.h) and give matrices
    over 32 MiB memory of their own (3000 x 3000 in float64: 72 MB): every size selects exactly as the reference."""
    g = torch.Generator().manual_seed(tokens)
    metric = torch.randn(2, tokens, 8, dtype=torch.float64, generator=g)
    importance = torch.rand(2, tokens, dtype=torch.float64, generator=g)
    keep = tokens // 4  # enough picks for the GEMM
    got = ops.select(metric, importance, keep=keep, alpha=0.2)
    want = reference.select(metric, importance, keep=keep, alpha=0.2)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_importance_from_qk_over_several_blocks_of_queries_matches_reference():
    """The CPU kernel takes the query rows in blocks of 2^18 / N (csrc/cpu/importance.cpp): 512 keys give blocks of
    512 rows, so 1200 queries span three, the last one short."""
    g = torch.Generator().manual_seed(7)
    q, k = torch.randn(2, 2, 1200, 8, generator=g), torch.randn(2, 2, 512, 8, generator=g)
    got = ops.importance_from_qk(q, k, 0.3)
    torch.testing.assert_close(got, reference.importance_from_qk(q, k, 0.3), rtol=1e-5, atol=1e-7)
