"""Model conversion: block recognizers, convert / convert_report, and the converted models'
parity with the originals (train and eval, state_dict, pickling, torch.compile, autocast,
export). Random weights only; nothing is downloaded."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fused_mbconv as fm
from fused_mbconv import convert as cv
from fused_mbconv.activations import make_activation, make_gate

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")


def timm_model(name, **kwargs):
    return timm.create_model(name, pretrained=False, **kwargs)


def tv_model(name, **kwargs):
    return getattr(torchvision.models, name)(weights=None, **kwargs)


# (model id, constructor, blocks that must be fusable, unfusable blocks' reasons must contain)
MODELS = {
    "tv:efficientnet_b0": (lambda: tv_model("efficientnet_b0"), 16, {}),
    "tv:efficientnet_v2_s": (lambda: tv_model("efficientnet_v2_s"), 30,
                             {"FusedMBConv": 10}),
    "timm:efficientnet_b0": (lambda: timm_model("efficientnet_b0", drop_path_rate=0.2), 16, {}),
    "timm:mobilenetv2_100": (lambda: timm_model("mobilenetv2_100", drop_path_rate=0.2), 17, {}),
    "timm:mobilenetv3_large_100": (lambda: timm_model("mobilenetv3_large_100",
                                                      drop_path_rate=0.2), 15,
                                   {"ConvBnAct": 1}),
    "timm:mnasnet_100": (lambda: timm_model("mnasnet_100"), 17, {}),
    "timm:mixnet_s": (lambda: timm_model("mixnet_s"), 1, {"MixedConv2d": 15}),
    "timm:tf_efficientnet_b0": (lambda: timm_model("tf_efficientnet_b0"), 12,
                                {"'same' padding": 4}),
    "fm:efficientnet_b0": (lambda: fm.efficientnet_b0(), 16, {}),
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
    k = spec.kernel_size
    h = act(bn(F.conv2d(h, spec.dw_conv.weight, None, spec.stride, k // 2, 1, h.shape[1]),
               spec.dw_bn))
    if spec.se_fc1 is not None:
        s = h.mean((2, 3), keepdim=True)
        s = make_activation(spec.se_activation)(F.conv2d(s, spec.se_fc1.weight, spec.se_fc1.bias))
        h = h * make_gate(spec.se_gate)(F.conv2d(s, spec.se_fc2.weight, spec.se_fc2.bias))
    h = bn(F.conv2d(h, spec.project_conv.weight), spec.project_bn)
    if spec.residual:
        h = fm.blocks.drop_path(h, spec.drop_path, training) + x
    return h


def randomize_bn_state(model: nn.Module) -> None:
    """Non-trivial BN affine parameters and running statistics, so roles can't be confused."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)


def block_input(spec: fm.MBConvSpec, size: int = 6) -> torch.Tensor:
    channels = (spec.expand_conv or spec.dw_conv).in_channels
    return torch.randn(2, channels, size, size)


def bn_state(module: nn.Module):
    return {k: v.clone() for k, v in module.state_dict().items()
            if "running" in k or "num_batches" in k}


def distinct_fusable_blocks(model):
    """One fusable block per distinct layout (class, roles present, flags), to keep tests fast."""
    seen = set()
    for path, block in cv.iter_blocks(model):
        try:
            spec = cv.recognize(block)
        except cv.NotFusable:
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
    for _, block in cv.iter_blocks(model):
        try:
            cv.recognize(block)
            ok += 1
        except cv.NotFusable as e:
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
        spec = cv.recognize(described)
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
])
def test_unfusable_blocks_say_why(make, reason):
    block = make()
    assert cv.is_block(block)
    with pytest.raises(cv.NotFusable, match=reason):
        cv.recognize(block)


def test_bn_without_affine_or_running_stats_is_refused():
    block = fm.MBConv(8, 8, 3, 1, 4)
    block.dw_bn = nn.BatchNorm2d(32, affine=False)
    with pytest.raises(cv.NotFusable, match="depthwise BN: BatchNorm without affine"):
        cv.recognize(block)
    block.dw_bn = nn.BatchNorm2d(32, track_running_stats=False)
    with pytest.raises(cv.NotFusable, match="depthwise BN: BatchNorm without running"):
        cv.recognize(block)


def test_conv_bias_where_the_block_has_none_is_refused():
    block = fm.MBConv(8, 16, 3, 2, 4)
    block.project_conv = nn.Conv2d(32, 16, 1, bias=True)
    with pytest.raises(cv.NotFusable, match="project conv: conv with bias"):
        cv.recognize(block)


def test_subclass_overriding_forward_is_refused():
    class Custom(fm.MBConv):
        def forward(self, x):
            return super().forward(x) * 2

    class SameMath(fm.MBConv):
        pass

    with pytest.raises(cv.NotFusable, match="subclass of MBConv with its own forward"):
        cv.recognize(Custom(8, 8, 3, 1, 4))
    assert cv.recognize(SameMath(8, 8, 3, 1, 4)).residual


def test_non_blocks_are_not_listed():
    assert not cv.is_block(nn.Conv2d(3, 3, 3))
    with pytest.raises(cv.NotFusable, match="not a known MBConv-style block"):
        cv.recognize(nn.Sequential())
