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

Drop-in in every state: the block remembers the class it replaces (``eager_block()`` rebuilds
it over the same children), and each call where the kernels cannot express the modules' state
runs that block's own eager forward instead (``eager_reason()`` says why): BatchNorms that mix
batch and running statistics, children swapped for modules the kernels do not know, an empty
batch, an ONNX export. Tracing (torch.fx) records the block as one call; scripting scripts the
eager block; ``fused_mbconv.revert`` restores the original blocks for any other tool.
"""

from __future__ import annotations

import warnings
from typing import Callable, Dict, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import functional
from .blocks import MBConv, MBConvSpec
# The recompute levels' one rule, also for convert and efficientnet.
from .functional import DEFAULT_RECOMPUTE, check_recompute

# Block types from_module accepts besides MBConv, each with its recognizer: a function from
# a block to its MBConvSpec, raising ValueError (saying why) for a block it cannot fuse.
_RECOGNIZERS: Dict[type, Callable[[nn.Module], MBConvSpec]] = {}

# nn.Module's own bookkeeping (children, parameters, buffers, hooks): what a fused block and
# the eager block it stands for share; every other attribute is the eager class's own.
_MODULE_STATE = frozenset(vars(nn.Module())) - {"training"}
_ROLES = ("expand_conv", "expand_bn", "dw_conv", "dw_bn", "se_fc1", "se_fc2", "project_conv",
          "project_bn", "drop_path_module", "branch_dropout")


def own_attributes(module: nn.Module) -> dict:
    """``module``'s attributes beyond nn.Module's own state: what its class adds (flags,
    hyperparameters), kept to rebuild the eager module."""
    return {k: v for k, v in vars(module).items() if k not in _MODULE_STATE and k != "training"}


def adopt_state(target: nn.Module, source: nn.Module) -> None:
    """``target`` (new, uninitialized) takes ``source``'s children, parameters and buffers
    under their names, and its training mode."""
    nn.Module.__init__(target)
    target.training = source.training
    target._modules.update(source._modules)
    target._parameters.update(source._parameters)
    target._buffers.update(source._buffers)
    target._non_persistent_buffers_set.update(source._non_persistent_buffers_set)


def rebuild(eager_type: type, attrs: dict, holder: nn.Module) -> nn.Module:
    """A module of ``eager_type`` with attributes ``attrs``, over ``holder``'s children,
    parameters and buffers (the same objects), in its training mode."""
    module = eager_type.__new__(eager_type)
    module.__dict__.update(attrs)
    for name in _MODULE_STATE:
        value = holder.__dict__[name]
        module.__dict__[name] = value.copy() if hasattr(value, "copy") else value
    module.training = holder.training
    return module


def register_block_type(block_type: type, recognize: Callable[[nn.Module], MBConvSpec]) -> None:
    """Teach ``FusedMBConv.from_module`` a block type (the conversion layer's extension point)."""
    _RECOGNIZERS[block_type] = recognize


def _recognizer(block_type: type) -> Optional[Callable[[nn.Module], MBConvSpec]]:
    """The most specific registered recognizer (conversion registers nn.Module as a
    catch-all)."""
    for base in block_type.__mro__:
        if base in _RECOGNIZERS:
            return _RECOGNIZERS[base]
    return None


def _uses_batch_stats(bn: nn.Module) -> bool:
    """``nn.BatchNorm2d``'s rule: batch statistics in training, or without running ones."""
    return bn.training or (bn.running_mean is None and bn.running_var is None)


def _bn_params(bn: nn.Module) -> functional.BatchNormParams:
    """A BatchNorm's state as its own forward hands it to ``F.batch_norm``: a training BN
    that does not track statistics neither reads nor updates its running ones."""
    tracked = not bn.training or bn.track_running_stats
    return functional.BatchNormParams(
        bn.weight, bn.bias, bn.running_mean if tracked else None,
        bn.running_var if tracked else None, bn.num_batches_tracked, bn.momentum, bn.eps)


def _descendants(block: nn.Module) -> list:
    """Every module under ``block``, in a fixed order: a swapped child changes the list."""
    found, stack = [], list(block._modules.values())
    while stack:
        module = stack.pop()
        if module is not None:
            found.append(module)
            stack.extend(module._modules.values())
    return found


class FusedMBConv(MBConv):
    """MBConv computed by the fused kernels: same arguments, math and state_dict keys.

    ``recompute`` (attribute and argument) trades backward work for activation memory:
    False keeps the expand output e and the depthwise output d for backward; "dwconv" (the
    default) keeps e only and recomputes d (one more depthwise pass in backward); True keeps
    only the block input, statistics and SE vectors and recomputes e (the expand GEMM again),
    then d. Blocks without expansion have no e: True is "dwconv" there.
    ``recompute_dwconv``: the deprecated spelling of ``recompute="dwconv"``."""

    _recompute: Union[bool, str] = DEFAULT_RECOMPUTE
    # The class this block stands for and its own (non-Module) attributes: eager_block().
    _eager_type: type = MBConv
    _eager_attrs: Optional[dict] = None
    # (descendant modules, spec, reason): the spec and the module tree it was derived from.
    _spec_cache: Optional[tuple] = None

    def __init__(self, *args, recompute: Union[bool, str, None] = None,
                 recompute_dwconv: Optional[bool] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._eager_attrs = own_attributes(self)
        self.recompute = functional.resolve_recompute(recompute, recompute_dwconv)

    @property
    def recompute(self) -> Union[bool, str]:
        return self._recompute

    @recompute.setter
    def recompute(self, level: Union[bool, str]) -> None:
        self._recompute = check_recompute(level)

    @property
    def recompute_dwconv(self) -> bool:
        """Deprecated: whether backward recomputes d (``recompute`` is "dwconv" or True)."""
        warnings.warn("recompute_dwconv is deprecated: read recompute", DeprecationWarning,
                      stacklevel=2)
        return self._recompute is not False

    @recompute_dwconv.setter
    def recompute_dwconv(self, value: bool) -> None:
        warnings.warn("recompute_dwconv is deprecated: set recompute = 'dwconv' (or True, "
                      "which recomputes the expand output as well)", DeprecationWarning,
                      stacklevel=2)
        self.recompute = "dwconv" if value else False

    @classmethod
    def from_module(cls, block: nn.Module) -> "FusedMBConv":
        """The fused form of ``block``, sharing its parameters and buffers."""
        if isinstance(block, MBConv):
            fused = cls._adopt(block)
            fused.__dict__.update(fused._eager_attrs)
            return fused
        recognize = _recognizer(type(block))
        if recognize is not None:
            return cls.from_spec(block, recognize(block))
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
        for role in _ROLES:
            module = getattr(spec, role)
            if module is not None and id(module) not in owned:
                raise ValueError(f"spec.{role} is not a submodule of the source block")
        fused = cls._adopt(source)
        fused._set_spec(spec)
        return fused

    @classmethod
    def _adopt(cls, source: nn.Module) -> "FusedMBConv":
        fused = cls.__new__(cls)
        adopt_state(fused, source)
        if isinstance(source, FusedMBConv):  # re-fusing (e.g. as SyncFusedMBConv)
            fused._eager_type, fused._eager_attrs = source._eager_type, dict(source._eager_attrs)
            fused.recompute = source.recompute
        else:
            fused._eager_type, fused._eager_attrs = type(source), own_attributes(source)
        return fused

    def _set_spec(self, spec: MBConvSpec) -> None:
        """Adopt ``spec`` for the current module tree, and the block attributes it implies."""
        self._cache_spec(spec, None)
        hidden = spec.dw_conv.in_channels
        cin = spec.expand_conv.in_channels if spec.expand_conv is not None else hidden
        self.__dict__.update(
            in_channels=cin, out_channels=spec.project_conv.out_channels,
            hidden_channels=hidden, expand_ratio=hidden / cin, kernel_size=spec.kernel_size,
            stride=spec.stride, use_residual=spec.residual, activation=spec.activation,
            se_activation=spec.se_activation, se_gate=spec.se_gate)

    def eager_block(self) -> nn.Module:
        """The block this one stands for (its original class), over the same children,
        parameters and buffers, in the same training mode: ``fused_mbconv.revert``'s unit."""
        return rebuild(self._eager_type, self._eager_attrs, self)

    def _cache_spec(self, spec: Optional[MBConvSpec], reason: Optional[str]) -> None:
        self._spec_cache = (_descendants(self), spec, reason)

    def _spec_is_current(self) -> bool:
        """Whether the cached spec still describes the module tree: the very same modules (a
        deepcopy or pickle copies the cache along with them; a swapped child differs)."""
        if self._spec_cache is None:
            return False
        cached, current = self._spec_cache[0], _descendants(self)
        return len(cached) == len(current) and all(a is b for a, b in zip(cached, current))

    def _current_spec(self) -> Tuple[Optional[MBConvSpec], Optional[str]]:
        """(spec, None) while the module tree is one the kernels run, else (None, reason).
        Re-derived from the eager block only when a child has been swapped."""
        if not self._spec_is_current():
            recognize = _recognizer(self._eager_type)
            if recognize is None:
                spec, reason = None, (f"its children changed and no recognizer knows "
                                      f"{self._eager_type.__qualname__}")
            else:
                try:
                    spec, reason = recognize(self.eager_block()), None
                except (TypeError, ValueError) as exc:
                    spec, reason = None, str(exc)
            self._cache_spec(spec, reason)
        return self._spec_cache[1], self._spec_cache[2]

    def spec(self) -> MBConvSpec:
        spec, reason = self._current_spec()
        if spec is None:
            raise ValueError(f"this block cannot run fused now: {reason}")
        return spec

    def eager_reason(self) -> Optional[str]:
        """Why a call in the block's present state runs the eager math, or None (fused)."""
        spec, reason = self._current_spec()
        if spec is None:
            return reason
        bns = [bn for bn in (spec.expand_bn, spec.dw_bn, spec.project_bn) if bn is not None]
        if len({_uses_batch_stats(bn) for bn in bns}) > 1:
            modes = ", ".join(f"{role} {'batch' if _uses_batch_stats(bn) else 'running'}"
                              for role, bn in zip(("expand BN", "depthwise BN", "project BN"),
                                                  (spec.expand_bn, spec.dw_bn, spec.project_bn))
                              if bn is not None)
            return f"its BatchNorms mix batch and running statistics ({modes})"
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, torch.fx.Proxy):
            return self._trace(x)
        # ONNX has no form for the fused op: an export records the eager math instead.
        if torch.onnx.is_in_onnx_export() or x.numel() == 0 or self.eager_reason() is not None:
            return self.eager_block().forward(x)
        spec = self.spec()
        if spec.dw_pad is not None and x.dim() == 4 and not functional.dw_padding_fits(
                spec.dw_pad, x.shape[2], x.shape[3], spec.kernel_size, spec.stride):
            # e.g. a fixed TF-style pad layer on an odd-sized map: its output size is not the
            # kernels' ceil(size / stride)
            return self.eager_block().forward(x)
        se = None
        if spec.se_fc1 is not None:
            se = (spec.se_fc1.weight, spec.se_fc1.bias, spec.se_fc2.weight, spec.se_fc2.bias)
        drop_module = spec.drop_path_module
        training = _uses_batch_stats(spec.dw_bn)
        # Element-wise branch dropout is not in the kernels: the op returns the branch and the
        # dropout and residual add follow it, as in the eager block.
        dropout = spec.branch_dropout
        dropping = dropout is not None and dropout.training and dropout.p > 0
        out = functional.mbconv(
            x, spec.dw_conv.weight, _bn_params(spec.dw_bn), spec.project_conv.weight,
            _bn_params(spec.project_bn),
            expand_weight=spec.expand_conv.weight if spec.expand_conv is not None else None,
            bn1=_bn_params(spec.expand_bn) if spec.expand_bn is not None else None,
            se_weights=se, stride=spec.stride, training=training,
            residual=spec.residual and not dropping,
            drop_path=spec.drop_path, activation=spec.activation,
            se_activation=spec.se_activation, se_gate=spec.se_gate,
            recompute=self.recompute, dw_padding=spec.dw_pad,
            sync=self.stats_sync() if training else None,
            drop_path_training=(drop_module if drop_module is not None else self).training)
        return x + F.dropout(out, dropout.p, training=True) if dropping else out

    def _trace(self, x: torch.fx.Proxy) -> torch.fx.Proxy:
        """Under torch.fx, the block is one ``call_module`` node (a leaf), so the traced
        graph runs the fused block; traced as the root itself, its eager ops are recorded."""
        path = x.tracer.path_of_module(self)
        if not path:
            return self.eager_block().forward(x)
        return x.tracer.create_proxy("call_module", path, (x,), {})

    def __prepare_scriptable__(self) -> nn.Module:
        """torch.jit.script cannot compile the fused op's Python wrapper: script the eager
        block instead (same children and state), and say so."""
        warnings.warn(f"torch.jit.script: {type(self).__name__} runs fused_mbconv's kernels "
                      f"from Python; scripting its eager {self._eager_type.__qualname__} "
                      f"instead (same parameters and state; see fused_mbconv.revert)",
                      stacklevel=2)
        return self.eager_block()

    def stats_sync(self) -> Optional[functional.BatchStatsSync]:
        """Where training statistics are reduced across processes: nowhere here (see
        ``convert.SyncFusedMBConv``)."""
        return None
