"""Which patches of which frames a clip keeps: EvoPrune per frame against one budget per clip, in the trained video
model of bench/eval_video.py, on test clips (real photographs, still or panning, digits coming and going).

One row per method, one column per frame: kept patches are shown, dropped ones dimmed; the outlined blocks are
the digits. Under the frame budget every frame keeps the same count; under the clip budget the count follows
what changes (the digits, the strip a pan reveals), and a frame that only repeats earlier ones keeps little.

    python bench/video_picture.py                      # docs/video_kept.png, retention 0.125, two test clips
    python bench/video_picture.py --retention 0.0625 --clips 0,5 --out picture.png
    python bench/video_picture.py --spread 500        # numbers instead: how unevenly the clip budget spreads
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import eval_video  # noqa: E402  (bench/eval_video.py)

OUT = Path(__file__).resolve().parents[1] / "docs" / "video_kept.png"
BUDGETS = ("frame", "clip")


@torch.inference_mode()
def kept_patches(model, x, budget: str, retention: float) -> torch.Tensor:
    """bool [F, N]: the patches of the clip x [F, 1, S, S] whose tokens the tower kept (the rest merged into them)."""
    import evoprune_ext

    frames, patches = model.frames, eval_video.out_patches(model)
    evoprune_ext.patch(model.vision, keep_ratio=retention, budget=budget)
    try:
        _, frame, _ = eval_video.pruned_tokens(model, x, budget)
        state = model.vision.evoprune_state
        index = state.index if budget == "clip" else state.index + patches * torch.arange(frames)[:, None]
    finally:
        evoprune_ext.unpatch(model.vision)
    kept = torch.zeros(frames * patches, dtype=torch.bool)
    kept[index.flatten()] = True
    return kept.view(frames, patches)


def draw(model, task: dict, clips: list[int], retention: float, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x, y = eval_video.test_set(task, max(clips) + 1)
    frames, side, cell = task["frames"], task["size"], task["patch"]
    grid = side // cell
    rows = [(clip, budget) for clip in clips for budget in BUDGETS]
    figure, axes = plt.subplots(len(rows), frames, figsize=(1.1 * frames, 1.25 * len(rows)), squeeze=False)
    for row, (clip, budget) in enumerate(rows):
        pixels = x[clip * frames : (clip + 1) * frames]
        kept = kept_patches(model, pixels, budget, retention)
        digits = y["patches"][clip].view(frames, grid, grid) < eval_video.NUM_CLASSES
        for t in range(frames):
            mask = kept[t].view(grid, grid).repeat_interleave(cell, 0).repeat_interleave(cell, 1)
            image = pixels[t, 0].clamp(0, 1) * (0.25 + 0.75 * mask)
            ax = axes[row, t]
            ax.imshow(image, cmap="gray", vmin=0, vmax=1)
            ax.contour(digits[t].repeat_interleave(cell, 0).repeat_interleave(cell, 1).float(), levels=[0.5],
                       colors="tab:red", linewidths=0.6)
            ax.set_xticks([]), ax.set_yticks([])
            ax.set_title(f"{int(kept[t].sum())}", fontsize=7, pad=1.5)
            if t == 0:
                ax.set_ylabel(f"clip {clip}\n{budget}", fontsize=8)
    keep = round(frames * grid * grid * retention)
    figure.suptitle(f"Kept patches at {100 * retention:g}% ({keep} of {frames * grid * grid} a clip; above each "
                    f"frame: its count). Red: digits. Rows: EvoPrune per frame, then one budget per clip.", fontsize=9)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=130)
    print(f"wrote {out}")


def spread(model, task: dict, clips: int, retentions=(0.25, 0.125, 0.0625)) -> list[dict]:
    """How the clip budget spreads a clip's tokens over its frames, on the first `clips` test clips: the share of
    frames left empty, the fewest and most a frame keeps, the share of the kept tokens that sit in other frames
    than a split fixed before the tower (the even one, `schedule.frame_split`) would put them, and the mean count
    of a frame showing a digit against one that shows none. Qwen3-VL's prompt holds a count per frame: these
    numbers are why its clip budget moves placeholders after the tower rather than fixing per-frame quotas."""
    from evoprune_ext.schedule import frame_split

    x, y = eval_video.test_set(task, clips)
    frames, grid = task["frames"], task["size"] // task["patch"]
    rows = []
    for retention in retentions:
        total = round(frames * grid * grid * retention)
        even = torch.tensor(frame_split(total, frames))
        counts = torch.stack([kept_patches(model, x[c * frames : (c + 1) * frames], "clip", retention).sum(1)
                              for c in range(clips)])  # [clips, frames]
        digit = (y["patches"][:clips].view(clips, frames, -1) < eval_video.NUM_CLASSES).any(-1)
        rows.append(dict(
            retention=retention, tokens=total, empty_frames=float((counts == 0).float().mean()),
            fewest=int(counts.min()), most=int(counts.max()),
            moved=float(((counts - even).clamp(min=0).sum(1) / total).mean()),
            with_digit=float(counts[digit].float().mean()), without_digit=float(counts[~digit].float().mean()),
        ))
        print(f"{100 * retention:g}% ({total} tokens a clip, even split {int(even.min())}-{int(even.max())} a frame): "
              f"{100 * rows[-1]['empty_frames']:.1f}% of frames keep nothing, a frame keeps {rows[-1]['fewest']} to "
              f"{rows[-1]['most']}, {100 * rows[-1]['moved']:.1f}% of the tokens sit in other frames than the even "
              f"split's; a frame with a digit keeps {rows[-1]['with_digit']:.2f} on average, one without "
              f"{rows[-1]['without_digit']:.2f}", flush=True)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--retention", type=float, default=0.125)
    parser.add_argument("--clips", default="0,1", help="comma-separated test clips")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--spread", type=int, default=0, metavar="CLIPS",
                        help="print how the clip budget spreads tokens over frames on this many test clips, no picture")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model, config = eval_video.load()
    model.eval()
    if args.spread:
        spread(model, config["task"], args.spread)
        return
    draw(model, config["task"], [int(c) for c in args.clips.split(",")], args.retention, args.out)


if __name__ == "__main__":
    main()
