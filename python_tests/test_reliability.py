"""Reliability of the ops on inputs nobody checked (SPEC.md section 5, docs/RELIABILITY.md).

Property-based fuzzing of every op with adversarial values, degenerate shapes, every dtype and
any strides; concurrency; scale. Properties: a valid selection, no input modified, bitwise
identical results run to run; and, wherever the values make a float64 replay meaningful (all
finite), the full checks of evoprune_ext.testing.

EVOPRUNE_FUZZ_EXAMPLES sets the examples per fuzzed op (default 60, `make fuzz` 10,000).
"""

import json
import math
import os
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import evoprune_ext
from evoprune_ext import reference, testing

ops = torch.ops.evoprune
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
MERGE_TOL = {torch.float32: 1e-5, torch.float64: 1e-10, torch.float16: 2e-3, torch.bfloat16: 2e-2}
FUZZ = settings(
    max_examples=int(os.environ.get("EVOPRUNE_FUZZ_EXAMPLES", "60")),
    deadline=None,
    derandomize="EVOPRUNE_FUZZ_EXAMPLES" not in os.environ,
    suppress_health_check=list(HealthCheck),
    database=None,
)

# ---------------------------------------------------------------------------- adversarial inputs

VALUE_KINDS = ["randn", "zeros", "equal", "huge", "tiny", "denormal", "specials", "nan", "inf"]
SPECIALS = [math.nan, math.inf, -math.inf, 0.0, -0.0, 1e30, -1e30, 1e-30, 1e-45, 65504.0, 3e38]
LAYOUTS = ["contiguous", "strided", "transposed", "offset", "expanded"]


def values(shape, kind, dtype, g, *, nonnegative=False):
    """A float tensor of `shape` in `dtype` whose values are of the given adversarial kind."""
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    if kind == "zeros":
        x = torch.zeros(shape, dtype=torch.float64)
    elif kind == "equal":
        x = torch.full(shape, float(torch.randn((), generator=g, dtype=torch.float64)))
    elif kind == "huge":
        x = x * 1e30
    elif kind == "tiny":
        x = x * 1e-30
    elif kind == "denormal":  # below the smallest normal number of the dtype
        x = x * torch.finfo(dtype).tiny * 0.25
    elif kind in ("specials", "nan", "inf"):
        pool = {"specials": SPECIALS, "nan": [math.nan], "inf": [math.inf, -math.inf]}[kind]
        pick = torch.randint(len(pool), shape, generator=g)
        special = torch.tensor(pool, dtype=torch.float64)[pick]
        x = torch.where(torch.rand(shape, generator=g) < 0.4, special, x)
    if nonnegative:
        x = x.abs().nan_to_num(0.0, 0.0, 0.0)  # sizes: finite and >= 0 (-0.0 survives abs as 0.0)
    return x.to(dtype)


def with_layout(t, layout, g):
    """t with the same shape in another memory layout. `expanded` broadcasts one slice of t along a
    random non-empty set of dimensions of size > 1 (stride 0), so its values become repeated."""
    if t.dim() == 0 or layout == "contiguous":
        return t
    if layout == "strided":
        big = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
        big[..., ::2] = t
        return big[..., ::2]
    if layout == "transposed":
        return t.transpose(0, -1).contiguous().transpose(0, -1)
    if layout == "offset":
        big = torch.zeros(t.numel() + 3, dtype=t.dtype)
        big[3:] = t.flatten()
        return big[3:].view(t.shape)
    dims = [d for d in range(t.dim()) if t.shape[d] > 1]
    if not dims:
        return t.expand(t.shape)
    chosen = [d for d in dims if torch.rand((), generator=g) < 0.5] or dims[:1]
    index = tuple(slice(0, 1) if d in chosen else slice(None) for d in range(t.dim()))
    return t[index].expand(t.shape)


@st.composite
def tensors(draw, shape, dtype, *, nonnegative=False, kinds=VALUE_KINDS):
    """An adversarial tensor in an adversarial layout."""
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    t = values(shape, draw(st.sampled_from(kinds)), dtype, g, nonnegative=nonnegative)
    t = with_layout(t, draw(st.sampled_from(LAYOUTS)), g)
    return t


def counts(draw, n):
    """protect and keep in [0, N], protect <= keep, with the boundaries (K = P, K = N, P = 0, P = N) likely."""
    protect = draw(st.one_of(st.sampled_from([0, n]), st.integers(0, n)))
    keep = draw(st.one_of(st.sampled_from([protect, n]), st.integers(protect, n)))
    return protect, keep


alphas = st.one_of(st.sampled_from([0.0, 1.0, 0.1, 0.5]), st.floats(0.0, 1.0))
dims_n = st.one_of(st.sampled_from([0, 1, 2]), st.integers(0, 40))
dims_d = st.one_of(st.sampled_from([0, 1]), st.integers(0, 7))


