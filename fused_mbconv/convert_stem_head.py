"""Conversion of a network's stem and head (``fm.convert`` calls these; ``convert_report``
lists them): recognizers by model class, the replacements, and their reports.

Per model family:
- torchvision EfficientNet (v1, v2), MobileNetV2, MobileNetV3 and this package's EfficientNet:
  the stem ``Conv2dNormActivation`` and the head (the last feature layer, a 1x1 conv + BN +
  act) become ``FusedConvBNAct``; torchvision's ``features`` keeps returning the unpooled map,
  so its pool stays the model's. This package's EfficientNet fuses the pool into the head
  (``FusedHead``): its ``forward_features`` then returns the pooled (N, C, 1, 1) map, on which
  ``AdaptiveAvgPool2d(1)`` is the identity.
- timm EfficientNet-class models (EfficientNet, MobileNetV2, MnasNet, ...) and MobileNetV3:
  ``conv_stem`` + ``bn1`` and ``conv_head`` + ``bn2`` become ``FusedPairConv`` +
  ``FoldedBatchNorm``, conv + BN + act without the pool: timm's ``forward_features`` returns
  the unpooled map (``forward_head``, ``forward_intermediates``, ``reset_classifier`` and
  feature extraction rely on it). timm's MobileNetV3 head pools first and has no BatchNorm:
  it is listed as unconverted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from .convert import BlockReport, NotFusable, _activation, _norm_act, qualified_name
from .fused_stem_head import (FusedConvBNAct, FusedHead, FusedPairConv, conv_reason,
                              fused_layers, norm_reason)
from .ops.stem_head import kernel_sources


@dataclass(frozen=True)
class Site:
    """One stem or head of a model: ``path`` is the container (or, with ``norm``, the conv)
    relative to the model; ``norm`` the sibling BatchNorm's path; ``pool`` whether the head's
    op includes the global average pool."""

    role: str
    path: str
    norm: Optional[str] = None
    pool: bool = False
    refused: Optional[str] = None  # why this model's layer is not fused


# Model classes by qualified name: their stem and head sites.
_SITES: Dict[str, Callable[[nn.Module], List[Site]]] = {}


def register_model(qualname: str):
    def register(fn: Callable[[nn.Module], List[Site]]):
        _SITES[qualname] = fn
        return fn
    return register


def _is_global_average_pool(module: Optional[nn.Module]) -> bool:
    return type(module) is nn.AdaptiveAvgPool2d and module.output_size in (1, (1, 1))


@register_model("torchvision.models.efficientnet.EfficientNet")
@register_model("torchvision.models.mobilenetv3.MobileNetV3")
@register_model("torchvision.models.mobilenetv2.MobileNetV2")
def _torchvision_features(model: nn.Module) -> List[Site]:
    # The head without the pool: ``features`` must keep returning the unpooled map (feature
    # extraction, CAM and ``create_feature_extractor`` read it).
    return [Site("stem", "features.0"), Site("head", f"features.{len(model.features) - 1}")]


@register_model("fused_mbconv.efficientnet.EfficientNet")
def _fm_efficientnet(model: nn.Module) -> List[Site]:
    pooled = _is_global_average_pool(model.pool)
    return [Site("stem", "stem"),
            Site("head", "head", pool=True) if pooled else
            Site("head", "head", refused=f"pool {model.pool} is not a global average")]


@register_model("timm.models.efficientnet.EfficientNet")
@register_model("timm.models.efficientnet.EfficientNetFeatures")
def _timm_efficientnet(model: nn.Module) -> List[Site]:
    sites = [Site("stem", "conv_stem", norm="bn1")]
    if isinstance(getattr(model, "conv_head", None), nn.Module):
        sites.append(Site("head", "conv_head", norm="bn2"))
    return sites


@register_model("timm.models.mobilenetv3.MobileNetV3")
@register_model("timm.models.mobilenetv3.MobileNetV3Features")
def _timm_mobilenet_v3(model: nn.Module) -> List[Site]:
    sites = [Site("stem", "conv_stem", norm="bn1")]
    if isinstance(getattr(model, "conv_head", None), nn.Module):
        sites.append(Site("head", "conv_head", refused="head: global pool, then a 1x1 conv "
                          "with bias and an activation; no BatchNorm to fuse"))
    return sites


def _sequential_activation(layer: nn.Module, where: str) -> str:
    if not isinstance(layer, nn.Sequential) or len(layer) != 3:
        raise NotFusable(f"{where}: expected Sequential(conv, BatchNorm, activation), "
                         f"got {type(layer).__name__}")
    return _activation(layer[2], f"{where}.2")


def _check(site: Site, model: nn.Module) -> str:
    """The activation of ``site``'s layers, or NotFusable saying why they are not fused."""
    if site.refused is not None:
        raise NotFusable(site.refused)
    layer = model.get_submodule(site.path)
    if site.norm is None:
        act = _sequential_activation(layer, site.path)
        conv, bn = layer[0], layer[1]
    else:
        conv, bn = layer, model.get_submodule(site.norm)
        if qualified_name(type(bn)) != "timm.layers.norm_act.BatchNormAct2d":
            raise NotFusable(f"{site.norm}: {type(bn).__name__} is not timm's BatchNormAct2d "
                             f"(the activation would be a separate layer)")
        act = _norm_act(bn, site.norm)
        if act is None:
            raise NotFusable(f"{site.norm}: no activation after the BatchNorm")
    reason = conv_reason(conv) or norm_reason(bn, getattr(conv, "out_channels", -1))
    if reason is not None:
        raise NotFusable(f"{site.path}: {reason}")
    if site.pool and conv.kernel_size != (1, 1):
        raise NotFusable(f"{site.path}: the pooled head fuses a 1x1 conv only, got "
                         f"{conv.kernel_size}")
    return act


