"""Accuracy against retention: EvoPrune (several alphas and schedules) and its peers inside a trained ViT.

Untrained weights say nothing about accuracy, so this trains (once, reproducibly, 12-18 minutes on a
2-core CPU) a small Hugging Face `CLIPVisionModel` with a linear head on its pooled CLS output, on a task
made from scikit-learn's digits where the answer is spread over more patches than a pruned encoder keeps at
25% retention. A 64x64 canvas is an 8x8 grid of one-patch cells: seven digits of different classes, each
upscaled to 16x16 on a block of 2x2 cells at a random place of the grid, and 10 cells of clutter (two random
straight strokes each, as bright as a digit's ink) at random free cells, all over light noise. The model names
the set of digits (10 sigmoid outputs, its top 7 must be exactly the seven digits; chance is 1 in 120).

A quarter of a digit is one token: 28 of the 64 patches carry the answer and 10 more carry clutter. The pruned
encoder ends with 32 patch tokens at 50% retention, enough for the digits only if the clutter goes, and 16 at
25%, where at least 12 quarters must go: a method chooses which quarters to keep and what to merge into them,
and clutter competes with the digits for the kept places by diversity (it is as unlike the background as a
digit) though attention can learn to ignore it. (The task before, issue 13, had 8 digit patches in all, which
every good method kept down to 12.5%, so the table could not tell them apart.) The digits of training and test
canvases come from disjoint parts of the dataset.

Every accuracy comes with its 95% Wilson interval on the TEST_IMAGES canvases, and every method's difference
to the chosen EvoPrune with a paired 95% interval (same images). The defaults of alpha and schedule change only
when the current one is worse than the best beyond that noise (`choose_defaults`).

The weights and their config live in bench/quality_model/ (`--retrain` retrains). Every method runs through
the product's own harness, `evoprune_ext.patch`: EvoPrune with its ops, each peer of bench/peers.py as a
`step=` at every schedule, with the same layers and the same token counts. Writes quality.json, quality.md and
quality.png to --out, prints the markdown table and the defaults of alpha and schedule that the results
recommend.

    python bench/eval_quality.py            # evaluate the saved model (about 7 minutes)
    python bench/eval_quality.py --retrain  # train it again first (12-18 minutes more)
    python bench/eval_quality.py --smoke    # seconds: a tiny grid, for the tests
"""

import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import evaluation  # noqa: E402  (bench/evaluation.py)
from evaluation import equal_to_best, fit, wilson  # noqa: E402
from peers import PEERS  # noqa: E402  (bench/peers.py)

MODEL_DIR = Path(__file__).resolve().parent / "quality_model"
RESULTS_DIR = Path(__file__).resolve().parent / "results"

# The task. Stored with the weights; evaluation reads it back from there.
TASK = {
    "canvas": 64,
    "patch": 8,
    "digits": 7,
    "digit_scale": 2,
    "clutter": 10,
    "strokes_per_clutter": 2,
    "noise_std": 0.1,
    "split_seed": 0,
    "train_digit_share": 0.7,
    "test_seed": 12345,
}
# The model: a CLIP ViT, 64 patches of 8x8 + CLS, about 0.7 M parameters.
MODEL = {
    "hidden_size": 96,
    "intermediate_size": 384,
    "num_hidden_layers": 6,
    "num_attention_heads": 4,
    "image_size": 64,
    "patch_size": 8,
    "num_channels": 1,
}
# One thread: the weights and accuracies are then bitwise reproducible whatever the core count, and on a
# 2-core machine that other jobs share, one thread runs much faster than two that wait for each other.
TRAINING = {"seed": 0, "steps": 2000, "batch": 64, "lr": 2e-3, "weight_decay": 0.05, "warmup": 50, "clip": 1.0,
            "threads": 1}