# ---------------------------------------------------------------------------- property helpers


def bits(t):
    """t's values as integers, so NaN payloads and the sign of zero compare too."""
    as_int = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}[t.element_size()]
    return t.contiguous().view(as_int) if t.is_floating_point() else t.contiguous()


def same_bits(a, b):
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(bits(a), bits(b))


def call_twice(op, inputs, *args, **kwargs):
    """Run op twice; assert it leaves every input tensor untouched (values and strides) and returns
    bitwise identical results both times. Returns the first result as a tuple."""
    tensors_in = [t for t in inputs if isinstance(t, torch.Tensor)]
    before = [(t.clone(), t.stride(), t.storage_offset()) for t in tensors_in]
    first = op(*args, **kwargs)
    second = op(*args, **kwargs)
    first = first if isinstance(first, tuple) else (first,)
    second = second if isinstance(second, tuple) else (second,)
    for t, (copy, stride, offset) in zip(tensors_in, before):
        assert t.stride() == stride and t.storage_offset() == offset, "an input's layout was changed"
        assert same_bits(t, copy), "an input was modified"
    for a, b in zip(first, second):
        assert same_bits(a, b), "two runs on the same inputs differ"
    return first


def all_finite(*ts):
    return all(t is None or bool(t.isfinite().all()) for t in ts)


def check_selection_of(metric, importance, index, slot, *, keep, alpha, protect):
    """testing.check_selection where the values are finite, its validity part otherwise."""
    B, N = metric.shape[:2]
    assert tuple(slot.shape) == (B, N)
    if importance is not None and importance.dim() == 4:
        importance = reference.importance(importance)
    if all_finite(metric, importance):
        testing.check_selection(metric, importance, index, slot, keep=keep, alpha=alpha, protect=protect)
    else:
        testing.check_valid(index, slot, keep=keep, protect=protect)


# ---------------------------------------------------------------------------- fuzzing every op


@FUZZ
@given(data=st.data(), B=st.sampled_from([0, 1, 2, 3]), N=dims_n, D=dims_d, dtype=st.sampled_from(DTYPES),
       alpha=alphas)
def test_fuzz_select(data, B, N, D, dtype, alpha):
    protect, keep = counts(data.draw, N)
    metric = data.draw(tensors((B, N, D), dtype))
    importance = data.draw(st.one_of(st.none(), tensors((B, N), data.draw(st.sampled_from([torch.float32, dtype])))))
    index, slot = call_twice(ops.select, [metric, importance], metric, importance, keep=keep, alpha=alpha,
                             protect=protect)
    check_selection_of(metric, importance, index, slot, keep=keep, alpha=alpha, protect=protect)


@FUZZ
@given(data=st.data(), B=st.sampled_from([0, 1, 2, 3]), N=dims_n, D=dims_d, dtype=st.sampled_from(DTYPES),
       alpha=alphas, merge=st.booleans(), attn_kind=st.sampled_from([None, "2d", "4d"]))
def test_fuzz_prune(data, B, N, D, dtype, alpha, merge, attn_kind):
    protect, keep = counts(data.draw, N)
    tokens = data.draw(tensors((B, N, D), dtype))
    metric = data.draw(st.one_of(st.none(), tensors((B, N, data.draw(dims_d)), dtype)))
    attn_dtype = data.draw(st.sampled_from([torch.float32, dtype]))
    if attn_kind == "4d":
        shape = (B, data.draw(st.integers(0, 3)), data.draw(st.integers(0, 3)), N)
        attn = data.draw(tensors(shape, attn_dtype))
    else:
        attn = data.draw(tensors((B, N), attn_dtype)) if attn_kind == "2d" else None
    sizes = data.draw(st.one_of(st.none(), tensors((B, N), torch.float32, nonnegative=True)))
    inputs = [tokens, attn, metric, sizes]
    out, index, sizes_out, slot = call_twice(ops.prune, inputs, tokens, attn, keep=keep, metric=metric, sizes=sizes,
                                             alpha=alpha, protect=protect, merge=merge)
    assert out.dtype == tokens.dtype and out.shape == (B, keep, D)
    assert sizes_out.dtype == torch.float32 and sizes_out.shape == (B, keep)
    check_selection_of(tokens if metric is None else metric, attn, index, slot, keep=keep, alpha=alpha,
                       protect=protect)
    if not merge:
        # gathered as integers: torch's bfloat16 gather rewrites NaN payloads, the op must not
        assert torch.equal(bits(out), bits(tokens).gather(1, index[..., None].expand(B, keep, D)))
        s = torch.ones(B, N) if sizes is None else sizes
        assert same_bits(sizes_out, s.gather(1, index))
    elif all_finite(tokens, sizes):
        tol = MERGE_TOL[dtype]
        testing.check_merge(tokens, index, slot, sizes, out, sizes_out, rtol=tol, atol=tol)


