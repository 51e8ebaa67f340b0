"""bench/eval_video.py: its clips answer what they claim, its head reads any token subset, its video peers keep
exact counts, its pruning-aware fine-tuning trains the head alone on every method's tokens, and its smoke runs
give every method the same tokens per clip and write their results."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

import evoprune_ext

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
from peers import PEERS, VIDEO_PEERS, evs, temporal_merge  # noqa: E402

pytest.importorskip("transformers")
pytest.importorskip("skimage")
pytest.importorskip("sklearn")


def _load():
    spec = importlib.util.spec_from_file_location("eval_video", BENCH / "eval_video.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def video():
    return _load()


def clip_pool(b=2, frames=4, per=9, d=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, frames * per, d, generator=gen)
    return hidden, torch.ones(b, frames * per)


@pytest.mark.parametrize("step", list(VIDEO_PEERS.values()), ids=list(VIDEO_PEERS))
@pytest.mark.parametrize("keep", [1, 5, 9, 14, 36])
def test_video_peers_keep_exact_counts(step, keep):
    hidden, sizes = clip_pool()
    out, sizes_out, slot, index = step(hidden, hidden, None, sizes, keep=keep, protect=0, frames=4)
    assert out.shape == (2, keep, 6) and sizes_out.shape == (2, keep) and index.shape == (2, keep)
    assert (index.diff(dim=1) > 0).all(), "kept tokens in ascending order"
    if step is evs:  # drops without merging
        assert torch.equal(out, hidden.gather(1, index[..., None].expand(-1, -1, 6)))
    else:  # merges every token somewhere
        assert (slot >= 0).all() and torch.allclose(sizes_out.sum(1), sizes.sum(1))
    kept_slots = slot.gather(1, index)
    assert torch.equal(kept_slots, torch.arange(keep).expand(2, -1)), "a kept token carries itself"


def test_evs_keeps_the_first_frame_then_what_changed():
    hidden, sizes = clip_pool()
    hidden[:, 9:] = hidden[:, :9].repeat(1, 3, 1)
    hidden[:, 18 + 4] *= -1.0  # frame 2, patch 4 turns around (and back in frame 3): dissimilarity 2
    hidden[:, 27 + 7] *= 0.5  # frame 3, patch 7 only shrinks: dissimilarity 0
    index = evs(hidden, hidden, None, sizes, keep=10, protect=0, frames=4)[3]
    assert torch.equal(index, torch.tensor([*range(9), 18 + 4]).expand(2, -1))
    assert torch.equal(evs(hidden, hidden, None, sizes, keep=4, protect=0, frames=4)[3], torch.arange(4).expand(2, -1))


def test_temporal_merge_folds_repeats_into_earlier_frames():
    hidden, sizes = clip_pool(b=1)
    hidden[:, 9:] = hidden[:, :9].repeat(1, 3, 1)  # a static clip: every later frame repeats the first
    out, sizes_out, slot, index = temporal_merge(hidden, hidden, None, sizes, keep=9, protect=0, frames=4)
    assert torch.equal(index, torch.arange(9)[None])
    assert torch.equal(sizes_out, torch.full((1, 9), 4.0)), "each first-frame token absorbs its three repeats"
    assert torch.allclose(out, hidden[:, :9], atol=1e-6)
    assert torch.equal(slot.view(4, 9), torch.arange(9).expand(4, -1))


def test_clips_answer_what_they_claim(video):
    task = video.TASK
    x, y = video.compose(task, video.digit_pools(task), video.photos(task), "test", 8,
                         torch.Generator().manual_seed(0))
    assert x.shape == (8 * task["frames"], 1, task["size"], task["size"])
    assert torch.equal(y["present"].bool(), y["counts"] > 0)
    assert (y["present"].sum(1) == task["digits"]).all()
    assert y["present"].gather(1, y["first"][:, None]).all()
    assert y["present"].gather(1, y["query"][:, None]).all()
    assert y["counts"].max() <= task["appearances"]
    gen = torch.Generator().manual_seed(1)
    for _ in range(50):
        runs = video.appearances(task, gen)
        starts = sorted(r[0][0] for r in runs)
        assert starts[0] < starts[1], "exactly one digit appears first"
        for digit in runs:
            ends = [start + length for start, length in digit]
            assert all(end < next_start for end, (next_start, _) in zip(ends, digit[1:])), "a gap between"
            assert ends[-1] <= task["frames"]


def test_head_reads_any_order_of_tokens(video):
    """The head sees a token's frame from its id, not its place: per-frame and shuffled inputs answer alike."""
    torch.manual_seed(0)
    head = video.ClipHead(16, 3, queries=2, layers=1, heads=2, appearances=3).eval()
    tokens, frame, _ = video.frame_tokens(torch.randn(2 * 3, 5, 16), 3)
    order = torch.randperm(15)
    with torch.no_grad():
        first = head(tokens, frame)
        second = head(tokens[:, order], frame[:, order], torch.ones(2, 15))
    for a, b in zip(first, second):
        assert torch.allclose(a, b, atol=1e-5)
    empty_frame = frame.clone()
    empty_frame[:, 5:10] = 0  # frame 1 loses every token: its summary is the learned empty token
    assert all(torch.isfinite(out).all() for out in head(tokens, empty_frame))


