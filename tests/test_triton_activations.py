"""The Triton activations (kernels/jit_helpers.py, kinds named by string constexprs) against the
one table, fused_mbconv.activations.KINDS: every kind a kernel specializes on computes the
table's forward and gradient, kinks included; an unknown name is refused by the launchers (a
ValueError naming the valid kinds) and by the compiler."""

import pytest
import torch

from fused_mbconv.activations import KERNEL_ACTIVATIONS, KINDS
from fused_mbconv.tensors import NormArgs
from tolerances import assert_close_by_rule

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

import fused_mbconv.kernels as kernels  # noqa: E402
from fused_mbconv.kernels.jit_helpers import act, act_grad  # noqa: E402


@triton.jit
def _apply_kernel(y_ptr, out_ptr, grad_ptr, N, ACT: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    m = i < N
    y = tl.load(y_ptr + i, mask=m)
    tl.store(out_ptr + i, act(y, ACT), mask=m)
    tl.store(grad_ptr + i, act_grad(y, ACT), mask=m)


def _apply(y, name):
    out, grad = torch.empty_like(y), torch.empty_like(y)
    _apply_kernel[(1,)](y, out, grad, y.numel(), ACT=name, BLOCK=triton.next_power_of_2(y.numel()))
    return out, grad


def test_kernel_kinds_are_the_table():
    assert KERNEL_ACTIVATIONS == ("identity", "silu", "relu", "relu6", "hardswish", "sigmoid",
                                  "hardsigmoid")
    assert KERNEL_ACTIVATIONS == tuple(KINDS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", KERNEL_ACTIVATIONS)
def test_forward_and_gradient_match_the_table(name, dtype):
    kinks = torch.tensor([-6.0, -3.0, 0.0, 3.0, 6.0])
    y64 = torch.cat([kinks, torch.randn(50) * 4]).double()
    y = y64.to(dtype)
    out, grad = _apply(y, name)
    kind = KINDS[name]
    assert_close_by_rule(out, kind.forward(y), kind.forward(y.double()), dtype, f"{name} forward")
    assert_close_by_rule(grad, kind.grad(y), kind.grad(y.double()), dtype, f"{name} gradient")


def test_unknown_kind_fails_to_compile():
    with pytest.raises(Exception, match="unknown activation kind"):
        _apply(torch.zeros(4), "gelu")


def test_launchers_refuse_unknown_names():
    d = torch.randn(2, 3, 4, 4)
    bn = NormArgs(torch.zeros(3), torch.ones(3), None, None, 1e-5)
    with pytest.raises(ValueError, match=r"activation must be one of \[.*'silu'.*\], got 'gelu'"):
        kernels.mbconv_squeeze_forward(d, bn, "gelu")
    pooled = torch.randn(2, 3)
    se = (torch.randn(1, 3), torch.randn(1), torch.randn(3, 1), torch.randn(3))
    with pytest.raises(ValueError, match=r"gate must be one of .*'hardsigmoid'.*got 'tanh'"):
        kernels.mbconv_excite_forward(pooled, *se, "silu", "tanh")
