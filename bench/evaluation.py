"""What the accuracy benchmarks share (bench/eval_quality.py on images, bench/eval_video.py on clips): the 95%
intervals, the comparison of settings with the best one, the reproducible training loop, and saving the trained
model with its config."""

import argparse
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

# Confidence intervals are 95%: accuracies get Wilson intervals, differences between two settings on the same
# inputs paired normal intervals; a default changes only on a difference whose interval excludes 0.
Z = 1.959964


def wilson(successes: int, n: int) -> tuple[float, float]:
    """95% Wilson score interval of a proportion."""
    p, z2 = successes / n, Z**2
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def paired(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """Mean of a - b over the same inputs and its 95% half-width (normal approximation, paired)."""
    d = a.double() - b.double()
    return d.mean().item(), Z * d.std().item() / math.sqrt(len(d)) if len(d) > 1 else 0.0


def equal_to_best(scores: dict) -> tuple[object, dict]:
    """The key of the best mean score and, for every key, (mean, paired difference to the best, its half-width,
    whether the difference is inside the noise: its 95% interval contains 0)."""
    best = max(scores, key=lambda k: scores[k].mean().item())
    out = {}
    for k, s in scores.items():
        diff, half = paired(s, scores[best])
        out[k] = {"mean": s.mean().item(), "diff": diff, "half": half, "tied": k == best or diff + half >= 0}
    return best, out


def differences(per_item: dict, names, reference: str, retentions, label: str) -> str:
    """Markdown: every method's paired difference to `reference` (per_item[(name, retention)]: per-input scores),
    then which methods differ from `label` beyond the noise at each retention."""
    out = ["| method | " + " | ".join(f"{100 * r:g}%" for r in retentions) + " |\n|---|"
           + "---|" * len(retentions) + "\n"]
    apart = {r: {"better": [], "worse": [], "equal": []} for r in retentions}
    for name in names:
        if name == reference:
            continue
        cells = []
        for r in retentions:
            diff, half = paired(per_item[name, r], per_item[reference, r])
            text = f"{100 * diff:+.1f} +- {100 * half:.1f}"
            cells.append(f"**{text}**" if abs(diff) > half else text)
            apart[r]["equal" if abs(diff) <= half else "better" if diff > 0 else "worse"].append(name)
        out.append(f"| {name} | {' | '.join(cells)} |\n")
    out.append(f"\nAgainst {label}, beyond the noise:\n")
    for r in retentions:
        out.append(f"- at {100 * r:g}%: better " + (", ".join(apart[r]["better"]) or "none") + "; worse "
                   + (", ".join(apart[r]["worse"]) or "none") + "; equal within the noise "
                   + (", ".join(apart[r]["equal"]) or "none") + ".\n")
    return "".join(out)


def fit(build: Callable[[], nn.Module], batch: Callable, loss: Callable, cfg: dict, log=print):
    """Train `build()` from fixed seeds with deterministic algorithms on `cfg["threads"]` threads: AdamW, linear
    warmup then cosine decay, gradient clipping. `batch(gen)` draws a training batch from the seeded generator,
    `loss(model, batch)` scores it; parameters that do not require grad stay as they are. Returns the model (in
    eval mode) and the seconds the loop took."""
    torch.manual_seed(cfg["seed"])
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(cfg["threads"])
    try:
        model = build()
        params = [p for p in model.parameters() if p.requires_grad]  # a fine-tuning may freeze some
        opt = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])

        def lr_factor(step):
            return min(1.0, (step + 1) / cfg["warmup"]) * 0.5 * (1 + math.cos(math.pi * step / cfg["steps"]))

        schedule = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
        gen = torch.Generator().manual_seed(cfg["seed"] + 1)
        model.train()
        start = time.perf_counter()
        for step in range(cfg["steps"]):
            value = loss(model, batch(gen))
            opt.zero_grad(set_to_none=True)
            value.backward()
            nn.utils.clip_grad_norm_(params, cfg["clip"])
            opt.step()
            schedule.step()
            if log and (step + 1) % 100 == 0:
                log(f"  step {step + 1}/{cfg['steps']}  loss {value.item():.3f}  {time.perf_counter() - start:.0f} s")
        model.eval()
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.set_num_threads(saved_threads)
    return model, round(time.perf_counter() - start, 1)


def save(model: nn.Module, config: dict, directory: Path) -> None:
    """A trained model's weights (model.safetensors) and `config` (config.json: task, model, training record)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, directory / "model.safetensors")
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def load(directory: Path, build: Callable[[dict], nn.Module]) -> tuple[nn.Module, dict]:
    """A model that `save` wrote: `build(config)` makes it and the weights fill it; in eval mode, with its config."""
    from safetensors.torch import load_file

    config = json.loads((directory / "config.json").read_text())
    model = build(config)
    model.load_state_dict(load_file(directory / "model.safetensors"))
    return model.eval(), config


def arguments(doc: str, model_dir: Path, results_dir: Path, results: str) -> argparse.ArgumentParser:
    """The command line of an accuracy benchmark: --retrain, --smoke, --model-dir, --out."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--retrain", action="store_true", help="train the model again and save it to --model-dir")
    parser.add_argument("--smoke", action="store_true", help="tiny run for the tests (seconds)")
    parser.add_argument("--model-dir", type=Path, default=model_dir)
    parser.add_argument("--out", type=Path, default=results_dir, help=f"where {results}.{{json,md,png}} go")
    return parser


def keeping_threads(run: Callable, argv):
    """`run(argv)`, the caller's torch thread count restored afterwards (the benchmarks set their own)."""
    threads = torch.get_num_threads()
    try:
        return run(argv)
    finally:
        torch.set_num_threads(threads)
