"""The compiled csrc/ extension: entry-point checks, determinism, launch accounting, loading,
and an nvcc compile of every CUDA source.

Its kernel-interface functions are compared with fused_mbconv.reference in
test_kernel_interface.py (the "cpu" backend, and "cuda" where a GPU is present); the parity
grids through the public ops in test_dwconv_bn_silu.py and test_fused_mbconv.py."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import fused_mbconv as fm
from fused_mbconv import _build, accounting, extension
from background import Job
from kernel_cases import (BLOCK_GEOMETRIES, CHUNKED_GEOMETRIES, DWCONV_GEOMETRIES,
                          block_calls, block_case, cast, dwconv_case, flat)

CPU_OK, CPU_REASON = fm.backends.backend_status("cpu")
needs_cpu_ext = pytest.mark.skipif(not CPU_OK, reason=f"cpu extension unavailable: {CPU_REASON}")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(),
                               reason="no CUDA device: GPU parity runs only where one is present")

OPS = torch.ops.fused_mbconv_ext if CPU_OK else None


@needs_cpu_ext
def test_results_do_not_depend_on_thread_count():
    x, weight, gamma, beta, mean, var = dwconv_case((4, 8, 20, 18, 3, 2), torch.float32, False)
    grad_out = torch.randn(4, 8, 10, 9)

    def run():
        fwd = extension.dwconv_bn_silu_forward(x, weight, gamma, beta, mean, var, 2, True, 1e-5,
                                               True)
        bwd = extension.dwconv_bn_silu_backward(grad_out, x, weight, fwd[1], gamma, beta, fwd[2],
                                                fwd[3], 2, True, 1e-5, [True] * 4)
        return fwd + bwd

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(max(2, threads))
        many = run()
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, many):
        assert torch.equal(a, b)


@needs_cpu_ext
def test_launches_are_accounted():
    x, weight, gamma, beta, mean, var = dwconv_case(DWCONV_GEOMETRIES["k3-s1"], torch.float32,
                                                    False)
    with accounting.record_launches() as log:
        out, d, bm, bv = extension.dwconv_bn_silu_forward(x, weight, gamma, beta, mean, var, 1,
                                                          True, 1e-5, True)
        extension.dwconv_bn_silu_backward(torch.randn_like(out), x, weight, d, gamma, beta, bm,
                                          bv, 1, True, 1e-5, [True] * 4)
    assert [launch.kernel for launch in log] == ["dwconv_stats", "bn_silu_apply",
                                                 "bn_silu_grad_reduce", "dwconv_grad"]
    assert all(launch.backend == "cpu" for launch in log)
    assert log[0].bytes_read >= x.numel() * 4 and log[0].bytes_written == out.numel() * 4


# ---- entry-point checks -------------------------------------------------------------------

def _forward_bad_calls():
    x, w = torch.randn(2, 4, 5, 5), torch.randn(4, 1, 3, 3)
    v = torch.ones(4)
    base = dict(x=x, weight=w, bn_weight=v, bn_bias=v, running_mean=v, running_var=v, stride=1,
                training=True, eps=1e-5, need_conv_out=True)
    cases = {
        "3-D input": (dict(x=x[0]), ValueError, "4-D"),
        "integer input": (dict(x=x.long(), weight=w.long()), TypeError, "float16, bfloat16"),
        "strided input": (dict(x=x[:, :, ::2]), ValueError, "contiguous in NCHW or channels_last"),
        "empty input": (dict(x=torch.randn(0, 4, 5, 5)), ValueError, "empty"),
        "weight shape": (dict(weight=torch.randn(4, 2, 3, 3)), ValueError, r"\(C, 1, k, k\)"),
        "even kernel": (dict(weight=torch.randn(4, 1, 4, 4)), ValueError, "odd"),
        "weight dtype": (dict(weight=w.double()), TypeError, "conv weight dtype"),
        "stride": (dict(stride=3), ValueError, "stride must be 1 or 2"),
        "eps": (dict(eps=0.0), ValueError, "eps must be > 0"),
        "gamma shape": (dict(bn_weight=torch.ones(5)), ValueError, "bn_weight must have shape"),
        "stats dtype": (dict(running_var=torch.ones(4, dtype=torch.int32)), TypeError,
                        "running_var must be"),
        "half stats": (dict(running_var=None), ValueError, "given together"),
        "eval without stats": (dict(training=False, running_mean=None, running_var=None),
                               ValueError, "required when training=False"),
        "one value per channel": (dict(x=torch.randn(1, 4, 1, 1)), ValueError,
                                  "more than 1 value per channel"),
    }
    return base, cases


def _assert_rejects(op, bad_calls, case):
    """``op`` on the good arguments with case ``case``'s changes raises its error."""
    base, cases = bad_calls()
    change, error, message = cases[case]
    with pytest.raises(error, match=message):
        op(*{**base, **change}.values())