def same_except_head(model, base) -> list[str]:
    """The names of the tensors that differ between two models; asserts that none is outside the head."""
    changed = [n for (n, a), b in zip(model.state_dict().items(), base.state_dict().values()) if not torch.equal(a, b)]
    assert all(n.startswith("head.") for n in changed), changed
    return changed


@pytest.mark.parametrize("directory", ["video_model", "video_model_pruned"])
def test_saved_video_model_is_small_and_loads(video, directory):
    size = sum(f.stat().st_size for f in (BENCH / directory).iterdir())
    assert size < 2 * 2**20
    model, config = video.load(BENCH / directory)
    assert type(model.vision).__name__ == "SiglipVisionModel"
    assert config["task"] == video.TASK
    if directory == "video_model_pruned":  # the shipped model, its head alone fine-tuned
        assert config["finetuning"]["trains"] == "head" and config["finetuning"]["base"] == "video_model"
        assert same_except_head(model, video.load()[0])


def test_video_model_training_is_reproducible(video):
    first, _ = video.train(steps=2, log=None)
    second, _ = video.train(steps=2, log=None)
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name


def test_finetuning_trains_the_head_alone_reproducibly(video):
    base, _ = video.load()
    first, record = video.finetune(steps=2, log=None)
    second, _ = video.finetune(steps=2, log=None)
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name
    assert same_except_head(first, base), "the head learned"
    tuning = record["finetuning"]
    assert tuning["methods"] == list(video.methods(video.ALPHAS)) and tuning["retentions"] == video.RETENTIONS
    assert tuning["steps"] == 2 and record["train_seconds"] == json.loads(
        (BENCH / "video_model" / "config.json").read_text())["train_seconds"]


@pytest.mark.parametrize("retention", [1.0, 0.125])
def test_every_method_feeds_the_fine_tuning_its_evaluation_input(video, retention):
    """What the head learns from is what it is evaluated on: same tokens, frames and sizes, and a gradient."""
    model, config = video.load()
    x, y = video.test_set(config["task"], 2)
    unpruned = video.unpruned_tokens(model, x)
    for name, method in video.methods(video.ALPHAS).items():
        tokens, frame, sizes = video.prepared(model, x, method, retention)
        assert tokens.shape[1] == video.kept(model, retention) and not tokens.is_inference()
        with torch.inference_mode(), video.pruning(model, method, retention):
            expected = video.head_input(model, x, method, retention, unpruned)
        for a, b in zip((tokens, frame, sizes), expected):
            assert (a is None and b is None) or torch.equal(a, b), name
        model.zero_grad()
        video.head_loss(model.head(tokens, frame, sizes), y).backward()
        assert model.head.present.weight.grad.abs().sum() > 0, name
        assert model.vision.embeddings.patch_embedding.weight.grad is None, name


