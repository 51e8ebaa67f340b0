"""Defaults shared by the ops' schemas, the reference and the encoder wrapper.

DEFAULT_ALPHA must equal the `alpha=` default in csrc/ops.cpp (a test checks it).
"""

# Weight of attention importance against diversity in the greedy score (SPEC.md section 3).
DEFAULT_ALPHA = 0.1
