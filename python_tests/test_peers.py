"""The peers of bench/peers.py keep the step contract of the encoder wrapper, and the benchmark scripts run.

The scripts' smoke runs need the installed package with `evoprune_ext.patch` and are skipped, saying so,
where it is missing.
"""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
from peers import PEERS, divprune, random_selection, tome, topk_attention, visionzip  # noqa: E402


def _has_patch() -> bool:
    try:
        import evoprune_ext

        return hasattr(evoprune_ext, "patch")
    except Exception:
        return False


needs_patch = pytest.mark.skipif(not _has_patch(), reason="evoprune_ext.patch is not importable (package not built)")


def inputs(b=3, n=21, d=8, dm=5, seed=0, sizes=False):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, n, d, generator=gen)
    metric = torch.randn(b, n, dm, generator=gen)
    importance = torch.rand(b, n, generator=gen)
    size = torch.randint(1, 5, (b, n), generator=gen).float() if sizes else torch.ones(b, n)
    return hidden, metric, importance, size


@pytest.mark.parametrize("name", list(PEERS))
@pytest.mark.parametrize("keep", [1, 2, 3, 8, 11, 15, 20, 21])
@pytest.mark.parametrize("merge", [True, False])
def test_contract(name, keep, merge):
    hidden, metric, importance, sizes = inputs(sizes=True)
    protect = 1
    out, sizes_out, slot, index = PEERS[name](hidden, metric, importance, sizes, keep=keep, protect=protect,
                                              alpha=0.1, merge=merge)
    b, n, d = hidden.shape
    assert index.shape == (b, keep) and (index.diff(dim=1) > 0).all(), "the kept positions, ascending"
    assert torch.equal(slot.gather(1, index), torch.arange(keep).expand(b, -1)), "a kept token carries itself"
    assert out.shape == (b, keep, d) and out.dtype == hidden.dtype
    assert sizes_out.shape == (b, keep) and sizes_out.dtype == torch.float32
    assert slot.shape == (b, n) and slot.dtype == torch.int64
    assert ((slot >= -1) & (slot < keep)).all()
    for row in slot:
        # Every output position carries at least one token, protected tokens sit first and alone.
        assert set(row[row >= 0].tolist()) == set(range(keep))
        assert row[:protect].tolist() == list(range(protect))
        assert (row[protect:] >= protect).logical_or(row[protect:] == -1).all()
    torch.testing.assert_close(out[:, :protect], hidden[:, :protect], rtol=0, atol=0)
    torch.testing.assert_close(sizes_out[:, :protect], sizes[:, :protect], rtol=0, atol=0)


@pytest.mark.parametrize("name", list(PEERS))
def test_identity_at_full_keep(name):
    hidden, metric, importance, sizes = inputs()
    out, sizes_out, slot, _ = PEERS[name](hidden, metric, importance, sizes, keep=21, protect=1, alpha=0.1,
                                          merge=True)
    torch.testing.assert_close(out, hidden)
    assert torch.equal(slot, torch.arange(21).expand(3, 21))


def test_kept_tokens_are_copied_when_pruning():
    """Pure pruning peers (and merge=False) output rows of the input, in ascending original order."""
    hidden, metric, importance, sizes = inputs()
    for name, step in PEERS.items():
        out, _, slot, _ = step(hidden, metric, importance, sizes, keep=7, protect=1, alpha=0.1, merge=False)
        for b in range(hidden.shape[0]):
            kept = [j for j in range(hidden.shape[1])
                    if slot[b, j] >= 0 and torch.equal(out[b, slot[b, j]], hidden[b, j])]
            assert len(kept) == 7, name
            assert [slot[b, j].item() for j in kept] == list(range(7)), name


@pytest.mark.parametrize("keep", [15, 11, 6, 2])
def test_tome_conserves_size_and_weights_by_size(keep):
    hidden, metric, importance, sizes = inputs(sizes=True)
    out, sizes_out, slot, _ = tome(hidden, metric, importance, sizes, keep=keep, protect=1, merge=True)
    torch.testing.assert_close(sizes_out.sum(1), sizes.sum(1))
    for b in range(hidden.shape[0]):
        for p in range(keep):
            group = slot[b] == p
            expected = (sizes[b, group, None] * hidden[b, group]).sum(0) / sizes[b, group].sum()
            torch.testing.assert_close(out[b, p], expected, rtol=1e-5, atol=1e-5)
            assert sizes_out[b, p] == sizes[b, group].sum()


def test_tome_one_matching_merges_a_into_b():
    """When N - keep <= |A| it is one bipartite matching: the r tokens of set A (even offsets after the
    protected ones) with the strongest edges merge into their most similar token of set B (odd offsets)."""
    hidden, metric, importance, sizes = inputs(n=21)
    protect, keep = 1, 15
    _, _, slot, _ = tome(hidden, metric, importance, sizes, keep=keep, protect=protect, merge=True)
    u = metric / metric.norm(dim=-1, keepdim=True)
    a, bset = list(range(protect, 21, 2)), list(range(protect + 1, 21, 2))
    for b in range(hidden.shape[0]):
        sim = u[b, a] @ u[b, bset].T
        edge, best = sim.max(dim=1)
        merged = set(edge.argsort(descending=True)[: 21 - keep].tolist())
        for i, j in enumerate(a):
            if i in merged:
                assert slot[b, j] == slot[b, bset[best[i]]]
            else:
                assert (slot[b] == slot[b, j]).sum() == 1
        assert len({slot[b, k].item() for k in bset}) == len(bset)


