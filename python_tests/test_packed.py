"""The packed ops (several sequences in one [T, D] tensor) against the reference, sequence by sequence."""

import math
import re

import pytest
import torch

from evoprune_ext import reference, testing
from evoprune_ext.ops import lengths_from_cu_seqlens

ops = torch.ops.evoprune
DTYPES = [torch.float32, torch.float64, torch.bfloat16]
MERGE_TOL = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 2e-2}
# Uneven sequences, shapes repeating out of order (so buckets interleave), one kept whole.
LENGTHS = [9, 17, 9, 4, 17, 9]
KEEP = [3, 6, 3, 4, 2, 5]


def make_packed(lengths, D=6, *, Dm=4, dtype=torch.float32, device="cpu", importance=True, sizes=False, seed=0):
    """tokens [T,D], importance [T] float32 or None, metric [T,Dm], sizes [T] or None."""
    g = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    tokens = torch.randn(T, D, generator=g).to(dtype=dtype, device=device)
    metric = torch.randn(T, Dm, generator=g).to(dtype=dtype, device=device)
    imp = torch.rand(T, generator=g).to(device) if importance else None
    s = (torch.rand(T, generator=g) * 3 + 0.5).to(device) if sizes else None
    return tokens, imp, metric, s


def sequences(lengths, keep):
    """(input start, output start, length, keep) of each sequence."""
    start = out_start = 0
    for n, k in zip(lengths, keep):
        yield start, out_start, n, k
        start, out_start = start + n, out_start + k


def check_prune_packed(tokens, importance, metric, sizes, *, lengths, keep, alpha, protect, merge):
    """Run prune_packed and check each sequence with the project's checkers, as the batched op would be."""
    inputs = (tokens, importance, metric, sizes)
    before = [None if t is None else t.clone() for t in inputs]
    result = ops.prune_packed(tokens, importance, lengths=lengths, keep=keep, metric=metric, sizes=sizes, alpha=alpha,
                              protect=protect, merge=merge)
    for t, b in zip(inputs, before):
        assert t is None or torch.equal(t, b), "an input was modified"
    out, index, sizes_out, slot = (t.cpu() for t in result)
    K, T = sum(keep), sum(lengths)
    assert out.shape == (K, tokens.shape[1]) and out.dtype == tokens.dtype
    assert index.shape == (K,) and sizes_out.shape == (K,) and slot.shape == (T,)
    assert index.dtype == slot.dtype == torch.int64 and sizes_out.dtype == torch.float32
    tokens, metric = tokens.cpu(), (tokens if metric is None else metric).cpu()
    for start, out_start, n, k in sequences(lengths, keep):
        rows, outs = slice(start, start + n), slice(out_start, out_start + k)
        local_index = (index[outs] - start)[None]
        local_slot = slot[rows]
        assert ((local_slot == -1) | ((local_slot >= out_start) & (local_slot < out_start + k))).all()
        local_slot = torch.where(local_slot >= 0, local_slot - out_start, -1)[None]
        imp = None if importance is None else importance.cpu()[None, rows]
        testing.check_selection(metric[None, rows], imp, local_index, local_slot, keep=k, alpha=alpha, protect=protect)
        s = None if sizes is None else sizes.cpu()[None, rows]
        if merge:
            tol = MERGE_TOL[tokens.dtype]
            testing.check_merge(tokens[None, rows], local_index, local_slot, s, out[None, outs], sizes_out[None, outs],
                                rtol=tol, atol=tol)
        else:
            assert torch.equal(out[outs], tokens[rows][local_index[0]])
            assert torch.equal(sizes_out[outs], torch.ones(k) if s is None else s[0, local_index[0]])
    return result


# ---------------------------------------------------------------------------- parity with the reference


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("importance,sizes", [(True, True), (True, False), (False, False)])
@pytest.mark.parametrize("merge", [True, False])
def test_prune_packed_checks_per_sequence(device, dtype, alpha, importance, sizes, merge):
    tokens, imp, metric, s = make_packed(LENGTHS, dtype=dtype, device=device, importance=importance, sizes=sizes)
    check_prune_packed(tokens, imp, metric, s, lengths=LENGTHS, keep=KEEP, alpha=alpha, protect=1, merge=merge)


