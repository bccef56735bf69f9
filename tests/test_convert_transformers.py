"""Hugging Face transformers models: EfficientNet, MobileNetV2 and MobileViT built from their
configs (random weights, nothing downloaded), converted, and checked against the originals
like the timm and torchvision models in test_convert."""

import copy
import importlib.util

import pytest
import torch

import fused_mbconv as fm
from fused_mbconv.convert import NotFusable, iter_blocks, recognize
from fused_mbconv.verification import build_hf_model
from parity import randomize_bn_state
from test_convert import check_converted_training
from tolerances import assert_close_by_rule

if importlib.util.find_spec("transformers") is None:
    pytest.skip("transformers is not installed", allow_module_level=True)
try:
    import transformers  # noqa: F401
except ImportError as exc:  # installed but broken: a failure, not a skip
    raise ImportError(f"transformers is installed but does not import ({exc}); from the "
                      f"repository root, run `pytest` rather than `python -m pytest`: the "
                      f"repository's kernels/ directory then shadows the `kernels` package "
                      f"transformers imports") from exc


def efficientnet_b0(**config):
    return build_hf_model("efficientnet_b0", **config).model


# B0's stride-2 blocks (encoder block numbers): listed in depthwise_padding, they pad
# symmetrically (ZeroPad2d(k//2)) instead of TF-style (0, 1, 0, 1).
B0_STRIDE2_BLOCKS = [1, 3, 5, 11]

# (constructor, blocks that must be fusable, unfusable blocks' reasons must contain)
MODELS = {
    "hf:efficientnet_b0": (lambda: build_hf_model("efficientnet_b0"), 16, {}),
    "hf:efficientnet_b0_symmetric": (
        lambda: build_hf_model("efficientnet_b0", depthwise_padding=B0_STRIDE2_BLOCKS), 16, {}),
    "hf:mobilenet_v2": (lambda: build_hf_model("mobilenet_v2"), 16, {}),
    "hf:mobilenet_v2_no_tf_padding": (
        lambda: build_hf_model("mobilenet_v2", tf_padding=False), 16, {}),
    "hf:mobilevit_s": (lambda: build_hf_model("mobilevit_s"), 7, {}),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_recognizers_count_fusable_and_unfusable_blocks(name):
    build, fusable, unfusable = MODELS[name]
    reasons = []
    for _, block in iter_blocks(build()):
        try:
            recognize(block)
        except NotFusable as e:
            reasons.append(str(e))
    report = fm.convert_report(fm.convert(build()))
    assert len(report.converted) == fusable, str(report)
    assert len(reasons) == sum(unfusable.values()), reasons
    for needle, count in unfusable.items():
        assert sum(needle in r for r in reasons) == count, (needle, reasons)


def test_tf_padded_stride2_blocks_fuse_and_run_eager_on_odd_maps():
    """HF's stride-2 blocks pad (0, 1, 0, 1) (k=3) or (1, 2, 1, 2) (k=5) before a "valid"
    conv: on even maps that is the kernels' output size, on odd ones one row and column less,
    where the converted block runs its eager forward."""
    model = efficientnet_b0()
    converted = fm.convert(copy.deepcopy(model))
    pads = [(path, block.spec().dw_pad) for path, block in iter_blocks(converted)
            if isinstance(block, fm.FusedMBConv) and block.spec().dw_pad is not None]
    assert sorted({pad for _, pad in pads}) == [(0, 1, 0, 1), (1, 2, 1, 2)], pads
    path = pads[0][0]
    fused, eager = converted.get_submodule(path), model.get_submodule(path)
    calls = []
    fused.eager_block = lambda: calls.append(1) or eager
    for size, eager_calls in ((8, 0), (9, 1)):
        x = torch.randn(2, fused.in_channels, size, size)
        with torch.no_grad():
            assert fused.eval()(x).shape == eager.eval()(x).shape
        assert len(calls) == eager_calls, size


# Two SGD steps against a float64 copy, HF's branch dropout drawn in every residual block;
# EfficientNet's and MobileNetV2's stride-2 blocks pad TF-style.
@pytest.mark.parametrize("name", ["hf:efficientnet_b0", "hf:mobilenet_v2", "hf:mobilevit_s"])
def test_converted_model_trains_like_the_original(name):
    check_converted_training(name, case=MODELS[name])


@pytest.mark.parametrize("name", ["hf:efficientnet_b0", "hf:mobilenet_v2", "hf:mobilevit_s"])
def test_state_dict_is_unchanged(name):
    torch.manual_seed(0)
    model = MODELS[name][0]()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    converted = fm.convert(model)
    after = converted.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert fm.convert_report(fm.revert(converted)).convertible  # reverted: eager blocks again


def test_branch_dropout_matches_eager_with_the_same_random_stream():
    """HF EfficientNet drops branch elements (nn.Dropout) before the residual add: the fused
    block runs the branch fused, then the same dropout draw, then the add."""
    torch.manual_seed(0)
    model = efficientnet_b0()
    randomize_bn_state(model)
    path, block = next((p, b) for p, b in iter_blocks(model) if b.projection.apply_dropout)
    block.projection.dropout.p = 0.5
    fused = fm.convert(copy.deepcopy(block))
    assert isinstance(fused, fm.FusedMBConv) and fused.eager_reason() is None
    reference = copy.deepcopy(block).double()
    x = torch.randn(2, fused.in_channels, 8, 8)
    grad = torch.randn(2, fused.out_channels, 8, 8)
    results = []
    for module, dtype in ((fused, torch.float32), (block, torch.float32),
                          (reference, torch.float64)):
        module.train()
        xx = x.to(dtype).clone().requires_grad_()
        torch.manual_seed(7)
        out = module(xx)
        out.backward(grad.to(dtype))
        results.append((out.detach(), xx.grad))
    (f_out, f_grad), (e_out, e_grad), (r_out, r_grad) = results
    # half the branch dropped: a mask differing from eager's would fail by O(1)
    assert ((e_out - x).abs() < 1e-6).float().mean() > 0.2
    assert_close_by_rule(f_out, e_out, r_out, torch.float32, f"{path} output")
    assert_close_by_rule(f_grad, e_grad, r_grad, torch.float32, f"{path} input grad")


def test_default_config_b7_fuses_every_block():
    report = fm.convert_report(build_hf_model("efficientnet_b7"))
    assert (len(report.convertible), len(report.blocks)) == (55, 55), str(report)
