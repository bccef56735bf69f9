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

Saved for backward: x, the expand output e and the depthwise output d, the per-channel
statistics of the three BatchNorms, the per-sample SE vectors (pooled, gate values) and
drop-path scale, and the parameters. The forward may be asked not to keep e or d (the
``keep_expand_output`` / ``keep_dwconv_output`` flags: the op then returns them empty); backward
recomputes a missing e from x with K1 and a missing d from e with K2, neither computing
statistics (the saved ones normalize). Every other activation (a1, a2, a3, q, BN outputs) is
recomputed in the backward kernels' prologues. Running statistics are not touched here: the
op is functional, and ``fused_mbconv.functional.mbconv`` updates them from the statistics it
returns.

Layout: the kernels run on ``kernel_input(x)`` (channels_last on the CPU), which e and d
follow; the output and x's gradient come back in x's own memory format.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Protocol, Tuple

import torch
from torch import Tensor

from ..backends import kernels_for
from ..tensors import NormArgs, accumulate_dtype, empty_like_input, memory_format_of
from .dwconv_bn_silu import conv_output_size
from .signature import (Arg, backward_args, grad_names, input_grads, needs_grad, schema,
                        tensors, values_type)

KERNELS = (
    "mbconv_expand_forward", "mbconv_dwconv_forward", "mbconv_squeeze_forward",
    "mbconv_excite_forward", "mbconv_project_forward", "mbconv_output_forward",
    "mbconv_output_backward_stats", "mbconv_project_backward", "mbconv_excite_backward",
    "mbconv_dwconv_backward_stats", "mbconv_dwconv_backward", "mbconv_expand_backward",
)

# fused_mbconv::mbconv's inputs, in schema order: the one list of them.
INPUTS = (
    Arg("x", "Tensor", grad=True),
    Arg("expand_weight", "Tensor?", grad=True),
    Arg("bn1_weight", "Tensor?", grad=True), Arg("bn1_bias", "Tensor?", grad=True),
    Arg("bn1_running_mean", "Tensor?"), Arg("bn1_running_var", "Tensor?"),
    Arg("dw_weight", "Tensor", grad=True),
    Arg("bn2_weight", "Tensor?", grad=True), Arg("bn2_bias", "Tensor?", grad=True),
    Arg("bn2_running_mean", "Tensor?"), Arg("bn2_running_var", "Tensor?"),
    Arg("fc1_weight", "Tensor?", grad=True), Arg("fc1_bias", "Tensor?", grad=True),
    Arg("fc2_weight", "Tensor?", grad=True), Arg("fc2_bias", "Tensor?", grad=True),
    Arg("project_weight", "Tensor", grad=True),
    Arg("bn3_weight", "Tensor?", grad=True), Arg("bn3_bias", "Tensor?", grad=True),
    Arg("bn3_running_mean", "Tensor?"), Arg("bn3_running_var", "Tensor?"),
    Arg("sample_scale", "Tensor?"),
    Arg("stride", "SymInt"), Arg("training", "bool"), Arg("eps", "float[]"),
    Arg("activation", "str"), Arg("se_activation", "str"), Arg("gate", "str"),
    Arg("residual", "bool"), Arg("keep_dwconv_output", "bool"),
    Arg("keep_expand_output", "bool", default=True),
)
MBConvInputs = values_type("MBConvInputs", INPUTS)
# Its differentiable inputs, in the block's data-flow order (so the inputs before a layer's
# are those upstream of it); fused_mbconv::mbconv_backward returns one gradient per name.
GRAD_INPUTS = grad_names(INPUTS)
# Its outputs, in order (see ``mbconv``'s docstring).
OUTPUTS = ("out", "e", "d", "mean1", "var1", "mean2", "var2", "mean3", "var3", "pooled",
           "gate_values")
