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
from background import Job

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
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-6, atol=0)  # a few fp32 ulps


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


# ---- the MBConv block's kernel interface (K1..K6, B6..B1) against the reference ----------------

from fused_mbconv.tensors import NormArgs  # noqa: E402
from tolerances import assert_close_by_rule  # noqa: E402

BLOCK_GEOMETRIES = {  # (N, Cin, Ce, Cout, H, W, k, stride)
    "k3-s1": (2, 5, 12, 5, 9, 7, 3, 1),
    "k5-s2-odd": (2, 4, 10, 6, 9, 11, 5, 2),
    "k7-s2-tiny": (3, 3, 6, 4, 3, 2, 7, 2),
    "k7-s1": (2, 3, 20, 4, 8, 13, 7, 1),
    "k9-s1": (2, 4, 10, 5, 10, 12, 9, 1),  # the stencil's generic path (others are compiled)
}


def _block_case(geometry, channels_last, seed=0):
    """Float64 inputs of every block function: the reference's own intermediates, so each
    function is tested on its own."""
    n, cin, ce, cout, h, w, k, s = geometry
    g = torch.Generator().manual_seed(seed)
    t = lambda *shape, scale=1.0: torch.randn(*shape, generator=g, dtype=torch.float64) * scale  # noqa: E731
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def bn(c):
        return NormArgs(t(c, scale=0.2), torch.rand(c, generator=g, dtype=torch.float64) + 0.5,
                        t(c, scale=0.3) + 1, t(c, scale=0.3), 1e-3)

    c = dict(x=t(n, cin, h, w).contiguous(memory_format=fmt), w1=t(ce, cin, scale=0.5),
             dw=t(ce, 1, k, k, scale=0.3), pw=t(cout, ce, scale=0.3), f1w=t(3, ce),
             f1b=t(3), f2w=t(ce, 3), f2b=t(ce), stride=s, ss=torch.tensor(
                 [0.0] + [1.25] * (n - 1), dtype=torch.float64))
    c["e"] = reference.mbconv_expand_forward(c["x"], c["w1"], False)[0]
    c["bn1"], c["bn2"], c["bn3"] = bn(ce), bn(ce), bn(cout)
    c["d"] = reference.mbconv_dwconv_forward(c["e"], c["dw"], s, c["bn1"], "silu", False)[0]
    c["pooled"] = reference.mbconv_squeeze_forward(c["d"], c["bn2"], "silu")
    c["gate"] = reference.mbconv_excite_forward(c["pooled"], c["f1w"], c["f1b"], c["f2w"],
                                                c["f2b"], "silu", "sigmoid")
    c["q"] = reference.mbconv_project_forward(c["d"], c["gate"], c["pw"], c["bn2"], "silu",
                                              False)[0]
    c["go"] = t(*c["q"].shape).contiguous(memory_format=fmt)
    c["res"] = t(*c["q"].shape).contiguous(memory_format=fmt)
    c["ga2"] = t(*c["d"].shape).contiguous(memory_format=fmt)
    c["gy1"] = t(*c["e"].shape).contiguous(memory_format=fmt)
    c["ggate"], c["gpooled"] = t(n, ce), t(n, ce, scale=0.1)
    c["gres"] = t(*c["x"].shape).contiguous(memory_format=fmt)
    for name, size in (("s1", ce), ("s2", ce), ("s3", cout)):
        c[name] = (t(size), t(size))
    return c


def _cast(c, dtype):
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    vectors = ("ss", "pooled", "gate", "ggate", "gpooled")

    def cast(key, v):
        if isinstance(v, NormArgs):
            return NormArgs(v.mean.to(acc), v.var.to(acc), v.weight.to(dtype), v.bias.to(dtype),
                            v.eps)
        if isinstance(v, tuple):
            return tuple(u.to(acc) for u in v)
        if isinstance(v, torch.Tensor):
            return v.to(acc if key in vectors else dtype)
        return v
    return {k: cast(k, v) for k, v in c.items()}


