"""``fused_mbconv::mbconv``: the whole MBConv block as one custom op, and its backward.

For kernel authors: a backend runs this op by implementing the functions in ``KERNELS``
(contracts, launch counts and the call order in ``fused_mbconv.reference``'s docstring)::

    mbconv_expand_forward        K1  expand GEMM + BN1 statistics
    mbconv_dwconv_forward        K2  BN1-apply + act prologue, depthwise conv, BN2 statistics
    mbconv_squeeze_forward       K3  mean over H, W of act(BN2(d))
    mbconv_excite_forward        K4  fc1, act, fc2, gate
    mbconv_project_forward       K5  act(BN2(d)) * gate built on load, GEMM, BN3 statistics
    mbconv_output_forward        K6  BN3 apply, drop-path scale, residual
    mbconv_output_backward_stats B6  BN3 gradient reductions
    mbconv_project_backward      B5  dgrad (+ SE gate reduction) and wgrad of the projection
    mbconv_excite_backward       B4  SE backward
    mbconv_dwconv_backward_stats B3  BN2 gradient reductions
    mbconv_dwconv_backward       B2  depthwise dgrad (+ BN1 reductions) and wgrad
    mbconv_expand_backward       B1  expand dgrad (+ residual gradient) and wgrad

Launchers report each launch with ``fused_mbconv.accounting.note_launch``; a function marked
[2] in the reference docstring is two launches (one per unmasked output group), every other one
launch. ``run_forward`` / ``run_backward`` compose these calls and hold no math of their own;
the op runs them, and so does ``mbconv_synced`` (synchronized BatchNorm: a ``BatchStatsSync``
reduces each BatchNorm's statistics and gradient sums across processes between kernels).

Saved for backward: x, the expand output e, the depthwise output d (unless the forward was
asked not to keep it: then backward recomputes it from e with K2), the per-channel statistics
of the three BatchNorms, the per-sample SE vectors (pooled, gate values) and drop-path scale,
and the parameters. Every other activation (a1, a2, a3, q, BN outputs) is recomputed in the
backward kernels' prologues. Running statistics are not touched here: the op is functional,
and ``fused_mbconv.functional.mbconv`` updates them from the statistics it returns.

Layout: the kernels run on ``kernel_input(x)`` (channels_last on the CPU), which e and d
follow; the output and x's gradient come back in x's own memory format.
"""

from __future__ import annotations

from typing import List, Optional, Protocol, Tuple

import torch
from torch import Tensor

from ..backends import kernels_for
from ..tensors import NormArgs, accumulate_dtype, empty_like_input, memory_format_of
from .dwconv_bn_silu import conv_output_size

KERNELS = (
    "mbconv_expand_forward", "mbconv_dwconv_forward", "mbconv_squeeze_forward",
    "mbconv_excite_forward", "mbconv_project_forward", "mbconv_output_forward",
    "mbconv_output_backward_stats", "mbconv_project_backward", "mbconv_excite_backward",
    "mbconv_dwconv_backward_stats", "mbconv_dwconv_backward", "mbconv_expand_backward",
)

# Differentiable inputs of fused_mbconv::mbconv, in schema order, and their positions there;
# fused_mbconv::mbconv_backward returns one gradient per name, in this order.
GRAD_INPUTS = ("x", "expand_weight", "bn1_weight", "bn1_bias", "dw_weight", "bn2_weight",
               "bn2_bias", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias",
               "project_weight", "bn3_weight", "bn3_bias")
_GRAD_POSITIONS = (0, 1, 2, 3, 6, 7, 8, 11, 12, 13, 14, 15, 16, 17)


def _kernels(device: torch.device):
    return kernels_for(device, KERNELS)


def _matrix(w: Optional[Tensor]) -> Optional[Tensor]:
    """A 1x1 conv weight (out, in, 1, 1) as the (out, in) matrix the kernels take."""
    return None if w is None else w.view(w.shape[0], w.shape[1])


def _stats(t: Optional[Tensor], acc: torch.dtype) -> Tensor:
    return t.to(acc, copy=True)


