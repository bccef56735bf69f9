"""fused_mbconv.functional.dwconv_bn_silu against eager Conv2d(groups=C) + BatchNorm2d + SiLU,
on every backend usable for CPU tensors (the Triton backend through TRITON_INTERPRET=1) and,
where a GPU is present, on every compiled backend for CUDA tensors."""

import pytest
import torch
import torch.nn as nn

import fused_mbconv as fm
from targets import cpu_backends, targets
from tolerances import assert_close_by_rule, eager_in

BACKENDS = cpu_backends()
TARGETS = targets(BACKENDS)

# (N, C, H, W, kernel, stride): odd sizes, C not a multiple of any block, batch 1 with H*W > 1.
SHAPES = {
    "7x9-k3-s1": (2, 8, 7, 9, 3, 1),
    "7x9-k3-s2": (2, 8, 7, 9, 3, 2),
    "batch1-k5-s2": (1, 5, 6, 5, 5, 2),
    "c17-k7-s1": (2, 17, 7, 6, 7, 1),
    "c20-k5-s2-odd": (2, 20, 9, 9, 5, 2),
    "tiny-2x2": (1, 3, 2, 2, 3, 1),
}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


class Eager(nn.Module):
    def __init__(self, channels, k, stride):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, k, stride, k // 2, groups=channels, bias=False)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x):
        return nn.functional.silu(self.bn(self.conv(x)))


def make_case(shape, dtype, channels_last):
    n, c, h, w, k, stride = shape
    eager = Eager(c, k, stride)
    with torch.no_grad():
        eager.bn.weight.uniform_(0.5, 1.5)
        eager.bn.bias.uniform_(-0.5, 0.5)
        eager.bn.running_mean.uniform_(-0.2, 0.2)
        eager.bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(n, c, h, w) * 2 + 0.3
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return eager, x


def run_eager(eager, x, dtype, training, grad_out):
    """In ``dtype``, BatchNorm in float32 in a low-precision dtype (the rule's eager run)."""
    model = eager_in(eager, dtype).train(training)
    xi = x.to(dtype).requires_grad_()
    out = model(xi)
    out.backward(grad_out.to(dtype))
    grads = [xi.grad, model.conv.weight.grad, model.bn.weight.grad, model.bn.bias.grad]
    return out, grads, model.bn


def run_fused(eager, x, dtype, training, grad_out, backend, compile=False):
    """With ``compile``, through ``torch.compile(fullgraph=True)``: no graph break."""
    model = _copy(eager)
    xi = x.to(dtype).requires_grad_()
    w = model.conv.weight.detach().to(dtype).requires_grad_()
    gamma = model.bn.weight.detach().clone().requires_grad_()
    beta = model.bn.bias.detach().clone().requires_grad_()

    def fused(xi, w, gamma, beta):
        return fm.functional.dwconv_bn_silu(xi, w, model.bn.running_mean, model.bn.running_var,
                                            gamma, beta, stride=model.conv.stride[0],
                                            training=training, momentum=0.1, eps=1e-5)

    if compile:
        fused = torch.compile(fused, fullgraph=True, backend="aot_eager")
    with fm.use_backend(backend):
        out = fused(xi, w, gamma, beta)
        out.backward(grad_out.to(dtype))
    return out, [xi.grad, w.grad, gamma.grad, beta.grad], model.bn


def _copy(module):
    import copy
    return copy.deepcopy(module)