def _block_calls(m, c, act="silu", gate="sigmoid", training=True, mask=(True, True)):
    """Every block function of module m on the inputs c: {name: results}."""
    mask, s = list(mask), c["stride"]
    return {
        "K1": m.mbconv_expand_forward(c["x"], c["w1"], training),
        "K2": m.mbconv_dwconv_forward(c["e"], c["dw"], s, c["bn1"], act, training),
        "K2-no-bn1": m.mbconv_dwconv_forward(c["e"], c["dw"], s, None, act, training),
        "K3": m.mbconv_squeeze_forward(c["d"], c["bn2"], act),
        "K4": m.mbconv_excite_forward(c["pooled"], c["f1w"], c["f1b"], c["f2w"], c["f2b"], act,
                                      gate),
        "K5": m.mbconv_project_forward(c["d"], c["gate"], c["pw"], c["bn2"], act, training),
        "K5-no-gate": m.mbconv_project_forward(c["d"], None, c["pw"], c["bn2"], act, training),
        "K6": m.mbconv_output_forward(c["q"], c["bn3"], c["ss"], c["res"]),
        "K6-plain": m.mbconv_output_forward(c["q"], c["bn3"], None, None),
        "B6": m.mbconv_output_backward_stats(c["go"], c["q"], c["bn3"], c["ss"]),
        "B5": m.mbconv_project_backward(c["go"], c["q"], c["d"], c["gate"], c["pw"], c["bn2"],
                                        act, c["bn3"], *c["s3"], c["ss"], training, mask),
        "B5-no-gate": m.mbconv_project_backward(c["go"], c["q"], c["d"], None, c["pw"],
                                                c["bn2"], act, c["bn3"], *c["s3"], None,
                                                training, mask),
        "B4": m.mbconv_excite_backward(c["ggate"], c["pooled"], c["f1w"], c["f1b"], c["f2w"],
                                       c["f2b"], act, gate),
        "B3": m.mbconv_dwconv_backward_stats(c["ga2"], c["gpooled"], c["d"], c["bn2"], act),
        "B3-no-se": m.mbconv_dwconv_backward_stats(c["ga2"], None, c["d"], c["bn2"], act),
        "B2": m.mbconv_dwconv_backward(c["ga2"], c["gpooled"], c["d"], c["e"], c["dw"], s,
                                       c["bn2"], act, *c["s2"], c["bn1"], training, mask),
        "B2-no-bn1": m.mbconv_dwconv_backward(c["ga2"], None, c["d"], c["e"], c["dw"], s,
                                              c["bn2"], act, *c["s2"], None, training, mask),
        "B1": m.mbconv_expand_backward(c["gy1"], c["e"], c["x"], c["w1"], c["bn1"], *c["s1"],
                                       training, c["gres"], mask),
        "B1-no-res": m.mbconv_expand_backward(c["gy1"], c["e"], c["x"], c["w1"], c["bn1"],
                                              *c["s1"], training, None, mask),
    }


def _flat(results):
    for name, r in results.items():
        for i, t in enumerate(r if isinstance(r, tuple) else (r,)):
            yield f"{name}[{i}]", t


def _to(c, device):
    def move(v):
        if isinstance(v, NormArgs):
            return NormArgs(*(t.to(device) if isinstance(t, torch.Tensor) else t for t in v))
        if isinstance(v, tuple):
            return tuple(t.to(device) for t in v)
        return v.to(device) if isinstance(v, torch.Tensor) else v
    return {k: move(v) for k, v in c.items()}


BLOCK_MASKS = pytest.mark.parametrize("mask", [(True, True), (True, False), (False, True)],
                                      ids=["both", "dgrad", "wgrad"])
BLOCK_ACTIVATIONS = pytest.mark.parametrize(
    "act, gate", [("silu", "sigmoid"), ("relu6", "hardsigmoid"), ("hardswish", "sigmoid"),
                  ("relu", "hardsigmoid")])
BLOCK_MODES = pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
BLOCK_LAYOUTS = pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
BLOCK_SHAPES = pytest.mark.parametrize("geometry", BLOCK_GEOMETRIES.values(),
                                       ids=BLOCK_GEOMETRIES.keys())


@needs_cpu_ext
@BLOCK_MASKS
@BLOCK_ACTIVATIONS
@BLOCK_MODES
@BLOCK_LAYOUTS
@BLOCK_SHAPES
def test_block_functions_match_reference_float64(geometry, channels_last, training, act, gate,
                                                 mask):
    _assert_block_functions_match_float64(_block_case(geometry, channels_last), channels_last,
                                          training, act, gate, mask)


