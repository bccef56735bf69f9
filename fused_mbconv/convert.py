"""Drop-in conversion of existing models: find MBConv-style blocks, describe each one as an
``MBConvSpec`` (or say why it can't be fused), and swap it for ``FusedMBConv``.

Recognizers read a block's structure exactly as its library builds and runs it
(torchvision's EfficientNet/MobileNetV2/V3/MNASNet blocks, timm ``InvertedResidual`` /
``DepthwiseSeparableConv``, transformers' EfficientNet/MobileNetV2/MobileViT blocks, this
package's ``MBConv``); anything the fused block cannot express is refused with a reason.
Third-party classes are matched by qualified name, so none of those libraries is imported
here.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Tuple, Union

import torch.nn as nn

from .activations import ACTIVATIONS, GATES
from .blocks import MBConv, MBConvSpec, SqueezeExcite, StochasticDepth
from .distributed import ProcessGroupStatsSync, SyncBatchNorm, sync_enabled
from .functional import DwPadding, dw_padding_fits
from .fused_block import (DEFAULT_RECOMPUTE, FusedMBConv, check_recompute,
                          register_block_type)


class NotFusable(ValueError):
    """A block that the fused block cannot express; ``str(exc)`` is the reason."""


def qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


_TV = "torchvision.models.efficientnet."
_TVM = "torchvision.models."
_TIMM = "timm.models._efficientnet_blocks."
_HF = "transformers.models."
_HF_EFFICIENTNET = _HF + "efficientnet.modeling_efficientnet."

# Activation / gate classes by qualified name. timm's and transformers' own classes compute the
# same function as torch's (checked against their source); timm's *Me variants only differ in
# autograd memory.
_ACTIVATION_NAMES: Dict[str, str] = {qualified_name(c): n for n, c in ACTIVATIONS.items()}
_ACTIVATION_NAMES.update({
    "timm.layers.activations.Swish": "silu",
    "timm.layers.activations_me.SwishMe": "silu",
    "timm.layers.activations.HardSwish": "hardswish",
    "timm.layers.activations_me.HardSwishMe": "hardswish",
    "transformers.activations.SiLUActivation": "silu",
})
_GATE_NAMES: Dict[str, str] = {qualified_name(c): n for n, c in GATES.items()}
_GATE_NAMES.update({
    "timm.layers.activations.Sigmoid": "sigmoid",
    "timm.layers.activations.HardSigmoid": "hardsigmoid",
    "timm.layers.activations_me.HardSigmoidMe": "hardsigmoid",
})

_BATCH_NORMS = {qualified_name(nn.BatchNorm2d), "timm.layers.norm_act.BatchNormAct2d"}

# nn.Conv2d subclasses that pad TensorFlow-SAME style at run time before an unpadded conv:
# their depthwise convs fuse with dw_pad "same".
_SAME_PADDING_CONVS = {"timm.layers.conv2d_same.Conv2dSame"}

# Conv classes the fused kernels cannot run, and why.
_CONV_REASONS = {
    "timm.layers.mixed_conv2d.MixedConv2d":
        "MixedConv2d: channels split into groups, each with its own conv (mixed kernels)",
    "timm.layers.cond_conv2d.CondConv2d":
        "CondConv2d (per-sample mixture of expert kernels)",
}


def _type_name(module: nn.Module) -> str:
    return type(module).__name__


def _is_identity(module: Optional[nn.Module]) -> bool:
    return module is None or type(module) is nn.Identity


def _named(module: nn.Module, names: Dict[str, str], supported, what: str, where: str) -> str:
    """The fused name of ``module``'s type in ``names``; NotFusable naming it if it has none."""
    name = names.get(qualified_name(type(module)))
    if name is None:
        raise NotFusable(f"{where}: unsupported {what} {_type_name(module)} "
                         f"(supported: {', '.join(sorted(supported))})")
    return name


def _activation(module: nn.Module, where: str) -> str:
    return _named(module, _ACTIVATION_NAMES, ACTIVATIONS, "activation", where)


def _gate(module: nn.Module, where: str) -> str:
    return _named(module, _GATE_NAMES, GATES, "SE gate", where)


def _norm_act(bn: nn.Module, where: str) -> Optional[str]:
    """The activation a timm ``BatchNormAct2d`` applies after normalizing (None: none)."""
    if not _is_identity(getattr(bn, "drop", None)):
        raise NotFusable(f"{where}: BatchNormAct2d with a drop layer "
                         f"({_type_name(bn.drop)}) between BN and activation")
    act = getattr(bn, "act", None)
    return None if _is_identity(act) else _activation(act, f"{where}.act")


def _drop_path(module: Optional[nn.Module], where: str) -> float:
    """Per-sample stochastic-depth probability of the residual branch."""
    if _is_identity(module):
        return 0.0
    name = qualified_name(type(module))
    if type(module) is StochasticDepth:
        return float(module.p)
    if name == "torchvision.ops.stochastic_depth.StochasticDepth":
        if module.mode != "row" and module.p > 0:
            raise NotFusable(f"{where}: StochasticDepth mode {module.mode!r} drops the whole "
                             f"batch; only per-sample ('row') is supported")
        return float(module.p)
    if name == "timm.layers.drop.DropPath":
        if not module.scale_by_keep and module.drop_prob > 0:
            raise NotFusable(f"{where}: DropPath without scale_by_keep is not supported")
        return float(module.drop_prob)
    raise NotFusable(f"{where}: unsupported stochastic-depth module {_type_name(module)}")


