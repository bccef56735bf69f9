"""The stem and head ops (fused_mbconv::conv_bn_act, fused_mbconv::pointwise_bn_act_pool) and
their modules against eager Conv2d + BatchNorm2d + activation (+ global average pool): parity
of outputs, input and parameter gradients and running statistics under the suite's tolerance
rule on every backend usable for CPU tensors (the Triton interpreter on a few cases), float64
gradcheck, opcheck, torch.compile(fullgraph=True), what is saved for backward, and bad input
(a clear error, no state changed)."""

import copy

import pytest
import torch
import torch.nn as nn

import fused_mbconv as fm
from fused_mbconv import profiling
from fused_mbconv.functional import BatchNormParams
from fused_mbconv.ops.stem_head import HEAD_KERNELS, STEM_KERNELS, kernel_sources
from parity import assert_compiles_fullgraph_like_eager, check

BACKENDS = fm.available_backends("cpu")
# (N, Cin, Cout, H, W, kernel, stride): the stem's 3x3 stride 2 on odd sizes, a 1x1 head,
# a 5x5 stride 1, batch 1.
CONV_SHAPES = {
    "stem-k3-s2": (2, 3, 8, 11, 9, 3, 2),
    "head-k1": (2, 12, 20, 5, 5, 1, 1),
    "k5-s1": (2, 5, 6, 7, 6, 5, 1),
    "batch1-k3-s2": (1, 4, 7, 6, 5, 3, 2),
}
HEAD_SHAPES = {"7x7": (2, 12, 20, 7, 7), "batch1-3x4": (1, 7, 9, 3, 4)}
ACTIVATIONS = ["silu", "relu6", "hardswish"]
# The Triton interpreter runs a kernel in seconds: the head (its kernels are the block's K1,
# K3 and B1) on one case per mode.
FEW = {"backend": "triton", "conv": ["stem-k3-s2"], "head": ["7x7"]}


def randomize_bn(bn):
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 1.5)
        bn.num_batches_tracked.fill_(3)


def conv_bn_act(cin, cout, k, stride, activation, **bn_kwargs):
    layer = nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False),
                          nn.BatchNorm2d(cout, **bn_kwargs),
                          fm.activations.make_activation(activation))
    if layer[1].affine and layer[1].track_running_stats:
        randomize_bn(layer[1])
    return layer


class PooledHead(nn.Module):
    """The eager head: Sequential(conv1x1, BN, act), then the global average pool."""

    def __init__(self, cin, cout, activation, **bn_kwargs):
        super().__init__()
        self.head = conv_bn_act(cin, cout, 1, 1, activation, **bn_kwargs)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        return self.pool(self.head(x))


def fused_conv(layer, activation):
    return fm.FusedConvBNAct.from_sequential(copy.deepcopy(layer), activation)


def fused_head(model, activation):
    fused = copy.deepcopy(model)
    fused.head = fm.FusedHead.from_sequential(fused.head, activation)
    return fused


def train_mode(training):
    return lambda model: model.train(training)


def _inputs(shape, channels_last, steps=2):
    xs = [torch.randn(*shape) * 2 + 0.3 for _ in range(steps)]
    if channels_last:
        xs = [x.contiguous(memory_format=torch.channels_last) for x in xs]
    return [x.requires_grad_() for x in xs]


def _grid(shapes, kind):
    """(name, activation, channels_last, training, backend) cases: all of them on every
    backend but the Triton interpreter's, which runs FEW in SiLU."""
    return [pytest.param(name, act, cl, tr, b, id=f"{name}-{act}-{'nhwc' if cl else 'nchw'}-"
                                                  f"{'train' if tr else 'eval'}-{b}")
            for name in shapes for act in ACTIVATIONS for cl in (False, True)
            for tr in (True, False) for b in BACKENDS
            if b != FEW["backend"] or (name in FEW[kind] and act == "silu")]


@pytest.mark.parametrize("name, activation, channels_last, training, backend",
                         _grid(CONV_SHAPES, "conv"))
def test_conv_bn_act_matches_eager(name, activation, channels_last, training, backend):
    shape = CONV_SHAPES[name]
    n, cin, cout, h, w, k, stride = shape
    layer = conv_bn_act(cin, cout, k, stride, activation)
    check(layer, _inputs((n, cin, h, w), channels_last), f"conv_bn_act {shape}", backend,
          train_mode(training), stat_rounds=2, make_fused=lambda m: fused_conv(m, activation))


