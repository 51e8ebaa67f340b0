"""Accuracy against retention: EvoPrune (several alphas and schedules) and its peers inside a trained ViT.

Untrained weights say nothing about accuracy, so this trains (once, reproducibly, about 5 minutes on a
2-core CPU) a small Hugging Face `CLIPVisionModel` with a linear head on its pooled CLS output, on a task
made from scikit-learn's digits: three digits of different classes (8x8, upscaled to 16x16, each on 2x2
patches of the 8x8 patch grid) at random non-overlapping places on a 64x64 canvas with light noise; the
model names the set of digits (10 sigmoid outputs, its top 3 must be exactly the three digits). That is 64
patches + CLS, of which 52 show only background, so which tokens survive pruning decides the answer. The
digits of training and test canvases come from disjoint parts of the dataset.

The weights and their config live in bench/quality_model/ (`--retrain` retrains). Every method runs through
the product's own harness, `evoprune_ext.patch`: EvoPrune with its ops, each peer of bench/peers.py as a
`step=` at the same layers and the same token counts. Writes quality.json, quality.md and quality.png to
--out, prints the markdown table and the defaults of alpha and schedule that the results recommend.

    python bench/eval_quality.py            # evaluate the saved model (a few minutes)
    python bench/eval_quality.py --retrain  # train it again first (about 5 minutes more)
    python bench/eval_quality.py --smoke    # seconds: a tiny grid, for the tests
"""

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import PEERS  # noqa: E402  (bench/peers.py)

MODEL_DIR = Path(__file__).resolve().parent / "quality_model"
RESULTS_DIR = Path(__file__).resolve().parent / "results"

