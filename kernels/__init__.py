"""Triton kernels and their launchers: the "triton" backend's kernel interface.

Installed as ``fused_mbconv.kernels``. Imported only when the triton backend is chosen, so a
missing Triton never breaks ``import fused_mbconv``.
"""

from .dwconv_bn_silu import dwconv_bn_silu_backward, dwconv_bn_silu_forward

__all__ = ["dwconv_bn_silu_forward", "dwconv_bn_silu_backward"]
