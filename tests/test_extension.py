"""The compiled csrc/ extension: entry-point checks, its kernel-interface functions against
fused_mbconv.reference, determinism, loading, and an nvcc compile of every CUDA source.

The parity grid through the public op (dtypes, layouts, running stats, gradcheck, opcheck)
runs on the "cpu" backend in test_dwconv_bn_silu.py."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import fused_mbconv as fm
from fused_mbconv import _build, accounting, extension, reference

CPU_OK, CPU_REASON = fm.backends.backend_status("cpu")
needs_cpu_ext = pytest.mark.skipif(not CPU_OK, reason=f"cpu extension unavailable: {CPU_REASON}")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(),
                               reason="no CUDA device: GPU parity runs only where one is present")

OPS = torch.ops.fused_mbconv_ext if CPU_OK else None


def _case(n=2, c=5, h=9, w=7, k=3, dtype=torch.float64, channels_last=False, device="cpu"):
    x = torch.randn(n, c, h, w, dtype=dtype, device=device) * 2 + 0.3
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(c, 1, k, k, dtype=dtype, device=device)
    f64 = dict(dtype=torch.float64 if dtype == torch.float64 else torch.float32, device=device)
    gamma = torch.rand(c, **f64) + 0.5
    beta = torch.randn(c, **f64)
    mean = torch.randn(c, **f64) * 0.2
    var = torch.rand(c, **f64) + 0.5
    return x, weight, gamma, beta, mean, var


# ---- the kernel interface against the reference, float64 ------------------------------------

GEOMETRIES = {  # (N, C, H, W, k, stride)
    "k3-s1": (2, 5, 9, 7, 3, 1),
    "k3-s2": (2, 5, 9, 7, 3, 2),
    "k5-s2-even": (1, 3, 8, 10, 5, 2),
    "k7-runtime-s1": (2, 4, 6, 9, 7, 1),
    "k7-wider-than-input": (1, 2, 3, 2, 7, 2),
    "1x1-plane": (3, 2, 1, 1, 3, 1),
}


@needs_cpu_ext
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("geometry", GEOMETRIES.values(), ids=GEOMETRIES.keys())
def test_kernel_interface_matches_reference(geometry, channels_last, training, affine):
    n, c, h, w, k, s = geometry
    x, weight, gamma, beta, mean, var = _case(n, c, h, w, k, channels_last=channels_last)
    if not affine:
        gamma = beta = None
    args = (x, weight, gamma, beta, mean, var, s, training, 1e-5)
    want = reference.dwconv_bn_silu_forward(*args, True)
    got = extension.dwconv_bn_silu_forward(*args, True)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for name, g, r in zip(("out", "conv_out", "mean", "var"), got, want):
        assert g.dtype == r.dtype and g.shape == r.shape, name
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12, msg=name)
    assert got[0].is_contiguous(memory_format=fmt) and got[1].is_contiguous(memory_format=fmt)
    # Without need_conv_out: the same output, an empty conv_out.
    lean = extension.dwconv_bn_silu_forward(*args, False)
    assert lean[1].numel() == 0
    torch.testing.assert_close(lean[0], want[0], rtol=1e-12, atol=1e-12)

    grad_out = torch.randn_like(want[0])
    bargs = (grad_out, x, weight, want[1], gamma, beta, want[2], want[3], s, training, 1e-5)
    masks = ([True] * 4, [True, False, False, True], [False, True, True, False],
             [False, False, True, True])
    ref_grads = reference.dwconv_bn_silu_backward(*bargs, [True] * 4)
    for mask in masks:
        if not affine:
            mask = mask[:2] + [False, False]
        grads = extension.dwconv_bn_silu_backward(*bargs, mask)
        for name, g, r, m in zip(("x", "weight", "gamma", "beta"), grads, ref_grads, mask):
            if not m:
                assert g is None, name
                continue
            torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10, msg=f"grad {name}")
        if mask[0]:
            assert grads[0].is_contiguous(memory_format=fmt)


@needs_cpu_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_low_precision_outputs_are_finite_and_close(dtype):
    """Every element written (garbage would be non-finite or far off), fp32 statistics."""
    x, weight, gamma, beta, mean, var = _case(2, 6, 11, 13, 3, dtype=dtype)
    out, conv_out, bmean, bvar = extension.dwconv_bn_silu_forward(
        x, weight, gamma, beta, mean, var, 2, True, 1e-5, True)
    assert bmean.dtype == bvar.dtype == torch.float32
    ref = reference.dwconv_bn_silu_forward(x, weight, gamma, beta, mean, var, 2, True, 1e-5,
                                           True)
    tol = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 3e-3}[dtype]
    for g, r in zip((out, conv_out, bmean, bvar), ref):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g.float(), r.float(), rtol=tol, atol=tol)


@needs_cpu_ext
def test_statistics_have_no_cancellation():
    """A large mean and a small spread: naive E[x^2] - E[x]^2 in fp32 would lose the variance."""
    x = torch.randn(4, 3, 32, 32) * 1e-2 + 1e3
    weight = torch.zeros(3, 1, 3, 3)
    weight[:, :, 1, 1] = 1.0  # identity conv: d == x
    _, _, mean, var = extension.dwconv_bn_silu_forward(x, weight, None, None, None, None, 1,
                                                       True, 1e-5, False)
    ref_var, ref_mean = torch.var_mean(x.double(), dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(var.double(), ref_var, rtol=1e-3, atol=0)
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-7, atol=0)


@needs_cpu_ext
def test_results_do_not_depend_on_thread_count():
    x, weight, gamma, beta, mean, var = _case(4, 8, 20, 18, 3, dtype=torch.float32)
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
    x, weight, gamma, beta, mean, var = _case(dtype=torch.float32)
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


@needs_cpu_ext
@pytest.mark.parametrize("case", _forward_bad_calls()[1])
def test_forward_entry_point_rejects(case):
    base, cases = _forward_bad_calls()
    change, error, message = cases[case]
    args = {**base, **change}
    with pytest.raises(error, match=message):
        OPS.dwconv_bn_silu_forward(*args.values())


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
    base, cases = _backward_bad_calls()
    change, error, message = cases[case]
    args = {**base, **change}
    with pytest.raises(error, match=message):
        OPS.dwconv_bn_silu_backward(*args.values())


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


@pytest.mark.skipif(NVCC is None, reason="nvcc not found: cannot compile the CUDA sources")
@pytest.mark.parametrize("source", [Path(s).name for s in _build.cuda_sources()])
def test_cuda_source_compiles_for_sm80_and_sm90(source, tmp_path):
    src = str(_build.CSRC / "cuda" / source)
    cmd = _build.nvcc_compile_command(src, str(tmp_path / "out.o"), archs=["8.0", "9.0"])
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
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


CUDA_OK = fm.backends.backend_status("cuda", "cuda")[0]


@pytest.mark.skipif(not CUDA_OK, reason="no CUDA device or CUDA extension not built: GPU parity "
                    "runs only on a GPU machine")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("geometry", GEOMETRIES.values(), ids=GEOMETRIES.keys())
def test_cuda_matches_reference(geometry, channels_last, training, dtype):
    n, c, h, w, k, s = geometry
    x, weight, gamma, beta, mean, var = _case(n, c, h, w, k, dtype=dtype,
                                              channels_last=channels_last, device="cuda")
    args = (x, weight, gamma, beta, mean, var, s, training, 1e-5)
    tol = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 5e-2}[dtype]
    want = reference.dwconv_bn_silu_forward(*args, True)
    got = extension.dwconv_bn_silu_forward(*args, True)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=tol, atol=tol)
    grad_out = torch.randn_like(want[0])
    bargs = (grad_out, x, weight, want[1], gamma, beta, want[2], want[3], s, training, 1e-5,
             [True] * 4)
    for g, r in zip(extension.dwconv_bn_silu_backward(*bargs),
                    reference.dwconv_bn_silu_backward(*bargs)):
        scale = max(1.0, r.abs().max().item())
        torch.testing.assert_close(g, r, rtol=tol, atol=tol * scale)
