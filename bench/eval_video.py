"""Accuracy against retention on video: EvoPrune per frame and over the whole clip, and the video and image peers,
inside a trained video model whose answers need time.

A clip is 12 grayscale frames of 32x32 (an 8x8 grid of 4x4 patches, 64 a frame, 768 a clip) cut from one of
scikit-image's photographs, static or panning by a pixel a frame. Three digits of different classes
(scikit-learn's 8x8 digits, a 2x2 block of patches each) appear in some frames only: each digit appears one to
three times, each time for one to three frames, at a new place and as a new drawing of its class, with at
least one empty frame between two appearances. Three questions, all needing time: which digits appear anywhere
(the top 3 of 10 sigmoids must be exactly them; chance 1 in 120), which digit appears first (10-way), and how
many times one of them appears (1, 2 or 3, read from a head that counts every class; twice is a digit that
appeared, went and came back). A clip is answered when all three answers are right, which is the accuracy
reported; each question's accuracy is in the results too.

The model (trained here once, reproducibly, on one thread: 1300 steps of 20 clips, 16 minutes on a shared 2-core
machine) is a transformers `SiglipVisionModel` (no CLS, no pooling head) run on every frame, then `ClipHead` over
all the output tokens of all frames: each token gets a learned embedding of its frame, learned queries pool each
frame's tokens (a frame that lost them all still has a learned empty token), a small transformer runs over the
frames, and three heads answer. Training also scores which digits each frame shows (from its summary) and which
digit each patch shows (a linear probe on the encoder's tokens): dense supervision that teaches the tiny encoder
within the budget; evaluation reads only the three answers. The head takes any subset of the tokens with their
frame ids and sizes, so every pruning method feeds it the same way, with exactly the same number of tokens per
clip: round(768 * r) at retention r.

Methods, each through the product's harness `evoprune_ext.patch` where it runs inside the encoder:
- EvoPrune per frame (`budget="frame"`, the default): every frame keeps round(64 r) tokens;
- EvoPrune over the clip (`budget="clip"`, `state.clips(frames=12)`): one pool of 768 tokens keeps
  round(768 r), wherever in time they are;
- ToMe over the clip (bench/peers.py's `tome` step in clip mode: its matching spans frames);
- EVS after the encoder (vLLM's frame differencing) and a DyCoke/FastVID-style temporal merge after the
  encoder (bench/peers.py's video peers), on the unpruned tower's tokens;
- the image peers of bench/peers.py per frame.

Pruning-aware head (`--pruned`): the head above was trained on unpruned frames only, so a method whose frames
arrive uneven (the clip budget, the video peers) is also a shift the head never saw. `--pruned` evaluates
bench/video_model_pruned/ instead: the same encoder, frozen (so every method selects exactly the same tokens),
and the head (`ClipHead`) fine-tuned from the shipped one on inputs pruned by a method and a retention drawn at
random for each batch, uniformly from the retentions evaluated (1: unpruned) and from every method evaluated,
peers included; `--pruned --retrain` fine-tunes it again (FINETUNING: 2400 steps of 20 clips, 11 minutes on
one thread of a shared 2-core machine).

Every accuracy comes with its 95% Wilson interval on TEST_CLIPS clips (digit drawings disjoint from training),
every difference to the chosen EvoPrune setting with a paired 95% interval (same clips). The recommended video
mode and alpha stay the image defaults (per frame, DEFAULT_ALPHA) unless worse than the best beyond that noise.
Writes video_quality.json, .md and .png to --out (video_quality_pruned.* with --pruned).

    python bench/eval_video.py                     # evaluate the saved model (bench/video_model/)
    python bench/eval_video.py --retrain           # train it again first
    python bench/eval_video.py --pruned            # evaluate the pruning-aware head (bench/video_model_pruned/)
    python bench/eval_video.py --pruned --retrain  # fine-tune it again from bench/video_model/ first
    python bench/eval_video.py --smoke             # seconds: a tiny grid, for the tests (with --retrain: 2 steps)
"""

import json
import math
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_quality import correct, digit_pools  # noqa: E402  (bench/eval_quality.py)
import evaluation  # noqa: E402  (bench/evaluation.py)
from evaluation import equal_to_best, fit, paired, wilson  # noqa: E402
from peers import PEERS, VIDEO_PEERS  # noqa: E402  (bench/peers.py)

MODEL_DIR = Path(__file__).resolve().parent / "video_model"
PRUNED_DIR = Path(__file__).resolve().parent / "video_model_pruned"
RESULTS_DIR = Path(__file__).resolve().parent / "results"