@pytest.mark.parametrize("device, backend", TARGETS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_matches_eager(shape, dtype, channels_last, training, device, backend):
    check_against_eager(shape, dtype, channels_last, training, backend, device=device)


def check_against_eager(shape, dtype, channels_last, training, backend, compile=False,
                        device="cpu"):
    eager, x = make_case(shape, dtype, channels_last)
    with torch.no_grad():
        out_shape = Eager(shape[1], shape[4], shape[5])(x).shape
    grad_out = torch.randn(out_shape, device=device)
    eager, x = eager.to(device), x.to(device)
    ref_out, ref_grads, ref_bn = run_eager(eager, x, torch.float64, training, grad_out)
    eager_out, eager_grads, eager_bn = run_eager(eager, x, dtype, training, grad_out)
    out, grads, bn = run_fused(eager, x, dtype, training, grad_out, backend, compile)

    assert out.dtype == dtype
    want_format = torch.channels_last if channels_last else torch.contiguous_format
    assert out.is_contiguous(memory_format=want_format)
    assert_close_by_rule(out.detach(), eager_out.detach(), ref_out.detach(), dtype, "output")
    for name, g, e, r in zip(("input", "conv weight", "bn weight", "bn bias"),
                             grads, eager_grads, ref_grads):
        assert g.dtype == e.dtype, name
        assert_close_by_rule(g, e, r, dtype, f"grad {name}")
    for name in ("running_mean", "running_var"):
        assert_close_by_rule(getattr(bn, name), getattr(eager_bn, name), getattr(ref_bn, name),
                             dtype, name)
    if not training:
        assert torch.equal(bn.running_mean, eager.bn.running_mean)


@pytest.mark.parametrize("device, backend", TARGETS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("stride", [1, 2])
def test_gradcheck_float64(device, backend, training, stride):
    f64 = dict(dtype=torch.float64, device=device)
    x = torch.randn(2, 3, 5, 4, **f64, requires_grad=True)
    w = torch.randn(3, 1, 3, 3, **f64, requires_grad=True)
    gamma = torch.rand(3, **f64).add_(0.5).requires_grad_()
    beta = torch.randn(3, **f64, requires_grad=True)
    mean = torch.randn(3, **f64)
    var = torch.rand(3, **f64) + 0.5

    def f(x, w, gamma, beta):
        return fm.functional.dwconv_bn_silu(x, w, mean.clone(), var.clone(), gamma, beta,
                                            stride=stride, training=training)

    with fm.use_backend(backend):
        assert torch.autograd.gradcheck(f, (x, w, gamma, beta), fast_mode=True)


@pytest.mark.parametrize("device, backend", TARGETS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_opcheck(device, backend, training):
    on = dict(device=device)
    x = torch.randn(2, 4, 5, 6, **on, requires_grad=True)
    w = torch.randn(4, 1, 3, 3, **on, requires_grad=True)
    gamma = torch.rand(4, **on, requires_grad=True)
    beta = torch.randn(4, **on, requires_grad=True)
    args = (x, w, gamma, beta, torch.zeros(4, **on), torch.ones(4, **on), 2, training, 1e-5,
            True)
    with fm.use_backend(backend):
        torch.library.opcheck(torch.ops.fused_mbconv.dwconv_bn_silu.default, args)
        grad_args = (torch.randn(2, 4, 3, 3, **on), x.detach(), w.detach(),
                     torch.randn(2, 4, 3, 3, **on), gamma.detach(), beta.detach(),
                     torch.randn(4, **on), torch.rand(4, **on) + 0.5, 2,
                     training, 1e-5, [True, True, True, False])
        torch.library.opcheck(torch.ops.fused_mbconv.dwconv_bn_silu_backward.default, grad_args)


def test_momentum_and_cumulative_average_match_batchnorm():
    """momentum=None (cumulative average) is nn.BatchNorm2d's: factor 1/num_batches_tracked."""
    bn = nn.BatchNorm2d(6, momentum=None)
    conv = nn.Conv2d(6, 6, 3, 1, 1, groups=6, bias=False)
    bn64, conv64 = _copy(bn).double(), _copy(conv).double()
    rm, rv = bn.running_mean.clone(), bn.running_var.clone()
    for step in range(1, 4):
        x = torch.randn(2, 6, 5, 5)
        with torch.no_grad():
            bn.train()(conv(x))
            bn64.train()(conv64(x.double()))
            fm.functional.dwconv_bn_silu(x, conv.weight, rm, rv, bn.weight, bn.bias,
                                         training=True, momentum=1.0 / step)
        assert_close_by_rule(rm, bn.running_mean, bn64.running_mean, torch.float32,
                             f"step {step} running_mean", rounds=step)
        assert_close_by_rule(rv, bn.running_var, bn64.running_var, torch.float32,
                             f"step {step} running_var", rounds=step)


def test_saved_for_backward_is_input_and_conv_output():
    """Saved: input, conv weight, depthwise output, BN affine and statistics. Eager also keeps
    the BN output for SiLU; the fused op recomputes it."""
    n, c, h, w = 4, 96, 28, 28  # B0 stage-2 expanded width, small batch and resolution
    x = torch.randn(n, c, h, w, requires_grad=True)
    eager = Eager(c, 3, 1)

    def saved_bytes(fn):
        total = []

        def pack(t):
            total.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return sum(total)

    eager_bytes = saved_bytes(lambda: eager(x))
    fused_bytes = saved_bytes(lambda: fm.functional.dwconv_bn_silu(
        x, eager.conv.weight, eager.bn.running_mean, eager.bn.running_var, eager.bn.weight,
        eager.bn.bias, training=True))
    activation = x.numel() * 4
    per_channel = 4 * c * 4  # BN weight, bias, mean, var
    assert fused_bytes == 2 * activation + eager.conv.weight.numel() * 4 + per_channel
    assert eager_bytes >= activation * 3
    assert eager_bytes / fused_bytes > 1.45


def test_no_grad_skips_saving_conv_output():
    x = torch.randn(2, 4, 5, 5)
    w = torch.randn(4, 1, 3, 3)
    out, conv_out, mean, var = torch.ops.fused_mbconv.dwconv_bn_silu(
        x, w, None, None, None, None, 1, True, 1e-5, False)
    assert conv_out.numel() == 0 and out.shape == x.shape


def _bad_calls():
    x = torch.randn(2, 4, 5, 5)
    w = torch.randn(4, 1, 3, 3)
    return {
        "ndim": (dict(input=x[0]), "4-D"),
        "weight shape": (dict(conv_weight=torch.randn(4, 2, 3, 3)), r"\(C, 1, k, k\)"),
        "weight channels": (dict(conv_weight=torch.randn(3, 1, 3, 3)), "C=4"),
        "even kernel": (dict(conv_weight=torch.randn(4, 1, 4, 4)), "odd"),
        "dtype mismatch": (dict(conv_weight=w.double()), "dtype"),
        "integer input": (dict(input=x.long(), conv_weight=w.long()), "floating-point"),
        "stride": (dict(stride=3), "stride"),
        "stats shape": (dict(running_mean=torch.zeros(5)), "running_mean"),
        "one value per channel": (dict(input=torch.randn(1, 4, 1, 1)), "more than 1 value"),
        "device": (dict(bn_weight=torch.ones(4, device="meta")), "meta"),
        "eps": (dict(eps=0.0), "eps"),
        "momentum": (dict(momentum=1.5), "momentum"),
    }


@pytest.mark.parametrize("case", _bad_calls())
def test_bad_input_is_rejected_and_state_untouched(case):
    kwargs, message = _bad_calls()[case]
    args = dict(input=torch.randn(2, 4, 5, 5), conv_weight=torch.randn(4, 1, 3, 3),
                running_mean=torch.randn(4), running_var=torch.rand(4) + 0.5,
                bn_weight=torch.ones(4), bn_bias=torch.zeros(4), training=True)
    args.update(kwargs)
    before = [t.clone() for t in (args["running_mean"], args["running_var"])]
    with pytest.raises((ValueError, TypeError), match=message):
        fm.functional.dwconv_bn_silu(**args)
    assert torch.equal(before[0], args["running_mean"])
    assert torch.equal(before[1], args["running_var"])


@pytest.mark.parametrize("device, backend", targets(BACKENDS[:1]))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_compile_fullgraph_matches_eager(training, device, backend):
    """The first CPU backend, and every CUDA one."""
    check_against_eager(SHAPES["7x9-k3-s2"], torch.float32, False, training, backend,
                        compile=True, device=device)


def test_backend_selection():
    assert "torch" in fm.available_backends()
    with pytest.raises(ValueError, match="unknown backend"):
        fm.set_backend("tpu")
    with pytest.raises(ValueError, match="unknown backend"):
        with fm.use_backend("nope"):
            pass
    with fm.use_backend("cuda"):
        with pytest.raises(RuntimeError, match="cuda"):
            fm.functional.dwconv_bn_silu(torch.randn(2, 4, 5, 5), torch.randn(4, 1, 3, 3),
                                         None, None, training=True)
