"""One vLLM engine on a saved model, greedy generation for image prompts; writes what it saw as JSON.

    python vllm_engine.py MODEL_DIR OUT.json [KEEP_RATIO]     # no KEEP_RATIO: vLLM's own Qwen2.5-VL

Run it with `ENV` (site/sitecustomize.py on PYTHONPATH for every vLLM process, a 1 GiB KV cache).
"""

import json
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image

PROMPT = "USER : <|vision_start|><|image_pad|><|vision_end|> what is in this image ASSISTANT :"
SITE = Path(__file__).parent / "site"
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SITE), os.environ.get("PYTHONPATH", "")]),
           VLLM_CPU_KVCACHE_SPACE="1")
SIDES = [(32, 32), (48, 24)]  # pixels: grids of 16 x 16 and 24 x 12 patches (64 and 72 units)


def images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in SIDES]


def main(model: str, out: str, keep_ratio: float | None) -> None:
    from vllm import LLM, SamplingParams

    overrides = None
    if keep_ratio is not None:
        overrides = {"architectures": ["EvoPruneQwen2_5_VLForConditionalGeneration"],
                     "evoprune": {"keep_ratio": keep_ratio}}
    llm = LLM(model=model, enforce_eager=True, dtype="bfloat16", max_model_len=2048, hf_overrides=overrides,
              limit_mm_per_prompt={"image": 2, "video": 0})
    requests = [{"prompt": PROMPT, "multi_modal_data": {"image": image}} for image in images()]
    requests.append({"prompt": PROMPT + PROMPT, "multi_modal_data": {"image": images()}})
    results = llm.generate(requests, SamplingParams(max_tokens=8, temperature=0.0))
    json.dump([{"prompt": list(r.prompt_token_ids), "output": list(r.outputs[0].token_ids)} for r in results],
              open(out, "w"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], float(sys.argv[3]) if len(sys.argv) > 3 else None)