@needs_cpu_ext
@pytest.mark.parametrize("case", _forward_bad_calls()[1])
def test_forward_entry_point_rejects(case):
    _assert_rejects(OPS.dwconv_bn_silu_forward, _forward_bad_calls, case)


def _backward_bad_calls():
    x, w = torch.randn(2, 4, 5, 5), torch.randn(4, 1, 3, 3)
    d, go, v = torch.randn(2, 4, 5, 5), torch.randn(2, 4, 5, 5), torch.ones(4)
    base = dict(grad_out=go, x=x, weight=w, conv_out=d, bn_weight=v, bn_bias=v, mean=v, var=v,
                stride=1, training=True, eps=1e-5, output_mask=[True] * 4)
    nhwc = d.contiguous(memory_format=torch.channels_last)
    cases = {
        "grad_out shape": (dict(grad_out=torch.randn(2, 4, 3, 3)), ValueError,
                           r"grad_out must have shape \[2, 4, 5, 5\]"),
        "grad_out dtype": (dict(grad_out=go.double()), TypeError, "grad_out dtype"),
        "conv_out layout": (dict(conv_out=nhwc), ValueError,
                            r"conv_out must be contiguous in the input's memory format \(NCHW\)"),
        "mean shape": (dict(mean=torch.ones(3)), ValueError, "mean must have shape"),
        "stride": (dict(stride=0), ValueError, "stride"),
    }
    return base, cases


@needs_cpu_ext
@pytest.mark.parametrize("case", _backward_bad_calls()[1])
def test_backward_entry_point_rejects(case):
    _assert_rejects(OPS.dwconv_bn_silu_backward, _backward_bad_calls, case)


@needs_cpu_ext
@needs_gpu
def test_cuda_entry_point_rejects_mixed_devices():
    x, w = torch.randn(2, 4, 5, 5, device="cuda"), torch.randn(4, 1, 3, 3, device="cuda")
    with pytest.raises(ValueError, match="bn_weight is on cpu"):
        OPS.dwconv_bn_silu_forward(x, w, torch.ones(4), None, None, None, 1, True, 1e-5, True)


# ---- loading ------------------------------------------------------------------------------

def test_status_reports_a_reason():
    for name in ("cpu", "cuda"):
        usable, reason = extension.status(name)
        assert isinstance(usable, bool) and reason
    if not torch.cuda.is_available():
        assert "cuda" not in fm.available_backends()


def test_missing_build_makes_backend_unavailable_not_an_error(monkeypatch, tmp_path):
    monkeypatch.setattr(extension, "_loaded", {})
    monkeypatch.setattr(extension, "_built_library", lambda module: None)
    usable, reason = extension.status("cpu")
    assert not usable and "not built" in reason and "pip install" in reason


@needs_cpu_ext
def test_cpu_backend_is_the_default_for_cpu_tensors():
    assert fm.available_backends("cpu")[0] == "cpu"
    assert fm.backends.resolve_backend(torch.device("cpu")) == "cpu"


# ---- CUDA: compile every source for sm_80 and sm_90; run parity where a GPU exists ----------

NVCC = _build.find_nvcc()


def nvcc_job(source):
    if NVCC is None:
        return None
    # the object file is not needed: ptxas -v's report is what the test reads
    cmd = _build.nvcc_compile_command(str(_build.CSRC / "cuda" / source), "/dev/null",
                                      archs=["8.0", "9.0"])
    return Job(cmd, timeout_s=900)