def _assert_block_functions_match_float64(c, channels_last, training=True, act="silu",
                                          gate="sigmoid", mask=(True, True)):
    got = dict(_flat(_block_calls(extension, c, act, gate, training, mask)))
    want = dict(_flat(_block_calls(reference, c, act, gate, training, mask)))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for name, r in want.items():
        g = got[name]
        if r is None:
            assert g is None, name
            continue
        assert g.dtype == r.dtype and g.shape == r.shape, name
        scale = max(1.0, r.abs().max().item()) if r.numel() else 1.0
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-11 * scale, msg=name)
        if r.dim() == 4:
            assert g.is_contiguous(memory_format=fmt), f"{name}: layout"


# Images spanning several work chunks of the CPU kernels: GEMM row blocks (H * W * Ce > 131072)
# and depthwise bands with halo rows (odd H: a last band that owns the extra input row), with
# channel counts that use every vector width of the stencils (108 = 3 * 32 + 8 + 4 doubles,
# 64 + 2 * 16 + 12 floats).
CHUNKED_GEOMETRIES = {  # (N, Cin, Ce, Cout, H, W, k, stride)
    "k3-s1-banded": (2, 8, 108, 12, 40, 40, 3, 1),
    "k5-s2-banded": (2, 8, 108, 12, 41, 39, 5, 2),
}


@needs_cpu_ext
@pytest.mark.parametrize("mask", [(True, True), (True, False), (False, True)],
                         ids=["both", "dgrad", "wgrad"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("geometry", CHUNKED_GEOMETRIES.values(), ids=CHUNKED_GEOMETRIES.keys())
def test_block_functions_match_reference_on_chunked_shapes(geometry, channels_last, mask):
    _assert_block_functions_match_float64(_block_case(geometry, channels_last, seed=3),
                                          channels_last, mask=mask)


@needs_cpu_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@BLOCK_LAYOUTS
def test_block_functions_low_precision_by_the_tolerance_rule(dtype, channels_last):
    check_block_functions_low_precision(dtype, channels_last, "cpu")


def check_block_functions_low_precision(dtype, channels_last, device):
    c64 = _to(_block_case(BLOCK_GEOMETRIES["k5-s2-odd"], channels_last, seed=1), device)
    ct = _cast(c64, dtype)
    ref64 = dict(_flat(_block_calls(reference, c64)))
    eager = dict(_flat(_block_calls(reference, ct)))
    for name, g in _flat(_block_calls(extension, ct)):
        assert g.dtype == eager[name].dtype, name
        if eager[name].numel() == 0:  # e.g. the gate gradient without a gate
            assert g.numel() == 0, name
            continue
        assert_close_by_rule(g, eager[name], ref64[name], dtype, name)


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
    c = _cast(_block_case(geometry, True, seed=2), torch.float32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = dict(_flat(_block_calls(extension, c)))
        torch.set_num_threads(max(2, threads))
        many = dict(_flat(_block_calls(extension, c)))
        again = dict(_flat(_block_calls(extension, c)))
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
    c = _cast(_block_case(BLOCK_GEOMETRIES["k3-s1"], False), torch.float32)
    with accounting.record_launches() as log:
        _block_calls(extension, c)
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


# ---- the block functions on the GPU (the "cuda" backend; emulated on the CPU by
# test_cuda_emulation.py) ----------------------------------------------------------------------

needs_cuda_ext = pytest.mark.skipif(not CUDA_OK, reason="no CUDA device or CUDA extension not "
                                    "built: GPU parity runs only on a GPU machine")


@needs_cuda_ext
@BLOCK_MASKS
@BLOCK_ACTIVATIONS
@BLOCK_MODES
@BLOCK_LAYOUTS
@BLOCK_SHAPES
def test_cuda_block_functions_match_reference_float64(geometry, channels_last, training, act,
                                                      gate, mask):
    _assert_block_functions_match_float64(_to(_block_case(geometry, channels_last), "cuda"),
                                          channels_last, training, act, gate, mask)


@needs_cuda_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@BLOCK_LAYOUTS
def test_cuda_block_functions_low_precision_by_the_tolerance_rule(dtype, channels_last):
    check_block_functions_low_precision(dtype, channels_last, "cuda")


@needs_cuda_ext
def test_cuda_block_entry_point_rejects_mixed_devices():
    e = torch.randn(2, 8, 5, 5, device="cuda")
    v8 = torch.ones(8, device="cuda")
    with pytest.raises(ValueError, match="bn2 mean is on cpu"):
        torch.ops.fused_mbconv_ext.mbconv_squeeze_forward(e, v8.cpu(), v8, None, None, 1e-5,
                                                          "silu")
