import copy

import pytest
import torch
import torch.nn as nn

import fused_mbconv as fm

PUBLISHED_PARAMETERS = {
    "efficientnet_b0": 5_288_548,
    "efficientnet_b1": 7_794_184,
    "efficientnet_b2": 9_109_994,
    "efficientnet_b3": 12_233_232,
    "efficientnet_b4": 19_341_616,
    "efficientnet_b5": 30_389_784,
    "efficientnet_b6": 43_040_704,
    "efficientnet_b7": 66_347_960,
}
RESOLUTIONS = dict(zip(PUBLISHED_PARAMETERS, (224, 240, 260, 300, 380, 456, 528, 600)))


@pytest.mark.parametrize("name", PUBLISHED_PARAMETERS)
def test_parameter_count_matches_published(name):
    model = getattr(fm, name)()
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAMETERS[name]


@pytest.mark.parametrize("name", PUBLISHED_PARAMETERS)
def test_output_shape_at_native_resolution(name):
    model = getattr(fm, name)(num_classes=10).eval()
    assert model.resolution == RESOLUTIONS[name]
    with torch.no_grad():
        out = model(torch.randn(1, 3, model.resolution, model.resolution))
    assert out.shape == (1, 10)
    assert torch.isfinite(out).all()


def test_b0_stage_layout():
    model = fm.efficientnet_b0()
    blocks = [b for stage in model.stages for b in stage]
    assert [len(stage) for stage in model.stages] == [1, 2, 2, 3, 3, 4, 1]
    assert [(b.kernel_size, b.stride, b.out_channels) for b in blocks[:3]] == \
        [(3, 1, 16), (3, 2, 24), (3, 1, 24)]
    # SE squeeze width comes from the block input channels, not the expanded ones.
    assert blocks[1].se.fc1.out_channels == 16 // 4
    assert blocks[1].se.fc1.in_channels == 96
    # Stochastic depth grows linearly with the block index, from 0.
    probs = [b.drop_path.p for b in blocks]
    assert probs[0] == 0.0 and probs == sorted(probs) and probs[-1] == pytest.approx(0.2 * 15 / 16)


def test_matches_torchvision_with_same_weights():
    torchvision = pytest.importorskip("torchvision")
    ours = fm.efficientnet_b0().eval()
    theirs = torchvision.models.efficientnet_b0().eval()
    ours_sd, theirs_sd = ours.state_dict(), theirs.state_dict()
    assert [v.shape for v in ours_sd.values()] == [v.shape for v in theirs_sd.values()]
    ours.load_state_dict(dict(zip(ours_sd, theirs_sd.values())))
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-4)


def test_compound_scaling():
    depth, width, resolution = fm.compound_scaling(1)
    assert (depth, width, resolution) == pytest.approx((1.2, 1.1, 1.15))
    assert depth * width ** 2 * resolution ** 2 == pytest.approx(2.0, rel=0.05)
    assert fm.compound_scaling(0) == (1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="phi"):
        fm.compound_scaling(-1)


def test_train_and_eval_behaviour():
    model = fm.efficientnet_b0(num_classes=10)
    x = torch.randn(2, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
    model.train()
    before = model.stem[1].running_mean.clone()
    with torch.no_grad():
        a, b = model(x), model(x)
    assert not torch.equal(a, b)  # dropout and stochastic depth are random in training
    assert not torch.equal(before, model.stem[1].running_mean)


def test_stochastic_depth_only_in_training():
    block = fm.MBConv(16, 16, 3, 1, 6, drop_path=0.5)
    block.eval()
    x = torch.randn(64, 16, 5, 5)
    with torch.no_grad():
        branch = block(x) - x  # eval: the full branch, never dropped
        assert (branch.flatten(1).abs().sum(1) > 0).all()
        block.train()
        out = block(x) - x
    dropped = out.flatten(1).abs().sum(1) == 0
    assert 0 < dropped.sum() < 64  # some samples dropped, some kept
    kept = ~dropped
    # Kept samples are rescaled by 1/(1-p); checked against the eval branch with train BN.
    block.drop_path.p = 0.0
    with torch.no_grad():
        full = block(x) - x
    torch.testing.assert_close(out[kept], full[kept] * 2.0)


def test_state_dict_round_trip():
    a = fm.efficientnet_b0(num_classes=10)
    a.train()
    a(torch.randn(2, 3, 64, 64))  # move running stats off their initial values
    b = fm.efficientnet_b0(num_classes=10)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    a.eval(), b.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
    assert a.state_dict().keys() == b.state_dict().keys()


def test_fused_flag_builds_fused_blocks():
    eager, fused = fm.efficientnet_b0(), fm.efficientnet_b0(fused=True)
    blocks = [b for stage in fused.stages for b in stage]
    assert len(blocks) == 16 and all(type(b) is fm.FusedMBConv for b in blocks)
    assert not any(type(m) is fm.MBConv for m in fused.modules())
    assert fused.state_dict().keys() == eager.state_dict().keys()


@pytest.mark.parametrize("kwargs, argument", [
    (dict(kernel_size=4), "kernel_size"),
    (dict(kernel_size=0), "kernel_size"),
    (dict(kernel_size=-3), "kernel_size"),
    (dict(stride=3), "stride"),
    (dict(stride=0), "stride"),
    (dict(in_channels=0), "in_channels"),
    (dict(out_channels=-8), "out_channels"),
    (dict(expand_ratio=0.5), "expand_ratio"),
    (dict(se_ratio=1.5), "se_ratio"),
    (dict(drop_path=1.0), "drop_path"),
    (dict(activation="gelu"), "activation"),
    (dict(bn_eps=0.0), "bn_eps"),
])
def test_bad_block_arguments_name_the_argument(kwargs, argument):
    args = dict(in_channels=16, out_channels=24, kernel_size=3, stride=1, expand_ratio=6)
    args.update(kwargs)
    with pytest.raises(ValueError, match=argument):
        fm.MBConv(**args)


@pytest.mark.parametrize("kwargs, argument", [
    (dict(width_mult=0), "width_mult"),
    (dict(depth_mult=-1), "depth_mult"),
    (dict(num_classes=0), "num_classes"),
    (dict(dropout=1.0), "dropout"),
    (dict(stochastic_depth_prob=-0.1), "stochastic_depth_prob"),
])
def test_bad_network_arguments_name_the_argument(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        fm.EfficientNet(**kwargs)


def test_network_rejects_wrong_input_shape():
    with pytest.raises(ValueError, match="shape"):
        fm.efficientnet_b0()(torch.randn(1, 1, 32, 32))


def test_block_without_expansion_or_se():
    block = fm.MBConv(32, 16, 3, 1, expand_ratio=1, se_ratio=0)
    assert block.expand_conv is None and block.se is None
    assert block(torch.randn(2, 32, 8, 8)).shape == (2, 16, 8, 8)
    assert isinstance(fm.MBConv(16, 16, 3, 1, 6).drop_path, nn.Module)
