"""Every op on small and awkward shapes, for compute-sanitizer (memcheck, racecheck) in `make gpu-check`.

Awkward: N = 1, K = P, K = N, Dm = 0, D = 1, non-contiguous inputs, both similarity paths, red/owner in shared
memory and in the global workspace, sizes around the 48 KiB opt-in. Small enough to
run in seconds under the sanitizer (which slows kernels 10-100x). It checks validity only: the tests compare.

    compute-sanitizer --tool memcheck python bench/sanitize_gpu.py
"""

import torch

import evoprune_ext  # noqa: F401  (registers torch.ops.evoprune)
from evoprune_ext import testing

ops = torch.ops.evoprune
CUDA = "cuda"

# (B, N, D, Dm, keep, protect): Dm None = the tokens are the metric
CASES = [
    (1, 1, 4, None, 1, 0),
    (2, 7, 1, None, 3, 1),
    (2, 40, 16, 0, 5, 1),  # empty metric
    (2, 40, 16, 8, 5, 5),  # keep = protect
    (2, 33, 16, 8, 33, 0),  # keep = N
    (3, 197, 40, 16, 99, 1),  # similarity matrix
    (2, 577, 24, 16, 20, 1),  # dot products in the kernel
    (1, 6000, 8, 8, 20, 1),  # 47 KiB of float32 state (70 KiB in float64): around the 48 KiB opt-in
    (1, 20000, 4, 4, 12, 0),  # state in the global workspace
]


def run(dtype):
    gen = torch.Generator().manual_seed(0)
    for b, n, d, dm, keep, protect in CASES:
        tokens = torch.randn(b, n, 2 * d, generator=gen).to(dtype)[..., ::2].to(CUDA)  # non-contiguous
        metric = None if dm is None else torch.randn(b, n, dm, generator=gen).to(dtype).to(CUDA)
        attn = torch.rand(b, 2, 3, n, generator=gen).softmax(-1).to(dtype).to(CUDA)
        sizes = (torch.rand(b, n, generator=gen) + 0.5).to(CUDA)
        for merge in (True, False):
            out, index, sizes_out, slot = ops.prune(tokens, attn, keep=keep, metric=metric, sizes=sizes,
                                                    protect=protect, merge=merge)
            testing.check_valid(index, slot, keep=keep, protect=protect)
        ops.merge(tokens, index, slot, sizes)
        ops.select(tokens if metric is None else metric, ops.importance(attn), keep=keep, protect=protect)
        q = attn.new_empty(b, 2, 5, 8).normal_()
        ops.importance_from_qk(q, attn.new_empty(b, 2, n, 8).normal_(), 0.3)
    torch.cuda.synchronize()


if __name__ == "__main__":
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        run(dtype)
    print("sanitize_gpu: every op ran on", len(CASES), "shapes in 3 dtypes")
