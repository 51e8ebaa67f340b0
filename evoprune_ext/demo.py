"""`evoprune demo`: EvoPrune inside a CLIP ViT-L/14-336 vision encoder (LLaVA-1.5's tower) on real images.

Prints how many tokens leave the encoder, how long it takes and how many FLOPs it saves at a few keep ratios,
times the fused op against the pure-PyTorch reference at that encoder's shape, measures the time to first token
of a whole LLaVA-1.5-shaped model (random weights) with and without EvoPrune, and draws, for each pruning step,
which patches were kept (outlined) and which merged into them (colored like the token they joined).

Random weights unless `--weights DIR` names a local Hugging Face CLIP checkpoint: then the attention of the CLS
row (importance) is noise, and the picture shows what the other two signals do, diversity (the spread of the
kept patches) and similarity (which patches merge together) on features that are random projections of pixels.
"""

import importlib
import statistics
import sys
import time
from pathlib import Path

import numpy
import torch

from evoprune_ext import reference
from evoprune_ext.patching import patch, unpatch

KEEP_RATIOS = (0.5, 0.25, 0.125)
PICTURE_KEEP_RATIO = 0.25
IMAGES = ("astronaut", "coffee", "chelsea")  # from skimage.data, shipped with scikit-image
# Layer sizes of the demo encoders (transformers.CLIPVisionConfig arguments).
CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16)
CLIP_L_336.update(image_size=336, patch_size=14)
QUICK = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=8, num_attention_heads=4)
QUICK.update(image_size=112, patch_size=14)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# The op's benchmark shape: one CLIP-L/336 image, the CLS protected, 144 patches kept (LLaVA-1.5 at 25%).
OP_SHAPE = dict(tokens=577, hidden=1024, metric=64, heads=16, protect=1, keep=145)


def _require(module: str, extra: str):
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise SystemExit(f"the demo needs {module.split('.')[0]}: pip install evoprune_ext[{extra}]") from error