class BatchStatsSync(Protocol):
    """Where the block's BatchNorm statistics may be reduced across processes (synchronized
    BatchNorm, ``fused_mbconv.distributed``). ``bn`` names the BatchNorm: "bn1", "bn2", "bn3"."""

    def batch_stats(self, bn: str, mean: Tensor, var: Tensor, count: int
                    ) -> Tuple[Tensor, Tensor]:
        """Training forward: the mean and biased variance over every process from this
        process's over ``count`` values."""

    def grad_sums(self, bn: str, sum_dy: Tensor, sum_dy_xhat: Tensor, count: int
                  ) -> Tuple[Tensor, Tensor]:
        """Backward: the gradient sums over every process, scaled by ``count`` / global count
        (the kernels divide by their own count, so they then use the global means)."""

    def global_count(self, bn: str) -> int:
        """The number of values the last ``batch_stats`` of ``bn`` covered over every
        process (the running variance's unbiased correction uses it)."""


def _count(t: Tensor) -> int:
    return t.numel() // t.shape[1]


def kernel_input(x: Tensor) -> Tensor:
    """x laid out as the block's kernels run, which e and d then follow: channels_last on the
    CPU, whose kernels work on NHWC rows (an NCHW block then copies its input and output once,
    not every expanded map in every kernel), as it is elsewhere (the GPU kernels read either
    layout in place)."""
    return x.contiguous(memory_format=torch.channels_last) if x.device.type == "cpu" else x


def run_forward(k, x: Tensor, expand_weight: Optional[Tensor], bn1_weight: Optional[Tensor],
                bn1_bias: Optional[Tensor], bn1_running_mean: Optional[Tensor],
                bn1_running_var: Optional[Tensor], dw_weight: Tensor,
                bn2_weight: Optional[Tensor], bn2_bias: Optional[Tensor],
                bn2_running_mean: Optional[Tensor], bn2_running_var: Optional[Tensor],
                fc1_weight: Optional[Tensor], fc1_bias: Optional[Tensor],
                fc2_weight: Optional[Tensor], fc2_bias: Optional[Tensor],
                project_weight: Tensor, bn3_weight: Optional[Tensor], bn3_bias: Optional[Tensor],
                bn3_running_mean: Optional[Tensor], bn3_running_var: Optional[Tensor],
                sample_scale: Optional[Tensor], stride: int, training: bool, eps: List[float],
                activation: str, se_activation: str, gate: str, residual: bool,
                keep_dwconv_output: bool, sync: Optional[BatchStatsSync] = None):
    """``fused_mbconv::mbconv`` on the kernel-interface functions ``k``; with ``sync``, each
    BatchNorm's batch statistics are reduced across processes before they are applied."""
    acc = accumulate_dtype(x.dtype)
    out_format = memory_format_of(x)
    x = kernel_input(x)

    def batch_or_running(bn, t, mean, var, running_mean, running_var):
        if not training:
            return _stats(running_mean, acc), _stats(running_var, acc)
        return (mean, var) if sync is None else sync.batch_stats(bn, mean, var, _count(t))

    e, mean1, var1 = x.new_empty(0), x.new_empty(0, dtype=acc), x.new_empty(0, dtype=acc)
    bn1 = None
    if expand_weight is not None:
        e, mean1, var1 = k.mbconv_expand_forward(x, _matrix(expand_weight), training)
        mean1, var1 = batch_or_running("bn1", e, mean1, var1, bn1_running_mean, bn1_running_var)
        bn1 = NormArgs(mean1, var1, bn1_weight, bn1_bias, eps[0])
    h = e if expand_weight is not None else x
    d, mean2, var2 = k.mbconv_dwconv_forward(h, dw_weight, stride, bn1, activation, training)
    mean2, var2 = batch_or_running("bn2", d, mean2, var2, bn2_running_mean, bn2_running_var)
    bn2 = NormArgs(mean2, var2, bn2_weight, bn2_bias, eps[1])
    pooled, gate_values = x.new_empty(0, dtype=acc), x.new_empty(0, dtype=acc)
    if fc1_weight is not None:
        pooled = k.mbconv_squeeze_forward(d, bn2, activation)
        gate_values = k.mbconv_excite_forward(pooled, _matrix(fc1_weight), fc1_bias,
                                              _matrix(fc2_weight), fc2_bias, se_activation, gate)
    q, mean3, var3 = k.mbconv_project_forward(
        d, gate_values if fc1_weight is not None else None, _matrix(project_weight), bn2,
        activation, training)
    mean3, var3 = batch_or_running("bn3", q, mean3, var3, bn3_running_mean, bn3_running_var)
    out = k.mbconv_output_forward(q, NormArgs(mean3, var3, bn3_weight, bn3_bias, eps[2]),
                                  sample_scale, x if residual else None)
    out = out.contiguous(memory_format=out_format)
    if not keep_dwconv_output:
        d = x.new_empty(0)
    return out, e, d, mean1, var1, mean2, var2, mean3, var3, pooled, gate_values


