"""GPU benchmark (`make gpu-check`, docs/CUDA.md): CUDA events, medians, one JSON and one markdown table.

1. Each op at the shapes S1-S5 of bench_ops.py (float32), plus `select` at N = 4096, B = 64, K = 1024.
2. The time per greedy step: select at two keep counts on the same similarity path, the difference divided by
   the difference in picks (the unit vectors and the GEMM cancel out).
3. The encoder forward of CLIP-L/336 and SigLIP-so400m-384 (random weights, bfloat16, SDPA) at B = 1 and 32:
   unpruned and at keep 0.5 / 0.25 with the default schedule, its speedup against the FLOP ideal, and the
   share of the forward spent in the pruning steps (CUDA events around each step, summed).

    python bench/bench_gpu.py [--quick] [--out DIR]   # DIR defaults to $OUT, else bench/results/

Without a GPU it says so and exits 0. It measures and never asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import evoprune_ext  # noqa: E402
from bench_encoder import ENCODERS, build, encoder_flops, tokens_per_layer  # noqa: E402
from bench_ops import SHAPES, Shape, make_inputs  # noqa: E402
from evoprune_ext.pruning import evoprune_step  # noqa: E402
from evoprune_ext.schedule import default_layers, schedule_keeps  # noqa: E402

ops = torch.ops.evoprune
TARGET = Shape("select N=4096 B=64 K=1024", 64, 4096, 64, 64, 1024)


def cuda_ms(fn, *, repeats: int, warmup: int = 2) -> float:
    """Median milliseconds of fn() between two CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def bench_ops(shapes: list[Shape], repeats: int) -> list[dict]:
    rows = []
    for shape in shapes:
        tokens, attn, metric = make_inputs(shape, "cuda")
        m = tokens if metric is None else metric
        importance = ops.importance(attn) if attn.dim() == 4 else attn
        index, slot = ops.select(m, importance, keep=shape.keep, protect=shape.protect)
        q = k = m[:, None]  # one head of the metric as queries and keys
        calls = {
            "prune": lambda: ops.prune(tokens, attn, keep=shape.keep, metric=metric, protect=shape.protect),
            "select": lambda: ops.select(m, importance, keep=shape.keep, protect=shape.protect),
            "merge": lambda: ops.merge(tokens, index, slot),
            "importance_from_qk": lambda: ops.importance_from_qk(q, k, 0.125),
        }
        if attn.dim() == 4:
            calls["importance"] = lambda: ops.importance(attn)
        for op, call in calls.items():
            rows.append(dict(shape=shape.name, op=op, median_ms=cuda_ms(call, repeats=repeats)))
    return rows


def bench_greedy_steps(repeats: int) -> list[dict]:
    rows = []
    for batch in (1, 32):
        for n in (577, 1024, 4096):
            metric = torch.randn(batch, n, 64, device="cuda")
            # Both keep counts take the similarity-matrix path (picks * 16 >= N), so only the steps differ.
            few, many = n // 16 + 1, n // 4
            t_few = cuda_ms(lambda: ops.select(metric, None, keep=few), repeats=repeats)
            t_many = cuda_ms(lambda: ops.select(metric, None, keep=many), repeats=repeats)
            rows.append(dict(batch=batch, tokens=n, steps=many - few,
                             us_per_step=1e3 * (t_many - t_few) / (many - few)))
    return rows


def build_encoder(name: str):
    family, config = ENCODERS[name]
    return family, config, build(family, config).to("cuda", torch.bfloat16)


