"""The "torch" backend: the kernel interface written with aten ops.

Every backend module (this one, ``fused_mbconv.kernels`` for Triton, ``fused_mbconv.extension``
for csrc/) implements these functions with the same arguments and results; the custom ops in
``fused_mbconv.ops`` call whichever the chosen backend provides. This module is also the
readable specification of each kernel's math. Statistics and math run in
``accumulate_dtype(input dtype)``: float32, or float64 for float64 inputs.

Kernel interface
----------------
dwconv_bn_silu (``fused_mbconv::dwconv_bn_silu``)::

    dwconv_bn_silu_forward(x, weight, bn_weight, bn_bias, running_mean, running_var, stride,
                           training, eps, need_conv_out) -> (out, conv_out, mean, var)
    dwconv_bn_silu_backward(grad_out, x, weight, conv_out, bn_weight, bn_bias, mean, var,
                            stride, training, eps, output_mask) -> (gx, gw, ggamma, gbeta)

MBConv block (``fused_mbconv::mbconv``; docs/DESIGN.md's K1..K6 and the mirrored backward).
Every function below is ONE kernel launch on a compiled backend, except the three marked [2]
(a dgrad and a wgrad launch; one when output_mask leaves one of them off). ``bn`` arguments are
``tensors.NormArgs``; ``in_bn=None`` means "no expansion": the depthwise input is used as is::

    K1 mbconv_expand_forward(x, weight, need_stats) -> (e, mean1, var1)
    K2 mbconv_dwconv_forward(h, weight, stride, in_bn, activation, need_stats) -> (d, mean2, var2)
    K3 mbconv_squeeze_forward(d, bn2, activation) -> pooled
    K4 mbconv_excite_forward(pooled, fc1_weight, fc1_bias, fc2_weight, fc2_bias, se_activation,
                             gate) -> gate_values
    K5 mbconv_project_forward(d, gate_values, weight, bn2, activation, need_stats)
                             -> (q, mean3, var3)
    K6 mbconv_output_forward(q, bn3, sample_scale, residual) -> out
    backward, in call order (q is recomputed with K5, need_stats=False):
    B6 mbconv_output_backward_stats(grad_out, q, bn3, sample_scale) -> (sum_dy3, sum_dy3_xhat3)
    B5 mbconv_project_backward(grad_out, q, d, gate_values, weight, bn2, activation, bn3,
                               sum_dy3, sum_dy3_xhat3, sample_scale, training, output_mask)
                               -> (grad_a2, grad_gate, grad_weight)                       [2]
    B4 mbconv_excite_backward(grad_gate, pooled, fc1_weight, fc1_bias, fc2_weight, fc2_bias,
                              se_activation, gate) -> (grad_pooled, gfc1_w, gfc1_b, gfc2_w, gfc2_b)
    B3 mbconv_dwconv_backward_stats(grad_a2, grad_pooled, d, bn2, activation)
                                    -> (sum_dy2, sum_dy2_xhat2)
    B2 mbconv_dwconv_backward(grad_a2, grad_pooled, d, h, weight, stride, bn2, activation,
                              sum_dy2, sum_dy2_xhat2, in_bn, training, output_mask)
                              -> (grad_h, grad_weight, sum_dy1, sum_dy1_xhat1)             [2]
    B1 mbconv_expand_backward(grad_y1, e, x, weight, bn1, sum_dy1, sum_dy1_xhat1, training,
                              grad_residual, output_mask) -> (grad_x, grad_weight)         [2]

Stem and head (``fused_mbconv::conv_bn_act``, ``fused_mbconv::pointwise_bn_act_pool``;
``fused_mbconv.ops.stem_head``). The dense conv + BN + act of a network's stem (and of timm's
unpooled head) has its own two functions; the pooled head reuses the block's K1, K3 and B1 and
adds one. A backend without a function runs the reference's (``backends.kernels_with_reference``
says which)::

    conv_bn_act_forward(x, weight, stride, bn_weight, bn_bias, running_mean, running_var,
                        training, eps, activation) -> (out, mean, var)
    conv_bn_act_backward(grad_out, x, weight, bn_weight, bn_bias, mean, var, stride, training,
                         eps, activation, output_mask) -> (gx, gw, ggamma, gbeta)
    head forward: K1 (e, mean, var), then K3 with the head's BN and activation: pooled
    head backward: K1 (e recomputed, need_stats=False), then
    act_pool_backward(grad_pooled, e, bn, activation) -> (dy, sum_dy, sum_dy_xhat)
    and B1 with grad_y1 = dy, grad_residual None.

Conventions of the block functions: activations (x, e, d, q, out, and the big gradients) are
4-D in the input's dtype and memory format; 1x1 conv and SE weights are 2-D (out, in)
matrices in the activation dtype; the depthwise weight is (C, 1, k, k); per-channel statistics,
per-sample vectors (pooled (N, C), gate_values (N, C), sample_scale (N,)) and the reductions
``sum_dy`` = sum(dy), ``sum_dy_xhat`` = sum(dy * x_hat) (which are also the BN bias and weight
gradients) are in the accumulate dtype. ``activation``, ``se_activation`` and ``gate`` are the
names of ``fused_mbconv.activations`` (compile-time flags of a kernel).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from .activations import KINDS, kernel_kind
from .tensors import NormArgs, accumulate_dtype, like_input

Tensor = torch.Tensor


def _channel(v: Tensor) -> Tensor:
    return v.view(1, -1, 1, 1)


def _empty_stats(x: Tensor) -> Tuple[Tensor, Tensor]:
    empty = x.new_empty(0, dtype=accumulate_dtype(x.dtype))
    return empty, empty.clone()


def _batch_stats(t: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance over (N, H, W), in the accumulate dtype."""
    var, mean = torch.var_mean(t.to(accumulate_dtype(t.dtype)), dim=(0, 2, 3), correction=0)
    return mean, var