def _check_mean_pool(pool: nn.Module, where: str) -> None:
    """AdaptiveAvgPool2d(1) is the spatial mean the fused block computes."""
    if type(pool) is not nn.AdaptiveAvgPool2d or pool.output_size not in (1, (1, 1)):
        raise NotFusable(f"{where}: expected AdaptiveAvgPool2d(1), got {pool}")


def _squeeze_excite(se: Optional[nn.Module], where: str
                    ) -> Tuple[Optional[nn.Conv2d], Optional[nn.Conv2d], Optional[str],
                               Optional[str]]:
    """(fc1, fc2, inner activation, gate) of a squeeze-excite module, Nones when absent."""
    if _is_identity(se):
        return None, None, None, None
    name = qualified_name(type(se))
    if type(se) is SqueezeExcite:
        return (se.fc1, se.fc2, _activation(se.act, f"{where}.act"),
                _gate(se.gate, f"{where}.gate"))
    if name == "torchvision.ops.misc.SqueezeExcitation":
        _check_mean_pool(se.avgpool, f"{where}.avgpool")
        return (se.fc1, se.fc2, _activation(se.activation, f"{where}.activation"),
                _gate(se.scale_activation, f"{where}.scale_activation"))
    if name == _TIMM + "SqueezeExcite":
        return (se.conv_reduce, se.conv_expand, _activation(se.act1, f"{where}.act1"),
                _gate(se.gate, f"{where}.gate"))
    if name == _HF_EFFICIENTNET + "EfficientNetSqueezeExciteLayer":
        _check_mean_pool(se.squeeze, f"{where}.squeeze")
        return (se.reduce, se.expand, _activation(se.act_reduce, f"{where}.act_reduce"),
                _gate(se.act_expand, f"{where}.act_expand"))
    raise NotFusable(f"{where}: unsupported squeeze-excite module {_type_name(se)}")


# ---------------------------------------------------------------------------------------------
# Checks every recognizer's result goes through: the roles must be exactly what the fused
# kernels compute (plain zero-padded convs without bias, BatchNorm2d). A BatchNorm's state
# (training flag, affine, running statistics, momentum) is read at each call instead.

def _plain_conv(conv: Optional[nn.Module], role: str) -> nn.Conv2d:
    """``conv`` if it computes what nn.Conv2d does: nn.Conv2d, or a subclass that only sets
    other constructor defaults (Hugging Face's EfficientNetDepthwiseConv2d)."""
    if conv is None:
        raise NotFusable(f"{role}: missing")
    reason = _CONV_REASONS.get(qualified_name(type(conv)))
    if reason is not None:
        raise NotFusable(f"{role}: {reason}")
    cls = type(conv)
    if qualified_name(cls) in _SAME_PADDING_CONVS:
        return conv
    if not (issubclass(cls, nn.Conv2d) and cls.forward is nn.Conv2d.forward
            and cls._conv_forward is nn.Conv2d._conv_forward):
        raise NotFusable(f"{role}: {_type_name(conv)} is not a plain nn.Conv2d")
    return conv


