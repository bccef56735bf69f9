"""A network's stem and head as fused modules, with the parameters and buffers of the layers
they replace under the same names (state_dict unchanged).

- ``FusedConvBNAct``: a ``Sequential(conv, BatchNorm[, activation])`` (torchvision's
  ``Conv2dNormActivation``, this package's ``ConvBNAct``) run as ``fused_mbconv::conv_bn_act``;
  it adopts the container's children under their names ("0", "1", "2").
- ``FusedHead``: the same for a 1x1 head followed by a global average pool, run as
  ``fused_mbconv::pointwise_bn_act_pool``: its output is the pooled (N, C, 1, 1) map, on which
  the model's own ``AdaptiveAvgPool2d(1)`` is the identity.
- ``FusedPairConv`` + ``FoldedBatchNorm``: a conv and a BatchNorm that are siblings (timm's
  ``conv_stem`` + ``bn1``, ``conv_head`` + ``bn2``): the fused module stands at the conv's
  place with the conv's parameters and computes conv + BN + activation; the BN's place holds a
  ``FoldedBatchNorm`` (an instance of the BN's class) with the BN's parameters and buffers,
  whose forward passes its input on. Each finds the other through their parent at each call:
  while either place holds another module (a freeze helper's ``FrozenBatchNormAct2d``), the
  conv runs alone and the module at the BN's place does its own work. Called alone (outside
  the parent's forward), the fused conv returns conv + BN + act, not the conv's output.

Drop-in as ``FusedMBConv`` is: each call reads the BatchNorm's own state (training flag,
``track_running_stats``, ``affine``, ``momentum``); frozen parameters get no gradient; a call
the kernels cannot express (an empty batch, an ONNX export, a child swapped for a module they
do not know, e.g. ``FrozenBatchNorm2d``) runs the replaced layers' eager forward, and
``eager_reason()`` says why; torch.fx records the fused module as one ``call_module`` node;
``eager_modules()`` rebuilds the original classes (what ``fm.revert`` puts back).
"""

from __future__ import annotations

import warnings
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import functional
from .activations import ACTIVATIONS
from .fused_block import _bn_params, _uses_batch_stats, adopt_state, own_attributes, rebuild

# BatchNorm classes the ops run, by qualified name (timm's applies an activation after).
BATCH_NORMS = ("torch.nn.modules.batchnorm.BatchNorm2d", "timm.layers.norm_act.BatchNormAct2d")


def qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _stand_in_for(fused: nn.Module, source: nn.Module) -> None:
    """``fused`` (new) takes ``source``'s state and remembers its class and attributes, to
    rebuild it with ``_rebuild``."""
    adopt_state(fused, source)
    fused._eager_type, fused._eager_attrs = type(source), own_attributes(source)


def _rebuild(eager_type: type, attrs: dict, holder: nn.Module) -> nn.Module:
    """A module of ``eager_type`` over ``holder``'s children, parameters and buffers (the same
    objects), in its training mode, with the attributes named in ``attrs`` as ``holder`` has
    them now (it carries them: a change after conversion, e.g. of momentum, is kept)."""
    return rebuild(eager_type, {k: holder.__dict__.get(k, v) for k, v in attrs.items()}, holder)


