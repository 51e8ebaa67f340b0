"""EvoPrune: visual token pruning inside vision encoders, as fused PyTorch ops.

Importing the package loads the native library, which registers ``torch.ops.evoprune.*``
(``prune``, ``select``, ``merge``, ``importance``, ``importance_from_qk``, and the packed forms
``prune_packed``, ``select_packed``, ``importance_from_qk_packed``; see SPEC.md and
docs/ALGORITHM.md) with their autograd, and attaches their fake kernels (``evoprune_ext.ops``).
``evoprune_ext.patch(model, keep_ratio=...)`` makes a Hugging Face vision tower, or the multimodal LLM around it,
prune inside its encoder (``evoprune_ext.patching``; transformers is imported only then).
"""

import torch  # noqa: F401  (loads libtorch before the extension that links against it)

from . import _C, ops
from .defaults import DEFAULT_ALPHA
from .ops import Pruned, prune
from .patching import patch, unpatch
from .schedule import kept_tokens

__all__ = ["DEFAULT_ALPHA", "Pruned", "build_info", "kept_tokens", "ops", "patch", "prune", "unpatch"]


def build_info() -> dict:
    """How the native library was built: version, CUDA kernels and archs, intra-op threads."""
    return _C.build_info()