def run_backward(k, grad_out: Tensor, x: Tensor, e: Tensor, d: Tensor,
                 expand_weight: Optional[Tensor], bn1_weight: Optional[Tensor],
                 bn1_bias: Optional[Tensor], mean1: Tensor, var1: Tensor, dw_weight: Tensor,
                 bn2_weight: Optional[Tensor], bn2_bias: Optional[Tensor], mean2: Tensor,
                 var2: Tensor, fc1_weight: Optional[Tensor], fc1_bias: Optional[Tensor],
                 fc2_weight: Optional[Tensor], fc2_bias: Optional[Tensor], pooled: Tensor,
                 gate_values: Tensor, project_weight: Tensor, bn3_weight: Optional[Tensor],
                 bn3_bias: Optional[Tensor], mean3: Tensor, var3: Tensor,
                 sample_scale: Optional[Tensor], stride: int, training: bool, eps: List[float],
                 activation: str, se_activation: str, gate: str, residual: bool,
                 output_mask: List[bool], sync: Optional[BatchStatsSync] = None) -> List[Tensor]:
    """``fused_mbconv::mbconv_backward`` on the kernel-interface functions ``k``; with
    ``sync`` (training only), each BatchNorm's gradient sums are reduced across processes
    before the input gradient uses them."""
    def reduced(bn, sums, t):
        if sync is None or not training:
            return sums
        return sync.grad_sums(bn, sums[0], sums[1], _count(t))

    inputs = (x, expand_weight, bn1_weight, bn1_bias, dw_weight, bn2_weight, bn2_bias,
              fc1_weight, fc1_bias, fc2_weight, fc2_bias, project_weight, bn3_weight, bn3_bias)
    x = kernel_input(x)
    grad_out = grad_out.contiguous(memory_format=memory_format_of(x))
    grads: List[Optional[Tensor]] = [None] * len(GRAD_INPUTS)
    mask = dict(zip(GRAD_INPUTS, output_mask))
    expanded, se = expand_weight is not None, fc1_weight is not None
    bn1 = NormArgs(mean1, var1, bn1_weight, bn1_bias, eps[0]) if expanded else None
    bn2 = NormArgs(mean2, var2, bn2_weight, bn2_bias, eps[1])
    bn3 = NormArgs(mean3, var3, bn3_weight, bn3_bias, eps[2])
    h = e if expanded else x
    if d.numel() == 0:
        d = k.mbconv_dwconv_forward(h, dw_weight, stride, bn1, activation, False)[0]
    gv = gate_values if se else None
    pw = _matrix(project_weight)
    q = k.mbconv_project_forward(d, gv, pw, bn2, activation, False)[0]
    sums3 = k.mbconv_output_backward_stats(grad_out, q, bn3, sample_scale)
    grads[12], grads[13] = sums3[1], sums3[0]  # each process's own share: DDP averages them
    sums3 = reduced("bn3", sums3, q)
    upstream = any(output_mask[:11])
    grad_a2, grad_gate, grads[11] = k.mbconv_project_backward(
        grad_out, q, d, gv, pw, bn2, activation, bn3, *sums3, sample_scale, training,
        [upstream, mask["project_weight"]])
    if upstream:
        grad_pooled = None
        if se:
            grad_pooled, *grads[7:11] = k.mbconv_excite_backward(
                grad_gate, pooled, _matrix(fc1_weight), fc1_bias, _matrix(fc2_weight), fc2_bias,
                se_activation, gate)
        sums2 = k.mbconv_dwconv_backward_stats(grad_a2, grad_pooled, d, bn2, activation)
        grads[5], grads[6] = sums2[1], sums2[0]
        sums2 = reduced("bn2", sums2, d)
        below = any(output_mask[:4])
        grad_h, grads[4], sum_dy1, sum_dy1_xhat1 = k.mbconv_dwconv_backward(
            grad_a2, grad_pooled, d, h, dw_weight, stride, bn2, activation, *sums2, bn1,
            training, [below, mask["dw_weight"]])
        residual_grad = grad_out if residual and mask["x"] else None
        if expanded and below:
            grads[2], grads[3] = sum_dy1_xhat1, sum_dy1
            sum_dy1, sum_dy1_xhat1 = reduced("bn1", (sum_dy1, sum_dy1_xhat1), e)
            grads[0], grads[1] = k.mbconv_expand_backward(
                grad_h, e, x, _matrix(expand_weight), bn1, sum_dy1, sum_dy1_xhat1, training,
                residual_grad, [mask["x"], mask["expand_weight"]])
        elif not expanded and mask["x"]:
            grads[0] = grad_h if residual_grad is None else grad_h + residual_grad
    return [_shaped_grad(g, t, m) for g, t, m in zip(grads, inputs, output_mask)]