@pytest.mark.parametrize("name, activation, channels_last, training, backend",
                         _grid(HEAD_SHAPES, "head"))
def test_pooled_head_matches_eager(name, activation, channels_last, training, backend):
    shape = HEAD_SHAPES[name]
    n, cin, cout, h, w = shape
    model = PooledHead(cin, cout, activation)
    check(model, _inputs((n, cin, h, w), channels_last), f"pooled head {shape}", backend,
          train_mode(training), stat_rounds=2, make_fused=lambda m: fused_head(m, activation))


def test_low_precision_keeps_the_input_dtype():
    """bfloat16 inputs, float32 BatchNorm (as mixed precision runs it): output in bfloat16."""
    layer = conv_bn_act(3, 8, 3, 2, "silu")
    x = torch.randn(2, 3, 9, 9, dtype=torch.bfloat16)
    out = fm.functional.conv_bn_act(x, layer[0].weight.to(torch.bfloat16),
                                    BatchNormParams.from_module(layer[1]), stride=2,
                                    training=True)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 8, 5, 5)
    pooled = fm.functional.pointwise_bn_act_pool(
        x, torch.randn(8, 3, 1, 1, dtype=torch.bfloat16), BatchNormParams.from_module(layer[1]),
        training=True)
    assert pooled.dtype == torch.bfloat16 and pooled.shape == (2, 8)


def _bn64(c):
    f64 = dict(dtype=torch.float64)
    gamma = torch.rand(c, **f64).add_(0.5).requires_grad_()
    beta = torch.randn(c, **f64, requires_grad=True)
    return gamma, beta, torch.randn(c, **f64), torch.rand(c, **f64) + 0.5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("pooled", [False, True], ids=["conv_bn_act", "pooled_head"])
