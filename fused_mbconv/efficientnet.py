"""Compound-scaled EfficientNet-B0..B7 built from MBConv blocks.

Layout, rounding and initialisation follow torchvision's definition, so parameter counts
agree with the published ones to the parameter (tested).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Tuple, Union

import torch
import torch.nn as nn

from .blocks import MBConv
from .fused_block import FusedMBConv, check_recompute
from .fused_stem_head import FusedConvBNAct, FusedHead


def compound_scaling(phi: float, alpha: float = 1.2, beta: float = 1.1,
                     gamma: float = 1.15) -> Tuple[float, float, float]:
    """Depth, width and resolution multipliers ``(alpha**phi, beta**phi, gamma**phi)``."""
    if phi < 0:
        raise ValueError(f"phi must be >= 0, got {phi!r}")
    return alpha ** phi, beta ** phi, gamma ** phi


def round_channels(channels: float, divisor: int = 8) -> int:
    """Nearest multiple of ``divisor``, never below 90% of ``channels``."""
    rounded = max(divisor, int(channels + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * channels:
        rounded += divisor
    return rounded


@dataclass(frozen=True)
class StageConfig:
    expand_ratio: int
    kernel_size: int
    stride: int
    in_channels: int
    out_channels: int
    repeats: int


# EfficientNet-B0 (Tan & Le 2019, table 1), before width/depth scaling.
B0_STAGES: Tuple[StageConfig, ...] = (
    StageConfig(1, 3, 1, 32, 16, 1),
    StageConfig(6, 3, 2, 16, 24, 2),
    StageConfig(6, 5, 2, 24, 40, 2),
    StageConfig(6, 3, 2, 40, 80, 3),
    StageConfig(6, 5, 1, 80, 112, 3),
    StageConfig(6, 5, 2, 112, 192, 4),
    StageConfig(6, 3, 1, 192, 320, 1),
)

# name: (width, depth, resolution, dropout, bn_eps, bn_momentum), as torchvision publishes them.
VARIANTS = {
    "efficientnet_b0": (1.0, 1.0, 224, 0.2, 1e-5, 0.1),
    "efficientnet_b1": (1.0, 1.1, 240, 0.2, 1e-5, 0.1),
    "efficientnet_b2": (1.1, 1.2, 260, 0.3, 1e-5, 0.1),
    "efficientnet_b3": (1.2, 1.4, 300, 0.3, 1e-5, 0.1),
    "efficientnet_b4": (1.4, 1.8, 380, 0.4, 1e-5, 0.1),
    "efficientnet_b5": (1.6, 2.2, 456, 0.4, 1e-3, 0.01),
    "efficientnet_b6": (1.8, 2.6, 528, 0.5, 1e-3, 0.01),
    "efficientnet_b7": (2.0, 3.1, 600, 0.5, 1e-3, 0.01),
}


def _block_class(fused: bool):
    return FusedMBConv if fused else MBConv


class ConvBNAct(nn.Sequential):
    def __init__(self, cin: int, cout: int, kernel_size: int, stride: int, bn_eps: float,
                 bn_momentum: Optional[float]):
        super().__init__(
            nn.Conv2d(cin, cout, kernel_size, stride, kernel_size // 2, bias=False),
            nn.BatchNorm2d(cout, eps=bn_eps, momentum=bn_momentum),
            nn.SiLU(),
        )


class EfficientNet(nn.Module):
    def __init__(self, width_mult: float = 1.0, depth_mult: float = 1.0, dropout: float = 0.2,
                 num_classes: int = 1000, stochastic_depth_prob: float = 0.2,
                 bn_eps: float = 1e-5, bn_momentum: Optional[float] = 0.1,
                 fused: bool = False, stages: Tuple[StageConfig, ...] = B0_STAGES,
                 resolution: int = 224, recompute: Union[bool, str, None] = None):
        """``recompute``: what each fused block keeps for backward (``FusedMBConv.recompute``;
        None: its default); only with ``fused=True``."""
        super().__init__()
        if not width_mult > 0:
            raise ValueError(f"width_mult must be > 0, got {width_mult!r}")
        if not depth_mult > 0:
            raise ValueError(f"depth_mult must be > 0, got {depth_mult!r}")
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        if not 0.0 <= stochastic_depth_prob < 1.0:
            raise ValueError(
                f"stochastic_depth_prob must be in [0, 1), got {stochastic_depth_prob!r}")
        if recompute is not None and not fused:
            check_recompute(recompute)
            raise ValueError(f"recompute={recompute!r} needs fused=True (an eager block saves "
                             f"what autograd saves)")
        block_cls = _block_class(fused)
        block_options = dict(recompute=recompute) if fused else {}
        self.resolution = resolution

        def width(c: int) -> int:
            return round_channels(c * width_mult)

        stem_channels = width(stages[0].in_channels)
        self.stem = ConvBNAct(3, stem_channels, 3, 2, bn_eps, bn_momentum)
        if fused:  # the stem and the pooled head as fused ops too (same state_dict keys)
            self.stem = FusedConvBNAct.from_sequential(self.stem, "silu")

        repeats = [int(math.ceil(s.repeats * depth_mult)) for s in stages]
        total_blocks = sum(repeats)
        block_index = 0
        stage_modules: List[nn.Module] = []
        for stage, n in zip(stages, repeats):
            blocks = []
            cin, cout = width(stage.in_channels), width(stage.out_channels)
            for i in range(n):
                blocks.append(block_cls(
                    cin if i == 0 else cout, cout, stage.kernel_size,
                    stage.stride if i == 0 else 1, stage.expand_ratio,
                    drop_path=stochastic_depth_prob * block_index / total_blocks,
                    bn_eps=bn_eps, bn_momentum=bn_momentum, **block_options))
                block_index += 1
            stage_modules.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stage_modules)

        head_in = width(stages[-1].out_channels)
        head_out = 4 * head_in
        self.head = ConvBNAct(head_in, head_out, 1, 1, bn_eps, bn_momentum)
        if fused:
            self.head = FusedHead.from_sequential(self.head, "silu")
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout, inplace=True),
                                        nn.Linear(head_out, num_classes))
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                bound = 1.0 / math.sqrt(m.out_features)
                nn.init.uniform_(m.weight, -bound, bound)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"input must be (N, 3, H, W), got shape {tuple(x.shape)}")
        return self.classifier(torch.flatten(self.pool(self.forward_features(x)), 1))


def _build(name: str, num_classes: int, fused: bool, stochastic_depth_prob: float,
           **kwargs) -> EfficientNet:
    width, depth, resolution, dropout, bn_eps, bn_momentum = VARIANTS[name]
    options = dict(width_mult=width, depth_mult=depth, dropout=dropout, bn_eps=bn_eps,
                   bn_momentum=bn_momentum, resolution=resolution)
    options.update(kwargs)
    return EfficientNet(num_classes=num_classes, fused=fused,
                        stochastic_depth_prob=stochastic_depth_prob, **options)


def _make_constructor(name: str):
    def constructor(num_classes: int = 1000, fused: bool = False,
                    stochastic_depth_prob: float = 0.2, **kwargs) -> EfficientNet:
        return _build(name, num_classes, fused, stochastic_depth_prob, **kwargs)

    width, depth, resolution, dropout, _, _ = VARIANTS[name]
    constructor.__name__ = constructor.__qualname__ = name
    constructor.__doc__ = (f"{name}: width x{width}, depth x{depth}, {resolution}px input, "
                           f"dropout {dropout}. Random weights (nothing is downloaded). "
                           f"With fused=True, recompute=False / 'dwconv' / True sets what "
                           f"each block keeps for backward (FusedMBConv.recompute).")
    return constructor


efficientnet_b0 = _make_constructor("efficientnet_b0")
efficientnet_b1 = _make_constructor("efficientnet_b1")
efficientnet_b2 = _make_constructor("efficientnet_b2")
efficientnet_b3 = _make_constructor("efficientnet_b3")
efficientnet_b4 = _make_constructor("efficientnet_b4")
efficientnet_b5 = _make_constructor("efficientnet_b5")
efficientnet_b6 = _make_constructor("efficientnet_b6")
efficientnet_b7 = _make_constructor("efficientnet_b7")
