"""Depthwise padding other than k//2 on every side (TensorFlow SAME, explicit pad layers): the
kernels run the taps inside a larger zero-padded kernel, so every backend computes it.
Checked on timm's TF-SAME blocks (Conv2dSame) against float64 eager copies, the equivalence of
the embedded kernel for every small case, and the errors."""

import copy
import itertools
import re

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models._efficientnet_blocks import InvertedResidual, SqueezeExcite

import fused_mbconv as fm
from fused_mbconv.backends import TABLE, backend_status, implements
from fused_mbconv.functional import BatchNormParams, dw_padding_sides, padded_dw_weight
from fused_mbconv.ops.mbconv import KERNELS
from parity import check, randomize_bn_state
from tolerances import NETWORK_GRADIENT_ROUNDS

CPU_BACKENDS = [b.name for b in TABLE if b.runs("cpu")]


def _usable(name):
    usable, reason = backend_status(name, "cpu")
    if not usable:
        pytest.skip(f"backend {name!r} unavailable: {reason}")
    if not implements(name, KERNELS):
        pytest.skip(f"backend {name!r} lacks block kernels")
    return name


@pytest.fixture(params=CPU_BACKENDS)
def backend(request):
    return _usable(request.param)


# The network runs under the Triton interpreter for minutes: its blocks are the blocks above.
@pytest.fixture(params=[b for b in CPU_BACKENDS if b != "triton"])
def network_backend(request):
    return _usable(request.param)


def tf_block(kernel_size, stride, expand=4.0):
    """timm's InvertedResidual with TF 'same' padding (a Conv2dSame depthwise conv at stride
    2), SE and SiLU, as tf_efficientnet builds it."""
    torch.manual_seed(kernel_size * 10 + stride)
    block = InvertedResidual(8, 12, dw_kernel_size=kernel_size, stride=stride, pad_type="same",
                             exp_ratio=expand, act_layer=torch.nn.SiLU,
                             se_layer=lambda c, **kw: SqueezeExcite(c, rd_ratio=0.25, **kw))
    randomize_bn_state(block)
    return block


@pytest.mark.parametrize("kernel_size", [3, 5])
@pytest.mark.parametrize("size", [8, 9])  # even: asymmetric SAME; odd: symmetric
def test_tf_same_block_matches_eager(kernel_size, size, backend):
    block = tf_block(kernel_size, 2)
    assert type(block.conv_dw).__name__ == "Conv2dSame"
    fused = fm.convert(copy.deepcopy(block))
    assert isinstance(fused, fm.FusedMBConv) and fused.spec().dw_pad == "same"
    inputs = [torch.randn(2, 8, size, size, requires_grad=True) for _ in range(2)]
    check(block, inputs, f"k{kernel_size} {size}x{size}", backend,
          lambda m: m.train(), make_fused=lambda m: fm.convert(copy.deepcopy(m)),
          stat_rounds=2)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_tf_same_network_matches_eager(network_backend, training):
    """tf_efficientnet_b0's first three stages (stem, a TF-SAME stride-2 block per stage
    after the first, the head): every block fused; outputs, gradients and statistics."""
    model = timm.create_model("tf_efficientnet_b0", num_classes=10)
    randomize_bn_state(model)
    model.blocks = model.blocks[:3]
    model.conv_head = torch.nn.Conv2d(40, 1280, 1, bias=False)
    converted = fm.convert(copy.deepcopy(model))
    assert len(fm.convert_report(converted).converted) == 5  # 1 + 2 + 2 blocks, all
    check(model, [torch.randn(2, 3, 32, 32, requires_grad=True)], "tf_efficientnet_b0[:3]",
          network_backend, lambda m: m.train(training),
          make_fused=lambda m: fm.convert(copy.deepcopy(m)), grad_rounds=NETWORK_GRADIENT_ROUNDS)


def test_embedded_kernel_reads_the_padded_pixels():
    """Every (left, right, top, bottom) up to k - 1 and TF SAME, k 3/5/7, stride 1/2, even
    and odd sizes: the embedded kernel with symmetric padding equals F.pad + an unpadded conv,
    and it is None exactly where the output size differs from ceil(size / stride)."""
    generator = torch.Generator().manual_seed(0)
    checked = 0
    for k, stride, height, width in itertools.product([3, 5, 7], [1, 2], [8, 9], [10, 11]):
        x = torch.randn(1, 3, height, width, dtype=torch.float64, generator=generator)
        weight = torch.randn(3, 1, k, k, dtype=torch.float64, generator=generator)
        pads = ["same", None] + list(itertools.product(range(k), repeat=4))[::11]
        for pad in pads:
            sides = dw_padding_sides(pad, height, width, k, stride)
            expected = F.conv2d(F.pad(x, sides), weight, None, stride, 0, 1, 3)
            run = padded_dw_weight(weight, pad, height, width, stride)
            kernel_output = (-(-height // stride), -(-width // stride))
            if run is None:
                assert expected.shape[2:] != kernel_output, (k, stride, pad)
                continue
            assert run.shape[-1] % 2 == 1 and expected.shape[2:] == kernel_output
            got = F.conv2d(x, run, None, stride, run.shape[-1] // 2, 1, 3)
            assert torch.allclose(got, expected, rtol=0, atol=1e-12), (k, stride, pad)
            checked += 1
    assert checked > 150


def _block_args(hidden=8):
    def bn(c):
        return BatchNormParams(torch.rand(c) + 0.5, torch.randn(c), torch.randn(c),
                               torch.rand(c) + 0.5, torch.tensor(0))
    return dict(dw_weight=torch.randn(hidden, 1, 3, 3), bn2=bn(hidden),
                project_weight=torch.randn(6, hidden, 1, 1), bn3=bn(6))


@pytest.mark.parametrize("padding, message", [
    ("valid", "dw_padding must be None, 'same' or (left, right, top, bottom)"),
    ((0, 1, 0), "must be 4 ints in [0, 2]"),
    ((0, 3, 0, 1), "must be 4 ints in [0, 2]"),
    ((2, 2, 2, 2), "gives another output size than the fused kernels' ceil(size / stride)"),
])
def test_bad_padding_is_named_and_changes_nothing(padding, message):
    args = _block_args()
    before = [t.clone() for bn in (args["bn2"], args["bn3"])
              for t in (bn.running_mean, bn.running_var, bn.num_batches_tracked)]
    x = torch.randn(2, 8, 8, 8)
    with pytest.raises(ValueError, match=re.escape(message)):
        fm.functional.mbconv(x, args["dw_weight"], args["bn2"], args["project_weight"],
                             args["bn3"], stride=2, training=True, dw_padding=padding)
    after = [t for bn in (args["bn2"], args["bn3"])
             for t in (bn.running_mean, bn.running_var, bn.num_batches_tracked)]
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_weight_gradient_reaches_only_the_real_taps():
    """The zero taps around the k x k kernel are not parameters: the gradient is k x k."""
    args = _block_args()
    weight = args["dw_weight"].requires_grad_()
    out = fm.functional.mbconv(torch.randn(2, 8, 8, 8), weight, args["bn2"],
                               args["project_weight"], args["bn3"], stride=2, training=True,
                               dw_padding=(0, 1, 0, 1))
    out.square().sum().backward()
    assert weight.grad.shape == (8, 1, 3, 3) and weight.grad.abs().sum() > 0