def test_gradcheck_float64(backend, training, pooled):
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, *((1, 1) if pooled else (3, 3)), dtype=torch.float64,
                    requires_grad=True)
    gamma, beta, mean, var = _bn64(4)

    def f(x, w, gamma, beta):
        bn = BatchNormParams(gamma, beta, mean.clone(), var.clone())
        if pooled:
            return fm.functional.pointwise_bn_act_pool(x, w, bn, training=training)
        return fm.functional.conv_bn_act(x, w, bn, stride=2, training=training)

    with fm.use_backend(backend):
        assert torch.autograd.gradcheck(f, (x, w, gamma, beta), fast_mode=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_opcheck(backend, training):
    x = torch.randn(2, 4, 5, 6, requires_grad=True)
    w = torch.randn(6, 4, 3, 3, requires_grad=True)
    w1 = torch.randn(6, 4, 1, 1, requires_grad=True)
    gamma = torch.rand(6, requires_grad=True)
    beta = torch.randn(6, requires_grad=True)
    stats = (torch.randn(6), torch.rand(6) + 0.5)
    ops = torch.ops.fused_mbconv
    with fm.use_backend(backend):
        torch.library.opcheck(ops.conv_bn_act.default,
                              (x, w, gamma, beta, *stats, 2, training, 1e-5, "silu"))
        torch.library.opcheck(ops.pointwise_bn_act_pool.default,
                              (x, w1, gamma, beta, *stats, training, 1e-5, "hardswish"))
        saved = (x.detach(), w.detach(), gamma.detach(), beta.detach(), *stats)
        torch.library.opcheck(ops.conv_bn_act_backward.default,
                              (torch.randn(2, 6, 3, 3), *saved, 2, training, 1e-5, "silu",
                               [True, True, True, False]))
        saved = (x.detach(), w1.detach(), gamma.detach(), beta.detach(), *stats)
        torch.library.opcheck(ops.pointwise_bn_act_pool_backward.default,
                              (torch.randn(2, 6), *saved, training, 1e-5, "relu6",
                               [True, False, True, True]))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_compile_fullgraph(training):
    fused = nn.Sequential(conv_bn_act(3, 8, 3, 2, "silu"), PooledHead(8, 16, "silu"))
    fused[0] = fm.FusedConvBNAct.from_sequential(fused[0], "silu")
    fused[1].head = fm.FusedHead.from_sequential(fused[1].head, "silu")
    assert_compiles_fullgraph_like_eager(fused.train(training),
                                         torch.randn(2, 3, 9, 9, requires_grad=True))


def _saved_bytes(module, x):
    """Bytes autograd saves in a forward, excluding the input and the parameters."""
    return profiling.saved_bytes(lambda: module(x), [x, *module.parameters()]).bytes


@pytest.mark.parametrize("pooled", [False, True], ids=["stem", "pooled_head"])
def test_saves_only_the_statistics_besides_input_and_weights(pooled):
    """Eager keeps the conv output and the BN output (the activation's input); the fused op
    keeps the input (excluded here: the graph holds it anyway) and two statistics vectors."""
    cout = 32
    eager = PooledHead(16, cout, "silu") if pooled else conv_bn_act(3, cout, 3, 2, "silu")
    fused = fused_head(eager, "silu") if pooled else fused_conv(eager, "silu")
    x = torch.randn(2, 16 if pooled else 3, 16, 16, requires_grad=True)
    out_values = 2 * cout * (16 * 16 if pooled else 8 * 8)
    assert _saved_bytes(fused, x) == 2 * cout * 4  # mean and var, float32
    assert _saved_bytes(eager, x) >= 2 * out_values * 4


def test_kernel_sources_say_what_falls_back():
    """The pooled head runs K1, K3 and B1 on every backend; the rest is named."""
    for backend in BACKENDS:
        with fm.use_backend(backend):
            sources = kernel_sources(torch.device("cpu"))
        assert sources["conv_bn_act"][0] == backend
        assert set(sources["conv_bn_act"][1]) <= set(STEM_KERNELS)
        assert set(sources["pointwise_bn_act_pool"][1]) <= {"act_pool_backward"}
        if backend == "torch":
            assert not sources["conv_bn_act"][1] and not sources["pointwise_bn_act_pool"][1]
    assert set(HEAD_KERNELS) >= {"mbconv_expand_forward", "mbconv_squeeze_forward",
                                 "mbconv_expand_backward"}


def _bad_calls():
    x = torch.randn(2, 3, 8, 8)
    w = torch.randn(6, 3, 3, 3)
    return {
        "ndim": (dict(input=x[0]), "4-D"),
        "in channels": (dict(conv_weight=torch.randn(6, 4, 3, 3)), "from the input's 3"),
        "even kernel": (dict(conv_weight=torch.randn(6, 3, 2, 2)), "odd"),
        "non-square kernel": (dict(conv_weight=torch.randn(6, 3, 3, 1)), "square"),
        "dtype mismatch": (dict(conv_weight=w.double()), "dtype"),
        "integer input": (dict(input=x.long(), conv_weight=w.long()), "floating-point"),
        "stride": (dict(stride=0), "stride"),
        "activation": (dict(activation="gelu"), "activation must be one of"),
        "bn channels": (dict(bn_channels=5), r"shape \(6,\)"),
        "empty": (dict(input=x[:0]), "empty"),
        "one value": (dict(input=torch.randn(1, 3, 1, 1)), "more than 1 value"),
    }


@pytest.mark.parametrize("case", _bad_calls().keys())
def test_bad_input_fails_clearly_and_changes_no_state(case):
    changes, message = _bad_calls()[case]
    bn = nn.BatchNorm2d(changes.pop("bn_channels", 6))
    randomize_bn(bn)
    before = {n: b.clone() for n, b in bn.named_buffers()}
    args = {**dict(input=torch.randn(2, 3, 8, 8), conv_weight=torch.randn(6, 3, 3, 3),
                   stride=2, activation="silu"), **changes}
    with pytest.raises((ValueError, TypeError), match=message):
        fm.functional.conv_bn_act(args["input"], args["conv_weight"],
                                  BatchNormParams.from_module(bn), stride=args["stride"],
                                  training=True, activation=args["activation"])
    for name, value in bn.named_buffers():
        assert torch.equal(value, before[name]), f"{case}: {name} changed"


def test_pooled_head_refuses_a_dense_kernel():
    bn = BatchNormParams.from_module(nn.BatchNorm2d(6))
    with pytest.raises(ValueError, match=r"1x1 conv"):
        fm.functional.pointwise_bn_act_pool(torch.randn(2, 3, 4, 4), torch.randn(6, 3, 3, 3),
                                            bn, training=True)