# The task. Stored with the weights; evaluation reads it back from there.
TASK = {
    "canvas": 64,
    "digit_scale": 2,
    "digits_per_image": 3,
    "grid": 8,
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
TRAINING = {"seed": 0, "steps": 900, "batch": 64, "lr": 2e-3, "weight_decay": 0.05, "warmup": 50, "clip": 1.0,
            "threads": 1}

NUM_CLASSES = 10  # one sigmoid output per digit class
TEST_IMAGES = 1000
RETENTIONS = [1.0, 0.75, 0.5, 0.25, 0.125]
ALPHAS = [0.0, 0.1, 0.3, 0.5, 1.0]
# Skip schedules in the wrapper's terms (evoprune_ext.encoder.default_layers): prune at layers first, first + every,
# ... (0-based), at most `steps` times, never in the last layer. The wrapper's current default joins them at run time.
SCHEDULES = {
    "one step at 1": dict(first=1, every=1, steps=1),
    "first 1, every 2": dict(first=1, every=2, steps=4),
    "first 1, every 1": dict(first=1, every=1, steps=4),
}
# The retentions whose accuracy picks the defaults: where pruning matters and methods differ.
DECIDING = [0.5, 0.25, 0.125]
# Mean accuracies closer than this (0.1 point) count as equal when choosing the defaults: about what one
# evaluation's noise moves them on TEST_IMAGES canvases.
TIE = 0.001


# ----------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------
def digit_pools(task: dict):
    """Upscaled digit images [n, s, s] in [0, 1], their labels, and the train/test split of their indices."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32) / 16.0
    images = F.interpolate(images[:, None], scale_factor=task["digit_scale"], mode="bilinear", align_corners=False)
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(task["split_seed"]))
    cut = round(len(order) * task["train_digit_share"])
    return images[:, 0], labels, order[:cut], order[cut:]


def compose(task: dict, pools, split: str, count: int, gen: torch.Generator):
    """`count` canvases [count, 1, C, C] and their labels, multi-hot [count, 10] over the digit classes."""
    images, labels, train_ids, test_ids = pools
    ids = train_ids if split == "train" else test_ids
    size, canvas, per, grid = images.shape[-1], task["canvas"], task["digits_per_image"], task["grid"]
    x = torch.randn(count, 1, canvas, canvas, generator=gen) * task["noise_std"]
    y = torch.zeros(count, 10)
    for i in range(count):
        while True:
            chosen = ids[torch.randint(len(ids), (per,), generator=gen)]
            if len(set(labels[chosen].tolist())) == per:
                break
        corners = []
        while len(corners) < per:
            r, c = (torch.randint(0, (canvas - size) // grid + 1, (2,), generator=gen) * grid).tolist()
            if all(abs(r - r0) >= size or abs(c - c0) >= size for r0, c0 in corners):
                corners.append((r, c))
        for (r, c), k in zip(corners, chosen.tolist()):
            x[i, 0, r : r + size, c : c + size] += images[k]
        y[i, labels[chosen]] = 1.0
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
    torch.manual_seed(cfg["seed"])
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(cfg["threads"])
    try:
        pools = digit_pools(TASK)
        model = DigitSet(MODEL, NUM_CLASSES)
        params = list(model.parameters())
        opt = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])

        def lr_factor(step):
            return min(1.0, (step + 1) / cfg["warmup"]) * 0.5 * (1 + math.cos(math.pi * step / cfg["steps"]))

        schedule = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
        gen = torch.Generator().manual_seed(cfg["seed"] + 1)
        model.train()
        start = time.perf_counter()
        for step in range(cfg["steps"]):
            x, y = compose(TASK, pools, "train", cfg["batch"], gen)
            loss = F.binary_cross_entropy_with_logits(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(params, cfg["clip"])
            opt.step()
            schedule.step()
            if log and (step + 1) % 100 == 0:
                log(f"  step {step + 1}/{cfg['steps']}  loss {loss.item():.3f}  {time.perf_counter() - start:.0f} s")
        model.eval()
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.set_num_threads(saved_threads)
    return model, {"training": cfg, "train_seconds": round(time.perf_counter() - start, 1)}


def save(model: DigitSet, record: dict, directory: Path = MODEL_DIR) -> None:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, directory / "model.safetensors")
    config = {"task": TASK, "model": MODEL, "num_classes": NUM_CLASSES, **record}
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def load(directory: Path = MODEL_DIR) -> tuple[DigitSet, dict]:
    from safetensors.torch import load_file

    config = json.loads((directory / "config.json").read_text())
    model = DigitSet(config["model"], config["num_classes"])
    model.load_state_dict(load_file(directory / "model.safetensors"))
    return model.eval(), config


# ----------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------
def test_set(task: dict, count: int):
    return compose(task, digit_pools(task), "test", count, torch.Generator().manual_seed(task["test_seed"]))


@torch.inference_mode()
def accuracy(model: DigitSet, x, y, batch: int = 500) -> float:
    """Share of images whose 3 highest logits are exactly their 3 digits."""
    per = int(y[0].sum().item())
    hits = sum(correct(model(x[i : i + batch]), y[i : i + batch], per).sum().item() for i in range(0, len(y), batch))
    return hits / len(y)


def evaluate(model: DigitSet, x, y, *, retention: float, layers, alpha=None, step=None) -> float:
    """Accuracy with the tower patched by `evoprune_ext.patch` (unpatched at retention 1)."""
    import evoprune_ext

    if retention >= 1.0:
        return accuracy(model, x, y)
    evoprune_ext.patch(model.vision, keep_ratio=retention, layers=layers, alpha=alpha, step=step)
    try:
        return accuracy(model, x, y)
    finally:
        evoprune_ext.unpatch(model.vision)


def schedule_layers(num_layers: int, first: int, every: int, steps: int) -> list[int]:
    """The wrapper's skip-schedule rule (evoprune_ext.encoder.default_layers) with explicit parameters."""
    last = max(num_layers - 2, 0)
    return list(range(min(first, last), last + 1, every))[:steps]


def schedules_for(num_layers: int, smoke: bool = False) -> dict[str, list[int]]:
    """Name -> layers of every schedule evaluated, the wrapper's current default included (once)."""
    from evoprune_ext.encoder import DEFAULT_EVERY, DEFAULT_FIRST_LAYER, default_layers

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
    from evoprune_ext.encoder import schedule_keeps

    tokens = (config["image_size"] // config["patch_size"]) ** 2 + 1
    keeps = schedule_keeps(tokens, 1, retention, len(layers))
    counts = tokens_per_layer(config["num_hidden_layers"], tokens, layers, keeps)
    return encoder_flops(dict(config, num_channels=1), "clip", counts)


def evoprune_name(alpha: float) -> str:
    return f"evoprune a={alpha:g}"


def run(model, x, y, *, retentions, methods, schedules, log=print) -> list[dict]:
    """Accuracy of every method (name -> patch kwargs) at every schedule and retention below 1."""
    rows = []
    for schedule, layers in schedules.items():
        for name, kwargs in methods.items():
            start = time.perf_counter()
            for r in retentions:
                if r < 1.0:
                    acc = evaluate(model, x, y, retention=r, layers=layers, **kwargs)
                    rows.append({"method": name, "alpha": kwargs.get("alpha"), "schedule": schedule, "layers": layers,
                                 "retention": r, "accuracy": acc})
            if log:
                accs = " ".join(f"{row['accuracy']:.3f}" for row in rows if row["method"] == name
                                and row["schedule"] == schedule)
                log(f"  {schedule:28s} {name:16s} {accs}  ({time.perf_counter() - start:.1f} s)")
    return rows


def lookup(rows, method, schedule, retention):
    if retention >= 1.0:
        return next(r["accuracy"] for r in rows if r["method"] == "unpruned")
    return next(r["accuracy"] for r in rows
                if r["method"] == method and r["schedule"] == schedule and r["retention"] == retention)


def mean_accuracy(rows, method, schedules, retentions) -> float:
    return statistics.mean(lookup(rows, method, s, r) for s in schedules for r in retentions)


def choose_defaults(rows, alphas, schedules, model_config) -> dict:
    """EvoPrune's defaults from the DECIDING retentions; accuracies within TIE count as equal.

    alpha: the best mean accuracy over every schedule (a default must hold whatever schedule a user picks);
    among equals the largest alpha, because importance costs nothing here and real encoders' attention carries
    more signal than this task needs. schedule: the best mean at that alpha; among equals the cheapest in FLOPs."""
    deciding = [r for r in DECIDING if any(row["retention"] == r for row in rows)]
    by_alpha = {a: mean_accuracy(rows, evoprune_name(a), schedules, deciding) for a in alphas}
    best = max(by_alpha.values())
    alpha = max(a for a, v in by_alpha.items() if v >= best - TIE)
    by_schedule = {s: mean_accuracy(rows, evoprune_name(alpha), [s], deciding) for s in schedules}
    best_schedule = max(by_schedule.values())
    equal = [s for s, v in by_schedule.items() if v >= best_schedule - TIE]
    schedule = min(equal, key=lambda s: schedule_flops(model_config, schedules[s], min(deciding)))
    pick = "the cheapest of those" if len(equal) > 1 else "the only one"
    reason = (f"alpha={alpha:g}: mean accuracy over all schedules at retentions "
              f"{', '.join(f'{100 * r:g}%' for r in deciding)} is "
              + ", ".join(f"{100 * v:.2f}% (a={a:g})" for a, v in by_alpha.items())
              + f"; the largest alpha within {100 * TIE:g} point of the best. Schedule '{schedule}' "
              f"{schedules[schedule]}: at alpha={alpha:g} "
              + ", ".join(f"{100 * v:.2f}% ({s})" for s, v in by_schedule.items())
              + f"; {pick} within {100 * TIE:g} point of the best.")
    return {"alpha": alpha, "schedule": schedule, "layers": schedules[schedule], "deciding_retentions": deciding,
            "by_alpha": by_alpha, "by_schedule": by_schedule, "reason": reason}


def _cells(values) -> str:
    return " | ".join(f"{100 * v:.1f}" for v in values)


def markdown(rows, retentions, schedules, peer_schedules, peers, alphas, chosen, test_images) -> str:
    """Methods vs retention at each schedule the peers ran at, then EvoPrune's alpha x schedule table."""
    head = ("| method | " + " | ".join(f"{100 * r:g}%" for r in retentions) + " |\n|---|"
            + "---|" * len(retentions) + "\n")
    baseline = lookup(rows, "unpruned", None, 1.0)
    out = [f"Exact-set accuracy (%) on {test_images} test canvases (3 digits on 64x64, 64 patches + CLS), "
           f"unpruned {100 * baseline:.1f}%.\n"]
    for schedule in peer_schedules:
        out.append(f"\nPruning at layers {schedules[schedule]} of 6 ({schedule}):\n\n{head}")
        for name in [evoprune_name(a) for a in alphas] + list(peers):
            mark = " **(chosen)**" if name == evoprune_name(chosen["alpha"]) and schedule == chosen["schedule"] else ""
            out.append(f"| {name}{mark} | {_cells(lookup(rows, name, schedule, r) for r in retentions)} |\n")
    deciding = ", ".join(f"{100 * r:g}%" for r in chosen["deciding_retentions"])
    out.append(f"\nEvoPrune, mean accuracy at {deciding} retention, by schedule and alpha:\n\n")
    out.append("| schedule | layers | " + " | ".join(f"a={a:g}" for a in alphas) + " |\n|---|---|"
               + "---|" * len(alphas) + "\n")
    for s, layers in schedules.items():
        means = (mean_accuracy(rows, evoprune_name(a), [s], chosen["deciding_retentions"]) for a in alphas)
        out.append(f"| {s} | {layers} | {_cells(means)} |\n")
    return "".join(out)


def plot(rows, retentions, schedules, peers, alphas, chosen, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    schedule = chosen["schedule"]
    xs = [100 * r for r in retentions]
    for a in alphas:
        picked = a == chosen["alpha"]
        left.plot(xs, [100 * lookup(rows, evoprune_name(a), schedule, r) for r in retentions], marker="o",
                  lw=2.5 if picked else 1, alpha=1 if picked else 0.5,
                  label=evoprune_name(a) + (" (chosen)" if picked else ""))
    for p in peers:
        left.plot(xs, [100 * lookup(rows, p, schedule, r) for r in retentions], marker="s", ls="--", label=p)
    left.set_xscale("log", base=2)
    left.set_xticks(xs, [f"{x:g}%" for x in xs])
    left.set_xlabel("retention (final share of patch tokens)")
    left.set_ylabel("exact-set test accuracy (%)")
    left.set_title(f"pruning at layers {schedules[schedule]} of 6")
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    for s, layers in schedules.items():
        means = [100 * mean_accuracy(rows, evoprune_name(a), [s], chosen["deciding_retentions"]) for a in alphas]
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
    threads = torch.get_num_threads()
    try:
        return _main(argv)
    finally:
        torch.set_num_threads(threads)


def _main(argv) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--retrain", action="store_true", help="train the model again and save it to --model-dir")
    parser.add_argument("--smoke", action="store_true", help="tiny run for the tests (seconds)")
    parser.add_argument("--model-dir", type=Path, default=MODEL_DIR)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="where quality.{json,md,png} go")
    args = parser.parse_args(argv)
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
    peers = list(PEERS)
    x, y = test_set(task, count)
    start = time.perf_counter()
    print(f"accuracy at retentions {retentions} on {count} test canvases:")
    rows = [{"method": "unpruned", "alpha": None, "schedule": None, "layers": [], "retention": 1.0,
             "accuracy": accuracy(model, x, y)}]
    rows += run(model, x, y, retentions=retentions, schedules=schedules,
                methods={evoprune_name(a): {"alpha": a} for a in alphas})
    chosen = choose_defaults(rows, alphas, schedules, config["model"])
    # The peers run at the chosen schedule and at the wrapper's current default: same layers, same counts.
    peer_schedules = {s: schedules[s] for s in schedules if s == chosen["schedule"] or "default" in s}
    rows += run(model, x, y, retentions=retentions, schedules=peer_schedules,
                methods={p: {"step": PEERS[p]} for p in peers})
    seconds = time.perf_counter() - start

    table = markdown(rows, retentions, schedules, list(peer_schedules), peers, alphas, chosen, count)
    print()
    print(table)
    print(f"recommended defaults: alpha={chosen['alpha']:g}, schedule '{chosen['schedule']}' "
          f"(layers {chosen['layers']} of {num_layers}).")
    print(f"why: {chosen['reason']}")
    print(f"evaluation: {len(rows)} settings on {count} test canvases in {seconds:.0f} s "
          f"(training took {config.get('train_seconds')} s)")

    args.out.mkdir(parents=True, exist_ok=True)
    result = {"task": task, "model": config["model"], "train_seconds": config.get("train_seconds"),
              "test_images": count, "eval_seconds": round(seconds, 1), "rows": rows,
              "chosen": {k: v for k, v in chosen.items()}}
    (args.out / "quality.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "quality.md").write_text(table)
    plot(rows, retentions, schedules, peers, alphas, chosen, args.out / "quality.png")
    print(f"wrote {args.out / 'quality.json'}, quality.md, quality.png")
    return result


if __name__ == "__main__":
    main()
