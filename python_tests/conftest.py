"""Shared fixtures: the devices every parity test runs on (CUDA only where a GPU exists and the
extension was built with its CUDA kernels; a CPU-only build on a GPU machine skips them)."""

import importlib.metadata
from pathlib import Path

import pytest
import torch

import evoprune_ext

# python_tests/serving needs vLLM and runs in its own venv (make test-vllm). Asked of the installed
# distributions: a find_spec("vllm") would also find folders named vllm on sys.path.
collect_ignore = [] if "vllm" in importlib.metadata.packages_distributions() else ["serving"]
KERNELS = Path(__file__).resolve().parent / "kernels"


def pytest_ignore_collect(collection_path, config):
    """python_tests/kernels executes the CUDA kernels' source on the CPU (its own build, minutes): `make test-kernels`
    runs it by naming it; `make test` skips it."""
    if collection_path != KERNELS:
        return None
    named = any(Path(arg.split("::")[0]).resolve().is_relative_to(KERNELS) for arg in config.args)
    return None if named else True

HAS_CUDA = torch.cuda.is_available() and evoprune_ext.build_info()["cuda"]
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and a CUDA build of evoprune_ext")),
]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param
