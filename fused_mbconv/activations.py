"""The one table of activations: names the blocks, the kernels' flags and conversion share, each
kind's module and its math (forward and gradient side by side, in aten ops: the specification
``fused_mbconv.reference`` runs and every kernel backend follows)."""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

Tensor = torch.Tensor


class Kind(NamedTuple):
    role: str  # "activation" (of a block), "gate" (of the SE) or "none" (BN3's identity)
    module: Optional[type]  # the nn.Module a block holds for it
    forward: Callable[[Tensor], Tensor]
    grad: Callable[[Tensor], Tensor]  # d forward / dy, with aten's choices at the kinks


def _silu_grad(y: Tensor) -> Tensor:
    s = torch.sigmoid(y)
    return s * (1 + y * (1 - s))


def _sigmoid_grad(y: Tensor) -> Tensor:
    s = torch.sigmoid(y)
    return s * (1 - s)


def _hardswish_grad(y: Tensor) -> Tensor:
    return torch.where(y < -3, 0.0, torch.where(y <= 3, y / 3 + 0.5, 1.0)).to(y.dtype)


# Every kind a kernel applies or differentiates, in the kernels' order: "identity" (the project
# BatchNorm, which has none), the block activations, then the SE gates.
KINDS = {
    "identity": Kind("none", None, lambda y: y, torch.ones_like),
    "silu": Kind("activation", nn.SiLU, F.silu, _silu_grad),
    "relu": Kind("activation", nn.ReLU, F.relu, lambda y: (y > 0).to(y.dtype)),
    "relu6": Kind("activation", nn.ReLU6, F.relu6, lambda y: ((y > 0) & (y < 6)).to(y.dtype)),
    "hardswish": Kind("activation", nn.Hardswish, F.hardswish, _hardswish_grad),
    "sigmoid": Kind("gate", nn.Sigmoid, torch.sigmoid, _sigmoid_grad),
    "hardsigmoid": Kind("gate", nn.Hardsigmoid, F.hardsigmoid,
                        lambda y: ((y > -3) & (y < 3)).to(y.dtype) / 6),
}
KERNEL_ACTIVATIONS = tuple(KINDS)
# Block activations and SE gates, by the name users pass and kernels specialize on.
ACTIVATIONS = {name: kind.module for name, kind in KINDS.items() if kind.role == "activation"}
GATES = {name: kind.module for name, kind in KINDS.items() if kind.role == "gate"}


def check_name(name: str, choices, argument: str) -> str:
    """``name`` if it is one of ``choices`` (names of KINDS), else a ValueError naming the
    argument and the valid names."""
    if name not in choices:
        raise ValueError(f"{argument} must be one of {sorted(choices)}, got {name!r}")
    return name


def kernel_kind(name: str, argument: str = "activation") -> str:
    """``name`` checked against every kind a kernel specializes on."""
    return check_name(name, KINDS, argument)


def make_activation(name: str, argument: str = "activation") -> nn.Module:
    return ACTIVATIONS[check_name(name, ACTIVATIONS, argument)]()


def make_gate(name: str) -> nn.Module:
    return GATES[check_name(name, GATES, "se_gate")]()
