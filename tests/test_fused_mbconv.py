"""FusedMBConv / fused_mbconv::mbconv against the eager MBConv block, on every backend that
implements the block's kernel interface for CPU tensors."""

import copy
import dataclasses
import io

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import fused_mbconv as fm
from fused_mbconv.backends import implements
from fused_mbconv.efficientnet import B0_STAGES
from fused_mbconv.functional import BatchNormParams
from fused_mbconv.ops.mbconv import (GRAD_INPUTS, INPUTS, KERNELS, OPTIONS, SAVED, MBConvInputs,
                                     MBConvOutputs)
from parity import check, randomize_bn_state
from targets import cpu_backends, gpu_backends, target_id, targets
from tolerances import NETWORK_GRADIENT_ROUNDS, assert_close_by_rule, eager_in

BACKENDS = cpu_backends(KERNELS)
GPU_BACKENDS = gpu_backends(KERNELS)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


# Every distinct EfficientNet-B0 block configuration, few channels, same structure:
# (in, out, kernel, stride, expand); residual follows from stride 1 and in == out. Inputs of
# at least 8 channels give the SE squeeze >= 2 values: the max-error rule on a one-element
# gradient compares two single rounding errors, a coin flip.
B0_CONFIGS = {
    "e1-k3-s1": (16, 8, 3, 1, 1),         # stage 1 (32 -> 16)
    "e6-k3-s2": (8, 12, 3, 2, 6),         # first block of stages 2 and 4
    "e6-k3-s1-res": (12, 12, 3, 1, 6),    # repeats of stages 2 and 4
    "e6-k5-s2": (12, 16, 5, 2, 6),        # first block of stages 3 and 6
    "e6-k5-s1-res": (16, 16, 5, 1, 6),    # repeats of stages 3, 5 and 6
    "e6-k5-s1": (16, 20, 5, 1, 6),        # first block of stage 5
    "e6-k3-s1": (20, 24, 3, 1, 6),        # stage 7
}
# The same configurations at B0's real channel counts (saved-bytes measurement): each stage's
# first block and, where it repeats, its residual repeat.
B0_REAL = {
    f"stage{i} {cin}->{cout} e{s.expand_ratio} k{s.kernel_size} s{stride}"
    f"{' res' if cin == cout else ''}": (cin, cout, s.kernel_size, stride, s.expand_ratio)
    for i, s in enumerate(B0_STAGES, 1)
    for cin, stride in ((s.in_channels, s.stride), (s.out_channels, 1))[:1 + (s.repeats > 1)]
    for cout in (s.out_channels,)}
BNS = ("expand_bn", "dw_bn", "project_bn")


def make_block(config, drop_path=0.0, **kwargs):
    cin, cout, k, stride, expand = config
    block = fm.MBConv(cin, cout, k, stride, expand, drop_path=drop_path, **kwargs)
    randomize_bn_state(block, mean=0.2, var=(0.5, 2.0))
    return block


def run(block, x, dtype, training, grad_out, fused, backend="torch", seed=11, recompute=False):
    """Forward + backward of a copy of ``block`` in ``dtype`` on x's device (fused: at that
    ``recompute`` level); returns (out, grads, bn state). The seed fixes the stochastic-depth
    draw: eager and fused must drop the same samples."""
    if fused:
        model = fm.FusedMBConv.from_module(copy.deepcopy(block)).to(x.device, dtype)
        model.recompute = recompute
    else:
        model = eager_in(block, dtype).to(x.device)
    model.train(training)
    xi = x.detach().to(dtype).clone().requires_grad_()  # a fresh leaf for every run
    with fm.use_backend(backend):
        torch.manual_seed(seed)
        out = model(xi)
        out.backward(grad_out.to(x.device, dtype))
    grads = {"input": xi.grad}
    grads.update({name: p.grad for name, p in model.named_parameters()})
    state = {name: b for name, b in model.named_buffers()}
    return out, grads, state


def check_parity(block, x, dtype, training, backend, what="", recompute=False):
    with torch.no_grad():
        shape = copy.deepcopy(block).to(x.device).train(training)(x).shape
    grad_out = torch.randn(shape, device=x.device)
    ref = run(block, x, torch.float64, training, grad_out, fused=False)
    eager = run(block, x, dtype, training, grad_out, fused=False)
    fused = run(block, x, dtype, training, grad_out, fused=True, backend=backend,
                recompute=recompute)
    out = fused[0].detach()
    assert out.dtype == dtype
    fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) \
        and not x.is_contiguous() else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt), f"{what}: output memory format"
    assert_close_by_rule(out, eager[0].detach(), ref[0].detach(), dtype, f"{what} output")
    assert fused[1].keys() == ref[1].keys()
    for name in ref[1]:
        g = fused[1][name]
        assert g is not None, f"{what}: no gradient for {name}"
        assert g.dtype == dtype, name
        assert_close_by_rule(g, eager[1][name], ref[1][name], dtype, f"{what} grad {name}")
    for name, value in ref[2].items():
        if name.endswith("num_batches_tracked"):
            assert torch.equal(fused[2][name], eager[2][name]), name
        else:
            assert_close_by_rule(fused[2][name], eager[2][name], value, dtype, f"{what} {name}")


