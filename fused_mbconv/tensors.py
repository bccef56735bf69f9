"""Layout and precision conventions shared by every backend and op.

- Outputs keep their input's memory format (NCHW or channels_last).
- Statistics and intermediate math run in float32 for 16-bit and float32 inputs, and in
  float64 for float64 inputs (so gradcheck sees exact float64 math).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(
            memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def like_input(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``t`` laid out like ``x`` (a no-op when it already is)."""
    return t.contiguous(memory_format=memory_format_of(x))


def empty_like_input(x: torch.Tensor, shape, dtype=None) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype or x.dtype, device=x.device,
                       memory_format=memory_format_of(x))


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class NormArgs(NamedTuple):
    """What a kernel needs to apply one BatchNorm: per-channel ``mean`` and biased ``var``
    (accumulate dtype: the batch's in training, the running ones in eval), the optional affine
    ``weight``/``bias`` (any float dtype; None means 1 / 0) and ``eps``."""

    mean: torch.Tensor
    var: torch.Tensor
    weight: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]
    eps: float
