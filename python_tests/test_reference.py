"""The reference and the checker on their own, without any kernel: hand-worked cases, the two limits of alpha
against naive loops, edge cases of SPEC.md and random small inputs."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from evoprune_ext import reference, testing
from evoprune_ext.defaults import DEFAULT_ALPHA

FLOAT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def batch(rows, dtype=torch.float32):
    """One-sample batch from a nested list."""
    return torch.tensor([rows], dtype=dtype)


# Five 2-D metric vectors: 0 and 3 are opposite, 2 is orthogonal to both, 1 and 4 lean towards 0.
FAN = batch([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0], [0.6, -0.8]])

# Four 2-D metric vectors with importances that are exact in binary, so every score below is exact.
PAIR_METRIC = batch([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
PAIR_IMPORTANCE = batch([0.5, 0.5, 0.375, 0.125])
PAIR_TOKENS = batch([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]])
PAIR_SIZES = batch([1.0, 3.0, 2.0, 2.0])


# ---------------------------------------------------------------------------------------------------------
# Importance


def test_importance_is_mean_over_heads_and_rows():
    attn = torch.tensor([[[[0.5, 0.5, 0.0], [0.0, 1.0, 0.0]], [[0.25, 0.25, 0.5], [1.0, 0.0, 0.0]]]])  # [1,2,2,3]
    imp = reference.importance(attn)
    assert imp.dtype == torch.float32
    torch.testing.assert_close(imp, batch([1.75 / 4, 1.75 / 4, 0.5 / 4]))
    assert reference.importance(attn.double()).dtype == torch.float32


def test_importance_from_qk_equals_importance_of_softmax():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 5, 4, generator=gen)
    k = torch.randn(2, 3, 7, 4, generator=gen)
    expected = reference.importance((0.5 * q @ k.transpose(-1, -2)).softmax(-1))
    torch.testing.assert_close(reference.importance_from_qk(q, k, 0.5), expected)
    # A zero query attends uniformly: every key gets 1/N.
    uniform = reference.importance_from_qk(torch.zeros(1, 2, 1, 4), k[:1, :2], 1.0)
    torch.testing.assert_close(uniform, torch.full((1, 7), 1 / 7))


# ---------------------------------------------------------------------------------------------------------
# Hand-worked selections


def test_fan_alpha_zero_keep_two():
    # alpha = 0: every score is 1 at first, so the first pick is token 0. Its similarities are
    # [1, .8, 0, -1, .6]; token 3 is owned by token 0 at red = -1, so it scores highest next.
    # Token 2 is orthogonal to both picks: equal similarity keeps its first owner, token 0.
    out, index, sizes, slot = reference.prune(FAN, None, keep=2, alpha=0.0)
    assert index.tolist() == [[0, 3]]
    assert slot.tolist() == [[0, 0, 0, 1, 0]]
    torch.testing.assert_close(out, batch([[(1 + 0.8 + 0 + 0.6) / 4, (0 + 0.6 + 1 - 0.8) / 4], [-1.0, 0.0]]))
    assert torch.equal(out[0, 1], FAN[0, 3])  # received nothing: exact copy
    assert sizes.tolist() == [[4.0, 1.0]]
    testing.check_selection(FAN, None, index, slot, keep=2, alpha=0.0, protect=0)


def test_fan_alpha_zero_keep_one_merges_the_opposite_token():
    # Token 3's similarity to the only pick is exactly -1: a number, so the pick owns it (SPEC.md section 3, step 4).
    out, index, sizes, slot = reference.prune(FAN, None, keep=1, alpha=0.0)
    assert index.tolist() == [[0]]
    assert slot.tolist() == [[0, 0, 0, 0, 0]]
    torch.testing.assert_close(out, batch([[0.28, 0.16]]))
    assert sizes.tolist() == [[5.0]]
    testing.check_selection(FAN, None, index, slot, keep=1, alpha=0.0, protect=0)
    with pytest.raises(AssertionError, match="dropped token 3 has slot -1"):
        testing.check_selection(FAN, None, index, torch.tensor([[0, 0, 0, -1, 0]]), keep=1, alpha=0.0, protect=0)


def test_pair_alpha_half_with_sizes():
    # ti = [1, 1, .75, .25]. Step 1: scores .5 ti + .5 = [1, 1, .875, .625] -> token 0 (tie, lowest index).
    # red = [1, 1, 0, -1]. Step 2: token 1: .5 + 0, token 2: .375 + .25, token 3: .125 + .5 -> 2 and 3 tie at
    # .625 -> token 2. Token 3 (similarity 0 > -1 to token 2) is merged into 2, token 1 into 0.
    out, index, sizes, slot = reference.prune(
        PAIR_TOKENS, PAIR_IMPORTANCE, keep=2, metric=PAIR_METRIC, sizes=PAIR_SIZES, alpha=0.5
    )
    assert index.tolist() == [[0, 2]]
    assert slot.tolist() == [[0, 0, 1, 1]]
    # (1 * [1,2] + 3 * [3,4]) / 4 and (2 * [5,6] + 2 * [7,8]) / 4: merged from the tokens, not the metric.
    assert out.tolist() == [[[2.5, 3.5], [6.0, 7.0]]]
    assert sizes.tolist() == [[4.0, 4.0]]
    testing.check_selection(PAIR_METRIC, PAIR_IMPORTANCE, index, slot, keep=2, alpha=0.5, protect=0)


def test_protected_token_is_kept_and_never_merged_into():
    # Token 0 is protected; token 1 duplicates it but must pick another owner (or none).
    index, slot = reference.select(PAIR_METRIC, PAIR_IMPORTANCE, keep=2, alpha=0.5, protect=1)
    # Candidates 1..3, ti = [1, .75, .25] (token 0 is not a candidate): token 1 scores highest.
    assert index.tolist() == [[0, 1]]
    # Token 2 (similarity 0) and token 3 (similarity -1: still a number) go to token 1, the only pick.
    assert slot.tolist() == [[0, 1, 1, 1]]
    testing.check_selection(PAIR_METRIC, PAIR_IMPORTANCE, index, slot, keep=2, alpha=0.5, protect=1)


def test_attention_and_reduced_importance_give_the_same_selection():
    attn = PAIR_IMPORTANCE[:, None, None, :]  # [B,H=1,Q=1,N]
    from_attn = reference.prune(PAIR_TOKENS, attn, keep=2, metric=PAIR_METRIC, alpha=0.5)
    from_imp = reference.prune(PAIR_TOKENS, PAIR_IMPORTANCE, keep=2, metric=PAIR_METRIC, alpha=0.5)
    for a, b in zip(from_attn, from_imp):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------------
# The two limits of alpha against naive loops


def top_k(importance, keep, protect):
    """alpha = 1: the K' most important candidates, lowest index first on ties."""
    order = sorted(range(protect, len(importance)), key=lambda j: (-importance[j], j))
    return list(range(protect)) + sorted(order[: keep - protect])


