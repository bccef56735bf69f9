"""The one tolerance rule of the test suite; defined in ``fused_mbconv.tolerances`` so the
``fused-mbconv verify`` command applies the same rule."""

import math

import torch

from fused_mbconv.tolerances import (  # noqa: F401  (re-exported)
    ATOL, KERNEL_ATOL, compare, eager_in)
from fused_mbconv.verification import GRADIENT_FACTOR

# Gradients at the end of a whole network's backward: the rule compounded as `verify` does.
NETWORK_GRADIENT_ROUNDS = round(math.log2(GRADIENT_FACTOR))


def assert_close_by_rule(fused: torch.Tensor, eager: torch.Tensor, ref64: torch.Tensor,
                         dtype: torch.dtype, what: str = "", rounds: int = 1,
                         floors=ATOL) -> None:
    """The rule, its factor 2 compounded ``rounds`` times where rounding differences compound:
    once per training step that led to the value (a step starts from the parameters the last
    one's rounding left), and for gradients at the end of a whole network's backward.
    ``floors``: ATOL, or KERNEL_ATOL for one kernel-interface function."""
    assert fused.shape == ref64.shape, f"{what}: shape {tuple(fused.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(fused).all(), f"{what}: non-finite values"
    result = compare(fused, eager, ref64, dtype, factor=2.0 ** rounds, floors=floors)
    assert result.passed, (f"{what}: fused error {result.fused_error:.3g} exceeds "
                           f"{result.bound:.3g} (eager {dtype} error {result.eager_error:.3g})")
