"""Serving video with vLLM on this CPU: unpruned vs EvoPrune in the tower vs vLLM's EVS after it.

A Qwen2.5-VL-shaped model with random weights (evoprune_ext.random_models: Qwen2.5-VL-3B's tower at real size,
32 blocks of width 1280 with windows, and a Qwen2-0.5B-sized LM), saved in bfloat16 under build/bench_models/,
served by vLLM's CPU build (one engine per setting, each in a subprocess of its own). Every request is one
--frames video at --side x --side pixels and a short question; the answer is --new-tokens tokens, greedy.

Per setting and concurrency (1: requests one after another; 8: eight in flight, `vllm.AsyncLLM`):
time to first token (median over requests, from submission, so processor time is in it), throughput (requests
per second of wall time; 2 x concurrency requests, or --sequential at 1), and the visual tokens the LM receives. Settings: unpruned; EvoPrune at keep 0.5 / 0.25
(`hf_overrides`, evoprune_ext.vllm); EVS with `video_pruning_rate = 1 - keep`, which keeps the same count when
every frame's share fits (EVS keeps at least one whole frame). Engines run in --rounds rounds, settings in turn,
and each figure is the median over the rounds.

    make bench-vllm                     # .venv-vllm; about 15 min
    .venv-vllm/bin/python bench/bench_vllm.py --frames 8 --side 224 --rounds 2
"""

import argparse
import asyncio
import json
import os
import runpy
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SITE = ROOT / ".ci" / "vllm-site"  # makes PyPI's torchvision import beside the CPU torch (docs/VLLM.md)
MODEL_DIR = ROOT / "build" / "bench_models" / "qwen2_5_vl_3b_tower"
ARCHITECTURE = "EvoPruneQwen2_5_VLForConditionalGeneration"
PROMPT = "USER : <|vision_start|><|video_pad|><|vision_end|> what happens in this video ASSISTANT :"


def settings(ratios: list[float]) -> list[dict]:
    """name, vLLM engine arguments."""
    out = [dict(name="unpruned", engine={})]
    for keep in ratios:
        out.append(dict(name=f"evoprune {keep}", engine=dict(hf_overrides={
            "architectures": [ARCHITECTURE], "evoprune": {"keep_ratio": keep}})))
    for keep in ratios:
        out.append(dict(name=f"evs {keep}", engine=dict(video_pruning_rate=1.0 - keep)))
    return out


def save_model(path: Path) -> None:
    import torch

    from evoprune_ext import random_models

    model, processor = random_models.qwen2_5_vl(tiny=False)
    model.to(torch.bfloat16).save_pretrained(path)
    processor.save_pretrained(path)


def video(frames: int, side: int, seed: int):
    """(frames [F, side, side, 3], metadata) as vLLM takes a Qwen video: 2 fps, not resampled."""
    import numpy as np

    rng = np.random.default_rng(seed)
    metadata = {"fps": 2.0, "duration": frames / 2.0, "total_num_frames": frames,
                "frames_indices": list(range(frames)), "video_backend": "opencv", "do_sample_frames": False}
    return rng.integers(0, 256, (frames, side, side, 3), dtype=np.uint8), metadata


async def serve(engine, requests: list, concurrency: int, new_tokens: int) -> dict:
    """Run `requests` with at most `concurrency` in flight: first-token latencies, wall time, prompt lengths."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    gate = asyncio.Semaphore(concurrency)
    latencies, prompts = [], []

    async def one(request):
        async with gate:
            start, first = time.perf_counter(), None
            async for output in engine.generate(request, params, request_id=uuid.uuid4().hex):
                if first is None and output.outputs[0].token_ids:
                    first = time.perf_counter() - start
            latencies.append(first)
            prompts.append(len(output.prompt_token_ids))

    start = time.perf_counter()
    await asyncio.gather(*(one(request) for request in requests))
    return dict(latencies=latencies, wall=time.perf_counter() - start, prompt_tokens=prompts)


def run_setting(args) -> None:
    """In the engine's subprocess: one setting, each concurrency; JSON to --out."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    setting = json.loads(args.setting)
    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(
        model=str(args.model), dtype="bfloat16", enforce_eager=True, max_model_len=4096, seed=0,
        limit_mm_per_prompt={"image": 0, "video": 1}, **setting["engine"]))
    seeds = iter(range(1_000_000))  # every request a new video: no encoder or prefix cache hits

    def requests(count: int) -> list[dict]:
        return [{"prompt": PROMPT, "multi_modal_data": {"video": [video(args.frames, args.side, next(seeds))]}}
                for _ in range(count)]

    async def measure():
        await serve(engine, requests(1), 1, args.new_tokens)  # warm-up
        return {c: await serve(engine, requests(args.sequential if c == 1 else 2 * c), c, args.new_tokens)
                for c in args.concurrency}

    try:
        results = asyncio.run(measure())
    finally:
        engine.shutdown()
    Path(args.out).write_text(json.dumps({str(c): r for c, r in results.items()}))