def farthest_point(metric, keep, protect):
    """alpha = 0: repeatedly take the candidate whose closest chosen token is farthest (cosine distance),
    lowest index on ties."""
    unit = []
    for row in metric:
        norm = max(math.sqrt(sum(v * v for v in row)), 1e-6)
        unit.append([v / norm for v in row])
    chosen = []
    for _ in range(keep - protect):
        best, best_distance = None, -math.inf
        for j in range(protect, len(metric)):
            if j in chosen:
                continue
            closest = max([-1.0] + [sum(a * b for a, b in zip(unit[j], unit[s])) for s in chosen])
            if (1 - closest) / 2 > best_distance:
                best, best_distance = j, (1 - closest) / 2
        chosen.append(best)
    return list(range(protect)) + sorted(chosen)


@pytest.mark.parametrize("seed", range(5))
def test_alpha_one_is_top_k_by_importance(seed):
    gen = torch.Generator().manual_seed(seed)
    B, N, protect, keep = 3, 12, seed % 3, 7
    metric = torch.randn(B, N, 4, generator=gen)
    imp = torch.randint(1, 6, (B, N), generator=gen).float()  # few values: many ties
    index, slot = reference.select(metric, imp, keep=keep, alpha=1.0, protect=protect)
    assert index.tolist() == [top_k(imp[b].tolist(), keep, protect) for b in range(B)]
    testing.check_selection(metric, imp, index, slot, keep=keep, alpha=1.0, protect=protect)


