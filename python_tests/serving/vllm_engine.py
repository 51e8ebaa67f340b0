"""One vLLM engine in a subprocess of its own: greedy generation for a list of requests, tokens back as JSON.

    results = run_engine(tmp_path, model=DIR, requests=[request(PROMPT, images=1), ...], keep_ratio=0.25)

`run_engine` writes the job as JSON and runs this file on it (`python vllm_engine.py JOB.json OUT.json`) with `ENV`:
.ci/vllm-site/sitecustomize.py on the PYTHONPATH of every vLLM process, a 1 GiB KV cache, ranks not bound to cores
(two ranks share this machine's cores). Images and videos are random pixels made from a seed in the subprocess, so a
job stays small and the same request gives the same pixels in every engine. Each result: {"prompt": token ids,
"output": token ids}, and with `logprobs=n` "logprobs": the top n {token id: logprob} of each output token.
`run_transformers` gives the same from transformers (the parity tests); `visual_blocks(prompt)` lists a prompt's
runs of placeholders.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SITE = Path(__file__).resolve().parents[2] / ".ci" / "vllm-site"
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SITE), os.environ.get("PYTHONPATH", "")]),
           VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_OMP_THREADS_BIND="nobind")
IMAGE_SIDES = [(32, 32), (48, 24)]  # (width, height) pixels: 16 x 16 and 12 x 24 patches (64 and 72 units)
VIDEO_SIDE = (32, 32)  # each video: 4 frames -> t = 2 of 16 x 16 patches


IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"  # an image's place in a Qwen-VL prompt
VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"
RATIOS = [None, 1.0, 0.5, 0.25]  # None: vLLM's own model class
TWO_RANKS = dict(tensor_parallel_size=2, distributed_executor_backend="mp")
# vLLM's own model on two ranks against one: a control that holds vLLM itself to the bar EvoPrune's two-rank
# tests meet (measured 2.4e-7, docs/VLLM.md). It tests vLLM, not the plugin, and costs a two-rank engine per
# family, so CI leaves it out: EVOPRUNE_VLLM_CONTROLS=1 runs it.
control = pytest.mark.skipif(os.environ.get("EVOPRUNE_VLLM_CONTROLS") != "1",
                             reason="a control of vLLM itself: EVOPRUNE_VLLM_CONTROLS=1 runs it")
TOLERANCE = 1e-4  # float32 sums over 1 and over 2 ranks differ in their last bits, no more


def save_tiny_model(tmp_path_factory, builder) -> Path:
    """A tiny random model of `evoprune_ext.random_models` and its processor, saved. vLLM's CPU attention needs a
    head_dim of 32, 64, 80, ...: 64 over 2 heads."""
    model, processor = builder(text=dict(num_attention_heads=2))
    path = tmp_path_factory.mktemp(builder.__name__)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def runs_by_ratio(tmp_path_factory, model_dir: Path, requests: list[dict], architecture: str) -> dict:
    """{ratio: run_engine results} for each of RATIOS, one engine each."""
    return {
        ratio: run_engine(tmp_path_factory.mktemp("run"), model=model_dir, requests=requests, keep_ratio=ratio,
                          architecture=None if ratio is None else architecture)
        for ratio in RATIOS
    }


def request(prompt: str, *, images: int = 0, videos: int = 0, seed: int = 0, sides: list | None = None) -> dict:
    """`sides`: each image's (width, height) in pixels, IMAGE_SIDES in turn by default."""
    return {"prompt": prompt, "images": images, "videos": videos, "seed": seed, "sides": sides}


def run_engine(tmp: Path, *, model: str, requests: list[dict], architecture: str | None = None,
               keep_ratio: float | None = None, max_tokens: int = 8, passes: int = 1, dtype: str = "bfloat16",
               engine: dict | None = None, logprobs: int = 0, budget: str = "frame") -> list[dict]:
    """Generate for `requests` in a fresh engine, `passes` times over (the results of each pass, in order: a later
    pass finds the prefix cache warm). architecture=None: vLLM's own model class, unpruned. `engine`: more
    arguments of `vllm.LLM`. `logprobs`: the top so many logprobs of each output token, in the results."""
    job, out = tmp / "job.json", tmp / "out.json"
    job.write_text(json.dumps(dict(model=str(model), requests=requests, architecture=architecture,
                                   keep_ratio=keep_ratio, max_tokens=max_tokens, passes=passes, dtype=dtype,
                                   engine=engine or {}, logprobs=logprobs, budget=budget)))
    subprocess.run([sys.executable, __file__, str(job), str(out)], env=ENV, check=True, timeout=900)
    return json.loads(out.read_text())


