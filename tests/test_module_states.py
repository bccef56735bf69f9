"""Fused blocks against eager PyTorch in every module state a user puts a model in: per-BN
training flags (frozen, mixed), BatchNorms without running statistics or affine parameters,
cumulative momentum, frozen parameters and inputs, activation checkpointing, empty batches.

Each case runs a float64 eager copy, the float32 eager model and a float32 fused copy of it on
the same inputs and grad_outputs; every output, gradient and buffer of the fused model is held
to the suite's tolerance rule. Counts (num_batches_tracked), and every buffer eager leaves
untouched, must match exactly; a gradient eager leaves None must stay None."""

import copy

import pytest
import timm
import torch
import torch.nn as nn
from timm.models._efficientnet_builder import decode_arch_def
from timm.models.efficientnet import EfficientNet
from torch.utils.checkpoint import checkpoint

import fused_mbconv as fm
from fused_mbconv.backends import TABLE, backend_status, implements
from fused_mbconv.ops.mbconv import KERNELS
from parity import check, fuse, randomize_bn_state
from tolerances import NETWORK_GRADIENT_ROUNDS

# Every backend that runs CPU tensors ("triton" under TRITON_INTERPRET=1, when chosen).
CPU_BACKENDS = [b.name for b in TABLE if b.runs("cpu")]
# (in, out, kernel, stride, expand): a residual block with expansion and stochastic depth,
# and a stride-2 block without expansion.
BLOCKS = {"res": (16, 16, 3, 1, 4), "s2": (16, 24, 3, 2, 1)}


@pytest.fixture(params=CPU_BACKENDS)
def backend(request):
    usable, reason = backend_status(request.param, "cpu")
    if not usable:
        pytest.skip(f"backend {request.param!r} unavailable: {reason}")
    if not implements(request.param, KERNELS):
        pytest.skip(f"backend {request.param!r} lacks block kernels")
    return request.param


@pytest.fixture(params=BLOCKS)
def block_name(request):
    return request.param


def make_block(name, **bn_kwargs):
    """fm.MBConv whose BatchNorms are nn.BatchNorm2d(c, **bn_kwargs)."""
    block = fm.MBConv(*BLOCKS[name], drop_path=0.2)
    for child, m in list(block.named_children()):
        if isinstance(m, nn.BatchNorm2d):
            setattr(block, child, nn.BatchNorm2d(m.num_features, **bn_kwargs))
    randomize_bn_state(block, batches_tracked=3)
    return block


def block_input(name, n=2):
    return torch.randn(n, BLOCKS[name][0], 7, 7, requires_grad=True)


def bn_flags(training, bn_training):
    """model.train(training), then the i-th BatchNorm's own flag bn_training(i)."""
    def state(model):
        model.train(training)
        bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        for i, bn in enumerate(bns):
            bn.train(bn_training(i))
    return state


BN_STATES = {
    "frozen-bn": bn_flags(True, lambda i: False),  # model.apply(freeze_bn), as detectors do
    "mixed-bn": bn_flags(True, lambda i: i % 2 == 1),  # res: dw BN trains; s2: project BN
    "eval-block-train-bn": bn_flags(False, lambda i: True),
}


@pytest.mark.parametrize("state", BN_STATES)
def test_per_batchnorm_training_flags(block_name, state, backend):
    check(make_block(block_name), [block_input(block_name)], f"{block_name} {state}", backend,
          BN_STATES[state])


BN_VARIANTS = {
    "untracked": dict(track_running_stats=False),  # batch statistics in eval too
    "no-affine": dict(affine=False),
}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("variant", BN_VARIANTS)
def test_batchnorm_without_running_stats_or_affine(block_name, variant, training, backend):
    check(make_block(block_name, **BN_VARIANTS[variant]), [block_input(block_name)],
          f"{block_name} {variant} {'train' if training else 'eval'}", backend,
          lambda m: m.train(training))


def test_cumulative_momentum(block_name, backend):
    """momentum=None: each update weighs the batch by 1/num_batches_tracked (3 before)."""
    inputs = [block_input(block_name) for _ in range(3)]
    check(make_block(block_name, momentum=None), inputs, f"{block_name} momentum=None",
          backend, lambda m: m.train(), stat_rounds=len(inputs))


