"""Triton kernels and their launchers: the "triton" backend's kernel interface.

Installed as ``fused_mbconv.kernels``. Imported only when the triton backend is chosen, so a
missing Triton never breaks ``import fused_mbconv``. Modules: ``jit_helpers`` (the JIT
functions every kernel shares: tiles, activations by name, BatchNorm math), ``common`` (the
problem, argument packing, the reduction kernels), ``dwconv_bn_silu`` (depthwise kernels and
that op), ``mbconv`` (the block's GEMM, SE and output kernels), ``registry`` (every compiled
variant, for ``compile_report``).
"""

from .dwconv_bn_silu import dwconv_bn_silu_backward, dwconv_bn_silu_forward
from .mbconv import (mbconv_dwconv_backward, mbconv_dwconv_backward_stats,
                     mbconv_dwconv_forward, mbconv_excite_backward, mbconv_excite_forward,
                     mbconv_expand_backward, mbconv_expand_forward,
                     mbconv_output_backward_stats, mbconv_output_forward,
                     mbconv_project_backward, mbconv_project_forward, mbconv_squeeze_forward)

__all__ = ["dwconv_bn_silu_forward", "dwconv_bn_silu_backward",
           "mbconv_expand_forward", "mbconv_dwconv_forward", "mbconv_squeeze_forward",
           "mbconv_excite_forward", "mbconv_project_forward", "mbconv_output_forward",
           "mbconv_output_backward_stats", "mbconv_project_backward", "mbconv_excite_backward",
           "mbconv_dwconv_backward_stats", "mbconv_dwconv_backward", "mbconv_expand_backward"]