def _sites(model: nn.Module) -> List[Tuple[str, Site]]:
    """(the model's path, site) for every recognized model in ``model`` (it or a child)."""
    found = []
    for prefix, module in model.named_modules():
        fn = _SITES.get(qualified_name(type(module)))
        if fn is None:
            continue
        try:
            found.extend((prefix, s) for s in fn(module))
        except AttributeError as exc:  # a library version with another layout
            found.append((prefix, Site("model", "", refused=f"unexpected layout: {exc}")))
    return found


def _join(prefix: str, path: str) -> str:
    return f"{prefix}.{path}" if prefix and path else prefix or path


def _set(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent), name, module)


def is_fused_layer(module: nn.Module) -> bool:
    return isinstance(module, fused_layers())


def fuse(model: nn.Module) -> nn.Module:
    """Replace every fusable stem and head of ``model`` in place; returns ``model``."""
    for prefix, site in _sites(model):
        owner = model.get_submodule(prefix)
        if not site.path or is_fused_layer(owner.get_submodule(site.path)):
            continue
        try:
            activation = _check(site, owner)
        except NotFusable:
            continue
        layer = owner.get_submodule(site.path)
        if site.norm is None:
            fused_type = FusedHead if site.pool else FusedConvBNAct
            _set(owner, site.path, fused_type.from_sequential(layer, activation))
        else:
            FusedPairConv.from_pair(owner, site.path, site.norm, activation)
    return model


def unfuse(model: nn.Module) -> nn.Module:
    """Every fused stem and head back to the original layers, in place; returns ``model``."""
    for prefix, site in _sites(model):
        owner = model.get_submodule(prefix)
        layer = owner.get_submodule(site.path) if site.path else None
        if layer is None or not is_fused_layer(layer):
            continue
        originals = layer.eager_modules()
        _set(owner, site.path, originals[""])
        if site.norm is not None:
            _set(owner, site.norm, originals["norm"])
    return model


def _kernels_note(layer: nn.Module) -> str:
    """Which backend's kernels a call on the layer's device runs now, and what falls back."""
    device = next(layer.parameters(), torch.empty(0)).device
    op = "pointwise_bn_act_pool" if layer.pool else "conv_bn_act"
    try:
        backend, fallback = kernel_sources(device)[op]
    except (RuntimeError, NotImplementedError) as exc:
        return f"{op}: {exc}"
    if not fallback:
        return f"{op} on {backend} kernels"
    return (f"{op} on {device.type} tensors: backend {backend}, which lacks "
            f"{', '.join(fallback)}: those run the torch reference (aten ops)")


def layer_reports(model: nn.Module) -> Tuple[BlockReport, ...]:
    """Per stem and head of ``model``: converted (and on which kernels), eager (the reason),
    convertible or unconverted (why)."""
    reports = []
    for prefix, site in _sites(model):
        owner = model.get_submodule(prefix)
        path = _join(prefix, site.path) + (f"+{site.norm}" if site.norm else "")
        kind = f"{site.role}{' + pool' if site.pool else ''}"
        layer = owner.get_submodule(site.path) if site.path else None
        if layer is not None and is_fused_layer(layer):
            reason = layer.eager_reason()
            reports.append(BlockReport(path, kind, "converted", _kernels_note(layer))
                           if reason is None else
                           BlockReport(path, kind, "eager", f"runs the eager math: {reason}"))
            continue
        try:
            _check(site, owner)
        except NotFusable as exc:
            reports.append(BlockReport(path, kind, "unconverted", str(exc)))
            continue
        reports.append(BlockReport(path, kind, "convertible"))
    return tuple(reports)
