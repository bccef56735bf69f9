"""Functional fused ops, shaped like ``torch.nn.functional.batch_norm``.

Inputs are checked here, before any kernel runs, so a bad call fails with a message naming
the problem and leaves running statistics untouched. In training, running statistics are
updated in place exactly as ``nn.BatchNorm2d`` does (unbiased variance, ``momentum``).
"""

from __future__ import annotations

import contextlib
import warnings
from typing import NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from . import ops  # noqa: F401  (registers torch.ops.fused_mbconv)
from .activations import ACTIVATIONS, GATES, check_name
from .ops.dwconv_bn_silu import conv_output_size
from .ops.mbconv import BatchStatsSync, mbconv_synced
from .tensors import accumulate_dtype

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_values_per_channel(x: Tensor, k: int, stride: int, training: bool) -> None:
    """Training BatchNorm after a k x k, stride conv needs more than one value per channel."""
    if training:
        values = x.shape[0] * conv_output_size(x.shape[2], k, stride) * \
            conv_output_size(x.shape[3], k, stride)
        if values <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got "
                             f"input size {tuple(x.shape)} (output {values} value per channel)")


def _check_float(name: str, t: Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor (float16, bfloat16, float32 "
                        f"or float64), got {t.dtype}")


def _check_channel_vector(name: str, t: Optional[Tensor], x: Tensor,
                          channels: Optional[int] = None) -> None:
    """``t`` is None or a float (channels,) vector on x's device (channels: x's by default)."""
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a tensor or None, got {type(t).__name__}")
    _check_float(name, t)
    if channels is None:
        channels = x.shape[1]
    if t.shape != (channels,):
        raise ValueError(f"{name} must have shape ({channels},) to match the "
                         f"{channels} channels it normalizes, got {tuple(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but input is on {x.device}")


def check_dwconv_args(x: Tensor, weight: Tensor, stride: int, training: bool,
                      running_mean: Optional[Tensor], running_var: Optional[Tensor],
                      bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
                      momentum: float, eps: float) -> None:
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise ValueError(f"input must be a 4-D (N, C, H, W) tensor, got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    _check_float("input", x)
    channels = x.shape[1]
    if weight.dim() != 4 or weight.shape[0] != channels or weight.shape[1] != 1 \
            or weight.shape[2] != weight.shape[3]:
        raise ValueError(f"conv_weight must have shape (C, 1, k, k) with C={channels} "
                         f"(the input's channels), got {tuple(weight.shape)}")
    k = weight.shape[-1]
    if k % 2 == 0:
        raise ValueError(f"kernel size must be odd (padding k//2 keeps 'same' alignment), "
                         f"got {k}")
    if weight.dtype != x.dtype:
        raise TypeError(f"conv_weight dtype {weight.dtype} does not match input dtype {x.dtype}")
    if weight.device != x.device:
        raise ValueError(f"conv_weight is on {weight.device} but input is on {x.device}")
    if stride not in (1, 2):
        raise ValueError(f"stride must be 1 or 2, got {stride!r}")
    for name, t in (("running_mean", running_mean), ("running_var", running_var),
                    ("bn_weight", bn_weight), ("bn_bias", bn_bias)):
        _check_channel_vector(name, t, x)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together")
    if not training and running_mean is None:
        raise ValueError("running_mean and running_var are required when training=False")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps!r}")
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum!r}")
    if min(x.shape) == 0:
        raise ValueError(f"input has an empty dimension: shape {tuple(x.shape)}")
    _check_values_per_channel(x, k, stride, training)


@torch.no_grad()
def update_running_stats(running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor,
                         count: int, momentum: float) -> None:
    """``nn.BatchNorm2d``'s update: the running variance takes the unbiased batch variance."""
    unbiased = var * (count / (count - 1))
    running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
    running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)


