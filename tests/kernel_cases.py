"""Inputs of the kernel-interface functions (fused_mbconv.reference's docstring) and the calls
that run them on a backend module: tests/test_kernel_interface.py compares every backend with
the reference on them; tests/test_extension.py's determinism and launch tests reuse them."""

import torch

from fused_mbconv import reference
from fused_mbconv.tensors import NormArgs, accumulate_dtype

DWCONV_FUNCTIONS = ("dwconv_bn_silu_forward", "dwconv_bn_silu_backward")

DWCONV_GEOMETRIES = {  # (N, C, H, W, kernel, stride)
    "k3-s1": (2, 5, 9, 7, 3, 1), "k3-s2": (2, 5, 9, 7, 3, 2),
    "k5-s2-even": (1, 3, 8, 10, 5, 2), "k5-s2-odd": (2, 6, 7, 5, 5, 2),
    "k7-runtime-s1": (2, 4, 6, 9, 7, 1),  # the CPU stencil's generic path (others compiled)
    "k7-wider-than-input": (1, 2, 3, 2, 7, 2), "1x1-plane": (3, 2, 1, 1, 3, 1),
}


def dwconv_case(geometry, dtype, channels_last, affine=True):
    """(x, weight, bn_weight, bn_bias, running_mean, running_var) of dwconv_bn_silu_forward:
    x and weight in ``dtype``, the BatchNorm's vectors in its accumulate dtype."""
    n, c, h, w, k, _ = geometry
    acc = accumulate_dtype(dtype)
    x = (torch.randn(n, c, h, w, dtype=torch.float64) * 2 + 0.3).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(c, 1, k, k, dtype=torch.float64).to(dtype)
    gamma = torch.rand(c, dtype=acc) + 0.5 if affine else None
    beta = torch.randn(c, dtype=acc) if affine else None
    return x, weight, gamma, beta, torch.randn(c, dtype=acc) * 0.2, torch.rand(c, dtype=acc) + 0.5


BLOCK_GEOMETRIES = {  # (N, Cin, Ce, Cout, H, W, k, stride)
    "k3-s1": (2, 5, 12, 5, 9, 7, 3, 1),
    "k5-s2-odd": (2, 4, 10, 6, 9, 11, 5, 2),
    "k7-s2-tiny": (3, 3, 6, 4, 3, 2, 7, 2),
    "k7-s1": (2, 3, 20, 4, 8, 13, 7, 1),
    "k9-s1": (2, 4, 10, 5, 10, 12, 9, 1),  # the CPU stencil's generic path (others compiled)
    # the Triton GEMMs' edges: two position tiles (9 * 8 = 72 > 64), two channel chunks (36 > 32)
    "two-tiles-k3-s1": (2, 20, 36, 20, 9, 8, 3, 1),
    # One output channel: grad_out is both NCHW- and NHWC-contiguous, grad_a2 is not, so the
    # GEMMs must take the layout from the problem, not from their first operand.
    "one-out-channel-k1": (2, 3, 3, 1, 2, 3, 1, 1),
}
# Images spanning several work chunks of the CPU kernels: GEMM row blocks (H * W * Ce > 131072)
# and depthwise bands with halo rows (odd H: a last band that owns the extra input row), with
# channel counts that use every vector width of the stencils (108 = 3 * 32 + 8 + 4 doubles,
# 64 + 2 * 16 + 12 floats).
CHUNKED_GEOMETRIES = {
    "k3-s1-banded": (2, 8, 108, 12, 40, 40, 3, 1),
    "k5-s2-banded": (2, 8, 108, 12, 41, 39, 5, 2),
}
# What the per-sample and per-channel vectors of a block case are: accumulate-dtype values.
_VECTORS = ("ss", "pooled", "gate", "ggate", "gpooled")


