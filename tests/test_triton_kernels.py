"""The Triton kernel interface (fused_mbconv.kernels) against fused_mbconv.reference, function
by function, under TRITON_INTERPRET=1 (set in conftest.py): every output element written
(allocations poisoned with NaN), need_conv_out=False, output_mask subsets, many-tile
statistics merges, launch accounting and clear errors."""

import itertools

import pytest
import torch

import fused_mbconv as fm
import fused_mbconv.reference as ref
from fused_mbconv.tensors import memory_format_of

pytest.importorskip("triton")  # an optional dependency (Linux only)
import fused_mbconv.kernels as kernels  # noqa: E402
from fused_mbconv.kernels import common, dwconv_bn_silu as dw  # noqa: E402

# (N, C, H, W, kernel, stride), tiny: the interpreter is slow.
CASES = {
    "k3-s1": (2, 5, 6, 7, 3, 1),
    "k5-s2": (2, 6, 7, 5, 5, 2),
}
TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
       torch.float64: dict(atol=1e-12, rtol=1e-12)}


@pytest.fixture
def poison(monkeypatch):
    """Every float tensor the launchers allocate starts as NaN, so an element a kernel fails
    to write shows up."""
    empty, empty_like = torch.empty, torch.empty_like

    def fill(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(dw.torch, "empty", lambda *a, **k: fill(empty(*a, **k)))
    monkeypatch.setattr(dw.torch, "empty_like", lambda *a, **k: fill(empty_like(*a, **k)))


def make(shape, dtype, channels_last, affine=True):
    n, c, h, w, k, stride = shape
    x = torch.randn(n, c, h, w).mul_(2).add_(0.5).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(c, 1, k, k).to(dtype)
    gamma = torch.rand(c).add_(0.5) if affine else None
    beta = torch.randn(c) if affine else None
    stats = (torch.randn(c).mul_(0.2), torch.rand(c).add_(0.5))
    return x, weight, gamma, beta, stats, stride


def assert_same(got, want, dtype, what):
    assert (got is None) == (want is None), what
    if want is None:
        return
    assert got.shape == want.shape and got.dtype == want.dtype, what
    assert not torch.isnan(got).any(), f"{what}: unwritten (NaN) elements"
    assert memory_format_of(got) == memory_format_of(want), f"{what}: memory format"
    torch.testing.assert_close(got, want, **TOL[dtype], msg=what)


@pytest.mark.parametrize("need_conv_out", [True, False], ids=["conv_out", "no_conv_out"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES)
def test_forward_matches_reference(case, dtype, channels_last, training, need_conv_out,
                                   poison):
    x, weight, gamma, beta, (rm, rv), stride = make(CASES[case], dtype, channels_last)
    args = (x, weight, gamma, beta, rm, rv, stride, training, 1e-5, need_conv_out)
    got = kernels.dwconv_bn_silu_forward(*args)
    want = ref.dwconv_bn_silu_forward(*args)
    for name, g, w in zip(("out", "conv_out", "mean", "var"), got, want):
        assert_same(g, w, dtype, name)


MASKS = [m for m in itertools.product([True, False], repeat=4) if any(m)]


@pytest.mark.parametrize("mask", MASKS, ids=lambda m: "".join("1" if b else "0" for b in m))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_backward_output_mask_subsets(mask, training, poison):
    """Each gradient is right (and absent where masked off) whatever else is asked for."""
    x, weight, gamma, beta, (rm, rv), stride = make(CASES["k5-s2"], torch.float64, False)
    _, conv_out, mean, var = ref.dwconv_bn_silu_forward(x, weight, gamma, beta, rm, rv, stride,
                                                        training, 1e-5, True)
    grad_out = torch.randn_like(conv_out)
    args = (grad_out, x, weight, conv_out, gamma, beta, mean, var, stride, training, 1e-5,
            list(mask))
    got = kernels.dwconv_bn_silu_backward(*args)
    want = ref.dwconv_bn_silu_backward(*args)
    for name, g, w in zip(("grad input", "grad weight", "grad gamma", "grad beta"), got, want):
        assert_same(g, w, torch.float64, name)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_backward_matches_reference(dtype, channels_last, affine, poison):
    x, weight, gamma, beta, (rm, rv), stride = make(CASES["k3-s1"], dtype, channels_last,
                                                    affine)
    _, conv_out, mean, var = ref.dwconv_bn_silu_forward(x, weight, gamma, beta, rm, rv, stride,
                                                        True, 1e-5, True)
    grad_out = torch.randn(conv_out.shape).to(dtype).contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    args = (grad_out, x, weight, conv_out, gamma, beta, mean, var, stride, True, 1e-5,
            [True, True, affine, affine])
    got = kernels.dwconv_bn_silu_backward(*args)
    want = ref.dwconv_bn_silu_backward(*args)
    for name, g, w in zip(("grad input", "grad weight", "grad gamma", "grad beta"), got, want):
        assert_same(g, w, dtype, name)


def test_many_tiles_statistics_and_reductions(monkeypatch, poison):
    """Tiny tiles force many partial rows (more than one BLOCK_T chunk), several channel blocks
    and ragged edges: the Chan merge and the row sums must still give the reference. A large
    common offset checks the variance has no E[x²]−E[x]² cancellation."""
    for module in (common, dw):  # the problem's tiles, and the input-gradient kernel's
        monkeypatch.setattr(module, "tile_sizes", lambda c, p, cl: (4, 2))
    monkeypatch.setattr(common, "BLOCK_T", 4)  # 2 images x 9 tiles = 18 rows: 5 chunks
    x, weight, gamma, beta, (rm, rv), stride = make((2, 3, 5, 7, 3, 1), torch.float32, False)
    x = x + 300.0
    got = kernels.dwconv_bn_silu_forward(x, weight, gamma, beta, rm, rv, stride, True, 1e-5,
                                         True)
    want = ref.dwconv_bn_silu_forward(x.double(), weight.double(), gamma, beta, rm, rv, stride,
                                      True, 1e-5, True)
    torch.testing.assert_close(got[2].double(), want[2], rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(got[3].double(), want[3], rtol=1e-4, atol=1e-4)
    grad_out = torch.randn_like(got[1])
    args = (got[1], gamma, beta, got[2], got[3], stride, True, 1e-5, [True] * 4)
    g = kernels.dwconv_bn_silu_backward(grad_out, x, weight, *args)
    w = ref.dwconv_bn_silu_backward(grad_out, x, weight, *args)
    for name, a, b in zip(("grad input", "grad weight", "grad gamma", "grad beta"), g, w):
        assert_same(a, b, torch.float32, name)


def test_launches_are_accounted():
    x, weight, gamma, beta, (rm, rv), stride = make(CASES["k3-s1"], torch.float32, False)
    with fm.accounting.record_launches() as log:
        out, conv_out, mean, var = kernels.dwconv_bn_silu_forward(
            x, weight, gamma, beta, rm, rv, stride, True, 1e-5, True)
    assert [launch.kernel for launch in log] == [
        "dwconv_bn_silu_fwd_kernel", "bn_stats_finalize_kernel", "bn_silu_apply_kernel"]
    assert log[0].bytes_read >= x.numel() * 4 and log[0].bytes_written >= conv_out.numel() * 4
    assert log[2].bytes_read >= conv_out.numel() * 4 and log[2].bytes_written == out.numel() * 4
    assert all(launch.backend == "triton" for launch in log)
    with fm.accounting.record_launches() as log:
        kernels.dwconv_bn_silu_forward(x, weight, gamma, beta, rm, rv, stride, False, 1e-5,
                                       False)
    assert [launch.kernel for launch in log] == ["dwconv_bn_silu_fwd_kernel"]
    assert log[0].bytes_written == out.numel() * 4 + 2 * x.shape[1] * 4  # out, mean, var
    with fm.accounting.record_launches() as log:
        kernels.dwconv_bn_silu_backward(torch.randn_like(out), x, weight, conv_out, gamma, beta,
                                        mean, var, stride, True, 1e-5, [True] * 4)
    assert [launch.kernel for launch in log] == [
        "bn_silu_bwd_reduce_kernel", "sum_rows_kernel", "dwconv_bwd_grad_conv_kernel",
        "sum_rows_kernel", "dwconv_bwd_input_kernel"]


def test_unsupported_dtype_is_a_clear_error():
    x = torch.randn(1, 2, 4, 4).to(torch.float8_e4m3fn)
    with pytest.raises(TypeError, match="float16, bfloat16, float32 and float64"):
        kernels.dwconv_bn_silu_forward(x, x.new_zeros(2, 1, 3, 3), None, None, None, None, 1,
                                       True, 1e-5, False)


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    usable, reason = fm.backends.backend_status("triton", "cpu")
    assert not usable and "TRITON_INTERPRET=1" in reason
    with fm.use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        fm.functional.dwconv_bn_silu(torch.randn(2, 3, 4, 4), torch.randn(3, 1, 3, 3), None,
                                     None, training=True)
