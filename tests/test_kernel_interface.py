"""Every backend's kernel interface against fused_mbconv.reference (the "torch" backend, whose
docstring specifies it), function by function: dwconv_bn_silu's forward and backward, and the
MBConv block's K1..K6 and B6..B1.

Each test runs on every backend that implements the functions, on each device type it runs
(tests/targets.py: "cpu" and, under TRITON_INTERPRET=1, "triton" for CPU tensors; "cuda-cuda"
where a GPU is present; the compiled Triton kernels are compared through the ops in the op
grids), and holds every result to one check, ``assert_matches``: the tolerance rule of
fused_mbconv/tolerances.py against the reference on float64 copies of the same inputs, with
the kernel floors (``KERNEL_ATOL``), after its shape, dtype, device, memory format and None-ness.
Allocations made in Python (the Triton launchers') are poisoned with NaN (conftest.py's
``poison``), so an element a kernel does not write fails.

The Triton interpreter takes a second or more per call, so it runs the part of each grid that
the test's ``interpreted`` picks (said above each test): every flag, layout, mode and output
mask, in float32, bfloat16 and float64, on its old suites' shapes, those crossing its tile and
channel-chunk edges; the other backends run every case."""

import importlib
import itertools

import pytest
import torch

from fused_mbconv import accounting, reference
from fused_mbconv.backends import record
from fused_mbconv.ops.mbconv import KERNELS as BLOCK_FUNCTIONS
from fused_mbconv.tensors import memory_format_of
from kernel_cases import (BLOCK_GEOMETRIES, CHUNKED_GEOMETRIES, DWCONV_FUNCTIONS,
                          DWCONV_GEOMETRIES, block_calls, block_case, cast, dwconv_case, flat,
                          to_device, upcast)
from targets import kernel_targets
from tolerances import KERNEL_ATOL, assert_close_by_rule

pytestmark = pytest.mark.usefixtures("poison")

F64, F32, BF16, F16 = torch.float64, torch.float32, torch.bfloat16, torch.float16
DTYPES = {"float64": F64, "float32": F32, "bfloat16": BF16, "float16": F16}
LAYOUTS = {"nchw": False, "nhwc": True}
MODES = {"train": True, "eval": False}


def grid(functions, axes, interpreted):
    """Params (device, backend, case) for every kernel target of ``functions`` and every
    combination ``case`` ({axis: value}) of ``axes`` ({axis: {id: value}}), with ids
    ``<case>-<target>``; the Triton interpreter runs the cases whose ids ({axis: id})
    ``interpreted`` picks."""
    combos = [dict(zip(axes, names)) for names in itertools.product(*axes.values())]
    params = []
    for target in kernel_targets(functions):
        device, backend = target.values
        for ids in combos:
            if device == "cpu" and backend == "triton" and not interpreted(ids):
                continue
            case = {axis: axes[axis][name] for axis, name in ids.items()}
            params.append(pytest.param(device, backend, case,
                                       id="-".join(ids.values()) + f"-{target.id}",
                                       marks=target.marks))
    return params


def backend_module(backend):
    return importlib.import_module(record(backend).module)


def assert_matches(got, want, ref64, dtype, what):
    """One result of a backend against the reference's on the same inputs (``want``: the
    rule's eager run) and on their float64 copies (``ref64``), with inputs in ``dtype``."""
    assert (got is None) == (want is None), f"{what}: {got is None=}, reference {want is None=}"
    if want is None:
        return
    assert got.shape == want.shape and got.dtype == want.dtype, \
        f"{what}: {tuple(got.shape)} {got.dtype}, reference {tuple(want.shape)} {want.dtype}"
    assert got.device == want.device, f"{what}: on {got.device}, reference on {want.device}"
    assert not torch.isnan(got).any(), f"{what}: unwritten (NaN) elements"
    assert memory_format_of(got) == memory_format_of(want), f"{what}: memory format"
    assert_close_by_rule(got, want, ref64, dtype, what, floors=KERNEL_ATOL)