class EventStep:
    """The default pruning step between two CUDA events, so its GPU time can be summed after the pass."""

    def __init__(self):
        self.events = []

    def __call__(self, *args, **kwargs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        result = evoprune_step(*args, **kwargs)
        end.record()
        self.events.append((start, end))
        return result

    def milliseconds(self) -> float:
        return sum(start.elapsed_time(end) for start, end in self.events)


def bench_encoders(names: list[str], batches: list[int], ratios: list[float], repeats: int) -> list[dict]:
    rows = []
    for name in names:
        family, config, model = build_encoder(name)
        protect = 1 if family == "clip" else 0
        tokens = (config["image_size"] // config["patch_size"]) ** 2 + protect
        num_layers = config["num_hidden_layers"]
        layers = default_layers(num_layers)
        base_flops = encoder_flops(config, family, tokens_per_layer(num_layers, tokens))
        for batch in batches:
            pixels = torch.randn(batch, 3, config["image_size"], config["image_size"], device="cuda",
                                 dtype=torch.bfloat16)
            with torch.inference_mode():
                base = cuda_ms(lambda: model(pixel_values=pixels), repeats=repeats)
                rows.append(dict(encoder=name, batch=batch, ratio=1.0, tokens=tokens, median_ms=base, speedup=1.0,
                                 ideal=1.0, ops_share=0.0))
                for ratio in ratios:
                    keeps = schedule_keeps(tokens, protect, ratio, len(layers))
                    flops = encoder_flops(config, family, tokens_per_layer(num_layers, tokens, layers, keeps))
                    step = EventStep()
                    evoprune_ext.patch(model, keep_ratio=ratio, layers=layers, step=step)
                    try:
                        median = cuda_ms(lambda: model(pixel_values=pixels), repeats=repeats)
                        step.events.clear()
                        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                        start.record()
                        model(pixel_values=pixels)
                        end.record()
                        torch.cuda.synchronize()
                        share = step.milliseconds() / start.elapsed_time(end)
                    finally:
                        evoprune_ext.unpatch(model)
                    rows.append(dict(encoder=name, batch=batch, ratio=ratio, tokens=keeps[-1], median_ms=median,
                                     speedup=base / median, ideal=base_flops / flops, ops_share=share))
        del model
        torch.cuda.empty_cache()
    return rows


def markdown(result: dict) -> str:
    lines = [f"GPU: {result['device']}; torch {result['torch']}; evoprune_ext {result['build']['version']}", "",
             "| shape | op | median ms |", "| --- | --- | --- |"]
    lines += [f"| {r['shape']} | {r['op']} | {r['median_ms']:.3f} |" for r in result["ops"]]
    lines += ["", "| B | N | greedy steps | us per step |", "| --- | --- | --- | --- |"]
    lines += [f"| {r['batch']} | {r['tokens']} | {r['steps']} | {r['us_per_step']:.3f} |" for r in result["greedy"]]
    lines += ["", "| encoder (bf16) | B | keep | tokens out | median ms | speedup | FLOP ideal | ops share |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['encoder']} | {r['batch']} | {r['ratio']:g} | {r['tokens']} | {r['median_ms']:.2f} | "
              f"{r['speedup']:.2f}x | {r['ideal']:.2f}x | {100 * r['ops_share']:.1f}% |" for r in result["encoders"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one small shape, few repeats (seconds)")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() or not evoprune_ext.build_info()["cuda"]:
        print("bench_gpu: no CUDA GPU or a CPU-only build of evoprune_ext: nothing to measure")
        return 0

    repeats = 3 if args.quick else 20
    shapes = [SHAPES["S1"]] if args.quick else [*(SHAPES[s] for s in ("S1", "S2", "S3", "S4", "S5")), TARGET]
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, build=evoprune_ext.build_info())
    result["ops"] = bench_ops(shapes, repeats)
    result["greedy"] = bench_greedy_steps(repeats)
    encoders = ["clip-l-336"] if args.quick else ["clip-l-336", "siglip-so400m-384"]
    result["encoders"] = bench_encoders(encoders, [1] if args.quick else [1, 32], [0.5, 0.25],
                                        repeats=3 if args.quick else 10)
    table = markdown(result)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_gpu.json").write_text(json.dumps(result, indent=1, default=str))
    (out / "bench_gpu.md").write_text(table)
    print(table)
    print(f"bench_gpu: wrote {out / 'bench_gpu.json'} and {out / 'bench_gpu.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
