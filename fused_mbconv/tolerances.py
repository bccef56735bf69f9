"""The project's one tolerance rule (flash-attention's), shared by the tests and the CLI.

A fused result in dtype T is compared with a float64 reference computed from the same inputs.
Its error may be at most twice the error eager PyTorch makes in the same dtype T against that
reference, plus a small absolute floor per dtype scaled by the reference's magnitude:

    max|fused - ref64| <= 2 * max|eager_T - ref64| + ATOL[T] * max(1, max|ref64|)

In float16 and bfloat16, eager_T is ``eager_in(model, T)``: the model in T with its BatchNorms
in float32, as mixed-precision training runs them. A BatchNorm in T rounds its statistics,
affine parameters and running buffers to T and so loosens the bound without saying anything
about the fused kernels, which keep BatchNorm math in float32. The floors there are two units
in the last place of T (its eps): two roundings of a value of magnitude max(1, max|ref64|).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn

ATOL = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 2e-3,  # 2 * 2**-10
    torch.bfloat16: 1.6e-2,  # 2 * 2**-7
}
# The floors of one kernel-interface function against the reference function on the same
# inputs (tests/test_kernel_interface.py). In float64 both run float64 math that differs only in
# the order of its sums, a few roundings of the largest term; ATOL's float64 floor is a whole
# model's, where a step's differences feed the next.
KERNEL_ATOL = {**ATOL, torch.float64: 1e-12}
LOW_PRECISION = (torch.float16, torch.bfloat16)


def eager_in(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of the eager ``model`` in ``dtype`` whose error against the float64 reference
    bounds the fused model's: its BatchNorms stay float32 in a low-precision dtype."""
    eager = copy.deepcopy(model).to(dtype)
    if dtype in LOW_PRECISION:
        for module in eager.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.float()
    return eager


@dataclass(frozen=True)
class Comparison:
    fused_error: float
    eager_error: float
    bound: float
    reference_max: float

    @property
    def passed(self) -> bool:
        return self.fused_error <= self.bound

    @property
    def relative_error(self) -> float:
        """fused error / max|ref|; NaN where max|ref| is within eager's own rounding error (a
        gradient that is zero in exact arithmetic, e.g. a bias whose shift the next training
        BatchNorm removes), where a ratio to rounding noise says nothing."""
        if self.reference_max <= self.eager_error:
            return float("nan")
        return self.fused_error / self.reference_max


def compare(fused: torch.Tensor, eager: torch.Tensor, ref64: torch.Tensor,
            dtype: torch.dtype, factor: float = 2.0, floors=ATOL) -> Comparison:
    """Errors of ``fused`` and ``eager`` against ``ref64`` and the rule's bound.
    A non-finite fused value is an infinite error. ``factor`` replaces the rule's 2 where
    rounding differences compound (multi-step training, whole-network gradients: the tests'
    ``rounds``); ``floors`` is ATOL or KERNEL_ATOL."""
    ref = ref64.detach().double()
    if not ref.numel():  # an empty batch: nothing to differ
        return Comparison(0.0, 0.0, floors[dtype], 0.0)
    fused_diff = (fused.detach().double() - ref).abs()
    fused_error = fused_diff.max().item() if torch.isfinite(fused_diff).all() else float("inf")
    eager_error = (eager.detach().double() - ref).abs().max().item()
    reference_max = ref.abs().max().item()
    bound = factor * eager_error + floors[dtype] * max(1.0, reference_max)
    return Comparison(fused_error, eager_error, bound, reference_max)