def check_function(module, name, args, dtype):
    """``module``'s function ``name`` against the reference's on ``args`` (inputs in
    ``dtype``); returns the reference's results, the next function's inputs."""
    want = getattr(reference, name)(*args)
    got = getattr(module, name)(*args)
    ref64 = want if dtype == F64 else getattr(reference, name)(*upcast(args))
    assert len(got) == len(want), f"{name}: {len(got)} results, reference {len(want)}"
    for i, (g, w, r) in enumerate(zip(got, want, ref64)):
        assert_matches(g, w, r, dtype, f"{name}[{i}]")
    return want


# ---- dwconv_bn_silu -------------------------------------------------------------------------

def dwconv_forward_args(geometry, dtype, channels_last, training, affine, device):
    x, weight, gamma, beta, rm, rv = to_device(
        dwconv_case(geometry, dtype, channels_last, affine), device)
    return x, weight, gamma, beta, rm, rv, geometry[5], training, 1e-5


def check_dwconv_backward(module, forward, forward_results, dtype, mask):
    """The backward on the reference forward's results, BN gradients only where there are BN
    parameters."""
    x, weight, gamma, beta, _, _, stride, training, eps = forward
    _, conv_out, mean, var = forward_results
    grad_out = torch.randn(conv_out.shape, device=x.device).to(dtype).contiguous(
        memory_format=memory_format_of(x))
    mask = list(mask[:2]) + [m and gamma is not None for m in mask[2:]]
    check_function(module, "dwconv_bn_silu_backward", (
        grad_out, x, weight, conv_out, gamma, beta, mean, var, stride, training, eps, mask), dtype)


# The interpreter: k3 stride 1 and k5 stride 2 (odd sizes), float32 and bfloat16 (float64 in the
# mask test), every layout and mode, without BN parameters in k3 training.
@pytest.mark.parametrize("device, backend, case", grid(DWCONV_FUNCTIONS, dict(
    geometry=DWCONV_GEOMETRIES, dtype=DTYPES, layout=LAYOUTS, mode=MODES,
    affine={"affine": True, "no-affine": False}),
    interpreted=lambda i: i["geometry"] in ("k3-s1", "k5-s2-odd")
    and i["dtype"] in ("float32", "bfloat16")
    and (i["affine"] == "affine" or (i["geometry"] == "k3-s1" and i["mode"] == "train"))))
def test_dwconv_matches_reference(device, backend, case):
    """Forward with and without conv_out (the others the same, conv_out empty), backward."""
    module = backend_module(backend)
    forward = dwconv_forward_args(case["geometry"], case["dtype"], case["layout"], case["mode"],
                                  case["affine"], device)
    results = check_function(module, "dwconv_bn_silu_forward", forward + (True,), case["dtype"])
    check_function(module, "dwconv_bn_silu_forward", forward + (False,), case["dtype"])
    check_dwconv_backward(module, forward, results, case["dtype"], [True] * 4)


MASKS = {"".join("1" if b else "0" for b in m): m
         for m in itertools.product([True, False], repeat=4) if any(m)}


# Each gradient is right (and absent where masked off) whatever else is asked for, in float64;
# on every shape but on the interpreter (k5 stride 2 there).
@pytest.mark.parametrize("device, backend, case", grid(DWCONV_FUNCTIONS, dict(
    geometry=DWCONV_GEOMETRIES, mode=MODES, mask=MASKS),
    interpreted=lambda i: i["geometry"] == "k5-s2-odd"))
def test_dwconv_backward_output_mask_subsets(device, backend, case):
    forward = dwconv_forward_args(case["geometry"], F64, False, case["mode"], True, device)
    results = reference.dwconv_bn_silu_forward(*forward, True)
    check_dwconv_backward(backend_module(backend), forward, results, F64, case["mask"])


