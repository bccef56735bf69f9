"""Eager reference MBConv block: plain PyTorch ops, the ground truth for every fused kernel.

Semantics and parameter layout match torchvision's ``MBConv`` and timm's ``InvertedResidual``:
expand 1x1 conv + BN + act (absent when expand_ratio == 1), depthwise conv + BN + act,
squeeze-excite whose squeeze width comes from the block's *input* channels, projection
1x1 conv + BN with no activation, and a residual with stochastic depth when the shapes allow.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn

from .activations import make_activation, make_gate
from .functional import drop_path_scale


def _check_positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth, per sample ("row" mode): zero whole samples with probability p and
    rescale survivors by 1/(1-p), only in training."""
    if not training or p == 0.0:
        return x
    return x * drop_path_scale(x, p)


class StochasticDepth(nn.Module):
    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop_path must be in [0, 1), got {p!r}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class SqueezeExcite(nn.Module):
    """x * gate(fc2(act(fc1(mean_hw(x))))), fc1/fc2 being 1x1 convs with bias."""

    def __init__(self, channels: int, squeeze_channels: int, activation: str = "silu",
                 gate: str = "sigmoid"):
        super().__init__()
        _check_positive_int("squeeze_channels", squeeze_channels)
        self.fc1 = nn.Conv2d(channels, squeeze_channels, 1)
        self.act = make_activation(activation, "se_activation")
        self.fc2 = nn.Conv2d(squeeze_channels, channels, 1)
        self.gate = make_gate(gate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)
        return x * self.gate(self.fc2(self.act(self.fc1(s))))


@dataclass(frozen=True)
class MBConvSpec:
    """Which submodule plays which role in an MBConv-style block, and the block's flags.

    The contract between block recognizers (this package's MBConv, torchvision's MBConv,
    timm's InvertedResidual / DepthwiseSeparableConv) and the fused block: the fused forward
    reads parameters and BatchNorm state through these references, so the original modules
    (and so the state_dict keys) stay where they are.
    """

    expand_conv: Optional[nn.Conv2d]
    expand_bn: Optional[nn.BatchNorm2d]
    dw_conv: nn.Conv2d
    dw_bn: nn.BatchNorm2d
    se_fc1: Optional[nn.Conv2d]
    se_fc2: Optional[nn.Conv2d]
    project_conv: nn.Conv2d
    project_bn: nn.BatchNorm2d
    stride: int
    kernel_size: int
    residual: bool
    drop_path: float = 0.0
    activation: str = "silu"
    se_activation: str = "silu"
    se_gate: str = "sigmoid"
    # The stochastic-depth module, whose own ``training`` flag says whether it drops (as in
    # eager); None: the block's flag.
    drop_path_module: Optional[nn.Module] = None
    # Element-wise nn.Dropout on the branch before the residual add (Hugging Face's
    # EfficientNet), applied while that module trains; None: none.
    branch_dropout: Optional[nn.Module] = None
    # The depthwise conv's zero padding (functional.DwPadding): None, the conv's own k//2;
    # "same", TensorFlow's SAME from each input's size; (left, right, top, bottom), a pad
    # layer's before the unpadded conv.
    dw_pad: Union[None, str, Tuple[int, int, int, int]] = None


class MBConv(nn.Module):
    """Mobile inverted bottleneck block with squeeze-excite (EfficientNet's MBConv).

    ``se_ratio`` scales the block's input channels to the SE squeeze width
    (``max(1, int(in_channels * se_ratio))``); 0 disables squeeze-excite.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int,
                 expand_ratio: float, se_ratio: float = 0.25, drop_path: float = 0.0,
                 activation: str = "silu", bn_eps: float = 1e-5,
                 bn_momentum: Optional[float] = 0.1, se_gate: str = "sigmoid"):
        super().__init__()
        _check_positive_int("in_channels", in_channels)
        _check_positive_int("out_channels", out_channels)
        if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd integer, got {kernel_size!r}")
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride!r}")
        if not expand_ratio >= 1:
            raise ValueError(f"expand_ratio must be >= 1, got {expand_ratio!r}")
        if not 0.0 <= se_ratio <= 1.0:
            raise ValueError(f"se_ratio must be in [0, 1], got {se_ratio!r}")
        if not bn_eps > 0:
            raise ValueError(f"bn_eps must be > 0, got {bn_eps!r}")
        if bn_momentum is not None and not 0.0 <= bn_momentum <= 1.0:
            raise ValueError(f"bn_momentum must be in [0, 1] or None, got {bn_momentum!r}")

        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.expand_ratio = expand_ratio
        self.activation = activation
        self.se_activation = activation
        self.se_gate = se_gate
        self.use_residual = stride == 1 and in_channels == out_channels
        hidden = int(round(in_channels * expand_ratio))
        self.hidden_channels = hidden

        def bn(c):
            return nn.BatchNorm2d(c, eps=bn_eps, momentum=bn_momentum)

        if expand_ratio != 1:
            self.expand_conv = nn.Conv2d(in_channels, hidden, 1, bias=False)
            self.expand_bn = bn(hidden)
        else:
            self.expand_conv = None
            self.expand_bn = None
        self.dw_conv = nn.Conv2d(hidden, hidden, kernel_size, stride, padding=kernel_size // 2,
                                 groups=hidden, bias=False)
        self.dw_bn = bn(hidden)
        self.act = make_activation(activation)
        squeeze = max(1, int(in_channels * se_ratio)) if se_ratio > 0 else 0
        self.se = SqueezeExcite(hidden, squeeze, activation, se_gate) if squeeze else None
        self.project_conv = nn.Conv2d(hidden, out_channels, 1, bias=False)
        self.project_bn = bn(out_channels)
        self.drop_path = StochasticDepth(drop_path)

    def spec(self) -> MBConvSpec:
        return MBConvSpec(
            expand_conv=self.expand_conv, expand_bn=self.expand_bn,
            dw_conv=self.dw_conv, dw_bn=self.dw_bn,
            se_fc1=self.se.fc1 if self.se is not None else None,
            se_fc2=self.se.fc2 if self.se is not None else None,
            project_conv=self.project_conv, project_bn=self.project_bn,
            stride=self.stride, kernel_size=self.kernel_size, residual=self.use_residual,
            drop_path=self.drop_path.p, activation=self.activation,
            se_activation=self.se_activation, se_gate=self.se_gate,
            drop_path_module=self.drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        if self.expand_conv is not None:
            h = self.act(self.expand_bn(self.expand_conv(h)))
        h = self.act(self.dw_bn(self.dw_conv(h)))
        if self.se is not None:
            h = self.se(h)
        h = self.project_bn(self.project_conv(h))
        if self.use_residual:
            h = self.drop_path(h) + x
        return h

    def extra_repr(self) -> str:
        return (f"{self.in_channels}->{self.hidden_channels}->{self.out_channels}, "
                f"kernel_size={self.kernel_size}, stride={self.stride}, "
                f"residual={self.use_residual}")