@FUZZ
@given(data=st.data(), B=st.sampled_from([0, 1, 2, 3]), N=dims_n, D=dims_d, dtype=st.sampled_from(DTYPES))
def test_fuzz_merge(data, B, N, D, dtype):
    protect, keep = counts(data.draw, N)
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**32 - 1)))
    # Any valid selection: the greedy's on random metrics, some tokens' similarity NaN so they have no owner.
    metric = torch.randn(B, N, 3, generator=g).masked_fill(torch.rand(B, N, 1, generator=g) < 0.2, math.nan)
    index, slot = reference.select(metric, None, keep=keep, alpha=0.0, protect=protect)
    index = with_layout(index, data.draw(st.sampled_from(["contiguous", "strided", "transposed", "offset"])), g)
    slot = with_layout(slot, data.draw(st.sampled_from(["contiguous", "strided", "transposed", "offset"])), g)
    tokens = data.draw(tensors((B, N, D), dtype))
    sizes = data.draw(st.one_of(st.none(), tensors((B, N), torch.float32, nonnegative=True)))
    out, sizes_out = call_twice(ops.merge, [tokens, index, slot, sizes], tokens, index, slot, sizes)
    if all_finite(tokens, sizes):
        tol = MERGE_TOL[dtype]
        testing.check_merge(tokens, index, slot, sizes, out, sizes_out, rtol=tol, atol=tol)
    else:
        assert out.dtype == dtype and out.shape == (B, keep, D) and sizes_out.shape == (B, keep)


@FUZZ
@given(data=st.data(), B=st.sampled_from([0, 1, 2, 3]), H=st.integers(0, 3), Q=st.integers(0, 4), N=dims_n,
       dtype=st.sampled_from(DTYPES))
def test_fuzz_importance(data, B, H, Q, N, dtype):
    attn = data.draw(tensors((B, H, Q, N), dtype))
    (imp,) = call_twice(ops.importance, [attn], attn)
    assert imp.dtype == torch.float32 and imp.shape == (B, N)
    if all_finite(attn) and H * Q > 0:
        # float32 sums in another order: the rounding error scales with the largest magnitude summed
        largest = float(attn.double().abs().max()) if attn.numel() else 0.0
        atol = 1e-6 + 1e-6 * H * Q * largest
        torch.testing.assert_close(imp, reference.importance(attn), rtol=1e-5, atol=atol, equal_nan=True)


@FUZZ
@given(data=st.data(), B=st.sampled_from([0, 1, 2]), H=st.integers(0, 3), Q=st.integers(0, 4), N=dims_n,
       d=dims_d, dtype=st.sampled_from(DTYPES),
       scale=st.one_of(st.sampled_from([0.0, 1.0, -1.0, 1e30, 1e-30]), st.floats(-100, 100)))
def test_fuzz_importance_from_qk(data, B, H, Q, N, d, dtype, scale):
    q = data.draw(tensors((B, H, Q, d), dtype))
    k = data.draw(tensors((B, H, N, d), dtype))
    (imp,) = call_twice(ops.importance_from_qk, [q, k], q, k, scale)
    assert imp.dtype == torch.float32 and imp.shape == (B, N)
    want = reference.importance_from_qk(q, k, scale)
    if bool(want.isfinite().all()) and H * Q > 0:
        torch.testing.assert_close(imp, want, rtol=1e-4, atol=1e-6)


def test_empty_metric_rows_are_owned():
    # Dm = 0: every similarity is 0 > -1, so every dropped token has an owner (the first pick). The
    # kernel once skipped the ownership update because an empty metric has no data pointer.
    index, slot = ops.select(torch.empty(1, 5, 0), None, keep=1, alpha=0.0)
    assert index.tolist() == [[0]] and slot.tolist() == [[0] * 5]


# ---------------------------------------------------------------------------- concurrency


def _concurrent_calls():
    g = torch.Generator().manual_seed(11)
    calls = []
    for i in range(16):
        tokens = torch.randn(2, 300 + 37 * i, 16, generator=g)
        attn = torch.rand(2, 2, 3, tokens.shape[1], generator=g).softmax(-1)
        keep = 5 + 7 * i
        calls.append(lambda t=tokens, a=attn, k=keep: ops.prune(t, a, keep=k, protect=1, alpha=0.3))
        calls.append(lambda t=tokens, k=keep: ops.select(t, None, keep=k, alpha=0.0))
        calls.append(lambda a=attn: ops.importance(a))
        calls.append(lambda t=tokens: ops.importance_from_qk(t[:, None, :4], t[:, None], 0.25))
    return calls