NUM_CLASSES = 10  # one sigmoid output per digit class
TEST_IMAGES = 2000
RETENTIONS = [1.0, 0.75, 0.5, 0.25, 0.125]
ALPHAS = [0.0, 0.1, 0.3, 0.5, 1.0]
# Skip schedules in the wrapper's terms (evoprune_ext.schedule.default_layers): prune at layers first, first + every,
# ... (0-based), at most `steps` times, never in the last layer. The wrapper's current default joins them at run time.
SCHEDULES = {
    "one step at 1": dict(first=1, every=1, steps=1),
    "first 1, every 2": dict(first=1, every=2, steps=4),
    "first 1, every 1": dict(first=1, every=1, steps=4),
}
# The retentions whose accuracy picks the defaults: where pruning matters and methods differ.
DECIDING = [0.5, 0.25, 0.125]
# Confidence intervals (bench/evaluation.py) are 95%: accuracies get Wilson intervals, differences between two
# settings on the same images paired normal intervals; a default changes only on a difference whose interval
# excludes 0.


# ----------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------
def digit_pools(task: dict):
    """Digit images upscaled by `digit_scale` [n, 8s, 8s] in [0, 1], their labels, train/test indices."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32) / 16.0
    large = F.interpolate(images[:, None], scale_factor=task["digit_scale"], mode="bilinear", align_corners=False)
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(task["split_seed"]))
    cut = round(len(order) * task["train_digit_share"])
    return large[:, 0].clamp(0, 1), labels, order[:cut], order[cut:]


def strokes(count: int, size: int, task: dict, gen: torch.Generator) -> torch.Tensor:
    """`count` clutter patches [count, size, size]: a few straight strokes each, as bright as a digit's ink."""
    per, points = task["strokes_per_clutter"], 2 * size
    ends = torch.rand(count, per, 2, 2, generator=gen) * (size - 1)
    t = torch.linspace(0, 1, points)[:, None]
    pixels = (ends[:, :, :1] + (ends[:, :, 1:] - ends[:, :, :1]) * t).round().long()  # [count, per, points, 2]
    ink = (0.6 + 0.4 * torch.rand(count, per, 1, generator=gen)).expand(-1, -1, points)
    flat = (pixels[..., 0] * size + pixels[..., 1]).reshape(count, -1)
    out = torch.zeros(count, size * size).scatter_reduce_(1, flat, ink.reshape(count, -1), reduce="amax")
    return out.view(count, size, size)


def layout(count: int, span: int, side: int, gen: torch.Generator) -> list[tuple[int, int]]:
    """Top-left cells of `count` non-overlapping squares of span x span cells on a side x side grid."""
    while True:
        free, corners = torch.ones(side, side, dtype=torch.bool), []
        for _ in range(50 * count):
            r, c = torch.randint(0, side - span + 1, (2,), generator=gen).tolist()
            if free[r : r + span, c : c + span].all():
                free[r : r + span, c : c + span] = False
                corners.append((r, c))
                if len(corners) == count:
                    return corners


def compose(task: dict, pools, split: str, count: int, gen: torch.Generator):
    """`count` canvases [count, 1, C, C] and their labels, multi-hot [count, 10] over the digit classes.

    Each canvas holds `digits` digits of different classes, each on a square of `digit_scale` x `digit_scale`
    patch cells at a random place on the grid, and `clutter` cells of strokes at random cells no digit covers;
    the rest is noise.
    """
    images, labels, train_ids, test_ids = pools
    ids = train_ids if split == "train" else test_ids
    by_class = [ids[labels[ids] == k] for k in range(10)]
    cell, side, span = task["patch"], task["canvas"] // task["patch"], task["digit_scale"]
    per, n_clutter = task["digits"], task["clutter"]
    x = torch.randn(count, 1, task["canvas"], task["canvas"], generator=gen) * task["noise_std"]
    y = torch.zeros(count, 10)
    clutter = strokes(count * n_clutter, cell, task, gen).view(count, n_clutter, cell, cell)
    for i in range(count):
        classes = torch.randperm(10, generator=gen)[:per].tolist()
        free = torch.ones(side, side, dtype=torch.bool)
        for k, (r, c) in zip(classes, layout(per, span, side, gen)):
            pool = by_class[k]
            digit = images[pool[torch.randint(len(pool), (1,), generator=gen)].item()]
            free[r : r + span, c : c + span] = False
            x[i, 0, r * cell : (r + span) * cell, c * cell : (c + span) * cell] += digit
        cells = free.flatten().nonzero()[:, 0]
        for where, patch in zip(cells[torch.randperm(len(cells), generator=gen)].tolist(), clutter[i]):
            r, c = divmod(where, side)
            x[i, 0, r * cell : (r + 1) * cell, c * cell : (c + 1) * cell] += patch
        y[i, classes] = 1.0
    return x, y


