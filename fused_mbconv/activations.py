"""Activation names shared by the eager blocks, the kernels' flags and conversion."""

from __future__ import annotations

import torch.nn as nn

# Block activations and SE gates, by the name users pass and kernels specialize on.
ACTIVATIONS = {
    "silu": nn.SiLU,
    "relu": nn.ReLU,
    "relu6": nn.ReLU6,
    "hardswish": nn.Hardswish,
}
GATES = {
    "sigmoid": nn.Sigmoid,
    "hardsigmoid": nn.Hardsigmoid,
}
# Every kind a kernel applies or differentiates, in the kernels' order: "identity" (the project
# BatchNorm, which has none), the block activations, then the SE gates.
KERNEL_ACTIVATIONS = ("identity",) + tuple(ACTIVATIONS) + tuple(GATES)


def make_activation(name: str, argument: str = "activation") -> nn.Module:
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(
            f"{argument} must be one of {sorted(ACTIVATIONS)}, got {name!r}"
        ) from None


def make_gate(name: str) -> nn.Module:
    try:
        return GATES[name]()
    except KeyError:
        raise ValueError(f"se_gate must be one of {sorted(GATES)}, got {name!r}") from None
