"""Functional fused ops, shaped like ``torch.nn.functional.batch_norm``.

Inputs are checked here, before any kernel runs, so a bad call fails with a message naming
the problem and leaves running statistics untouched. In training, running statistics are
updated in place exactly as ``nn.BatchNorm2d`` does (unbiased variance, ``momentum``).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import ops  # noqa: F401  (registers torch.ops.fused_mbconv)
from .ops.dwconv_bn_silu import conv_output_size

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_float(name: str, t: Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor (float16, bfloat16, float32 "
                        f"or float64), got {t.dtype}")


def _check_channel_vector(name: str, t: Optional[Tensor], x: Tensor) -> None:
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a tensor or None, got {type(t).__name__}")
    _check_float(name, t)
    if t.shape != (x.shape[1],):
        raise ValueError(f"{name} must have shape ({x.shape[1]},) to match the input's "
                         f"{x.shape[1]} channels, got {tuple(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but input is on {x.device}")


def check_dwconv_args(x: Tensor, weight: Tensor, stride: int, training: bool,
                      running_mean: Optional[Tensor], running_var: Optional[Tensor],
                      bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
                      momentum: float, eps: float) -> None:
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise ValueError(f"input must be a 4-D (N, C, H, W) tensor, got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    _check_float("input", x)
    channels = x.shape[1]
    if weight.dim() != 4 or weight.shape[0] != channels or weight.shape[1] != 1 \
            or weight.shape[2] != weight.shape[3]:
        raise ValueError(f"conv_weight must have shape (C, 1, k, k) with C={channels} "
                         f"(the input's channels), got {tuple(weight.shape)}")
    k = weight.shape[-1]
    if k % 2 == 0:
        raise ValueError(f"kernel size must be odd (padding k//2 keeps 'same' alignment), "
                         f"got {k}")
    if weight.dtype != x.dtype:
        raise TypeError(f"conv_weight dtype {weight.dtype} does not match input dtype {x.dtype}")
    if weight.device != x.device:
        raise ValueError(f"conv_weight is on {weight.device} but input is on {x.device}")
    if stride not in (1, 2):
        raise ValueError(f"stride must be 1 or 2, got {stride!r}")
    for name, t in (("running_mean", running_mean), ("running_var", running_var),
                    ("bn_weight", bn_weight), ("bn_bias", bn_bias)):
        _check_channel_vector(name, t, x)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together")
    if not training and running_mean is None:
        raise ValueError("running_mean and running_var are required when training=False")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps!r}")
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum!r}")
    if min(x.shape) == 0:
        raise ValueError(f"input has an empty dimension: shape {tuple(x.shape)}")
    if training:
        values = x.shape[0] * conv_output_size(x.shape[2], k, stride) * \
            conv_output_size(x.shape[3], k, stride)
        if values <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got "
                             f"input size {tuple(x.shape)} (output {values} value per channel)")


@torch.no_grad()
def update_running_stats(running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor,
                         count: int, momentum: float) -> None:
    """``nn.BatchNorm2d``'s update: the running variance takes the unbiased batch variance."""
    unbiased = var * (count / (count - 1))
    running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
    running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)


def _needs_grad(*tensors: Optional[Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def dwconv_bn_silu(input: Tensor, conv_weight: Tensor, running_mean: Optional[Tensor],
                   running_var: Optional[Tensor], bn_weight: Optional[Tensor] = None,
                   bn_bias: Optional[Tensor] = None, stride: int = 1, training: bool = False,
                   momentum: float = 0.1, eps: float = 1e-5) -> Tensor:
    """SiLU(BatchNorm2d(Conv2d(C, C, k, stride, padding=k//2, groups=C, bias=False)(input))).

    The output keeps the input's memory format (NCHW or channels_last)."""
    check_dwconv_args(input, conv_weight, stride, training, running_mean, running_var,
                      bn_weight, bn_bias, momentum, eps)
    x = input if input.is_contiguous(memory_format=torch.channels_last) else input.contiguous()
    out, _, mean, var = torch.ops.fused_mbconv.dwconv_bn_silu(
        x, conv_weight.contiguous(), bn_weight, bn_bias, running_mean, running_var, stride,
        training, eps, _needs_grad(input, conv_weight, bn_weight, bn_bias))
    if training and running_mean is not None:
        update_running_stats(running_mean, running_var, mean, var,
                             out.numel() // out.shape[1], momentum)
    return out