# ----------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------
class DigitSet(nn.Module):
    """A transformers CLIPVisionModel (`.vision`) and a linear head on its pooled CLS output."""

    def __init__(self, model_config: dict, num_classes: int):
        super().__init__()
        from transformers import CLIPVisionConfig, CLIPVisionModel

        config = CLIPVisionConfig(**model_config)
        config._attn_implementation = "sdpa"
        self.vision = CLIPVisionModel(config)
        self.head = nn.Linear(config.hidden_size, num_classes)

    def forward(self, pixel_values):
        return self.head(self.vision(pixel_values=pixel_values).pooler_output)


def correct(logits, y, per: int) -> torch.Tensor:
    """Per image: are the `per` highest logits exactly its digits?"""
    predicted = torch.zeros_like(y).scatter_(1, logits.topk(per, dim=-1).indices, 1.0)
    return (predicted == y).all(dim=-1)


def train(steps: int | None = None, log=print) -> tuple[DigitSet, dict]:
    """Train the model from fixed seeds with deterministic algorithms; returns it and a training record."""
    cfg = dict(TRAINING, steps=steps or TRAINING["steps"])
    pools = digit_pools(TASK)

    def loss(model, batch):
        x, y = batch
        return F.binary_cross_entropy_with_logits(model(x), y)

    model, seconds = fit(lambda: DigitSet(MODEL, NUM_CLASSES), lambda gen: compose(TASK, pools, "train",
                         cfg["batch"], gen), loss, cfg, log)
    return model, {"training": cfg, "train_seconds": seconds}


def save(model: DigitSet, record: dict, directory: Path = MODEL_DIR) -> None:
    evaluation.save(model, {"task": TASK, "model": MODEL, "num_classes": NUM_CLASSES, **record}, directory)


def load(directory: Path = MODEL_DIR) -> tuple[DigitSet, dict]:
    return evaluation.load(directory, lambda config: DigitSet(config["model"], config["num_classes"]))


# ----------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------
def test_set(task: dict, count: int):
    return compose(task, digit_pools(task), "test", count, torch.Generator().manual_seed(task["test_seed"]))


@torch.inference_mode()
def hits(model: DigitSet, x, y, batch: int = 500) -> torch.Tensor:
    """Per test image (bool [n]): are its highest logits exactly its digits?"""
    per = int(y[0].sum().item())
    return torch.cat([correct(model(x[i : i + batch]), y[i : i + batch], per) for i in range(0, len(y), batch)])


def evaluate(model: DigitSet, x, y, *, retention: float, layers, alpha=None, step=None) -> torch.Tensor:
    """`hits` with the tower patched by `evoprune_ext.patch` (unpatched at retention 1)."""
    import evoprune_ext

    if retention >= 1.0:
        return hits(model, x, y)
    evoprune_ext.patch(model.vision, keep_ratio=retention, layers=layers, alpha=alpha, step=step)
    try:
        return hits(model, x, y)
    finally:
        evoprune_ext.unpatch(model.vision)