# The task. Stored with the weights; evaluation reads it back from there.
TASK = {
    "frames": 12,
    "size": 32,
    "patch": 4,
    "digits": 3,
    "digit_scale": 1,  # an 8x8 digit on a 2x2 block of 4x4 patches
    "appearances": 3,  # each digit appears 1 to this many times
    "longest": 3,  # frames of one appearance, and of a gap: 1 to this many
    "photos": ["camera", "astronaut", "coffee", "chelsea", "rocket", "coins", "horse", "moon", "page", "text",
               "brick", "grass", "gravel", "hubble_deep_field", "retina"],
    "photo_side": 128,  # each photo's shorter side is resized to this before cropping
    "pan": 1,  # pixels a frame, in each direction; a third of the clips are static
    "background": 0.5,  # contrast of the photograph under the digits' white ink
    "noise_std": 0.03,
    "split_seed": 0,
    "train_digit_share": 0.7,
    "test_seed": 12345,
}
# The frame encoder: SigLIP, 64 patches of 4x4, no CLS; the head over the tokens of all frames.
MODEL = {
    "hidden_size": 64,
    "intermediate_size": 192,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "image_size": 32,
    "patch_size": 4,
    "num_channels": 1,
    "vision_use_head": False,
}
HEAD = {"queries": 4, "layers": 2, "heads": 4}
# One thread, as bench/eval_quality.py: bitwise reproducible, and fastest on a shared 2-core machine.
TRAINING = {"seed": 0, "steps": 1300, "batch": 20, "lr": 2e-3, "weight_decay": 0.05, "warmup": 50, "clip": 1.0,
            "threads": 1}
# The pruning-aware head: fine-tuned from the shipped model, the encoder frozen, one (method, retention) a batch.
FINETUNING = {"seed": 0, "steps": 2400, "batch": 20, "lr": 1e-3, "weight_decay": 0.05, "warmup": 50, "clip": 1.0,
              "threads": 1}

NUM_CLASSES = 10
TEST_CLIPS = 2000
RETENTIONS = [1.0, 0.5, 0.25, 0.125, 0.0625]
ALPHAS = [0.0, 0.1, 1.0]
MODES = ("frame", "clip")  # EvoPrune's budget: each frame keeps its share, or the clip's frames share one
DECIDING = [0.25, 0.125, 0.0625]  # where the mode and alpha are decided: where tokens are scarce
QUESTIONS = ("set", "first", "count")
BATCH = 50  # clips per forward pass in evaluation


# ----------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------
def photos(task: dict) -> list[torch.Tensor]:
    """scikit-image's photographs in grayscale [H, W] in [0, 1], the shorter side resized to `photo_side`."""
    from skimage import color, data

    out = []
    for name in task["photos"]:
        image = torch.tensor(getattr(data, name)(), dtype=torch.float32)
        if image.dim() == 3:
            image = torch.tensor(color.rgb2gray(image[..., :3].numpy()), dtype=torch.float32)
        elif image.max() > 1:
            image = image / 255.0
        scale = task["photo_side"] / min(image.shape)
        size = [round(s * scale) for s in image.shape]
        image = F.interpolate(image[None, None], size=size, mode="area" if scale < 1 else "bilinear")[0, 0]
        low, high = image.min(), image.max()
        out.append((image - low) / (high - low).clamp_min(1e-6))
    return out


def appearances(task: dict, gen: torch.Generator) -> list[list[tuple[int, int]]]:
    """For each digit, its appearances (first frame, frames): 1 to `appearances` runs of 1 to `longest` frames,
    at least one empty frame apart, all within the clip; exactly one digit appears first."""
    frames, longest = task["frames"], task["longest"]
    while True:
        runs = []
        for _ in range(task["digits"]):
            count = int(torch.randint(1, task["appearances"] + 1, (1,), generator=gen))
            lengths = torch.randint(1, longest + 1, (2 * count - 1,), generator=gen).tolist()
            slack = frames - sum(lengths)
            if slack < 0:
                break
            t = int(torch.randint(0, slack + 1, (1,), generator=gen))
            digit = []
            for i, length in enumerate(lengths):
                if i % 2 == 0:
                    digit.append((t, length))
                t += length
            runs.append(digit)
        else:
            starts = sorted(digit[0][0] for digit in runs)
            if starts[0] < starts[1]:
                return runs


