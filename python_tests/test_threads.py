"""The CPU ops on several threads: the same results as on one, under every autograd mode.

The kernels split work over samples, over (head, query) rows, over feature columns and, for one
large sample, over tokens within a greedy pass; each split adds its parts in a fixed order, so the
thread count changes no bit of what our own loops compute. The shapes below cross every split.
"""

from contextlib import contextmanager

import pytest
import torch

import evoprune_ext
from evoprune_ext import reference

ops = torch.ops.evoprune
THREADS = [2, 3]  # 3 on a 2-core machine still splits the work three ways


@contextmanager
def num_threads(n):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def rand(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def attention(b, h, q, n, seed=0):
    return torch.rand(b, h, q, n, generator=torch.Generator().manual_seed(seed)).softmax(-1)


# name -> a call of one op on inputs that split across threads.
CALLS = {
    # samples in parallel; each with a similarity GEMM (many picks) and 4-d attention (rows split by 256)
    "prune batch": lambda: ops.prune(randn(4, 300, 48), attention(4, 4, 300, 300), keep=75, metric=randn(4, 300, 16, seed=1),
                                     protect=1),
    "prune gather": lambda: ops.prune(randn(3, 200, 40), rand(3, 200), keep=50, merge=False),
    # one sample, few picks: dot products, the pass split over tokens
    "select one large sample": lambda: ops.select(randn(1, 6000, 16), rand(1, 6000), keep=40),
    # one sample: the merge splits feature columns
    "merge columns": lambda: ops.merge(randn(1, 729, 1152), *ops.select(randn(1, 729, 72, seed=1), None, keep=182)),
    "importance": lambda: ops.importance(attention(2, 6, 200, 200)),
    "importance_from_qk": lambda: ops.importance_from_qk(randn(2, 3, 500, 24), randn(2, 3, 600, 24, seed=1), 0.2),
    "bfloat16 prune": lambda: ops.prune(randn(4, 300, 48, dtype=torch.bfloat16), attention(4, 2, 300, 300).bfloat16(),
                                        keep=75),
}


# Ops whose values come out of an MKL GEMM called inside a worker: MKL plans it for torch's thread count and may
# round the last bit differently for another count (docs/RELIABILITY.md). Everything else is ours: same bits.
BLAS_ROUNDED = {"importance_from_qk"}


def build_parallel():
    return evoprune_ext.build_info()["parallel_kernels"]


def test_kernels_are_built_to_use_torchs_threads():
    # Under torch's OpenMP backend at::parallel_for runs serially in code built without OpenMP (CMakeLists.txt).
    assert build_parallel()


@pytest.mark.parametrize("name", CALLS)
@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("mode", ["grad", "no_grad", "inference_mode"])
def test_same_bits_on_any_number_of_threads(name, threads, mode):
    context = {"grad": torch.enable_grad, "no_grad": torch.no_grad, "inference_mode": torch.inference_mode}[mode]
    with num_threads(1), context():
        expected = CALLS[name]()
    with num_threads(threads), context():
        got = CALLS[name]()
    for e, g in zip(expected if isinstance(expected, tuple) else (expected,), got if isinstance(got, tuple) else (got,)):
        if name in BLAS_ROUNDED:
            torch.testing.assert_close(g, e, rtol=1e-5, atol=0)
        else:
            assert torch.equal(e, g), f"{name} on {threads} threads differs from 1 thread"


def test_threads_match_the_reference():
    # Bitwise thread invariance could hide a wrong split that is wrong alike everywhere; pin one case to SPEC.md.
    tokens, attn, metric = randn(4, 300, 48), attention(4, 4, 300, 300), randn(4, 300, 16, seed=1)
    with num_threads(3):
        out, index, sizes, slot = ops.prune(tokens, attn, keep=75, metric=metric, protect=1)
    ref_out, ref_index, ref_sizes, ref_slot = reference.prune(tokens, attn, keep=75, metric=metric, protect=1)
    assert torch.equal(index, ref_index) and torch.equal(slot, ref_slot)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sizes, ref_sizes)


def test_autograd_through_threads():
    tokens = randn(4, 300, 48).requires_grad_()
    with num_threads(3):
        out, *_ = ops.prune(tokens, attention(4, 2, 300, 300), keep=75)
        out.sum().backward()
    with num_threads(1):
        tokens_1 = tokens.detach().clone().requires_grad_()
        ops.prune(tokens_1, attention(4, 2, 300, 300), keep=75)[0].sum().backward()
    assert torch.equal(tokens.grad, tokens_1.grad)