def test_eval_video_smoke(video, tmp_path, capsys):
    result = video.main(["--smoke", "--out", str(tmp_path)])
    for suffix in ("json", "md", "png"):
        assert (tmp_path / f"video_quality.{suffix}").stat().st_size > 0
    assert "recommended for video: mode" in capsys.readouterr().out
    rows = result["rows"]
    clip = video.TASK["frames"] * (video.TASK["size"] // video.TASK["patch"]) ** 2
    for r in {row["retention"] for row in rows}:
        assert {row["tokens"] for row in rows if row["retention"] == r} == {evoprune_ext.kept_tokens(clip, r)}
    methods = {row["method"] for row in rows}
    assert {"unpruned", "evoprune frame a=0.1"} | {f"{p} frame" for p in PEERS} | {
        f"{p} after" for p in VIDEO_PEERS} <= methods
    assert {"evoprune clip a=0.1", "tome clip"} <= methods
    for row in rows:
        assert 0.0 <= row["ci95"][0] <= row["accuracy"] <= row["ci95"][1] <= 1.0
        assert all(0.0 <= row[q] <= 1.0 for q in video.QUESTIONS)
    assert result["chosen"]["mode"] in ("frame", "clip")


def test_eval_video_pruned_smoke(video, tmp_path, capsys):
    """--pruned --retrain in smoke mode: fine-tunes 2 steps from the shipped model, saves it, evaluates it."""
    result = video.main(["--smoke", "--pruned", "--retrain", "--model-dir", str(tmp_path / "model"),
                         "--out", str(tmp_path)])
    for suffix in ("json", "md", "png"):
        assert (tmp_path / f"video_quality_pruned.{suffix}").stat().st_size > 0
    assert not (tmp_path / "video_quality.json").exists()
    assert "fine-tuning the clip head on pruned clips" in capsys.readouterr().out
    model, config = video.load(tmp_path / "model")
    assert same_except_head(model, video.load()[0])
    assert result["finetuning"]["steps"] == 2 and result["finetune_seconds"] == config["finetune_seconds"]
    assert json.loads((tmp_path / "video_quality_pruned.json").read_text())["model_dir"] == "model"
    clip = video.TASK["frames"] * (video.TASK["size"] // video.TASK["patch"]) ** 2
    for row in result["rows"]:
        assert row["tokens"] == evoprune_ext.kept_tokens(clip, row["retention"])
    assert {row["method"] for row in result["rows"]} == {"unpruned", *video.methods([0.1])}



def test_video_picture_marks_each_budgets_kept_patches(video, tmp_path):
    import video_picture  # bench/video_picture.py

    model, config = video.load()
    x, _ = video.test_set(config["task"], 1)
    for budget in ("frame", "clip"):
        kept = video_picture.kept_patches(model, x, budget, 0.125)
        assert kept.shape == (12, 64) and int(kept.sum()) == round(12 * 64 * 0.125)
        if budget == "frame":
            assert (kept.sum(1) == 8).all()  # every frame its share
    video_picture.draw(model, config["task"], [0], 0.125, tmp_path / "kept.png")
    assert (tmp_path / "kept.png").stat().st_size > 10_000


def test_video_picture_spread_counts_what_each_frame_keeps(video):
    """`--spread`: the clip budget's per-frame counts, against the even split a prompt would fix before the tower."""
    import video_picture  # bench/video_picture.py

    model, config = video.load()
    rows = video_picture.spread(model, config["task"], 3, retentions=(0.125, 0.0625))
    x, _ = video.test_set(config["task"], 3)
    for row, retention in zip(rows, (0.125, 0.0625)):
        counts = torch.stack([video_picture.kept_patches(model, x[c * 12 : (c + 1) * 12], "clip", retention).sum(1)
                              for c in range(3)])
        even = round(12 * 64 * retention) // 12  # 96 and 48 split evenly: 8 and 4 a frame
        assert row["tokens"] == round(12 * 64 * retention)
        assert (row["fewest"], row["most"]) == (int(counts.min()), int(counts.max()))
        assert row["empty_frames"] == pytest.approx(float((counts == 0).float().mean()))
        assert row["moved"] == pytest.approx(float(((counts - even).clamp(min=0).sum(1) / row["tokens"]).mean()))
        assert 0 <= row["moved"] <= 1