def compose(task: dict, pools, backgrounds, split: str, count: int, gen: torch.Generator):
    """`count` clips as frames [count * F, 1, S, S] (each clip's frames consecutive) and their answers:
    `present` multi-hot [count, 10], `first` [count] (the class that appears first), `counts` [count, 10]
    (appearances of each class, 0 if absent), `query` [count] (the digit whose count the count question asks
    for: the clip's digits in class order, taken in turn clip after clip, no random draw); for training only,
    `seen` multi-hot [count, F, 10] (the classes each frame shows) and `patches` [count, F, N] (the class each
    patch shows, 10 for none)."""
    images, labels, train_ids, test_ids = pools
    ids = train_ids if split == "train" else test_ids
    by_class = [ids[labels[ids] == k] for k in range(NUM_CLASSES)]
    frames, size, cell = task["frames"], task["size"], task["patch"]
    span = images.shape[-1] // cell  # patches a digit covers on each side
    blocks = [(r, c) for r in range(0, size // cell - span + 1, span) for c in range(0, size // cell - span + 1, span)]
    x = torch.empty(count, frames, size, size)
    present, first, counts = torch.zeros(count, NUM_CLASSES), torch.zeros(count, dtype=torch.long), \
        torch.zeros(count, NUM_CLASSES, dtype=torch.long)
    seen = torch.zeros(count, frames, NUM_CLASSES)
    patches = torch.full((count, frames, size // cell, size // cell), NUM_CLASSES, dtype=torch.long)
    steps = torch.arange(frames)
    for i in range(count):
        photo = backgrounds[int(torch.randint(len(backgrounds), (1,), generator=gen))]
        velocity = torch.randint(-task["pan"], task["pan"] + 1, (2,), generator=gen)
        if int(torch.randint(3, (1,), generator=gen)) == 0:
            velocity.zero_()
        travel = task["pan"] * (frames - 1)
        top = int(torch.randint(travel, photo.shape[0] - size - travel + 1, (1,), generator=gen))
        left = int(torch.randint(travel, photo.shape[1] - size - travel + 1, (1,), generator=gen))
        rows = top + velocity[0] * steps[:, None] + torch.arange(size)  # [F, S]
        cols = left + velocity[1] * steps[:, None] + torch.arange(size)
        frame = photo[rows[:, :, None], cols[:, None, :]] * task["background"]
        classes = torch.randperm(NUM_CLASSES, generator=gen)[: task["digits"]].tolist()
        runs = appearances(task, gen)
        places = iter(torch.randperm(len(blocks), generator=gen).tolist())
        for k, digit_runs in zip(classes, runs):
            for start, length in digit_runs:
                pool = by_class[k]
                ink = images[pool[int(torch.randint(len(pool), (1,), generator=gen))]]
                r, c = blocks[next(places)]
                area = frame[start : start + length, r * cell : (r + span) * cell, c * cell : (c + span) * cell]
                area.mul_(1 - ink).add_(ink)
                seen[i, start : start + length, k] = 1.0
                patches[i, start : start + length, r : r + span, c : c + span] = k
            present[i, k], counts[i, k] = 1.0, len(digit_runs)
        first[i] = classes[min(range(len(runs)), key=lambda j: runs[j][0][0])]
        x[i] = frame
    x += torch.randn(x.shape, generator=gen) * task["noise_std"]
    query = present.nonzero()[:, 1].view(count, -1)[torch.arange(count), torch.arange(count) % task["digits"]]
    return x.view(count * frames, 1, size, size), {"present": present, "first": first, "counts": counts,
                                                   "query": query, "seen": seen, "patches": patches.flatten(2)}


# ----------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------
class ClipHead(nn.Module):
    """Answers from any tokens of a clip [V, T, D] given each token's frame [V, T] and size [V, T].

    Every token gets its frame's learned embedding; per frame, learned queries attend to that frame's tokens
    (log(size) added to the logits, as proportional attention does) and to a learned empty token, so a frame
    that lost all its tokens still has a summary; a small transformer runs over the frame summaries and a
    readout token, which the three answer heads read. A fourth output, which digits each frame shows (from its
    summary), only teaches the encoder faster: training scores it, evaluation does not."""

    def __init__(self, width: int, frames: int, queries: int, layers: int, heads: int, appearances: int):
        super().__init__()
        self.frames = frames
        self.norm = nn.LayerNorm(width)
        self.frame = nn.Embedding(frames, width)
        self.queries = nn.Parameter(torch.randn(queries, width) * width**-0.5)
        self.empty = nn.Parameter(torch.zeros(1, width))
        self.key, self.value = nn.Linear(width, width), nn.Linear(width, width)
        self.summary = nn.Linear(queries * width, width)
        self.readout = nn.Parameter(torch.zeros(1, 1, width))
        layer = nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.temporal = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.present = nn.Linear(width, NUM_CLASSES)
        self.first = nn.Linear(width, NUM_CLASSES)
        self.count = nn.Linear(width, NUM_CLASSES * (appearances + 1))
        self.seen = nn.Linear(width, NUM_CLASSES)

    def forward(self, tokens, frame, sizes=None):
        v, t, d = tokens.shape
        x = self.norm(tokens) + self.frame(frame)
        keys = torch.cat([self.key(x), self.key(self.empty).expand(v, 1, d)], dim=1)  # [V, T+1, D]
        values = torch.cat([self.value(x), self.value(self.empty).expand(v, 1, d)], dim=1)
        logits = torch.einsum("qd,vtd->vqt", self.queries, keys) / math.sqrt(d)  # [V, Q, T+1]
        if sizes is not None:
            logits = logits + F.pad(sizes.float().log(), (0, 1))[:, None, :]
        mine = F.pad(frame, (0, 1), value=-1)[:, None, :] == torch.arange(self.frames, device=frame.device)[:, None]
        mine[:, :, -1] = True  # every frame sees the empty token
        logits = logits[:, None].masked_fill(~mine[:, :, None, :], float("-inf"))  # [V, F, Q, T+1]
        pooled = torch.einsum("vfqt,vtd->vfqd", logits.softmax(dim=-1), values)
        summary = self.summary(pooled.flatten(2)) + self.frame.weight
        h = self.temporal(torch.cat([self.readout.expand(v, 1, d), summary], dim=1))[:, 0]
        return self.present(h), self.first(h), self.count(h).view(v, NUM_CLASSES, -1), self.seen(summary)


class VideoQA(nn.Module):
    """A transformers SiglipVisionModel (`.vision`) on every frame and a `ClipHead` over all their tokens."""

    def __init__(self, model_config: dict, head_config: dict, task: dict):
        super().__init__()
        from transformers import SiglipVisionConfig, SiglipVisionModel

        config = SiglipVisionConfig(**model_config)
        config._attn_implementation = "sdpa"
        self.vision = SiglipVisionModel(config)
        self.frames = task["frames"]
        self.head = ClipHead(config.hidden_size, task["frames"], appearances=task["appearances"], **head_config)
        self.patch_digits = nn.Linear(config.hidden_size, NUM_CLASSES + 1)

    def forward(self, pixel_values):
        """Unpruned, for training: [V*F, 1, S, S] -> the head's four outputs and, from a linear probe on the
        encoder's tokens, which digit each patch shows [V, F*N, 11] (10: none): dense supervision that teaches the
        encoder within the training budget."""
        tokens = self.vision(pixel_values=pixel_values).last_hidden_state
        clip = frame_tokens(tokens, self.frames)
        return *self.head(*clip), self.patch_digits(clip[0])


def frame_tokens(tokens, frames: int, sizes=None):
    """Per-frame output [V*F, k, D] (and sizes [V*F, k]) as the head's clip input: tokens [V, F*k, D], frames."""
    k, d = tokens.shape[1:]
    frame = torch.arange(frames, device=tokens.device).repeat_interleave(k).expand(tokens.shape[0] // frames, -1)
    return tokens.reshape(-1, frames * k, d), frame, None if sizes is None else sizes.reshape(-1, frames * k)


def loss(model, batch):
    x, y = batch
    *answers, patches = model(x)
    return head_loss(answers, y) + F.cross_entropy(patches.flatten(0, 1), y["patches"].flatten())


def head_loss(answers, y):
    """The head's four outputs scored: the three answers and which digits each frame shows."""
    present, first, counts, seen = answers
    return (F.binary_cross_entropy_with_logits(present, y["present"]) + F.cross_entropy(first, y["first"])
            + F.cross_entropy(counts.flatten(0, 1), y["counts"].flatten())
            + F.binary_cross_entropy_with_logits(seen, y["seen"]))


def answered(logits, y) -> torch.Tensor:
    """Per clip, bool [V, 3]: is the set of digits right, the first digit, the count of the queried digit."""
    present, first, counts = logits[:3]
    per = int(y["present"][0].sum().item())
    query = y["query"][:, None]
    count = counts.argmax(dim=-1).gather(1, query) == y["counts"].gather(1, query)
    return torch.stack([correct(present, y["present"], per), first.argmax(dim=-1) == y["first"], count[:, 0]], dim=1)


def train(steps: int | None = None, log=print) -> tuple[VideoQA, dict]:
    cfg = dict(TRAINING, steps=steps or TRAINING["steps"])
    pools, backgrounds = digit_pools(TASK), photos(TASK)
    model, seconds = fit(lambda: VideoQA(MODEL, HEAD, TASK),
                         lambda gen: compose(TASK, pools, backgrounds, "train", cfg["batch"], gen), loss, cfg, log)
    return model, {"training": cfg, "train_seconds": seconds}


def finetune(steps: int | None = None, base: Path = MODEL_DIR, log=print) -> tuple[VideoQA, dict]:
    """The pruning-aware head: the model at `base`, its encoder (and patch probe) frozen, the head fine-tuned on
    training clips pruned by a method and a retention drawn for each batch, uniformly and independently, from
    `methods(ALPHAS)` and RETENTIONS (retention 1: unpruned). The encoder is not trained, so every method keeps
    the same tokens as under the shipped model; only the reader of those tokens adapts."""
    cfg = dict(FINETUNING, steps=steps or FINETUNING["steps"])
    pools, backgrounds = digit_pools(TASK), photos(TASK)
    names, base_record = methods(ALPHAS), json.loads((base / "config.json").read_text())

    def build():
        model, _ = load(base)
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(name.startswith("head."))
        return model

    def batch(gen):
        name = list(names)[int(torch.randint(len(names), (1,), generator=gen))]
        retention = RETENTIONS[int(torch.randint(len(RETENTIONS), (1,), generator=gen))]
        return *compose(TASK, pools, backgrounds, "train", cfg["batch"], gen), names[name], retention

    def pruned_loss(model, batch):
        x, y, method, retention = batch
        return head_loss(model.head(*prepared(model, x, method, retention)), y)

    model, seconds = fit(build, batch, pruned_loss, cfg, log)
    return model, {"training": base_record["training"], "train_seconds": base_record["train_seconds"],
                   "finetuning": {**cfg, "base": base.name, "trains": "head", "methods": list(names),
                                  "retentions": RETENTIONS}, "finetune_seconds": seconds}


def save(model: VideoQA, record: dict, directory: Path = MODEL_DIR) -> None:
    evaluation.save(model, {"task": TASK, "model": MODEL, "head": HEAD, **record}, directory)


def load(directory: Path = MODEL_DIR) -> tuple[VideoQA, dict]:
    return evaluation.load(directory, lambda config: VideoQA(config["model"], config["head"], config["task"]))


def test_set(task: dict, count: int):
    return compose(task, digit_pools(task), photos(task), "test", count,
                   torch.Generator().manual_seed(task["test_seed"]))


# ----------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------
def methods(alphas) -> dict[str, dict]:
    """Name -> how it runs: `mode` "frame" (the tower pruned frame by frame), "clip" (the tower pruned over the
    clip pool) or "after" (a video peer on the unpruned tower's tokens), with `alpha` or `step`."""
    out = {f"evoprune {mode} a={a:g}": {"mode": mode, "alpha": a} for mode in MODES for a in alphas}
    out["tome clip"] = {"mode": "clip", "step": PEERS["tome"]}
    out.update({f"{name} after": {"mode": "after", "step": step} for name, step in VIDEO_PEERS.items()})
    out.update({f"{name} frame": {"mode": "frame", "step": step} for name, step in PEERS.items()})
    return out


def pruned_tokens(model: VideoQA, x, mode: str):
    """The head's input (tokens [V, K, D], frames [V, K], sizes [V, K]) from the frames x [V*F, 1, S, S] of V
    clips, the tower patched and pruning each frame ("frame") or each clip ("clip")."""
    frames, state = model.frames, model.vision.evoprune_state
    if mode == "frame":
        return frame_tokens(model.vision(pixel_values=x).last_hidden_state, frames, state.sizes)
    with state.clips(frames=frames):
        out = model.vision(pixel_values=x).last_hidden_state
    return out, state.index // out_patches(model), state.sizes


def out_patches(model: VideoQA) -> int:
    config = model.vision.config
    return (config.image_size // config.patch_size) ** 2


def after_encoder(tokens, method: dict, frames: int, keep: int):
    """A video peer on the unpruned tower's tokens [V, F*N, D] (its output embeddings as the metric)."""
    sizes = tokens.new_ones(tokens.shape[:2])
    out, sizes, _, index = method["step"](tokens, tokens, None, sizes, keep=keep, protect=0, frames=frames)
    return out, index // (tokens.shape[1] // frames), sizes


@contextmanager
def pruning(model: VideoQA, method: dict, retention: float):
    """The tower patched to prune as `method` does inside the encoder at `retention` (unpatched afterwards); as it
    is for unpruned and "after" methods."""
    import evoprune_ext

    if method["mode"] in ("frame", "clip") and retention < 1:
        budget = {"budget": "clip"} if method["mode"] == "clip" else {}
        evoprune_ext.patch(model.vision, keep_ratio=retention, alpha=method.get("alpha"), step=method.get("step"),
                           **budget)
    try:
        yield
    finally:
        evoprune_ext.unpatch(model.vision)


def head_input(model: VideoQA, x, method: dict, retention: float, unpruned):
    """The head's input from clips x [V*F, 1, S, S] (the tower inside `pruning(model, method, retention)`), or
    from `unpruned`, their unpruned tower's tokens [V, F*N, D], when unpruned or for an "after" method."""
    frames = model.frames
    if retention >= 1:
        return frame_tokens(unpruned.reshape(-1, out_patches(model), unpruned.shape[-1]), frames)
    if method["mode"] == "after":
        return after_encoder(unpruned, method, frames, kept(model, retention))
    return pruned_tokens(model, x, method["mode"])


def prepared(model: VideoQA, x, method: dict, retention: float):
    """`head_input` of one batch, as tensors the head can learn from (the frozen tower runs without autograd)."""
    with torch.inference_mode(), pruning(model, method, retention):
        after = retention >= 1 or method["mode"] == "after"
        out = head_input(model, x, method, retention, unpruned_tokens(model, x) if after else None)
    return tuple(None if t is None else t.clone() for t in out)  # inference tensors -> ordinary ones


def kept(model: VideoQA, retention: float) -> int:
    import evoprune_ext

    return evoprune_ext.kept_tokens(model.frames * out_patches(model), retention)


@torch.inference_mode()
def evaluate(model: VideoQA, x, y, method: dict, retention: float, unpruned=None) -> tuple[torch.Tensor, int]:
    """Per clip, which answers are right (bool [V, 3]), and the tokens per clip the head saw. `unpruned`: the
    tower's unpruned tokens of every clip, for the "after" methods (computed once)."""
    frames, clips, keep = model.frames, len(y["first"]), kept(model, retention)
    right, counts = [], set()
    with pruning(model, method, retention):
        for i in range(0, clips, BATCH):
            part = {k: v[i : i + BATCH] for k, v in y.items()}
            tokens = None if unpruned is None else unpruned[i : i + BATCH]
            clip_input = head_input(model, x[i * frames : (i + BATCH) * frames], method, retention, tokens)
            counts.add(clip_input[0].shape[1])
            right.append(answered(model.head(*clip_input), part))
    if counts != {keep}:
        raise RuntimeError(f"{method} at retention {retention} gave {counts} tokens a clip, not {keep}")
    return torch.cat(right), keep


@torch.inference_mode()
def unpruned_tokens(model: VideoQA, x) -> torch.Tensor:
    """The unpruned tower's tokens of every clip [V, F*N, D]."""
    out = [model.vision(pixel_values=x[i : i + BATCH * model.frames]).last_hidden_state
           for i in range(0, len(x), BATCH * model.frames)]
    out = torch.cat(out)
    return out.reshape(-1, model.frames * out.shape[1], out.shape[-1])


def row(method, spec, retention, tokens, right: torch.Tensor) -> dict:
    clip = right.all(dim=1)
    low, high = wilson(int(clip.sum()), len(clip))
    return {"method": method, "mode": spec.get("mode"), "alpha": spec.get("alpha"), "retention": retention,
            "tokens": tokens, "accuracy": clip.float().mean().item(), "ci95": [low, high], "hits": int(clip.sum()),
            "clips": len(clip), **{q: right[:, j].float().mean().item() for j, q in enumerate(QUESTIONS)}}


def run(model, x, y, names: dict, retentions, log=print) -> tuple[list[dict], dict]:
    """Accuracy of every method at every retention below 1, the unpruned row first. Returns the rows and the
    per-clip answers (all right: bool [V]) by (method, retention) for paired comparisons."""
    start = time.perf_counter()
    unpruned = unpruned_tokens(model, x)
    right, keep = evaluate(model, x, y, {"mode": "after"}, 1.0, unpruned)
    rows, per_clip = [row("unpruned", {}, 1.0, keep, right)], {}
    if log:
        log(f"  {'unpruned':24s} {rows[0]['accuracy']:.3f}  ({time.perf_counter() - start:.1f} s)")
    for name, spec in names.items():
        start = time.perf_counter()
        for r in retentions:
            if r < 1:
                right, keep = evaluate(model, x, y, spec, r, unpruned)
                per_clip[name, r] = right.all(dim=1)
                rows.append(row(name, spec, r, keep, right))
        if log:
            accs = " ".join(f"{r_['accuracy']:.3f}" for r_ in rows if r_["method"] == name)
            log(f"  {name:24s} {accs}  ({time.perf_counter() - start:.1f} s)")
    return rows, per_clip


def choose(per_clip, alphas, deciding) -> dict:
    """The video mode and alpha the numbers recommend, from the per-clip accuracy averaged over the `deciding`
    retentions: the image defaults (per frame, DEFAULT_ALPHA) stay if equal to the best within the paired 95%
    interval; otherwise the best mode, at DEFAULT_ALPHA if that is equal to the best, else at the best alpha."""
    from evoprune_ext.defaults import DEFAULT_ALPHA

    settings = [(m, a) for m in MODES for a in alphas]
    scores = {s: torch.stack([per_clip[f"evoprune {s[0]} a={s[1]:g}", r].double() for r in deciding]).mean(0)
              for s in settings}
    best, table = equal_to_best(scores)
    current = ("frame", DEFAULT_ALPHA)
    if current in table and table[current]["tied"]:
        chosen, why = current, "the image defaults, equal to the best within the noise"
    elif table.get((best[0], DEFAULT_ALPHA), {}).get("tied"):
        chosen, why = (best[0], DEFAULT_ALPHA), "the image defaults are worse beyond the noise; the best mode"
    else:
        chosen, why = best, "the image defaults are worse beyond the noise; the best setting"
    listing = "; ".join(f"{m} a={a:g}: {100 * v['mean']:.2f}%"
                        + ("" if (m, a) == best else f" ({100 * v['diff']:+.2f} +- {100 * v['half']:.2f})")
                        for (m, a), v in table.items())
    reason = (f"mode {chosen[0]}, alpha={chosen[1]:g} ({why}). Mean accuracy at "
              + ", ".join(f"{100 * r:g}%" for r in deciding) + f" retention, paired difference to the best "
              f"({best[0]} a={best[1]:g}) with its 95% half-width: {listing}.")
    return {"mode": chosen[0], "alpha": chosen[1], "name": f"evoprune {chosen[0]} a={chosen[1]:g}",
            "best": f"evoprune {best[0]} a={best[1]:g}", "deciding_retentions": deciding, "reason": reason,
            "by_setting": {f"{m} a={a:g}": v for (m, a), v in table.items()}}


def lookup(rows, method, retention, key="accuracy"):
    if retention >= 1.0:
        method = "unpruned"
    return next(r[key] for r in rows if r["method"] == method and (method == "unpruned" or r["retention"] == retention))


def _cell(rows, name, r) -> str:
    low, high = lookup(rows, name, r, "ci95")
    return f"{100 * lookup(rows, name, r):.1f} ({100 * low:.1f}-{100 * high:.1f})"


def markdown(rows, per_clip, names, retentions, chosen, task, count) -> str:
    """Methods vs retention with 95% intervals, each method's paired difference to the chosen EvoPrune, and the
    accuracy of each question at the lowest retention."""
    frames, patches = task["frames"], (task["size"] // task["patch"]) ** 2
    pruned = [r for r in retentions if r < 1]
    base, (low, high) = lookup(rows, "unpruned", 1.0), lookup(rows, "unpruned", 1.0, "ci95")
    out = [f"Accuracy (%) on {count} test clips ({frames} frames of {task['size']}x{task['size']}, {patches} "
           f"patches a frame, {frames * patches} a clip; a clip counts when the set of its {task['digits']} digits, "
           f"the first one and how many times one of them appears are all right), unpruned {100 * base:.1f}% "
           f"({100 * low:.1f}-{100 * high:.1f}). In brackets: the 95% Wilson interval. Every method ends with "
           + ", ".join(str(lookup(rows, next(iter(names)), r, "tokens")) for r in pruned)
           + " tokens a clip at " + ", ".join(f"{100 * r:g}%" for r in pruned) + " retention.\n\n"]
    out.append("| method | " + " | ".join(f"{100 * r:g}%" for r in retentions) + " |\n|---|"
               + "---|" * len(retentions) + "\n")
    for name in names:
        mark = " **(chosen)**" if name == chosen["name"] else ""
        out.append(f"| {name}{mark} | " + " | ".join(_cell(rows, name, r) for r in retentions) + " |\n")
    out.append(f"\nDifference to {chosen['name']}, in points, on the same clips (paired; +- the 95% half-width; "
               "bold: outside the noise):\n\n")
    out.append(evaluation.differences(per_clip, names, chosen["name"], pruned, chosen["name"]))
    lowest = min(pruned)
    out.append(f"\nEach question at {100 * lowest:g}% retention (unpruned: "
               + ", ".join(f"{q} {100 * lookup(rows, 'unpruned', 1.0, q):.1f}" for q in QUESTIONS) + "):\n\n| method | "
               + " | ".join(QUESTIONS) + " |\n|---|" + "---|" * len(QUESTIONS) + "\n")
    for name in names:
        out.append(f"| {name} | " + " | ".join(f"{100 * lookup(rows, name, lowest, q):.1f}" for q in QUESTIONS)
                   + " |\n")
    out.append(f"\nRecommended: {chosen['reason']}\n")
    alpha = f"a={chosen['alpha']:g}"
    out.append(f"\nClip against frame budget (evoprune clip {alpha} minus evoprune frame {alpha}, paired): "
               + "; ".join(f"{100 * r:g}% {100 * d:+.1f} +- {100 * h:.1f}" for r in pruned
                           for d, h in [paired(per_clip[f"evoprune clip {alpha}", r],
                                               per_clip[f"evoprune frame {alpha}", r])])
               + ". Best at each retention: " + "; ".join(
                   f"{100 * r:g}% {max(names, key=lambda n: lookup(rows, n, r))}" for r in pruned) + ".\n")
    return "".join(out)


def plot(rows, names, retentions, chosen, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(8, 5))
    xs = [100 * r for r in retentions]
    for i, name in enumerate(names):
        acc = [100 * lookup(rows, name, r) for r in retentions]
        ci = [lookup(rows, name, r, "ci95") for r in retentions]
        err = [[a - 100 * lo for a, (lo, _) in zip(acc, ci)], [100 * hi - a for a, (_, hi) in zip(acc, ci)]]
        evo, picked = name.startswith("evoprune"), name == chosen["name"]
        axis.errorbar(xs, acc, yerr=err, capsize=3, marker="o" if evo else "s", ls="-" if evo else "--",
                      color=plt.cm.tab20(i % 20), lw=2.5 if picked else 1, label=name + (" (chosen)" if picked else ""))
    axis.set_xscale("log", base=2)
    axis.set_xticks(xs, [f"{x:g}%" for x in xs])
    axis.set_xlabel("retention (final share of the clip's tokens)")
    axis.set_ylabel("clip accuracy (%), all three answers, 95% interval")
    axis.set_title("video: accuracy vs retention at equal tokens per clip")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    return evaluation.keeping_threads(_main, argv)


def _main(argv) -> dict:
    parser = evaluation.arguments(__doc__, None, RESULTS_DIR, "video_quality")
    parser.add_argument("--pruned", action="store_true", help="the pruning-aware head (bench/video_model_pruned/, "
                        "fine-tuned from bench/video_model/ with --retrain); writes video_quality_pruned.*")
    args = parser.parse_args(argv)
    import evoprune_ext  # noqa: F401  (fails early if the package is not installed)

    model_dir = args.model_dir or (PRUNED_DIR if args.pruned else MODEL_DIR)
    stem = "video_quality_pruned" if args.pruned else "video_quality"
    torch.set_num_threads(TRAINING["threads"])
    steps = 2 if args.smoke else None
    if args.retrain and args.pruned:
        print("fine-tuning the clip head on pruned clips, the encoder frozen ...")
        model, record = finetune(steps)
        print(f"  fine-tuned in {record['finetune_seconds']} s")
        save(model, record, model_dir)
    elif args.retrain:
        print("training a SigLIP frame encoder and a clip head on the video digit task ...")
        model, record = train(steps)
        print(f"  trained in {record['train_seconds']} s")
        save(model, record, model_dir)
    elif args.smoke:  # the training path, so that it cannot rot
        finetune(steps, log=None) if args.pruned else train(steps, log=None)
    model, config = load(model_dir)
    task = config["task"]

    count = 20 if args.smoke else TEST_CLIPS
    retentions = [1.0, 0.25, 0.0625] if args.smoke else RETENTIONS
    alphas = [ALPHAS[1]] if args.smoke else ALPHAS
    deciding = [r for r in DECIDING if r in retentions]
    names = methods(alphas)
    x, y = test_set(task, count)
    start = time.perf_counter()
    print(f"accuracy at retentions {retentions} on {count} test clips:")
    rows, per_clip = run(model, x, y, names, retentions)
    chosen = choose(per_clip, alphas, deciding)
    seconds = time.perf_counter() - start

    table = markdown(rows, per_clip, names, retentions, chosen, task, count)
    print()
    print(table)
    print(f"recommended for video: mode {chosen['mode']}, alpha={chosen['alpha']:g}")
    finetuned = f", fine-tuning on pruned clips {config['finetune_seconds']} s" if "finetuning" in config else ""
    print(f"evaluation: {len(rows)} settings on {count} test clips in {seconds:.0f} s "
          f"(training took {config.get('train_seconds')} s{finetuned})")
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"task": task, "model": config["model"], "head": config["head"], "model_dir": model_dir.name,
              "train_seconds": config.get("train_seconds"), "finetuning": config.get("finetuning"),
              "finetune_seconds": config.get("finetune_seconds"), "test_clips": count,
              "eval_seconds": round(seconds, 1), "rows": rows, "chosen": chosen}
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(table)
    plot(rows, names, retentions, chosen, args.out / f"{stem}.png")
    print(f"wrote {args.out / stem}.json, .md, .png")
    return result


if __name__ == "__main__":
    main()