def _block_cases():
    """Every (config, dtype, layout, mode) for each backend, except the Triton interpreter
    (10-30 s per case here): there each config runs 2 of the 12 (dtype, layout, mode)
    combinations, rotated so that every combination runs on some config (a Latin-square
    selection; the kernels' own flag coverage is tests/test_kernel_interface.py)."""
    modes = [(dtype, cl, training) for dtype in DTYPES for cl in (False, True)
             for training in (True, False)]
    cases = []
    for i, (name, config) in enumerate(B0_CONFIGS.items()):
        for j, (dtype, cl, training) in enumerate(modes):
            for backend in BACKENDS:
                if backend == "triton" and (i + j) % 6:
                    continue
                cases.append(pytest.param(
                    config, dtype, cl, training, backend,
                    id=f"{name}-{dtype}-{'nhwc' if cl else 'nchw'}-"
                       f"{'train' if training else 'eval'}-{backend}"))
    return cases


@pytest.mark.parametrize("config, dtype, channels_last, training, backend", _block_cases())
def test_block_matches_eager(config, dtype, channels_last, training, backend):
    block = make_block(config, drop_path=0.5)  # drops samples in residual blocks (train)
    # odd sizes; smaller on the interpreter (BN still sees >= 24 values per channel)
    shape = (2, 5, 7) if backend == "triton" else (4, 7, 9)
    x = torch.randn(shape[0], config[0], *shape[1:]) * 2 + 0.3
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    check_parity(block, x, dtype, training, backend)


@pytest.mark.skipif(not GPU_BACKENDS, reason="no CUDA device: GPU block parity runs only where "
                    "one is present")