def is_max_min_greedy(metric, kept: set[int], tol: float = 1e-6) -> bool:
    """Whether `kept` is what max-min diversity can pick from `metric` (one sample, plain Python, float64): the
    token farthest from its nearest neighbour first, then repeatedly a token whose minimum cosine distance to the
    chosen ones is largest. Scores within `tol` of the largest are ties, which rounding decides; the first pick
    always ties (a token and its nearest neighbour are as far from their nearest), so every tie is tried."""
    u = metric / metric.norm(dim=-1, keepdim=True)
    n = len(u)
    dist = [[1.0 - float(u[i] @ u[j]) for j in range(n)] for i in range(n)]

    def extend(chosen):
        if len(chosen) == len(kept):
            return True
        rest = [j for j in range(n) if j not in chosen]
        if chosen:
            score = {j: min(dist[i][j] for i in chosen) for j in rest}
        else:
            score = {j: min(dist[i][j] for i in range(n) if i != j) for j in rest}
        best = max(score.values())
        return any(extend(chosen + [j]) for j in rest if j in kept and score[j] >= best - tol)

    return extend([])


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("protect", [0, 1, 2])
def test_divprune_is_the_max_min_greedy(seed, protect):
    hidden, metric, importance, sizes = inputs(b=2, n=16, dm=3, seed=seed)
    keep = 9
    out, sizes_out, slot, _ = divprune(hidden, metric, importance, sizes, keep=keep, protect=protect)
    for b in range(2):
        index = [j for j in range(16) if slot[b, j] >= 0]
        assert index[:protect] == list(range(protect)) and len(index) == keep
        assert is_max_min_greedy(metric[b, protect:].double(), {j - protect for j in index[protect:]})
        torch.testing.assert_close(out[b], hidden[b, index], rtol=0, atol=0)
        assert (slot[b][[j for j in range(16) if j not in index]] == -1).all()


def test_the_max_min_check_rejects_other_picks():
    metric = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)
    assert is_max_min_greedy(metric, {0, 3})  # the opposite pair is the farthest
    assert not is_max_min_greedy(metric, {0, 1})


def test_topk_attention_keeps_the_most_important_with_low_index_ties():
    hidden, metric, importance, sizes = inputs(b=1, n=10)
    importance = torch.tensor([[9.0, 0.5, 0.9, 0.9, 0.1, 0.7, 0.9, 0.2, 0.3, 0.4]])
    _, _, slot, _ = topk_attention(hidden, metric, importance, sizes, keep=4, protect=1)
    assert [j for j in range(10) if slot[0, j] >= 0] == [0, 2, 3, 6]


def test_visionzip_dominant_and_contextual_tokens():
    hidden, metric, importance, sizes = inputs(b=2, n=65, dm=6)
    keep, protect = 33, 1  # 32 free places: round(32 * 10 / 64) = 5 contextual, 27 dominant
    _, sizes_out, slot, _ = visionzip(hidden, metric, importance, sizes, keep=keep, protect=protect, merge=True)
    for b in range(2):
        dominant = (protect + importance[b, protect:].argsort(descending=True, stable=True)[:27]).tolist()
        dominant_positions = {slot[b, j].item() for j in dominant}
        assert len(dominant_positions) == 27
        assert all(sizes_out[b, p] == 1 for p in dominant_positions), "dominant tokens absorb nothing"
        contextual = set(range(protect, keep)) - dominant_positions
        assert len(contextual) == 5
        assert (slot[b] >= 0).all(), "with merge every token has a destination"
        assert sizes_out[b].sum() == 65


def test_importance_required_where_ranked_by_attention():
    hidden, metric, _, sizes = inputs()
    for step in (topk_attention, visionzip):
        with pytest.raises(ValueError, match="importance"):
            step(hidden, metric, None, sizes, keep=5, protect=1)


def test_invalid_keep():
    hidden, metric, importance, sizes = inputs()
    for step in PEERS.values():
        with pytest.raises(ValueError, match="keep"):
            step(hidden, metric, importance, sizes, keep=22, protect=1)


def test_random_is_seeded():
    hidden, metric, importance, sizes = inputs()
    first = random_selection(hidden, metric, importance, sizes, keep=6, protect=1)[2]
    second = random_selection(hidden, metric, importance, sizes, keep=6, protect=1)[2]
    assert torch.equal(first, second)
    assert not torch.equal(first[0], first[1]), "each image draws its own tokens"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@needs_patch
def test_eval_quality_smoke(tmp_path, capsys):
    result = _load("eval_quality").main(["--smoke", "--out", str(tmp_path)])
    assert (tmp_path / "quality.png").stat().st_size > 0
    assert "recommended defaults" in capsys.readouterr().out
    methods = {row["method"] for row in result["rows"]}
    assert set(PEERS) <= methods and "unpruned" in methods


@needs_patch
def test_bench_encoder_quick(tmp_path, capsys):
    rows = _load("bench_encoder").main(["--quick", "--json", str(tmp_path / "encoder.json")])
    assert {r["method"] for r in rows} == {"unpatched", "evoprune", "tome"}
    assert all(r["ideal"] >= 1 for r in rows)
    assert "| encoder |" in capsys.readouterr().out


def test_quality_model_training_is_reproducible():
    """Same seeds, deterministic algorithms, one thread: two short trainings give identical weights."""
    pytest.importorskip("transformers")
    quality = _load("eval_quality")
    first, _ = quality.train(steps=3, log=None)
    second, _ = quality.train(steps=3, log=None)
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name


def test_saved_quality_model_is_small_and_loads():
    quality = _load("eval_quality")
    size = sum(f.stat().st_size for f in (BENCH / "quality_model").iterdir())
    assert size < 5 * 2**20
    model, config = quality.load()
    assert type(model.vision).__name__ == "CLIPVisionModel"
    assert config["task"] == {k: v for k, v in quality.TASK.items()}