def block_case(geometry, channels_last, seed=0, bn2_affine=True):
    """Float64 inputs of every block function: the reference's own intermediates, so each
    function is tested on its own; random gradients and BatchNorm reductions. Sample 0 of the
    drop-path scale is dropped."""
    n, cin, ce, cout, h, w, k, s = geometry
    g = torch.Generator().manual_seed(seed)

    def t(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def bn(c, affine=True):
        return NormArgs(t(c, scale=0.2), torch.rand(c, generator=g, dtype=torch.float64) + 0.5,
                        t(c, scale=0.3) + 1 if affine else None,
                        t(c, scale=0.3) if affine else None, 1e-3)

    c = dict(x=t(n, cin, h, w).contiguous(memory_format=fmt), w1=t(ce, cin, scale=0.5),
             dw=t(ce, 1, k, k, scale=0.3), pw=t(cout, ce, scale=0.3), f1w=t(3, ce),
             f1b=t(3), f2w=t(ce, 3), f2b=t(ce), stride=s, ss=torch.tensor(
                 [0.0] + [1.25] * (n - 1), dtype=torch.float64))
    c["e"] = reference.mbconv_expand_forward(c["x"], c["w1"], False)[0]
    c["bn1"], c["bn2"], c["bn3"] = bn(ce), bn(ce, bn2_affine), bn(cout)
    c["d"] = reference.mbconv_dwconv_forward(c["e"], c["dw"], s, c["bn1"], "silu", False)[0]
    c["pooled"] = reference.mbconv_squeeze_forward(c["d"], c["bn2"], "silu")
    c["gate"] = reference.mbconv_excite_forward(c["pooled"], c["f1w"], c["f1b"], c["f2w"],
                                                c["f2b"], "silu", "sigmoid")
    c["q"] = reference.mbconv_project_forward(c["d"], c["gate"], c["pw"], c["bn2"], "silu",
                                              False)[0]
    for name, like in (("go", "q"), ("res", "q"), ("ga2", "d"), ("gy1", "e"), ("gres", "x")):
        c[name] = t(*c[like].shape).contiguous(memory_format=fmt)
    c["ggate"], c["gpooled"] = t(n, ce), t(n, ce, scale=0.1)
    for name, size in (("s1", ce), ("s2", ce), ("s3", cout)):
        c[name] = (t(size), t(size))
    return c


def cast(c, dtype):
    """A block case in ``dtype``: activations and weights in it, statistics, reductions and
    per-sample vectors in its accumulate dtype."""
    acc = accumulate_dtype(dtype)

    def to(key, v):
        if isinstance(v, NormArgs):
            return NormArgs(v.mean.to(acc), v.var.to(acc), *(
                None if p is None else p.to(dtype) for p in (v.weight, v.bias)), v.eps)
        if isinstance(v, tuple):
            return tuple(u.to(acc) for u in v)
        if isinstance(v, torch.Tensor):
            return v.to(acc if key in _VECTORS else dtype)
        return v
    return {k: to(k, v) for k, v in c.items()}


def map_tensors(value, fn):
    """``value`` (a tensor, or a dict, tuple or NormArgs of them) with ``fn`` applied to each
    of its tensors."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, dict):
        return {k: map_tensors(v, fn) for k, v in value.items()}
    if isinstance(value, tuple):
        items = (map_tensors(v, fn) for v in value)
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    return value


def to_device(value, device):
    return map_tensors(value, lambda t: t.to(device))


def upcast(value):
    """The same inputs in float64, for the tolerance rule's float64 reference."""
    return map_tensors(value, lambda t: t.double() if t.is_floating_point() else t)


def block_calls(m, c, act="silu", gate="sigmoid", training=True, mask=(True, True)):
    """Every block function of module ``m`` on the inputs ``c``, each optional input given and
    left out: {name: results}."""
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
        "K6-no-scale": m.mbconv_output_forward(c["q"], c["bn3"], None, c["res"]),
        "K6-plain": m.mbconv_output_forward(c["q"], c["bn3"], None, None),
        "B6": m.mbconv_output_backward_stats(c["go"], c["q"], c["bn3"], c["ss"]),
        "B6-no-scale": m.mbconv_output_backward_stats(c["go"], c["q"], c["bn3"], None),
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


def flat(results):
    """(name[i], tensor or None) for every result of ``block_calls``."""
    for name, r in results.items():
        for i, t in enumerate(r if isinstance(r, tuple) else (r,)):
            yield f"{name}[{i}]", t
