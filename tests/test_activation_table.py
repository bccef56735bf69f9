"""The C++ activation list (csrc/include/fused_mbconv/activations.h's X-macro) is
fused_mbconv.activations.KERNEL_ACTIVATIONS without "identity", in its order; the compiled
library accepts every name where its role allows it, and refuses an unknown one by listing the
valid names."""

import re
from pathlib import Path

import pytest
import torch

import fused_mbconv as fm
from fused_mbconv import activations, extension, reference
from fused_mbconv.tensors import NormArgs

HEADER = Path(__file__).resolve().parent.parent / "csrc/include/fused_mbconv/activations.h"
CPU_OK, CPU_REASON = fm.backends.backend_status("cpu")
needs_cpu_ext = pytest.mark.skipif(not CPU_OK, reason=f"cpu extension unavailable: {CPU_REASON}")


def _cxx_list():
    """[(name, role)] of FUSED_MBCONV_FOR_EACH_ACTIVATION, in order."""
    text = HEADER.read_text()
    body = re.search(r"#define FUSED_MBCONV_FOR_EACH_ACTIVATION\(X\)((?:.*\\\n)*.*\n)", text)
    assert body, f"no FUSED_MBCONV_FOR_EACH_ACTIVATION(X) in {HEADER}"
    return re.findall(r'X\(\s*k\w+\s*,\s*"(\w+)"\s*,\s*(\w+)\s*\)', body.group(1))


def test_cxx_list_is_the_kernel_activations_without_identity():
    entries = _cxx_list()
    assert tuple(name for name, _ in entries) == tuple(
        a for a in activations.KERNEL_ACTIVATIONS if a != "identity")
    assert [name for name, role in entries if role == "Block"] == list(activations.ACTIVATIONS)
    assert [name for name, role in entries if role == "Gate"] == list(activations.GATES)


def _bn(c):
    return NormArgs(torch.randn(c, dtype=torch.float64) * 0.2,
                    torch.rand(c, dtype=torch.float64) + 0.5,
                    torch.rand(c, dtype=torch.float64) + 0.5, torch.randn(c, dtype=torch.float64),
                    1e-5)


def _squeeze_case(n=2, c=5):
    d = torch.randn(n, c, 6, 7, dtype=torch.float64) * 3  # across every activation's kinks
    return d, _bn(c), torch.randn_like(d), torch.randn(n, c, dtype=torch.float64)


def _excite_case(n=3, c=6, s=2):
    t = dict(dtype=torch.float64)
    return (torch.randn(n, c, **t) * 3, torch.randn(s, c, **t), torch.randn(s, **t),
            torch.randn(c, s, **t), torch.randn(c, **t))


def _assert_same(got, want):
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-11 * max(1.0, w.abs().max().item()))


@needs_cpu_ext
@pytest.mark.parametrize("name", list(activations.ACTIVATIONS))
def test_every_block_activation_runs(name):
    d, bn2, grad_a2, grad_pooled = _squeeze_case()
    _assert_same([extension.mbconv_squeeze_forward(d, bn2, name)],
                 [reference.mbconv_squeeze_forward(d, bn2, name)])
    args = (grad_a2, grad_pooled, d, bn2, name)
    _assert_same(extension.mbconv_dwconv_backward_stats(*args),
                 reference.mbconv_dwconv_backward_stats(*args))
    pooled, w1, b1, w2, b2 = _excite_case()  # as the SE activation
    _assert_same([extension.mbconv_excite_forward(pooled, w1, b1, w2, b2, name, "sigmoid")],
                 [reference.mbconv_excite_forward(pooled, w1, b1, w2, b2, name, "sigmoid")])


@needs_cpu_ext
@pytest.mark.parametrize("name", list(activations.GATES))
def test_every_gate_runs(name):
    pooled, w1, b1, w2, b2 = _excite_case()
    _assert_same([extension.mbconv_excite_forward(pooled, w1, b1, w2, b2, "relu", name)],
                 [reference.mbconv_excite_forward(pooled, w1, b1, w2, b2, "relu", name)])
    grad_gate = torch.randn_like(pooled)
    args = (grad_gate, pooled, w1, b1, w2, b2, "relu", name)
    _assert_same(extension.mbconv_excite_backward(*args), reference.mbconv_excite_backward(*args))


def _valid(names):
    return re.escape(", ".join(names))


@needs_cpu_ext
@pytest.mark.parametrize("name", ["gelu", "identity", "sigmoid", "SiLU", ""])
def test_unknown_block_activation_lists_the_valid_names(name):
    d, bn2, grad_a2, _ = _squeeze_case()
    message = f"activation must be one of {_valid(activations.ACTIVATIONS)}, got '{name}'"
    with pytest.raises(ValueError, match="mbconv_squeeze_forward: " + message):
        extension.mbconv_squeeze_forward(d, bn2, name)
    with pytest.raises(ValueError, match="mbconv_dwconv_backward_stats: " + message):
        extension.mbconv_dwconv_backward_stats(grad_a2, None, d, bn2, name)
    pooled, w1, b1, w2, b2 = _excite_case()
    with pytest.raises(ValueError, match="mbconv_excite_forward: se_" + message):
        extension.mbconv_excite_forward(pooled, w1, b1, w2, b2, name, "sigmoid")


@needs_cpu_ext
@pytest.mark.parametrize("name", ["tanh", "identity", "silu", "Sigmoid"])
def test_unknown_gate_lists_the_valid_names(name):
    pooled, w1, b1, w2, b2 = _excite_case()
    message = f"gate must be one of {_valid(activations.GATES)}, got '{name}'"
    with pytest.raises(ValueError, match="mbconv_excite_forward: " + message):
        extension.mbconv_excite_forward(pooled, w1, b1, w2, b2, "silu", name)
    with pytest.raises(ValueError, match="mbconv_excite_backward: " + message):
        extension.mbconv_excite_backward(torch.randn_like(pooled), pooled, w1, b1, w2, b2,
                                         "silu", name)
