"""The CUDA kernels' own source (csrc/cuda/*_kernel.cuh), executed on the CPU by cuda_sim.h, against the CPU ops.

Each launcher of harness.cpp replays its .cu twin with the plan functions of the kernel headers, so these tests
drive the real launch policy (grid, block, shared memory, workspaces, branch) with real device limits, and force
the branches the shapes would not pick. Run by `make test-kernels`; what this proves and what only a GPU can is in
docs/CUDA.md ("Executing the kernels on the CPU").
"""

import math
import re
from pathlib import Path

import pytest
import torch

import evoprune_ext  # noqa: F401  (registers torch.ops.evoprune)
from evoprune_ext import testing

import sim

ops = torch.ops.evoprune
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
H200_OPTIN_SHARED = 232_448  # cudaDevAttrMaxSharedMemoryPerBlockOptin
H200_SMS = 132
SMALL_OPTIN_SHARED = 1_024  # red/owner of more than 57 tokens (float32) go to the global workspace
BUDGET = 256 << 20  # select.cu's kSimilarityBudgetBytes
KERNELS = Path(__file__).resolve().parents[2] / "csrc" / "cuda"


@pytest.fixture(scope="module")
def kernels():
    return sim.load()


@pytest.fixture(autouse=True)
def clean_settings(kernels):
    """Natural thread order and no fault unless a test asks; every test must end without a failed device assert."""
    kernels.configure(0, "", 0, "", 0, 0)
    yield
    counters = kernels.counters()
    assert counters[6] == 0, kernels.first_assert()