def run_transformers(model_dir: Path, model_class: str, requests: list[dict], keep_ratio: float,
                     max_tokens: int = 8, budget: str = "frame", logprobs: int = 0) -> list[dict]:
    """The results `run_engine` gives, from transformers' `model_class` pruned by `evoprune_ext.patch`, in float32
    and in this process (its pixels are the engine's); with `logprobs`, those of the raw logits, as vLLM's."""
    import torch
    import transformers
    from transformers.video_utils import VideoMetadata

    import evoprune_ext

    model = getattr(transformers, model_class).from_pretrained(model_dir, dtype=torch.float32)
    processor = transformers.AutoProcessor.from_pretrained(model_dir)
    evoprune_ext.patch(model, keep_ratio=keep_ratio, processor=processor, budget=budget)
    results = []
    for spec in requests:
        clips = videos(spec["videos"], spec["seed"])
        inputs = processor(
            text=[spec["prompt"]], images=images(spec["images"], spec["seed"], spec.get("sides")) or None,
            videos=[frames for frames, _ in clips] or None,
            video_metadata=[VideoMetadata(**{k: v for k, v in m.items() if k != "do_sample_frames"})
                            for _, m in clips] or None,
            do_sample_frames=False, return_tensors="pt",
        )
        prompt = inputs["input_ids"][0].tolist()
        generated = model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False, output_logits=True,
                                   return_dict_in_generate=True)
        results.append({"prompt": prompt, "output": generated.sequences[0, len(prompt):].tolist()})
        if logprobs:
            steps = [step[0].log_softmax(-1).topk(logprobs) for step in generated.logits]
            results[-1]["logprobs"] = [{str(int(token)): float(value) for value, token in zip(*step)}
                                       for step in steps]
    return results


def largest_logprob_difference(a: list[dict], b: list[dict]) -> float:
    """The largest difference between the logprobs of a token both runs list at the same step."""
    return max(abs(x[token] - y[token]) for p, q in zip(a, b) for x, y in zip(p["logprobs"], q["logprobs"])
               for token in x.keys() & y.keys())


def assert_same(a_runs: list[dict], b_runs: list[dict], tolerance: float = TOLERANCE) -> None:
    """The same prompts and tokens, the same top tokens at each step, their logprobs within `tolerance`."""
    for a, b in zip(a_runs, b_runs, strict=True):
        assert a["prompt"] == b["prompt"] and a["output"] == b["output"]
        assert [step.keys() for step in a["logprobs"]] == [step.keys() for step in b["logprobs"]]
    assert largest_logprob_difference(a_runs, b_runs) <= tolerance


def visual_blocks(prompt: list[int], placeholders=("<|image_pad|>", "<|video_pad|>")) -> list[tuple[str, int]]:
    """(placeholder, length) of each run of image or video placeholders (Qwen-VL's by default)."""
    from evoprune_ext import random_models

    tokenizer = random_models.tokenizer()
    names = {tokenizer.convert_tokens_to_ids(name): name for name in placeholders}
    blocks, previous = [], None
    for token in prompt:
        name = names.get(token)
        if name is not None and name == previous:
            blocks[-1] = (name, blocks[-1][1] + 1)
        elif name is not None:
            blocks.append((name, 1))
        previous = name
    return blocks


def images(count: int, seed: int, sides: list | None = None) -> list:
    from PIL import Image

    rng = np.random.default_rng(seed)
    sides = [tuple((sides or IMAGE_SIDES)[i % len(sides or IMAGE_SIDES)]) for i in range(count)]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sides]


def videos(count: int, seed: int) -> list:
    """(frames [4, H, W, 3], metadata) as vLLM takes Qwen videos: 4 frames at 2 fps, not resampled."""
    rng = np.random.default_rng(seed + 1000)
    w, h = VIDEO_SIDE
    metadata = {"fps": 2.0, "duration": 2.0, "total_num_frames": 4, "frames_indices": [0, 1, 2, 3],
                "video_backend": "opencv", "do_sample_frames": False}
    return [(rng.integers(0, 256, (4, h, w, 3), dtype=np.uint8), dict(metadata)) for _ in range(count)]


def _inputs(spec: dict) -> dict:
    data = {}
    if spec["images"]:
        data["image"] = images(spec["images"], spec["seed"], spec.get("sides"))
    if spec["videos"]:
        data["video"] = videos(spec["videos"], spec["seed"])
    return {"prompt": spec["prompt"], "multi_modal_data": data}


def main(job_path: str, out: str) -> None:
    from vllm import LLM, SamplingParams

    job = json.loads(Path(job_path).read_text())
    overrides = None
    if job["architecture"] is not None:
        overrides = {"architectures": [job["architecture"]],
                     "evoprune": {"keep_ratio": job["keep_ratio"], "budget": job["budget"]}}
    most = {kind: max(spec[f"{kind}s"] for spec in job["requests"]) for kind in ("image", "video")}
    llm = LLM(model=job["model"], enforce_eager=True, dtype=job["dtype"], max_model_len=2048, hf_overrides=overrides,
              limit_mm_per_prompt=most, seed=0, **job["engine"])
    sampling = SamplingParams(max_tokens=job["max_tokens"], temperature=0.0, logprobs=job["logprobs"] or None)
    results = []
    for _ in range(job["passes"]):
        results += llm.generate([_inputs(spec) for spec in job["requests"]], sampling)
    Path(out).write_text(json.dumps([_result(r, job["logprobs"]) for r in results]))


def _result(output, logprobs: int) -> dict:
    result = {"prompt": list(output.prompt_token_ids), "output": list(output.outputs[0].token_ids)}
    if logprobs:
        # The top `logprobs` of each step (vLLM adds the sampled token's when it is not among them).
        result["logprobs"] = [
            {str(token): entry.logprob for token, entry in sorted(step.items(), key=lambda kv: kv[1].rank)[:logprobs]}
            for step in output.outputs[0].logprobs
        ]
    return result


if __name__ == "__main__":
    main(*sys.argv[1:])
