"""The CUDA kernels against the CPU kernels, the reference and the checker (docs/CUDA.md).

Everything here but the registration test needs a GPU and is skipped without one. On a GPU machine:
    python -m pytest -q python_tests/test_cuda.py
and under compute-sanitizer (see docs/CUDA.md) with -k to keep it short.
"""

import re

import pytest
import torch

import evoprune_ext
from evoprune_ext import reference, testing

OPS = ["prune", "select", "merge", "importance", "importance_from_qk"]
HAS_CUDA_BUILD = evoprune_ext.build_info()["cuda"]
needs_gpu = pytest.mark.skipif(
    not (HAS_CUDA_BUILD and torch.cuda.is_available()), reason="needs a CUDA build of evoprune_ext and a GPU"
)
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
CUDA = "cuda"


def inputs(B, N, D, *, dtype=torch.float32, seed=0, heads=2, queries=None):
    """tokens [B,N,D], attention [B,H,Q,N] (rows sum to 1) and sizes [B,N] on the CPU."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randn(B, N, D, generator=gen).to(dtype)
    logits = torch.randn(B, heads, N if queries is None else queries, N, generator=gen)
    sizes = torch.rand(B, N, generator=gen) * 3 + 0.5
    return tokens, logits.softmax(-1).to(dtype), sizes


def on_cuda(*tensors):
    return [None if t is None else t.to(CUDA) for t in tensors]


@pytest.mark.skipif(not HAS_CUDA_BUILD, reason="CPU-only build of evoprune_ext")
@pytest.mark.parametrize("op", OPS)
def test_every_op_has_a_cuda_kernel(op):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"evoprune::{op}", "CUDA")


# ---------------------------------------------------------------------------------------------------------
# select: both similarity paths, shared and global state, every dtype


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "B,N,Dm,keep,protect,alpha",
    [
        (3, 197, 64, 99, 1, 0.1),  # many picks: similarity matrix
        (2, 577, 48, 20, 1, 0.3),  # few picks: dot products in the kernel
        (2, 50, 8, 50, 0, 0.0),  # keep everything, farthest point
        (2, 40, 16, 5, 5, 0.5),  # keep = protect: nothing picked
        (1, 30, 4, 12, 0, 1.0),  # top-K by importance
        (2, 10, 0, 4, 1, 0.3),  # an empty metric: every similarity is 0
    ],
)
def test_select_matches_cpu_and_reference(dtype, B, N, Dm, keep, protect, alpha):
    metric, attn, _ = inputs(B, N, Dm, dtype=dtype)
    importance = reference.importance(attn)
    args = dict(keep=keep, alpha=alpha, protect=protect)
    index, slot = torch.ops.evoprune.select(metric, importance, **args)
    index_cuda, slot_cuda = torch.ops.evoprune.select(*on_cuda(metric, importance), **args)
    testing.check_selection(metric.cuda(), importance.cuda(), index_cuda, slot_cuda, **args)
    if dtype == torch.float64:  # no near-ties at float64 rounding: the same tokens, the same owners
        torch.testing.assert_close(index_cuda.cpu(), index, rtol=0, atol=0)
        torch.testing.assert_close(slot_cuda.cpu(), slot, rtol=0, atol=0)


@needs_gpu
def test_select_ties_go_to_the_lowest_index_like_cpu():
    metric = torch.ones(2, 64, 8)  # every score ties at every step
    for alpha in (0.0, 0.5, 1.0):
        expected = torch.ops.evoprune.select(metric, torch.ones(2, 64), keep=10, alpha=alpha, protect=2)
        got = torch.ops.evoprune.select(metric.cuda(), torch.ones(2, 64, device=CUDA), keep=10, alpha=alpha, protect=2)
        for e, g in zip(expected, got):
            torch.testing.assert_close(g.cpu(), e, rtol=0, atol=0)


@needs_gpu
@pytest.mark.parametrize("fill", [float("nan"), float("inf"), 0.0])
def test_degenerate_values_give_the_cpu_selection(fill):
    metric, attn, _ = inputs(2, 100, 16, seed=3)
    metric[:, ::3] = fill
    importance = reference.importance(attn)
    importance[:, ::5] = fill
    expected = torch.ops.evoprune.select(metric, importance, keep=40, alpha=0.2, protect=1)
    got = torch.ops.evoprune.select(*on_cuda(metric, importance), keep=40, alpha=0.2, protect=1)
    testing.check_valid(*got, keep=40, protect=1)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g.cpu(), e, rtol=0, atol=0)


@needs_gpu
def test_any_strides():
    metric, attn, sizes = inputs(2, 120, 32, seed=5)
    strided = metric.transpose(0, 1).contiguous().transpose(0, 1)[:, :, ::2]  # non-contiguous in every dim
    importance = reference.importance(attn.transpose(2, 3).contiguous().transpose(2, 3))
    expected = torch.ops.evoprune.select(strided.contiguous(), importance, keep=30, alpha=0.1, protect=1)
    got = torch.ops.evoprune.select(strided.cuda(), importance.cuda(), keep=30, alpha=0.1, protect=1)
    testing.check_selection(strided.cuda(), importance.cuda(), *got, keep=30, alpha=0.1, protect=1)
    torch.testing.assert_close(got[0].cpu(), expected[0], rtol=0, atol=0)
    imp_cuda = torch.ops.evoprune.importance(attn.cuda().transpose(2, 3).contiguous().transpose(2, 3))
    torch.testing.assert_close(imp_cuda.cpu(), reference.importance(attn), rtol=1e-5, atol=1e-6)


@needs_gpu
def test_large_n_uses_the_global_workspace():
    # 65,536 tokens: red/owner (512 KiB) exceed shared memory; few picks: dot products.
    metric, _, _ = inputs(1, 65536, 16, seed=7, heads=1, queries=1)
    index, slot = torch.ops.evoprune.select(metric.cuda(), None, keep=24, alpha=0.0, protect=1)
    testing.check_selection(metric.cuda(), None, index, slot, keep=24, alpha=0.0, protect=1)


@needs_gpu
def test_large_batch():
    metric, attn, sizes = inputs(4096, 64, 8, seed=11, heads=1, queries=1)
    args = dict(keep=32, alpha=0.1, protect=1)
    out, index, sizes_out, slot = torch.ops.evoprune.prune(*on_cuda(metric, attn), sizes=sizes.cuda(), **args)
    testing.check_selection(metric.cuda(), attn.cuda(), index, slot, **args)
    testing.check_merge(metric.cuda(), index, slot, sizes.cuda(), out, sizes_out, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# importance, merge, prune


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("queries", [1, 9, 300])
def test_importance_matches_cpu(dtype, queries):
    _, attn, _ = inputs(3, 300, 4, dtype=dtype, heads=4, queries=queries)
    expected = torch.ops.evoprune.importance(attn)
    got = torch.ops.evoprune.importance(attn.cuda())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-5, atol=1e-7)


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_importance_from_qk_matches_cpu(dtype):
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(2, 3, 17, 8, generator=gen).to(dtype)
    k = torch.randn(2, 3, 50, 8, generator=gen).to(dtype)
    expected = torch.ops.evoprune.importance_from_qk(q, k, 0.35)
    got = torch.ops.evoprune.importance_from_qk(q.cuda(), k.cuda(), 0.35)
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-4, atol=1e-6)


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_sizes", [False, True])
def test_merge_matches_reference_and_is_deterministic(dtype, with_sizes):
    tokens, attn, sizes = inputs(3, 150, 40, dtype=dtype, seed=4)
    sizes = sizes if with_sizes else None
    index, slot = torch.ops.evoprune.select(tokens.float(), reference.importance(attn), keep=50, protect=1)
    args = on_cuda(tokens, index, slot, sizes)
    out, sizes_out = torch.ops.evoprune.merge(*args)
    tolerance = 1e-5 if dtype in (torch.float32, torch.float64) else 1e-2
    testing.check_merge(args[0], args[1], args[2], args[3], out, sizes_out, rtol=tolerance, atol=tolerance)
    again = torch.ops.evoprune.merge(*args)
    assert torch.equal(out, again[0]) and torch.equal(sizes_out, again[1])


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("merge", [True, False])
def test_prune_matches_cpu(dtype, merge):
    tokens, attn, sizes = inputs(2, 197, 32, dtype=dtype, seed=6, heads=3)
    args = dict(keep=64, alpha=0.1, protect=1, merge=merge)
    expected = torch.ops.evoprune.prune(tokens, attn, sizes=sizes, **args)
    got = torch.ops.evoprune.prune(*on_cuda(tokens, attn), sizes=sizes.cuda(), **args)
    testing.check_selection(tokens.cuda(), attn.cuda(), got[1], got[3], keep=64, alpha=0.1, protect=1)
    if dtype == torch.float64:
        for e, g in zip(expected, got):
            torch.testing.assert_close(g.cpu(), e)


@needs_gpu
def test_prune_gradient_matches_cpu():
    tokens, attn, sizes = inputs(2, 60, 8, dtype=torch.float64, seed=9)
    grads = []
    for device in ("cpu", CUDA):
        x = tokens.to(device).requires_grad_()
        out = torch.ops.evoprune.prune(x, attn.to(device), keep=20, sizes=sizes.to(device))[0]
        (out * torch.arange(out.numel(), device=device).view_as(out)).sum().backward()
        grads.append(x.grad.cpu())
    torch.testing.assert_close(grads[1], grads[0])


# ---------------------------------------------------------------------------------------------------------
# No host synchronization: CUDA graphs and the sync debug mode


@needs_gpu
def test_prune_does_not_synchronize():
    tokens, attn, sizes = on_cuda(*inputs(2, 577, 64, seed=12))
    torch.ops.evoprune.prune(tokens, attn, keep=100, sizes=sizes)  # warm-up: lazy initialization may sync
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        torch.ops.evoprune.prune(tokens, attn, keep=100, sizes=sizes)
        torch.ops.evoprune.prune(tokens, attn, keep=300, sizes=sizes)
        torch.ops.evoprune.prune(tokens, attn.mean((1, 2)), keep=100, merge=False)
    finally:
        torch.cuda.set_sync_debug_mode(previous)


@needs_gpu
def test_prune_is_captured_by_a_cuda_graph():
    tokens, attn, sizes = on_cuda(*inputs(2, 577, 64, seed=13))
    args = dict(keep=144, alpha=0.1, protect=1)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        torch.ops.evoprune.prune(tokens, attn, sizes=sizes, **args)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = torch.ops.evoprune.prune(tokens, attn, sizes=sizes, **args)
    new_tokens, new_attn, new_sizes = on_cuda(*inputs(2, 577, 64, seed=14))
    tokens.copy_(new_tokens)
    attn.copy_(new_attn)
    sizes.copy_(new_sizes)
    graph.replay()
    torch.cuda.synchronize()
    eager = torch.ops.evoprune.prune(tokens, attn, sizes=sizes, **args)
    for c, e in zip(captured, eager):
        torch.testing.assert_close(c, e, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------
# Issue 9: autocast, the shared-memory windows, threads, groups, TF32 flags, devices, merge's errors


@needs_gpu
@pytest.mark.parametrize("autocast", [torch.bfloat16, torch.float16])
def test_ops_under_autocast_match_without(autocast):
    tokens, attn, sizes = on_cuda(*inputs(2, 197, 32, seed=30))
    calls = {
        "prune": lambda: torch.ops.evoprune.prune(tokens, attn, keep=100, sizes=sizes, protect=1),
        "select": lambda: torch.ops.evoprune.select(tokens, attn.mean((1, 2)), keep=100, protect=1),
        "importance_from_qk": lambda: torch.ops.evoprune.importance_from_qk(tokens[:, None], tokens[:, None], 0.2),
    }
    for name, call in calls.items():
        expected = call()
        with torch.autocast("cuda", dtype=autocast):
            got = call()
        as_tuple = (lambda x: x if isinstance(x, tuple) else (x,))
        for e, g in zip(as_tuple(expected), as_tuple(got), strict=True):
            assert g.dtype == e.dtype and torch.equal(g, e), name


# The dynamic red/owner state is N * (acc bytes + 4); these N put it between 48 KiB less the greedy's static
# shared memory and 48 KiB, where a launch without the opt-in fails, and around the opt-in.
SHARED_WINDOWS = [(torch.float64, n) for n in (3889, 3890, 4000, 4096)] + [
    (torch.float32, n) for n in (5834, 5835, 6000, 6144, 6200)
]


@needs_gpu
@pytest.mark.parametrize("dtype,N", SHARED_WINDOWS)
@pytest.mark.parametrize("keep", [17, 800])  # dot products; the similarity matrix
def test_select_in_the_shared_memory_windows(dtype, N, keep):
    metric, _, _ = inputs(1, N, 8, dtype=dtype, seed=N, heads=1, queries=1)
    got = torch.ops.evoprune.select(metric.cuda(), None, keep=keep, alpha=0.0, protect=1)
    if dtype == torch.float64:
        expected = torch.ops.evoprune.select(metric, None, keep=keep, alpha=0.0, protect=1)
        for e, g in zip(expected, got):
            torch.testing.assert_close(g.cpu(), e, rtol=0, atol=0)
    else:
        testing.check_valid(*got, keep=keep, protect=1)


@needs_gpu
def test_threads_with_different_n_get_the_sequential_results():
    from concurrent.futures import ThreadPoolExecutor

    # Sizes on both sides of 48 KiB of state, so that threads would race on the opt-in attribute.
    cases = [inputs(1, n, 8, dtype=torch.float64, seed=n, heads=1, queries=1)[0].cuda() for n in (500, 4096, 8000)]
    expected = [torch.ops.evoprune.select(m, None, keep=64, alpha=0.0, protect=1) for m in cases]

    def call(i):
        return torch.ops.evoprune.select(cases[i % 3], None, keep=64, alpha=0.0, protect=1)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(call, range(48)))
    torch.cuda.synchronize()
    for i, result in enumerate(results):
        for e, g in zip(expected[i % 3], result):
            assert torch.equal(e, g)


@needs_gpu
def test_several_similarity_groups_match_cpu():
    # float64 at N = 2048: 32 MiB per similarity matrix, 8 per group of the 256 MiB budget; 19 samples: 3 groups.
    metric, attn, _ = inputs(19, 2048, 8, dtype=torch.float64, seed=31, heads=1, queries=1)
    importance = reference.importance(attn)
    args = dict(keep=300, alpha=0.1, protect=1)
    expected = torch.ops.evoprune.select(metric, importance, **args)
    got = torch.ops.evoprune.select(*on_cuda(metric, importance), **args)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g.cpu(), e, rtol=0, atol=0)


@needs_gpu
def test_similarities_stay_float32_whatever_the_tf32_and_blas_flags():
    metric, attn, _ = inputs(2, 577, 64, seed=32)
    importance = reference.importance(attn)
    args = dict(keep=300, alpha=0.0, protect=1)  # many picks: the similarity matrix; alpha 0: similarity only
    expected = torch.ops.evoprune.select(*on_cuda(metric, importance), **args)
    matmul = torch.backends.cuda.matmul
    previous = (matmul.allow_tf32, torch.get_float32_matmul_precision(), torch.backends.cuda.preferred_blas_library())
    try:
        matmul.allow_tf32 = True
        torch.set_float32_matmul_precision("medium")
        for library in ("cublaslt", "cublas"):
            torch.backends.cuda.preferred_blas_library(library)
            got = torch.ops.evoprune.select(*on_cuda(metric, importance), **args)
            testing.check_selection(metric.cuda(), importance.cuda(), *got, **args)
            for e, g in zip(expected, got):
                assert torch.equal(e, g), library
    finally:
        matmul.allow_tf32 = previous[0]
        torch.set_float32_matmul_precision(previous[1])
        torch.backends.cuda.preferred_blas_library(previous[2])


@pytest.mark.skipif(
    not (HAS_CUDA_BUILD and torch.cuda.is_available() and torch.cuda.device_count() > 1), reason="needs two GPUs"
)
def test_ops_on_a_non_default_device():
    tokens, attn, sizes = inputs(2, 197, 32, dtype=torch.float64, seed=33)
    args = dict(keep=64, alpha=0.1, protect=1)
    expected = torch.ops.evoprune.prune(tokens, attn, sizes=sizes, **args)
    other = torch.device("cuda", 1)
    with torch.cuda.device(0):
        got = torch.ops.evoprune.prune(tokens.to(other), attn.to(other), sizes=sizes.to(other), **args)
        assert torch.cuda.current_device() == 0
    for e, g in zip(expected, got):
        assert g.device == other
        torch.testing.assert_close(g.cpu(), e)
    merged = torch.ops.evoprune.merge(tokens.to(other), got[1], got[3], sizes.to(other))
    torch.testing.assert_close(merged[0].cpu(), expected[0])
    imp = torch.ops.evoprune.importance(attn.to(other))
    torch.testing.assert_close(imp.cpu(), torch.ops.evoprune.importance(attn), rtol=1e-6, atol=1e-9)


@needs_gpu
def test_merge_rejects_bad_values_with_a_clear_error_and_the_gpu_stays_usable():
    tokens = torch.randn(2, 6, 3, device=CUDA)
    index = torch.tensor([[0, 1], [0, 1]], device=CUDA)
    slot = torch.tensor([[0, 1, 0, 0, 0, 0], [0, 1, 1, 1, 1, 1]], device=CUDA)
    bad = [
        (dict(index=torch.tensor([[0, 6], [0, 1]])), "index must be in [0, N) = [0, 6), got index[0, 1] = 6"),
        (dict(slot=torch.tensor([[0, 1, 2, 0, 0, 0], [0, 1, 0, 0, 0, 0]])), "slot must be in [-1, K) = [-1, 2)"),
        (dict(slot=torch.tensor([[0, 0, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0]])), "slot must map each kept token"),
        (dict(sizes=-torch.ones(2, 6)), "sizes must be >= 0"),
        (dict(sizes=torch.full((2, 6), float("nan"))), "sizes must be finite"),
    ]
    for change, message in bad:
        args = dict(index=index, slot=slot, sizes=None)
        args.update({k: v.to(CUDA) for k, v in change.items()})
        with pytest.raises(ValueError, match=re.escape(message)):
            torch.ops.evoprune.merge(tokens, args["index"], args["slot"], args["sizes"])
    out, _ = torch.ops.evoprune.merge(tokens, index, slot)
    torch.cuda.synchronize()  # a fired device-side assertion would surface here
    assert out.shape == (2, 2, 3)


@needs_gpu
def test_merge_is_captured_by_a_cuda_graph():
    tokens, attn, sizes = on_cuda(*inputs(2, 197, 16, seed=34))
    index, slot = torch.ops.evoprune.select(tokens, attn.mean((1, 2)), keep=50, protect=1)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        eager = torch.ops.evoprune.merge(tokens, index, slot, sizes)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = torch.ops.evoprune.merge(tokens, index, slot, sizes)  # no value check: it would synchronize
    graph.replay()
    torch.cuda.synchronize()
    for c, e in zip(captured, eager):
        assert torch.equal(c, e)