@pytest.mark.parametrize("merge", [True, False])
def test_prune_packed_equals_reference_in_float64(device, merge):
    # float64 random inputs have no near-ties: the selection is exactly the reference's.
    tokens, imp, metric, sizes = make_packed(LENGTHS, dtype=torch.float64, device=device, sizes=True, seed=1)
    got = ops.prune_packed(tokens, imp, lengths=LENGTHS, keep=KEEP, metric=metric, sizes=sizes, alpha=0.2, protect=1,
                           merge=merge)
    want = reference.prune_packed(tokens.cpu(), imp.cpu(), lengths=LENGTHS, keep=KEEP, metric=metric.cpu(),
                                  sizes=sizes.cpu(), alpha=0.2, protect=1, merge=merge)
    torch.testing.assert_close(got[0].cpu(), want[0], rtol=1e-12, atol=1e-12)
    for g, w in zip(got[1:], want[1:]):
        assert torch.equal(g.cpu(), w)
    index, slot = ops.select_packed(metric, imp, lengths=LENGTHS, keep=KEEP, alpha=0.2, protect=1)
    assert torch.equal(index, got[1]) and torch.equal(slot, got[3])
    ref_index, ref_slot = reference.select_packed(metric.cpu(), imp.cpu(), lengths=LENGTHS, keep=KEEP, alpha=0.2,
                                                  protect=1)
    assert torch.equal(index.cpu(), ref_index) and torch.equal(slot.cpu(), ref_slot)


def test_one_sequence_equals_the_batched_op(device):
    tokens, imp, metric, sizes = make_packed([23], device=device, sizes=True, seed=2)
    packed = ops.prune_packed(tokens, imp, lengths=[23], keep=[8], metric=metric, sizes=sizes, protect=1)
    batched = ops.prune(tokens[None], imp[None], keep=8, metric=metric[None], sizes=sizes[None], protect=1)
    for p, b in zip(packed, batched):
        assert torch.equal(p, b[0])
    index, slot = ops.select_packed(metric, imp, lengths=[23], keep=[8], protect=1)
    assert torch.equal(index, batched[1][0]) and torch.equal(slot, batched[3][0])


def test_equal_sequences_equal_one_batched_call(device):
    # The frames of a video: one bucket, one call of the batched op on [frames, n, D].
    frames, n, keep = 12, 16, 5
    tokens, imp, metric, _ = make_packed([n] * frames, device=device, seed=3)
    out, index, sizes_out, slot = ops.prune_packed(tokens, imp, lengths=[n] * frames, keep=[keep] * frames,
                                                   metric=metric)
    b_out, b_index, b_sizes, b_slot = ops.prune(tokens.view(frames, n, -1), imp.view(frames, n), keep=keep,
                                                metric=metric.view(frames, n, -1))
    assert torch.equal(out, b_out.flatten(0, 1)) and torch.equal(sizes_out, b_sizes.flatten())
    frame = torch.arange(frames, device=device)[:, None]
    assert torch.equal(index, (b_index + frame * n).flatten())
    assert torch.equal(slot, torch.where(b_slot >= 0, b_slot + frame * keep, -1).flatten())


def test_keep_equal_to_length_is_identity_and_protect_is_kept(device):
    lengths, keep = [5, 8, 3], [5, 2, 3]
    tokens, imp, metric, sizes = make_packed(lengths, device=device, sizes=True, seed=4)
    out, index, sizes_out, slot = check_prune_packed(tokens, imp, metric, sizes, lengths=lengths, keep=keep,
                                                     alpha=0.1, protect=2, merge=True)
    assert torch.equal(out[:5], tokens[:5]) and torch.equal(out[7:], tokens[13:])
    assert index.tolist() == [0, 1, 2, 3, 4, 5, 6, 13, 14, 15]  # protected 5, 6 of the middle sequence, kept whole
    assert slot[:5].tolist() == [0, 1, 2, 3, 4] and slot[13:].tolist() == [7, 8, 9]


def test_zero_length_sequences(device):
    lengths, keep = [0, 6, 0, 4, 0], [0, 2, 0, 4, 0]
    tokens, imp, metric, _ = make_packed(lengths, device=device, seed=5)
    out, index, sizes_out, slot = check_prune_packed(tokens, imp, metric, None, lengths=lengths, keep=keep, alpha=0.1,
                                                     protect=0, merge=True)
    assert index[2:].tolist() == [6, 7, 8, 9]
    q, k = torch.randn(2, 10, 4, device=device), torch.randn(2, 10, 4, device=device)
    got = ops.importance_from_qk_packed(q, k, 0.5, q_lengths=lengths, k_lengths=lengths)
    want = reference.importance_from_qk_packed(q.cpu(), k.cpu(), 0.5, q_lengths=lengths, k_lengths=lengths)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("queries", ["all", "one"])
