"""Builds (once, cached in build/sim/) and loads the test-only `evoprune_sim` ops of harness.cpp:
the CUDA kernels of csrc/cuda/*_kernel.cuh executed on the CPU through cuda_sim.h."""

from pathlib import Path

import torch
import torch.utils.cpp_extension

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def load():
    build = ROOT / "build" / "sim"
    build.mkdir(parents=True, exist_ok=True)
    torch.utils.cpp_extension.load(
        name="evoprune_sim",
        sources=[str(HERE / "harness.cpp"), str(HERE / "cuda_sim.cpp")],
        extra_include_paths=[str(ROOT), str(HERE)],
        # -O1: the kernels run as hundreds of fibers; unoptimized they are several times slower,
        # and -O2 doubles the build time for little gain.
        extra_cflags=["-O1", "-Wall", "-Werror"],
        build_directory=str(build),
        is_python_module=False,
    )
    return torch.ops.evoprune_sim
