"""Counts and schedules: how many tokens every pruning step keeps, computable before the encoder runs.

This is the bottom of the model side (docs/ARCHITECTURE.md): the processors that count placeholders, the towers
that prune and the vLLM plugin all take their numbers from here, so a prompt always holds exactly as many
placeholders as the tower will keep.
"""

from collections.abc import Sequence

__all__ = [
    "BUDGETS",
    "DEFAULT_EVERY",
    "DEFAULT_FIRST_LAYER",
    "DEFAULT_MAX_STEPS",
    "MERGE",
    "UNIT",
    "check_budget",
    "check_keep_ratio",
    "default_layers",
    "frame_keeps",
    "frame_split",
    "frame_units",
    "item_units",
    "kept_tokens",
    "resolve_layers",
    "schedule_keeps",
]


# The default skip schedule: prune at layers DEFAULT_FIRST_LAYER, + DEFAULT_EVERY, ... (0-based), at most
# DEFAULT_MAX_STEPS times and never in the last layer, keeping the same fraction of the patches at each step.
# That is layers 1, 2, 3, 4 of any encoder of 6 layers or more: early, gentle, repeated steps. Chosen by the
# quality benchmark (bench/eval_quality.py, docs/BENCHMARKS.md): at equal final token counts, pruning from layer 1
# at every layer beat every-other-layer, a single step at layer 1 or 2, and the first guess (2, 5, 8, 11); on the
# seven-digit task, where 28 of 64 patches carry the answer, it is still the best beyond the paired 95% interval.
DEFAULT_FIRST_LAYER = 1
DEFAULT_EVERY = 1
DEFAULT_MAX_STEPS = 4

MERGE = 2  # packed (Qwen-VL) towers fuse MERGE x MERGE patches into one feature (spatial_merge_size)
UNIT = MERGE * MERGE  # tokens per merge unit: what a packed tower keeps or drops as a whole


def default_layers(num_layers: int) -> list[int]:
    """The layers (0-based) where the default schedule prunes, for an encoder of `num_layers` layers.

    The last layer never prunes: LLaVA reads the penultimate layer's output, which must already have the final
    token count. Shallow encoders start earlier so that they still prune once."""
    last = max(num_layers - 2, 0)
    return list(range(min(DEFAULT_FIRST_LAYER, last), last + 1, DEFAULT_EVERY))[:DEFAULT_MAX_STEPS]


def resolve_layers(layers: Sequence[int] | None, depth: int) -> list[int]:
    """The pruning layers of an encoder of `depth` layers: `default_layers(depth)` for None, else `layers` sorted
    and without repeats, each checked to be a layer of the encoder."""
    layers = default_layers(depth) if layers is None else sorted({int(layer) for layer in layers})
    if not layers or any(not 0 <= layer < depth for layer in layers):
        raise ValueError(f"layers must name at least one layer, each in [0, {depth}), got {layers}")
    return layers


# How a video's frames share the token budget: "frame", every frame keeps round(patches * keep_ratio) of its own
# (the frames are pruned independently, like images); "clip", the frames of a video form one pool that keeps
# round(frames * patches * keep_ratio) tokens wherever they are (docs/ALGORITHM.md, "Clip budget").
BUDGETS = ("frame", "clip")


def check_budget(budget: str) -> str:
    if budget not in BUDGETS:
        raise ValueError(f"budget must be one of {BUDGETS}, got {budget!r}")
    return budget


def check_keep_ratio(keep_ratio: float) -> float:
    if not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
    return keep_ratio


def kept_tokens(num_patches: int, keep_ratio: float, protect: int = 0) -> int:
    """Tokens a patched encoder outputs: `protect + round(num_patches * keep_ratio)` (Python's round)."""
    return protect + round(num_patches * keep_ratio)


def schedule_keeps(num_tokens: int, protect: int, keep_ratio: float, steps: int) -> list[int]:
    """Tokens left after each of `steps` pruning steps (protected ones included): every step keeps the same
    fraction keep_ratio ** (1 / steps) of the patches, and the last one lands exactly on `kept_tokens`."""
    patches = num_tokens - protect
    keeps = [kept_tokens(patches, keep_ratio ** ((i + 1) / steps), protect) for i in range(steps)]
    keeps[-1] = kept_tokens(patches, keep_ratio, protect)
    return keeps


def frame_units(grid: list[list[int]]) -> list[int]:
    """Merge units of each frame, frames in order, of the (t, h, w) patch grids `grid` (grid_thw rows)."""
    return [(h // MERGE) * (w // MERGE) for t, h, w in grid for _ in range(t)]


def item_units(frames: int, units: int, keep_ratio: float, budget: str) -> int:
    """Units a packed tower keeps of an image or video of `frames` frames of `units` merge units each: every frame
    its share under the frame budget, the frames together under the clip budget (an image is one frame)."""
    if budget == "clip":
        return kept_tokens(frames * units, keep_ratio)
    return frames * kept_tokens(units, keep_ratio)


def frame_split(total: int, frames: int) -> list[int]:
    """`total` units spread over `frames` frames as evenly as can be, the first frames taking one more: where a
    prompt writes every frame as a block of its own (Qwen3-VL), the count each frame's block holds under the clip
    budget before the tower has chosen; the model moves the placeholders to the frames the tower kept them in."""
    return [total // frames + (frame < total % frames) for frame in range(frames)]


def frame_keeps(frames: list[int], keep_ratio: float, layers: list[int]) -> dict[int, list[int]]:
    """{layer: units each frame keeps after that layer's step}, for frames of `frames` units each; the last step
    lands on round(units * keep_ratio). A frame may be a pool: the frames of a video under the clip budget."""
    if any(round(n * keep_ratio) < 1 for n in frames):
        raise ValueError(f"keep_ratio={keep_ratio} keeps no unit of a frame of {min(frames)} units")
    per_frame = [schedule_keeps(n, 0, keep_ratio, len(layers)) for n in frames]
    return {layer: list(step) for layer, step in zip(layers, zip(*per_frame))}

