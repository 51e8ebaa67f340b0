"""Microbenchmark of torch.ops.evoprune.prune against the pure-PyTorch reference (and the peers).

Shapes (the foundation issue's S1-S4, plus S5):
  S1 CLIP-L/336  B=1,  N=577,  D=1024, metric Dm=64, protect=1, K=145, attn [1,16,577,577]
  S2 SigLIP-384  B=1,  N=729,  D=1152, metric Dm=72, K=182, importance [1,729]
  S3 video       B=16 frames of S2
  S4 high-res    B=1,  N=4096, D=1024, metric = tokens, K=1024
  S5 long video  B=32 frames of S2
Prints, per shape, the median (min, max) of repeated runs in one process, the speedup of the op
over the reference, and the op's time over one torch.bmm of the N x N x Dm similarity (the
unavoidable work of a full similarity). Nothing is asserted: speed is measured, not tested.

    python bench/bench_ops.py [--quick | --sweep | --shapes S1,S2] [--peers tome,divprune] [--device cpu|cuda]
                              [--profile] [--scaling] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import evoprune_ext  # noqa: F401  (registers torch.ops.evoprune)
from evoprune_ext import reference

sys.path.insert(0, str(Path(__file__).parent))


@dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    tokens: int
    dim: int
    metric_dim: int | None  # None: the tokens are the metric
    keep: int
    protect: int = 0
    heads: int = 0  # > 0: attn is [B, heads, N, N] attention; 0: a reduced [B, N] importance


SHAPES = {
    "S1": Shape("S1 CLIP-L/336", 1, 577, 1024, 64, 145, protect=1, heads=16),
    "S2": Shape("S2 SigLIP-384", 1, 729, 1152, 72, 182),
    "S3": Shape("S3 video 16x S2", 16, 729, 1152, 72, 182),
    "S4": Shape("S4 high-res", 1, 4096, 1024, None, 1024),
    "S5": Shape("S5 video 32x S2", 32, 729, 1152, 72, 182),
}
QUICK = {"Q1": Shape("Q1 tiny", 2, 65, 32, 8, 17, protect=1, heads=2)}
# The sweep over N: one image of N tokens, D=1024, Dm=64, keep a quarter, reduced importance.
SWEEP = [Shape(f"sweep N={n}", 1, n, 1024, 64, n // 4) for n in (576, 1024, 2304, 4096, 9216, 16384)]


def make_inputs(shape: Shape, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    b, n = shape.batch, shape.tokens
    tokens = torch.randn(b, n, shape.dim, generator=g)
    metric = None if shape.metric_dim is None else torch.randn(b, n, shape.metric_dim, generator=g)
    if shape.heads:
        attn = torch.randn(b, shape.heads, n, n, generator=g).softmax(-1)
    else:
        attn = torch.rand(b, n, generator=g)
    move = lambda t: None if t is None else t.to(device)  # noqa: E731
    return move(tokens), move(attn), move(metric)


def time_once(fn, device: str) -> float:
    """Seconds of one call."""
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure(fns: dict, *, repeats: int, device: str, fewer: dict | None = None) -> dict[str, list[float]]:
    """Seconds per call of each function, after one warm-up call each, interleaved: round r calls every
    function once, so a noisy moment of a shared machine hits them alike. `fewer`: name -> how many calls for
    slow functions (they take part in the first rounds only)."""
    fewer = fewer or {}
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for r in range(repeats):
        for name, fn in fns.items():
            if r < fewer.get(name, repeats):
                times[name].append(time_once(fn, device))
    return times


def summary(times: list[float]) -> dict:
    return {"median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times), "max_ms": 1e3 * max(times)}


def bench_shape(shape: Shape, *, device: str, repeats: int, peers: dict) -> dict:
    tokens, attn, metric = make_inputs(shape, device)
    kwargs = dict(keep=shape.keep, metric=metric, alpha=0.1, protect=shape.protect)
    similarity_metric = tokens if metric is None else metric

    def op():
        return torch.ops.evoprune.prune(tokens, attn, **kwargs)

    def ref():
        return reference.prune(tokens, attn, **kwargs)

    def bmm():
        return torch.bmm(similarity_metric, similarity_metric.transpose(1, 2))

    importance = attn.mean((1, 2)) if attn.dim() == 4 else attn
    sizes = torch.ones(tokens.shape[:2], device=device)
    fns = {"op": op, "reference": ref, "bmm": bmm}
    for name, step in peers.items():
        fns[name] = lambda step=step: step(tokens, similarity_metric, importance, sizes, keep=shape.keep,
                                           protect=shape.protect, alpha=0.1, merge=True)
    # The reference and the peers run one Python step per greedy iteration: fewer calls keep the run short.
    slow = max(3, repeats // 4)
    with torch.inference_mode():
        times = measure(fns, repeats=repeats, device=device, fewer={name: slow for name in fns if name not in ("op", "bmm")})
    row = {"shape": shape.name, **{name: summary(t) for name, t in times.items()}}
    op_ms = row["op"]["median_ms"]
    row["speedup_vs_reference"] = row["reference"]["median_ms"] / op_ms
    row["op_over_bmm"] = op_ms / row["bmm"]["median_ms"]
    for name in peers:
        row[f"speedup_vs_{name}"] = row[name]["median_ms"] / op_ms
    return row


def thread_scaling(shape: Shape, *, repeats: int) -> dict:
    """The op at `shape` with 1 thread and with every thread, interleaved call by call (CPU)."""
    tokens, attn, metric = make_inputs(shape, "cpu")
    threads = torch.get_num_threads()

    def with_threads(n):
        def run():
            torch.set_num_threads(n)
            try:
                torch.ops.evoprune.prune(tokens, attn, keep=shape.keep, metric=metric, protect=shape.protect)
            finally:
                torch.set_num_threads(threads)
        return run

    with torch.inference_mode():
        times = measure({"1": with_threads(1), str(threads): with_threads(threads)}, repeats=repeats, device="cpu")
    one, many = (statistics.median(t) * 1e3 for t in times.values())
    return {"shape": shape.name, "threads": threads, "ms_1_thread": one, "ms_all_threads": many, "scaling": one / many}


def profile(shape: Shape, *, repeats: int) -> dict:
    """Where the op's time goes at `shape` (CPU): its stages as separate ops, against the work no
    implementation can skip: the similarities of the K kept tokens to all N (a K x N x Dm bmm: the greedy
    reads the row of each pick), one read of the attention and one of the tokens (each timed as a sum over
    the tensor). All interleaved call by call; the full N x N x Dm bmm for comparison."""
    tokens, attn, metric = make_inputs(shape, "cpu")
    similarity_metric = tokens if metric is None else metric
    importance = torch.ops.evoprune.importance(attn) if attn.dim() == 4 else attn
    kwargs = dict(keep=shape.keep, alpha=0.1, protect=shape.protect)
    index, slot = torch.ops.evoprune.select(similarity_metric, importance, **kwargs)
    fns = {"op": lambda: torch.ops.evoprune.prune(tokens, attn, metric=metric, **kwargs)}
    if attn.dim() == 4:
        fns["importance"] = lambda: torch.ops.evoprune.importance(attn)
    fns |= {
        "select": lambda: torch.ops.evoprune.select(similarity_metric, importance, **kwargs),
        "merge": lambda: torch.ops.evoprune.merge(tokens, index, slot),
        "bmm": lambda: torch.bmm(similarity_metric, similarity_metric.transpose(1, 2)),
        "K rows": lambda: torch.bmm(similarity_metric[:, : shape.keep], similarity_metric.transpose(1, 2)),
        "read attn": lambda: attn.sum(),
        "read tokens": lambda: tokens.sum(),
    }
    with torch.inference_mode():
        times = measure(fns, repeats=repeats, device="cpu")
    row = {"shape": shape.name, **{name: 1e3 * statistics.median(t) for name, t in times.items()}}
    row["floor"] = row["K rows"] + row["read tokens"] + (row["read attn"] if attn.dim() == 4 else 0.0)
    row["op_over_floor"] = row["op"] / row["floor"]
    return row


def importance_floor(*, keep_ratio: float = 0.25, repeats: int = 10) -> dict:
    """SigLIP-so400m/384's importance at the default schedule's 4 pruning layers (all 729 query rows, 16 heads of
    72, the token counts each layer sees at `keep_ratio`): importance_from_qk against the q @ k^T its logits need
    alone (torch.matmul), summed over the layers; medians of interleaved calls."""
    from evoprune_ext.schedule import schedule_keeps

    counts = [729] + schedule_keeps(729, 0, keep_ratio, 4)[:-1]
    g = torch.Generator().manual_seed(0)
    total = {"importance_from_qk": 0.0, "q @ k^T": 0.0}
    with torch.inference_mode():
        for n in counts:
            q, k = torch.randn(1, 16, n, 72, generator=g), torch.randn(1, 16, n, 72, generator=g)
            times = measure({"importance_from_qk": lambda: torch.ops.evoprune.importance_from_qk(q, k, 72**-0.5),
                             "q @ k^T": lambda: torch.matmul(q, k.transpose(-1, -2))}, repeats=repeats, device="cpu")
            for name, t in times.items():
                total[name] += 1e3 * statistics.median(t)
    return {"token_counts": counts, **{f"{name} ms": ms for name, ms in total.items()}}


PROFILE_COLUMNS = ["op", "importance", "select", "merge", "bmm", "K rows", "read attn", "read tokens", "floor"]


def format_profile(rows: list[dict]) -> str:
    header = ["shape"] + [f"{c} ms" for c in PROFILE_COLUMNS] + ["op / floor"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r["shape"]] + [f"{r[c]:.2f}" if c in r else "-" for c in PROFILE_COLUMNS]
        lines.append("| " + " | ".join(cells + [f"{r['op_over_floor']:.2f}"]) + " |")
    return "\n".join(lines)


def format_scaling(scaling: dict) -> str:
    return (f"{scaling['shape']}: {scaling['ms_1_thread']:.2f} ms with 1 thread, {scaling['ms_all_threads']:.2f} ms "
            f"with {scaling['threads']}: {scaling['scaling']:.2f}x")


def format_table(rows: list[dict], peers: list[str]) -> str:
    header = ["shape", "op ms (min-max)", "reference ms", "op speedup", "op / bmm"] + [f"{p} ms" for p in peers]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        o = r["op"]
        cells = [
            r["shape"],
            f"{o['median_ms']:.2f} ({o['min_ms']:.2f}-{o['max_ms']:.2f})",
            f"{r['reference']['median_ms']:.2f}",
            f"{r['speedup_vs_reference']:.1f}x",
            f"{r['op_over_bmm']:.2f}",
        ] + [f"{r[p]['median_ms']:.2f} ({r[f'speedup_vs_{p}']:.1f}x)" for p in peers]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def load_peers(names: str) -> dict:
    if not names:
        return {}
    from peers import PEERS  # bench/peers.py

    return {name: PEERS[name] for name in names.split(",")}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="S1,S2,S3,S4", help="comma-separated names from " + ",".join(SHAPES))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--peers", default="", help="comma-separated names from bench/peers.py, e.g. tome,divprune")
    parser.add_argument("--quick", action="store_true", help="one tiny shape, few repeats (smoke run)")
    parser.add_argument("--sweep", action="store_true", help="the sweep over N (576 to 16,384) instead of --shapes")
    parser.add_argument("--scaling", action="store_true", help="also the op at S3 with 1 thread against all threads")
    parser.add_argument("--profile", action="store_true", help="also where the op's time goes at each shape")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = parser.parse_args(argv)

    if args.quick:
        shapes = list(QUICK.values())
    elif args.sweep:
        shapes = SWEEP
    else:
        shapes = [SHAPES[s] for s in args.shapes.split(",")]
    repeats = 3 if args.quick else args.repeats
    peers = load_peers(args.peers)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}", flush=True)
    rows = []
    for shape in shapes:
        print(f"  measuring {shape.name} ...", flush=True)
        rows.append(bench_shape(shape, device=args.device, repeats=repeats, peers=peers))
    print(format_table(rows, list(peers)))
    if args.profile:
        print(format_profile([profile(shape, repeats=repeats) for shape in shapes]))
    if args.scaling:
        print(format_scaling(thread_scaling(QUICK["Q1"] if args.quick else SHAPES["S3"], repeats=repeats)))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