def _padding(conv: nn.Conv2d) -> Tuple[int, int]:
    """The conv's (height, width) padding, with the "valid" and "same" spellings resolved
    (stride 1 and odd kernels: the only ones where "same" pads symmetrically)."""
    if conv.padding == "valid":
        return (0, 0)
    if conv.padding == "same":
        return tuple(d * (k - 1) // 2 for d, k in zip(conv.dilation, conv.kernel_size))
    return conv.padding


def _check_dw_padding(conv: nn.Conv2d, role: str, pad: DwPadding) -> None:
    """The depthwise conv's padding is one the fused block runs (``functional.DwPadding``):
    ``pad`` None, the conv's own k//2 on every side; "same", an unpadded conv whose input is
    padded TensorFlow-SAME style at run time; (left, right, top, bottom), a pad layer's before
    an unpadded conv, if it gives the kernels' output size on even-sized maps (others run
    eager)."""
    k, stride = conv.kernel_size[0], conv.stride[0]
    half = k // 2
    same_conv = qualified_name(type(conv)) in _SAME_PADDING_CONVS
    if same_conv and pad != "same":
        raise NotFusable(f"{role}: {_type_name(conv)} pads TF 'same' at run time, but the "
                         f"block is described with padding {pad!r}")
    if pad is None:
        if _padding(conv) != (half, half):
            raise NotFusable(f"{role}: padding {conv.padding} (only symmetric k//2 = {half}, "
                             f"TF 'same' or a pad layer)")
        return
    if _padding(conv) != (0, 0):
        raise NotFusable(f"{role}: padded at run time or by a pad layer, and by the conv "
                         f"({conv.padding})")
    if pad == "same":
        return
    for size in (16, 32):
        try:
            fits = dw_padding_fits(pad, size, size, k, stride)
        except ValueError as exc:
            raise NotFusable(f"{role}: pad layer: {exc}")
        if not fits:
            raise NotFusable(f"{role}: pad layer (left, right, top, bottom) = {tuple(pad)} "
                             f"gives another output size than ceil(size / stride) on a "
                             f"{size}x{size} map")


def _check_conv(conv: Optional[nn.Module], role: str, in_channels: int, out_channels: int,
                depthwise: bool, bias: bool, pad: DwPadding = None) -> None:
    _plain_conv(conv, role)
    if (conv.in_channels, conv.out_channels) != (in_channels, out_channels):
        raise NotFusable(f"{role}: expected {in_channels}->{out_channels} channels, got "
                         f"{conv.in_channels}->{conv.out_channels}")
    if conv.padding_mode != "zeros":
        raise NotFusable(f"{role}: padding_mode {conv.padding_mode!r} (only zero padding)")
    if conv.dilation != (1, 1):
        raise NotFusable(f"{role}: dilation {conv.dilation} (only 1)")
    if (conv.bias is not None) != bias:
        raise NotFusable(f"{role}: conv {'without' if bias else 'with'} bias, where the fused "
                         f"block has {'one' if bias else 'none'}")
    if depthwise:
        k = conv.kernel_size[0]
        if conv.groups != in_channels:
            raise NotFusable(f"{role}: groups={conv.groups}, not depthwise (groups={in_channels})")
        if conv.kernel_size != (k, k) or k % 2 == 0:
            raise NotFusable(f"{role}: kernel {conv.kernel_size} (only square, odd sizes)")
        _check_dw_padding(conv, role, pad)
        if conv.stride not in ((1, 1), (2, 2)):
            raise NotFusable(f"{role}: stride {conv.stride} (only 1 or 2)")
    elif (conv.kernel_size, conv.stride, _padding(conv), conv.groups) != (
            (1, 1), (1, 1), (0, 0), 1):
        raise NotFusable(f"{role}: expected a dense 1x1 stride-1 conv, got "
                         f"kernel {conv.kernel_size}, stride {conv.stride}, padding "
                         f"{conv.padding}, groups {conv.groups}")


def _check_bn(bn: Optional[nn.Module], role: str, channels: int) -> None:
    if bn is None:
        raise NotFusable(f"{role}: missing")
    if qualified_name(type(bn)) not in _BATCH_NORMS:
        if isinstance(bn, nn.SyncBatchNorm):
            raise NotFusable(f"{role}: already SyncBatchNorm; convert the model first, with "
                             f"convert(model, sync_bn=True)")
        raise NotFusable(f"{role}: {_type_name(bn)} is not BatchNorm2d")
    if bn.num_features != channels:
        raise NotFusable(f"{role}: {bn.num_features} features for {channels} channels")


def check_spec(spec: MBConvSpec, in_channels: int) -> MBConvSpec:
    """Raise ``NotFusable`` unless every role of ``spec`` is something the fused block runs."""
    hidden = spec.dw_conv.in_channels if isinstance(spec.dw_conv, nn.Conv2d) else None
    if spec.expand_conv is not None:
        _check_conv(spec.expand_conv, "expand conv", in_channels,
                    getattr(spec.expand_conv, "out_channels", -1), False, False)
        hidden = spec.expand_conv.out_channels
        _check_bn(spec.expand_bn, "expand BN", hidden)
    elif spec.expand_bn is not None:
        raise NotFusable("expand BN without an expand conv")
    elif hidden != in_channels:
        raise NotFusable(f"no expand conv, but the depthwise conv has {hidden} channels for "
                         f"{in_channels} inputs")
    _check_conv(spec.dw_conv, "depthwise conv", hidden, hidden, True, False, spec.dw_pad)
    _check_bn(spec.dw_bn, "depthwise BN", hidden)
    if (spec.stride, spec.kernel_size) != (spec.dw_conv.stride[0], spec.dw_conv.kernel_size[0]):
        raise NotFusable(f"spec stride/kernel ({spec.stride}, {spec.kernel_size}) disagree "
                         f"with the depthwise conv")
    if (spec.se_fc1 is None) != (spec.se_fc2 is None):
        raise NotFusable("squeeze-excite needs both fc1 and fc2")
    if spec.se_fc1 is not None:
        squeeze = getattr(spec.se_fc1, "out_channels", -1)
        _check_conv(spec.se_fc1, "SE fc1", hidden, squeeze, False, True)
        _check_conv(spec.se_fc2, "SE fc2", squeeze, hidden, False, True)
        if spec.se_activation not in ACTIVATIONS or spec.se_gate not in GATES:
            raise NotFusable(f"SE activation {spec.se_activation!r} / gate {spec.se_gate!r}")
    out_channels = getattr(spec.project_conv, "out_channels", -1)
    _check_conv(spec.project_conv, "project conv", hidden, out_channels, False, False)
    _check_bn(spec.project_bn, "project BN", out_channels)
    if spec.activation not in ACTIVATIONS:
        raise NotFusable(f"activation {spec.activation!r}")
    if spec.residual and (spec.stride != 1 or in_channels != out_channels):
        raise NotFusable(f"residual with stride {spec.stride}, {in_channels}->{out_channels}")
    if not 0.0 <= spec.drop_path < 1.0:
        raise NotFusable(f"drop_path {spec.drop_path} (must be in [0, 1))")
    if spec.branch_dropout is not None:
        if type(spec.branch_dropout) is not nn.Dropout:
            raise NotFusable(f"branch dropout {_type_name(spec.branch_dropout)} (only "
                             f"nn.Dropout)")
        if not spec.residual or spec.drop_path:
            raise NotFusable("branch dropout needs a residual block without stochastic depth")
    return spec


# ---------------------------------------------------------------------------------------------
# Recognizers, by qualified class name. Each returns an unchecked MBConvSpec and the block's
# input channels, or raises NotFusable.

Recognizer = Callable[[nn.Module], Tuple[MBConvSpec, int]]
_RECOGNIZERS: Dict[str, Recognizer] = {}

# Block classes that are not MBConv-with-depthwise blocks: listed in reports, never converted.
_UNFUSABLE_BLOCKS: Dict[str, str] = {
    _TV + "FusedMBConv": "EfficientNetV2 fused MBConv: a dense kxk expansion conv, no depthwise "
                         "stage to fuse",
    _TIMM + "EdgeResidual": "EfficientNetV2 fused MBConv: a dense kxk expansion conv, no "
                            "depthwise stage to fuse",
    _TIMM + "CondConvResidual": "CondConv: per-sample mixture of expert kernels",
    _TIMM + "ConvBnAct": "a single conv + BN + activation, not an inverted-residual block",
    _TIMM + "MobileAttention": "attention block",
}


def register_recognizer(qualname: str) -> Callable[[Recognizer], Recognizer]:
    """Register ``fn(block) -> (MBConvSpec, in_channels)`` for blocks of class ``qualname``."""
    def register(fn: Recognizer) -> Recognizer:
        _RECOGNIZERS[qualname] = fn
        return fn
    return register


@register_recognizer(qualified_name(MBConv))
def _fused_mbconv_block(block: MBConv) -> Tuple[MBConvSpec, int]:
    return block.spec(), block.in_channels


def _branch_spec(expand: Optional[Tuple[nn.Module, nn.Module]], dw_conv: nn.Module,
                 dw_bn: nn.Module, se: Optional[nn.Module], se_where: str,
                 project: Tuple[nn.Module, nn.Module], activation: str, residual: bool,
                 drop_path_module: Optional[nn.Module] = None, drop_path_where: str = "",
                 conv_names: Tuple[str, str] = ("expand conv", "depthwise conv"),
                 **extra) -> Tuple[MBConvSpec, int]:
    """The spec of an [expand conv, BN, act,] depthwise conv, BN, act, [SE,] project conv, BN
    branch (one activation throughout), and its input channels: what every recognizer
    builds. ``conv_names``: the expand and depthwise convs' names in the block, for reasons.
    Stochastic depth only counts with a residual."""
    dw_conv = _plain_conv(dw_conv, conv_names[1])
    if qualified_name(type(dw_conv)) in _SAME_PADDING_CONVS:
        extra.setdefault("dw_pad", "same")
    expand_conv, expand_bn = expand if expand is not None else (None, None)
    if expand_conv is not None:
        expand_conv = _plain_conv(expand_conv, conv_names[0])
    fc1, fc2, se_act, gate = _squeeze_excite(se, se_where)
    drop_path_module = drop_path_module if residual else None
    spec = MBConvSpec(
        expand_conv=expand_conv, expand_bn=expand_bn, dw_conv=dw_conv, dw_bn=dw_bn,
        se_fc1=fc1, se_fc2=fc2, project_conv=project[0], project_bn=project[1],
        stride=dw_conv.stride[0], kernel_size=dw_conv.kernel_size[0], residual=residual,
        drop_path=_drop_path(drop_path_module, drop_path_where) if residual else 0.0,
        drop_path_module=drop_path_module, activation=activation,
        se_activation=se_act or activation, se_gate=gate or "sigmoid", **extra)
    return spec, (expand_conv if expand_conv is not None else dw_conv).in_channels


def _same_activation(expand_act: Optional[str], dw_act: Optional[str], where: str) -> str:
    if dw_act is None:
        raise NotFusable(f"{where}: no activation after the depthwise BN")
    if expand_act is not None and expand_act != dw_act:
        raise NotFusable(f"{where}: expand activation {expand_act} differs from the depthwise "
                         f"activation {dw_act}; the fused block applies one activation to both")
    return dw_act


# ---------------------------------------------------------------------------------------------
# torchvision: EfficientNet's MBConv, MobileNetV2/V3's InvertedResidual and MNASNet's
# _InvertedResidual are the same branch as Sequentials (Conv2dNormActivation is one too).

_TV_SQUEEZE_EXCITE = "torchvision.ops.misc.SqueezeExcitation"


def _torchvision_spec(layers: nn.Sequential, where: str, residual: bool,
                      drop_path_module: Optional[nn.Module] = None) -> Tuple[MBConvSpec, int]:
    """The spec of a torchvision branch ``layers``: conv, BN and activation layers, nested one
    Sequential deep, in the order [expand conv, BN, act,] depthwise conv, BN, act, [SE,]
    project conv, BN."""
    flat = []
    for i, layer in enumerate(layers):
        if isinstance(layer, nn.Sequential):
            flat.extend((f"{where}.{i}.{j}", m) for j, m in enumerate(layer))
        else:
            flat.append((f"{where}.{i}", layer))

    def kind(module: nn.Module) -> str:
        if isinstance(module, nn.modules.conv._ConvNd):
            return "conv"
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            return "bn"
        return "se" if qualified_name(type(module)) == _TV_SQUEEZE_EXCITE else "act"

    kinds = " ".join(kind(m) for _, m in flat)
    if kinds not in {f"{e}conv bn act {s}conv bn" for e in ("", "conv bn act ")
                     for s in ("", "se ")}:
        raise NotFusable(f"{where}: expected [expand conv, BN, act,] depthwise conv, BN, act, "
                         f"[SE,] project conv, BN; got {kinds}")
    modules = [m for _, m in flat]
    names = [n for n, _ in flat]
    expanded = kinds.count("conv") == 3
    dw = 3 if expanded else 0
    expand_act = _activation(modules[2], names[2]) if expanded else None
    act = _same_activation(expand_act, _activation(modules[dw + 2], names[dw + 2]), where)
    has_se = " se " in kinds
    return _branch_spec(
        (modules[0], modules[1]) if expanded else None, modules[dw], modules[dw + 1],
        modules[dw + 3] if has_se else None, names[dw + 3] if has_se else "",
        (modules[-2], modules[-1]), act, residual, drop_path_module, "stochastic_depth",
        conv_names=(names[0], names[dw]))


@register_recognizer(_TV + "MBConv")
def _torchvision_mbconv(block: nn.Module) -> Tuple[MBConvSpec, int]:
    return _torchvision_spec(block.block, "block", bool(block.use_res_connect),
                             block.stochastic_depth)


@register_recognizer(_TVM + "mobilenetv3.InvertedResidual")
def _torchvision_mobilenet_v3(block: nn.Module) -> Tuple[MBConvSpec, int]:
    return _torchvision_spec(block.block, "block", bool(block.use_res_connect))


@register_recognizer(_TVM + "mobilenetv2.InvertedResidual")
def _torchvision_mobilenet_v2(block: nn.Module) -> Tuple[MBConvSpec, int]:
    return _torchvision_spec(block.conv, "conv", bool(block.use_res_connect))


@register_recognizer(_TVM + "mnasnet._InvertedResidual")
def _torchvision_mnasnet(block: nn.Module) -> Tuple[MBConvSpec, int]:
    return _torchvision_spec(block.layers, "layers", bool(block.apply_residual))


# ---------------------------------------------------------------------------------------------
# timm

def _timm_common(block: nn.Module) -> None:
    if getattr(block, "conv_s2d", None) is not None:
        raise NotFusable("space-to-depth stem (conv_s2d)")
    if not _is_identity(getattr(block, "aa", None)):
        raise NotFusable(f"anti-aliasing layer aa ({_type_name(block.aa)}) after the "
                         f"depthwise conv")


@register_recognizer(_TIMM + "DepthwiseSeparableConv")
def _timm_depthwise_separable(block: nn.Module) -> Tuple[MBConvSpec, int]:
    _timm_common(block)
    act = _same_activation(None, _norm_act(block.bn1, "bn1"), "bn1")
    if _norm_act(block.bn2, "bn2") is not None:
        raise NotFusable("bn2: activation after the pointwise projection (pw_act)")
    return _branch_spec(None, block.conv_dw, block.bn1, block.se, "se",
                        (block.conv_pw, block.bn2), act, bool(block.has_skip),
                        block.drop_path, "drop_path", conv_names=("", "conv_dw"))


@register_recognizer(_TIMM + "InvertedResidual")
def _timm_inverted_residual(block: nn.Module) -> Tuple[MBConvSpec, int]:
    _timm_common(block)
    expand_act = _norm_act(block.bn1, "bn1")
    if expand_act is None:
        raise NotFusable("bn1: no activation after the expand BN")
    act = _same_activation(expand_act, _norm_act(block.bn2, "bn2"), "bn2")
    if _norm_act(block.bn3, "bn3") is not None:
        raise NotFusable("bn3: activation after the pointwise projection")
    return _branch_spec((block.conv_pw, block.bn1), block.conv_dw, block.bn2, block.se, "se",
                        (block.conv_pwl, block.bn3), act, bool(block.has_skip),
                        block.drop_path, "drop_path", conv_names=("conv_pw", "conv_dw"))


def _conv_norm_act(layer: nn.Module, where: str) -> Tuple[nn.Module, nn.Module, Optional[str]]:
    """timm ConvNormAct: conv, BatchNormAct2d (and the activation inside it)."""
    if not _is_identity(getattr(layer, "aa", None)):
        raise NotFusable(f"{where}: anti-aliasing layer aa ({_type_name(layer.aa)}) after the "
                         f"conv")
    return layer.conv, layer.bn, _norm_act(layer.bn, f"{where}.bn")


@register_recognizer(_TIMM + "UniversalInvertedResidual")
def _timm_universal_inverted_residual(block: nn.Module) -> Tuple[MBConvSpec, int]:
    """MobileNetV4's block. Its inverted-bottleneck ("IB") form, expand, depthwise (dw_mid),
    project, is an MBConv block; the forms with a depthwise conv before the expansion
    (dw_start: "ExtraDW", "ConvNext") or after the projection (dw_end) are not."""
    for name, place in (("dw_start", "before the expand conv"),
                        ("dw_end", "after the projection")):
        layer = getattr(block, name)
        if not _is_identity(layer):
            kernel = "x".join(map(str, layer.conv.kernel_size))
            raise NotFusable(f"{name}: a second depthwise conv ({kernel}) {place}; the kernels "
                             f"fuse one depthwise conv, between expand and project")
    if _is_identity(block.dw_mid):
        raise NotFusable("dw_mid: no depthwise conv between expand and project (MobileNetV4 "
                         "FFN form)")
    if not _is_identity(block.layer_scale):
        raise NotFusable(f"layer_scale ({_type_name(block.layer_scale)}): a per-channel scale "
                         f"of the branch before the residual add")
    expand_conv, expand_bn, expand_act = _conv_norm_act(block.pw_exp, "pw_exp")
    if expand_act is None:
        raise NotFusable("pw_exp: no activation after the expand BN")
    dw_conv, dw_bn, dw_act = _conv_norm_act(block.dw_mid, "dw_mid")
    act = _same_activation(expand_act, dw_act, "dw_mid")
    project_conv, project_bn, project_act = _conv_norm_act(block.pw_proj, "pw_proj")
    if project_act is not None:
        raise NotFusable("pw_proj: activation after the pointwise projection")
    return _branch_spec((expand_conv, expand_bn), dw_conv, dw_bn, block.se, "se",
                        (project_conv, project_bn), act, bool(block.has_skip),
                        block.drop_path, "drop_path",
                        conv_names=("pw_exp.conv", "dw_mid.conv"))


# ---------------------------------------------------------------------------------------------
# Hugging Face transformers

@register_recognizer(_HF_EFFICIENTNET + "EfficientNetBlock")
def _hf_efficientnet(block: nn.Module) -> Tuple[MBConvSpec, int]:
    dw = block.depthwise_conv
    expand, expand_act = None, None
    if block.expand:
        layer = block.expansion
        expand = (layer.expand_conv, layer.expand_bn)
        expand_act = _activation(layer.expand_act, "expansion.expand_act")
    act = _same_activation(expand_act, _activation(dw.depthwise_act,
                                                   "depthwise_conv.depthwise_act"),
                           "depthwise_conv")
    projection = block.projection
    residual = bool(projection.apply_dropout)
    # At stride 2 the layer pads (ZeroPad2d) before a "valid" conv: asymmetrically unless the
    # config lists the block in depthwise_padding.
    pad = tuple(dw.depthwise_conv_pad.padding) if dw.stride == 2 else None
    return _branch_spec(
        expand, dw.depthwise_conv, dw.depthwise_norm, block.squeeze_excite, "squeeze_excite",
        (projection.project_conv, projection.project_bn), act, residual,
        conv_names=("expansion.expand_conv", "depthwise_conv.depthwise_conv"),
        branch_dropout=projection.dropout if residual else None, dw_pad=pad)


def _hf_conv_layer(layer: nn.Module, where: str, with_act: bool
                   ) -> Tuple[nn.Module, nn.Module, Optional[str]]:
    """MobileNetV2ConvLayer / MobileViTConvLayer: convolution, normalization, activation."""
    if layer.normalization is None:
        raise NotFusable(f"{where}: no normalization after the conv")
    if (layer.activation is not None) != with_act:
        raise NotFusable(f"{where}: {'no' if with_act else 'an'} activation after the BN")
    act = _activation(layer.activation, f"{where}.activation") if with_act else None
    return layer.convolution, layer.normalization, act


def _hf_inverted_residual(block: nn.Module, tf_padding: bool) -> Tuple[MBConvSpec, int]:
    """MobileNetV2's inverted residual (MobileViT's too): expand_1x1, conv_3x3, reduce_1x1.
    With ``tf_padding`` each conv pads TF-'SAME' style at run time: symmetric k//2 at stride
    1, but at stride 2 it depends on the input size."""
    expand_conv, expand_bn, expand_act = _hf_conv_layer(block.expand_1x1, "expand_1x1", True)
    dw_conv, dw_bn, dw_act = _hf_conv_layer(block.conv_3x3, "conv_3x3", True)
    act = _same_activation(expand_act, dw_act, "conv_3x3")
    project_conv, project_bn, _ = _hf_conv_layer(block.reduce_1x1, "reduce_1x1", False)
    return _branch_spec((expand_conv, expand_bn), dw_conv, dw_bn, None, "",
                        (project_conv, project_bn), act, bool(block.use_residual),
                        conv_names=("expand_1x1.convolution", "conv_3x3.convolution"),
                        dw_pad="same" if tf_padding else None)


@register_recognizer(_HF + "mobilenet_v2.modeling_mobilenet_v2.MobileNetV2InvertedResidual")
def _hf_mobilenet_v2(block: nn.Module) -> Tuple[MBConvSpec, int]:
    return _hf_inverted_residual(block, bool(block.expand_1x1.config.tf_padding))


@register_recognizer(_HF + "mobilevit.modeling_mobilevit.MobileViTInvertedResidual")
def _hf_mobilevit(block: nn.Module) -> Tuple[MBConvSpec, int]:
    return _hf_inverted_residual(block, False)


def _lookup(cls: type) -> Tuple[Optional[Recognizer], Optional[str]]:
    """(recognizer, None), (None, reason), or (None, None) for classes that are not blocks."""
    name = qualified_name(cls)
    if name in _RECOGNIZERS:
        return _RECOGNIZERS[name], None
    if name in _UNFUSABLE_BLOCKS:
        return None, _UNFUSABLE_BLOCKS[name]
    for base in cls.__mro__[1:]:
        base_name = qualified_name(base)
        if base_name in _UNFUSABLE_BLOCKS:
            return None, _UNFUSABLE_BLOCKS[base_name]
        if base_name in _RECOGNIZERS:
            if cls.forward is base.forward:
                return _RECOGNIZERS[base_name], None
            return None, (f"subclass of {base.__name__} with its own forward; its math may "
                          f"differ from {base.__name__}'s")
    return None, None


def is_block(module: nn.Module) -> bool:
    """Whether ``module`` is a block class conversion knows (fusable or not)."""
    recognizer, reason = _lookup(type(module))
    return recognizer is not None or reason is not None


def recognize(module: nn.Module) -> MBConvSpec:
    """The checked ``MBConvSpec`` of ``module``; raises ``NotFusable`` with the reason."""
    recognizer, reason = _lookup(type(module))
    if recognizer is None and reason is None:
        raise TypeError(f"{_type_name(module)} is not a known MBConv-style block")
    if recognizer is None:
        raise NotFusable(reason)
    try:
        spec, in_channels = recognizer(module)
    except AttributeError as e:  # a library version with a different layout
        raise NotFusable(f"unexpected {_type_name(module)} layout: {e}") from None
    return check_spec(spec, in_channels)


def iter_blocks(model: nn.Module, prefix: str = "") -> Iterator[Tuple[str, nn.Module]]:
    """(path, module) of every known block in ``model``, not descending into blocks."""
    if is_block(model):
        yield prefix, model
        return
    for name, child in model.named_children():
        yield from iter_blocks(child, f"{prefix}.{name}" if prefix else name)


# ---------------------------------------------------------------------------------------------
# Reports and conversion.

def _is_fused(module: nn.Module) -> bool:
    return isinstance(module, FusedMBConv)


@dataclass(frozen=True)
class BlockReport:
    """One known block of a model: ``status`` is "converted" (a FusedMBConv whose calls run
    fused), "eager" (a FusedMBConv whose present state, ``reason``, runs the eager math),
    "convertible" (``convert`` would fuse it) or "unconverted" (``reason`` says why)."""

    path: str
    block_type: str
    status: str
    reason: str = ""


@dataclass(frozen=True)
class ConversionReport:
    blocks: Tuple[BlockReport, ...]
    # The stems and heads (``convert_stem_head``), reported apart from the blocks.
    layers: Tuple[BlockReport, ...] = ()

    def _with(self, status: str) -> List[BlockReport]:
        return [b for b in self.blocks if b.status == status]

    # the blocks in each status
    converted = property(lambda self: self._with("converted"))
    eager = property(lambda self: self._with("eager"))
    convertible = property(lambda self: self._with("convertible"))
    unconverted = property(lambda self: self._with("unconverted"))

    def __str__(self) -> str:
        eager = f"{len(self.eager)} converted but running eager, " if self.eager else ""
        lines = [f"{len(self.blocks)} MBConv-style blocks: {len(self.converted)} converted, "
                 f"{eager}{len(self.convertible)} convertible, {len(self.unconverted)} "
                 f"unconverted"]
        width = max((len(b.path or "<model>") for b in self.blocks), default=0)
        for b in self.blocks:
            line = f"  {b.path or '<model>':<{width}}  {b.status:<11}  {b.block_type}"
            lines.append(f"{line}: {b.reason}" if b.reason else line)
        return "\n".join(lines + _layer_lines(self.layers))


def _layer_lines(layers: Tuple[BlockReport, ...]) -> List[str]:
    """The report's stem and head section."""
    if not layers:
        return []
    converted = sum(b.status == "converted" for b in layers)
    lines = [f"{len(layers)} stem/head layers: {converted} converted"]
    width = max(len(b.path) for b in layers)
    for b in layers:
        line = f"  {b.path:<{width}}  {b.status:<11}  {b.block_type}"
        lines.append(f"{line}: {b.reason}" if b.reason else line)
    return lines


def _block_report(path: str, module: nn.Module) -> BlockReport:
    kind = f"{type(module).__module__.split('.')[0]}.{type(module).__qualname__}"
    if _is_fused(module):
        reason = module.eager_reason()
        return BlockReport(path, kind, "converted") if reason is None else \
            BlockReport(path, kind, "eager", f"runs the eager math: {reason}")
    try:
        recognize(module)
    except NotFusable as e:
        return BlockReport(path, kind, "unconverted", str(e))
    return BlockReport(path, kind, "convertible")


def convert_report(model: nn.Module) -> ConversionReport:
    """Which blocks of ``model`` are converted, would be converted, or can't be, and why; and
    (``layers``) the same for its stem and head."""
    return ConversionReport(tuple(_block_report(p, m) for p, m in iter_blocks(model)),
                            _stem_head.layer_reports(model))


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """Replace every BatchNorm2d (and timm BatchNormAct2d) under ``module``, outside fused
    blocks, with ``distributed.SyncBatchNorm``: ``nn.SyncBatchNorm.convert_sync_batchnorm``'s
    job, on any device, keeping timm's activation. Returns ``module`` (or its replacement)."""
    if _is_fused(module):
        return module
    if qualified_name(type(module)) in _BATCH_NORMS:
        return SyncBatchNorm.from_batch_norm(module, process_group)
    for name, child in module.named_children():
        setattr(module, name, convert_sync_batchnorm(child, process_group))
    return module


def _replace(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent_path), name, module)