MBConvOutputs = values_type("MBConvOutputs", [Arg(n, "Tensor") for n in OUTPUTS])
# Inputs and outputs saved for backward, in fused_mbconv::mbconv_backward's order.
SAVED = ("x", "e", "d", "expand_weight", "bn1_weight", "bn1_bias", "mean1", "var1",
         "dw_weight", "bn2_weight", "bn2_bias", "mean2", "var2", "fc1_weight", "fc1_bias",
         "fc2_weight", "fc2_bias", "pooled", "gate_values", "project_weight", "bn3_weight",
         "bn3_bias", "mean3", "var3", "sample_scale")
# The forward's options that backward takes: all but the keep_* flags (an empty e or d shows
# that the forward did not keep it).
OPTIONS = ("stride", "training", "eps", "activation", "se_activation", "gate", "residual")
BACKWARD_INPUTS = backward_args(INPUTS, SAVED, OPTIONS)
MBConvBackwardInputs = values_type("MBConvBackwardInputs", BACKWARD_INPUTS)


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


def run_forward(k, *, x: Tensor, expand_weight: Optional[Tensor], bn1_weight: Optional[Tensor],
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
                keep_dwconv_output: bool, keep_expand_output: bool,
                sync: Optional[BatchStatsSync] = None):
    """``fused_mbconv::mbconv`` on the kernel-interface functions ``k`` (its inputs by name),
    returning its OUTPUTS; with ``sync``, each BatchNorm's batch statistics are reduced across
    processes before they are applied."""
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
    if not keep_expand_output:
        e = x.new_empty(0)
    return MBConvOutputs(out, e, d, mean1, var1, mean2, var2, mean3, var3, pooled, gate_values)


def run_backward(k, *, grad_out: Tensor, x: Tensor, e: Tensor, d: Tensor,
                 expand_weight: Optional[Tensor], bn1_weight: Optional[Tensor],
                 bn1_bias: Optional[Tensor], mean1: Tensor, var1: Tensor, dw_weight: Tensor,
                 bn2_weight: Optional[Tensor], bn2_bias: Optional[Tensor], mean2: Tensor,
                 var2: Tensor, fc1_weight: Optional[Tensor], fc1_bias: Optional[Tensor],
                 fc2_weight: Optional[Tensor], fc2_bias: Optional[Tensor], pooled: Tensor,
                 gate_values: Tensor, project_weight: Tensor, bn3_weight: Optional[Tensor],
                 bn3_bias: Optional[Tensor], mean3: Tensor, var3: Tensor,
                 sample_scale: Optional[Tensor], stride: int, training: bool, eps: List[float],
                 activation: str, se_activation: str, gate: str, residual: bool,
                 output_mask: List[bool], sync: Optional[BatchStatsSync] = None
                 ) -> Dict[str, Tensor]:
    """``fused_mbconv::mbconv_backward``'s math on the kernel-interface functions ``k`` (its
    inputs by name): the wanted GRAD_INPUTS' gradients by name, as the kernels return them;
    with ``sync`` (training only), each BatchNorm's gradient sums are reduced across processes
    before the input gradient uses them."""
    def reduced(bn, sums, t):
        if sync is None or not training:
            return sums
        return sync.grad_sums(bn, sums[0], sums[1], _count(t))

    x = kernel_input(x)
    grad_out = grad_out.contiguous(memory_format=memory_format_of(x))
    grads: Dict[str, Tensor] = {}
    mask = dict(zip(GRAD_INPUTS, output_mask, strict=True))

    def wanted_upstream_of(name):  # any gradient wanted for an input before ``name``'s layer
        return any(output_mask[:GRAD_INPUTS.index(name)])

    expanded, se = expand_weight is not None, fc1_weight is not None
    bn1 = NormArgs(mean1, var1, bn1_weight, bn1_bias, eps[0]) if expanded else None
    bn2 = NormArgs(mean2, var2, bn2_weight, bn2_bias, eps[1])
    bn3 = NormArgs(mean3, var3, bn3_weight, bn3_bias, eps[2])
    if expanded and e.numel() == 0:
        e = k.mbconv_expand_forward(x, _matrix(expand_weight), False)[0]
    h = e if expanded else x
    if d.numel() == 0:
        d = k.mbconv_dwconv_forward(h, dw_weight, stride, bn1, activation, False)[0]
    gv = gate_values if se else None
    pw = _matrix(project_weight)
    q = k.mbconv_project_forward(d, gv, pw, bn2, activation, False)[0]
    sums3 = k.mbconv_output_backward_stats(grad_out, q, bn3, sample_scale)
    # each process's own share: DDP averages them
    grads["bn3_weight"], grads["bn3_bias"] = sums3[1], sums3[0]
    sums3 = reduced("bn3", sums3, q)
    upstream = wanted_upstream_of("project_weight")
    grad_a2, grad_gate, grads["project_weight"] = k.mbconv_project_backward(
        grad_out, q, d, gv, pw, bn2, activation, bn3, *sums3, sample_scale, training,
        [upstream, mask["project_weight"]])
    if upstream:
        grad_pooled = None
        if se:
            (grad_pooled, grads["fc1_weight"], grads["fc1_bias"], grads["fc2_weight"],
             grads["fc2_bias"]) = k.mbconv_excite_backward(
                grad_gate, pooled, _matrix(fc1_weight), fc1_bias, _matrix(fc2_weight), fc2_bias,
                se_activation, gate)
        sums2 = k.mbconv_dwconv_backward_stats(grad_a2, grad_pooled, d, bn2, activation)
        grads["bn2_weight"], grads["bn2_bias"] = sums2[1], sums2[0]
        sums2 = reduced("bn2", sums2, d)
        below = wanted_upstream_of("dw_weight")
        grad_h, grads["dw_weight"], sum_dy1, sum_dy1_xhat1 = k.mbconv_dwconv_backward(
            grad_a2, grad_pooled, d, h, dw_weight, stride, bn2, activation, *sums2, bn1,
            training, [below, mask["dw_weight"]])
        residual_grad = grad_out if residual and mask["x"] else None
        if expanded and below:
            grads["bn1_weight"], grads["bn1_bias"] = sum_dy1_xhat1, sum_dy1
            sum_dy1, sum_dy1_xhat1 = reduced("bn1", (sum_dy1, sum_dy1_xhat1), e)
            grads["x"], grads["expand_weight"] = k.mbconv_expand_backward(
                grad_h, e, x, _matrix(expand_weight), bn1, sum_dy1, sum_dy1_xhat1, training,
                residual_grad, [mask["x"], mask["expand_weight"]])
        elif not expanded and mask["x"]:
            grads["x"] = grad_h if residual_grad is None else grad_h + residual_grad
    return grads