def test_alpha_one_ignores_non_positive_and_non_finite_importance():
    metric = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(0))
    # Largest finite importance is not positive: ti = 0 everywhere, so the first candidates win the ties.
    index, _ = reference.select(metric, torch.tensor([[0.0, -1.0, 0.0, -2.0, 0.0]] * 2), keep=3, alpha=1.0, protect=1)
    assert index.tolist() == [[0, 1, 2]] * 2
    # NaN and inf are never preferred, not even inf; the maximum is taken over finite values (2 here).
    imp = torch.tensor([[math.nan, math.inf, 1.0, -math.inf, 2.0], [5.0, math.nan, 0.5, math.nan, math.nan]])
    index, slot = reference.select(metric, imp, keep=3, alpha=1.0, protect=1)
    assert index.tolist() == [[0, 2, 4], [0, 1, 2]]  # second row: 2 first, then all -inf -> smallest index 1
    testing.check_selection(metric, imp, index, slot, keep=3, alpha=1.0, protect=1)


@pytest.mark.parametrize("seed", range(5))
def test_alpha_zero_is_farthest_point(seed):
    gen = torch.Generator().manual_seed(seed)
    B, N, protect, keep = 3, 16, seed % 2, 9
    metric = torch.randn(B, N, 5, generator=gen, dtype=torch.float64)
    index, slot = reference.select(metric, torch.rand(B, N, generator=gen), keep=keep, alpha=0.0, protect=protect)
    assert index.tolist() == [farthest_point(metric[b].tolist(), keep, protect) for b in range(B)]
    testing.check_selection(metric, None, index, slot, keep=keep, alpha=0.0, protect=protect)


# ---------------------------------------------------------------------------------------------------------
# Edge cases of SPEC 4 and 5


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_keep_all_is_identity(dtype):
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randn(2, 6, 3, generator=gen).to(dtype)
    sizes = torch.rand(2, 6, generator=gen) + 0.5
    out, index, sizes_out, slot = reference.prune(tokens, None, keep=6, sizes=sizes, protect=2)
    assert torch.equal(out, tokens)
    assert torch.equal(index, torch.arange(6).expand(2, 6))
    assert torch.equal(slot, torch.arange(6).expand(2, 6))
    assert torch.equal(sizes_out, sizes)


def test_keep_protect_drops_everything_else():
    tokens = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(2))
    out, index, sizes, slot = reference.prune(tokens, None, keep=2, protect=2)
    assert index.tolist() == [[0, 1]] * 2
    assert slot.tolist() == [[0, 1, -1, -1, -1]] * 2
    assert torch.equal(out, tokens[:, :2])
    assert sizes.tolist() == [[1.0, 1.0]] * 2
    index, slot = reference.select(tokens, None, keep=0, protect=0)
    assert index.shape == (2, 0) and slot.tolist() == [[-1] * 5] * 2


def test_merge_false_gathers():
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randn(2, 8, 4, generator=gen)
    sizes = torch.rand(2, 8, generator=gen, dtype=torch.float64) + 1
    merged, index, _, slot = reference.prune(tokens, None, keep=4, sizes=sizes, protect=1)
    out, index2, sizes_out, slot2 = reference.prune(tokens, None, keep=4, sizes=sizes, protect=1, merge=False)
    assert torch.equal(index, index2) and torch.equal(slot, slot2)
    assert torch.equal(out, torch.stack([tokens[b, index[b]] for b in range(2)]))
    assert sizes_out.dtype == torch.float32
    assert torch.equal(sizes_out, torch.stack([sizes[b, index[b]] for b in range(2)]).float())
    assert not torch.equal(merged, out)


