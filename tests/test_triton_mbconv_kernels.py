"""The MBConv block's Triton kernel interface (fused_mbconv.kernels, K1..K6 and B6..B1) against
fused_mbconv.reference, function by function, under TRITON_INTERPRET=1 (conftest.py).

Every function gets the same inputs as the reference (the reference's own intermediates), so
each comparison tests one kernel; launcher allocations are poisoned with NaN so an unwritten
element fails. Flags covered: expand / no expand, SE / no SE, residual / none, drop-path
scale, every activation and gate, stride 1 / 2, k 3 / 5, NCHW / channels_last, fp32 / bf16
(fp64 for exact math), train / eval, output_mask subsets; shapes cross the kernels' tile and
channel-chunk edges."""

import pytest
import torch

import fused_mbconv as fm
from fused_mbconv import accounting
import fused_mbconv.reference as ref
from fused_mbconv.tensors import NormArgs, accumulate_dtype, memory_format_of

pytest.importorskip("triton")
import fused_mbconv.kernels as kernels  # noqa: E402

# (N, Cin, hidden (None: no expansion), Cout, H, W, kernel, stride, SE squeeze (None: no SE))
CASES = {
    # two position tiles in the GEMMs (9·8 = 72 > 64), two channel chunks (36 > 32), residual
    "e-se-res-k3s1": (2, 20, 36, 20, 9, 8, 3, 1, 5),
    "e-se-k5s2": (3, 4, 6, 5, 7, 5, 5, 2, 2),
    "noexp-nose-k5s1": (2, 6, None, 3, 5, 6, 5, 1, None),
}
# One output channel: grad_out is both NCHW- and NHWC-contiguous, grad_a2 is not, so the
# GEMMs must take the layout from the problem, not from their first operand. fp32 only: with
# one BN3 channel the projection's weight gradient is a near-cancelling sum, rounding noise in
# 16 bits.
ONE_CHANNEL = {"one-out-channel-k1": (2, 3, None, 1, 2, 3, 1, 1, None)}
TOL = {torch.float32: 3e-5, torch.bfloat16: 2e-2, torch.float64: 1e-10}


@pytest.fixture
def poison(monkeypatch):
    """Every float tensor the launchers allocate starts as NaN."""
    empty, empty_like = torch.empty, torch.empty_like

    def fill(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: fill(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: fill(empty_like(*a, **k)))


def assert_same(got, want, dtype, what):
    assert (got is None) == (want is None), what
    if want is None:
        return
    assert got.shape == want.shape and got.dtype == want.dtype, \
        f"{what}: {tuple(got.shape)} {got.dtype} != {tuple(want.shape)} {want.dtype}"
    assert not torch.isnan(got).any(), f"{what}: unwritten (NaN) elements"
    if want.dim() == 4:
        assert memory_format_of(got) == memory_format_of(want), f"{what}: memory format"
    scale = max(1.0, want.abs().max().item()) if want.numel() else 1.0
    torch.testing.assert_close(got, want, rtol=TOL[dtype], atol=TOL[dtype] * scale, msg=what)


def bn(c, acc, affine=True):
    return NormArgs(torch.randn(c, dtype=acc) * 0.3, torch.rand(c, dtype=acc) + 0.5,
                    torch.rand(c) + 0.5 if affine else None,
                    torch.randn(c) * 0.5 if affine else None, 1e-3)


def batch_bn(stats, affine_from: NormArgs):
    return affine_from._replace(mean=stats[0], var=stats[1])


def check_block(case, dtype, channels_last, training, activation="silu",
                se_activation="silu", gate="sigmoid", drop_path=True, masks=((True, True),)):
    """Run the block's functions in call order on the reference's intermediates; compare
    each kernel-interface function's results."""
    n, cin, hidden, cout, h, w, k, stride, squeeze = {**CASES, **ONE_CHANNEL}[case]
    acc = accumulate_dtype(dtype)
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def act4(*shape):
        return (torch.randn(*shape) * 1.5 + 0.2).to(dtype).contiguous(memory_format=fmt)

    def mat(*shape):
        return (torch.randn(*shape) / shape[1] ** 0.5).to(dtype)

    x = act4(n, cin, h, w)
    c = hidden or cin
    expand_w = mat(hidden, cin) if hidden else None
    dw_w = (torch.randn(c, 1, k, k) / k).to(dtype)
    se = (mat(squeeze, c), torch.randn(squeeze).to(dtype), mat(c, squeeze),
          torch.randn(c).to(dtype)) if squeeze else None
    proj_w = mat(cout, c)
    residual = x if stride == 1 and cin == cout else None
    scale = (torch.tensor([0.0, 2.0, 2.0][:n], dtype=acc)
             if residual is not None and drop_path and training else None)
    bn1, bn2, bn3 = bn(c, acc), bn(c, acc, affine=case != "e-se-k5s2"), bn(cout, acc)

    def both(name, *args):
        want = getattr(ref, name)(*args)
        got = getattr(kernels, name)(*args)
        if not isinstance(want, tuple):
            want, got = (want,), (got,)
        for i, (g, wv) in enumerate(zip(got, want)):  # 16-bit inputs: 16-bit tolerance
            assert_same(g, wv, dtype, f"{name}[{i}]")
        return want if len(want) > 1 else want[0]

    # forward K1..K6
    if hidden:
        e, m1, v1 = both("mbconv_expand_forward", x, expand_w, training)
        bn1 = batch_bn((m1, v1), bn1) if training else bn1
        h_in, in_bn = e, bn1
    else:
        h_in, in_bn = x, None
    d, m2, v2 = both("mbconv_dwconv_forward", h_in, dw_w, stride, in_bn, activation, training)
    bn2 = batch_bn((m2, v2), bn2) if training else bn2
    gate_values = pooled = None
    if se:
        pooled = both("mbconv_squeeze_forward", d, bn2, activation)
        gate_values = both("mbconv_excite_forward", pooled, *se, se_activation, gate)
    q, m3, v3 = both("mbconv_project_forward", d, gate_values, proj_w, bn2, activation,
                     training)
    both("mbconv_project_forward", d, gate_values, proj_w, bn2, activation, False)  # recompute
    bn3 = batch_bn((m3, v3), bn3) if training else bn3
    out = both("mbconv_output_forward", q, bn3, scale, residual)

    # backward B6..B1
    grad_out = act4(*out.shape)
    sums3 = both("mbconv_output_backward_stats", grad_out, q, bn3, scale)
    for mask in masks:
        grad_a2, grad_gate, _ = both("mbconv_project_backward", grad_out, q, d, gate_values,
                                     proj_w, bn2, activation, bn3, *sums3, scale, training,
                                     list(mask))
    if grad_a2 is None:
        return
    grad_pooled = None
    if se:
        grad_pooled = both("mbconv_excite_backward", grad_gate, pooled, *se, se_activation,
                           gate)[0]
    sums2 = both("mbconv_dwconv_backward_stats", grad_a2, grad_pooled, d, bn2, activation)
    for mask in masks:
        grad_h, _, sdy1, sdyx1 = both("mbconv_dwconv_backward", grad_a2, grad_pooled, d, h_in,
                                      dw_w, stride, bn2, activation, *sums2, in_bn, training,
                                      list(mask))
    if hidden and grad_h is not None:
        for mask in masks:
            both("mbconv_expand_backward", grad_h, e, x, expand_w, bn1, sdy1, sdyx1, training,
                 grad_out if residual is not None else None, list(mask))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES)