# Name prefixes of what does not require grad ("input": the block's input).
FROZEN = {
    "bn-params": ("expand_bn.", "dw_bn.", "project_bn."),
    "expand-and-dw-conv": ("expand_conv.", "dw_conv."),
    "input": ("input",),
    "all-but-project-conv": ("input", "expand_", "dw_", "se.", "project_bn."),
}


@pytest.mark.parametrize("frozen", FROZEN)
def test_frozen_parameters_and_input(block_name, frozen, backend):
    prefixes = FROZEN[frozen]

    def state(model):
        model.train()
        for name, p in model.named_parameters():
            p.requires_grad_(not name.startswith(prefixes))

    x = block_input(block_name).requires_grad_("input" not in prefixes)
    check(make_block(block_name), [x], f"{block_name} frozen {frozen}", backend, state)


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_checkpoint(block_name, reentrant, backend):
    """The recompute updates the running statistics a second time, in eager as in fused;
    preserve_rng_state redraws the same drop-path mask. (Reentrant checkpointing needs an
    input that requires grad: block_input's does.)"""
    check(make_block(block_name), [block_input(block_name)],
          f"{block_name} checkpoint(use_reentrant={reentrant})", backend, lambda m: m.train(),
          forward=lambda m, x: checkpoint(m, x, use_reentrant=reentrant), stat_rounds=2)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_empty_batch(block_name, training, backend):
    """N=0: where eager returns an empty output, the same empty output, gradients and state
    (a training BN counts the batch); where eager raises, the same exception and state."""
    eager, x = make_block(block_name), block_input(block_name, n=0)
    what = f"{block_name} N=0 {'train' if training else 'eval'}"
    probe = copy.deepcopy(eager).train(training)
    try:
        probe(x)
    except Exception as exc:
        fused = fuse(eager).train(training)
        with fm.use_backend(backend), pytest.raises(type(exc)):
            fused(x)
        for (name, b), p in zip(fused.named_buffers(), probe.buffers()):
            assert torch.equal(b, p), f"{what} [{backend}] {name}: differs from eager's"
        return
    check(eager, [x], what, backend, lambda m: m.train(training))


def b0_tiny():
    """timm's EfficientNet with B0's block kinds (depthwise-separable, inverted residual with
    and without skip; SE, SiLU, drop path) at few channels: small enough for the Triton
    interpreter."""
    arch = decode_arch_def([["ds_r1_k3_s1_e1_c8_se0.25"], ["ir_r2_k3_s2_e4_c16_se0.25"]])
    return EfficientNet(arch, num_classes=10, num_features=32, stem_size=8, act_layer=nn.SiLU,
                        drop_path_rate=0.2)


NETWORKS = {  # constructor, input resolution (B0's last stage keeps 2x2 positions at 64)
    "efficientnet_b0": (lambda: timm.create_model("efficientnet_b0", num_classes=10,
                                                  drop_path_rate=0.2), 64),
    "b0-tiny": (b0_tiny, 32),
}
NETWORK_STATES = {
    "frozen-bn": BN_STATES["frozen-bn"],
    "mixed-bn": BN_STATES["mixed-bn"],  # every other BN, so within blocks too
    "grad-checkpointing": lambda m: m.train().set_grad_checkpointing(True),
}


# The Triton interpreter takes ~6 minutes per forward + backward of the full B0 here: it runs
# the tiny network only.
@pytest.mark.parametrize("network, backend", [
    (n, b) for n in NETWORKS for b in CPU_BACKENDS if (n, b) != ("efficientnet_b0", "triton")],
    indirect=["backend"])
@pytest.mark.parametrize("state", NETWORK_STATES)
def test_converted_timm_network(network, state, backend):
    build, size = NETWORKS[network]
    model = build()
    randomize_bn_state(model, batches_tracked=3)
    check(model, [torch.randn(2, 3, size, size)], f"timm {network} {state}", backend,
          NETWORK_STATES[state], grad_rounds=NETWORK_GRADIENT_ROUNDS,
          stat_rounds=2 if state == "grad-checkpointing" else 1)
