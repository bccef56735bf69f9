"""Converted models under the tools users put them through: the meta device and fake tensors,
torch.fx tracing (torch's, torchvision's and timm's feature extraction), TorchScript."""

import copy

import pytest
import timm
import torch
import torch.nn as nn
import torchvision
from torch._subclasses.fake_tensor import FakeTensorMode

import fused_mbconv as fm
from fused_mbconv.accounting import record_launches

RESOLUTION = 64


@pytest.fixture(scope="module")
def timm_pair():
    original = timm.create_model("efficientnet_b0", num_classes=10).eval()
    converted = fm.convert(original)
    assert len(fm.convert_report(converted).converted) == 16
    return original, converted


def fused_paths(model):
    return [name for name, m in model.named_modules() if isinstance(m, fm.FusedMBConv)]


def test_meta_device_forward_returns_shapes_and_launches_nothing(timm_pair):
    original, converted = timm_pair
    for training in (False, True):
        model = copy.deepcopy(converted).to("meta").train(training)
        x = torch.randn(2, 3, RESOLUTION, RESOLUTION, device="meta")
        with record_launches() as launches:
            out = model(x)
        assert out.device.type == "meta" and out.shape == (2, 10)
        assert launches == []


def test_fake_tensor_forward_and_backward():
    with FakeTensorMode():
        model = timm.create_model("efficientnet_b0", num_classes=10).train()
        model = fm.convert(model, inplace=True)  # a deepcopy cannot copy fake tensors
        out = model(torch.randn(2, 3, RESOLUTION, RESOLUTION))
        out.sum().backward()
    assert len(fm.convert_report(model).converted) == 16
    assert out.shape == (2, 10)
    assert model.blocks[1][0].conv_pw.weight.grad.shape == (96, 16, 1, 1)


def test_fx_symbolic_trace_keeps_each_fused_block_one_node(timm_pair):
    _, converted = timm_pair
    traced = torch.fx.symbolic_trace(converted)
    called = [n.target for n in traced.graph.nodes if n.op == "call_module"]
    paths = fused_paths(converted)
    assert [p for p in called if p in paths] == paths
    assert not any(p.startswith(tuple(f"{q}." for q in paths)) for p in called)
    x = torch.randn(2, 3, RESOLUTION, RESOLUTION)
    torch.testing.assert_close(traced(x), converted(x), rtol=0, atol=0)


def test_fx_tracing_a_fused_block_itself_records_its_eager_ops():
    block = fm.convert(nn.Sequential(fm.MBConv(8, 8, 3, 1, 4)))[0].eval()
    traced = torch.fx.symbolic_trace(block)
    assert any(n.target == "dw_conv" for n in traced.graph.nodes)
    x = torch.randn(2, 8, 6, 6)
    torch.testing.assert_close(traced(x), block(x), rtol=1e-5, atol=1e-5)


def test_torchvision_feature_extractor(timm_pair):
    from torchvision.models.feature_extraction import create_feature_extractor
    tv = fm.convert(torchvision.models.efficientnet_b0(num_classes=10)).eval()
    extractor = create_feature_extractor(tv, return_nodes={"features.3": "c3",
                                                           "features.5.1": "c5"})
    x = torch.randn(2, 3, RESOLUTION, RESOLUTION)
    features = extractor(x)
    torch.testing.assert_close(features["c3"], tv.features[:4](x), rtol=0, atol=0)
    torch.testing.assert_close(features["c5"], tv.features[5][:2](tv.features[:5](x)),
                               rtol=0, atol=0)


def test_timm_fx_feature_extraction(timm_pair):
    original, converted = timm_pair
    graph = timm.models.FeatureGraphNet(copy.deepcopy(converted), out_indices=(1, 2, 3, 4))
    assert sum(isinstance(m, fm.FusedMBConv) for m in graph.modules()) > 0
    reference = timm.models.FeatureGraphNet(copy.deepcopy(original), out_indices=(1, 2, 3, 4))
    x = torch.randn(2, 3, RESOLUTION, RESOLUTION)
    for got, want in zip(graph(x), reference(x), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_torchscript_scripts_the_eager_blocks(timm_pair):
    original, converted = timm_pair
    with pytest.warns(UserWarning, match="scripting its eager InvertedResidual"):
        scripted = torch.jit.script(copy.deepcopy(converted))
    x = torch.randn(2, 3, RESOLUTION, RESOLUTION)
    torch.testing.assert_close(scripted(x), original(x), rtol=0, atol=0)