@torch.library.custom_op("fused_mbconv::mbconv", mutates_args=(),
                         schema=schema(INPUTS, tensors(len(OUTPUTS))))
def mbconv(*inputs) -> Tuple[Tensor, ...]:
    """INPUTS in order; returns OUTPUTS: (out, e, d, mean1, var1, mean2, var2, mean3, var3,
    pooled, gate_values).

    e, mean1, var1 are empty without expansion; pooled and gate_values without SE; e when
    ``keep_expand_output`` is False, d when ``keep_dwconv_output`` is False. The statistics
    are those used to normalize: the batch's in training, copies of the running ones in
    eval."""
    return tuple(run_forward(_kernels(inputs[0].device), **MBConvInputs(*inputs)._asdict()))


@mbconv.register_fake
def _(*inputs):
    a = MBConvInputs(*inputs)
    x = a.x
    n, _, h, w = x.shape
    acc = accumulate_dtype(x.dtype)
    hidden, cout = a.dw_weight.shape[0], a.project_weight.shape[0]
    kernel = a.dw_weight.shape[-1]
    ho, wo = conv_output_size(h, kernel, a.stride), conv_output_size(w, kernel, a.stride)

    def vector(*shape):
        return x.new_empty(shape, dtype=acc)

    expanded = a.expand_weight is not None
    se = a.fc1_weight is not None
    xk = kernel_input(x)
    return tuple(MBConvOutputs(
        out=empty_like_input(x, (n, cout, ho, wo)),
        e=(empty_like_input(xk, (n, hidden, h, w)) if expanded and a.keep_expand_output
           else x.new_empty(0)),
        d=empty_like_input(xk, (n, hidden, ho, wo)) if a.keep_dwconv_output else x.new_empty(0),
        mean1=vector(hidden if expanded else 0), var1=vector(hidden if expanded else 0),
        mean2=vector(hidden), var2=vector(hidden), mean3=vector(cout), var3=vector(cout),
        pooled=vector(n, hidden) if se else vector(0),
        gate_values=vector(n, hidden) if se else vector(0)))