@torch.library.custom_op("fused_mbconv::mbconv", mutates_args=())
def mbconv(x: Tensor, expand_weight: Optional[Tensor], bn1_weight: Optional[Tensor],
           bn1_bias: Optional[Tensor], bn1_running_mean: Optional[Tensor],
           bn1_running_var: Optional[Tensor], dw_weight: Tensor, bn2_weight: Optional[Tensor],
           bn2_bias: Optional[Tensor], bn2_running_mean: Optional[Tensor],
           bn2_running_var: Optional[Tensor], fc1_weight: Optional[Tensor],
           fc1_bias: Optional[Tensor], fc2_weight: Optional[Tensor], fc2_bias: Optional[Tensor],
           project_weight: Tensor, bn3_weight: Optional[Tensor], bn3_bias: Optional[Tensor],
           bn3_running_mean: Optional[Tensor], bn3_running_var: Optional[Tensor],
           sample_scale: Optional[Tensor], stride: int, training: bool, eps: List[float],
           activation: str, se_activation: str, gate: str, residual: bool,
           keep_dwconv_output: bool
           ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                      Tensor, Tensor]:
    """Returns (out, e, d, mean1, var1, mean2, var2, mean3, var3, pooled, gate_values).

    e, mean1, var1 are empty without expansion; pooled and gate_values without SE; d when
    ``keep_dwconv_output`` is False. The statistics are those used to normalize: the batch's
    in training, copies of the running ones in eval."""
    return run_forward(_kernels(x.device), x, expand_weight, bn1_weight, bn1_bias,
                       bn1_running_mean, bn1_running_var, dw_weight, bn2_weight, bn2_bias,
                       bn2_running_mean, bn2_running_var, fc1_weight, fc1_bias, fc2_weight,
                       fc2_bias, project_weight, bn3_weight, bn3_bias, bn3_running_mean,
                       bn3_running_var, sample_scale, stride, training, eps, activation,
                       se_activation, gate, residual, keep_dwconv_output)