@pytest.mark.skipif(NVCC is None, reason="nvcc not found: cannot compile the CUDA sources")
@pytest.mark.parametrize("source", [Path(s).name for s in _build.cuda_sources()])
@pytest.mark.background.with_args(nvcc_job)
def test_cuda_source_compiles_for_sm80_and_sm90(source, background_result):
    result = background_result()
    log = result.stdout + result.stderr
    assert result.returncode == 0, f"nvcc failed:\n{log[-6000:]}"
    usage = re.findall(r"Compiling entry function '(\S+)' for '(sm_\d+)'.*?"
                       r"(\d+) bytes spill stores, (\d+) bytes spill loads.*?"
                       r"Used (\d+) registers", log, re.S)
    assert usage, f"no ptxas -v report in:\n{log[-3000:]}"
    names = [f for f, *_ in usage]
    if shutil.which("c++filt"):
        names = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True,
                               text=True).stdout.splitlines()
    print(f"\n{source}: ptxas -v (arch, registers, spill stores/loads, kernel)")
    for name, (_, arch, stores, loads, regs) in zip(names, usage):
        kernel = re.sub(r"\(.*", "", name.replace("fused_mbconv::(anonymous namespace)::", ""))
        print(f"  {arch} regs={regs:>3} spill={stores}/{loads} {kernel}")
    assert {arch for _, arch, *_ in usage} == {"sm_80", "sm_90"}
    spilled = [(f, a) for f, a, st, ld, _ in usage if int(st) or int(ld)]
    assert not spilled, f"register spills: {spilled}"


# ---- the MBConv block's functions (K1..K6, B6..B1): determinism, launches, entry points ------

# Functions with a 1x1 convolution and what they derive from it. On the CPU backend these are
# BLAS products of fixed row chunks, single-threaded inside the parallel chunk loop; a call with
# a single chunk runs BLAS on the caller's threads, whose summation order may follow their
# count. Every other kernel splits by shape only.
GEMM_FUNCTIONS = ("K1", "K5", "B5", "B1")


@needs_cpu_ext
@pytest.mark.parametrize("geometry", [(4, 6, 24, 8, 20, 18, 3, 1),
                                      CHUNKED_GEOMETRIES["k3-s1-banded"]],
                         ids=["small", "banded"])