@pytest.fixture
def many_tiles(monkeypatch):
    """Tiny Triton tiles: many partial rows (more than one BLOCK_T chunk), several channel
    blocks and ragged edges; the other backends are unaffected."""
    try:
        from fused_mbconv.kernels import common, dwconv_bn_silu
    except ImportError:  # no triton: nothing to shrink
        return
    for module in (common, dwconv_bn_silu):  # the problem's tiles, the input-gradient kernel's
        monkeypatch.setattr(module, "tile_sizes", lambda c, p, cl: (4, 2))
    monkeypatch.setattr(common, "BLOCK_T", 4)  # 2 images x 9 tiles = 18 rows: 5 chunks


@pytest.mark.parametrize("device, backend", kernel_targets(DWCONV_FUNCTIONS))
def test_dwconv_statistics_merge_without_cancellation(device, backend, many_tiles):
    """A large common offset (300, spread 2, kept by an identity convolution):
    E[x²]−E[x]² in float32 is off by ~0.02 in the variance here, hundreds of times the rule's
    bound; the merge of the partial statistics must still give the reference, and so must the
    backward's reductions."""
    module = backend_module(backend)
    x, weight, gamma, beta, rm, rv = to_device(dwconv_case((2, 3, 5, 7, 3, 1), F32, False),
                                               device)
    weight = torch.zeros_like(weight)
    weight[:, :, 1, 1] = 1.0
    x = x + 300.0
    forward = (x, weight, gamma, beta, rm, rv, 1, True, 1e-5, True)
    _, conv_out, mean, var = check_function(module, "dwconv_bn_silu_forward", forward, F32)
    check_function(module, "dwconv_bn_silu_backward", (
        torch.randn_like(conv_out), x, weight, conv_out, gamma, beta, mean, var, 1, True, 1e-5,
        [True] * 4), F32)


# ---- the MBConv block: K1..K6, B6..B1 ------------------------------------------------------

ACTIVATIONS = {f"{act}-{gate}": (act, gate) for act, gate in (
    ("silu", "sigmoid"), ("relu6", "hardsigmoid"), ("hardswish", "sigmoid"),
    ("relu", "hardsigmoid"))}
BLOCK_MASKS = {"both": (True, True), "dgrad": (True, False), "wgrad": (False, True)}


def check_block(module, c64, dtype, device, act="silu", gate="sigmoid", training=True,
                mask=(True, True)):
    """Every block function, each optional input given and left out, on the case ``c64`` cast
    to ``dtype``."""
    c = to_device(cast(c64, dtype), device)
    got = dict(flat(block_calls(module, c, act, gate, training, mask)))
    want = dict(flat(block_calls(reference, c, act, gate, training, mask)))
    ref64 = want if dtype == F64 else dict(flat(block_calls(reference, upcast(c), act, gate,
                                                            training, mask)))
    assert got.keys() == want.keys()
    for name, w in want.items():
        assert_matches(got[name], w, ref64[name], dtype, name)


# float64, where the backends compute exactly what the reference does up to summation order:
# every activation and gate, every output mask. The interpreter: k3 stride 1, NCHW, training,
# each mask with SiLU and each other activation with both gradients.
@pytest.mark.parametrize("device, backend, case", grid(BLOCK_FUNCTIONS, dict(
    geometry={k: BLOCK_GEOMETRIES[k] for k in ("k3-s1", "k5-s2-odd", "k7-s2-tiny", "k7-s1",
                                               "k9-s1", "one-out-channel-k1")},
    layout=LAYOUTS, mode=MODES, act=ACTIVATIONS, mask=BLOCK_MASKS),
    interpreted=lambda i: i["geometry"] == "k3-s1" and i["layout"] == "nchw"
    and i["mode"] == "train" and (i["act"] == "silu-sigmoid" or i["mask"] == "both")))