def test_importance_from_qk_packed_matches_reference(device, dtype, queries):
    g = torch.Generator().manual_seed(6)
    k_lengths = [7, 20, 7, 13]
    q_lengths = k_lengths if queries == "all" else [1] * len(k_lengths)
    q = torch.randn(3, sum(q_lengths), 8, generator=g).to(dtype=dtype, device=device)
    k = torch.randn(3, sum(k_lengths), 8, generator=g).to(dtype=dtype, device=device)
    got = ops.importance_from_qk_packed(q, k, 0.3, q_lengths=q_lengths, k_lengths=k_lengths)
    want = reference.importance_from_qk_packed(q.cpu(), k.cpu(), 0.3, q_lengths=q_lengths, k_lengths=k_lengths)
    assert got.dtype == torch.float32 and got.shape == (sum(k_lengths),)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-6)
    one = ops.importance_from_qk_packed(q[:, :q_lengths[0]], k[:, :7], 0.3, q_lengths=q_lengths[:1], k_lengths=[7])
    assert torch.equal(one, ops.importance_from_qk(q[None, :, :q_lengths[0]], k[None, :, :7], 0.3)[0])


def test_lengths_from_cu_seqlens():
    assert lengths_from_cu_seqlens(torch.tensor([0, 4, 4, 10], dtype=torch.int32)) == [4, 0, 6]
    with pytest.raises(ValueError, match="must start at 0"):
        lengths_from_cu_seqlens(torch.tensor([1, 4]))
    with pytest.raises(ValueError, match="never decrease"):
        lengths_from_cu_seqlens(torch.tensor([0, 4, 3]))
    with pytest.raises(ValueError, match=re.escape("must have shape [sequences + 1]")):
        lengths_from_cu_seqlens(torch.tensor([0]))


# ---------------------------------------------------------------------------- the op contract


def _opcheck_cases():
    tokens, imp, metric, sizes = make_packed(LENGTHS, seed=7, sizes=True)
    grad_tokens = tokens.double().requires_grad_()
    q, k = torch.randn(2, 4, 4), torch.randn(2, sum(LENGTHS), 4)
    packed = dict(lengths=LENGTHS, keep=KEEP)
    return [
        (ops.prune_packed.default, (tokens, imp), dict(packed, metric=metric, sizes=sizes, alpha=0.3, protect=1)),
        (ops.prune_packed.default, (grad_tokens, imp), dict(packed, merge=False)),
        (ops.prune_packed.default, (grad_tokens, None), dict(packed, sizes=sizes)),
        (ops.select_packed.default, (metric, imp), dict(packed, protect=1)),
        (ops.importance_from_qk_packed.default, (q, k, 0.5), dict(q_lengths=[1] * 4, k_lengths=[9, 26, 13, 17])),
    ]


@pytest.mark.parametrize("case", range(len(_opcheck_cases())))
def test_opcheck(case):
    op, args, kwargs = _opcheck_cases()[case]
    torch.library.opcheck(op, args, kwargs)


@pytest.mark.parametrize("merge", [True, False])
def test_gradcheck(merge):
    lengths, keep = [6, 9, 6], [3, 4, 2]
    tokens, imp, metric, sizes = make_packed(lengths, D=3, dtype=torch.float64, sizes=True, seed=8)
    tokens.requires_grad_()

    def fn(x):
        return ops.prune_packed(x, imp, lengths=lengths, keep=keep, metric=metric, sizes=sizes, protect=1,
                                merge=merge)[0]

    assert torch.autograd.gradcheck(fn, (tokens,))


def test_torch_compile_fullgraph():
    tokens, imp, metric, _ = make_packed(LENGTHS, seed=9)

    def encoder_step(x, importance, m):
        out, index, sizes, slot = ops.prune_packed(x * 2, importance, lengths=LENGTHS, keep=KEEP, metric=m, protect=1)
        return out.relu() * sizes[:, None], slot

    compiled = torch.compile(encoder_step, fullgraph=True, backend="aot_eager")
    got, want = compiled(tokens, imp, metric), encoder_step(tokens, imp, metric)
    torch.testing.assert_close(got[0], want[0])
    assert torch.equal(got[1], want[1])


# ---------------------------------------------------------------------------- invalid arguments