def _needs_grad(*tensors: Optional[Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _autocast_dtype(x: Tensor) -> Optional[torch.dtype]:
    """The dtype eager convolutions on x's device run in under ``torch.autocast`` now, or None
    (also on devices autocast does not know, such as ``meta``)."""
    device_type = x.device.type
    if not torch.amp.is_autocast_available(device_type) \
            or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def _autocast_off(x: Tensor):
    """Autocast disabled around the op, which casts its operands itself."""
    device_type = x.device.type
    if not torch.amp.is_autocast_available(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)


def _cast_for_conv(t: Optional[Tensor], dtype: Optional[torch.dtype]) -> Optional[Tensor]:
    """What autocast does to a convolution operand: floating tensors, float64 aside, take the
    autocast dtype. BatchNorm tensors are never passed here: they keep their dtype, as in eager."""
    if t is None or dtype is None or not t.is_floating_point() or t.dtype == torch.float64:
        return t
    return t.to(dtype)


def dwconv_bn_silu(input: Tensor, conv_weight: Tensor, running_mean: Optional[Tensor],
                   running_var: Optional[Tensor], bn_weight: Optional[Tensor] = None,
                   bn_bias: Optional[Tensor] = None, stride: int = 1, training: bool = False,
                   momentum: float = 0.1, eps: float = 1e-5) -> Tensor:
    """SiLU(BatchNorm2d(Conv2d(C, C, k, stride, padding=k//2, groups=C, bias=False)(input))).

    The output keeps the input's memory format (NCHW or channels_last). Under
    ``torch.autocast`` the convolution runs in the autocast dtype, as eager's does."""
    amp = _autocast_dtype(input)
    input, conv_weight = _cast_for_conv(input, amp), _cast_for_conv(conv_weight, amp)
    check_dwconv_args(input, conv_weight, stride, training, running_mean, running_var,
                      bn_weight, bn_bias, momentum, eps)
    x = input if input.is_contiguous(memory_format=torch.channels_last) else input.contiguous()
    with _autocast_off(x):
        out, _, mean, var = torch.ops.fused_mbconv.dwconv_bn_silu(
            x, conv_weight.contiguous(), bn_weight, bn_bias, running_mean, running_var, stride,
            training, eps, _needs_grad(input, conv_weight, bn_weight, bn_bias))
    if training and running_mean is not None:
        update_running_stats(running_mean, running_var, mean, var,
                             out.numel() // out.shape[1], momentum)
    return out


def drop_path_scale(x: Tensor, p: float) -> Tensor:
    """Stochastic depth's per-sample factor, shaped (N, 1, ..., 1) in x's dtype: 0 with
    probability p, else 1/(1-p). One ``bernoulli_`` draw on the default generator, so the eager
    and the fused block drop the same samples from the same seed."""
    keep = 1.0 - p
    mask = torch.empty((x.shape[0],) + (1,) * (x.dim() - 1), dtype=x.dtype, device=x.device)
    return mask.bernoulli_(keep).div_(keep)


class BatchNormParams(NamedTuple):
    """One BatchNorm2d's parameters and state, as ``fused_mbconv.functional.mbconv`` takes them.

    ``momentum=None`` is the cumulative average (factor 1 / num_batches_tracked), as in
    ``nn.BatchNorm2d``; ``num_batches_tracked`` is incremented by every training call."""

    weight: Optional[Tensor]
    bias: Optional[Tensor]
    running_mean: Optional[Tensor]
    running_var: Optional[Tensor]
    num_batches_tracked: Optional[Tensor] = None
    momentum: Optional[float] = 0.1
    eps: float = 1e-5

    @classmethod
    def from_module(cls, bn: torch.nn.modules.batchnorm._BatchNorm) -> "BatchNormParams":
        return cls(bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.num_batches_tracked,
                   bn.momentum, bn.eps)


def _check_conv_weight(name: str, w: Tensor, shape: Sequence[Optional[int]], x: Tensor,
                       what: str) -> None:
    """w is a tensor of x's dtype and device whose shape matches ``shape`` (None: any)."""
    if not isinstance(w, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(w).__name__}")
    if w.dim() != len(shape) or any(s is not None and s != n for s, n in zip(shape, w.shape)):
        want = ", ".join("?" if s is None else str(s) for s in shape)
        raise ValueError(f"{name} must have shape ({want}) ({what}), got {tuple(w.shape)}")
    if w.dtype != x.dtype:
        raise TypeError(f"{name} dtype {w.dtype} does not match input dtype {x.dtype}")
    if w.device != x.device:
        raise ValueError(f"{name} is on {w.device} but input is on {x.device}")


def _check_bn(name: str, bn: BatchNormParams, channels: int, x: Tensor, training: bool) -> None:
    if not isinstance(bn, BatchNormParams):
        raise TypeError(f"{name} must be a fused_mbconv.functional.BatchNormParams, got "
                        f"{type(bn).__name__}")
    for field in ("weight", "bias", "running_mean", "running_var"):
        _check_channel_vector(f"{name}.{field}", getattr(bn, field), x, channels)
    if (bn.running_mean is None) != (bn.running_var is None):
        raise ValueError(f"{name}: running_mean and running_var must be given together")
    if not training and bn.running_mean is None:
        raise ValueError(f"{name}: running_mean and running_var are required when "
                         f"training=False")
    if not bn.eps > 0:
        raise ValueError(f"{name}.eps must be > 0, got {bn.eps!r}")
    if bn.momentum is None:
        if training and bn.running_mean is not None and bn.num_batches_tracked is None:
            raise ValueError(f"{name}: momentum=None (cumulative average) needs "
                             f"num_batches_tracked")
    elif not 0.0 <= bn.momentum <= 1.0:
        raise ValueError(f"{name}.momentum must be in [0, 1] or None, got {bn.momentum!r}")


def check_mbconv_args(x: Tensor, expand_weight: Optional[Tensor], bn1: Optional[BatchNormParams],
                      dw_weight: Tensor, bn2: BatchNormParams,
                      se_weights: Optional[Sequence[Tensor]], project_weight: Tensor,
                      bn3: BatchNormParams, stride: int, training: bool, residual: bool,
                      drop_path: float, activation: str, se_activation: str,
                      se_gate: str) -> None:
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise ValueError(f"input must be a 4-D (N, C, H, W) tensor, got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    _check_float("input", x)
    if min(x.shape) == 0:
        raise ValueError(f"input has an empty dimension: shape {tuple(x.shape)}")
    cin = x.shape[1]
    if (expand_weight is None) != (bn1 is None):
        raise ValueError("expand_weight and bn1 must be given together (or both None for a "
                         "block without expansion)")
    hidden = cin
    if expand_weight is not None:
        _check_conv_weight("expand_weight", expand_weight, (None, cin, 1, 1), x,
                           f"a 1x1 conv from the input's {cin} channels")
        hidden = expand_weight.shape[0]
        _check_bn("bn1", bn1, hidden, x, training)
    _check_conv_weight("dw_weight", dw_weight, (hidden, 1, None, None), x,
                       f"a depthwise conv over the {hidden} expanded channels")
    k = dw_weight.shape[-1]
    if dw_weight.shape[2] != k or k % 2 == 0:
        raise ValueError(f"dw_weight must have a square odd kernel (padding k//2 keeps 'same' "
                         f"alignment), got kernel {tuple(dw_weight.shape[2:])}")
    if stride not in (1, 2):
        raise ValueError(f"stride must be 1 or 2, got {stride!r}")
    _check_bn("bn2", bn2, hidden, x, training)
    if se_weights is not None:
        if len(se_weights) != 4:
            raise ValueError("se_weights must be (fc1_weight, fc1_bias, fc2_weight, fc2_bias)")
        fc1_w, fc1_b, fc2_w, fc2_b = se_weights
        _check_conv_weight("fc1_weight", fc1_w, (None, hidden, 1, 1), x,
                           f"SE squeeze 1x1 conv from the {hidden} expanded channels")
        squeeze = fc1_w.shape[0]
        _check_conv_weight("fc1_bias", fc1_b, (squeeze,), x, "the SE squeeze bias")
        _check_conv_weight("fc2_weight", fc2_w, (hidden, squeeze, 1, 1), x,
                           f"SE excite 1x1 conv from {squeeze} to {hidden} channels")
        _check_conv_weight("fc2_bias", fc2_b, (hidden,), x, "the SE excite bias")
    _check_conv_weight("project_weight", project_weight, (None, hidden, 1, 1), x,
                       f"a 1x1 conv from the {hidden} expanded channels")
    cout = project_weight.shape[0]
    _check_bn("bn3", bn3, cout, x, training)
    if residual and (stride != 1 or cout != cin):
        raise ValueError(f"residual needs stride 1 and out_channels == in_channels, got "
                         f"stride {stride}, {cin} -> {cout} channels")
    if not 0.0 <= drop_path < 1.0:
        raise ValueError(f"drop_path must be in [0, 1), got {drop_path!r}")
    for name, value, choices in (("activation", activation, ACTIVATIONS),
                                 ("se_activation", se_activation, ACTIVATIONS),
                                 ("se_gate", se_gate, GATES)):
        check_name(value, choices, name)
    if training:
        ho, wo = (conv_output_size(s, k, stride) for s in x.shape[2:])
        values = x.shape[0] * ho * wo
        if values <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got "
                             f"input size {tuple(x.shape)} (output {values} value per channel)")


# A depthwise conv's zero padding: None, k//2 on every side (what the kernels run); "same",
# TensorFlow's SAME, chosen from each input's size (timm's Conv2dSame, Hugging Face's
# tf_padding); or an explicit (left, right, top, bottom), a pad layer's before an unpadded conv.
DwPadding = Union[None, str, Tuple[int, int, int, int]]


def same_padding(size: int, kernel_size: int, stride: int) -> Tuple[int, int]:
    """TensorFlow SAME padding of one axis, (before, after): ceil(size / stride) outputs, the
    odd pixel of an uneven total after."""
    total = max((-(-size // stride) - 1) * stride + kernel_size - size, 0)
    return total // 2, total - total // 2


def dw_padding_sides(padding: DwPadding, height: int, width: int, kernel_size: int,
                     stride: int) -> Tuple[int, int, int, int]:
    """``padding`` as (left, right, top, bottom) zeros for a height x width input."""
    if padding is None:
        return (kernel_size // 2,) * 4
    if isinstance(padding, str):
        if padding != "same":
            raise ValueError(f"dw_padding must be None, 'same' or (left, right, top, bottom), "
                             f"got {padding!r}")
        return (*same_padding(width, kernel_size, stride),
                *same_padding(height, kernel_size, stride))
    sides = tuple(padding)
    if len(sides) != 4 or not all(isinstance(p, int) and 0 <= p < kernel_size for p in sides):
        raise ValueError(f"dw_padding (left, right, top, bottom) must be 4 ints in [0, "
                         f"{kernel_size - 1}] for a {kernel_size}x{kernel_size} kernel, got "
                         f"{padding!r}")
    return sides


def dw_padding_fits(padding: DwPadding, height: int, width: int, kernel_size: int,
                    stride: int) -> bool:
    """Whether ``padding`` on a height x width input gives the kernels' output size,
    ceil(size / stride) (ValueError for a malformed ``padding``)."""
    return _sides_fit(dw_padding_sides(padding, height, width, kernel_size, stride), height,
                      width, kernel_size, stride)


def _sides_fit(sides: Tuple[int, int, int, int], height: int, width: int, k: int,
               stride: int) -> bool:
    left, right, top, bottom = sides
    return all((size + before + after - k) // stride + 1 == conv_output_size(size, k, stride)
               for size, before, after in ((height, top, bottom), (width, left, right)))


def padded_dw_weight(weight: Tensor, padding: DwPadding, height: int, width: int, stride: int
                     ) -> Optional[Tensor]:
    """The depthwise weight the kernels run for ``padding`` on a height x width input: the
    weight itself for k//2 on every side, else the k x k taps placed, with zero taps around
    them, in the smallest odd kernel whose symmetric padding reads the same input pixels.
    Exact (the extra taps add zeros), at (k + 2m)^2 / k^2 the depthwise multiply-adds, m the
    largest offset of a side from k//2. None where the padding gives another output size than
    the kernels' ceil(size / stride): that input runs eager."""
    k = weight.shape[-1]
    sides = dw_padding_sides(padding, height, width, k, stride)
    if sides == (k // 2,) * 4:
        return weight
    if not _sides_fit(sides, height, width, k, stride):
        return None
    left, _, top, _ = sides
    m = max(abs(top - k // 2), abs(left - k // 2))
    # tap (i, j) of the k x k kernel reads input row out * stride - top + i; in the
    # (k + 2m) kernel with padding k//2 + m that is tap i + (k//2 + m - top)
    row, col = k // 2 + m - top, k // 2 + m - left
    return F.pad(weight, (col, 2 * m - col, row, 2 * m - row))


# What fused_mbconv::mbconv keeps for backward at each ``recompute`` level, as its
# (keep_expand_output, keep_dwconv_output) flags; backward recomputes what is not kept.
RECOMPUTE_LEVELS = {False: (True, True), "dwconv": (True, False), True: (False, False)}
# d is one depthwise pass from e (memory-bound, no GEMM), so keeping it costs more memory than
# recomputing it costs time: the default keeps e only.
DEFAULT_RECOMPUTE = "dwconv"
RECOMPUTE_HELP = ("False (save the expand output e and the depthwise output d), 'dwconv' "
                  "(save e, recompute d) or True (save neither: recompute e from the block "
                  "input, then d)")


def check_recompute(recompute) -> Union[bool, str]:
    """``recompute`` if it is one of RECOMPUTE_LEVELS (by identity for the bools: 0 and 1 are
    not levels), else ValueError naming the allowed values."""
    if isinstance(recompute, bool) or (isinstance(recompute, str) and recompute == "dwconv"):
        return recompute
    raise ValueError(f"recompute must be {RECOMPUTE_HELP}; got {recompute!r}")


def resolve_recompute(recompute, recompute_dwconv: Optional[bool]) -> Union[bool, str]:
    """The level asked for by ``recompute`` (None: DEFAULT_RECOMPUTE) and the deprecated
    ``recompute_dwconv`` alias (None: not given; True means ``recompute="dwconv"``, False
    ``recompute=False``)."""
    if recompute_dwconv is None:
        return DEFAULT_RECOMPUTE if recompute is None else check_recompute(recompute)
    warnings.warn("recompute_dwconv is deprecated: use recompute='dwconv' (or recompute=True "
                  "to recompute the expand output as well)", DeprecationWarning, stacklevel=3)
    if recompute is not None:
        raise ValueError(f"give recompute ({recompute!r}) or the deprecated recompute_dwconv "
                         f"({recompute_dwconv!r}), not both")
    return "dwconv" if recompute_dwconv else False


@torch.no_grad()
def _update_bn(bn: BatchNormParams, mean: Tensor, var: Tensor, count: int) -> None:
    if bn.running_mean is None:
        return
    if bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
    momentum = bn.momentum
    if momentum is None:
        momentum = 1.0 / float(bn.num_batches_tracked)
    update_running_stats(bn.running_mean, bn.running_var, mean, var, count, momentum)


def mbconv(input: Tensor, dw_weight: Tensor, bn2: BatchNormParams, project_weight: Tensor,
           bn3: BatchNormParams, *, expand_weight: Optional[Tensor] = None,
           bn1: Optional[BatchNormParams] = None, se_weights: Optional[Sequence[Tensor]] = None,
           stride: int = 1, training: bool = False, residual: bool = False,
           drop_path: float = 0.0, activation: str = "silu", se_activation: str = "silu",
           se_gate: str = "sigmoid", recompute: Union[bool, str, None] = None,
           sync: Optional[BatchStatsSync] = None,
           drop_path_training: Optional[bool] = None,
           recompute_dwconv: Optional[bool] = None, dw_padding: DwPadding = None) -> Tensor:
    """The MBConv block (``fused_mbconv.MBConv``'s forward) as one fused op.

    expand 1x1 conv (``expand_weight`` (Ce, Cin, 1, 1)) + ``bn1`` + act, absent when None;
    depthwise conv (``dw_weight`` (Ce, 1, k, k), ``stride``, zero padding ``dw_padding``:
    None, k//2 on every side; "same", TensorFlow's SAME; or (left, right, top, bottom), see
    ``padded_dw_weight``) + ``bn2`` + act;
    squeeze-excite from ``se_weights`` = (fc1 weight (S, Ce, 1, 1), fc1 bias (S,), fc2 weight
    (Ce, S, 1, 1), fc2 bias (Ce,)), absent when None; projection 1x1 conv (``project_weight``
    (Cout, Ce, 1, 1)) + ``bn3``; with ``residual``, + input, the branch scaled per sample by
    stochastic depth (``drop_path``, applied when ``drop_path_training``, which defaults to
    ``training``: a block whose BatchNorms are frozen may still drop). ``training`` selects
    batch statistics for all three BatchNorms. Conv weights share the input's dtype;
    BatchNorm tensors may be any float dtype.

    In training, each BatchNorm's running statistics (and num_batches_tracked) are updated in
    place after the op succeeds, exactly as ``nn.BatchNorm2d`` does; a call that raises
    changes nothing. ``recompute`` trades backward work for activation memory: False keeps
    the expand output e and the depthwise output d for backward; "dwconv" (the default,
    None) keeps e only (backward recomputes d from e, one more depthwise pass); True keeps
    neither, only the block input, statistics and SE vectors (backward recomputes e with the
    expand GEMM, then d). Without expansion there is no e: True is "dwconv". Gradients and
    running statistics are the same at every level (statistics are computed and updated
    once, in the forward). ``recompute_dwconv=True``, deprecated, is ``recompute="dwconv"``.
    The output keeps the input's memory format (NCHW or channels_last). Under
    ``torch.autocast`` the convolutions run in the autocast dtype, as eager's do; a residual
    input of a wider dtype is added outside the kernels so that the output dtype promotes
    exactly as eager's ``branch + input``.

    ``sync`` (training only): synchronized BatchNorm. The kernels' batch statistics and
    gradient sums go through it between kernels, e.g. a
    ``fused_mbconv.distributed.ProcessGroupStatsSync`` reduces them across processes."""
    keep_expand_output, keep_dwconv_output = RECOMPUTE_LEVELS[
        resolve_recompute(recompute, recompute_dwconv)]
    amp = _autocast_dtype(input)
    block_input = input
    input, expand_weight, dw_weight, project_weight = (
        _cast_for_conv(t, amp) for t in (input, expand_weight, dw_weight, project_weight))
    if se_weights is not None:
        se_weights = [_cast_for_conv(t, amp) for t in se_weights]
    check_mbconv_args(input, expand_weight, bn1, dw_weight, bn2, se_weights, project_weight,
                      bn3, stride, training, residual, drop_path, activation, se_activation,
                      se_gate)
    if dw_padding is not None:
        height, width = input.shape[2:]
        run_weight = padded_dw_weight(dw_weight, dw_padding, height, width, stride)
        if run_weight is None:
            k = dw_weight.shape[-1]
            raise ValueError(f"dw_padding {dw_padding!r} on a {height}x{width} input gives "
                             f"another output size than the fused kernels' "
                             f"ceil(size / stride) = {conv_output_size(height, k, stride)}x"
                             f"{conv_output_size(width, k, stride)}")
        dw_weight = run_weight
    x = input if input.is_contiguous(memory_format=torch.channels_last) else input.contiguous()
    scale = None
    if drop_path_training is None:
        drop_path_training = training
    if drop_path_training and residual and drop_path > 0:
        scale = drop_path_scale(x, drop_path).view(-1).to(accumulate_dtype(x.dtype))
    residual_outside = residual and block_input.dtype != x.dtype
    bn1_args = (None,) * 4 if bn1 is None else \
        (bn1.weight, bn1.bias, bn1.running_mean, bn1.running_var)
    se_args = (None,) * 4 if se_weights is None else tuple(t.contiguous() for t in se_weights)
    eps = [bn1.eps if bn1 is not None else 1e-5, bn2.eps, bn3.eps]
    inputs = (x, None if expand_weight is None else expand_weight.contiguous(), *bn1_args,
              dw_weight.contiguous(), bn2.weight, bn2.bias, bn2.running_mean, bn2.running_var,
              *se_args, project_weight.contiguous(), bn3.weight, bn3.bias, bn3.running_mean,
              bn3.running_var, None if residual_outside else scale, stride, training, eps,
              activation, se_activation, se_gate, residual and not residual_outside,
              keep_dwconv_output, keep_expand_output)
    sync = sync if training else None
    with _autocast_off(x):
        out, _, _, mean1, var1, mean2, var2, mean3, var3, _, _ = (
            torch.ops.fused_mbconv.mbconv(*inputs) if sync is None
            else mbconv_synced(sync, *inputs))
    if residual_outside:
        branch = out if scale is None else out * scale.view(-1, 1, 1, 1).to(out.dtype)
        out = branch + block_input
    if training:
        n, _, ho, wo = out.shape

        def count(bn: str, local: int) -> int:  # the unbiased correction's
            return local if sync is None else sync.global_count(bn)

        if bn1 is not None:
            # e (N, Ce, H, W) has the input's positions; the op may return it empty
            _update_bn(bn1, mean1, var1, count("bn1", x.shape[0] * x.shape[2] * x.shape[3]))
        _update_bn(bn2, mean2, var2, count("bn2", n * ho * wo))
        _update_bn(bn3, mean3, var3, count("bn3", n * ho * wo))
        if out.requires_grad and not torch.compiler.is_compiling():
            _RecomputeMarker.apply(out)
    return out


class _RecomputeMarker(torch.autograd.Function):
    """A dead autograd node that saves one empty tensor, recorded after the running-statistics
    update. Non-reentrant ``torch.utils.checkpoint`` stops its recomputation once it has saved
    again as many tensors as the forward did; eager BatchNorm updates its statistics inside its
    op, before saving, so they are updated in the recomputation too. Without this marker the
    op's own saved tensors would be the last, and the update after it skipped."""

    @staticmethod
    def forward(ctx, out: Tensor) -> Tensor:
        ctx.save_for_backward(out.new_empty(0))
        return out.new_empty(0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return None


# The stem and head ops (after everything they use from this module is defined).
from .functional_stem_head import conv_bn_act, pointwise_bn_act_pool  # noqa: E402,F401