@mbconv.register_fake
def _(x, expand_weight, bn1_weight, bn1_bias, bn1_running_mean, bn1_running_var, dw_weight,
      bn2_weight, bn2_bias, bn2_running_mean, bn2_running_var, fc1_weight, fc1_bias,
      fc2_weight, fc2_bias, project_weight, bn3_weight, bn3_bias, bn3_running_mean,
      bn3_running_var, sample_scale, stride, training, eps, activation, se_activation, gate,
      residual, keep_dwconv_output):
    n, _, h, w = x.shape
    acc = accumulate_dtype(x.dtype)
    hidden, cout, kernel = dw_weight.shape[0], project_weight.shape[0], dw_weight.shape[-1]
    ho, wo = conv_output_size(h, kernel, stride), conv_output_size(w, kernel, stride)

    def vector(*shape):
        return x.new_empty(shape, dtype=acc)

    expanded = expand_weight is not None
    se = fc1_weight is not None
    xk = kernel_input(x)
    return (empty_like_input(x, (n, cout, ho, wo)),
            empty_like_input(xk, (n, hidden, h, w)) if expanded else x.new_empty(0),
            empty_like_input(xk, (n, hidden, ho, wo)) if keep_dwconv_output else x.new_empty(0),
            vector(hidden if expanded else 0), vector(hidden if expanded else 0),
            vector(hidden), vector(hidden), vector(cout), vector(cout),
            vector(n, hidden) if se else vector(0), vector(n, hidden) if se else vector(0))


@torch.library.custom_op("fused_mbconv::mbconv_backward", mutates_args=())
def mbconv_backward(grad_out: Tensor, x: Tensor, e: Tensor, d: Tensor,
                    expand_weight: Optional[Tensor], bn1_weight: Optional[Tensor],
                    bn1_bias: Optional[Tensor], mean1: Tensor, var1: Tensor, dw_weight: Tensor,
                    bn2_weight: Optional[Tensor], bn2_bias: Optional[Tensor], mean2: Tensor,
                    var2: Tensor, fc1_weight: Optional[Tensor], fc1_bias: Optional[Tensor],
                    fc2_weight: Optional[Tensor], fc2_bias: Optional[Tensor], pooled: Tensor,
                    gate_values: Tensor, project_weight: Tensor, bn3_weight: Optional[Tensor],
                    bn3_bias: Optional[Tensor], mean3: Tensor, var3: Tensor,
                    sample_scale: Optional[Tensor], stride: int, training: bool,
                    eps: List[float], activation: str, se_activation: str, gate: str,
                    residual: bool, output_mask: List[bool]) -> List[Tensor]:
    """Gradients of GRAD_INPUTS, in that order, each in its input's dtype; empty where
    output_mask is False or the input is absent. ``d`` may be empty: it is recomputed."""
    return run_backward(_kernels(x.device), grad_out, x, e, d, expand_weight, bn1_weight,
                        bn1_bias, mean1, var1, dw_weight, bn2_weight, bn2_bias, mean2, var2,
                        fc1_weight, fc1_bias, fc2_weight, fc2_bias, pooled, gate_values,
                        project_weight, bn3_weight, bn3_bias, mean3, var3, sample_scale, stride,
                        training, eps, activation, se_activation, gate, residual, output_mask)


def _shaped_grad(g: Optional[Tensor], t: Optional[Tensor], wanted: bool) -> Tensor:
    """The gradient as the op returns it: t's shape, dtype and layout; empty when unwanted."""
    if t is None or not wanted:
        return (t if t is not None else torch.empty(0)).new_empty(0)
    g = g.reshape(t.shape).to(t.dtype)
    return g.contiguous(memory_format=memory_format_of(t)) if t.dim() == 4 else g.contiguous()


def _fake_grad(t: Optional[Tensor], wanted: bool) -> Tensor:
    if t is None or not wanted:
        return (t if t is not None else torch.empty(0)).new_empty(0)
    return empty_like_input(t, t.shape) if t.dim() == 4 else t.new_empty(t.shape)