T = torch.randn(10, 4)
BAD_PRUNE = [
    (dict(tokens=torch.randn(1, 10, 4)), "tokens must have shape [T, D] (2 dimensions), got 3"),
    (dict(tokens=T.int()), "tokens must be float32, float64, float16 or bfloat16, got Int"),
    (dict(lengths=[]), "lengths must have at least one entry (one per sequence), got none"),
    (dict(lengths=[11, -1], keep=[1, 0]), "lengths must be >= 0, got lengths[1] = -1"),
    (dict(lengths=[4, 5]), "lengths must sum to the packed size of tokens (10), got 9"),
    (dict(keep=[2]), "keep must have one entry per sequence (2), got 1"),
    (dict(keep=[2, 7]), "keep[1] must be in [protect, lengths[1]] = [0, 6], got 7"),
    (dict(keep=[0, 1], protect=1), "keep[0] must be in [protect, lengths[0]] = [1, 4], got 0"),
    (dict(lengths=[2, 8], keep=[3, 3], protect=3), "protect must be <= every length, got protect = 3 > lengths[0] = 2"),
    (dict(protect=-1), "protect must be >= 0, got -1"),
    (dict(alpha=1.5), "alpha must be in [0, 1], got 1.5"),
    (dict(alpha=math.nan), "alpha must be in [0, 1], got nan"),
    (dict(importance=torch.rand(9)), "importance must have shape [T] = [10], got [9]"),
    (dict(importance=torch.rand(1, 10)), "importance must have shape [T] = [10], got [1, 10]"),
    (dict(importance=torch.rand(10).double()), "importance must be float32 or the dtype of tokens (Float), got Double"),
    (dict(importance=torch.rand(10, device="meta")), "importance must be on the device of tokens"),
    (dict(metric=torch.randn(9, 3)), "metric must have shape [T, Dm] with T of tokens (10), got [9, 3]"),
    (dict(metric=torch.randn(10, 3).double()), "metric must have the dtype of tokens (Float), got Double"),
    (dict(metric=torch.randn(10)), "metric must have shape [T, D] (2 dimensions), got 1"),
    (dict(sizes=torch.ones(9)), "sizes must have shape [T] = [10], got [9]"),
    (dict(sizes=torch.ones(10).double()), "sizes must be float32, got Double"),
    (dict(sizes=-torch.ones(10)), "sizes must be >= 0"),
    (dict(sizes=torch.full((10,), math.nan)), "sizes must be finite"),
]


@pytest.mark.parametrize("kwargs,message", BAD_PRUNE, ids=[m for _, m in BAD_PRUNE])
def test_prune_packed_rejects_bad_arguments(kwargs, message):
    args = dict(tokens=T, importance=None, lengths=[4, 6], keep=[2, 3])
    args.update(kwargs)
    tokens, importance = args.pop("tokens"), args.pop("importance")
    with pytest.raises((RuntimeError, ValueError), match=re.escape(message)):
        ops.prune_packed(tokens, importance, **args)


Q, K = torch.randn(2, 3, 4), torch.randn(2, 10, 4)
BAD_OTHERS = [
    (lambda: ops.select_packed(torch.randn(10), None, lengths=[10], keep=[1]),
     "metric must have shape [T, D] (2 dimensions), got 1"),
    (lambda: ops.select_packed(T, torch.rand(10).half(), lengths=[10], keep=[1]),
     "importance must be float32 or the dtype of metric (Float), got Half"),
    (lambda: ops.select_packed(T, None, lengths=[10], keep=[11]), "keep[0] must be in [protect, lengths[0]] = [0, 10]"),
    (lambda: ops.select_packed(T, None, lengths=[5], keep=[1]), "lengths must sum to the packed size of metric (10)"),
    (lambda: ops.importance_from_qk_packed(Q[0], K, 1.0, q_lengths=[3], k_lengths=[10]),
     "q must have shape [H, Tq, d] (3 dimensions)"),
    (lambda: ops.importance_from_qk_packed(Q, K[None], 1.0, q_lengths=[3], k_lengths=[10]),
     "k must have shape [H, T, d] (3 dimensions)"),
    (lambda: ops.importance_from_qk_packed(Q, K[:1], 1.0, q_lengths=[3], k_lengths=[10]),
     "k must have shape [H, T, d] with H, d of q (2, 4), got [1, 10, 4]"),
    (lambda: ops.importance_from_qk_packed(Q, K.double(), 1.0, q_lengths=[3], k_lengths=[10]),
     "k must have the dtype of q (Float), got Double"),
    (lambda: ops.importance_from_qk_packed(Q, K, math.inf, q_lengths=[3], k_lengths=[10]),
     "scale must be finite, got inf"),
    (lambda: ops.importance_from_qk_packed(Q, K, 1.0, q_lengths=[2], k_lengths=[10]),
     "q_lengths must sum to the packed size of q (3), got 2"),
    (lambda: ops.importance_from_qk_packed(Q, K, 1.0, q_lengths=[3], k_lengths=[4, 4]),
     "k_lengths must sum to the packed size of k (10), got 8"),
    (lambda: ops.importance_from_qk_packed(Q, K, 1.0, q_lengths=[3], k_lengths=[4, 6]),
     "k_lengths must have one entry per sequence of q_lengths (1), got 2"),
]


@pytest.mark.parametrize("call,message", BAD_OTHERS, ids=[m for _, m in BAD_OTHERS])
def test_other_packed_ops_reject_bad_arguments(call, message):
    with pytest.raises((RuntimeError, ValueError), match=re.escape(message)):
        call()
