"""The classic build route: `python setup.py build_ext --inplace` with torch.utils.cpp_extension.

pyproject.toml (scikit-build-core + CMakeLists.txt) is the main route; both compile the sources
listed in csrc/sources.txt. CUDA kernels are built when a CUDA toolkit is found, unless
EVOPRUNE_CUDA=OFF (or forced with EVOPRUNE_CUDA=ON).
"""

import os
import re
from pathlib import Path

import torch
from setuptools import setup
from torch.utils import cpp_extension

ROOT = Path(__file__).parent
SOURCES = [
    line.strip()
    for line in (ROOT / "csrc" / "sources.txt").read_text().splitlines()
    if line.startswith("csrc/")
]
VERSION = re.search(r'^version = "(.+)"$', (ROOT / "pyproject.toml").read_text(), re.M).group(1)


def want_cuda() -> bool:
    mode = os.environ.get("EVOPRUNE_CUDA", "AUTO").upper()
    if mode not in ("AUTO", "ON", "OFF"):
        raise ValueError(f"EVOPRUNE_CUDA must be AUTO, ON or OFF, got {mode!r}")
    return mode == "ON" or (mode == "AUTO" and cpp_extension.CUDA_HOME is not None and torch.version.cuda is not None)


def extension():
    cuda = want_cuda()
    sources = [s for s in SOURCES if cuda or not s.startswith("csrc/cuda/")]
    defines = [f'-DEVOPRUNE_VERSION="{VERSION}"']
    # As CMakeLists.txt: at::parallel_for runs in parallel only in code compiled with torch's OpenMP.
    openmp = ["-fopenmp"] if torch.backends.openmp.is_available() else []
    cxx = ["-O3", "-ffp-contract=off"] + openmp  # as CMakeLists.txt: the vector clones round alike
    if cuda:
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        defines += ["-DEVOPRUNE_WITH_CUDA", f'-DEVOPRUNE_CUDA_ARCHS="{archs}"']
        return cpp_extension.CUDAExtension(
            "evoprune_ext._C", sources, extra_compile_args={"cxx": defines + cxx, "nvcc": defines + ["-O3"]},
            extra_link_args=openmp,
        )
    return cpp_extension.CppExtension(
        "evoprune_ext._C", sources, extra_compile_args={"cxx": defines + cxx}, extra_link_args=openmp
    )


setup(
    name="evoprune_ext",
    version=VERSION,
    packages=["evoprune_ext"],
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
)