def test_block_functions_are_deterministic_and_only_gemms_follow_the_thread_count(geometry):
    c = cast(block_case(geometry, True, seed=2), torch.float32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = dict(flat(block_calls(extension, c)))
        torch.set_num_threads(max(2, threads))
        many = dict(flat(block_calls(extension, c)))
        again = dict(flat(block_calls(extension, c)))
    finally:
        torch.set_num_threads(threads)
    for name, t in one.items():
        assert torch.equal(many[name], again[name]), f"{name}: not reproducible"
        if name.startswith(GEMM_FUNCTIONS):
            # A GEMM sum's rounding scales with its terms, not its value: atol x max(1, |ref|)
            # as in the tolerance rule (element-wise atol alone failed on cancelling sums).
            scale = max(1.0, many[name].abs().amax().item()) if many[name].numel() else 1.0
            torch.testing.assert_close(t, many[name], rtol=1e-5, atol=1e-6 * scale, msg=name)
        else:
            assert torch.equal(t, many[name]), f"{name} depends on the thread count"


@needs_cpu_ext
def test_block_launches_are_accounted():
    c = cast(block_case(BLOCK_GEOMETRIES["k3-s1"], False), torch.float32)
    with accounting.record_launches() as log:
        block_calls(extension, c)
    kernels = [launch.kernel for launch in log]
    assert kernels[:4] == ["mbconv_expand", "mbconv_dwconv", "mbconv_dwconv", "mbconv_squeeze"]
    for two in ("mbconv_project", "mbconv_dwconv"):  # [2] functions: dgrad + wgrad launches
        assert kernels.count(f"{two}_dgrad") == kernels.count(f"{two}_wgrad") == 2
    assert all(launch.backend == "cpu" and launch.bytes_read > 0 for launch in log)


def _block_bad_calls():
    x, w1 = torch.randn(2, 4, 5, 5), torch.randn(8, 4)
    e, v8 = torch.randn(2, 8, 5, 5), torch.ones(8)
    bn8 = (v8 * 0, v8, None, None, 1e-5)
    ops = torch.ops.fused_mbconv_ext
    return {
        "expand 3-D x": (lambda: ops.mbconv_expand_forward(x[0], w1, True), ValueError, "4-D"),
        "expand weight cols": (lambda: ops.mbconv_expand_forward(x, torch.randn(8, 3), True),
                               ValueError, r"weight must be a 2-D \(out, 4\)"),
        "expand weight dtype": (lambda: ops.mbconv_expand_forward(x, w1.double(), True),
                                TypeError, "weight dtype"),
        "dwconv even kernel": (lambda: ops.mbconv_dwconv_forward(
            e, torch.randn(8, 1, 4, 4), 1, *bn8, "silu", True), ValueError, "odd"),
        "dwconv stride": (lambda: ops.mbconv_dwconv_forward(
            e, torch.randn(8, 1, 3, 3), 3, *bn8, "silu", True), ValueError, "stride"),
        "dwconv activation": (lambda: ops.mbconv_dwconv_forward(
            e, torch.randn(8, 1, 3, 3), 1, *bn8, "gelu", True), ValueError, "activation must"),
        "dwconv half bn": (lambda: ops.mbconv_dwconv_forward(
            e, torch.randn(8, 1, 3, 3), 1, v8, None, None, None, 1e-5, "silu", True),
            ValueError, "given together"),
        "squeeze bn shape": (lambda: ops.mbconv_squeeze_forward(
            e, torch.ones(7), v8, None, None, 1e-5, "silu"), ValueError, "bn2 mean must have"),
        "squeeze eps": (lambda: ops.mbconv_squeeze_forward(e, v8, v8, None, None, 0.0, "silu"),
                        ValueError, "eps must be > 0"),
        "excite gate": (lambda: ops.mbconv_excite_forward(
            torch.randn(2, 8), torch.randn(2, 8), torch.randn(2), torch.randn(8, 2),
            torch.randn(8), "silu", "tanh"), ValueError, "gate must be"),
        "excite fc2 shape": (lambda: ops.mbconv_excite_forward(
            torch.randn(2, 8), torch.randn(2, 8), torch.randn(2), torch.randn(8, 3),
            torch.randn(8), "silu", "sigmoid"), ValueError, "fc2_weight must have shape"),
        "project gate shape": (lambda: ops.mbconv_project_forward(
            e, torch.randn(3, 8), torch.randn(4, 8), *bn8, "silu", True), ValueError,
            "gate_values must have shape"),
        "output residual layout": (lambda: ops.mbconv_output_forward(
            e, *bn8, None, e.contiguous(memory_format=torch.channels_last)), ValueError,
            "residual must be contiguous"),
        "output sample_scale": (lambda: ops.mbconv_output_forward(
            e, *bn8, torch.ones(3), None), ValueError, "sample_scale must have shape"),
        "B6 grad_out shape": (lambda: ops.mbconv_output_backward_stats(
            torch.randn(2, 8, 4, 4), e, *bn8, None), ValueError, "grad_out must have shape"),
        "B2 d shape": (lambda: ops.mbconv_dwconv_backward(
            e, None, torch.randn(2, 8, 4, 4), e, torch.randn(8, 1, 3, 3), 1, *bn8, "silu", v8,
            v8, *bn8, True, [True, True]), ValueError, "d must have shape"),
        "B1 grad_residual dtype": (lambda: ops.mbconv_expand_backward(
            e, e, x, w1, *bn8, v8, v8, True, x.double(), [True, True]), TypeError,
            "grad_residual dtype"),
        "integer input": (lambda: ops.mbconv_expand_forward(x.long(), w1.long(), True),
                          TypeError, "float16, bfloat16"),
    }


@needs_cpu_ext
@pytest.mark.parametrize("case", list(_block_bad_calls()) if CPU_OK else [])
def test_block_entry_points_reject(case):
    call, error, message = _block_bad_calls()[case]
    with pytest.raises(error, match=message):
        call()


# ---- the block functions on the GPU (the "cuda" backend) -------------------------------------

needs_cuda_ext = pytest.mark.skipif(not fm.backends.backend_status("cuda", "cuda")[0],
                                    reason="no CUDA device or CUDA extension not built: GPU "
                                    "checks run only on a GPU machine")


@needs_cuda_ext
def test_cuda_block_entry_point_rejects_mixed_devices():
    e = torch.randn(2, 8, 5, 5, device="cuda")
    v8 = torch.ones(8, device="cuda")
    with pytest.raises(ValueError, match="bn2 mean is on cpu"):
        torch.ops.fused_mbconv_ext.mbconv_squeeze_forward(e, v8.cpu(), v8, None, None, 1e-5,
                                                          "silu")