def make_metric(kind, B, N, Dm, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        m = torch.randn(B, N, Dm, generator=g)
    elif kind == "strided":
        m = torch.randn(B, 2 * N, Dm + 3, generator=g)[:, ::2, 1 : Dm + 1]
    elif kind == "duplicate":  # ties everywhere: pairs of equal tokens
        m = torch.randn(B, (N + 1) // 2, Dm, generator=g).repeat_interleave(2, dim=1)[:, :N]
    elif kind == "zero":
        m = torch.zeros(B, N, Dm)
    elif kind == "rank1":
        m = torch.randn(B, N, 1, generator=g) * torch.randn(B, 1, Dm, generator=g)
    else:
        raise ValueError(kind)
    return m.to(dtype)


def make_importance(kind, B, N, seed):
    g = torch.Generator().manual_seed(seed + 1)
    imp = torch.rand(B, N, generator=g)
    if kind == "none":
        return None
    if kind == "nonfinite":
        imp[:, ::3] = math.nan
        imp[:, 1::5] = math.inf
        imp[:, 2::7] = -math.inf
    return imp


def run_select(kernels, metric, importance, *, keep, alpha, protect, matrix, optin=H200_OPTIN_SHARED, budget=BUDGET):
    index, slot, plan = kernels.select(metric, importance, keep, alpha, protect, matrix, False, optin, budget)
    return index, slot, dict(zip(["matrix", "shared_state", "group", "dynamic_shared", "unit_blocks"], plan))


def assert_selection_matches_cpu(metric, importance, index, slot, *, keep, alpha, protect):
    cpu_index, cpu_slot = ops.select(metric, importance, keep=keep, alpha=alpha, protect=protect)
    if torch.equal(index, cpu_index) and torch.equal(slot, cpu_slot):
        return
    # SPEC.md section 5: only where two candidates tie to the float32 rounding of the computation; a tighter
    # tolerance than the checker's default, so that a real difference (a wrong pick or owner) fails.
    testing.check_selection(metric, importance, index, slot, keep=keep, alpha=alpha, protect=protect, atol=1e-6)


# (B, N, Dm, keep, protect): N = 1, N not a multiple of 32, keep = protect, keep = N, Dm = 0, 1, odd and > 128,
# more tokens than the greedy block's 512 threads (several rank-scan chunks).
SHAPES = [
    (1, 1, 3, 1, 0),
    (1, 1, 3, 1, 1),
    (2, 5, 0, 3, 1),
    (3, 33, 1, 10, 2),
    (2, 45, 7, 3, 3),
    (2, 70, 5, 70, 0),
    (1, 40, 129, 20, 1),
    (2, 97, 16, 30, 1),
    (1, 600, 8, 40, 2),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("matrix", [0, 1], ids=["dots", "matrix"])
@pytest.mark.parametrize("optin", [H200_OPTIN_SHARED, SMALL_OPTIN_SHARED], ids=["shared", "global"])
def test_select_every_branch_matches_cpu(kernels, dtype, shape, matrix, optin):
    B, N, Dm, keep, protect = shape
    metric = make_metric("random", B, N, Dm, dtype, seed=N)
    importance = make_importance("rand", B, N, seed=N)
    index, slot, plan = run_select(kernels, metric, importance, keep=keep, alpha=0.2, protect=protect, matrix=matrix,
                                   optin=optin)
    acc_bytes = 8 if dtype == torch.float64 else 4
    assert plan["matrix"] == matrix
    # greedy_select's static shared memory: the argmax's 17 (score, index) pairs and the scan's 16 ints.
    assert plan["shared_state"] == (N * (acc_bytes + 4) <= optin - (17 * 16 + 16 * 4))
    assert_selection_matches_cpu(metric, importance, index, slot, keep=keep, alpha=0.2, protect=protect)


@pytest.mark.parametrize("kind", ["strided", "duplicate", "zero", "rank1"])
@pytest.mark.parametrize("imp", ["none", "nonfinite", "rand"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("matrix", [0, 1], ids=["dots", "matrix"])
@pytest.mark.parametrize("alpha", [0.0, 0.2, 1.0])
def test_select_awkward_values_match_cpu(kernels, kind, imp, dtype, matrix, alpha):
    B, N, Dm, keep, protect = 2, 50, 6, 12, 1
    metric = make_metric(kind, B, N, Dm, dtype, seed=3)
    importance = make_importance(imp, B, N, seed=3)
    index, slot, _ = run_select(kernels, metric, importance, keep=keep, alpha=alpha, protect=protect, matrix=matrix)
    assert_selection_matches_cpu(metric, importance, index, slot, keep=keep, alpha=alpha, protect=protect)
    if kind == "rank1":  # SPEC.md section 3 step 4: every similarity is finite, so nothing is dropped
        assert (slot >= 0).all()


@pytest.mark.parametrize("case", range(60))
def test_select_random_configurations_match_cpu(kernels, case):
    # Shapes, values, branch, state memory and thread order drawn at random (reproducibly, per case): the corners
    # the lists above do not name. N * picks stays under 20,000 so that the dot-product branch stays cheap.
    g = torch.Generator().manual_seed(1000 + case)

    def draw(n):
        return int(torch.randint(n, (1,), generator=g))

    B, N, Dm = 1 + draw(4), 1 + draw(700), draw(40)
    protect = draw(min(N, 3) + 1)
    keep = protect + draw(min(N - protect, max(1, 20_000 // N)) + 1)
    dtype = DTYPES[draw(4)]
    kind = ["random", "strided", "duplicate", "zero", "rank1"][draw(5)]
    imp = ["none", "nonfinite", "rand"][draw(3)]
    alpha = [0.0, 0.1, 0.5, 1.0][draw(4)]
    matrix, optin = draw(2), [H200_OPTIN_SHARED, SMALL_OPTIN_SHARED][draw(2)]
    kernels.configure([0, 1, 77 + case][draw(3)], "", 0, "", 0, 0)
    metric = make_metric(kind, B, N, Dm, dtype, seed=case)
    importance = make_importance(imp, B, N, seed=case)
    index, slot, _ = run_select(kernels, metric, importance, keep=keep, alpha=alpha, protect=protect, matrix=matrix,
                                optin=optin)
    assert_selection_matches_cpu(metric, importance, index, slot, keep=keep, alpha=alpha, protect=protect)


def test_nan_metric_tokens_are_dropped_as_on_cpu(kernels):
    metric = make_metric("random", 1, 40, 4, torch.float32, seed=5)
    metric[0, 7] = math.nan
    metric[0, 20, 1] = math.inf
    for matrix in (0, 1):
        index, slot, _ = run_select(kernels, metric, None, keep=6, alpha=0.0, protect=0, matrix=matrix)
        assert_selection_matches_cpu(metric, None, index, slot, keep=6, alpha=0.0, protect=0)


@pytest.mark.parametrize("order", [1, 12345], ids=["reversed", "shuffled"])
@pytest.mark.parametrize("matrix", [0, 1], ids=["dots", "matrix"])
def test_select_in_any_thread_order(kernels, order, matrix):
    kernels.configure(order, "", 0, "", 0, 0)
    metric = make_metric("random", 2, 600, 8, torch.float32, seed=order)
    importance = make_importance("rand", 2, 600, seed=order)
    index, slot, _ = run_select(kernels, metric, importance, keep=25, alpha=0.2, protect=1, matrix=matrix,
                                optin=SMALL_OPTIN_SHARED)
    assert_selection_matches_cpu(metric, importance, index, slot, keep=25, alpha=0.2, protect=1)


def test_select_several_similarity_groups(kernels):
    B, N = 5, 40
    metric = make_metric("random", B, N, 9, torch.float32, seed=8)
    importance = make_importance("rand", B, N, seed=8)
    # A budget of two matrices: groups of 2, 2 and 1 samples, as select.cu would at N = 8192 with 512 MiB.
    index, slot, plan = run_select(kernels, metric, importance, keep=20, alpha=0.2, protect=0, matrix=-1,
                                   budget=2 * N * N * 4)
    assert plan["matrix"] == 1 and plan["group"] == 2
    assert_selection_matches_cpu(metric, importance, index, slot, keep=20, alpha=0.2, protect=0)


def test_select_large_n_in_shared_and_global_memory(kernels):
    # N = 19,200 (a 160x120 video frame): red/owner (8 B per token) fit the H200's opt-in shared memory;
    # the policy picks dot products for so few picks, and 38 chunks of the rank scan.
    metric = make_metric("random", 1, 19_200, 4, torch.float32, seed=9)
    for optin, shared in ((H200_OPTIN_SHARED, 1), (SMALL_OPTIN_SHARED, 0)):
        index, slot, plan = run_select(kernels, metric, None, keep=3, alpha=0.0, protect=1, matrix=-1, optin=optin)
        assert plan["matrix"] == 0 and plan["shared_state"] == shared
        assert_selection_matches_cpu(metric, None, index, slot, keep=3, alpha=0.0, protect=1)


@pytest.mark.parametrize(
    "n,dtype,matrix,shared,group",
    [
        (2_048, torch.float32, 1, 1, 16),  # many picks of few tokens: the GEMM, 16 matrices per launch
        (4_096, torch.float64, 1, 1, 2),
        (8_192, torch.float32, 1, 1, 1),  # one 256 MiB matrix per launch
        (16_384, torch.float32, 0, 1, 0),  # the N x N matrix alone exceeds the budget: dot products
        (19_200, torch.float64, 0, 1, 0),  # 230,400 B of red/owner: still in shared memory on an H200
        (28_800, torch.float32, 0, 1, 0),
        (28_800, torch.float64, 0, 0, 0),  # 345,600 B: the global workspace
    ],
)
def test_select_policy_with_h200_limits(kernels, n, dtype, matrix, shared, group):
    # B = 0: the plan of a 4-sample call on an H200 without running it (keep = N/4).
    batch_plan = run_select(kernels, torch.empty(0, n, 4, dtype=dtype), None, keep=n // 4, alpha=0.2, protect=0,
                            matrix=-1)[2]
    assert (batch_plan["matrix"], batch_plan["shared_state"]) == (matrix, shared)
    if matrix:
        assert batch_plan["group"] == group
    # TF32 allowed process-wide: never the GEMM.
    tf32 = kernels.select(torch.empty(0, n, 4, dtype=dtype), None, n // 4, 0.2, 0, -1, True, H200_OPTIN_SHARED,
                          BUDGET)[2]
    assert tf32[0] == 0


# ---------------------------------------------------------------------------- merge and gather


MERGE_SHAPES = [(1, 1, 3, 1), (2, 9, 0, 4), (2, 33, 1, 7), (3, 40, 130, 40), (2, 50, 129, 5)]  # (B, N, D, keep)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", MERGE_SHAPES, ids=str)
@pytest.mark.parametrize("sizes", [False, True])
@pytest.mark.parametrize("strided", [False, True])
def test_merge_and_gather_are_bit_exact(kernels, dtype, shape, sizes, strided):
    B, N, D, keep = shape
    g = torch.Generator().manual_seed(N + D)
    tokens = torch.randn(B, N, 2 * D, generator=g).to(dtype)
    tokens = tokens[..., ::2] if strided else tokens[..., :D]
    s = torch.rand(B, N, generator=g) * 3 + 0.5 if sizes else None
    if sizes:
        s[:, -1] = 0.0  # a zero size: its group's weighted mean must not change
    index, slot = ops.select(torch.randn(B, N, 5, generator=g), None, keep=keep, alpha=0.0, protect=min(1, keep))
    out, sizes_out = kernels.merge(tokens, s, index, slot, True)
    expected_out, expected_sizes = ops.merge(tokens, index, slot, s)
    assert torch.equal(out, expected_out) and torch.equal(sizes_out, expected_sizes)
    out, sizes_out = kernels.merge(tokens, s, index, slot, False)  # prune's merge=False: gather at index
    assert torch.equal(out, tokens.gather(1, index[..., None].expand(B, keep, D)))
    assert torch.equal(sizes_out, torch.ones(B, keep) if s is None else s.gather(1, index))


def test_merge_counts_device_asserts_on_bad_values(kernels):
    tokens = torch.randn(1, 6, 4)
    index = torch.tensor([[0, 3]])
    slot = torch.tensor([[0, 0, 1, 1, 5, -1]])  # 5 is outside [-1, K)
    kernels.merge(tokens, None, index, slot, True)  # every thread of the block checks, and keeps going
    assert kernels.counters()[6] == 128 and "slot must be in [-1, K)" in kernels.first_assert()
    kernels.configure(0, "", 0, "", 0, 0)
    kernels.merge(tokens, torch.tensor([[1.0, 1, -2, 1, 1, math.nan]]), index, torch.tensor([[0, 0, 1, 1, 1, -1]]),
                  True)
    assert kernels.counters()[6] == 2 and "sizes must be finite and >= 0" in kernels.first_assert()  # -2 and NaN
    kernels.configure(0, "", 0, "", 0, 0)


# ---------------------------------------------------------------------------- importance


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 5, 33), (1, 2, 70, 40), (3, 4, 1, 100)], ids=str)
@pytest.mark.parametrize("sms", [1, H200_SMS])
@pytest.mark.parametrize("strided", [False, True])
def test_importance_matches_cpu(kernels, dtype, shape, sms, strided):
    B, H, Q, N = shape
    g = torch.Generator().manual_seed(N)
    attn = torch.rand(B, H, Q, N, generator=g).softmax(-1).to(dtype)
    if strided:
        attn = attn.transpose(-1, -2).contiguous().transpose(-1, -2)
    imp, plan = kernels.importance(attn, sms)
    rows = H * Q
    assert 1 <= plan[0] <= max(1, (rows + 7) // 8) and plan[0] * plan[1] >= rows
    torch.testing.assert_close(imp, ops.importance(attn), rtol=1e-5, atol=1e-5)


def test_importance_splits_rows_on_a_large_gpu_and_keeps_nonfinite_values(kernels):
    attn = torch.rand(1, 16, 64, 40, generator=torch.Generator().manual_seed(2)).softmax(-1)
    attn[0, 3, 5, 7] = math.nan
    attn[0, 0, 0, 9] = math.inf
    imp, plan = kernels.importance(attn, H200_SMS)
    assert plan[0] > 1  # several row ranges, added by the second kernel
    torch.testing.assert_close(imp, ops.importance(attn), rtol=1e-5, atol=1e-5, equal_nan=True)
    assert imp[0, 7].isnan() and imp[0, 9] == math.inf


# ---------------------------------------------------------------------------- prune: importance + select + merge


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("merge", [True, False])
def test_prune_pieces_match_cpu_prune(kernels, dtype, merge):
    B, N, D, H, keep, protect = 2, 77, 12, 3, 20, 1
    g = torch.Generator().manual_seed(4)
    tokens = torch.randn(B, N, D, generator=g).to(dtype)
    attn = torch.rand(B, H, N, N, generator=g).softmax(-1).to(dtype)
    sizes = torch.rand(B, N, generator=g) + 0.5
    imp, _ = kernels.importance(attn, H200_SMS)  # prune.cu: importance, then the greedy, then merge or gather
    index, slot, _ = run_select(kernels, tokens, imp.to(torch.float64 if dtype == torch.float64 else torch.float32),
                                keep=keep, alpha=0.2, protect=protect, matrix=-1)
    out, sizes_out = kernels.merge(tokens, sizes, index, slot, merge)
    expected = ops.prune(tokens, attn, keep=keep, sizes=sizes, alpha=0.2, protect=protect, merge=merge)
    assert torch.equal(index, expected[1]) and torch.equal(slot, expected[3])
    assert torch.equal(out, expected[0]) and torch.equal(sizes_out, expected[2])


# ---------------------------------------------------------------------------- the harness catches broken kernels


def site(header, after):
    """The line number in csrc/cuda/<header> of the first barrier or shuffle at or after the line matching `after`."""
    lines = (KERNELS / header).read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if re.search(after, line))
    return next(i for i in range(start, len(lines)) if re.search(r"__syncthreads\(\)|__shfl_\w+_sync\(", lines[i])) + 1


FAULTS = {
    # the block argmax's first barrier: warp 0 reads the other warps' candidates before they are written
    "argmax barrier": ("barrier", "select_kernel.cuh", r"storage\.warps\[warp\] = c;", 0),
    # the rank scan's barrier: warps read the other warps' totals before they are written
    "scan barrier": ("barrier", "select_kernel.cuh", r"warp_totals\[warp\] = inclusive;", 0),
    # warp 3's butterfly in warp_sum returns its own partial sums: its tokens' dot products lose 31 lanes
    "warp_sum shuffle of warp 3": ("shuffle", "select_kernel.cuh", r"T warp_sum\(T value\)", 3),
    # warp 0's argmax over the warps' candidates compares nothing: the block's best is warp 0's
    "argmax shuffle of warp 0": ("shuffle", "select_kernel.cuh", r"Candidate<acc_t> warp_best\(", 0),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_broken_kernel_fails_the_comparison(kernels, fault):
    kind, header, after, warp = FAULTS[fault]
    line = site(header, after)
    metric = make_metric("random", 2, 600, 8, torch.float32, seed=11)
    importance = make_importance("rand", 2, 600, seed=11)
    args = dict(keep=40, alpha=0.2, protect=1)
    index, slot, _ = run_select(kernels, metric, importance, matrix=0, **args)
    assert_selection_matches_cpu(metric, importance, index, slot, **args)  # the intact kernel passes

    if kind == "barrier":
        kernels.configure(0, header, line, "", 0, 0)
    else:
        kernels.configure(0, "", 0, header, line, warp)
    # Caught either by the comparison or, when the broken kernel writes out of bounds, by the harness's red zones.
    with pytest.raises((AssertionError, RuntimeError), match="batch|outside"):
        index, slot, _ = run_select(kernels, metric, importance, matrix=0, **args)
        assert_selection_matches_cpu(metric, importance, index, slot, **args)
    assert kernels.counters()[3 if kind == "barrier" else 5] > 0  # the fault was injected


def test_a_missing_barrier_in_importance_fails_the_comparison(kernels):
    attn = torch.rand(2, 4, 30, 50, generator=torch.Generator().manual_seed(3)).softmax(-1)
    kernels.configure(0, "importance_kernel.cuh", site("importance_kernel.cuh", r"sums\[threadIdx\.y\]"), "", 0, 0)
    imp, _ = kernels.importance(attn, 1)
    assert kernels.counters()[3] > 0
    assert not torch.allclose(imp, ops.importance(attn), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- the simulator's rules


def test_a_barrier_does_not_wait_for_warps_that_returned(kernels):
    out = kernels.probe("barrier_after_early_return")
    assert out == [2] * 32 + [-1] * 32 + [2] * 32  # warps 0 and 2 counted themselves; warp 1 left


@pytest.mark.parametrize(
    "name,message",
    [("divergent_shuffles", "lanes of one warp meet in different shuffles"),
     ("shuffle_after_early_return", "shuffle names lane 0, which has returned")],
)
def test_undefined_warp_behaviour_fails_the_launch(kernels, name, message):
    with pytest.raises(RuntimeError, match=message):
        kernels.probe(name)
    assert kernels.probe("barrier_after_early_return")[0] == 2  # the next launch starts clean