class SyncFusedMBConv(FusedMBConv):
    """A converted block whose training statistics span every process of ``process_group``
    (``convert(..., sync_bn=True)``). With an initialized group of two or more processes, the
    fused kernels' batch statistics and gradient sums are reduced across it between kernels
    (``distributed.ProcessGroupStatsSync``); otherwise, and in eval, it is FusedMBConv."""

    process_group = None

    def stats_sync(self):
        if sync_enabled(self.process_group):
            return ProcessGroupStatsSync(self.process_group)
        return None


def convert(model: nn.Module, inplace: bool = False, sync_bn: bool = False,
            process_group=None,
            recompute: Union[bool, str] = DEFAULT_RECOMPUTE) -> nn.Module:
    """Swap every block ``convert_report`` calls convertible for a ``FusedMBConv`` that adopts
    the block's submodules under their names, so ``state_dict`` keys and values are unchanged;
    and the model's stem and head for fused ones (``convert_stem_head``), likewise.

    ``recompute``: what the converted blocks keep for backward (``FusedMBConv.recompute``):
    False the expand and depthwise outputs, "dwconv" (the default) the expand output
    (backward recomputes the depthwise one), True neither (backward recomputes both, the
    expand GEMM included).
    Blocks that are already fused keep their own level.

    ``sync_bn``: batch statistics over every process of ``process_group`` (default: the whole
    world), in the fused blocks and in every other BatchNorm2d (as
    ``nn.SyncBatchNorm.convert_sync_batchnorm`` would, but on any device).

    Returns the converted model (a new one unless ``inplace``; when ``model`` itself is a
    block, always a new module: use the return value).
    """
    recompute = check_recompute(recompute)
    if not inplace:
        model = copy.deepcopy(model)
    model = _convert_stem_head(model, sync_bn)
    fused_type = SyncFusedMBConv if sync_bn else FusedMBConv
    for path, block in list(iter_blocks(model)):
        if _is_fused(block):
            if not sync_bn or isinstance(block, SyncFusedMBConv):
                continue
            block = SyncFusedMBConv.from_spec(block, block.spec())  # keeps its level
        else:
            try:
                spec = recognize(block)
            except NotFusable:
                continue
            block = fused_type.from_module(block) if isinstance(block, MBConv) else \
                fused_type.from_spec(block, spec)
            block.recompute = recompute
        if sync_bn:
            block.process_group = process_group
        if not path:
            return block
        _replace(model, path, block)
    return convert_sync_batchnorm(model, process_group) if sync_bn else model


def revert(model: nn.Module, inplace: bool = False) -> nn.Module:
    """``convert`` undone: every FusedMBConv becomes the block it replaced (its original
    class, the same children, so ``state_dict`` is unchanged), and every fused stem and head
    the layers it replaced, for tools that do not know
    the fused ops (ONNX and other exporters). Returns the reverted model (a new one unless
    ``inplace``; when ``model`` itself is a fused block, always a new module)."""
    if not inplace:
        model = copy.deepcopy(model)
    _stem_head.unfuse(model)
    for path, block in list(iter_blocks(model)):
        if not _is_fused(block):
            continue
        if not path:
            return block.eager_block()
        _replace(model, path, block.eager_block())
    return model


def _convert_stem_head(model: nn.Module, sync_bn: bool) -> nn.Module:
    """Stems and heads fused in place; with ``sync_bn`` left (or put back) eager, where their
    BatchNorms become synchronized ones (the fused stem and head ops reduce nothing across
    processes)."""
    return _stem_head.unfuse(model) if sync_bn else _stem_head.fuse(model)


# FusedMBConv.from_module's extension point: every block type these recognizers know.
register_block_type(nn.Module, recognize)

from . import convert_stem_head as _stem_head  # noqa: E402  (it uses this module's checks)