def conv_reason(conv: nn.Module, kind: Optional[type] = None) -> Optional[str]:
    """Why ``conv`` (of class ``kind``, by default its own) is not a conv the ops run (None:
    it is)."""
    kind = kind or type(conv)
    if kind is not nn.Conv2d:
        return f"{kind.__name__} is not a plain nn.Conv2d"
    k = conv.kernel_size[0]
    if conv.kernel_size != (k, k) or k % 2 == 0:
        return f"kernel {conv.kernel_size} (only square, odd sizes)"
    if conv.stride[0] != conv.stride[1]:
        return f"stride {conv.stride} (only equal strides)"
    if conv.padding != (k // 2, k // 2) or conv.padding_mode != "zeros":
        return f"padding {conv.padding} {conv.padding_mode!r} (only zero padding k//2)"
    if conv.dilation != (1, 1) or conv.groups != 1:
        return f"dilation {conv.dilation}, groups {conv.groups} (only 1 and 1)"
    if conv.bias is not None:
        return "conv with bias (the BatchNorm after it makes one redundant; not fused)"
    return None


def norm_reason(bn: nn.Module, channels: int, kind: Optional[type] = None) -> Optional[str]:
    """Why ``bn`` (of class ``kind``, by default its own) is not a BatchNorm the ops run over
    ``channels`` (None: it is)."""
    kind = kind or type(bn)
    if qualified_name(kind) not in BATCH_NORMS:
        return f"{kind.__name__} is not BatchNorm2d"
    if bn.num_features != channels:
        return f"{bn.num_features} BatchNorm features for {channels} channels"
    return None


def _run(module: nn.Module, x: torch.Tensor, conv: nn.Module, bn: nn.Module,
         pool: bool) -> torch.Tensor:
    training = _uses_batch_stats(bn)
    params = _bn_params(bn)
    if pool:
        out = functional.pointwise_bn_act_pool(x, conv.weight, params, training=training,
                                               activation=module.activation)
        return out[:, :, None, None]
    return functional.conv_bn_act(x, conv.weight, params, stride=conv.stride[0],
                                  training=training, activation=module.activation)


def _trace(module: nn.Module, x: torch.fx.Proxy, eager) -> torch.fx.Proxy:
    """Under torch.fx, one ``call_module`` node (a leaf), so the graph runs the fused op."""
    path = x.tracer.path_of_module(module)
    if not path:
        return eager(x)
    return x.tracer.create_proxy("call_module", path, (x,), {})


def _scripted_as(module: nn.Module, eager: nn.Module) -> nn.Module:
    """torch.jit.script cannot compile the fused op's Python wrapper: ``eager`` (the replaced
    layer, same parameters and state) is scripted instead, with a warning."""
    warnings.warn(f"torch.jit.script: {type(module).__name__} runs fused_mbconv's kernels from "
                  f"Python; scripting its eager {type(eager).__name__} instead (same parameters "
                  f"and state; see fused_mbconv.revert)", stacklevel=3)
    return eager


def _runs_eager(x: torch.Tensor) -> bool:
    # ONNX has no form for the fused op; an empty batch has no statistics.
    return torch.onnx.is_in_onnx_export() or x.numel() == 0


class FusedConvBNAct(nn.Sequential):
    """``Sequential(conv, BatchNorm, activation)`` as one fused op: conv + BN + act. Still a
    Sequential of the same children (``layer[0]`` is the conv), with its own forward."""

    pool: bool = False
    activation: str = "silu"
    _eager_type: type = nn.Sequential
    _eager_attrs: Optional[dict] = None

    @classmethod
    def from_sequential(cls, source: nn.Module, activation: str) -> "FusedConvBNAct":
        """The fused form of ``source`` (children "0" conv, "1" BN, "2" the ``activation``
        module), sharing its children."""
        fused = cls.__new__(cls)
        _stand_in_for(fused, source)
        fused.activation = activation
        reason = fused.eager_reason()
        if reason is not None:
            raise ValueError(f"{type(source).__name__} cannot be fused: {reason}")
        return fused

    def eager_block(self) -> nn.Module:
        """The container this module stands for, over the same children."""
        return _rebuild(self._eager_type, self._eager_attrs, self)

    def eager_modules(self) -> Dict[str, nn.Module]:
        """What ``fm.revert`` puts back: {"": the original container}."""
        return {"": self.eager_block()}

    def eager_reason(self) -> Optional[str]:
        """Why a call in the present module tree runs the eager math, or None (fused)."""
        children = list(self._modules.values())
        if len(children) != 3:
            return f"expected conv, BatchNorm and activation children, got {len(children)}"
        conv, bn, act = children
        reason = conv_reason(conv) or norm_reason(bn, conv.out_channels)
        if reason is None and type(act) is not ACTIVATIONS.get(self.activation):
            reason = f"activation {type(act).__name__} is not {self.activation}"
        return reason

    def _eager(self, x: torch.Tensor) -> torch.Tensor:
        out = self.eager_block()(x)
        return F.adaptive_avg_pool2d(out, 1) if self.pool else out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, torch.fx.Proxy):
            return _trace(self, x, self._eager)
        if _runs_eager(x) or self.eager_reason() is not None:
            return self._eager(x)
        conv, bn, _ = self._modules.values()
        return _run(self, x, conv, bn, self.pool)

    def __prepare_scriptable__(self) -> nn.Module:
        # Unpooled: the model's own global average pool after the head does the pooling.
        return _scripted_as(self, self.eager_block())

    def extra_repr(self) -> str:
        return f"activation={self.activation}, pool={self.pool}"


