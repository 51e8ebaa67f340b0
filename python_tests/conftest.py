"""Shared fixtures: the devices every parity test runs on (CUDA only where a GPU exists and the
extension was built with its CUDA kernels; a CPU-only build on a GPU machine skips them)."""

import importlib.metadata

import pytest
import torch

import evoprune_ext

# python_tests/serving needs vLLM and runs in its own venv (make test-vllm). Asked of the installed
# distributions: a find_spec("vllm") would also find folders named vllm on sys.path.
collect_ignore = [] if "vllm" in importlib.metadata.packages_distributions() else ["serving"]

HAS_CUDA = torch.cuda.is_available() and evoprune_ext.build_info()["cuda"]
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and a CUDA build of evoprune_ext")),
]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param