def test_eight_threads_give_the_sequential_results():
    calls = _concurrent_calls()
    sequential = [call() for call in calls]
    with ThreadPoolExecutor(max_workers=8) as pool:
        for _ in range(3):
            concurrent = list(pool.map(lambda call: call(), calls))
            for want, got in zip(sequential, concurrent):
                want, got = (want, got) if isinstance(want, tuple) else ((want,), (got,))
                assert all(same_bits(w, o) for w, o in zip(want, got))


# ---------------------------------------------------------------------------- scale


def _run_measured(body):
    """Run `body` in a fresh interpreter and return the dict `figures` it fills. Its `measure(name,
    call)` records the call's time and its peak memory growth: the resident-set high-water mark
    (VmHWM, reset through /proc/self/clear_refs) minus the resident set before the call, so the
    inputs and everything allocated before do not count."""
    script = textwrap.dedent("""
        import json, time
        import torch
        import evoprune_ext
        from evoprune_ext import testing
        ops = torch.ops.evoprune
        figures = {}
        def rss_mib(field):
            with open("/proc/self/status") as status:
                return next(int(line.split()[1]) for line in status if line.startswith(field)) / 1024
        def measure(name, call):
            with open("/proc/self/clear_refs", "w") as clear:
                clear.write("5")
            base, start = rss_mib("VmRSS:"), time.perf_counter()
            result = call()
            figures[name] = {"seconds": time.perf_counter() - start, "grown_mib": rss_mib("VmHWM:") - base}
            return result
    """) + textwrap.dedent(body) + "\nprint(json.dumps(figures))\n"
    no_site = ["-S"] if sys.flags.no_site else []  # as this interpreter: .ci/sanitize runs python -S
    done = subprocess.run([sys.executable, *no_site, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="measures memory through Linux /proc")
def test_n_65536_keep_64_without_n_by_n_memory():
    # An N x N float32 similarity matrix would take 16 GiB; each op must stay far below 2 GiB.
    figures = _run_measured("""
        N, D = 65536, 64
        tokens = torch.randn(1, N, D)
        attn = torch.rand(1, 4, 1, N).softmax(-1)
        q, k = torch.randn(1, 4, 1, D), torch.randn(1, 4, N, D)
        out, index, sizes, slot = measure("prune", lambda: ops.prune(tokens, attn, keep=64, protect=1))
        assert out.shape == (1, 64, D) and sizes.sum().item() == N
        testing.check_valid(index, slot, keep=64, protect=1)
        index, slot = measure("select", lambda: ops.select(tokens, None, keep=64, alpha=0.0))
        testing.check_valid(index, slot, keep=64, protect=0)
        measure("importance_from_qk", lambda: ops.importance_from_qk(q, k, 0.125))
    """)
    for name, f in figures.items():
        print(f"N=65536 K=64 D=64 {name}: {f['seconds']:.2f} s, peak memory growth {f['grown_mib']:.0f} MiB")
        assert f["grown_mib"] < 2048, name


def test_batch_of_4096_small_samples():
    g = torch.Generator().manual_seed(12)
    tokens = torch.randn(4096, 12, 8, generator=g)
    attn = torch.rand(4096, 2, 1, 12, generator=g).softmax(-1)
    out, index, sizes, slot = ops.prune(tokens, attn, keep=5, protect=1)
    testing.check_selection(tokens, attn, index, slot, keep=5, alpha=evoprune_ext.DEFAULT_ALPHA, protect=1)
    testing.check_merge(tokens, index, slot, None, out, sizes, rtol=1e-5, atol=1e-5)


def test_more_than_2_to_the_31_elements_via_stride_0_inputs():
    B, N, D, keep = 2**16, 2**8, 2**8, 4  # B*N*D = 2^32 elements, 4 KiB of storage each
    tokens = torch.randn(1, 1, D).expand(B, N, D)
    metric = torch.randn(1, N, 1).expand(B, N, 1)
    attn = torch.rand(1, 1, 1, N).expand(B, 1, 1, N)
    out, index, sizes, slot = ops.prune(tokens, attn, keep=keep, metric=metric, protect=1, merge=False)
    assert out.shape == (B, keep, D) and torch.equal(out, tokens[:, :keep])
    testing.check_valid(index, slot, keep=keep, protect=1)
    assert torch.equal(index, index[:1].expand(B, keep)) and torch.equal(slot, slot[:1].expand(B, N))
    # merge over the same stride-0 tokens, with only the kept tokens in their groups
    slot = torch.full((B, N), -1).scatter_(1, index, torch.arange(keep).expand(B, keep))
    out, sizes = ops.merge(tokens, index, slot)
    assert torch.equal(out, tokens[:, :keep]) and bool((sizes == 1).all())
