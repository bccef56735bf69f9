"""Conversion of stems and heads: which layers each model family fuses (and why not), the
state_dict unchanged, whole-model parity of converted torchvision and timm EfficientNet-B0
under the suite's tolerance rule, every module state (frozen or eval BatchNorm in a training
model, no running statistics or affine, cumulative momentum, checkpointing, meta device,
swapped children, empty batches), revert, and what the fused stem saves for backward."""

import copy

import pytest
import timm
import torch
import torch.nn as nn
import torchvision
from timm.layers.norm_act import BatchNormAct2d
from torch.utils.checkpoint import checkpoint
from torchvision.ops.misc import FrozenBatchNorm2d

import fused_mbconv as fm
from fused_mbconv import profiling
from fused_mbconv.convert_stem_head import unfuse
from parity import (assert_autocast_grads_by_rule, assert_compiles_fullgraph_like_eager, check,
                    randomize_bn_state)
from test_convert import assert_state_close, train_steps
from tolerances import NETWORK_GRADIENT_ROUNDS, assert_close_by_rule

BACKENDS = [b for b in fm.available_backends("cpu") if b != "triton"]


def timm_model(name, **kwargs):
    return timm.create_model(name, pretrained=False, **kwargs)


def tv_model(name):
    return getattr(torchvision.models, name)(weights=None)


# model id: (constructor, {layer path: status, or the unconverted reason's words})
FAMILIES = {
    "timm:efficientnet_b0": (lambda: timm_model("efficientnet_b0"),
                             {"conv_stem+bn1": "converted", "conv_head+bn2": "converted"}),
    "timm:mobilenetv2_100": (lambda: timm_model("mobilenetv2_100"),
                             {"conv_stem+bn1": "converted", "conv_head+bn2": "converted"}),
    "timm:mobilenetv3_large_100": (lambda: timm_model("mobilenetv3_large_100"),
                                   {"conv_stem+bn1": "converted",
                                    "conv_head": "no BatchNorm to fuse"}),
    "timm:tf_efficientnet_b0": (lambda: timm_model("tf_efficientnet_b0"),
                                {"conv_stem+bn1": "Conv2dSame",
                                 "conv_head+bn2": "converted"}),
    "tv:efficientnet_b0": (lambda: tv_model("efficientnet_b0"),
                           {"features.0": "converted", "features.8": "converted"}),
    "tv:mobilenet_v2": (lambda: tv_model("mobilenet_v2"),
                        {"features.0": "converted", "features.18": "converted"}),
    "tv:mobilenet_v3_large": (lambda: tv_model("mobilenet_v3_large"),
                              {"features.0": "converted", "features.16": "converted"}),
    "fm:efficientnet_b0": (lambda: fm.efficientnet_b0(),
                           {"stem": "converted", "head": "converted"}),
}


@pytest.mark.parametrize("name", FAMILIES)
def test_each_family_fuses_its_stem_and_head_or_says_why(name):
    build, expected = FAMILIES[name]
    torch.manual_seed(0)
    model = build().eval()
    randomize_bn_state(model, batches_tracked=3)
    converted = fm.convert(model)
    layers = {b.path: b for b in fm.convert_report(converted).layers}
    assert layers.keys() == expected.keys(), str(fm.convert_report(converted))
    for path, want in expected.items():
        if want == "converted":
            assert layers[path].status == "converted", layers[path]
        else:
            assert layers[path].status == "unconverted" and want in layers[path].reason
    assert "stem/head layers" in str(fm.convert_report(converted))
    # state_dict: same keys, same values; eval output the original's
    original, fused = model.state_dict(), converted.state_dict()
    assert list(original) == list(fused)
    assert all(torch.equal(original[k], fused[k]) for k in original)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        outs = [m(x.to(next(m.parameters()).dtype))
                for m in (converted, model, copy.deepcopy(model).double())]
    assert_close_by_rule(*outs, torch.float32, f"{name} eval output")