def test_block_functions_match_reference(case, dtype, channels_last, training, poison):
    check_block(case, dtype, channels_last, training)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_one_output_channel_layout(channels_last, training, poison):
    check_block("one-out-channel-k1", torch.float32, channels_last, training)


@pytest.mark.parametrize("activation, se_activation, gate", [
    ("relu", "relu", "hardsigmoid"), ("relu6", "silu", "sigmoid"),
    ("hardswish", "relu", "hardsigmoid"),
])
def test_activations_and_gates(activation, se_activation, gate, poison):
    check_block("e-se-k5s2", torch.float32, True, True, activation, se_activation, gate)


def test_float64_exact_math_and_output_masks(poison):
    """float64 runs the same kernels (tl.dot in float64) to reference precision; each
    output_mask subset of the [2]-launch functions gives the same results."""
    check_block("e-se-res-k3s1", torch.float64, False, True,
                masks=((True, False), (False, True), (True, True)))


def test_no_drop_path_scale(poison):
    check_block("e-se-res-k3s1", torch.float32, False, True, drop_path=False)


def test_block_launches_are_accounted():
    """One training forward + backward of an expanded SE residual block: every launch is
    reported with its bytes; the big tensors' reads and writes appear where they belong."""
    n, cin, _, cout, h, w, k, stride, _ = CASES["e-se-res-k3s1"]
    hidden = 2 * cin
    block = fm.MBConv(cin, cout, k, stride, 2, drop_path=0.2).train()
    fused = fm.FusedMBConv.from_module(block)
    x = torch.randn(n, cin, h, w, requires_grad=True)
    with fm.use_backend("triton"), accounting.record_launches() as log:
        fused(x).sum().backward()
    assert log and all(launch.backend == "triton" for launch in log)
    names = [launch.kernel for launch in log]
    for kernel in ("pointwise_conv_kernel", "pointwise_wgrad_kernel", "squeeze_kernel",
                   "excite_kernel", "excite_bwd_sample_kernel", "excite_bwd_weight_kernel",
                   "output_kernel", "dwconv_bn_silu_fwd_kernel", "bn_stats_finalize_kernel",
                   "bn_silu_bwd_reduce_kernel", "dwconv_bwd_grad_conv_kernel",
                   "dwconv_bwd_input_kernel"):
        assert kernel in names, kernel
    e_bytes = n * hidden * h * w * 4
    k1 = log[0]
    assert k1.kernel == "pointwise_conv_kernel" and k1.bytes_written >= e_bytes
    assert k1.bytes_read >= x.numel() * 4 + hidden * cin * 4
    # K2 reads e and writes d (same size at stride 1)
    k2 = next(launch for launch in log if launch.kernel == "dwconv_bn_silu_fwd_kernel")
    assert k2.bytes_read >= e_bytes and k2.bytes_written >= e_bytes
    # the squeeze reads d and writes only (N, C) values, one row of them per positions chunk
    sq = next(launch for launch in log if launch.kernel == "squeeze_kernel")
    assert sq.bytes_read >= e_bytes and sq.bytes_written % (n * hidden * 4) == 0
    assert sq.bytes_written < e_bytes
    assert all(launch.bytes_read > 0 and launch.bytes_written > 0 for launch in log)


def test_bad_dtype_is_a_clear_error():
    x = torch.randn(1, 2, 4, 4).to(torch.float8_e4m3fn)
    with pytest.raises(TypeError, match="mbconv supports float16, bfloat16, float32"):
        kernels.mbconv_expand_forward(x, torch.zeros(3, 2).to(x.dtype), True)
    with pytest.raises(TypeError, match="expand weight dtype"):
        kernels.mbconv_expand_forward(torch.randn(1, 2, 4, 4), torch.zeros(3, 2).double(),
                                      True)
