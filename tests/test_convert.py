"""Model conversion: block recognizers, convert / convert_report, and the converted models'
parity with the originals (train and eval, state_dict, pickling, torch.compile, autocast,
export). Random weights only; nothing is downloaded."""

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import timm
import torchvision

import fused_mbconv as fm
from fused_mbconv.convert import NotFusable, is_block, iter_blocks, recognize
from fused_mbconv.activations import make_activation, make_gate
from parity import (assert_autocast_grads_by_rule, assert_same_grads_and_buffers,
                    randomize_bn_state)
from targets import gpu_backends
from tolerances import NETWORK_GRADIENT_ROUNDS, assert_close_by_rule

GPU_BACKENDS = gpu_backends()


def timm_model(name, **kwargs):
    return timm.create_model(name, pretrained=False, **kwargs)


def tv_model(name, **kwargs):
    return getattr(torchvision.models, name)(weights=None, **kwargs)


# (model id, constructor, blocks that must be fusable, unfusable blocks' reasons must contain)
MODELS = {
    "tv:efficientnet_b0": (lambda: tv_model("efficientnet_b0"), 16, {}),
    "tv:efficientnet_v2_s": (lambda: tv_model("efficientnet_v2_s"), 30,
                             {"EfficientNetV2 fused MBConv": 10}),
    "timm:efficientnet_b0": (lambda: timm_model("efficientnet_b0", drop_path_rate=0.2), 16, {}),
    "timm:mobilenetv2_100": (lambda: timm_model("mobilenetv2_100", drop_path_rate=0.2), 17, {}),
    "timm:mobilenetv3_large_100": (lambda: timm_model("mobilenetv3_large_100",
                                                      drop_path_rate=0.2), 15,
                                   {"not an inverted-residual block": 1}),
    "timm:mnasnet_100": (lambda: timm_model("mnasnet_100"), 17, {}),
    "timm:mixnet_s": (lambda: timm_model("mixnet_s"), 1, {"MixedConv2d": 15}),
    "timm:tf_efficientnet_b0": (lambda: timm_model("tf_efficientnet_b0"), 16, {}),
    "timm:tf_efficientnet_lite0": (lambda: timm_model("tf_efficientnet_lite0"), 16, {}),
    "fm:efficientnet_b0": (lambda: fm.efficientnet_b0(), 16, {}),
    "tv:mobilenet_v2": (lambda: tv_model("mobilenet_v2"), 17, {}),
    "tv:mobilenet_v3_large": (lambda: tv_model("mobilenet_v3_large"), 15, {}),
    "tv:mnasnet1_0": (lambda: tv_model("mnasnet1_0"), 16, {}),
    "timm:tf_mobilenetv3_large_100": (lambda: timm_model("tf_mobilenetv3_large_100"), 15,
                                      {"not an inverted-residual block": 1}),
    # MobileNetV4: its inverted-bottleneck UniversalInvertedResidual blocks fuse
    "timm:mobilenetv4_conv_small": (lambda: timm_model("mobilenetv4_conv_small",
                                                       drop_path_rate=0.2), 8,
                                    {"not an inverted-residual block": 5,
                                     "dw_start: a second depthwise conv": 4}),
}