def test_zero_sizes_copy_the_kept_token():
    tokens = batch([[1.0, 1.0], [3.0, 3.0], [5.0, 5.0]])
    index, slot = torch.tensor([[0, 2]]), torch.tensor([[0, 0, 1]])
    out, sizes = reference.merge(tokens, index, slot, batch([0.0, 0.0, 2.0]))
    assert out.tolist() == [[[1.0, 1.0], [5.0, 5.0]]]
    assert sizes.tolist() == [[0.0, 2.0]]
    out, sizes = reference.merge(tokens, index, slot, batch([0.0, 1.0, 2.0]))  # the kept token weighs nothing
    assert out.tolist() == [[[3.0, 3.0], [5.0, 5.0]]]


def test_merge_is_differentiable_and_leaves_inputs_alone():
    tokens = torch.randn(1, 4, 2, generator=torch.Generator().manual_seed(4), requires_grad=True)
    sizes = batch([0.0, 0.0, 1.0, 3.0])
    before = tokens.detach().clone(), sizes.clone()
    out, _ = reference.merge(tokens, torch.tensor([[0, 2]]), torch.tensor([[0, 0, 1, 1]]), sizes)
    out.sum().backward()
    # Position 0 is a copy of token 0 (its sizes sum to 0); position 1 averages tokens 2 and 3 with weights 1/4, 3/4.
    assert tokens.grad.tolist() == [[[1.0, 1.0], [0.0, 0.0], [0.25, 0.25], [0.75, 0.75]]]
    assert torch.equal(tokens.detach(), before[0]) and torch.equal(sizes, before[1])


@pytest.mark.parametrize(
    "fill", ["nan", "inf", "zero", "equal", "mixed"], ids=lambda f: f"metric_{f}"
)
@pytest.mark.parametrize("imp_fill", ["none", "nan", "inf", "equal"])
def test_degenerate_values_give_a_valid_selection(fill, imp_fill):
    B, N, protect, keep = 2, 7, 1, 4
    metric = torch.randn(B, N, 3, generator=torch.Generator().manual_seed(5))
    if fill == "nan":
        metric[:] = math.nan
    elif fill == "inf":
        metric[:] = math.inf
    elif fill == "zero":
        metric[:] = 0.0
    elif fill == "equal":
        metric[:] = 1.5
    else:
        metric[:, 1] = math.nan
        metric[:, 3] = -math.inf
        metric[:, 4] = 0.0
    imp = {
        "none": None,
        "nan": torch.full((B, N), math.nan),
        "inf": torch.tensor([[math.inf, -math.inf, 1.0, math.inf, 0.0, 2.0, math.nan]] * B),
        "equal": torch.ones(B, N),
    }[imp_fill]
    for alpha in (0.0, 0.1, 1.0):
        out, index, sizes, slot = reference.prune(metric, imp, keep=keep, alpha=alpha, protect=protect)
        testing.check_selection(metric, imp, index, slot, keep=keep, alpha=alpha, protect=protect)
        assert out.shape == (B, keep, 3) and sizes.shape == (B, keep)