def test_report_names_the_kernels_and_fallbacks():
    converted = fm.convert(timm_model("efficientnet_b0"))
    with fm.use_backend("torch"):
        notes = {b.path: b.reason for b in fm.convert_report(converted).layers}
    assert notes["conv_stem+bn1"] == "conv_bn_act on torch kernels"
    if "cpu" in BACKENDS:
        with fm.use_backend("cpu"):
            note = fm.convert_report(converted).layers[0].reason
        assert "lacks conv_bn_act_forward, conv_bn_act_backward" in note
        assert "torch reference" in note


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["timm:efficientnet_b0", "tv:efficientnet_b0"])
def test_converted_b0_trains_like_the_original(name, backend):
    """test_convert's whole-model protocol (two SGD steps: outputs, the first step's
    gradients, the final state_dict, then eval) with the stem and head fused, per backend."""
    torch.manual_seed(0)
    original = FAMILIES[name][0]()
    randomize_bn_state(original)
    converted = fm.convert(original)
    assert all(b.status == "converted" for b in fm.convert_report(converted).layers)
    reference = copy.deepcopy(original).double()
    x = torch.randn(2, 3, 64, 64)
    weights = torch.randn(2, 1000) / 1000
    with fm.use_backend(backend):
        runs = [train_steps(m.train(), x, weights)
                for m in (converted, original, reference)]
    fused, eager, ref = (r[0] for r in runs)
    for step, ((f_out, f_grads), (e_out, e_grads), (r_out, r_grads)) in enumerate(
            zip(fused, eager, ref)):
        assert_close_by_rule(f_out, e_out, r_out, torch.float32, f"{name} step {step} output",
                             rounds=step + 1)
        if step == 0:
            assert_state_close(f_grads, e_grads, r_grads, f"{name} step {step} grad",
                               rounds=NETWORK_GRADIENT_ROUNDS)
    assert_state_close(runs[0][1], runs[1][1], runs[2][1], f"{name} state", rounds=len(ref))
    with torch.no_grad(), fm.use_backend(backend):
        outs = [m.eval()(x.to(next(m.parameters()).dtype))
                for m in (converted, original, reference)]
    assert_close_by_rule(*outs, torch.float32, f"{name} eval output")


class TimmStyle(nn.Module):
    """timm's layout: a stem conv and its BatchNormAct2d as siblings, a block, a head pair."""

    def __init__(self, **bn_kwargs):
        super().__init__()
        self.conv_stem = nn.Conv2d(3, 8, 3, 2, 1, bias=False)
        self.bn1 = BatchNormAct2d(8, act_layer=nn.SiLU, **bn_kwargs)
        self.mid = nn.Conv2d(8, 12, 3, 1, 1)
        self.conv_head = nn.Conv2d(12, 16, 1, bias=False)
        self.bn2 = BatchNormAct2d(16, act_layer=nn.Hardswish, **bn_kwargs)

    def forward(self, x):
        return self.bn2(self.conv_head(self.mid(self.bn1(self.conv_stem(x)))))


class TvStyle(nn.Module):
    """torchvision's layout: Sequential(conv, BN, act) stem, a layer, pooled 1x1 head."""

    def __init__(self, **bn_kwargs):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False),
                                  nn.BatchNorm2d(8, **bn_kwargs), nn.ReLU6())
        self.mid = nn.Conv2d(8, 12, 3, 1, 1)
        self.head = nn.Sequential(nn.Conv2d(12, 16, 1, bias=False),
                                  nn.BatchNorm2d(16, **bn_kwargs), nn.SiLU())
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        return self.pool(self.head(self.mid(self.stem(x))))


def fuse_layers(model):
    """The fused copy of a TimmStyle or TvStyle model, as conversion builds it."""
    fused = copy.deepcopy(model)
    if isinstance(fused, TimmStyle):
        for conv, bn, act in (("conv_stem", "bn1", "silu"), ("conv_head", "bn2", "hardswish")):
            fm.FusedPairConv.from_pair(fused, conv, bn, act)
    else:
        fused.stem = fm.FusedConvBNAct.from_sequential(fused.stem, "relu6")
        fused.head = fm.FusedHead.from_sequential(fused.head, "silu")
    return fused


STYLES = {"timm": TimmStyle, "tv": TvStyle}


def bns(model):
    return [m for m in model.modules()
            if isinstance(m, (nn.BatchNorm2d, fm.FoldedBatchNorm))]


STATES = {
    "train": lambda m: m.train(),
    "eval": lambda m: m.eval(),
    "frozen-bn": lambda m: [m.train()] + [b.eval() for b in bns(m)],
    "frozen-params": lambda m: [m.train()] + [p.requires_grad_(False) for b in bns(m)
                                              for p in b.parameters()],
    "frozen-stem-conv": lambda m: [m.train()] + [
        p.requires_grad_(False) for n, p in m.named_parameters()
        if n.startswith(("conv_stem", "stem.0"))],
}
BN_KINDS = {"default": {}, "no-running-stats": dict(track_running_stats=False),
            "no-affine": dict(affine=False), "cumulative": dict(momentum=None)}


def make(style, **bn_kwargs):
    torch.manual_seed(0)
    model = STYLES[style](**bn_kwargs)
    randomize_bn_state(model, batches_tracked=3)
    return model


