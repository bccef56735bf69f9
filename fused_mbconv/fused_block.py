"""``FusedMBConv``: the MBConv block running as one fused op (``fused_mbconv::mbconv``).

The block keeps its parameters and BatchNorm state in the same child modules as the block it
replaces, so state_dict keys and values are unchanged by conversion; its forward reads them
through an ``MBConvSpec``. Three ways to get one:

- ``FusedMBConv(...)``: MBConv's constructor, MBConv's state_dict keys.
- ``FusedMBConv.from_module(block)``: from ``fused_mbconv.MBConv`` (sharing its parameter and
  buffer objects), or from any block type registered with ``register_block_type``
  (``fused_mbconv.convert`` registers torchvision's and timm's).
- ``FusedMBConv.from_spec(source, spec)``: adopts ``source``'s child modules under their own
  names and reads their roles through ``spec``.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
import torch.nn as nn

from . import functional
from .blocks import MBConv, MBConvSpec

# Block types from_module accepts besides MBConv, each with its recognizer: a function from
# a block to its MBConvSpec, raising ValueError (saying why) for a block it cannot fuse.
_RECOGNIZERS: Dict[type, Callable[[nn.Module], MBConvSpec]] = {}


def register_block_type(block_type: type, recognize: Callable[[nn.Module], MBConvSpec]) -> None:
    """Teach ``FusedMBConv.from_module`` a block type (the conversion layer's extension point)."""
    _RECOGNIZERS[block_type] = recognize


class FusedMBConv(MBConv):
    """MBConv computed by the fused kernels: same arguments, math and state_dict keys.

    ``recompute_dwconv=True`` trades one more read of the expand output in backward for not
    keeping the depthwise output for backward (less activation memory)."""

    _adopted_spec: Optional[MBConvSpec] = None
    recompute_dwconv: bool = False

    def __init__(self, *args, recompute_dwconv: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.recompute_dwconv = recompute_dwconv

    @classmethod
    def from_module(cls, block: nn.Module) -> "FusedMBConv":
        """The fused form of ``block``, sharing its parameters and buffers."""
        if isinstance(block, MBConv):
            fused = cls._adopt(block)
            for name, value in vars(block).items():
                if not name.startswith("_") and name != "training":
                    fused.__dict__[name] = value
            return fused
        # The most specific registered type wins (conversion registers nn.Module as a catch-all).
        for block_type in type(block).__mro__:
            if block_type in _RECOGNIZERS:
                return cls.from_spec(block, _RECOGNIZERS[block_type](block))
        supported = ["fused_mbconv.MBConv"] + [f"{t.__module__}.{t.__qualname__}"
                                               for t in _RECOGNIZERS]
        raise TypeError(f"FusedMBConv.from_module does not know {type(block).__qualname__}; "
                        f"supported: {supported} (fused_mbconv.convert registers torchvision's "
                        f"and timm's blocks), or use FusedMBConv.from_spec")

    @classmethod
    def from_spec(cls, source: nn.Module, spec: MBConvSpec) -> "FusedMBConv":
        """A fused block that adopts ``source``'s child modules (and own parameters and
        buffers) under their original names, so its state_dict keys are ``source``'s, and
        reads their roles through ``spec``, whose modules must be among them."""
        owned = {id(m) for m in source.modules()}
        for role in ("expand_conv", "expand_bn", "dw_conv", "dw_bn", "se_fc1", "se_fc2",
                     "project_conv", "project_bn"):
            module = getattr(spec, role)
            if module is not None and id(module) not in owned:
                raise ValueError(f"spec.{role} is not a submodule of the source block")
        fused = cls._adopt(source)
        hidden = spec.dw_conv.in_channels
        cin = spec.expand_conv.in_channels if spec.expand_conv is not None else hidden
        attributes = dict(
            _adopted_spec=spec, in_channels=cin, out_channels=spec.project_conv.out_channels,
            hidden_channels=hidden, expand_ratio=hidden / cin, kernel_size=spec.kernel_size,
            stride=spec.stride, use_residual=spec.residual, activation=spec.activation,
            se_activation=spec.se_activation, se_gate=spec.se_gate)
        fused.__dict__.update(attributes)
        return fused

    @classmethod
    def _adopt(cls, source: nn.Module) -> "FusedMBConv":
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused.training = source.training
        fused._modules.update(source._modules)
        fused._parameters.update(source._parameters)
        fused._buffers.update(source._buffers)
        fused._non_persistent_buffers_set.update(source._non_persistent_buffers_set)
        return fused

    def spec(self) -> MBConvSpec:
        return self._adopted_spec if self._adopted_spec is not None else super().spec()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spec = self.spec()
        bn = functional.BatchNormParams.from_module
        se = None
        if spec.se_fc1 is not None:
            se = (spec.se_fc1.weight, spec.se_fc1.bias, spec.se_fc2.weight, spec.se_fc2.bias)
        return functional.mbconv(
            x, spec.dw_conv.weight, bn(spec.dw_bn), spec.project_conv.weight,
            bn(spec.project_bn),
            expand_weight=spec.expand_conv.weight if spec.expand_conv is not None else None,
            bn1=bn(spec.expand_bn) if spec.expand_bn is not None else None, se_weights=se,
            stride=spec.stride, training=self.training, residual=spec.residual,
            drop_path=spec.drop_path, activation=spec.activation,
            se_activation=spec.se_activation, se_gate=spec.se_gate,
            recompute_dwconv=self.recompute_dwconv, sync=self.stats_sync())

    def stats_sync(self) -> Optional[functional.BatchStatsSync]:
        """Where training statistics are reduced across processes: nowhere here (see
        ``convert.SyncFusedMBConv``)."""
        return None