def test_empty_batch_and_single_token():
    index, slot = reference.select(torch.zeros(0, 5, 3), None, keep=2)
    assert index.shape == (0, 2) and slot.shape == (0, 5)
    out, index, sizes, slot = reference.prune(torch.ones(2, 1, 3), None, keep=1)
    assert index.tolist() == [[0]] * 2 and slot.tolist() == [[0]] * 2 and torch.equal(out, torch.ones(2, 1, 3))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_dtypes(dtype):
    gen = torch.Generator().manual_seed(6)
    tokens = torch.randn(3, 10, 8, generator=gen).to(dtype)
    attn = torch.rand(3, 2, 10, 10, generator=gen).softmax(-1).to(dtype)
    sizes = torch.rand(3, 10, generator=gen) + 1
    out, index, sizes_out, slot = reference.prune(tokens, attn, keep=5, sizes=sizes, protect=1)
    assert out.dtype == dtype and sizes_out.dtype == torch.float32
    assert index.dtype == torch.long and slot.dtype == torch.long
    testing.check_selection(tokens, attn, index, slot, keep=5, alpha=DEFAULT_ALPHA, protect=1)
    testing.check_merge(tokens, index, slot, sizes, out, sizes_out, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------
# Argument checks


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(keep=6), "keep"),
        (dict(keep=1, protect=2), "keep"),
        (dict(keep=3, protect=6), "protect"),
        (dict(keep=3, alpha=math.nan), "alpha"),
        (dict(keep=3, alpha=-0.1), "alpha"),
        (dict(keep=3, alpha=1.5), "alpha"),
    ],
)
def test_select_rejects_bad_counts(kwargs, name):
    with pytest.raises(ValueError, match=name):
        reference.select(torch.randn(1, 5, 2), None, **kwargs)


@pytest.mark.parametrize(
    "index, slot, name",
    [
        ([[0, 5]], [[0, 0, 1, 1, 1]], "index"),
        ([[0, 2]], [[0, 0, 1, 2, 1]], "slot"),
        ([[0, 2]], [[0, 0, -2, 1, 1]], "slot"),
        ([[0, 2]], [[0, 1, 0, 1, 1]], "slot"),  # slot[index[1]] != 1
    ],
)
def test_merge_rejects_inconsistent_index_and_slot(index, slot, name):
    with pytest.raises(ValueError, match=name):
        reference.merge(torch.randn(1, 5, 2), torch.tensor(index), torch.tensor(slot))


# ---------------------------------------------------------------------------------------------------------
# The checker rejects what is wrong


def test_checker_rejects_a_kept_token_swapped_for_a_dropped_one():
    # The hand-worked pair case keeps [0, 2]; keeping 1 instead loses by 0.125 at step 2.
    with pytest.raises(AssertionError, match=r"batch 0, step 1 .* best candidate 2 .* closest kept token 1"):
        testing.check_selection(
            PAIR_METRIC, PAIR_IMPORTANCE, torch.tensor([[0, 1]]), torch.tensor([[0, 1, 1, 1]]),
            keep=2, alpha=0.5, protect=0,
        )


def test_checker_rejects_wrong_owners():
    index = torch.tensor([[0, 3]])
    # Token 1 (similarity .8 to token 0, -.8 to token 3) merged into token 3.
    with pytest.raises(AssertionError, match="dropped token 1 is merged into token 3"):
        testing.check_selection(FAN, None, index, torch.tensor([[0, 1, 0, 1, 0]]), keep=2, alpha=0.0, protect=0)
    # Token 4 dropped without owner although its similarity to token 0 is .6.
    with pytest.raises(AssertionError, match="dropped token 4 has slot -1"):
        testing.check_selection(FAN, None, index, torch.tensor([[0, 0, 0, 1, -1]]), keep=2, alpha=0.0, protect=0)
    # Merged into a protected token.
    with pytest.raises(AssertionError, match="merged into protected position 0"):
        testing.check_selection(FAN, None, index, torch.tensor([[0, 0, 0, 1, 0]]), keep=2, alpha=0.0, protect=1)