def inputs(n=2, steps=2):
    return [torch.randn(n, 3, 9, 11, requires_grad=True) for _ in range(steps)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("style", STYLES)
def test_module_states_match_eager(style, state, backend):
    check(make(style), inputs(), f"{style} {state}", backend, STATES[state], stat_rounds=2,
          make_fused=fuse_layers)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bn_kind", [k for k in BN_KINDS if k != "default"])
@pytest.mark.parametrize("style", STYLES)
def test_batchnorm_variants_match_eager(style, bn_kind, backend):
    for training in (True, False):
        if not training and bn_kind == "no-running-stats":
            continue  # eval without running statistics normalizes by the batch: "train" case
        check(make(style, **BN_KINDS[bn_kind]), inputs(), f"{style} {bn_kind}", backend,
              lambda m: m.train(training), stat_rounds=2, make_fused=fuse_layers)


@pytest.mark.parametrize("style", STYLES)
def test_checkpointing_updates_running_stats_once_per_forward_and_recompute(style):
    """Non-reentrant checkpoint recomputes the forward in backward; eager BatchNorm updates
    its statistics there again, and so must the fused layers."""
    def forward(model, x):
        return checkpoint(model, x, use_reentrant=False)

    check(make(style), inputs(), f"{style} checkpoint", None, lambda m: m.train(),
          forward=forward, stat_rounds=3, make_fused=fuse_layers)


@pytest.mark.parametrize("style", STYLES)
def test_meta_device_gives_shapes(style):
    fused = fuse_layers(make(style)).to("meta")
    x = torch.randn(2, 3, 9, 11, device="meta", requires_grad=True)
    out = fused.train()(x)
    out.sum().backward()
    assert out.device.type == "meta" and out.shape == make(style)(torch.randn(2, 3, 9, 11)).shape


def test_swapped_batchnorm_runs_eager_and_the_report_says_why():
    model = make("tv").train()
    fused = fuse_layers(model)
    frozen = FrozenBatchNorm2d(8)
    frozen.weight.copy_(model.stem[1].weight.detach())
    fused.stem[1] = frozen
    model.stem[1] = copy.deepcopy(frozen)
    assert "FrozenBatchNorm2d is not BatchNorm2d" in fused.stem.eager_reason()
    x = torch.randn(2, 3, 9, 11)
    torch.testing.assert_close(fused(x), model(x))
    converted = fm.convert(tv_model("mobilenet_v2"))
    converted.features[0][1] = FrozenBatchNorm2d(32)
    stem = fm.convert_report(converted).layers[0]
    assert stem.status == "eager" and "FrozenBatchNorm2d" in stem.reason


@pytest.mark.parametrize("style", STYLES)
def test_empty_batch_runs_eager(style):
    model = make(style).eval()
    fused = fuse_layers(model)
    x = torch.randn(0, 3, 9, 11)
    assert fused(x).shape == model(x).shape


@pytest.mark.parametrize("name", ["timm:efficientnet_b0", "tv:efficientnet_b0"])
def test_revert_restores_the_original_layers(name):
    model = FAMILIES[name][0]()
    reverted = fm.revert(fm.convert(model))
    assert [type(m) for m in reverted.modules()] == [type(m) for m in model.modules()]
    assert list(reverted.state_dict()) == list(model.state_dict())


def test_sync_bn_leaves_stem_and_head_eager():
    converted = fm.convert(fm.convert(timm_model("efficientnet_b0")), sync_bn=True)
    layers = fm.convert_report(converted).layers
    assert [b.status for b in layers] == ["unconverted", "unconverted"]
    assert all("SyncBatchNorm" in b.reason for b in layers)


def test_fused_stem_saves_no_activation_map():
    """timm B0 at batch 2, 64^2 in training: fusing the stem and head removes at least the
    stem's BatchNorm input and activation input (2 maps of 32 x 32^2 per sample) from what
    autograd saves."""
    torch.manual_seed(0)
    blocks_only = unfuse(fm.convert(timm_model("efficientnet_b0"))).train()
    fused = fm.convert(blocks_only).train()
    x = torch.randn(2, 3, 64, 64)

    def saved(model):
        return profiling.saved_bytes(lambda: model(x), [x, *model.parameters()]).bytes

    stem_map = 2 * 32 * 32 * 32 * 4
    assert saved(blocks_only) - saved(fused) >= 2 * stem_map


@pytest.mark.parametrize("name", ["timm:efficientnet_b0", "tv:efficientnet_b0"])
def test_torchscript_scripts_the_eager_layers(name):
    original = FAMILIES[name][0]().eval()
    converted = fm.convert(original)
    with pytest.warns(UserWarning, match="scripting its eager"):
        scripted = torch.jit.script(copy.deepcopy(converted))
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(scripted(x), original(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["timm:efficientnet_b0", "tv:efficientnet_b0"])
def test_fx_trace_keeps_stem_and_head_one_node_each(name):
    converted = fm.convert(FAMILIES[name][0]()).eval()
    traced = torch.fx.symbolic_trace(converted)
    called = [n.target for n in traced.graph.nodes if n.op == "call_module"]
    fused = [p for p, m in converted.named_modules()
             if isinstance(m, (fm.FusedConvBNAct, fm.FusedPairConv))]
    assert len(fused) == 2 and all(p in called for p in fused)
    assert not any(p.startswith(tuple(f"{q}." for q in fused)) for p in called)
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(traced(x), converted(x), rtol=0, atol=0)


@pytest.mark.parametrize("style", STYLES)
def test_onnx_export_records_the_eager_math(style, tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    model = fuse_layers(make(style)).eval()
    path = tmp_path / "layers.onnx"
    torch.onnx.export(model, (torch.randn(1, 3, 9, 11),), str(path), dynamo=True)
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert "Conv" in ops and not any(name in op for op in ops
                                     for name in ("conv_bn_act", "bn_act_pool")), ops


def test_timm_freeze_helper_swaps_the_folded_batchnorm_and_the_pair_runs_eager():
    """timm's freeze_batch_norm_2d finds the folded BatchNormAct2d (an instance of its class)
    and swaps it for FrozenBatchNormAct2d: the conv place then runs the conv alone, the frozen
    BN applies itself, as in the frozen eager model."""
    from timm.layers import freeze_batch_norm_2d
    torch.manual_seed(0)
    original = timm_model("efficientnet_b0")
    randomize_bn_state(original, batches_tracked=3)
    converted = fm.convert(original)
    assert isinstance(converted.bn1, BatchNormAct2d)
    eager, fused = freeze_batch_norm_2d(original).train(), freeze_batch_norm_2d(converted).train()
    reasons = {b.path: (b.status, b.reason) for b in fm.convert_report(fused).layers}
    assert reasons["conv_stem+bn1"][0] == "eager"
    assert "swapped for FrozenBatchNormAct2d" in reasons["conv_stem+bn1"][1]
    x = torch.randn(2, 3, 64, 64)
    ref = copy.deepcopy(eager).double()(x.double())
    assert_close_by_rule(fused(x), eager(x), ref, torch.float32, "frozen timm output")


@pytest.mark.parametrize("style", STYLES)
def test_state_dicts_load_both_ways_and_pickle(style):
    import io
    original = make(style).eval()
    fused = fuse_layers(original)
    assert list(original.state_dict()) == list(fused.state_dict())
    shifted = make(style)
    with torch.no_grad():
        for p in shifted.parameters():
            p.add_(1.0)
    fused.load_state_dict(shifted.state_dict())  # strict
    back = make(style)
    back.load_state_dict(fused.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(shifted.state_dict().values(),
                                                 back.state_dict().values()))
    buffer = io.BytesIO()
    torch.save(fused, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    copied = copy.deepcopy(fused)
    x = torch.randn(2, 3, 9, 11)
    with torch.no_grad():
        expected = fused.eval()(x)
        for other in (loaded, copied):
            assert all(m.eager_reason() is None for m in other.modules()
                       if isinstance(m, (fm.FusedConvBNAct, fm.FusedPairConv)))
            torch.testing.assert_close(other.eval()(x), expected, rtol=0, atol=0)
    copied.train()(x).sum().backward()  # the copy owns its parameters
    assert all(p.grad is None for p in fused.parameters())


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("style", STYLES)
def test_compile_fullgraph_without_graph_breaks(style, training):
    assert_compiles_fullgraph_like_eager(fuse_layers(make(style)).train(training),
                                         torch.randn(2, 3, 9, 11, requires_grad=True))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("style", STYLES)
def test_autocast_bfloat16_matches_eager_autocast(style, training):
    original = make(style).train(training)
    fused, reference = fuse_layers(original), copy.deepcopy(original).double()
    x = torch.randn(2, 3, 9, 11)
    outs = []
    for model in (fused, original):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        out.float().square().sum().backward()
        outs.append(out)
    ref = reference(x.double())
    ref.square().sum().backward()
    assert outs[0].dtype == outs[1].dtype
    assert_close_by_rule(outs[0].float(), outs[1].float(), ref, torch.bfloat16, "output")
    assert_autocast_grads_by_rule(fused, original, reference, torch.bfloat16)


@pytest.mark.parametrize("style", STYLES)
def test_export_eval(style):
    model = fuse_layers(make(style)).eval()
    program = torch.export.export(model, (torch.randn(2, 3, 9, 11),))
    x = torch.randn(2, 3, 9, 11)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x))