def _affine(x: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor]
            ) -> Tuple[Tensor, Tensor]:
    acc = accumulate_dtype(x.dtype)
    ones = torch.ones(x.shape[1], dtype=acc, device=x.device)
    gamma = bn_weight.to(acc) if bn_weight is not None else ones
    beta = bn_bias.to(acc) if bn_bias is not None else torch.zeros_like(ones)
    return gamma, beta


def _normalized(x: Tensor, bn: NormArgs) -> Tuple[Tensor, Tensor, Tensor]:
    """(x_hat, y = BN(x), gamma * invstd), all in the accumulate dtype."""
    gamma, beta = _affine(x, bn.weight, bn.bias)
    invstd = torch.rsqrt(bn.var + bn.eps)
    x_hat = (x.to(invstd.dtype) - _channel(bn.mean)) * _channel(invstd)
    return x_hat, x_hat * _channel(gamma) + _channel(beta), gamma * invstd


def _bn_grad_sums(dy: Tensor, x_hat: Tensor) -> Tuple[Tensor, Tensor]:
    """(sum dy, sum dy * x_hat) per channel: BN's bias and weight gradients."""
    return dy.sum((0, 2, 3)), (dy * x_hat).sum((0, 2, 3))


def _bn_grad_input(dy: Tensor, x_hat: Tensor, gamma_invstd: Tensor, sum_dy: Tensor,
                   sum_dy_xhat: Tensor, training: bool) -> Tensor:
    """BN's input gradient; in training the batch statistics' own gradient is subtracted."""
    if training:
        count = dy.numel() // dy.shape[1]
        dy = dy - _channel(sum_dy / count) - x_hat * _channel(sum_dy_xhat / count)
    return dy * _channel(gamma_invstd)


def _act(name: str, y: Tensor) -> Tensor:
    return KINDS[kernel_kind(name)].forward(y)


def _act_grad(name: str, y: Tensor) -> Tensor:
    """d act(y) / dy, with aten's choices at the kinks."""
    return KINDS[kernel_kind(name)].grad(y)