def run_round(args, setting: dict, out: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SITE), str(ROOT), os.environ.get("PYTHONPATH", "")]),
               VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"))
    command = [sys.executable, __file__, "--run", "--setting", json.dumps(setting), "--out", str(out),
               "--model", str(args.model), "--frames", str(args.frames), "--side", str(args.side),
               "--new-tokens", str(args.new_tokens), "--sequential", str(args.sequential),
               "--concurrency", ",".join(map(str, args.concurrency))]
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL if not args.verbose else None,
                   stderr=subprocess.DEVNULL if not args.verbose else None)
    return json.loads(out.read_text())


def summarize(rounds: list[dict], concurrency: int) -> dict:
    runs = [r[str(concurrency)] for r in rounds]
    return dict(
        ttft_ms=statistics.median(statistics.median(r["latencies"]) for r in runs) * 1000,
        requests_per_s=statistics.median(len(r["latencies"]) / r["wall"] for r in runs),
        prompt_tokens=statistics.median(t for r in runs for t in r["prompt_tokens"]),
    )


def table(rows: list[dict], concurrency: list[int]) -> str:
    """Markdown: per setting and concurrency, TTFT (and its speedup over unpruned), requests/s (and its ratio),
    and for EvoPrune how many times lower its TTFT is than EVS's at the same keep ratio."""
    base = next(r for r in rows if r["setting"] == "unpruned")
    evs = {r["setting"].split()[1]: r for r in rows if r["setting"].startswith("evs")}
    head = ["setting", "LM prompt tokens"]
    for c in concurrency:
        head += [f"TTFT ms @{c}", f"req/s @{c}", f"TTFT vs EVS @{c}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        keep = row["setting"].split()[-1]
        rival = evs.get(keep) if row["setting"].startswith("evoprune") else None
        cells = [row["setting"], f"{row[str(concurrency[0])]['prompt_tokens']:.0f}"]
        for c in map(str, concurrency):
            cell, unpruned = row[c], base[c]
            cells += [f"{cell['ttft_ms']:.0f} ({unpruned['ttft_ms'] / cell['ttft_ms']:.2f}x)",
                      f"{cell['requests_per_s']:.3f} ({cell['requests_per_s'] / unpruned['requests_per_s']:.2f}x)",
                      f"{rival[c]['ttft_ms'] / cell['ttft_ms']:.2f}x" if rival else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--side", type=int, default=224)
    parser.add_argument("--ratios", default="0.5,0.25")
    parser.add_argument("--concurrency", default="1,8")
    parser.add_argument("--sequential", type=int, default=3, help="requests at concurrency 1")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--model", type=Path, default=MODEL_DIR)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "vllm_video.json"))
    parser.add_argument("--verbose", action="store_true", help="show the engines' logs")
    parser.add_argument("--run", action="store_true", help=argparse.SUPPRESS)  # inside an engine's subprocess
    parser.add_argument("--setting", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    if args.run:
        return run_setting(args)

    if not (args.model / "config.json").exists():
        runpy.run_path(str(SITE / "sitecustomize.py"))  # the processor imports torchvision
        print(f"saving the random model to {args.model}", flush=True)
        save_model(args.model)
    plan = settings([float(r) for r in args.ratios.split(",")])
    measured = {s["name"]: [] for s in plan}
    scratch = Path(args.out).with_suffix(".round.json")
    for round_index in range(args.rounds):
        for setting in plan:
            start = time.perf_counter()
            measured[setting["name"]].append(run_round(args, setting, scratch))
            print(f"round {round_index + 1}/{args.rounds} {setting['name']}: {time.perf_counter() - start:.0f} s",
                  flush=True)
    scratch.unlink(missing_ok=True)
    rows = [dict(setting=name, **{str(c): summarize(rounds, c) for c in args.concurrency})
            for name, rounds in measured.items()]
    record = dict(frames=args.frames, side=args.side, new_tokens=args.new_tokens, rounds=args.rounds,
                  sequential=args.sequential, cpus=os.cpu_count(), rows=rows, raw=measured)
    Path(args.out).write_text(json.dumps(record, indent=1))
    print(table(rows, args.concurrency))


if __name__ == "__main__":
    main()