def _median_ms(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def _load_images(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The demo images center-cropped and resized to size x size: (pixels in [0,1] [B,H,W,3], normalized [B,3,H,W])."""
    data = _require("skimage.data", "demo")
    image_module = _require("PIL.Image", "demo")
    pictures = []
    for name in IMAGES:
        array = getattr(data, name)()
        h, w = array.shape[:2]
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        crop = image_module.fromarray(array[top : top + side, left : left + side])
        resized = crop.resize((size, size), image_module.Resampling.BICUBIC)
        pictures.append(torch.from_numpy(numpy.asarray(resized, dtype=numpy.float32)) / 255)
    rgb = torch.stack(pictures)
    normalized = (rgb - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    return rgb, normalized.permute(0, 3, 1, 2).contiguous()


def _build_model(weights: str | None, quick: bool):
    transformers = _require("transformers", "hf")
    if weights is not None:
        return transformers.CLIPVisionModel.from_pretrained(weights, attn_implementation="sdpa").eval()
    config = transformers.CLIPVisionConfig(**(QUICK if quick else CLIP_L_336), attn_implementation="sdpa")
    torch.manual_seed(0)
    return transformers.CLIPVisionModel(config).eval()


def _encoder_flops(config, tokens: int, kept_after: dict[int, int]) -> float:
    """Matmul FLOPs of the encoder layers when layer l keeps kept_after[l] tokens after its attention."""
    d, i = config.hidden_size, config.intermediate_size
    total = 0.0
    for layer in range(config.num_hidden_layers):
        after = kept_after.get(layer, tokens)
        total += 2 * tokens * d * 4 * d + 4 * tokens * tokens * d  # q, k, v, out projections; q.k and attn.v
        total += 4 * after * d * i  # the MLP runs on the kept tokens
        tokens = after
    return total


def _op_inputs(model, pixels: torch.Tensor):
    """Inputs of the op at the CLIP-L/336 shape: the first image's tokens entering layer 0, their keys averaged
    over heads and the CLS row's attention when the model has that shape; random ones otherwise."""
    config = model.config
    shape = OP_SHAPE
    if (config.hidden_size, config.num_attention_heads) == (shape["hidden"], shape["heads"]):
        with torch.inference_mode():
            tokens = model.pre_layrnorm(model.embeddings(pixels[:1]))
            if tokens.shape[1] == shape["tokens"]:
                attention = model.encoder.layers[0].self_attn
                normed = model.encoder.layers[0].layer_norm1(tokens)
                heads = (1, shape["tokens"], shape["heads"], -1)
                q = attention.q_proj(normed[:, :1]).view(1, 1, shape["heads"], -1).transpose(1, 2)
                k = attention.k_proj(normed).view(heads).transpose(1, 2)
                importance = torch.ops.evoprune.importance_from_qk(q, k, attention.scale)
                return tokens, k.mean(dim=1), importance, "the first image's tokens at layer 0"
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randn(1, shape["tokens"], shape["hidden"], generator=generator)
    metric = torch.randn(1, shape["tokens"], shape["metric"], generator=generator)
    importance = torch.randn(1, shape["tokens"], generator=generator).softmax(-1)
    return tokens, metric, importance, "random tokens"


def _time_op(model, pixels, runs: int, out) -> None:
    tokens, metric, importance, source = _op_inputs(model, pixels)
    kwargs = dict(keep=OP_SHAPE["keep"], metric=metric, protect=OP_SHAPE["protect"])
    with torch.inference_mode():
        fused = torch.ops.evoprune.prune(tokens, importance, **kwargs)
        naive = reference.prune(tokens, importance, **kwargs)
        fused_ms = _median_ms(lambda: torch.ops.evoprune.prune(tokens, importance, **kwargs), runs)
        naive_ms = _median_ms(lambda: reference.prune(tokens, importance, **kwargs), runs)
    n, d, dm, keep = OP_SHAPE["tokens"], OP_SHAPE["hidden"], OP_SHAPE["metric"], OP_SHAPE["keep"]
    print(f"\nThe op alone, B=1 N={n} D={d} Dm={dm} protect=1 keep={keep} ({source}), median of {runs}:", file=out)
    print(f"  torch.ops.evoprune.prune  {fused_ms:8.2f} ms", file=out)
    print(f"  reference.prune           {naive_ms:8.2f} ms   ({naive_ms / fused_ms:.1f}x slower)", file=out)
    print(f"  same tokens kept: {'yes' if torch.equal(fused[1], naive[1]) else 'no (near-tied scores)'}", file=out)


def _draw(rgb: torch.Tensor, state, grid: int, protect: int, path: Path, title: str) -> None:
    """One row per image: the input, then each pruning step's kept patches (outlined) and merged ones (colored
    like the kept token they joined; black: dropped)."""
    matplotlib = _require("matplotlib", "demo")
    matplotlib.use("Agg")
    plt = _require("matplotlib.pyplot", "demo")
    collections = _require("matplotlib.collections", "demo")
    patches = _require("matplotlib.patches", "demo")

    size = rgb.shape[1]
    cell = size / grid
    palette = torch.tensor(matplotlib.colormaps["tab20"].colors)
    # A fixed shuffle so that neighbouring kept tokens get unrelated colors.
    shuffle = torch.randperm(grid * grid + protect, generator=torch.Generator().manual_seed(0))
    rows, columns = rgb.shape[0], 1 + len(state.steps)
    figure, axes = plt.subplots(rows, columns, figsize=(2.6 * columns, 2.6 * rows + 0.6), squeeze=False)
    for b in range(rows):
        axes[b, 0].imshow(rgb[b].numpy())
        axes[b, 0].set_title("input" if b == 0 else "", fontsize=9)
        for s, step in enumerate(state.steps, start=1):
            slot = step.original_slot[b, protect:]
            # The original position of the kept token each patch went into (-1: dropped).
            owner = torch.where(slot >= 0, step.original_index[b].gather(0, slot.clamp(min=0)), -1)
            overlay = torch.zeros(grid * grid, 4)
            overlay[:, :3] = palette[shuffle[owner.clamp(min=0)] % len(palette)]
            overlay[:, 3] = 0.55
            overlay[owner < 0] = torch.tensor([0.0, 0.0, 0.0, 0.8])
            ax = axes[b, s]
            ax.imshow(rgb[b].numpy())
            ax.imshow(overlay.view(grid, grid, 4).numpy(), extent=(0, size, size, 0), interpolation="nearest")
            kept = step.original_index[b, protect:] - protect
            boxes = [
                patches.Rectangle(((int(j) % grid) * cell, (int(j) // grid) * cell), cell, cell) for j in kept
            ]
            ax.add_collection(collections.PatchCollection(boxes, facecolor="none", edgecolor="white", linewidth=0.7))
            if b == 0:
                ax.set_title(f"layer {step.layer}: {len(kept)} of {grid * grid} kept", fontsize=9)
        for ax in axes[b]:
            ax.set_axis_off()
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _timing_table(model, image: torch.Tensor, tokens: int, runs: int, out) -> None:
    """Encoder time per image and matmul FLOPs, unpatched and at each of KEEP_RATIOS (default schedule)."""
    config = model.config
    with torch.inference_mode():
        model(pixel_values=image)  # warm-up
        base_ms = _median_ms(lambda: model(pixel_values=image), runs)
    base_flops = _encoder_flops(config, tokens, {})
    rows = [("off", tokens, base_ms, 1.0, 0.0)]
    for keep_ratio in KEEP_RATIOS:
        patch(model, keep_ratio=keep_ratio)
        with torch.inference_mode():
            ms = _median_ms(lambda: model(pixel_values=image), runs)
        state = model.evoprune_state
        kept_after = {step.layer: step.sizes.shape[1] for step in state.steps}
        saved = 1 - _encoder_flops(config, tokens, kept_after) / base_flops
        rows.append((f"{keep_ratio:g}", state.sizes.shape[1], ms, base_ms / ms, saved))
    unpatch(model)
    layers = ", ".join(str(layer) for layer in state.layers)
    print(f"\nPer image, median of {runs} runs; pruning after the attention of layers {layers}:", file=out)
    print(f"  {'keep ratio':>10}  {'tokens':>6}  {'encoder ms':>10}  {'speedup':>7}  {'FLOPs saved':>11}", file=out)
    for ratio, count, ms, speedup, saved in rows:
        print(f"  {ratio:>10}  {count:>6}  {ms:>10.1f}  {speedup:>6.2f}x  {100 * saved:>10.1f}%", file=out)


def _end_to_end(rgb: torch.Tensor, quick: bool, runs: int, out) -> None:
    """Time to first token of a LLaVA-1.5-shaped model (random weights) on the first image, with the user's own
    code (`processor(...)`, `model.generate(...)`), unpatched and at each of KEEP_RATIOS."""
    from evoprune_ext import random_models

    image_module = _require("PIL.Image", "demo")
    model, processor = random_models.llava(tiny=quick)
    picture = image_module.fromarray((rgb[0].numpy() * 255).astype(numpy.uint8))
    prompt = "USER : <image> describe the scene ASSISTANT :"
    rows = []
    for keep_ratio in (1.0, *KEEP_RATIOS):
        patch(model, keep_ratio=keep_ratio, processor=processor)
        inputs = processor(images=[picture], text=[prompt], return_tensors="pt")
        with torch.inference_mode():
            model.generate(**inputs, max_new_tokens=1)  # warm-up
            ms = _median_ms(lambda: model.generate(**inputs, max_new_tokens=1, do_sample=False), runs)
        visual = int((inputs["input_ids"] == processor.image_token_id).sum())
        rows.append((f"{keep_ratio:g}" if keep_ratio < 1 else "off", visual, inputs["input_ids"].shape[1], ms))
    unpatch(model)
    vision, text = model.config.vision_config, model.config.text_config
    print(
        f"\nEnd to end: a LLaVA-1.5-shaped model, random weights always (CLIP tower of {vision.num_hidden_layers} "
        f"layers, a {text.num_hidden_layers}-layer LM of width {text.hidden_size}), `processor(...)` then "
        f"`model.generate(...)` unchanged; time to first token, median of {runs}:",
        file=out,
    )
    header = f"  {'keep ratio':>10}  {'visual tokens':>13}  {'prefill tokens':>14}  {'TTFT ms':>8}  {'speedup':>7}"
    print(header, file=out)
    for ratio, visual, prefill, ms in rows:
        print(f"  {ratio:>10}  {visual:>13}  {prefill:>14}  {ms:>8.1f}  {rows[0][3] / ms:>6.2f}x", file=out)


def run(weights: str | None = None, out_path: str = "evoprune_demo.png", quick: bool = False, out=None) -> None:
    """The whole demo; prints to `out` (default sys.stdout)."""
    out = sys.stdout if out is None else out
    model = _build_model(weights, quick)
    config = model.config
    grid = config.image_size // config.patch_size
    tokens = 1 + grid * grid
    rgb, pixels = _load_images(config.image_size)

    name = "a small CLIP-like" if quick else "a CLIP ViT-L/14-336-sized"
    print(
        f"EvoPrune demo: {name} vision encoder ({config.num_hidden_layers} layers, {tokens} tokens), SDPA attention, "
        f"float32, CPU with {torch.get_num_threads()} threads, on skimage's {', '.join(IMAGES)}.",
        file=out,
    )
    if weights:
        print(f"Weights from {weights}.", file=out)
    else:
        print(
            "RANDOM weights: the attention (importance) signal is noise; what is kept and merged shows the diversity "
            "and similarity signals on random features. Pass --weights DIR for a real checkpoint.",
            file=out,
        )

    _timing_table(model, pixels[:1], tokens, 2 if quick else 3, out)
    _time_op(model, pixels, 5 if quick else 20, out)
    _end_to_end(rgb, quick, 2 if quick else 3, out)

    patch(model, keep_ratio=PICTURE_KEEP_RATIO)
    with torch.inference_mode():
        model(pixel_values=pixels)
    title = (
        f"EvoPrune at keep ratio {PICTURE_KEEP_RATIO:g}: kept patches outlined, "
        "merged ones colored like the token they joined, dropped ones black"
    )
    if not weights:
        title += "\n(random weights: importance is noise; this shows the diversity and similarity signals)"
    _draw(rgb, model.evoprune_state, grid, 1, Path(out_path), title)
    unpatch(model)
    print(f"\nWrote {out_path}", file=out)