def test_block_functions_match_reference_float64(device, backend, case):
    check_block(backend_module(backend), block_case(case["geometry"], case["layout"]), F64,
                device, *case["act"], case["mode"], case["mask"])


def interpreted_low_precision(i):
    """float32 on one output channel; float32 and bfloat16 on the shape crossing the GEMM tiles
    and channel chunks and on k5 stride 2 without BN2 affine parameters, each (dtype, layout,
    mode) on one of the two (a Latin square: half the cases, every combination)."""
    if i["geometry"] == "one-out-channel-k1":
        return i["dtype"] == "float32" and i["bn2"] == "bn2-affine"
    odd = ((i["dtype"] == "bfloat16") + (i["layout"] == "nhwc") + (i["mode"] == "eval")) % 2
    return i["dtype"] in ("float32", "bfloat16") and (i["geometry"], i["bn2"], odd) in (
        ("two-tiles-k3-s1", "bn2-affine", 0), ("k5-s2-odd", "bn2-no-affine", 1))


# float32, bfloat16 and float16 by the rule, BN2 with and without affine parameters.
@pytest.mark.parametrize("device, backend, case", grid(BLOCK_FUNCTIONS, dict(
    geometry={k: BLOCK_GEOMETRIES[k] for k in ("k5-s2-odd", "two-tiles-k3-s1",
                                               "one-out-channel-k1")},
    dtype={k: DTYPES[k] for k in ("float32", "bfloat16", "float16")}, layout=LAYOUTS,
    mode=MODES, bn2={"bn2-affine": True, "bn2-no-affine": False}),
    interpreted=interpreted_low_precision))
def test_block_functions_low_precision_by_the_tolerance_rule(device, backend, case):
    c64 = block_case(case["geometry"], case["layout"], seed=1, bn2_affine=case["bn2"])
    check_block(backend_module(backend), c64, case["dtype"], device, training=case["mode"])


# The compiled backends' work chunks (float64); not on the interpreter (minutes there).
@pytest.mark.parametrize("device, backend, case", grid(BLOCK_FUNCTIONS, dict(
    geometry=CHUNKED_GEOMETRIES, layout=LAYOUTS, mask=BLOCK_MASKS),
    interpreted=lambda c: False))
def test_block_functions_match_reference_on_chunked_shapes(device, backend, case):
    check_block(backend_module(backend), block_case(case["geometry"], case["layout"], seed=3),
                F64, device, mask=case["mask"])


# ---- K4 / B4 on wide SE layers: the CUDA kernels' channel slices -----------------------------

# (N, C, S) in float64, where both excite launches move over 1 MB: B0's widest SE layer at
# batch 32 (64-channel slices on 132 SMs) and at batch 8 (one-warp slices, still short of 528).
WIDE_SE = {"1152x48-batch32": (32, 1152, 48), "1152x48-batch8": (8, 1152, 48)}


@pytest.mark.parametrize("device, backend, case", grid(
    ["mbconv_excite_forward", "mbconv_excite_backward"], dict(shape=WIDE_SE),
    interpreted=lambda c: False))
