from ._version import __version__
from .blocks import MBConv, MBConvSpec, SqueezeExcite, StochasticDepth
from .fused_block import DEFAULT_RECOMPUTE, FusedMBConv
from .fused_stem_head import FoldedBatchNorm, FusedConvBNAct, FusedHead, FusedPairConv
from .efficientnet import (EfficientNet, compound_scaling, efficientnet_b0, efficientnet_b1,
                           efficientnet_b2, efficientnet_b3, efficientnet_b4, efficientnet_b5,
                           efficientnet_b6, efficientnet_b7)
from . import functional
from .backends import available_backends, set_backend, use_backend
from .convert import convert, convert_report, revert