class FusedHead(FusedConvBNAct):
    """A 1x1 ``Sequential(conv, BatchNorm, activation)`` and the global average pool after it
    as one op; the output is the pooled (N, C, 1, 1) map."""

    pool = True

    def eager_reason(self) -> Optional[str]:
        reason = super().eager_reason()
        if reason is None and next(iter(self._modules.values())).kernel_size != (1, 1):
            reason = "the pooled head fuses a 1x1 conv only"
        return reason


class FoldedBatchNorm(nn.Module):
    """A BatchNorm that the ``FusedPairConv`` before it applies: an instance of the BN's own
    class (``folded_type``; isinstance-based freeze helpers find it), with its parameters,
    buffers and attributes under their names. Its forward passes its input on while that conv
    runs fused, and applies the BatchNorm itself while the conv runs eager (or was swapped)."""

    _eager_type: type = nn.BatchNorm2d
    _eager_attrs: Optional[dict] = None
    # (parent module, the conv's name in it): the partner is looked up at each call, so a
    # swapped conv (or BN) shows.
    _place: Optional[tuple] = None

    @classmethod
    def from_module(cls, bn: nn.Module, parent: nn.Module, conv_name: str
                    ) -> "FoldedBatchNorm":
        folded = _new_folded(type(bn))
        _stand_in_for(folded, bn)
        folded.__dict__.update(folded._eager_attrs)  # eps, momentum, ... as the BN has them
        folded._place = (parent, conv_name)
        return folded

    def __reduce_ex__(self, protocol):
        # The class is made at run time: pickle and deepcopy rebuild it from the BN's class.
        return _new_folded, (self._eager_type,), self.__dict__

    def partner(self) -> Optional["FusedPairConv"]:
        conv = self._place[0]._modules.get(self._place[1])
        return conv if isinstance(conv, FusedPairConv) and conv.norm is self else None

    def eager_module(self) -> nn.Module:
        return _rebuild(self._eager_type, self._eager_attrs, self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        partner = self.partner()
        if partner is not None and partner.fuses(x):
            return x
        return self._eager_type.forward(self, x)

    def __prepare_scriptable__(self) -> nn.Module:
        return self.eager_module()  # scripted with the eager conv before it

    def extra_repr(self) -> str:
        return (f"{self._eager_type.__name__}({self.num_features}), applied in "
                f"{self._place[1]} while it runs fused")


_FOLDED_TYPES: Dict[type, type] = {}


def folded_type(bn_type: type) -> type:
    """FoldedBatchNorm as a subclass of ``bn_type`` too (one class per BatchNorm class)."""
    if bn_type not in _FOLDED_TYPES:
        _FOLDED_TYPES[bn_type] = type(f"Folded{bn_type.__name__}", (FoldedBatchNorm, bn_type),
                                      {"__module__": __name__})
    return _FOLDED_TYPES[bn_type]


def _new_folded(bn_type: type) -> FoldedBatchNorm:
    cls = folded_type(bn_type)
    return cls.__new__(cls)


class FusedPairConv(nn.Conv2d):
    """A conv and its sibling BatchNorm (a ``FoldedBatchNorm``) with the activation as one op,
    at the conv's place and with its parameters; still an ``nn.Conv2d``. While the pair cannot
    run fused, it runs the conv alone and the BatchNorm's place applies the rest."""

    activation: str = "silu"
    pool = False
    _eager_type: type = nn.Conv2d
    _eager_attrs: Optional[dict] = None
    _place: Optional[tuple] = None  # (parent module, the BatchNorm's name in it)

    @classmethod
    def from_pair(cls, parent: nn.Module, conv_name: str, norm_name: str, activation: str
                  ) -> "FusedPairConv":
        """Fuse ``parent``'s children ``conv_name`` and ``norm_name`` in place (the BN's place
        gets a FoldedBatchNorm); returns the fused conv, set at ``conv_name``."""
        conv = parent._modules[conv_name]
        fused = cls.__new__(cls)
        _stand_in_for(fused, conv)
        fused.__dict__.update(fused._eager_attrs)  # stride, padding, ... as the conv has them
        fused.activation = activation
        fused._place = (parent, norm_name)
        bn = parent._modules[norm_name]
        reason = conv_reason(conv) or norm_reason(bn, conv.out_channels)
        if reason is not None:
            raise ValueError(f"{conv_name} and {norm_name} cannot be fused: {reason}")
        setattr(parent, norm_name, FoldedBatchNorm.from_module(bn, parent, conv_name))
        setattr(parent, conv_name, fused)
        return fused

    @property
    def norm(self) -> nn.Module:
        """The module at the BatchNorm's place now."""
        return self._place[0]._modules.get(self._place[1])

    def eager_conv(self) -> nn.Module:
        return _rebuild(self._eager_type, self._eager_attrs, self)

    def eager_modules(self) -> Dict[str, nn.Module]:
        """What ``fm.revert`` puts back: the conv here, the BatchNorm at its own place."""
        norm = self.norm
        return {"": self.eager_conv(),
                "norm": norm.eager_module() if isinstance(norm, FoldedBatchNorm) else norm}

    def _reason(self, norm: Optional[nn.Module]) -> Optional[str]:
        conv_problem = conv_reason(self, self._eager_type)
        if conv_problem is not None:
            return conv_problem
        if not isinstance(norm, FoldedBatchNorm) or norm._place[0]._modules.get(
                norm._place[1]) is not self:
            return (f"its BatchNorm {self._place[1]} was swapped for "
                    f"{type(norm).__name__}")
        return norm_reason(norm, self.out_channels, norm._eager_type)

    def eager_reason(self) -> Optional[str]:
        """Why a call in the present module tree runs the eager math, or None (fused)."""
        return self._reason(self.norm)

    def fuses(self, x) -> bool:
        """Whether a call on ``x`` runs fused (then the BatchNorm's place passes it on)."""
        if isinstance(x, torch.fx.Proxy):
            return self.eager_reason() is None
        return not _runs_eager(x) and self.eager_reason() is None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, torch.fx.Proxy):
            if self.eager_reason() is not None:
                return self.eager_conv()(x)
            norm = self.norm  # traced as the root itself: conv, then the BN's own forward
            return _trace(self, x, lambda x: norm._eager_type.forward(norm, self.eager_conv()(x)))
        if not self.fuses(x):
            return self.eager_conv()(x)  # the BatchNorm's place applies the rest
        return _run(self, x, self, self.norm, pool=False)

    def __prepare_scriptable__(self) -> nn.Module:
        return _scripted_as(self, self.eager_conv())  # the BN scripts at its own place

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, + {self.norm._eager_type.__name__} + {self.activation}")


def fused_layers() -> Tuple[type, ...]:
    """The module types conversion puts in place of stems and heads."""
    return (FusedConvBNAct, FusedPairConv)