def schedule_layers(num_layers: int, first: int, every: int, steps: int) -> list[int]:
    """The wrapper's skip-schedule rule (evoprune_ext.schedule.default_layers) with explicit parameters."""
    last = max(num_layers - 2, 0)
    return list(range(min(first, last), last + 1, every))[:steps]


def schedules_for(num_layers: int, smoke: bool = False) -> dict[str, list[int]]:
    """Name -> layers of every schedule evaluated, the wrapper's current default included (once)."""
    from evoprune_ext.schedule import DEFAULT_EVERY, DEFAULT_FIRST_LAYER, default_layers

    named = {name: schedule_layers(num_layers, **p) for name, p in SCHEDULES.items()}
    default = default_layers(num_layers)
    same = [name for name, layers in named.items() if layers == default]
    if same:
        named[f"{same[0]} (default)"] = named.pop(same[0])
    else:
        named[f"first {DEFAULT_FIRST_LAYER}, every {DEFAULT_EVERY} (default)"] = default
    if smoke:
        return {name: layers for name, layers in named.items() if "default" in name}
    return named


def schedule_flops(config: dict, layers: list[int], retention: float) -> float:
    """FLOPs of the encoder pruned with `layers` to `retention` (bench_encoder's count), to break ties."""
    from bench_encoder import encoder_flops, tokens_per_layer
    from evoprune_ext.schedule import schedule_keeps

    tokens = (config["image_size"] // config["patch_size"]) ** 2 + 1
    keeps = schedule_keeps(tokens, 1, retention, len(layers))
    counts = tokens_per_layer(config["num_hidden_layers"], tokens, layers, keeps)
    return encoder_flops(dict(config, num_channels=1), "clip", counts)


def evoprune_name(alpha: float) -> str:
    return f"evoprune a={alpha:g}"


def run(model, x, y, *, retentions, methods, schedules, log=print) -> tuple[list[dict], dict]:
    """Accuracy of every method (name -> patch kwargs) at every schedule and retention below 1.

    Returns the rows (accuracy and its 95% Wilson interval) and the per-image hits by (method, schedule,
    retention), for paired comparisons on the same images."""
    rows, per_image = [], {}
    for schedule, layers in schedules.items():
        for name, kwargs in methods.items():
            start = time.perf_counter()
            for r in retentions:
                if r < 1.0:
                    h = evaluate(model, x, y, retention=r, layers=layers, **kwargs)
                    per_image[name, schedule, r] = h
                    rows.append(row(name, kwargs.get("alpha"), schedule, layers, r, h))
            if log:
                accs = " ".join(f"{row_['accuracy']:.3f}" for row_ in rows if row_["method"] == name
                                and row_["schedule"] == schedule)
                log(f"  {schedule:28s} {name:16s} {accs}  ({time.perf_counter() - start:.1f} s)")
    return rows, per_image


def row(method, alpha, schedule, layers, retention, h: torch.Tensor) -> dict:
    low, high = wilson(int(h.sum()), len(h))
    return {"method": method, "alpha": alpha, "schedule": schedule, "layers": layers, "retention": retention,
            "accuracy": h.float().mean().item(), "ci95": [low, high], "hits": int(h.sum()), "images": len(h)}


def lookup(rows, method, schedule, retention, key="accuracy"):
    if retention >= 1.0:
        return next(r[key] for r in rows if r["method"] == "unpruned")
    return next(r[key] for r in rows
                if r["method"] == method and r["schedule"] == schedule and r["retention"] == retention)


def per_image_mean(per_image, method, schedules, retentions) -> torch.Tensor:
    """Per test image, the share of (schedule, retention) settings in which `method` gets it right."""
    return torch.stack([per_image[method, s, r].double() for s in schedules for r in retentions]).mean(0)


def choose_defaults(per_image, alphas, schedules, model_config, deciding) -> dict:
    """EvoPrune's defaults from the `deciding` retentions, changed only on a difference outside the noise.

    alpha: the per-image accuracy averaged over every schedule (a default must hold whatever schedule a user
    picks) and the deciding retentions; the alphas whose paired difference to the best has a 95% interval
    containing 0 count as equal to it. The current default stays if it is among them; otherwise the largest of
    them, because importance costs nothing here and real encoders' attention carries more signal than this
    task needs. schedule: the same at the chosen alpha; the current default stays if equal to the best,
    otherwise the cheapest in FLOPs of the equals."""
    from evoprune_ext.defaults import DEFAULT_ALPHA

    best_alpha, by_alpha = equal_to_best({a: per_image_mean(per_image, evoprune_name(a), schedules, deciding)
                                          for a in alphas})
    tied = [a for a in alphas if by_alpha[a]["tied"]]
    alpha = DEFAULT_ALPHA if DEFAULT_ALPHA in tied else max(tied)
    best_schedule, by_schedule = equal_to_best({s: per_image_mean(per_image, evoprune_name(alpha), [s], deciding)
                                                for s in schedules})
    equal = [s for s in schedules if by_schedule[s]["tied"]]
    current = next(s for s in schedules if "default" in s)
    schedule = current if current in equal else min(
        equal, key=lambda s: schedule_flops(model_config, schedules[s], min(deciding)))

    def listing(table, name):
        return ", ".join(f"{100 * v['mean']:.2f}% ({name(k)}" + ("" if v["diff"] == 0 and v["half"] == 0 else
                         f"; {100 * v['diff']:+.2f} +- {100 * v['half']:.2f} to the best") + ")"
                         for k, v in table.items())

    kept_alpha = "the current default, kept" if alpha == DEFAULT_ALPHA else (
        "the current default is worse than the best beyond the noise; the largest alpha equal to the best")
    kept_schedule = "the current default, kept" if schedule == current else (
        "the current default is worse beyond the noise; the cheapest schedule equal to the best")
    reason = (f"alpha={alpha:g} ({kept_alpha}): mean accuracy over all schedules at retentions "
              f"{', '.join(f'{100 * r:g}%' for r in deciding)}: "
              + listing(by_alpha, lambda a: f"a={a:g}")
              + f"; equal to the best a={best_alpha:g} (paired 95% interval containing 0): "
              + ", ".join(f"{a:g}" for a in tied)
              + f". Schedule '{schedule}' {schedules[schedule]} ({kept_schedule}): at alpha={alpha:g} "
              + listing(by_schedule, str) + f"; equal to the best: {', '.join(equal)}.")
    return {"alpha": alpha, "schedule": schedule, "layers": schedules[schedule], "deciding_retentions": deciding,
            "by_alpha": {str(a): v for a, v in by_alpha.items()}, "by_schedule": by_schedule, "reason": reason}


def _cell(rows, name, schedule, r) -> str:
    low, high = lookup(rows, name, schedule, r, "ci95")
    return f"{100 * lookup(rows, name, schedule, r):.1f} ({100 * low:.1f}-{100 * high:.1f})"


def markdown(rows, per_image, retentions, schedules, peer_schedules, peers, alphas, chosen, task, count) -> str:
    """Methods vs retention (with 95% intervals) and every method's paired difference to the chosen EvoPrune, at
    each schedule (the chosen one first), then EvoPrune's alpha x schedule table."""
    head = ("| method | " + " | ".join(f"{100 * r:g}%" for r in retentions) + " |\n|---|"
            + "---|" * len(retentions) + "\n")
    baseline, (low, high) = lookup(rows, "unpruned", None, 1.0), lookup(rows, "unpruned", None, 1.0, "ci95")
    cells = task["digits"] * task["digit_scale"] ** 2
    out = [f"Exact-set accuracy (%) on {count} test canvases ({task['digits']} digits of different classes on "
           f"{task['digit_scale']}x{task['digit_scale']} patches each, {cells} of the 64 patches, among "
           f"{task['clutter']} patches of clutter strokes; 64x64, 64 patches + CLS), unpruned "
           f"{100 * baseline:.1f}% ({100 * low:.1f}-{100 * high:.1f}); chance is 1 in "
           f"{math.comb(NUM_CLASSES, task['digits'])}. In brackets: the 95% Wilson interval.\n"]
    names = [evoprune_name(a) for a in alphas] + list(peers)
    chosen_name = evoprune_name(chosen["alpha"])
    pruned = [r for r in retentions if r < 1.0]
    patches = (task["canvas"] // task["patch"]) ** 2
    out.append(f"\nThe pruned encoder ends with {', '.join(str(round(patches * r)) for r in pruned)} of its {patches} "
               f"patch tokens at {', '.join(f'{100 * r:g}%' for r in pruned)} retention; the digits cover {cells}.\n")
    for schedule in peer_schedules:
        out.append(f"\nPruning at layers {schedules[schedule]} of 6 ({schedule}):\n\n{head}")
        for name in names:
            mark = " **(chosen)**" if name == chosen_name and schedule == chosen["schedule"] else ""
            out.append(f"| {name}{mark} | " + " | ".join(_cell(rows, name, schedule, r) for r in retentions)
                       + " |\n")
        out.append(f"\nDifference to {chosen_name} at the same layers {schedules[schedule]}, in points, on the same "
                   "images (paired; +- the 95% half-width; bold: outside the noise):\n\n")
        out.append(evaluation.differences({(n, r): per_image[n, schedule, r] for n in names for r in pruned}, names,
                                          chosen_name, pruned, f"{chosen_name} at {schedules[schedule]}"))
    deciding = ", ".join(f"{100 * r:g}%" for r in chosen["deciding_retentions"])
    out.append(f"\nEvoPrune, mean accuracy at {deciding} retention, by schedule and alpha:\n\n")
    out.append("| schedule | layers | " + " | ".join(f"a={a:g}" for a in alphas) + " |\n|---|---|"
               + "---|" * len(alphas) + "\n")
    for s, layers in schedules.items():
        means = (per_image_mean(per_image, evoprune_name(a), [s], chosen["deciding_retentions"]).mean().item()
                 for a in alphas)
        out.append(f"| {s} | {layers} | " + " | ".join(f"{100 * v:.1f}" for v in means) + " |\n")
    out.append(f"\nDefaults: {chosen['reason']}\n")
    return "".join(out)


def plot(rows, per_image, retentions, schedules, peers, alphas, chosen, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    schedule = chosen["schedule"]
    xs = [100 * r for r in retentions]

    def curve(axis, name, **style):
        acc = [100 * lookup(rows, name, schedule, r) for r in retentions]
        ci = [lookup(rows, name, schedule, r, "ci95") for r in retentions]
        err = [[a - 100 * lo for a, (lo, _) in zip(acc, ci)], [100 * hi - a for a, (_, hi) in zip(acc, ci)]]
        axis.errorbar(xs, acc, yerr=err, capsize=3, **style)

    for a in alphas:
        picked = a == chosen["alpha"]
        curve(left, evoprune_name(a), marker="o", lw=2.5 if picked else 1, alpha=1 if picked else 0.5,
              label=evoprune_name(a) + (" (chosen)" if picked else ""))
    for p in peers:
        curve(left, p, marker="s", ls="--", label=p)
    left.set_xscale("log", base=2)
    left.set_xticks(xs, [f"{x:g}%" for x in xs])
    left.set_xlabel("retention (final share of patch tokens)")
    left.set_ylabel("exact-set test accuracy (%), 95% interval")
    left.set_title(f"pruning at layers {schedules[schedule]} of 6")
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    for s, layers in schedules.items():
        means = [100 * per_image_mean(per_image, evoprune_name(a), [s], chosen["deciding_retentions"]).mean().item()
                 for a in alphas]
        right.plot(alphas, means, marker="o", label=f"{s} {layers}")
    right.set_xlabel("alpha (weight of attention importance)")
    right.set_ylabel("mean accuracy (%) at " + ", ".join(f"{100 * r:g}%" for r in chosen["deciding_retentions"]))
    right.set_title("EvoPrune: alpha x schedule")
    right.grid(alpha=0.3)
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    return evaluation.keeping_threads(_main, argv)


def _main(argv) -> dict:
    args = evaluation.arguments(__doc__, MODEL_DIR, RESULTS_DIR, "quality").parse_args(argv)
    import evoprune_ext  # noqa: F401  (fails early if the package is not installed)

    torch.set_num_threads(TRAINING["threads"])  # evaluation too: reproducible accuracies (see TRAINING)
    if args.retrain:
        print(f"training a {MODEL['num_hidden_layers']}-layer CLIP ViT on the digit-set task ...")
        model, record = train()
        print(f"  trained in {record['train_seconds']} s")
        save(model, record, args.model_dir)
    elif args.smoke:
        train(steps=2, log=None)  # the training path, so that it cannot rot
    model, config = load(args.model_dir)
    task, num_layers = config["task"], config["model"]["num_hidden_layers"]

    count = 100 if args.smoke else TEST_IMAGES
    retentions = [1.0, 0.5, 0.125] if args.smoke else RETENTIONS
    alphas = [ALPHAS[1]] if args.smoke else ALPHAS
    schedules = schedules_for(num_layers, smoke=args.smoke)
    deciding = [r for r in DECIDING if r in retentions]
    peers = list(PEERS)
    x, y = test_set(task, count)
    start = time.perf_counter()
    print(f"accuracy at retentions {retentions} on {count} test canvases:")
    rows = [row("unpruned", None, None, [], 1.0, hits(model, x, y))]
    evo_rows, per_image = run(model, x, y, retentions=retentions, schedules=schedules,
                              methods={evoprune_name(a): {"alpha": a} for a in alphas})
    chosen = choose_defaults(per_image, alphas, schedules, config["model"], deciding)
    # The peers run at every schedule, the chosen one first: same layers, same counts. Some publish one step
    # (DivPrune, VisionZip), ToMe one at every layer; each method is compared with EvoPrune on equal terms.
    peer_schedules = {chosen["schedule"]: chosen["layers"]}
    peer_schedules.update({s: layers for s, layers in schedules.items() if s != chosen["schedule"]})
    peer_rows, peer_images = run(model, x, y, retentions=retentions, schedules=peer_schedules,
                                 methods={p: {"step": PEERS[p]} for p in peers})
    rows += evo_rows + peer_rows
    per_image.update(peer_images)
    seconds = time.perf_counter() - start

    table = markdown(rows, per_image, retentions, schedules, list(peer_schedules), peers, alphas, chosen, task,
                     count)
    print()
    print(table)
    print(f"recommended defaults: alpha={chosen['alpha']:g}, schedule '{chosen['schedule']}' "
          f"(layers {chosen['layers']} of {num_layers}).")
    print(f"evaluation: {len(rows)} settings on {count} test canvases in {seconds:.0f} s "
          f"(training took {config.get('train_seconds')} s)")

    args.out.mkdir(parents=True, exist_ok=True)
    result = {"task": task, "model": config["model"], "train_seconds": config.get("train_seconds"),
              "test_images": count, "eval_seconds": round(seconds, 1), "rows": rows, "chosen": chosen}
    (args.out / "quality.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "quality.md").write_text(table)
    plot(rows, per_image, retentions, schedules, peers, alphas, chosen, args.out / "quality.png")
    print(f"wrote {args.out / 'quality.json'}, quality.md, quality.png")
    return result


if __name__ == "__main__":
    main()
