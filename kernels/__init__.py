"""Triton kernels and their launchers: the "triton" backend's kernel interface.

Installed as ``fused_mbconv.kernels``. Imported only when the triton backend is chosen, so a
missing Triton never breaks ``import fused_mbconv``.
"""