def spec_forward(spec: fm.MBConvSpec, x: torch.Tensor, training: bool) -> torch.Tensor:
    """The block as ``spec`` describes it, from its role modules' parameters: what a faithful
    recognizer promises the fused block computes."""
    def bn(h, m):
        if training:
            m.num_batches_tracked += 1
        return F.batch_norm(h, m.running_mean, m.running_var, m.weight, m.bias, training,
                            m.momentum, m.eps)

    act = make_activation(spec.activation)
    h = x
    if spec.expand_conv is not None:
        h = act(bn(F.conv2d(h, spec.expand_conv.weight), spec.expand_bn))
    k, stride = spec.kernel_size, spec.stride
    if spec.dw_pad is None:
        pad = (k // 2,) * 4
    elif spec.dw_pad == "same":  # TensorFlow: ceil(size / stride) outputs, odd pixel after
        totals = [max((math.ceil(n / stride) - 1) * stride + k - n, 0) for n in h.shape[:1:-1]]
        pad = tuple(p for total in totals for p in (total // 2, total - total // 2))
    else:
        pad = spec.dw_pad
    h = act(bn(F.conv2d(F.pad(h, pad), spec.dw_conv.weight, None, stride, 0, 1, h.shape[1]),
               spec.dw_bn))
    if spec.se_fc1 is not None:
        s = h.mean((2, 3), keepdim=True)
        s = make_activation(spec.se_activation)(F.conv2d(s, spec.se_fc1.weight, spec.se_fc1.bias))
        h = h * make_gate(spec.se_gate)(F.conv2d(s, spec.se_fc2.weight, spec.se_fc2.bias))
    h = bn(F.conv2d(h, spec.project_conv.weight), spec.project_bn)
    if spec.residual:
        h = fm.blocks.drop_path(h, spec.drop_path, training) + x
    return h


def block_input(spec: fm.MBConvSpec, size: int = 6) -> torch.Tensor:
    channels = (spec.expand_conv or spec.dw_conv).in_channels
    return torch.randn(2, channels, size, size)


def bn_state(module: nn.Module):
    return {k: v.clone() for k, v in module.state_dict().items()
            if "running" in k or "num_batches" in k}


def distinct_fusable_blocks(model):
    """One fusable block per distinct layout (class, roles present, flags), to keep tests fast."""
    seen = set()
    for path, block in iter_blocks(model):
        try:
            spec = recognize(block)
        except NotFusable:
            continue
        layout = (type(block), spec.expand_conv is None, spec.se_fc1 is None, spec.stride,
                  spec.residual, spec.drop_path > 0, spec.activation, spec.se_activation,
                  spec.se_gate)
        if layout not in seen:
            seen.add(layout)
            yield path, block


@pytest.fixture(scope="module", params=list(MODELS))
def model_case(request):
    build, fusable, unfusable = MODELS[request.param]
    torch.manual_seed(0)
    model = build()
    randomize_bn_state(model)
    return request.param, model, fusable, unfusable


def test_recognizers_count_fusable_and_unfusable_blocks(model_case):
    name, model, fusable, unfusable = model_case
    ok, reasons = 0, []
    for _, block in iter_blocks(model):
        try:
            recognize(block)
            ok += 1
        except NotFusable as e:
            reasons.append(str(e))
    assert ok == fusable, name
    assert len(reasons) == sum(unfusable.values()), reasons
    for needle, count in unfusable.items():
        assert sum(needle in r for r in reasons) == count, (needle, reasons)


@pytest.mark.parametrize("training", [False, True])
def test_specs_reproduce_every_fusable_block(model_case, training):
    """Each recognized spec, evaluated from its role modules, gives the original block's output
    and running-statistic updates (drop path included, same random stream)."""
    name, model, _, _ = model_case
    for path, block in distinct_fusable_blocks(model):
        original, described = copy.deepcopy(block), copy.deepcopy(block)
        original.train(training)
        spec = recognize(described)
        x = block_input(spec)
        torch.manual_seed(1)
        expected = original(x.clone())
        torch.manual_seed(1)
        got = spec_forward(spec, x.clone(), training)
        torch.testing.assert_close(got, expected, msg=f"{name} {path}")
        assert bn_state(described).keys() == bn_state(original).keys()
        for key, value in bn_state(original).items():
            torch.testing.assert_close(bn_state(described)[key], value,
                                       msg=f"{name} {path} {key}")


def timm_block(cls_name, **kwargs):
    from timm.models import _efficientnet_blocks as eb
    return getattr(eb, cls_name)(**kwargs)


@pytest.mark.parametrize("make, reason", [
    (lambda: timm_block("InvertedResidual", in_chs=8, out_chs=8, exp_ratio=4,
                        act_layer=nn.GELU), "unsupported activation GELU"),
    (lambda: timm_block("DepthwiseSeparableConv", in_chs=8, out_chs=8, pw_act=True),
     "activation after the pointwise projection"),
    (lambda: timm_block("InvertedResidual", in_chs=8, out_chs=8, exp_ratio=4,
                        norm_layer=lambda c, **kw: nn.BatchNorm2d(c, affine=False)),
     "bn1: no activation"),  # a non-BatchNormAct norm in timm drops the activation
    (lambda: timm_block("InvertedResidual", in_chs=8, out_chs=8, exp_ratio=4, dilation=2),
     "dilation"),
    (lambda: timm_block("InvertedResidual", in_chs=8, out_chs=8, exp_ratio=4, group_size=4),
     "not depthwise"),
    (lambda: timm_block("CondConvResidual", in_chs=8, out_chs=8, exp_ratio=4, num_experts=2),
     "CondConv"),
    (lambda: timm_block("EdgeResidual", in_chs=8, out_chs=8, exp_ratio=4), "dense kxk"),
    (lambda: timm_block("ConvBnAct", in_chs=8, out_chs=8, kernel_size=3), "not an inverted"),
])
def test_unfusable_blocks_say_why(make, reason):
    block = make()
    assert is_block(block)
    with pytest.raises(NotFusable, match=reason):
        recognize(block)


def test_bn_without_affine_or_running_stats_is_recognized():
    # The fused block reads each BatchNorm's affine and tracking state at every call
    # (tests/test_module_states.py checks the math).
    for bn in (nn.BatchNorm2d(32, affine=False), nn.BatchNorm2d(32, track_running_stats=False)):
        block = fm.MBConv(8, 8, 3, 1, 4)
        block.dw_bn = bn
        assert recognize(block).dw_bn is bn


def test_swapped_child_runs_eager_and_the_report_says_why():
    block = fm.MBConv(8, 8, 3, 1, 4)
    model = fm.convert(nn.Sequential(block))
    assert len(fm.convert_report(model).converted) == 1
    frozen = torchvision.ops.FrozenBatchNorm2d(32)
    model[0].dw_bn = frozen  # as torchvision's and timm's freeze helpers do
    report = fm.convert_report(model)
    assert [b.status for b in report.blocks] == ["eager"]
    assert "FrozenBatchNorm2d is not BatchNorm2d" in report.blocks[0].reason
    reference = copy.deepcopy(block)
    reference.dw_bn = frozen
    x = torch.randn(2, 8, 6, 6)
    torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)
    model[0].dw_bn = nn.BatchNorm2d(32)  # fusable again
    assert len(fm.convert_report(model).converted) == 1


def test_mixed_batchnorm_modes_are_reported():
    model = fm.convert(nn.Sequential(fm.MBConv(8, 8, 3, 1, 4))).train()
    model[0].dw_bn.eval()
    (block,) = fm.convert_report(model).blocks
    assert block.status == "eager"
    assert "mix batch and running statistics" in block.reason
    assert "depthwise BN running" in block.reason
    model.apply(lambda m: m.eval() if isinstance(m, nn.BatchNorm2d) else None)
    assert fm.convert_report(model).blocks[0].status == "converted"


@pytest.mark.parametrize("name", ["timm:efficientnet_b0", "torchvision:efficientnet_b0",
                                  "efficientnet_b0"])
def test_revert_restores_the_original_classes_and_state(name):
    from fused_mbconv.verification import build_model
    original = build_model(name, num_classes=10).eval()
    randomize_bn_state(original)
    converted = fm.convert(original)
    reverted = fm.revert(converted)
    assert not any(isinstance(m, fm.FusedMBConv) for m in reverted.modules())
    assert [type(m) for m in reverted.modules()] == [type(m) for m in original.modules()]
    assert list(reverted.state_dict()) == list(original.state_dict())
    for key, value in original.state_dict().items():
        assert torch.equal(reverted.state_dict()[key], value), key
    assert any(isinstance(m, fm.FusedMBConv) for m in converted.modules())  # not inplace
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(reverted(x), original(x), rtol=0, atol=0)


def test_onnx_export_records_the_eager_math(tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    model = fm.convert(nn.Sequential(fm.MBConv(8, 8, 3, 1, 4))).eval()
    path = tmp_path / "block.onnx"
    torch.onnx.export(model, (torch.randn(1, 8, 6, 6),), str(path), dynamo=True)
    graph = onnx.load(str(path)).graph
    ops = {node.op_type for node in graph.node}
    assert "Conv" in ops and not any("mbconv" in op for op in ops), ops


def test_conv_bias_where_the_block_has_none_is_refused():
    block = fm.MBConv(8, 16, 3, 2, 4)
    block.project_conv = nn.Conv2d(32, 16, 1, bias=True)
    with pytest.raises(NotFusable, match="project conv: conv with bias"):
        recognize(block)


def test_subclass_overriding_forward_is_refused():
    class Custom(fm.MBConv):
        def forward(self, x):
            return super().forward(x) * 2

    class SameMath(fm.MBConv):
        pass

    with pytest.raises(NotFusable, match="subclass of MBConv with its own forward"):
        recognize(Custom(8, 8, 3, 1, 4))
    assert recognize(SameMath(8, 8, 3, 1, 4)).residual


def test_non_blocks_are_not_listed():
    assert not is_block(nn.Conv2d(3, 3, 3))
    with pytest.raises(TypeError, match="not a known MBConv-style block"):
        recognize(nn.Sequential())


# ---------------------------------------------------------------------------------------------
# convert_report


def test_report_lists_unconverted_blocks_and_why():
    report = fm.convert_report(timm_model("mixnet_s"))
    assert [b.path for b in report.convertible] == ["blocks.0.0"]
    assert len(report.unconverted) == 15 and not report.converted
    assert all("MixedConv2d" in b.reason for b in report.unconverted)
    text = str(report)
    assert text.startswith("16 MBConv-style blocks: 0 converted, 1 convertible, 15 unconverted")
    assert "blocks.3.1  unconverted  timm.InvertedResidual: conv_dw: MixedConv2d" in text


@pytest.mark.parametrize("name, unconverted, reason", [
    ("timm:tf_mobilenetv3_large_100", 1, "not an inverted-residual block"),
    ("tv:efficientnet_v2_s", 10, "dense kxk expansion conv"),
    ("timm:mixnet_s", 15, "MixedConv2d"),
])
def test_report_after_conversion(name, unconverted, reason):
    build, fusable, _ = MODELS[name]
    converted = fm.convert(build())
    report = fm.convert_report(converted)
    assert len(report.converted) == fusable and not report.convertible
    assert len(report.unconverted) == unconverted
    assert all(reason in b.reason for b in report.unconverted), str(report)


# ---------------------------------------------------------------------------------------------
# Conversion parity: converted vs original, both fp32, judged against the original in fp64 by
# the suite's tolerance rule.

PARITY_MODELS = ["tv:efficientnet_b0", "tv:efficientnet_v2_s", "timm:efficientnet_b0",
                 "timm:mobilenetv2_100", "timm:mobilenetv3_large_100", "timm:mnasnet_100",
                 "timm:tf_efficientnet_b0", "tv:mobilenet_v3_large",
                 "tv:mnasnet1_0", "timm:mobilenetv4_conv_small", "tv:mobilenet_v2"]


# Inputs redrawn where the default one puts a pre-activation within float32 rounding of a ReLU6
# kink near the input, where the rule does not apply: in tv:mobilenet_v2 one depthwise BN output
# of features.1 is 1.8e-8 in float64, so float32 rounding clips it in one model and not in
# another, and that single mask element moves the stem's weight gradient by 2% (eager's own
# error is the large one when the fused block rounds it the float64 way).
INPUT_SEEDS = {"tv:mobilenet_v2": 1}


def train_steps(model, x, weights, steps=2):
    """Per SGD step: output and every parameter's gradient; then the final state_dict."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    record = []
    for step in range(steps):
        torch.manual_seed(100 + step)  # same drop-path / dropout masks in every model
        out = model(x.to(next(model.parameters()).dtype))
        opt.zero_grad()
        (out * weights.to(out.dtype)).sum().backward()
        record.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        opt.step()
    return record, model.state_dict()


def assert_state_close(fused, eager, ref, what, rounds=1):
    assert fused.keys() == eager.keys() == ref.keys(), what
    for key in ref:
        if ref[key].is_floating_point():
            assert_close_by_rule(fused[key], eager[key], ref[key], eager[key].dtype,
                                 f"{what} {key}", rounds)
        else:
            assert torch.equal(fused[key], ref[key]), f"{what} {key}"


def check_converted_training(name, device="cpu", case=None):
    """Two SGD steps of the converted model, the original and a float64 copy, all on device:
    outputs, step-1 gradients and final states by the rule, then eval outputs. ``case``: a
    (constructor, fusable, reasons) entry not in MODELS."""
    build, fusable, _ = case or MODELS[name]
    torch.manual_seed(0)
    original = build()
    randomize_bn_state(original)
    original.to(device)
    converted = fm.convert(original)
    assert len(fm.convert_report(converted).converted) == fusable
    reference = copy.deepcopy(original).double()
    if name in INPUT_SEEDS:
        torch.manual_seed(INPUT_SEEDS[name])
    x = torch.randn(2, 3, 64, 64, device=device)
    weights = torch.randn(2, 1000, device=device) / 1000  # small, well-conditioned steps
    runs = {label: train_steps(m.train(), x, weights)
            for label, m in (("fused", converted), ("eager", original), ("ref", reference))}
    for step, ((f_out, f_grads), (e_out, e_grads), (r_out, r_grads)) in enumerate(
            zip(*(runs[k][0] for k in ("fused", "eager", "ref")))):
        assert_close_by_rule(f_out, e_out, r_out, torch.float32, f"{name} step {step} output",
                             rounds=step + 1)
        if step == 0:  # later steps start from parameters that already differ by rounding, and
            # ReLU/ReLU6 kinks then flip differently in each model: judged through the state.
            # Gradients at the end of a whole network's backward get the rule compounded once
            # more, as in test_fused_mbconv's network test: on CI's CPU the first block's
            # depthwise weight gradient of mobilenetv2 reached 2.7x eager's error.
            assert_state_close(f_grads, e_grads, r_grads, f"{name} step {step} grad",
                               rounds=NETWORK_GRADIENT_ROUNDS)
    assert_state_close(runs["fused"][1], runs["eager"][1], runs["ref"][1], f"{name} state",
                       rounds=len(runs["ref"][0]))
    # eval mode, with the running statistics training left behind
    with torch.no_grad():
        outs = [m.eval()(x.to(next(m.parameters()).dtype))
                for m in (converted, original, reference)]
    assert_close_by_rule(*outs, torch.float32, f"{name} eval output")


@pytest.mark.parametrize("name", PARITY_MODELS)
def test_converted_model_trains_like_the_original(name):
    check_converted_training(name)


@pytest.mark.skipif(not GPU_BACKENDS, reason="no CUDA device: converted models run on CUDA "
                    "tensors only where a GPU is present")
@pytest.mark.parametrize("backend", GPU_BACKENDS or ["none"], ids=lambda b: f"cuda-{b}")
@pytest.mark.parametrize("name", PARITY_MODELS)
def test_converted_model_trains_like_the_original_on_cuda(name, backend):
    with fm.use_backend(backend):
        check_converted_training(name, "cuda")


def test_convert_leaves_the_original_alone_unless_inplace():
    model = MODELS["tv:efficientnet_b0"][0]()
    converted = fm.convert(model)
    assert converted is not model
    assert len(fm.convert_report(model).convertible) == 16
    assert fm.convert(model, inplace=True) is model
    assert len(fm.convert_report(model).converted) == 16
    block = fm.MBConv(8, 8, 3, 1, 4).eval()
    fused = fm.convert(block)
    assert isinstance(fused, fm.FusedMBConv) and not fused.training


# ---------------------------------------------------------------------------------------------
# A small model with one block of every recognized kind, for the framework checks below.


def zoo():
    from functools import partial

    from timm.models._efficientnet_blocks import (DepthwiseSeparableConv, InvertedResidual,
                                                  SqueezeExcite)
    from torchvision.models.efficientnet import MBConv, MBConvConfig

    torch.manual_seed(0)
    hard_se = partial(SqueezeExcite, gate_layer="hard_sigmoid", force_act_layer=nn.ReLU)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.SiLU(),
        MBConv(MBConvConfig(4, 3, 1, 16, 16, 1), 0.1, nn.BatchNorm2d),
        InvertedResidual(16, 24, 5, stride=2, exp_ratio=3, act_layer=nn.Hardswish,
                         se_layer=hard_se),
        DepthwiseSeparableConv(24, 24, 3, act_layer=nn.ReLU6, drop_path_rate=0.1),
        fm.MBConv(24, 32, 3, 2, 6),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    randomize_bn_state(model)
    return model


@pytest.fixture(scope="module")
def zoo_pair():
    original = zoo()
    converted = fm.convert(original)
    assert len(fm.convert_report(converted).converted) == 4
    return original, converted


def test_state_dicts_load_both_ways(zoo_pair):
    original, converted = zoo_pair
    assert list(original.state_dict()) == list(converted.state_dict())
    for a, b in zip(original.state_dict().values(), converted.state_dict().values()):
        assert torch.equal(a, b)
    fresh_original, fresh_converted = zoo(), fm.convert(zoo())
    with torch.no_grad():
        for p in fresh_original.parameters():
            p.add_(1.0)
    fresh_converted.load_state_dict(fresh_original.state_dict())  # strict
    original_copy = copy.deepcopy(original)
    original_copy.load_state_dict(fresh_converted.state_dict())
    for a, b in zip(fresh_original.state_dict().values(), original_copy.state_dict().values()):
        assert torch.equal(a, b)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        outs = [m.eval()(x.to(next(m.parameters()).dtype)) for m in
                (fresh_converted, original_copy, copy.deepcopy(original_copy).double())]
    assert_close_by_rule(*outs, torch.float32, "eval output after loading")


def test_deepcopy_and_pickle(zoo_pair):
    import io

    _, converted = zoo_pair
    converted.eval()
    x = torch.randn(2, 3, 32, 32)
    buffer = io.BytesIO()
    torch.save(converted, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    copied = copy.deepcopy(converted)
    with torch.no_grad():
        expected = converted(x)
        for other in (loaded, copied):
            assert len(fm.convert_report(other).converted) == 4
            torch.testing.assert_close(other(x), expected, rtol=0, atol=0)
    # the copies own their parameters: training one leaves the other alone
    copied.train()(x).sum().backward()
    assert all(p.grad is None for p in converted.parameters())


@pytest.mark.parametrize("training", [True, False])
def test_compile_fullgraph_without_graph_breaks(zoo_pair, training):
    _, converted = zoo_pair
    model = copy.deepcopy(converted).train(training)
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.manual_seed(5)
    out = compiled(x)
    torch.manual_seed(5)
    expected = eager(x)
    torch.testing.assert_close(out, expected)
    if training:
        out.square().sum().backward()
        expected.square().sum().backward()
        assert_same_grads_and_buffers(model, eager)


@pytest.mark.parametrize("training", [True, False])
def test_autocast_bfloat16_matches_eager_autocast(zoo_pair, training):
    original, converted = (copy.deepcopy(m).train(training) for m in zoo_pair)
    reference = copy.deepcopy(original).double()
    x = torch.randn(2, 3, 32, 32)
    outs = []
    for model in (converted, original):
        torch.manual_seed(7)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        out.float().square().sum().backward()
        outs.append(out)
    torch.manual_seed(7)
    ref = reference(x.double())
    ref.square().sum().backward()
    assert outs[0].dtype == outs[1].dtype
    assert_close_by_rule(outs[0].float(), outs[1].float(), ref, torch.bfloat16, "output")
    assert_autocast_grads_by_rule(converted, original, reference, torch.bfloat16)


def test_export_eval(zoo_pair):
    _, converted = zoo_pair
    model = copy.deepcopy(converted).eval()
    x = torch.randn(2, 3, 32, 32)
    program = torch.export.export(model, (x,))
    x2 = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x2), model(x2))


def test_from_module_accepts_torchvision_and_timm_blocks():
    model = MODELS["timm:mobilenetv3_large_100"][0]()
    fused = fm.FusedMBConv.from_module(model.blocks[2][0])
    assert fused.spec().se_gate == "hardsigmoid" and fused.spec().activation == "relu"
    assert list(fused.state_dict()) == list(model.blocks[2][0].state_dict())
    mixed = timm_model("mixnet_s").blocks[2][0]
    with pytest.raises(ValueError, match="MixedConv2d"):
        fm.FusedMBConv.from_module(mixed)