@mbconv_backward.register_fake
def _(grad_out, x, e, d, expand_weight, bn1_weight, bn1_bias, mean1, var1, dw_weight,
      bn2_weight, bn2_bias, mean2, var2, fc1_weight, fc1_bias, fc2_weight, fc2_bias, pooled,
      gate_values, project_weight, bn3_weight, bn3_bias, mean3, var3, sample_scale, stride,
      training, eps, activation, se_activation, gate, residual, output_mask):
    inputs = (x, expand_weight, bn1_weight, bn1_bias, dw_weight, bn2_weight, bn2_bias,
              fc1_weight, fc1_bias, fc2_weight, fc2_bias, project_weight, bn3_weight, bn3_bias)
    return [_fake_grad(t, m) for t, m in zip(inputs, output_mask)]


def _setup_context(ctx, inputs, output):
    (x, expand_weight, bn1_weight, bn1_bias, _, _, dw_weight, bn2_weight, bn2_bias, _, _,
     fc1_weight, fc1_bias, fc2_weight, fc2_bias, project_weight, bn3_weight, bn3_bias, _, _,
     sample_scale, stride, training, eps, activation, se_activation, gate, residual,
     _) = inputs
    _, e, d, mean1, var1, mean2, var2, mean3, var3, pooled, gate_values = output
    ctx.save_for_backward(x, e, d, expand_weight, bn1_weight, bn1_bias, mean1, var1, dw_weight,
                          bn2_weight, bn2_bias, mean2, var2, fc1_weight, fc1_bias, fc2_weight,
                          fc2_bias, pooled, gate_values, project_weight, bn3_weight, bn3_bias,
                          mean3, var3, sample_scale)
    ctx.options = (stride, training, list(eps), activation, se_activation, gate, residual)
    ctx.present = [inputs[i] is not None for i in _GRAD_POSITIONS]
    ctx.mark_non_differentiable(*output[1:])
    # Backward uses grad_out only: without this, autograd zero-fills a gradient for each other
    # output, e and d among them (two expanded-size memsets per step, ~15% of a B0 block's
    # fused CPU backward). grad_out itself is None when out did not reach the loss.
    ctx.set_materialize_grads(False)


def _wanted(ctx, needs_input_grad) -> List[bool]:
    return [present and needs_input_grad[i] for present, i in zip(ctx.present, _GRAD_POSITIONS)]


def _input_grads(grads: List[Tensor], mask: List[bool]) -> Tuple[Optional[Tensor], ...]:
    result: List[Optional[Tensor]] = [None] * 29
    for g, i, m in zip(grads, _GRAD_POSITIONS, mask):
        result[i] = g if m else None
    return tuple(result)


def _backward(ctx, grad_out, *_unused):
    if grad_out is None:
        return _input_grads([], [])
    mask = _wanted(ctx, ctx.needs_input_grad)
    grads = torch.ops.fused_mbconv.mbconv_backward(grad_out, *ctx.saved_tensors, *ctx.options,
                                                   mask)
    return _input_grads(grads, mask)


mbconv.register_autograd(_backward, setup_context=_setup_context)


class _SyncedMBConv(torch.autograd.Function):
    """The op's forward and backward with a ``BatchStatsSync`` between kernels: outside
    torch.library (a process group is no schema type), the same kernels and saved tensors."""

    @staticmethod
    def forward(ctx, sync, *inputs):
        output = run_forward(_kernels(inputs[0].device), *inputs, sync=sync)
        _setup_context(ctx, inputs, output)
        ctx.sync = sync
        return output

    @staticmethod
    def backward(ctx, grad_out, *_unused):
        if grad_out is None:
            return (None, *_input_grads([], []))
        mask = _wanted(ctx, ctx.needs_input_grad[1:])
        grads = run_backward(_kernels(grad_out.device), grad_out, *ctx.saved_tensors,
                             *ctx.options, mask, sync=ctx.sync)
        return (None, *_input_grads(grads, mask))


def mbconv_synced(sync: BatchStatsSync, *inputs) -> Tuple[Tensor, ...]:
    """``fused_mbconv::mbconv(*inputs)`` in training with batch statistics and gradient sums
    reduced through ``sync`` (synchronized BatchNorm across processes)."""
    return _SyncedMBConv.apply(sync, *inputs)
