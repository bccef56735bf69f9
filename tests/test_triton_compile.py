"""Every Triton kernel specialization EfficientNet-B0 uses compiles for sm_80 and sm_90 without
register spills (no GPU needed: triton.compile with a GPUTarget, then ptxas -v).

Runs in a background subprocess (tests/background.py) without TRITON_INTERPRET (interpreted
kernels cannot be compiled), with Triton's cache in a fresh directory so nothing is reused. bf16
stands for the 16-bit dtypes here (fp16 would double the run time; its specializations differ
only in the element type); `python -m fused_mbconv.kernels.compile_report` covers all three."""

import os
import sys

import pytest

from background import Job

pytest.importorskip("triton")


def compile_report_job():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return Job([sys.executable, "-m", "fused_mbconv.kernels.compile_report",
                "--arch", "80", "90", "--dtype", "bf16"], env,
               scratch_env={"TRITON_CACHE_DIR": "triton-cache"}, timeout_s=900)


@pytest.mark.background.with_args(compile_report_job)
def test_b0_specializations_compile_without_spills(background_result):
    run = background_result()
    report = run.stdout + run.stderr
    assert run.returncode == 0, report
    assert " 0 failed" in run.stdout, report
    for kernel in ("dwconv_bn_silu_fwd_kernel", "bn_stats_finalize_kernel",
                   "bn_silu_apply_kernel", "bn_silu_bwd_reduce_kernel", "sum_rows_kernel",
                   "dwconv_bwd_grad_conv_kernel", "dwconv_bwd_input_kernel",
                   "pointwise_conv_kernel", "pointwise_wgrad_kernel", "squeeze_kernel",
                   "excite_kernel", "excite_bwd_sample_kernel", "excite_bwd_weight_kernel",
                   "output_kernel"):
        assert f"{kernel} " in run.stdout, f"{kernel} missing from the report\n{report}"
    for token in ("k3 s1", "k3 s2", "k5 s1", "k5 s2", "nchw", "nhwc", "train", "eval",
                  "sm_80", "sm_90", "K1 train", "K5 train", "B5 dgrad", "B1 dgrad", "B5 wgrad",
                  "B1 wgrad", "block bn1", "B6"):
        assert token in run.stdout, f"no {token!r} specialization\n{report}"