@pytest.mark.parametrize("backend", GPU_BACKENDS or ["none"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("config", B0_CONFIGS.values(), ids=B0_CONFIGS.keys())
def test_block_matches_eager_on_gpu(config, dtype, channels_last, training, backend):
    block = make_block(config, drop_path=0.5)
    x = torch.randn(8, config[0], 15, 17) * 2 + 0.3
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    check_parity(block, x.cuda(), dtype, training, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_drop_path_drops_the_same_samples_as_eager(backend):
    block = make_block((6, 6, 3, 1, 4), drop_path=0.5).train()
    x = torch.randn(16, 6, 5, 5)
    fused = fm.FusedMBConv.from_module(copy.deepcopy(block))
    with torch.no_grad(), fm.use_backend(backend):
        torch.manual_seed(3)
        eager_branch = (block(x) - x).flatten(1).abs().sum(1)
        torch.manual_seed(3)
        fused_branch = (fused(x) - x).flatten(1).abs().sum(1)
        torch.manual_seed(4)
        other_branch = (fused(x) - x).flatten(1).abs().sum(1)
    dropped = eager_branch == 0
    assert 0 < dropped.sum() < 16
    assert torch.equal(fused_branch == 0, dropped)
    assert not torch.equal(other_branch == 0, dropped)  # a different seed drops others


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", [
    dict(activation="relu6", se_ratio=0.0),
    dict(activation="hardswish", se_gate="hardsigmoid"),
    dict(activation="relu", se_ratio=0.5),
])
def test_activation_and_se_variants(variant, backend):
    block = make_block((6, 6, 3, 1, 3), **variant)
    check_parity(block, torch.randn(3, 6, 6, 5), torch.float32, True, backend, str(variant))


# Shapes whose tensors are both NCHW- and NHWC-contiguous (one channel, or a 1x1 map, as late
# stages see at low resolution): kernels must take the layout from the problem, not guess it
# from an operand. In training the 1x1 map needs a batch of 4 for BN to see 4 values.
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("config, shape", [
    ((3, 1, 3, 1, 2), (2, 3, 4, 5)),      # one output channel
    ((4, 6, 3, 1, 2), (4, 4, 1, 1)),      # 1x1 map
    ((4, 6, 3, 2, 3), (4, 4, 1, 1)),      # 1x1 map, stride 2
], ids=["cout1", "map1x1", "map1x1-s2"])
def test_layout_ambiguous_shapes_channels_last(config, shape, training, backend):
    block = make_block(config, se_ratio=0.5)
    x = torch.randn(shape).contiguous(memory_format=torch.channels_last)
    check_parity(block, x, torch.float32, training, backend, "ambiguous layout")


class OneProcessSync:
    """A BatchStatsSync over a group of one process: reduces nothing, records what it sees."""

    def __init__(self):
        self.counts, self.calls = {}, []

    def batch_stats(self, bn, mean, var, count):
        self.counts[bn] = count
        self.calls.append(("stats", bn))
        return mean, var

    def grad_sums(self, bn, sum_dy, sum_dy_xhat, count):
        assert count == self.counts[bn], bn
        self.calls.append(("sums", bn))
        return sum_dy, sum_dy_xhat

    def global_count(self, bn):
        return self.counts[bn]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_stats_sync_hooks_every_batch_norm_and_changes_nothing_alone(backend, training):
    block = make_block((6, 8, 3, 2, 3), drop_path=0.0)
    x = torch.randn(2, 6, 7, 5)
    grad_out = torch.randn(2, 8, 4, 3)
    plain = run(block, x, torch.float32, training, grad_out, fused=True, backend=backend)
    sync = OneProcessSync()
    synced = fm.FusedMBConv.from_module(copy.deepcopy(block)).train(training)
    synced.stats_sync = lambda: sync
    xi = x.clone().requires_grad_()
    with fm.use_backend(backend):
        torch.manual_seed(11)
        out = synced(xi)
        out.backward(grad_out)
    assert torch.equal(out, plain[0])
    assert torch.equal(xi.grad, plain[1]["input"])
    for name, p in synced.named_parameters():
        assert torch.equal(p.grad, plain[1][name]), name
    for name, b in synced.named_buffers():
        assert torch.equal(b, plain[2][name]), name
    expected = [("stats", bn) for bn in ("bn1", "bn2", "bn3")] + \
               [("sums", bn) for bn in ("bn3", "bn2", "bn1")]
    assert sync.calls == (expected if training else [])


@pytest.mark.parametrize("backend", BACKENDS)
def test_recompute_dwconv_gives_the_same_gradients(backend):
    block = make_block((6, 8, 5, 2, 6))
    x = torch.randn(2, 6, 9, 7)
    grad_out = torch.randn(2, 8, 5, 4)
    kept = run(block, x, torch.float32, True, grad_out, fused=True, backend=backend)
    fused = fm.FusedMBConv.from_module(copy.deepcopy(block))
    fused.recompute = "dwconv"
    xi = x.clone().requires_grad_()
    with fm.use_backend(backend):
        out = fused(xi)
        out.backward(grad_out)
    assert torch.equal(out, kept[0])
    torch.testing.assert_close(xi.grad, kept[1]["input"], rtol=0, atol=0)
    for name, p in fused.named_parameters():
        torch.testing.assert_close(p.grad, kept[1][name], rtol=0, atol=0)


# Training BatchNorm makes the loss invariant to each output channel's weight scale, so the
# gradient of a weight is orthogonal to it; where the weight has a single entry per BN channel
# that gradient is exactly 0 and both sides would be compared on rounding noise alone. So: at
# least 2 input channels (a 1-channel projection input), kernel >= 3 (a 1x1 depthwise
# weight), at least 2 positions per side (a 1x1 map sees only the centre tap), and in training
# at least 4 values per BN channel (over 2 values BN outputs +-1 whatever its input).
@settings(max_examples=12, deadline=None)
@given(cin=st.integers(2, 6), cout=st.integers(1, 6), kernel=st.sampled_from([3, 5, 7]),
       stride=st.sampled_from([1, 2]), expand=st.sampled_from([1, 2, 3]),
       se_ratio=st.sampled_from([0.0, 0.25, 0.5]),
       activation=st.sampled_from(["silu", "relu", "relu6", "hardswish"]),
       se_gate=st.sampled_from(["sigmoid", "hardsigmoid"]), n=st.integers(1, 3),
       h=st.integers(2, 7), w=st.integers(2, 7), training=st.booleans(),
       channels_last=st.booleans(), seed=st.integers(0, 2 ** 31 - 1))
def test_random_blocks_match_eager(cin, cout, kernel, stride, expand, se_ratio, activation,
                                   se_gate, n, h, w, training, channels_last, seed):
    torch.manual_seed(seed)  # the example's tensors follow from the example
    positions = ((h - 1) // stride + 1) * ((w - 1) // stride + 1)
    if training:
        n = max(n, -(-4 // positions))
    block = make_block((cin, cout, kernel, stride, expand), drop_path=0.3, se_ratio=se_ratio,
                       activation=activation, se_gate=se_gate)
    x = torch.randn(n, cin, h, w)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    for backend in BACKENDS:
        check_parity(block, x, torch.float32, training, backend)


def _gradcheck_inputs(stride, residual, se, device="cpu"):
    cin, hidden, cout = 3, 5, 3 if residual else 4

    def t(*shape):
        return torch.randn(*shape, dtype=torch.float64, device=device, requires_grad=True)

    def positive(c):
        return (torch.rand(c, dtype=torch.float64, device=device) + 0.5).requires_grad_()

    x = t(4, cin, 5, 4)
    params = [t(hidden, cin, 1, 1), positive(hidden), t(hidden), t(hidden, 1, 3, 3),
              positive(hidden), t(hidden)]
    params += [t(2, hidden, 1, 1), t(2), t(hidden, 2, 1, 1), t(hidden)] if se else []
    params += [t(cout, hidden, 1, 1), positive(cout), t(cout)]
    return x, params


# The Triton interpreter takes ~20 s per gradcheck here: it runs the SE variants, one mode
# each (train for the residual one, eval for stride 2). Every Triton kernel-interface function,
# the no-SE and no-expand variants included, is compared in float64 with the reference (which
# passes all of these) in tests/test_kernel_interface.py.
GRADCHECK_VARIANTS = [(1, True, True), (2, False, True), (1, False, False)]


@pytest.mark.parametrize("device, backend, training, stride, residual, se", [
    pytest.param("cpu", backend, training, *variant,
                 id="-".join(map(str, (backend, training, *variant))))
    for backend in BACKENDS for training in (True, False) for variant in GRADCHECK_VARIANTS
    if backend != "triton" or (variant[2] and training == (variant[0] == 1))] + [
    pytest.param("cuda", backend, training, *variant,
                 id="-".join(map(str, (target_id("cuda", backend), training, *variant))))
    for backend in GPU_BACKENDS for training in (True, False) for variant in GRADCHECK_VARIANTS])
def test_gradcheck_float64(device, backend, training, stride, residual, se):
    x, params = _gradcheck_inputs(stride, residual, se, device)
    hidden, cout = params[0].shape[0], params[-1].shape[0]
    f64 = dict(dtype=torch.float64, device=device)
    stats = [(torch.randn(c, **f64) * 0.1, torch.rand(c, **f64) + 0.5)
             for c in (hidden, hidden, cout)]

    def f(x, *p):
        bns = [BatchNormParams(w, b, m.clone(), v.clone(), torch.tensor(0, device=device), 0.1,
                               1e-5)
               for (w, b), (m, v) in zip([(p[1], p[2]), (p[4], p[5]), (p[-2], p[-1])], stats)]
        torch.manual_seed(0)  # the same drop-path draw on every evaluation
        return fm.functional.mbconv(
            x, p[3], bns[1], p[-3], bns[2], expand_weight=p[0], bn1=bns[0],
            se_weights=p[6:10] if se else None, stride=stride, training=training,
            residual=residual, drop_path=0.5 if residual else 0.0)

    with fm.use_backend(backend):
        assert torch.autograd.gradcheck(f, (x, *params), fast_mode=True)


def _op_args(training, expanded=True, se=True, residual=True, keep=True, keep_expand=True,
             device="cpu"):
    cin, cout = 4, 4
    hidden = 8 if expanded else cin  # the depthwise conv sees the block input unexpanded
    x = torch.randn(2, cin, 5, 6)

    def vec(c):
        return torch.rand(c) + 0.5

    bn = lambda c: [vec(c), torch.randn(c), torch.randn(c) * 0.1, vec(c)]  # noqa: E731
    expand = [torch.randn(hidden, cin, 1, 1)] + bn(hidden) if expanded else [None] * 5
    se_w = [torch.randn(2, hidden, 1, 1), torch.randn(2), torch.randn(hidden, 2, 1, 1),
            torch.randn(hidden)] if se else [None] * 4
    args = [x, *expand, torch.randn(hidden, 1, 3, 3), *bn(hidden), *se_w,
            torch.randn(cout, hidden, 1, 1), *bn(cout),
            torch.tensor([0.0, 2.0]) if residual else None, 1, training, [1e-5, 1e-3, 1e-5],
            "silu", "silu", "sigmoid", residual, keep, keep_expand]
    for arg, value in zip(INPUTS, args, strict=True):
        if arg.grad and value is not None:
            value.requires_grad_()
    return [a.detach().to(device).requires_grad_(a.requires_grad)
            if isinstance(a, torch.Tensor) else a for a in args]


# opcheck tests the registration (schema, fake kernel, autograd, aliasing) at each recompute
# level ("recompute": d recomputed, "recompute-all": e and d); on the Triton interpreter
# (~7 s a case) it runs three of the eight cases.
OP_VARIANTS = [("full", dict()), ("e1-nose", dict(expanded=False, se=False, residual=False)),
               ("recompute", dict(keep=False)),
               ("recompute-all", dict(keep=False, keep_expand=False))]
TRITON_OP_VARIANTS = (("full", True), ("recompute", False), ("recompute-all", True))


@pytest.mark.parametrize("device, backend, training, variant", [
    pytest.param("cpu", backend, training, variant,
                 id=f"{name}-{'train' if training else 'eval'}-{backend}")
    for backend in BACKENDS for training in (True, False) for name, variant in OP_VARIANTS
    if backend != "triton" or (name, training) in TRITON_OP_VARIANTS] + [
    pytest.param("cuda", backend, training, variant,
                 id=f"{name}-{'train' if training else 'eval'}-{target_id('cuda', backend)}")
    for backend in GPU_BACKENDS for training in (True, False) for name, variant in OP_VARIANTS])
def test_opcheck(device, backend, training, variant):
    args = _op_args(training, **variant, device=device)
    with fm.use_backend(backend):
        torch.library.opcheck(torch.ops.fused_mbconv.mbconv.default, args)
        outputs = MBConvOutputs(*torch.ops.fused_mbconv.mbconv(*args))
        detached = MBConvInputs(*(a.detach() if isinstance(a, torch.Tensor) else a
                                  for a in args))
        values = {**detached._asdict(), **outputs._asdict()}
        mask = [n != "expand_weight" for n in GRAD_INPUTS]  # masked off: comes back empty
        # By name: the schema's argument names are checked, not only their order.
        backward_kwargs = dict(grad_out=torch.randn_like(outputs.out),
                               **{n: values[n] for n in SAVED + OPTIONS}, output_mask=mask)
        torch.library.opcheck(torch.ops.fused_mbconv.mbconv_backward.default, (),
                              backward_kwargs)


@pytest.mark.parametrize("device, backend", targets(BACKENDS, KERNELS))
def test_compile_fullgraph_matches_eager(device, backend):
    def forward(model, x):
        if isinstance(model, fm.FusedMBConv):  # the fused copy, compiled without graph breaks
            model = torch.compile(model, fullgraph=True, backend="aot_eager")
        return model(x)

    inputs = [torch.randn(2, 6, 7, 7, device=device, requires_grad=True) for _ in range(2)]
    check(make_block((6, 6, 3, 1, 6), drop_path=0.2).to(device), inputs, "compiled", backend,
          lambda m: m.train(), forward, stat_rounds=2)


# Not on the Triton interpreter: the whole network takes ~10 minutes there (the fused blocks
# it is made of are compared one by one in test_block_matches_eager on every backend).
@pytest.mark.parametrize("device, backend",
                         targets([b for b in BACKENDS if b != "triton"], KERNELS))
def test_efficientnet_b0_training_step_matches_eager(device, backend):
    """forward, loss, backward, SGD step of the whole fused network against the eager one
    loaded with the same state_dict (48x48 so the last stages keep 2x2 positions: at 1x1,
    training BatchNorm over 2 values is ill-conditioned for both)."""
    torch.manual_seed(0)
    eager = fm.efficientnet_b0(num_classes=10).to(device)
    fused = fm.efficientnet_b0(num_classes=10, fused=True).to(device)
    fused.load_state_dict(eager.state_dict())
    ref = copy.deepcopy(eager).double()
    x, target = torch.randn(2, 3, 48, 48, device=device), torch.tensor([3, 7], device=device)

    def step(model, dtype, backend="torch"):
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        with fm.use_backend(backend):
            torch.manual_seed(1)  # dropout and stochastic depth draw the same masks
            logits = model(x.to(dtype))
            loss = nn.functional.cross_entropy(logits, target)
            loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
        return (logits.detach(), loss.detach()), grads, model.state_dict()

    r, e, f = step(ref, torch.float64), step(eager, torch.float32), \
        step(fused, torch.float32, backend)
    assert_close_by_rule(f[0][0], e[0][0], r[0][0], torch.float32, "logits")
    # The scalar loss follows from the logits; one rounded scalar is no basis for the
    # max-error rule (eager's own error on it is sometimes a single ulp, sometimes 100).
    torch.testing.assert_close(f[0][1], r[0][1].float(), rtol=1e-5, atol=1e-5)
    # The worst of 213 gradients, each at the end of a chain through up to 16 blocks, against one
    # eager sample: on 6 seeds the aten reference composite itself reached 2.3x eager's error
    # (the cpu backend 2.4x). Gradients, and the parameters stepped with them, get the rule
    # compounded once more; single blocks are held to the plain rule above.
    for name in r[1]:
        assert_close_by_rule(f[1][name], e[1][name], r[1][name], torch.float32, f"grad {name}",
                             rounds=NETWORK_GRADIENT_ROUNDS)
    for name in r[2]:
        if name.endswith("num_batches_tracked"):
            assert torch.equal(f[2][name], e[2][name]), name
        else:
            assert_close_by_rule(f[2][name], e[2][name], r[2][name], torch.float32, name,
                                 rounds=NETWORK_GRADIENT_ROUNDS)


def test_momentum_none_is_cumulative_average():
    block = make_block((6, 6, 3, 1, 6), bn_momentum=None)
    inputs = [torch.randn(2, 6, 5, 5, requires_grad=True) for _ in range(3)]
    check(block, inputs, "momentum=None", None, lambda m: m.train(), stat_rounds=3)


def test_from_module_shares_parameters_and_keeps_state_dict():
    block = make_block((6, 8, 3, 2, 6))
    before = copy.deepcopy(block.state_dict())
    fused = fm.FusedMBConv.from_module(block)
    assert isinstance(fused, fm.MBConv)
    assert fused.dw_conv.weight is block.dw_conv.weight
    assert fused.project_bn.running_var is block.project_bn.running_var
    after = fused.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert fm.FusedMBConv(6, 8, 3, 2, 6).state_dict().keys() == before.keys()
    assert "6->36->8" in repr(fused)


class ForeignBlock(nn.Module):
    """A timm-like block with its own child names, as another library would define it."""

    def __init__(self, c=6, hidden=12):
        super().__init__()
        self.conv_pw, self.bn1 = nn.Conv2d(c, hidden, 1, bias=False), nn.BatchNorm2d(hidden)
        self.conv_dw = nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden, bias=False)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.se = nn.Sequential(nn.Conv2d(hidden, 2, 1), nn.ReLU(), nn.Conv2d(2, hidden, 1))
        self.conv_pwl, self.bn3 = nn.Conv2d(hidden, c, 1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        h = nn.functional.hardswish(self.bn1(self.conv_pw(x)))
        h = nn.functional.hardswish(self.bn2(self.conv_dw(h)))
        h = h * nn.functional.hardsigmoid(self.se(h.mean((2, 3), keepdim=True)))
        return self.bn3(self.conv_pwl(h)) + x

    def spec(self):
        return fm.MBConvSpec(
            expand_conv=self.conv_pw, expand_bn=self.bn1, dw_conv=self.conv_dw, dw_bn=self.bn2,
            se_fc1=self.se[0], se_fc2=self.se[2], project_conv=self.conv_pwl,
            project_bn=self.bn3, stride=1, kernel_size=3, residual=True,
            activation="hardswish", se_activation="relu", se_gate="hardsigmoid")


def test_from_spec_adopts_foreign_children_and_matches_their_forward():
    source = ForeignBlock()
    keys = list(source.state_dict())
    fused = fm.FusedMBConv.from_spec(source, source.spec())
    assert list(fused.state_dict()) == keys
    assert fused.conv_dw is source.conv_dw
    assert "6->12->6" in repr(fused)

    def from_spec(block):
        block = copy.deepcopy(block)
        return fm.FusedMBConv.from_spec(block, block.spec())

    check(ForeignBlock(), [torch.randn(3, 6, 5, 7, requires_grad=True)], "foreign", None,
          lambda m: m.train(), make_fused=from_spec)


def test_from_spec_rejects_modules_outside_the_source():
    source, other = ForeignBlock(), ForeignBlock()
    spec = dataclasses.replace(source.spec(), dw_conv=other.conv_dw)
    with pytest.raises(ValueError, match="dw_conv is not a submodule"):
        fm.FusedMBConv.from_spec(source, spec)


def test_from_module_extension_point():
    from fused_mbconv import fused_block
    with pytest.raises(TypeError, match="ForeignBlock"):
        fm.FusedMBConv.from_module(ForeignBlock())
    fused_block.register_block_type(ForeignBlock, ForeignBlock.spec)
    try:
        fused = fm.FusedMBConv.from_module(ForeignBlock())
        assert fused.spec().se_gate == "hardsigmoid"
    finally:
        del fused_block._RECOGNIZERS[ForeignBlock]


@pytest.mark.parametrize("source", ["mbconv", "foreign"])
def test_deepcopy_and_pickle(source):
    if source == "mbconv":
        fused = fm.FusedMBConv.from_module(make_block((6, 6, 3, 1, 6)))
    else:
        block = ForeignBlock()
        fused = fm.FusedMBConv.from_spec(block, block.spec())
    buffer = io.BytesIO()
    torch.save(fused, buffer)
    buffer.seek(0)
    copies = [copy.deepcopy(fused), torch.load(buffer, weights_only=False)]
    x = torch.randn(2, 6, 5, 5)
    fused.eval()
    dw_name = "dw_conv" if source == "mbconv" else "conv_dw"
    for c in copies:
        c.eval()
        assert c.spec().dw_conv is getattr(c, dw_name)
        with torch.no_grad():
            getattr(c, dw_name).weight.add_(1.0)
    with torch.no_grad():
        assert not torch.equal(copies[0](x), fused(x))  # the copy reads its own weights
        torch.testing.assert_close(copies[0](x), copies[1](x))


def _mbconv_kwargs():
    return dict(
        input=torch.randn(2, 4, 5, 5), dw_weight=torch.randn(8, 1, 3, 3),
        bn2=BatchNormParams(torch.ones(8), torch.zeros(8), torch.zeros(8), torch.ones(8),
                            torch.tensor(0)),
        project_weight=torch.randn(4, 8, 1, 1),
        bn3=BatchNormParams(torch.ones(4), torch.zeros(4), torch.zeros(4), torch.ones(4),
                            torch.tensor(0)),
        expand_weight=torch.randn(8, 4, 1, 1),
        bn1=BatchNormParams(torch.ones(8), torch.zeros(8), torch.zeros(8), torch.ones(8),
                            torch.tensor(0)),
        se_weights=(torch.randn(2, 8, 1, 1), torch.randn(2), torch.randn(8, 2, 1, 1),
                    torch.randn(8)),
        training=True, residual=True)


def _bad_calls():
    ok = _mbconv_kwargs()
    bn2 = ok["bn2"]
    return {
        "ndim": (dict(input=torch.randn(4, 5, 5)), "4-D"),
        "integer input": (dict(input=torch.ones(2, 4, 5, 5, dtype=torch.long)), "floating"),
        "expand channels": (dict(expand_weight=torch.randn(8, 3, 1, 1)), "expand_weight"),
        "expand without bn1": (dict(bn1=None), "expand_weight and bn1"),
        "dw channels": (dict(dw_weight=torch.randn(7, 1, 3, 3)), "dw_weight"),
        "even kernel": (dict(dw_weight=torch.randn(8, 1, 4, 4)), "odd"),
        "dtype mismatch": (dict(project_weight=torch.randn(4, 8, 1, 1).double()), "dtype"),
        "se shape": (dict(se_weights=(torch.randn(2, 7, 1, 1),) + ok["se_weights"][1:]),
                     "fc1_weight"),
        "se count": (dict(se_weights=ok["se_weights"][:2]), "se_weights"),
        "bn stats shape": (dict(bn2=bn2._replace(running_mean=torch.zeros(5))),
                           r"bn2.running_mean must have shape \(8,\)"),
        "bn eps": (dict(bn2=bn2._replace(eps=0.0)), "eps"),
        "bn momentum": (dict(bn2=bn2._replace(momentum=2.0)), "momentum"),
        "stride": (dict(stride=3), "stride"),
        "residual shape": (dict(stride=2), "residual needs stride 1"),
        "activation": (dict(activation="gelu"), "activation"),
        "gate": (dict(se_gate="tanh"), "se_gate"),
        "drop path": (dict(drop_path=1.0), "drop_path"),
        "one value per channel": (dict(input=torch.randn(1, 4, 1, 1)), "more than 1 value"),
        "device": (dict(bn3=ok["bn3"]._replace(weight=torch.ones(4, device="meta"))), "meta"),
    }


@pytest.mark.parametrize("case", _bad_calls())
def test_bad_input_is_rejected_and_state_untouched(case):
    kwargs, message = _bad_calls()[case]
    args = _mbconv_kwargs()
    args.update(kwargs)
    state = [t for bn in (args["bn1"], args["bn2"], args["bn3"]) if bn is not None
             for t in (bn.running_mean, bn.running_var, bn.num_batches_tracked)]
    before = [t.clone() for t in state]
    rng = torch.get_rng_state()
    with pytest.raises((ValueError, TypeError), match=message):
        fm.functional.mbconv(**args)
    assert all(torch.equal(a, b) for a, b in zip(before, state))
    assert torch.equal(rng, torch.get_rng_state())


def test_module_rejects_wrong_input_and_keeps_running_stats():
    fused = fm.FusedMBConv(6, 6, 3, 1, 6).train()
    before = copy.deepcopy(fused.state_dict())
    with pytest.raises(ValueError, match="expand_weight must have shape"):
        fused(torch.randn(2, 5, 7, 7))
    assert all(torch.equal(v, before[k]) for k, v in fused.state_dict().items())


def test_backend_without_the_block_kernels_is_refused_clearly(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # triton usable on CPU
    import fused_mbconv.kernels as triton_kernels
    monkeypatch.delattr(triton_kernels, "mbconv_expand_forward")  # one block kernel missing
    assert not implements("triton", KERNELS)
    with fm.use_backend("triton"):
        with pytest.raises(NotImplementedError, match="mbconv_expand_forward"):
            fm.FusedMBConv(4, 4, 3, 1, 2)(torch.randn(2, 4, 5, 5))


def _saved(fn, x, module):
    """(activation bytes, parameter tensors) saved for backward by ``fn``: the block input x
    is excluded, and so are the module's parameters, which the module holds anyway (saving
    them costs no memory), so only the saving policy's own cost is counted."""
    params = {p.data_ptr(): p for p in module.parameters()}
    sizes, saved_params = [], []

    def pack(t):
        if t.data_ptr() in params and t.shape == params[t.data_ptr()].shape:
            saved_params.append(t)
        elif not (t.data_ptr() == x.data_ptr() and t.shape == x.shape):
            sizes.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(sizes), saved_params


def saved_bytes(batch=2, size=16, recompute=False):
    """{config: (eager, fused)} activation bytes saved for backward by one training forward of
    each B0 block configuration at its real channel counts (x and parameters excluded), the
    fused block at that ``recompute`` level."""
    result = {}
    for name, config in B0_REAL.items():
        block = make_block(config, drop_path=0.1).train()
        fused = fm.FusedMBConv.from_module(copy.deepcopy(block))
        fused.recompute = recompute
        x = torch.randn(batch, config[0], size, size, requires_grad=True)
        eager_bytes, _ = _saved(lambda: block(x), x, block)
        fused_bytes, params = _saved(lambda: fused(x), x, fused)
        # Parameters are kept by reference, each once: no converted or duplicated copies.
        assert len({p.data_ptr() for p in params}) == len(params), name
        result[name] = (eager_bytes, fused_bytes)
    return result


def test_saves_at_least_3x_fewer_bytes_than_eager():
    for name, (eager, fused) in saved_bytes().items():
        assert fused > 0
        assert eager / fused >= 3.0, f"{name}: eager {eager} B, fused {fused} B"


def test_recompute_dwconv_saves_less():
    kept, recomputed = saved_bytes(1, 8), saved_bytes(1, 8, recompute="dwconv")
    for name in kept:
        assert recomputed[name][1] < kept[name][1], name


def test_recompute_levels_save_strictly_less_in_turn():
    """False > "dwconv" > True wherever the block expands; without expansion there is no e,
    and True saves what "dwconv" does."""
    levels = {level: saved_bytes(1, 8, recompute=level) for level in (False, "dwconv", True)}
    for name, config in B0_REAL.items():
        kept, dwconv, recomputed = (levels[level][name][1] for level in (False, "dwconv", True))
        if config[4] > 1:
            assert kept > dwconv > recomputed, (name, kept, dwconv, recomputed)
        else:
            assert kept > dwconv == recomputed, (name, kept, dwconv, recomputed)


if __name__ == "__main__":  # the measurement table: python tests/test_fused_mbconv.py
    levels = {level: saved_bytes(recompute=level) for level in (False, "dwconv", True)}
    print("saved for backward, batch 2, 16x16 input, x and parameters excluded; bytes and "
          "eager / fused")
    print(f"{'block':30s} {'eager B':>9s} " + " ".join(
        f"{'recompute=' + str(level) + ' B':>22s} {'ratio':>6s}" for level in levels))
    for name, (eager, _) in levels[False].items():
        print(f"{name:30s} {eager:9d} " + " ".join(
            f"{levels[level][name][1]:22d} {eager / levels[level][name][1]:6.2f}"
            for level in levels))


@pytest.mark.parametrize("config", [(6, 6, 3, 1, 6), (6, 8, 5, 2, 1)], ids=["residual", "plain"])
def test_autocast_gives_eager_autocast_dtypes_and_values(config):
    """Convs run in the autocast dtype, BatchNorm keeps float32 parameters, and a float32
    residual input promotes the output to float32 -- exactly as under eager autocast."""
    check_autocast(config, "cpu", torch.bfloat16, fm.available_backends("cpu")[0])


@pytest.mark.skipif(not GPU_BACKENDS, reason="no CUDA device: CUDA autocast runs only where "
                    "one is present")
@pytest.mark.parametrize("backend", GPU_BACKENDS or ["none"], ids=lambda b: target_id("cuda", b))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("config", [(6, 6, 3, 1, 6), (6, 8, 5, 2, 1)], ids=["residual", "plain"])
def test_autocast_on_cuda_matches_eager(config, dtype, backend):
    check_autocast(config, "cuda", dtype, backend)


def check_autocast(config, device, dtype, backend):
    eager = make_block(config).to(device)
    fused = fm.FusedMBConv.from_module(copy.deepcopy(eager))
    reference = copy.deepcopy(eager).double()
    x = torch.randn(2, config[0], 7, 7, device=device)
    inputs = [x.clone().requires_grad_() for _ in range(3)]
    with torch.autocast(device, dtype=dtype), fm.use_backend(backend):
        out_eager, out_fused = eager(inputs[0]), fused(inputs[1])
    out_ref = reference(inputs[2].double())
    assert out_fused.dtype == out_eager.dtype
    assert_close_by_rule(out_fused.float(), out_eager.float(), out_ref, dtype, "output")
    grad_out = torch.randn(out_ref.shape, dtype=torch.float64, device=device)
    with fm.use_backend(backend):
        for out in (out_eager, out_fused, out_ref):
            out.backward(grad_out.to(out.dtype))
    assert_close_by_rule(inputs[1].grad, inputs[0].grad, inputs[2].grad, dtype, "grad input")
    for (name, p_fused), p_eager, p_ref in zip(fused.named_parameters(), eager.parameters(),
                                               reference.parameters()):
        assert p_fused.grad.dtype == torch.float32, name
        assert_close_by_rule(p_fused.grad, p_eager.grad, p_ref.grad, dtype, f"grad {name}")