def test_excite_on_wide_se_layers_at_every_slicing(device, backend, case):
    """K4 and B4 with grids sized for 1 SM and for 132: the CUDA kernels' slices of 256
    channels, then narrower ones (issue 19's rule); both match the reference, bit for bit
    the same (each element is written by one block, in the same order)."""
    n, c, s = case["shape"]
    g = torch.Generator().manual_seed(4)

    def rand(*shape, scale=1.0):
        return (torch.randn(shape, generator=g, dtype=F64) * scale).to(device)

    pooled, grad_gate = rand(n, c), rand(n, c)
    fc = (rand(s, c, scale=c ** -0.5), rand(s), rand(c, s, scale=s ** -0.5), rand(c))
    want = (reference.mbconv_excite_forward(pooled, *fc, "silu", "sigmoid"),
            *reference.mbconv_excite_backward(grad_gate, pooled, *fc, "silu", "sigmoid"))
    module = backend_module(backend)
    got, programs = {}, {}
    for sms in (1, accounting.H100_SMS):
        with accounting.record_launches(multiprocessors=sms) as launches:
            got[sms] = (module.mbconv_excite_forward(pooled, *fc, "silu", "sigmoid"),
                        *module.mbconv_excite_backward(grad_gate, pooled, *fc, "silu",
                                                       "sigmoid"))
        programs[sms] = [launch.programs for launch in launches if launch.grids]
    for i, (wide, narrow, w) in enumerate(zip(got[1], got[accounting.H100_SMS], want)):
        assert_matches(narrow, w, w, F64, f"K4 / B4 result {i}")
        assert torch.equal(wide, narrow), f"K4 / B4 result {i} depends on the slicing"
    most = min(accounting.MIN_PROGRAMS, n * -(-c // 32))  # one-warp slices at the narrowest
    assert len(programs[1]) == len(programs[accounting.H100_SMS]) in (0, 2), programs  # 0: no grid
    for few, many in zip(programs[1], programs[accounting.H100_SMS]):
        assert few < many and many >= most, (programs, most)


# ---- B5 / B1 weight gradients: the CUDA GEMM's tiles and chunks -------------------------------

# 162 rows (2 images of 9 x 9: 10 steps of 16 and 2 rows). B1's (72, 70): 2 x 2 tiles of 64, both
# ragged; B5's (20, 72): 3 tiles of 32. Sized for 1 SM, B1 runs one chunk, B5 three (5, 5 and
# 1 steps, the last ragged); for 132 SMs each runs 11 chunks of one step.
WGRAD_GEOMETRY = (2, 70, 72, 20, 9, 9, 3, 1)
WGRAD_GRIDS = {1: {"mbconv_expand_wgrad": 4, "mbconv_project_wgrad": 9},
               accounting.H100_SMS: {"mbconv_expand_wgrad": 44, "mbconv_project_wgrad": 33}}


@pytest.mark.parametrize("device, backend, case", grid(
    ["mbconv_project_backward", "mbconv_expand_backward"], dict(layout=LAYOUTS),
    interpreted=lambda c: False))
def test_pointwise_weight_gradients_at_every_slicing(device, backend, case):
    """B5 and B1 (float64) with grids sized for 1 SM and for 132: the CUDA weight-gradient
    GEMM's tiles and position chunks, ragged at both ends, merged in chunk order. Each slicing
    matches the reference and reruns bit for bit; the two differ only by rounding (the chunks'
    partials are rounded apart: a result depends on the SM count, never on scheduling)."""
    c = to_device(block_case(WGRAD_GEOMETRY, case["layout"], seed=5), device)
    mask = [True, True]

    def calls(m):
        return {"B5": m.mbconv_project_backward(c["go"], c["q"], c["d"], c["gate"], c["pw"],
                                                c["bn2"], "silu", c["bn3"], *c["s3"], c["ss"],
                                                True, mask),
                "B1": m.mbconv_expand_backward(c["gy1"], c["e"], c["x"], c["w1"], c["bn1"],
                                               *c["s1"], True, c["gres"], mask)}

    want = dict(flat(calls(reference)))
    module = backend_module(backend)
    for sms, grids in WGRAD_GRIDS.items():
        runs = []
        for _ in range(2):
            with accounting.record_launches(multiprocessors=sms) as launches:
                runs.append(dict(flat(calls(module))))
            gemms = {launch.kernel: launch.grids[0][1] for launch in launches  # then the merge
                     if launch.grids and launch.kernel in grids}
            assert gemms in ({}, grids), (sms, gemms)  # {}: no grid of ours to check
        for name, w in want.items():
            assert_matches(runs[0][name], w, w, F64, f"{name} at {sms} SMs")
            assert torch.equal(runs[0][name], runs[1][name]), f"{name} at {sms} SMs: reruns differ"