def dwconv_bn_silu_forward(x: Tensor, weight: Tensor, bn_weight: Optional[Tensor],
                           bn_bias: Optional[Tensor], running_mean: Optional[Tensor],
                           running_var: Optional[Tensor], stride: int, training: bool,
                           eps: float, need_conv_out: bool
                           ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """SiLU(BN(depthwise_conv(x))) with padding k//2.

    Returns (out, conv_out, mean, var): conv_out is the depthwise output, kept for backward
    (empty when ``need_conv_out`` is False); mean and biased var are the statistics used to
    normalize (the batch's in training, copies of the running ones in eval)."""
    acc = accumulate_dtype(x.dtype)
    k = weight.shape[-1]
    d = F.conv2d(x, weight, None, stride, k // 2, 1, x.shape[1])
    if training:
        mean, var = _batch_stats(d)
    else:
        mean, var = running_mean.to(acc, copy=True), running_var.to(acc, copy=True)
    _, y, _ = _normalized(d, NormArgs(mean, var, bn_weight, bn_bias, eps))
    out = _act("silu", y).to(x.dtype)
    conv_out = like_input(d, x) if need_conv_out else d.new_empty(0)
    return like_input(out, x), conv_out, mean, var


def dwconv_bn_silu_backward(grad_out: Tensor, x: Tensor, weight: Tensor, conv_out: Tensor,
                            bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
                            mean: Tensor, var: Tensor, stride: int, training: bool, eps: float,
                            output_mask: List[bool]
                            ) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor],
                                       Optional[Tensor]]:
    """Gradients (input, conv weight, bn weight, bn bias); None where output_mask is False.

    The BN output and the SiLU input are recomputed from conv_out and the statistics."""
    x_hat, y, gamma_invstd = _normalized(conv_out, NormArgs(mean, var, bn_weight, bn_bias, eps))
    g = grad_out.to(y.dtype) * _act_grad("silu", y)
    grad_beta, grad_gamma = _bn_grad_sums(g, x_hat)
    grad_conv = _bn_grad_input(g, x_hat, gamma_invstd, grad_beta, grad_gamma,
                               training).to(x.dtype)
    grad_x, grad_w = _dwconv_backward(grad_conv, x, weight, stride, output_mask[:2])
    return (grad_x, grad_w,
            grad_gamma if output_mask[2] else None,
            grad_beta if output_mask[3] else None)


def _dwconv_backward(grad_conv: Tensor, x: Tensor, weight: Tensor, stride: int,
                     output_mask: List[bool], groups: Optional[int] = None
                     ) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """(grad input, grad weight) of the padding-k//2 conv: depthwise, or ``groups`` groups."""
    k = weight.shape[-1]
    if not (output_mask[0] or output_mask[1]):
        return None, None
    grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
        grad_conv, x, weight, None, [stride, stride], [k // 2, k // 2], [1, 1], False,
        [0, 0], x.shape[1] if groups is None else groups, [output_mask[0], output_mask[1], False])
    return (like_input(grad_x, x) if grad_x is not None else None), grad_w


def _conv1x1_backward(grad_out: Tensor, x: Tensor, weight: Tensor, output_mask: List[bool]
                      ) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """(grad input, grad (out, in) weight) of ``conv2d(x, weight[:, :, None, None])``."""
    if not (output_mask[0] or output_mask[1]):
        return None, None
    grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
        grad_out, x, weight[:, :, None, None], None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1,
        [output_mask[0], output_mask[1], False])
    return (like_input(grad_x, x) if grad_x is not None else None,
            grad_w.flatten(1) if grad_w is not None else None)


# ---- MBConv block: forward (K1..K6) -------------------------------------------------------

def _activated(t: Tensor, bn: NormArgs, activation: str) -> Tensor:
    """act(BN(t)) in the accumulate dtype: what a kernel builds on load from t."""
    return _act(activation, _normalized(t, bn)[1])


def mbconv_expand_forward(x: Tensor, weight: Tensor, need_stats: bool
                          ) -> Tuple[Tensor, Tensor, Tensor]:
    """K1, expansion GEMM: e = conv1x1(x) with weight (Ce, Cin); reads x, writes e (N, Ce, H, W)
    like x. Epilogue: BN1's batch mean and biased variance of e, (Ce,) each, when need_stats
    (else empty)."""
    e = like_input(F.conv2d(x, weight[:, :, None, None]), x)
    return (e, *(_batch_stats(e) if need_stats else _empty_stats(x)))