@pytest.mark.parametrize(
    "index, slot, protect, message",
    [
        ([[3, 0]], [[1, 0, 0, 0, 0]], 0, "strictly ascending"),
        ([[0, 0]], [[0, 0, 0, 0, 0]], 1, "strictly ascending"),
        ([[1, 3]], [[0, 0, 0, 1, 0]], 1, "protected positions"),
        ([[0, 5]], [[0, 0, 0, 0, 0]], 1, "index out of"),
        ([[0, 3]], [[0, 0, 0, 0, 0]], 1, "kept token 3"),
        ([[0, 3]], [[0, 0, 2, 1, 0]], 1, "slot out of"),
        ([[0, 3, 4]], [[0, 0, 0, 1, 2]], 1, r"shape \[B,K\]"),
    ],
)
def test_checker_rejects_invalid_selections(index, slot, protect, message):
    with pytest.raises(AssertionError, match=message):
        testing.check_selection(FAN, None, torch.tensor(index), torch.tensor(slot), keep=2, alpha=0.0, protect=protect)


def test_check_merge():
    gen = torch.Generator().manual_seed(7)
    tokens = torch.randn(2, 9, 4, generator=gen)
    sizes = torch.rand(2, 9, generator=gen) + 1
    out, index, sizes_out, slot = reference.prune(tokens, None, keep=6, sizes=sizes, protect=1)
    testing.check_merge(tokens, index, slot, sizes, out, sizes_out, rtol=1e-5, atol=1e-5)

    averaged = sizes_out > sizes.gather(1, index)  # the kept token received something
    b, p = (int(x) for x in averaged.nonzero()[0])
    wrong = out.clone()
    wrong[b, p] += 1e-3
    with pytest.raises(AssertionError, match="check_merge: out"):
        testing.check_merge(tokens, index, slot, sizes, wrong, sizes_out, rtol=1e-5, atol=1e-5)

    # A protected token receives nothing: one ulp off is already wrong, whatever the tolerance.
    wrong = out.clone()
    wrong[0, 0] = torch.nextafter(wrong[0, 0], torch.full_like(wrong[0, 0], math.inf))
    with pytest.raises(AssertionError, match="exact copy"):
        testing.check_merge(tokens, index, slot, sizes, wrong, sizes_out, rtol=1, atol=1)

    with pytest.raises(AssertionError, match="sizes_out"):
        testing.check_merge(tokens, index, slot, sizes, out, sizes_out + 0.1, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Random small inputs: the checker accepts the reference's own output


@st.composite
def small_cases(draw):
    B = draw(st.integers(1, 3))
    N = draw(st.integers(1, 12))
    protect = draw(st.integers(0, min(N, 2)))
    return dict(
        B=B,
        N=N,
        D=draw(st.integers(1, 4)),
        protect=protect,
        keep=draw(st.integers(protect, N)),
        alpha=draw(st.sampled_from([0.0, 0.1, 1.0]) | st.floats(0.0, 1.0)),
        dtype=draw(st.sampled_from(FLOAT_DTYPES)),
        ties=draw(st.booleans()),  # small integer values: exact ties, zero and opposite vectors
        importance=draw(st.sampled_from(["none", "reduced", "attention"])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@settings(max_examples=50, deadline=None, derandomize=True)
@given(small_cases())
def test_checker_accepts_the_reference(case):
    gen = torch.Generator().manual_seed(case["seed"])
    B, N, D = case["B"], case["N"], case["D"]
    if case["ties"]:
        metric = torch.randint(-1, 2, (B, N, D), generator=gen).to(case["dtype"])
    else:
        metric = torch.randn(B, N, D, generator=gen).to(case["dtype"])
    reduced = torch.randint(0, 4, (B, N), generator=gen).float() if case["ties"] else torch.rand(B, N, generator=gen)
    attn = {
        "none": None,
        "reduced": reduced,
        "attention": torch.randn(B, 2, 3, N, generator=gen).softmax(-1),
    }[case["importance"]]
    sizes = torch.randint(0, 3, (B, N), generator=gen).float()
    kwargs = dict(keep=case["keep"], alpha=case["alpha"], protect=case["protect"])
    out, index, sizes_out, slot = reference.prune(metric, attn, sizes=sizes, **kwargs)
    testing.check_selection(metric, attn, index, slot, **kwargs)
    testing.check_merge(metric, index, slot, sizes, out, sizes_out, rtol=0, atol=0)
