"""End-to-end encoder time: unpatched vs EvoPrune vs ToMe at the same layers and final token counts.

A CLIP ViT-L/14-336-sized encoder (LLaVA-1.5's tower: 24 layers, 577 tokens) and a SigLIP-so400m-384-sized
one (LLaVA-OneVision's: 27 layers, 729 tokens), random weights (timing does not depend on them), float32,
SDPA attention, on this CPU. For each final keep ratio the encoder is patched with `evoprune_ext.patch`
(the default schedule unless --layers), and again with ToMe (bench/peers.py) as its `step=`, so both prune
at the same layers to the same counts. Reported per setting:
- median (min-max) of --repeats forward passes in one process, after --warmup passes;
- measured speedup over the unpatched encoder, next to the FLOP-count ideal (attention and MLP FLOPs of every
  layer from the schedule's token counts; the pruning work itself counts zero there), and their ratio;
- "in step": share of the forward spent inside the pruning step (wrapped with perf_counter);
- "in ops": share spent inside torch.ops.evoprune.* (importance_from_qk and prune), from one profiled pass.

    python bench/bench_encoder.py                   # both encoders, ratios 0.75 0.5 0.25 (a few minutes)
    python bench/bench_encoder.py --quick           # seconds: a small config, for the tests
    python bench/bench_encoder.py --json results/encoder.json
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import PEERS  # noqa: E402  (bench/peers.py)

# name -> (family, config); the sizes of LLaVA-1.5's and LLaVA-OneVision's towers, and a small one for --quick.
ENCODERS = {
    "clip-l-336": ("clip", dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                num_attention_heads=16, image_size=336, patch_size=14)),
    "siglip-so400m-384": ("siglip", dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                                         num_attention_heads=16, image_size=384, patch_size=14)),
    "clip-tiny": ("clip", dict(hidden_size=128, intermediate_size=512, num_hidden_layers=6,
                               num_attention_heads=4, image_size=96, patch_size=8)),
}


def build(family: str, config: dict):
    import transformers

    if family == "clip":
        cfg, cls = transformers.CLIPVisionConfig(**config), transformers.CLIPVisionModel
    else:
        cfg, cls = transformers.SiglipVisionConfig(**config), transformers.SiglipVisionModel
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return cls(cfg).eval()


def encoder_flops(config: dict, family: str, tokens_per_layer: list[tuple[int, int]]) -> float:
    """FLOPs (2 per multiply-add) of the patch embedding, every layer's attention on its input tokens and MLP
    on its output tokens, and SigLIP's pooling head (keys and values of the final tokens)."""
    d, inner = config["hidden_size"], config["intermediate_size"]
    patches = (config["image_size"] // config["patch_size"]) ** 2
    flops = 2 * patches * 3 * config["patch_size"] ** 2 * d
    for n_in, n_out in tokens_per_layer:
        flops += 8 * n_in * d * d + 4 * n_in * n_in * d  # q, k, v, out projections; q.k and attention x v
        flops += 4 * n_out * d * inner  # two MLP matrices
    if family == "siglip":
        flops += 4 * tokens_per_layer[-1][1] * d * d
    return flops


def tokens_per_layer(num_layers: int, tokens: int, layers=None, keeps=None) -> list[tuple[int, int]]:
    """(input, output) token count of every layer; a scheduled layer prunes between its attention and MLP."""
    schedule = dict(zip(layers or [], keeps or []))
    counts = []
    for layer in range(num_layers):
        out = schedule.get(layer, tokens)
        counts.append((tokens, out))
        tokens = out
    return counts


class TimedStep:
    """Wraps a pruning step and adds up the seconds spent in it."""

    def __init__(self, step):
        self.step, self.seconds = step, 0.0

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        result = self.step(*args, **kwargs)
        self.seconds += time.perf_counter() - start
        return result


def time_forward(model, pixels, *, warmup: int, repeats: int, timed: TimedStep | None):
    """Seconds of each of `repeats` passes and the mean share of them spent in the step."""
    with torch.inference_mode():
        for _ in range(warmup):
            model(pixel_values=pixels)
        times, shares = [], []
        for _ in range(repeats):
            if timed:
                timed.seconds = 0.0
            start = time.perf_counter()
            model(pixel_values=pixels)
            times.append(time.perf_counter() - start)
            shares.append(timed.seconds / times[-1] if timed else 0.0)
    return times, statistics.mean(shares)


def ops_share(model, pixels, passes: int = 3) -> float:
    """Share of a profiled pass spent in top-level torch.ops.evoprune.* calls: the median of `passes` passes
    (one pass caught in a busy moment of a shared machine would give the share of that moment)."""
    return statistics.median(_ops_share_of_one_pass(model, pixels) for _ in range(passes))


def _ops_share_of_one_pass(model, pixels) -> float:
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        model(pixel_values=pixels)
        wall = time.perf_counter() - start

    def ours(event):
        return event.name.startswith("evoprune::")

    def nested(event):
        parent = event.cpu_parent
        while parent is not None:
            if ours(parent):
                return True
            parent = parent.cpu_parent
        return False

    inside = sum(e.cpu_time_total for e in prof.events() if ours(e) and not nested(e)) * 1e-6
    return inside / wall


def bench_encoder(name: str, *, ratios, batch: int, warmup: int, repeats: int, layers=None, log=print) -> list[dict]:
    import evoprune_ext
    from evoprune_ext.pruning import evoprune_step
    from evoprune_ext.schedule import default_layers, schedule_keeps

    family, config = ENCODERS[name]
    model = build(family, config)
    protect = 1 if family == "clip" else 0
    patches = (config["image_size"] // config["patch_size"]) ** 2
    tokens, num_layers = patches + protect, config["num_hidden_layers"]
    layers = default_layers(num_layers) if layers is None else layers
    pixels = torch.randn(batch, 3, config["image_size"], config["image_size"])

    base_flops = encoder_flops(config, family, tokens_per_layer(num_layers, tokens))
    times, _ = time_forward(model, pixels, warmup=warmup, repeats=repeats, timed=None)
    base = statistics.median(times)
    rows = [dict(encoder=name, method="unpatched", ratio=1.0, tokens=tokens, layers=[], median_ms=1e3 * base,
                 min_ms=1e3 * min(times), max_ms=1e3 * max(times), speedup=1.0, ideal=1.0, step_share=0.0,
                 ops_share=0.0)]
    if log:
        log(f"  {name} unpatched: {1e3 * base:.1f} ms")
    for ratio in ratios:
        keeps = schedule_keeps(tokens, protect, ratio, len(layers))
        flops = encoder_flops(config, family, tokens_per_layer(num_layers, tokens, layers, keeps))
        for method, step in (("evoprune", evoprune_step), ("tome", PEERS["tome"])):
            timed = TimedStep(step)
            evoprune_ext.patch(model, keep_ratio=ratio, layers=layers, step=timed)
            try:
                times, step_share = time_forward(model, pixels, warmup=warmup, repeats=repeats, timed=timed)
                share = ops_share(model, pixels)
            finally:
                evoprune_ext.unpatch(model)
            median = statistics.median(times)
            rows.append(dict(encoder=name, method=method, ratio=ratio, tokens=keeps[-1], layers=layers,
                             median_ms=1e3 * median, min_ms=1e3 * min(times), max_ms=1e3 * max(times),
                             speedup=base / median, ideal=base_flops / flops, step_share=step_share,
                             ops_share=share))
            if log:
                log(f"  {name} {method} {ratio:g}: {1e3 * median:.1f} ms, {base / median:.2f}x "
                    f"(ideal {base_flops / flops:.2f}x)")
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| encoder | method | keep ratio | tokens out | layers | ms median (min-max) | speedup | FLOP ideal "
             "| speedup / ideal | in step | in ops |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['encoder']} | {r['method']} | {r['ratio']:g} | {r['tokens']} | {r['layers'] or '-'} | "
            f"{r['median_ms']:.1f} ({r['min_ms']:.1f}-{r['max_ms']:.1f}) | {r['speedup']:.2f}x | {r['ideal']:.2f}x | "
            f"{100 * r['speedup'] / r['ideal']:.0f}% | {100 * r['step_share']:.1f}% | {100 * r['ops_share']:.1f}% |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small config, few repeats (seconds), for the tests")
    parser.add_argument("--encoders", default="clip-l-336,siglip-so400m-384",
                        help=f"comma-separated names of {list(ENCODERS)}")
    parser.add_argument("--ratios", default="0.75,0.5,0.25", help="final keep ratios")
    parser.add_argument("--layers", default=None, help="comma-separated pruning layers (default: the wrapper's)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's)")
    parser.add_argument("--json", type=Path, default=None, help="write the rows here")
    args = parser.parse_args(argv)
    if args.quick:
        args.encoders, args.ratios, args.warmup, args.repeats = "clip-tiny", "0.5,0.25", 1, 3
    layers = [int(x) for x in args.layers.split(",")] if args.layers else None
    ratios = [float(x) for x in args.ratios.split(",")]

    import evoprune_ext

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    info = evoprune_ext.build_info()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, evoprune_ext {info.get('version')}, "
          f"batch {args.batch}, float32, sdpa, median of {args.repeats} after {args.warmup} warm-up; "
          f"load average {load} on {os.cpu_count()} CPUs (other jobs skew the times)")
    rows = []
    for name in args.encoders.split(","):
        rows += bench_encoder(name, ratios=ratios, batch=args.batch, warmup=args.warmup, repeats=args.repeats,
                              layers=layers)
    print()
    print(markdown(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        record = {"threads": torch.get_num_threads(), "batch": args.batch, "load_average": os.getloadavg(),
                  "rows": rows}
        args.json.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {args.json}")
    return rows


if __name__ == "__main__":
    main()