def mbconv_dwconv_forward(h: Tensor, weight: Tensor, stride: int, in_bn: Optional[NormArgs],
                          activation: str, need_stats: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """K2, depthwise conv (weight (C, 1, k, k), padding k//2, stride 1 or 2) of
    a1 = act(BN1(h)) built on load (prologue; a1 = h when ``in_bn`` is None); reads h (+ halo),
    writes d (N, C, Ho, Wo) like h. Epilogue: BN2's batch mean and biased variance of d, (C,)
    each, when need_stats (else empty)."""
    a = h if in_bn is None else _activated(h, in_bn, activation).to(h.dtype)
    k = weight.shape[-1]
    d = like_input(F.conv2d(a, weight, None, stride, k // 2, 1, h.shape[1]), h)
    return (d, *(_batch_stats(d) if need_stats else _empty_stats(h)))


def mbconv_squeeze_forward(d: Tensor, bn2: NormArgs, activation: str) -> Tensor:
    """K3, squeeze: pooled = mean over (Ho, Wo) of a2 = act(BN2(d)), (N, C) in the accumulate
    dtype. Reads d; a2 is never written."""
    return _activated(d, bn2, activation).mean((2, 3))


def _excite_hidden(pooled: Tensor, fc1_weight: Tensor, fc1_bias: Tensor) -> Tensor:
    return pooled @ fc1_weight.to(pooled.dtype).t() + fc1_bias.to(pooled.dtype)


def mbconv_excite_forward(pooled: Tensor, fc1_weight: Tensor, fc1_bias: Tensor,
                          fc2_weight: Tensor, fc2_bias: Tensor, se_activation: str, gate: str
                          ) -> Tensor:
    """K4, excite: gate(fc2(se_act(fc1(pooled)))) with fc1 (S, C) + (S,), fc2 (C, S) + (C,);
    (N, C) in the accumulate dtype. Reads and writes only per-sample vectors."""
    s = _act(se_activation, _excite_hidden(pooled, fc1_weight, fc1_bias))
    return _act(gate, s @ fc2_weight.to(s.dtype).t() + fc2_bias.to(s.dtype))


def _gated(d: Tensor, bn2: NormArgs, activation: str, gate_values: Optional[Tensor]
           ) -> Tuple[Tensor, Tensor]:
    """(a2, a3 = a2 * gate) in the accumulate dtype: the projection's A operand."""
    a2 = _activated(d, bn2, activation)
    return a2, (a2 if gate_values is None else a2 * gate_values[:, :, None, None])


def mbconv_project_forward(d: Tensor, gate_values: Optional[Tensor], weight: Tensor,
                           bn2: NormArgs, activation: str, need_stats: bool
                           ) -> Tuple[Tensor, Tensor, Tensor]:
    """K5, projection GEMM: q = conv1x1(a3) with weight (Cout, C), where the A operand
    a3 = act(BN2(d)) * gate_values[n, c] (no gate when None) is built on load; reads d and the
    gate, writes q (N, Cout, Ho, Wo) like d. Epilogue: BN3's batch mean and biased variance of
    q, (Cout,) each, when need_stats (else empty). Also the backward's recompute of q."""
    a3 = _gated(d, bn2, activation, gate_values)[1].to(d.dtype)
    q = like_input(F.conv2d(a3, weight[:, :, None, None]), d)
    return (q, *(_batch_stats(q) if need_stats else _empty_stats(d)))


def mbconv_output_forward(q: Tensor, bn3: NormArgs, sample_scale: Optional[Tensor],
                          residual: Optional[Tensor]) -> Tensor:
    """K6, output: out = BN3(q) * sample_scale[n] + residual (stochastic depth's per-sample
    scale 0 or 1/keep, absent when None; no residual when None). Reads q (and the residual),
    writes out like q."""
    o = _normalized(q, bn3)[1]
    if sample_scale is not None:
        o = o * sample_scale[:, None, None, None]
    if residual is not None:
        o = o + residual.to(o.dtype)
    return like_input(o.to(q.dtype), q)


# ---- MBConv block: backward (B6..B1), recomputing activations from x, e, d -----------------

def _output_grad(grad_out: Tensor, q: Tensor, bn3: NormArgs, sample_scale: Optional[Tensor]
                 ) -> Tuple[Tensor, Tensor, Tensor]:
    """(dy3, x_hat3, gamma3 * invstd3): BN3's output gradient (drop-path scale applied)."""
    x_hat, _, gamma_invstd = _normalized(q, bn3)
    dy = grad_out.to(x_hat.dtype)
    if sample_scale is not None:
        dy = dy * sample_scale[:, None, None, None]
    return dy, x_hat, gamma_invstd


def mbconv_output_backward_stats(grad_out: Tensor, q: Tensor, bn3: NormArgs,
                                 sample_scale: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """B6, BN3 reductions: (sum dy3, sum dy3 * x_hat3), (Cout,) each, where
    dy3 = grad_out * sample_scale[n]. Reads grad_out and the recomputed q."""
    dy, x_hat, _ = _output_grad(grad_out, q, bn3, sample_scale)
    return _bn_grad_sums(dy, x_hat)


def mbconv_project_backward(grad_out: Tensor, q: Tensor, d: Tensor,
                            gate_values: Optional[Tensor], weight: Tensor, bn2: NormArgs,
                            activation: str, bn3: NormArgs, sum_dy3: Tensor,
                            sum_dy3_xhat3: Tensor, sample_scale: Optional[Tensor],
                            training: bool, output_mask: List[bool]
                            ) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """B5, projection backward. gq = BN3 backward applied to dy3 (prologue, from grad_out, q
    and B6's sums); a2, a3 recomputed from d on load.

    - dgrad launch (output_mask[0]): ga3 = weight^T gq; writes grad_a2 = ga3 * gate_values
      (N, C, Ho, Wo) like d, and (epilogue) grad_gate = sum over (Ho, Wo) of ga3 * a2,
      (N, C) accumulate dtype (empty when gate_values is None).
    - wgrad launch (output_mask[1]): grad_weight = sum over (N, Ho, Wo) of gq a3^T, (Cout, C).
    Masked-off results are None."""
    dy, x_hat, gamma_invstd = _output_grad(grad_out, q, bn3, sample_scale)
    gq = _bn_grad_input(dy, x_hat, gamma_invstd, sum_dy3, sum_dy3_xhat3, training).to(d.dtype)
    a2, a3 = _gated(d, bn2, activation, gate_values)
    grad_a3, grad_weight = _conv1x1_backward(gq, a3.to(d.dtype), weight, output_mask)
    grad_a2 = grad_gate = None
    if grad_a3 is not None:
        grad_a3 = grad_a3.to(a2.dtype)
        if gate_values is None:
            grad_a2, grad_gate = grad_a3, _empty_stats(d)[0]
        else:
            grad_a2 = grad_a3 * gate_values[:, :, None, None]
            grad_gate = (grad_a3 * a2).sum((2, 3))
        grad_a2 = like_input(grad_a2.to(d.dtype), d)
    return grad_a2, grad_gate, grad_weight


def mbconv_excite_backward(grad_gate: Tensor, pooled: Tensor, fc1_weight: Tensor,
                           fc1_bias: Tensor, fc2_weight: Tensor, fc2_bias: Tensor,
                           se_activation: str, gate: str
                           ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """B4, excite backward from grad_gate (N, C): (grad_pooled (N, C), grad fc1 weight (S, C),
    grad fc1 bias (S,), grad fc2 weight (C, S), grad fc2 bias (C,)), all in the accumulate
    dtype; the hidden vectors are recomputed from pooled."""
    acc = pooled.dtype
    w1, w2 = fc1_weight.to(acc), fc2_weight.to(acc)
    z1 = _excite_hidden(pooled, fc1_weight, fc1_bias)
    s = _act(se_activation, z1)
    z2 = s @ w2.t() + fc2_bias.to(acc)
    gz2 = grad_gate * _act_grad(gate, z2)
    gz1 = (gz2 @ w2) * _act_grad(se_activation, z1)
    return gz1 @ w1, gz1.t() @ pooled, gz1.sum(0), gz2.t() @ s, gz2.sum(0)


def _dwconv_output_grad(grad_a2: Tensor, grad_pooled: Optional[Tensor], d: Tensor,
                        bn2: NormArgs, activation: str) -> Tuple[Tensor, Tensor, Tensor]:
    """(dy2, x_hat2, gamma2 * invstd2): the gradient at BN2's output, adding the squeeze's
    share grad_pooled / (Ho * Wo) to every position."""
    x_hat, y, gamma_invstd = _normalized(d, bn2)
    ga2 = grad_a2.to(y.dtype)
    if grad_pooled is not None:
        ga2 = ga2 + grad_pooled[:, :, None, None] / (d.shape[2] * d.shape[3])
    return ga2 * _act_grad(activation, y), x_hat, gamma_invstd


def mbconv_dwconv_backward_stats(grad_a2: Tensor, grad_pooled: Optional[Tensor], d: Tensor,
                                 bn2: NormArgs, activation: str) -> Tuple[Tensor, Tensor]:
    """B3, BN2 reductions: (sum dy2, sum dy2 * x_hat2), (C,) each, where
    dy2 = (grad_a2 + grad_pooled[n, c] / (Ho * Wo)) * act'(BN2(d)). Reads grad_a2 and d."""
    dy, x_hat, _ = _dwconv_output_grad(grad_a2, grad_pooled, d, bn2, activation)
    return _bn_grad_sums(dy, x_hat)


def mbconv_dwconv_backward(grad_a2: Tensor, grad_pooled: Optional[Tensor], d: Tensor,
                           h: Tensor, weight: Tensor, stride: int, bn2: NormArgs,
                           activation: str, sum_dy2: Tensor, sum_dy2_xhat2: Tensor,
                           in_bn: Optional[NormArgs], training: bool, output_mask: List[bool]
                           ) -> Tuple[Optional[Tensor], Optional[Tensor], Tensor, Tensor]:
    """B2, depthwise backward. gd = BN2 backward applied to dy2 (prologue, from grad_a2,
    grad_pooled, d and B3's sums); the depthwise input a1 = act(BN1(h)) recomputed from h
    (a1 = h when ``in_bn`` is None).

    - dgrad launch (output_mask[0]): transposed depthwise conv of gd. With ``in_bn``, writes
      grad_h = dy1 = grad_a1 * act'(BN1(h)), the gradient at BN1's output, and (epilogue) BN1's
      reductions (sum dy1, sum dy1 * x_hat1), (C,) each; without, grad_h = grad_a1 = the
      gradient of h, and the sums are empty. grad_h is (N, C, H, W) like h.
    - wgrad launch (output_mask[1]): grad_weight (C, 1, k, k) = per-channel correlation of gd
      with a1.
    Masked-off results are None (sums empty)."""
    dy, x_hat, gamma_invstd = _dwconv_output_grad(grad_a2, grad_pooled, d, bn2, activation)
    gd = _bn_grad_input(dy, x_hat, gamma_invstd, sum_dy2, sum_dy2_xhat2, training).to(d.dtype)
    a1 = h if in_bn is None else _activated(h, in_bn, activation).to(h.dtype)
    grad_h, grad_weight = _dwconv_backward(gd, a1, weight, stride, output_mask)
    sums = _empty_stats(h)
    if grad_h is not None and in_bn is not None:
        x_hat1, y1, _ = _normalized(h, in_bn)
        dy1 = grad_h.to(y1.dtype) * _act_grad(activation, y1)
        sums = _bn_grad_sums(dy1, x_hat1)
        grad_h = like_input(dy1.to(h.dtype), h)
    return (grad_h, grad_weight, *sums)


def mbconv_expand_backward(grad_y1: Tensor, e: Tensor, x: Tensor, weight: Tensor,
                           bn1: NormArgs, sum_dy1: Tensor, sum_dy1_xhat1: Tensor,
                           training: bool, grad_residual: Optional[Tensor],
                           output_mask: List[bool]) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """B1, expansion backward. ge = BN1 backward applied to grad_y1 (prologue, from grad_y1, e
    and B2's sums).

    - dgrad launch (output_mask[0]): grad_x = weight^T ge (+ grad_residual in the epilogue,
      when given), (N, Cin, H, W) like x.
    - wgrad launch (output_mask[1]): grad_weight = sum over (N, H, W) of ge x^T, (Ce, Cin).
    Masked-off results are None."""
    x_hat, _, gamma_invstd = _normalized(e, bn1)
    ge = _bn_grad_input(grad_y1.to(x_hat.dtype), x_hat, gamma_invstd, sum_dy1, sum_dy1_xhat1,
                        training).to(x.dtype)
    grad_x, grad_weight = _conv1x1_backward(ge, x, weight, output_mask)
    if grad_x is not None and grad_residual is not None:
        grad_x = like_input(grad_x + grad_residual.to(grad_x.dtype), x)
    return grad_x, grad_weight


# ---- stem and head ------------------------------------------------------------------------

def conv_bn_act_forward(x: Tensor, weight: Tensor, stride: int, bn_weight: Optional[Tensor],
                        bn_bias: Optional[Tensor], running_mean: Optional[Tensor],
                        running_var: Optional[Tensor], training: bool, eps: float,
                        activation: str) -> Tuple[Tensor, Tensor, Tensor]:
    """act(BN(conv(x))), a dense conv (weight (Cout, Cin, k, k), padding k//2, no bias).

    Returns (out, mean, var): out like x; the statistics used to normalize (the batch's in
    training, copies of the running ones in eval). The conv output is not kept: backward
    recomputes it from x."""
    acc = accumulate_dtype(x.dtype)
    k = weight.shape[-1]
    c = F.conv2d(x, weight, None, stride, k // 2)
    if training:
        mean, var = _batch_stats(c)
    else:
        mean, var = running_mean.to(acc, copy=True), running_var.to(acc, copy=True)
    out = _activated(c, NormArgs(mean, var, bn_weight, bn_bias, eps), activation)
    return like_input(out.to(x.dtype), x), mean, var


def conv_bn_act_backward(grad_out: Tensor, x: Tensor, weight: Tensor,
                         bn_weight: Optional[Tensor], bn_bias: Optional[Tensor], mean: Tensor,
                         var: Tensor, stride: int, training: bool, eps: float, activation: str,
                         output_mask: List[bool]
                         ) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor],
                                    Optional[Tensor]]:
    """Gradients (input, conv weight, bn weight, bn bias); None where output_mask is False.
    The conv output is recomputed from x; BN output and activation input from it."""
    k = weight.shape[-1]
    c = F.conv2d(x, weight, None, stride, k // 2)
    x_hat, y, gamma_invstd = _normalized(c, NormArgs(mean, var, bn_weight, bn_bias, eps))
    g = grad_out.to(y.dtype) * _act_grad(activation, y)
    grad_beta, grad_gamma = _bn_grad_sums(g, x_hat)
    grad_conv = _bn_grad_input(g, x_hat, gamma_invstd, grad_beta, grad_gamma,
                               training).to(x.dtype)
    grad_x, grad_w = _dwconv_backward(grad_conv, x, weight, stride, output_mask[:2], groups=1)
    return (grad_x, grad_w,
            grad_gamma if output_mask[2] else None,
            grad_beta if output_mask[3] else None)


def act_pool_backward(grad_pooled: Tensor, e: Tensor, bn: NormArgs, activation: str
                      ) -> Tuple[Tensor, Tensor, Tensor]:
    """The head's pool and activation backward: from grad_pooled (N, C) (accumulate dtype) of
    pooled = mean over (H, W) of act(BN(e)), dy = grad_pooled[n, c] / (H * W) * act'(BN(e)),
    the gradient at BN's output, like e in e's dtype, and BN's reductions (sum dy,
    sum dy * x_hat), (C,) each: B3's math with no per-position gradient."""
    no_position_grad = torch.zeros((), dtype=grad_pooled.dtype, device=e.device)
    dy, x_hat, _ = _dwconv_output_grad(no_position_grad, grad_pooled, e, bn, activation)
    return (like_input(dy.to(e.dtype), e), *_bn_grad_sums(dy, x_hat))
