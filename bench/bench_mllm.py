"""End to end: a multimodal LLM answering with fewer visual tokens, unpatched vs EvoPrune vs the peers.

Random-weight models at real shapes (evoprune_ext.random_models), float32, SDPA, batch 1, on this CPU:
- llava-1.5: CLIP-L/336 tower + a Llama LM with Qwen2-0.5B's sizes, one 336 x 336 image;
- onevision-0.5b: LLaVA-OneVision-0.5B (SigLIP-so400m/384 + Qwen2-0.5B) on a --frames video. Unpatched, each
  frame's 729 tokens are pooled 2 x 2 to 196; patched, EvoPrune replaces the pooling and keeps
  round(729 * keep_ratio) per frame (196 / 729 = 0.269 is the unpatched budget);
- qwen2.5-vl-image / -video: Qwen2.5-VL-3B's tower (32 blocks, width 1280, windows) + a Qwen2-0.5B-sized M-RoPE
  LM, on a 448 x 448 image (256 merge units) and a --frames video at 336 x 336 (144 units per 2 frames).
Per setting: visual tokens into the LM; encoder ms (tower + projector); prefill ms (the LM on the prompt);
time to first token (`generate(max_new_tokens=1)`) and time for --new-tokens tokens; medians of --repeats runs
in one process, the settings interleaved run by run. Speedups are over the unpatched model; "ideal" is the FLOP
count's (tower layers from the pruning schedule, LM prefill with causal attention), "of ideal" their ratio.
Peers: bench/peers.py steps at EvoPrune's layers and counts ("in encoder"), and VisionZip / DivPrune once at the
tower's output layer ("after encoder": the whole tower runs unpruned, only the LM saves). Qwen's packed tower takes
no custom step: its "after encoder" row is EvoPrune once in the last block, the count vLLM's EVS would keep.

Prompts are built with as many placeholders as the model produces features (the processors' counts are tested
in python_tests/test_mllm.py), so the benchmark needs no processor.

    python bench/bench_mllm.py                 # every model, keep 1 / 0.5 / 0.25 and peers at 0.25 (long)
    python bench/bench_mllm.py --quick         # seconds: tiny models, for the tests
    python bench/bench_mllm.py --models onevision-0.5b,qwen2.5-vl-video --frames 16 --budgets frame,clip \
        --ratios 0.25,0.125,0.0625 --peers-at -1   # video: per-frame vs one budget per clip
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
from bench_encoder import encoder_flops, tokens_per_layer  # noqa: E402
from peers import PEERS  # noqa: E402

# name -> (random_models builder, visual input); the Qwen tower runs at Qwen2.5-VL-3B's size with a 0.5B LM.
MODELS = {
    "llava-1.5": ("llava", "image"),
    "onevision-0.5b": ("llava_onevision", "video"),
    "qwen2.5-vl-image": ("qwen2_5_vl", "image"),
    "qwen2.5-vl-video": ("qwen2_5_vl", "video"),
}
IN_ENCODER_PEERS = ("tome", "divprune", "visionzip", "topk")
AFTER_ENCODER_PEERS = ("visionzip", "divprune")
PROMPT_TOKENS = 24  # text around the visual tokens
QWEN_SIDES = {"image": 448, "video": 336}  # pixels a side; the tiny model (2-pixel patches) takes 1/7 of them


def build(name: str, quick: bool):
    from evoprune_ext import random_models

    model, _ = getattr(random_models, MODELS[name][0])(tiny=quick)
    return model


def is_qwen(name: str) -> bool:
    return MODELS[name][0] == "qwen2_5_vl"


def visual_inputs(model, name: str, frames: int) -> dict:
    vision = model.config.vision_config
    kind = MODELS[name][1]
    if is_qwen(name):
        # Flattened patches, as the Qwen processor makes them: [t * h * w, 3 * 2 * patch * patch].
        side = QWEN_SIDES[kind] * vision.patch_size // 14 // vision.patch_size
        grid = torch.tensor([[1 if kind == "image" else frames // 2, side, side]])
        pixels = torch.randn(int(grid.prod()), 3 * 2 * vision.patch_size ** 2)
        if kind == "image":
            return dict(pixel_values=pixels, image_grid_thw=grid)
        return dict(pixel_values_videos=pixels, video_grid_thw=grid)
    size = vision.image_size
    if kind == "image":
        return dict(pixel_values=torch.randn(1, 3, size, size))
    return dict(pixel_values_videos=torch.randn(1, frames, 3, size, size))


def features(model, inputs: dict) -> torch.Tensor:
    """[tokens, D]: what the LM receives in place of the placeholders."""
    grid = {k: v for k, v in inputs.items() if k.endswith("grid_thw")}
    if "pixel_values" in inputs:
        return torch.cat(list(model.model.get_image_features(inputs["pixel_values"], **grid).pooler_output))
    return torch.cat(list(model.model.get_video_features(inputs["pixel_values_videos"], **grid).pooler_output))


def prompt(model, inputs: dict, visual_tokens: int) -> dict:
    """input_ids: PROMPT_TOKENS / 2 text tokens, the placeholders (between Qwen's vision start and end tokens),
    PROMPT_TOKENS / 2 text tokens."""
    config = model.config
    image = "pixel_values" in inputs
    placeholder = config.image_token_id if image else config.video_token_id
    text = torch.randint(30, 40, (PROMPT_TOKENS,))
    visual = torch.full((visual_tokens,), placeholder)
    qwen = hasattr(config, "vision_start_token_id")
    if qwen:
        visual = torch.cat([torch.tensor([config.vision_start_token_id]), visual,
                            torch.tensor([config.vision_end_token_id])])
    ids = torch.cat([text[: PROMPT_TOKENS // 2], visual, text[PROMPT_TOKENS // 2:]])[None]
    extra = dict(mm_token_type_ids=(ids == placeholder).int() * (1 if image else 2)) if qwen else {}
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), **extra, **inputs)


def lm_prefill_flops(text_config, tokens: int) -> float:
    d, layers, inner = text_config.hidden_size, text_config.num_hidden_layers, text_config.intermediate_size
    kv = d * text_config.num_key_value_heads // text_config.num_attention_heads
    per_token = 2 * (2 * d * d + 2 * d * kv + 3 * d * inner)
    return layers * (tokens * per_token + 2 * tokens * tokens * d)  # causal q.k and attention x v


def setting_flops(model, name: str, frames: int, steps: list[tuple[int, int]], visual_tokens: int) -> float:
    """FLOPs of the tower (pruning `steps`: (layer, tokens per crop, or units per frame, after it)) and of the LM
    prefill."""
    vision = model.config.vision_config
    lm = lm_prefill_flops(model.config.text_config, visual_tokens + PROMPT_TOKENS)
    if is_qwen(name):
        return qwen_tower_flops(vision, visual_inputs(model, name, frames), steps) + lm
    config = dict(hidden_size=vision.hidden_size, intermediate_size=vision.intermediate_size,
                  image_size=vision.image_size, patch_size=vision.patch_size)
    family = "clip" if name == "llava-1.5" else "siglip"
    tokens_in = (vision.image_size // vision.patch_size) ** 2 + (family == "clip")
    schedule = tokens_per_layer(vision.num_hidden_layers, tokens_in, [s[0] for s in steps], [s[1] for s in steps])
    crops = 1 if name == "llava-1.5" else frames
    per_crop = encoder_flops(config, family, schedule) - (4 * schedule[-1][1] * vision.hidden_size ** 2
                                                          if family == "siglip" else 0)  # no pooling head here
    return crops * per_crop + lm


def qwen_tower_flops(vision, inputs: dict, steps: list[tuple[int, int]]) -> float:
    """Qwen2.5-VL tower FLOPs per frame: fused qkv and output projections, attention within the frame (full
    blocks) or within windows of 8 x 8 patches (thinned in proportion once pruned: an approximation), the SwiGLU
    MLP on the tokens left after the step, and the 2x2 merger."""
    d, inner = vision.hidden_size, vision.intermediate_size
    t, h, w = next(v for k, v in inputs.items() if k.endswith("grid_thw"))[0].tolist()
    tokens = h * w
    window = min(tokens, (vision.window_size // vision.patch_size) ** 2)
    after = {layer: 4 * units for layer, units in steps}
    flops = 2 * tokens * 3 * 2 * vision.patch_size ** 2 * d  # patch embedding
    for layer in range(vision.depth):
        segment = tokens if layer in vision.fullatt_block_indexes else window * tokens / (h * w)
        out = after.get(layer, tokens)
        flops += 8 * tokens * d * d + 4 * tokens * segment * d + 6 * out * d * inner
        tokens = out
    return t * (flops + tokens / 4 * 2 * (16 * d * d + 4 * d * vision.out_hidden_size))


def settings(model, name: str, ratios, peers_at: float | None, peers=IN_ENCODER_PEERS, after=AFTER_ENCODER_PEERS,
             budgets=("frame",)):
    """(label, method, where, keep_ratio, patch kwargs or None for unpatched). `budgets`: EvoPrune's on videos
    (images are one frame: the frame budget only)."""
    out = [("unpatched", "unpatched", "-", 1.0, None)]
    budgets = budgets if MODELS[name][1] == "video" else ("frame",)
    out += [(f"evoprune {r:g}" + (f" {budget}" if len(budgets) > 1 else ""), "evoprune", "in encoder", r,
             dict(keep_ratio=r, budget=budget)) for r in ratios if r < 1 for budget in budgets]
    if peers_at is None:
        return out
    if is_qwen(name):
        # The packed tower takes no custom step. After the encoder (as vLLM's EVS keeps a count after the
        # tower): EvoPrune itself, once, in the last block.
        last = model.config.vision_config.depth - 1
        return out + [(f"evoprune after {peers_at:g}", "evoprune", "after encoder", peers_at,
                       dict(keep_ratio=peers_at, layers=[last]))]
    num_layers = model.config.vision_config.num_hidden_layers
    out += [(f"{p} {peers_at:g}", p, "in encoder", peers_at, dict(keep_ratio=peers_at, step=PEERS[p]))
            for p in peers]
    # The last layer whose output the LM reads (hidden_states[vision_feature_layer]).
    last = model.config.vision_feature_layer % (num_layers + 1) - 1
    return out + [(f"{p} after {peers_at:g}", p, "after encoder", peers_at,
                   dict(keep_ratio=peers_at, step=PEERS[p], layers=[last])) for p in after]


def pruning_steps(model, inputs: dict) -> list[tuple[int, float]]:
    """(layer, tokens per crop, or units per frame, after it) of the patched model's pruning steps; under the clip
    budget, a video's count over its frames (the FLOPs are nearly linear in it)."""
    state = getattr(model, "evoprune_state", None)
    if state is None:
        return []
    if hasattr(state, "steps"):  # CLIP / SigLIP towers record the last pass's steps
        return [(step.layer, step.sizes.shape[1] / (state.frames or 1)) for step in state.steps]
    grid = next(v for k, v in inputs.items() if k.endswith("grid_thw"))[0].tolist()
    pools = len(state.pools([grid]))
    return [(layer, sum(keeps) / (grid[0] if pools == 1 else pools)) for layer, keeps in state.keeps([grid]).items()]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_model(name: str, *, ratios, peers_at, peers, after, frames: int, new_tokens: int, repeats: int, quick: bool,
                budgets=("frame",), log=print):
    import evoprune_ext

    model = build(name, quick)
    inputs = visual_inputs(model, name, frames)
    prepared = []
    for label, method, where, ratio, kwargs in settings(model, name, ratios, peers_at, peers, after, budgets):
        evoprune_ext.unpatch(model)
        if kwargs is not None:
            evoprune_ext.patch(model, **kwargs)
        with torch.inference_mode():
            visual = features(model, inputs)  # also the warm-up
        prepared.append(dict(model=name, label=label, method=method, where=where, ratio=ratio, kwargs=kwargs,
                             visual_tokens=len(visual), prompt=prompt(model, inputs, len(visual)),
                             flops=setting_flops(model, name, frames, pruning_steps(model, inputs), len(visual))))
    evoprune_ext.unpatch(model)

    times = {s["label"]: {"encoder": [], "prefill": [], "ttft": [], "generate": []} for s in prepared}
    for run in range(repeats):
        for s in prepared:  # interleaved: machine noise hits every setting alike
            evoprune_ext.unpatch(model)
            if s["kwargs"] is not None:
                evoprune_ext.patch(model, **s["kwargs"])
            t = times[s["label"]]
            with torch.inference_mode():
                t["encoder"].append(timed(lambda: features(model, inputs)))
                embeds = model.get_input_embeddings()(s["prompt"]["input_ids"])
                t["prefill"].append(timed(lambda: model.model.language_model(inputs_embeds=embeds)))
                t["ttft"].append(timed(lambda: model.generate(**s["prompt"], max_new_tokens=1, do_sample=False)))
                t["generate"].append(timed(lambda: model.generate(
                    **s["prompt"], max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)))
        if log:
            log(f"  {name}: run {run + 1}/{repeats} done")
    evoprune_ext.unpatch(model)

    rows = []
    base = prepared[0]
    for s in prepared:
        medians = {k: 1e3 * statistics.median(v) for k, v in times[s["label"]].items()}
        row = dict(model=name, setting=s["label"], method=s["method"], where=s["where"], ratio=s["ratio"],
                   visual_tokens=s["visual_tokens"], ideal=base["flops"] / s["flops"], **{f"{k}_ms": v for k, v in
                                                                                       medians.items()})
        rows.append(row)
    for row in rows:
        for k in ("encoder", "prefill", "ttft", "generate"):
            row[f"{k}_speedup"] = rows[0][f"{k}_ms"] / row[f"{k}_ms"]
    return rows


def markdown(rows: list[dict], new_tokens: int) -> str:
    lines = [f"| model | setting | where | visual tokens | encoder ms | prefill ms | TTFT ms | TTFT speedup | "
             f"FLOP ideal | of ideal | {new_tokens} tokens ms | speedup |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['setting']} | {r['where']} | {r['visual_tokens']} | "
            f"{r['encoder_ms']:.0f} ({r['encoder_speedup']:.2f}x) | "
            f"{r['prefill_ms']:.0f} ({r['prefill_speedup']:.2f}x) | "
            f"{r['ttft_ms']:.0f} | {r['ttft_speedup']:.2f}x | {r['ideal']:.2f}x | "
            f"{100 * r['ttft_speedup'] / r['ideal']:.0f}% | {r['generate_ms']:.0f} | {r['generate_speedup']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny models, 1 repeat (seconds), for the tests")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated names of {list(MODELS)}")
    parser.add_argument("--ratios", default="0.5,0.25", help="keep ratios besides the unpatched model")
    parser.add_argument("--peers-at", type=float, default=0.25, help="keep ratio of the peers (negative: none)")
    parser.add_argument("--peers", default=",".join(IN_ENCODER_PEERS), help="peers run in the encoder")
    parser.add_argument("--after", default=",".join(AFTER_ENCODER_PEERS), help="peers run after the encoder")
    parser.add_argument("--frames", type=int, default=8, help="frames of the videos")
    parser.add_argument("--budgets", default="frame", help="EvoPrune's budgets on videos: frame, clip or both")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None, help="write the rows here")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.new_tokens, args.frames = 1, 2, 2
    ratios = [float(x) for x in args.ratios.split(",")]
    peers_at = args.peers_at if args.peers_at > 0 else None

    import evoprune_ext

    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, evoprune_ext "
          f"{evoprune_ext.build_info().get('version')}, float32, sdpa, batch 1, median of {args.repeats}; "
          f"load average {load} on {os.cpu_count()} CPUs")
    torch.manual_seed(0)
    rows = []
    for name in args.models.split(","):
        rows += bench_model(name, ratios=ratios, peers_at=peers_at, peers=[p for p in args.peers.split(",") if p],
                            after=[p for p in args.after.split(",") if p], frames=args.frames,
                            new_tokens=args.new_tokens, repeats=args.repeats, quick=args.quick,
                            budgets=tuple(args.budgets.split(",")))
        table = markdown(rows, args.new_tokens)
        if args.json:  # after every model: a long run that is cut short keeps what it measured
            args.json.parent.mkdir(parents=True, exist_ok=True)
            record = {"threads": torch.get_num_threads(), "frames": args.frames, "new_tokens": args.new_tokens,
                      "repeats": args.repeats, "load_average": os.getloadavg(), "rows": rows}
            args.json.write_text(json.dumps(record, indent=2) + "\n")
            args.json.with_suffix(".md").write_text(table)
            print(f"wrote {args.json}")
    print()
    print(table)
    return rows


if __name__ == "__main__":
    main()