def _backward_op(k, inputs, sync: Optional[BatchStatsSync] = None) -> List[Tensor]:
    """fused_mbconv::mbconv_backward on BACKWARD_INPUTS ``inputs``: ``run_backward``'s
    gradients shaped as the op returns them."""
    a = MBConvBackwardInputs(*inputs)
    grads = run_backward(k, **a._asdict(), sync=sync)
    return [_shaped_grad(grads.get(n), getattr(a, n), m)
            for n, m in zip(GRAD_INPUTS, a.output_mask, strict=True)]


@torch.library.custom_op("fused_mbconv::mbconv_backward", mutates_args=(),
                         schema=schema(BACKWARD_INPUTS, "Tensor[]"))
def mbconv_backward(*inputs) -> List[Tensor]:
    """BACKWARD_INPUTS in order; returns the gradients of GRAD_INPUTS, in that order, each in
    its input's dtype; empty where output_mask is False or the input is absent. ``e`` and
    ``d`` may be empty: they are recomputed."""
    return _backward_op(_kernels(inputs[0].device), inputs)


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
def _(*inputs):
    a = MBConvBackwardInputs(*inputs)
    return [_fake_grad(getattr(a, n), m)
            for n, m in zip(GRAD_INPUTS, a.output_mask, strict=True)]


def _setup_context(ctx, inputs, output):
    values = {**MBConvInputs(*inputs)._asdict(), **MBConvOutputs(*output)._asdict()}
    ctx.save_for_backward(*(values[n] for n in SAVED))
    # A list option is copied: the caller keeps its own.
    ctx.options = tuple(list(values[n]) if isinstance(values[n], (list, tuple)) else values[n]
                        for n in OPTIONS)
    ctx.present = [values[n] is not None for n in GRAD_INPUTS]
    ctx.mark_non_differentiable(*output[1:])
    # Backward uses grad_out only: without this, autograd zero-fills a gradient for each other
    # output, e and d among them (two expanded-size memsets per step, ~15% of a B0 block's
    # fused CPU backward). grad_out itself is None when out did not reach the loss.
    ctx.set_materialize_grads(False)


def _wanted(ctx, needs_input_grad) -> List[bool]:
    needs = needs_grad(INPUTS, needs_input_grad)
    return [present and needs[n] for present, n in zip(ctx.present, GRAD_INPUTS)]


def _input_grads(grads: List[Tensor], mask: List[bool]) -> Tuple[Optional[Tensor], ...]:
    """autograd's result for INPUTS from the op's gradients of GRAD_INPUTS."""
    return input_grads(INPUTS, {n: g for n, g, m in zip(GRAD_INPUTS, grads, mask) if m})


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
        output = run_forward(_kernels(inputs[0].device), **MBConvInputs(*inputs)._asdict(),
                             sync=sync)
        _setup_context(ctx, inputs, output)
        ctx.sync = sync
        return tuple(output)

    @staticmethod
    def backward(ctx, grad_out, *_unused):
        if grad_out is None:
            return (None, *_input_grads([], []))
        mask = _wanted(ctx, ctx.needs_input_grad[1:])
        grads = _backward_op(_kernels(grad_out.device),
                             (grad_out, *ctx.saved_tensors, *ctx.options, mask), sync=ctx.sync)
        return (None, *_input_grads(grads, mask))


def mbconv_synced(sync: BatchStatsSync, *inputs) -> Tuple[Tensor, ...]:
    """``fused_mbconv::mbconv(*inputs)`` in training with batch statistics and gradient sums
    reduced through ``sync`` (synchronized BatchNorm across processes)."""
    return _SyncedMBConv.apply(sync, *inputs)
