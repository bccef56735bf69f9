"""The Triton backend's own checks (fused_mbconv.kernels, under TRITON_INTERPRET=1 from
conftest.py): launch accounting, clear dtype errors, and that CPU tensors need the interpreter.
Its kernel-interface functions are compared with fused_mbconv.reference, with the other
backends', in test_kernel_interface.py."""

import pytest
import torch

import fused_mbconv as fm
from fused_mbconv import accounting
from kernel_cases import BLOCK_GEOMETRIES, DWCONV_GEOMETRIES, dwconv_case

pytest.importorskip("triton")  # an optional dependency (Linux only)
import fused_mbconv.kernels as kernels  # noqa: E402


def test_launches_are_accounted():
    x, weight, gamma, beta, rm, rv = dwconv_case(DWCONV_GEOMETRIES["k3-s1"], torch.float32,
                                                 False)
    stride = 1
    with accounting.record_launches() as log:
        out, conv_out, mean, var = kernels.dwconv_bn_silu_forward(
            x, weight, gamma, beta, rm, rv, stride, True, 1e-5, True)
    assert [launch.kernel for launch in log] == [
        "dwconv_bn_silu_fwd_kernel", "bn_stats_finalize_kernel", "bn_silu_apply_kernel"]
    assert log[0].bytes_read >= x.numel() * 4 and log[0].bytes_written >= conv_out.numel() * 4
    assert log[2].bytes_read >= conv_out.numel() * 4 and log[2].bytes_written == out.numel() * 4
    assert all(launch.backend == "triton" for launch in log)
    with accounting.record_launches() as log:
        kernels.dwconv_bn_silu_forward(x, weight, gamma, beta, rm, rv, stride, False, 1e-5,
                                       False)
    assert [launch.kernel for launch in log] == ["dwconv_bn_silu_fwd_kernel"]
    assert log[0].bytes_written == out.numel() * 4 + 2 * x.shape[1] * 4  # out, mean, var
    with accounting.record_launches() as log:
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


def test_block_launches_are_accounted():
    """One training forward + backward of an expanded SE residual block: every launch is
    reported with its bytes; the big tensors' reads and writes appear where they belong."""
    n, cin, _, cout, h, w, k, stride = BLOCK_GEOMETRIES["two-tiles-k3-s1"]
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
