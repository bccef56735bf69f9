"""Triton depthwise conv + BatchNorm + SiLU, forward and backward, and their launchers.

Programs are (position tile, channel block, image); a tile is [BLOCK_P positions h·W + w of
one image, BLOCK_C channels], so only the per-image base offset needs 64 bits. NCHW and
channels_last are one source, the layout a constexpr (the launcher makes every activation
contiguous in the input's memory format, so the unit-stride dimension is known at compile
time); a conv tap is the tile's centre offsets plus a scalar. Math and statistics run in ACC
(float32, or float64 for float64 inputs).

Training forward: conv -> d written once + per-tile (mean, M2) partials; finalize merges the
partials with Chan's formula; apply reads d and writes SiLU(BN(d)).
Eval forward: one pass, BN folded into a per-channel scale/shift; d written only on request.
Backward: reduce (Σg, Σg·x̂ per tile, g = grad_out·silu'(y), y recomputed from d) -> sum
partials -> grad_conv recomputed per output tile, its weight-gradient partials reduced there and
written once for the transposed conv -> grad_input. Every cross-program reduction goes through
per-tile partials summed in a fixed order: deterministic, no atomics.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from fused_mbconv import reference
from fused_mbconv.activations import kernel_kind
from fused_mbconv.interface import specified_by
from fused_mbconv.tensors import NormArgs

from .common import (COMPILE_OPTIONS, NUM_WARPS, Problem, bn_args, bn_bytes, finalize_stats,
                     launch, nbytes, sum_rows, tile_sizes)
from .jit_helpers import (act, act_grad, bn_batch_grad, bn_coefficients, bn_grad_means,
                          bn_normalized, bn_scale_shift, image, offsets, store_grad_partials,
                          tap_offset, tile)

Tensor = torch.Tensor


def forward_options(k: int, apply: bool) -> dict:
    """Compile options of dwconv_bn_silu_fwd_kernel, used by its launcher and the compile
    report alike. Uncapped, ptxas holds the k=3 eval (APPLY) forward to 64 registers on sm_90
    and spills (fp16); a 96-register cap gives it 88, spill-free. Other variants stay uncapped:
    a cap there makes ptxas schedule more loads ahead and spill."""
    return dict(num_warps=NUM_WARPS, maxnreg=96) if apply and k == 3 else COMPILE_OPTIONS


# ----------------------------------------------------------------------------- kernels

@triton.jit
def _input_tile(x_ptr, n, c, oh, ow, C, H, W, K: tl.constexpr, STRIDE: tl.constexpr,
                CHANNELS_LAST: tl.constexpr):
    """(ih0, iw0, pointers) of the conv input under tap (0, 0) of an output tile."""
    ih0 = oh * STRIDE - K // 2
    iw0 = ow * STRIDE - K // 2
    return ih0, iw0, image(x_ptr, n, C, H, W) + offsets(c, ih0, iw0, C, H, W, CHANNELS_LAST)


@triton.jit
def _input_bn(c, mc, mean_ptr, var_ptr, gamma_ptr, beta_ptr, eps, IN_BN: tl.constexpr,
              HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr, ACC: tl.constexpr):
    """The input BN's folded (scale, shift) when IN_BN (zeros, never used, otherwise)."""
    scale = tl.zeros(c.shape, ACC)
    shift = scale
    if IN_BN:
        scale, shift = bn_scale_shift(c, mc, mean_ptr, var_ptr, gamma_ptr, beta_ptr, eps,
                                      HAS_GAMMA, HAS_BETA, ACC)
    return scale, shift


@triton.jit
def _tap_input(x_tile, kh, kw, m, mc, in_scale, in_shift, C, W, CHANNELS_LAST: tl.constexpr,
               IN_BN: tl.constexpr, ACT: tl.constexpr, ACC: tl.constexpr):
    """The conv input under tap (kh, kw), m its in-image positions: x, or with IN_BN
    act(BN_in(x)) rounded to x's dtype as the unfused block stores a1, zero padding applied
    after it."""
    xv = tl.load(x_tile + tap_offset(kh, kw, C, W, CHANNELS_LAST),
                 mask=m[:, None] & mc[None, :], other=0.0)
    if IN_BN:
        a = act(xv.to(ACC) * in_scale[None, :] + in_shift[None, :], ACT)
        xv = tl.where(m[:, None], a, 0.0).to(x_tile.dtype.element_ty)
    return xv


@triton.jit
def _tap_mac(acc, v, w_ptr, c, mc, kh, kw, K: tl.constexpr, ACC: tl.constexpr):
    """acc + v · the weight of tap (kh, kw), per channel."""
    wv = tl.load(w_ptr + c * (K * K) + (kh * K + kw), mask=mc, other=0.0)
    return acc + v.to(ACC) * wv.to(ACC)[None, :]


@triton.jit
def dwconv_bn_silu_fwd_kernel(
        x_ptr, w_ptr, d_ptr, out_ptr, part_ptr, mean_ptr, var_ptr, gamma_ptr, beta_ptr,
        mean_out_ptr, var_out_ptr, in_mean_ptr, in_var_ptr, in_gamma_ptr, in_beta_ptr,
        C, H, W, OH, OW, eps, in_eps,
        K: tl.constexpr, STRIDE: tl.constexpr, CHANNELS_LAST: tl.constexpr,
        STATS: tl.constexpr, APPLY: tl.constexpr, WRITE_D: tl.constexpr,
        HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr, IN_BN: tl.constexpr,
        IN_HAS_GAMMA: tl.constexpr, IN_HAS_BETA: tl.constexpr, ACT: tl.constexpr,
        ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Depthwise conv of one tile of image program_id(2). IN_BN: the conv input is
    act(BN_in(x)) built on load (zero padding applied after it). STATS: this tile's (mean, M2)
    per channel of d. APPLY (eval): the folded BN + act applied here, out written. d written
    when WRITE_D."""
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    n = tl.program_id(2)
    mp, c, mc, oh, ow = tile(pid_p, pid_c, OH * OW, C, OW, BLOCK_P, BLOCK_C)
    ih0, iw0, x_tile = _input_tile(x_ptr, n, c, oh, ow, C, H, W, K, STRIDE, CHANNELS_LAST)
    in_scale, in_shift = _input_bn(c, mc, in_mean_ptr, in_var_ptr, in_gamma_ptr, in_beta_ptr,
                                   in_eps, IN_BN, IN_HAS_GAMMA, IN_HAS_BETA, ACC)
    acc = tl.zeros([BLOCK_P, BLOCK_C], ACC)
    for kh in tl.static_range(K):
        mh = mp & (ih0 + kh >= 0) & (ih0 + kh < H)
        for kw in tl.static_range(K):
            m = mh & (iw0 + kw >= 0) & (iw0 + kw < W)
            xv = _tap_input(x_tile, kh, kw, m, mc, in_scale, in_shift, C, W, CHANNELS_LAST,
                            IN_BN, ACT, ACC)
            acc = _tap_mac(acc, xv, w_ptr, c, mc, kh, kw, K, ACC)
    mask = mp[:, None] & mc[None, :]
    offs = offsets(c, oh, ow, C, OH, OW, CHANNELS_LAST)
    # Statistics and BN see d as stored (rounded to the input dtype), like backward does.
    d = acc.to(d_ptr.dtype.element_ty)
    if WRITE_D:
        tl.store(image(d_ptr, n, C, OH, OW) + offs, d, mask=mask)
    d = d.to(ACC)
    if STATS:
        count = tl.minimum(OH * OW - pid_p * BLOCK_P, BLOCK_P).to(ACC)
        tile_mean = tl.sum(tl.where(mask, d, 0.0), axis=0) / count
        dev = tl.where(mask, d - tile_mean[None, :], 0.0)
        row = part_ptr + (n * tl.num_programs(0) + pid_p) * (2 * C)
        tl.store(row + c, tile_mean, mask=mc)
        tl.store(row + C + c, tl.sum(dev * dev, axis=0), mask=mc)
    if APPLY:
        scale, shift = bn_scale_shift(c, mc, mean_ptr, var_ptr, gamma_ptr, beta_ptr, eps,
                                      HAS_GAMMA, HAS_BETA, ACC)
        y = d * scale[None, :] + shift[None, :]
        tl.store(image(out_ptr, n, C, OH, OW) + offs,
                 act(y, ACT).to(out_ptr.dtype.element_ty), mask=mask)
        if (pid_p == 0) & (n == 0):  # eval returns the statistics it used, in ACC
            tl.store(mean_out_ptr + c, tl.load(mean_ptr + c, mask=mc).to(ACC), mask=mc)
            tl.store(var_out_ptr + c, tl.load(var_ptr + c, mask=mc).to(ACC), mask=mc)


@triton.jit
def bn_silu_apply_kernel(d_ptr, out_ptr, mean_ptr, var_ptr, gamma_ptr, beta_ptr,
                         C, OH, OW, eps, CHANNELS_LAST: tl.constexpr,
                         HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr, ACT: tl.constexpr,
                         ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    n = tl.program_id(2)
    mp, c, mc, oh, ow = tile(tl.program_id(0), tl.program_id(1), OH * OW, C, OW,
                             BLOCK_P, BLOCK_C)
    scale, shift = bn_scale_shift(c, mc, mean_ptr, var_ptr, gamma_ptr, beta_ptr, eps,
                                  HAS_GAMMA, HAS_BETA, ACC)
    mask = mp[:, None] & mc[None, :]
    offs = offsets(c, oh, ow, C, OH, OW, CHANNELS_LAST)
    d = tl.load(image(d_ptr, n, C, OH, OW) + offs, mask=mask, other=0.0).to(ACC)
    y = d * scale[None, :] + shift[None, :]
    tl.store(image(out_ptr, n, C, OH, OW) + offs,
             act(y, ACT).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _act_bn_grad(go_ptr, d_ptr, offs, mask, n, c, mc, C, OH, OW, mean_ptr, var_ptr, gamma_ptr,
                 beta_ptr, eps, pooled_ptr, scale_ptr, HAS_GAMMA: tl.constexpr,
                 HAS_BETA: tl.constexpr, ACT: tl.constexpr, POOLED: tl.constexpr,
                 SCALE: tl.constexpr, ACC: tl.constexpr):
    """(g, x̂, gamma / std) of an output tile of image n: g = dL/dy at the BN output (through
    the activation) and x̂, recomputed from grad_out and d, zero off-mask. POOLED adds the
    squeeze's share pooled[n, c] / (OH·OW) to grad_out, SCALE multiplies it by the drop-path
    scale[n]."""
    mean, invstd, gamma, beta = bn_coefficients(c, mc, mean_ptr, var_ptr, gamma_ptr, beta_ptr,
                                                eps, HAS_GAMMA, HAS_BETA, ACC)
    x_hat = bn_normalized(tl.load(image(d_ptr, n, C, OH, OW) + offs, mask=mask,
                                  other=0.0).to(ACC), mean, invstd)
    go = tl.load(image(go_ptr, n, C, OH, OW) + offs, mask=mask, other=0.0).to(ACC)
    if POOLED:
        share = tl.load(pooled_ptr + n * C + c, mask=mc, other=0.0).to(ACC) / (OH * OW)
        go += share[None, :]
    if SCALE:
        go *= tl.load(scale_ptr + n).to(ACC)
    if ACT != "identity":
        go *= act_grad(x_hat * gamma[None, :] + beta[None, :], ACT)
    return tl.where(mask, go, 0.0), x_hat, gamma * invstd


@triton.jit
def bn_silu_bwd_reduce_kernel(go_ptr, d_ptr, mean_ptr, var_ptr, gamma_ptr, beta_ptr, part_ptr,
                              pooled_ptr, scale_ptr, C, OH, OW, eps,
                              CHANNELS_LAST: tl.constexpr, HAS_GAMMA: tl.constexpr,
                              HAS_BETA: tl.constexpr, ACT: tl.constexpr, POOLED: tl.constexpr,
                              SCALE: tl.constexpr, ACC: tl.constexpr, BLOCK_P: tl.constexpr,
                              BLOCK_C: tl.constexpr):
    """Per-tile Σg and Σg·x̂ per channel (the BN-backward reductions), rows [Σg | Σg·x̂]."""
    pid_p = tl.program_id(0)
    n = tl.program_id(2)
    mp, c, mc, oh, ow = tile(pid_p, tl.program_id(1), OH * OW, C, OW, BLOCK_P, BLOCK_C)
    mask = mp[:, None] & mc[None, :]
    g, x_hat, _ = _act_bn_grad(go_ptr, d_ptr, offsets(c, oh, ow, C, OH, OW, CHANNELS_LAST), mask,
                               n, c, mc, C, OH, OW, mean_ptr, var_ptr, gamma_ptr, beta_ptr, eps,
                               pooled_ptr, scale_ptr, HAS_GAMMA, HAS_BETA, ACT, POOLED, SCALE,
                               ACC)
    store_grad_partials(part_ptr + (n * tl.num_programs(0) + pid_p) * (2 * C), c, mc, C, g,
                        x_hat)


@triton.jit
def dwconv_bwd_grad_conv_kernel(
        go_ptr, d_ptr, x_ptr, gc_ptr, part_ptr, mean_ptr, var_ptr, gamma_ptr, beta_ptr,
        sum_g_ptr, sum_gx_ptr, pooled_ptr, in_mean_ptr, in_var_ptr, in_gamma_ptr, in_beta_ptr,
        C, H, W, OH, OW, count, eps, in_eps,
        K: tl.constexpr, STRIDE: tl.constexpr, CHANNELS_LAST: tl.constexpr,
        TRAINING: tl.constexpr, WRITE_GC: tl.constexpr, NEED_GW: tl.constexpr,
        HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr, ACT: tl.constexpr,
        POOLED: tl.constexpr, IN_BN: tl.constexpr, IN_HAS_GAMMA: tl.constexpr,
        IN_HAS_BETA: tl.constexpr, ACC: tl.constexpr, BLOCK_P: tl.constexpr,
        BLOCK_C: tl.constexpr):
    """grad_conv of one output tile, recomputed from grad_out (+ pooled share), d and the BN
    reductions over ``count`` values per channel; its weight-gradient partials Σ gc·x(shifted)
    per (channel, tap), x = act(BN_in(x)) rebuilt on load when IN_BN; gc written once
    (WRITE_GC) for the transposed conv."""
    pid_p = tl.program_id(0)
    n = tl.program_id(2)
    mp, c, mc, oh, ow = tile(pid_p, tl.program_id(1), OH * OW, C, OW, BLOCK_P, BLOCK_C)
    mask = mp[:, None] & mc[None, :]
    offs = offsets(c, oh, ow, C, OH, OW, CHANNELS_LAST)
    g, x_hat, gamma_invstd = _act_bn_grad(go_ptr, d_ptr, offs, mask, n, c, mc, C, OH, OW,
                                          mean_ptr, var_ptr, gamma_ptr, beta_ptr, eps,
                                          pooled_ptr, pooled_ptr, HAS_GAMMA, HAS_BETA, ACT,
                                          POOLED, False, ACC)
    if TRAINING:
        mean_g, mean_gx = bn_grad_means(c, mc, sum_g_ptr, sum_gx_ptr, count, ACC)
        g = tl.where(mask, bn_batch_grad(g, x_hat, mean_g, mean_gx), 0.0)
    gc = g * gamma_invstd[None, :]
    if WRITE_GC:
        tl.store(image(gc_ptr, n, C, OH, OW) + offs, gc.to(gc_ptr.dtype.element_ty), mask=mask)
    if NEED_GW:
        in_scale, in_shift = _input_bn(c, mc, in_mean_ptr, in_var_ptr, in_gamma_ptr,
                                       in_beta_ptr, in_eps, IN_BN, IN_HAS_GAMMA, IN_HAS_BETA,
                                       ACC)
        row = part_ptr + (n * tl.num_programs(0) + pid_p) * (C * K * K) + c * (K * K)
        ih0, iw0, x_tile = _input_tile(x_ptr, n, c, oh, ow, C, H, W, K, STRIDE,
                                       CHANNELS_LAST)
        for kh in tl.static_range(K):
            mh = mp & (ih0 + kh >= 0) & (ih0 + kh < H)
            for kw in tl.static_range(K):
                m = mh & (iw0 + kw >= 0) & (iw0 + kw < W)
                xv = _tap_input(x_tile, kh, kw, m, mc, in_scale, in_shift, C, W,
                                CHANNELS_LAST, IN_BN, ACT, ACC)
                tl.store(row + (kh * K + kw), tl.sum(gc * xv.to(ACC), axis=0), mask=mc)


@triton.jit
def dwconv_bwd_input_kernel(gc_ptr, w_ptr, gx_ptr, x_ptr, part_ptr, in_mean_ptr, in_var_ptr,
                            in_gamma_ptr, in_beta_ptr, C, H, W, OH, OW, in_eps,
                            K: tl.constexpr, STRIDE: tl.constexpr, CHANNELS_LAST: tl.constexpr,
                            IN_BN: tl.constexpr, IN_HAS_GAMMA: tl.constexpr,
                            IN_HAS_BETA: tl.constexpr, ACT: tl.constexpr, ACC: tl.constexpr,
                            BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """grad_input: the transposed depthwise conv, gathered per input position (no atomics).
    IN_BN: the conv input was act(BN_in(x)); write the gradient at BN_in's output instead and
    this tile's BN_in reductions [Σg | Σg·x̂] per channel."""
    pid_q = tl.program_id(0)
    n = tl.program_id(2)
    mq, c, mc, ih, iw = tile(pid_q, tl.program_id(1), H * W, C, W, BLOCK_P, BLOCK_C)
    gc_image = image(gc_ptr, n, C, OH, OW)
    if STRIDE == 1:  # every tap reaches an output: a fixed shift of the centre offsets
        gc_tile = gc_image + offsets(c, ih + K // 2, iw + K // 2, C, OH, OW, CHANNELS_LAST)
    acc = tl.zeros([BLOCK_P, BLOCK_C], ACC)
    for kh in tl.static_range(K):
        th = ih + K // 2 - kh  # = oh * STRIDE when this tap reaches (ih, iw)
        mh = mq & (th >= 0) & (th < OH * STRIDE) & (th % STRIDE == 0)
        for kw in tl.static_range(K):
            tw = iw + K // 2 - kw
            m = (mh & (tw >= 0) & (tw < OW * STRIDE) & (tw % STRIDE == 0))[:, None] & mc[None, :]
            if STRIDE == 1:
                gv = tl.load(gc_tile - tap_offset(kh, kw, C, OW, CHANNELS_LAST), mask=m,
                             other=0.0)
            else:
                gv = tl.load(gc_image + offsets(c, th // STRIDE, tw // STRIDE, C, OH, OW,
                                                CHANNELS_LAST), mask=m, other=0.0)
            acc = _tap_mac(acc, gv, w_ptr, c, mc, kh, kw, K, ACC)
    mask = mq[:, None] & mc[None, :]
    offs = offsets(c, ih, iw, C, H, W, CHANNELS_LAST)
    grad = acc.to(gx_ptr.dtype.element_ty)
    if IN_BN:
        mean, invstd, gamma, beta = bn_coefficients(c, mc, in_mean_ptr, in_var_ptr,
                                                    in_gamma_ptr, in_beta_ptr, in_eps,
                                                    IN_HAS_GAMMA, IN_HAS_BETA, ACC)
        x_hat = bn_normalized(tl.load(image(x_ptr, n, C, H, W) + offs, mask=mask,
                                      other=0.0).to(ACC), mean, invstd)
        g = tl.where(mask, grad.to(ACC) * act_grad(x_hat * gamma[None, :] + beta[None, :],
                                                   ACT), 0.0)
        store_grad_partials(part_ptr + (n * tl.num_programs(0) + pid_q) * (2 * C), c, mc, C,
                            g, x_hat)
        grad = g.to(gx_ptr.dtype.element_ty)
    tl.store(image(gx_ptr, n, C, H, W) + offs, grad, mask=mask)


def conv_forward(pr: Problem, x: Tensor, weight: Tensor, d: Tensor, *, stats: bool,
                 in_bn: Optional[NormArgs] = None, activation: str = "silu",
                 apply: Optional[Tuple[NormArgs, Tensor, Tensor, Tensor]] = None
                 ) -> Tuple[Tensor, Tensor]:
    """Launch the depthwise forward of ``x`` (layouted) into ``d`` (or, d None, don't write
    it). ``stats``: BN statistics of d -> returns (mean, var). ``apply`` = (bn, out, mean_out,
    var_out): eval BN + activation applied in the same pass."""
    bn, out, mean_out, var_out = apply if apply is not None else (None, x, x, x)
    ptrs, eps, flags = bn_args(bn, x)
    in_ptrs, in_eps, in_flags = bn_args(in_bn, x, "IN_")
    mean = var = part = x
    if stats:
        mean, var, part = pr.stats(x), pr.stats(x), pr.partials(x, 2 * pr.c)
    launch(
        dwconv_bn_silu_fwd_kernel, pr.grid,
        nbytes(x, weight) + bn_bytes(in_bn) + bn_bytes(bn),
        nbytes(d) + (nbytes(part) if stats else 0)
        + (nbytes(out, mean_out, var_out) if apply is not None else 0),
        x, weight, d if d is not None else x, out, part, *ptrs, mean_out, var_out, *in_ptrs,
        pr.c, pr.h, pr.w, pr.oh, pr.ow, eps, in_eps, K=pr.k, STRIDE=pr.stride,
        CHANNELS_LAST=pr.channels_last, STATS=stats, APPLY=apply is not None,
        WRITE_D=d is not None, IN_BN=in_bn is not None, ACT=kernel_kind(activation),
        ACC=pr.acc, BLOCK_P=pr.block_p, BLOCK_C=pr.block_c,
        **forward_options(pr.k, apply is not None), **flags,
        **in_flags)
    if stats:
        finalize_stats(part, mean, var, pr.oh * pr.ow, pr.tiles, pr.block_p, pr.acc)
    return mean, var


def bn_grad_sums(pr: Problem, go: Tensor, d: Tensor, bn: NormArgs, activation: str,
                 pooled: Optional[Tensor] = None, scale: Optional[Tensor] = None
                 ) -> Tuple[Tensor, Tensor]:
    """(Σg, Σg·x̂) per channel, g = (go (+ pooled[n, c] / HW)) (* scale[n]) · act'(BN(d));
    reads go and d (both laid out like pr)."""
    ptrs, eps, flags = bn_args(bn, d)
    part = pr.partials(d, 2 * pr.c)
    launch(
        bn_silu_bwd_reduce_kernel, pr.grid, nbytes(go, d, pooled, scale) + bn_bytes(bn),
        nbytes(part), go, d, *ptrs, part, pooled if pooled is not None else d,
        scale if scale is not None else d, pr.c, pr.oh, pr.ow, eps,
        CHANNELS_LAST=pr.channels_last, ACT=kernel_kind(activation),
        POOLED=pooled is not None, SCALE=scale is not None, ACC=pr.acc, BLOCK_P=pr.block_p,
        BLOCK_C=pr.block_c, **COMPILE_OPTIONS, **flags)
    sum_g, sum_gx = pr.stats(d), pr.stats(d)
    sum_rows(part, (sum_g, sum_gx), pr.acc)
    return sum_g, sum_gx


def conv_backward(pr: Problem, go: Tensor, d: Tensor, x: Tensor, weight: Tensor,
                  bn: NormArgs, sums: Tuple[Tensor, Tensor], training: bool,
                  need_gx: bool, need_gw: bool, *, activation: str = "silu",
                  pooled: Optional[Tensor] = None, in_bn: Optional[NormArgs] = None
                  ) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tuple[Tensor, Tensor]]]:
    """Depthwise backward from the gradient at the activation output: (grad input, grad
    weight, in_bn's (Σg, Σg·x̂) or None). With ``in_bn`` the conv input was act(in_bn(x)) and
    the input gradient returned is the one at in_bn's output."""
    ptrs, eps, flags = bn_args(bn, x)
    in_ptrs, in_eps, in_flags = bn_args(in_bn, x, "IN_")
    kind = kernel_kind(activation)
    gc = pr.empty_out(x) if need_gx else go  # go: an unused placeholder pointer
    gw_part = torch.empty((pr.rows if need_gw else 0, pr.c * pr.k * pr.k),
                          dtype=pr.acc_dtype, device=x.device)
    launch(
        dwconv_bwd_grad_conv_kernel, pr.grid,
        nbytes(go, d, pooled) + bn_bytes(bn) + (nbytes(x) + bn_bytes(in_bn) if need_gw else 0)
        + (nbytes(*sums) if training else 0),
        (nbytes(gc) if need_gx else 0) + nbytes(gw_part),
        go, d, x, gc, gw_part, *ptrs, *sums, pooled if pooled is not None else x, *in_ptrs,
        pr.c, pr.h, pr.w, pr.oh, pr.ow, pr.count, eps, in_eps, K=pr.k, STRIDE=pr.stride,
        CHANNELS_LAST=pr.channels_last, TRAINING=training, WRITE_GC=need_gx, NEED_GW=need_gw,
        ACT=kind, POOLED=pooled is not None, IN_BN=in_bn is not None, ACC=pr.acc,
        BLOCK_P=pr.block_p, BLOCK_C=pr.block_c, **COMPILE_OPTIONS, **flags, **in_flags)
    grad_x = grad_w = in_sums = None
    if need_gw:
        grad_w = torch.empty_like(weight)
        sum_rows(gw_part, (grad_w,), pr.acc)
    if need_gx:
        grad_x = torch.empty_like(x)
        block_q, block_c = tile_sizes(pr.c, pr.h * pr.w, pr.channels_last)
        tiles = triton.cdiv(pr.h * pr.w, block_q)
        part = torch.empty((pr.n * tiles if in_bn is not None else 0, 2 * pr.c),
                           dtype=pr.acc_dtype, device=x.device)
        launch(
            dwconv_bwd_input_kernel, (tiles, triton.cdiv(pr.c, block_c), pr.n),
            nbytes(gc, weight) + (nbytes(x) + bn_bytes(in_bn) if in_bn else 0),
            nbytes(grad_x, part),
            gc, weight, grad_x, x, part, *in_ptrs, pr.c, pr.h, pr.w, pr.oh, pr.ow, in_eps,
            K=pr.k, STRIDE=pr.stride, CHANNELS_LAST=pr.channels_last, IN_BN=in_bn is not None,
            ACT=kind, ACC=pr.acc, BLOCK_P=block_q, BLOCK_C=block_c, **COMPILE_OPTIONS,
            **in_flags)
        if in_bn is not None:
            in_sums = (pr.stats(x), pr.stats(x))
            sum_rows(part, in_sums, pr.acc)
    return grad_x, grad_w, in_sums


# ----------------------------------------------------------------------------- interface

@specified_by(reference.dwconv_bn_silu_forward)
def dwconv_bn_silu_forward(x, weight, bn_weight, bn_bias, running_mean, running_var, stride,
                           training, eps, need_conv_out):
    pr = Problem(x, weight, stride)
    x, weight = pr.layout(x), weight.contiguous()
    out = pr.empty_out(x)
    write_d = training or need_conv_out
    d = pr.empty_out(x) if write_d else None
    if training:
        mean, var = conv_forward(pr, x, weight, d, stats=True)
        bn = NormArgs(mean, var, bn_weight, bn_bias, eps)
        ptrs, eps, flags = bn_args(bn, x)
        launch(
            bn_silu_apply_kernel, pr.grid, nbytes(d) + bn_bytes(bn), nbytes(out),
            d, out, *ptrs, pr.c, pr.oh, pr.ow, eps, CHANNELS_LAST=pr.channels_last,
            ACT="silu", ACC=pr.acc, BLOCK_P=pr.block_p, BLOCK_C=pr.block_c,
            **COMPILE_OPTIONS, **flags)
    else:
        mean, var = pr.stats(x), pr.stats(x)
        conv_forward(pr, x, weight, d, stats=False, apply=(
            NormArgs(running_mean, running_var, bn_weight, bn_bias, eps), out, mean, var))
    conv_out = d if need_conv_out else x.new_empty(0)
    return out, conv_out, mean, var


@specified_by(reference.dwconv_bn_silu_backward)
def dwconv_bn_silu_backward(grad_out, x, weight, conv_out, bn_weight, bn_bias, mean, var, stride,
                            training, eps, output_mask):
    pr = Problem(x, weight, stride)
    x, weight = pr.layout(x), weight.contiguous()
    go, d = pr.layout(grad_out), pr.layout(conv_out)
    need_gx, need_gw = bool(output_mask[0]), bool(output_mask[1])
    bn = NormArgs(mean, var, bn_weight, bn_bias, eps)
    sums = (mean, var)  # placeholders: not read in eval
    if training and (need_gx or need_gw) or output_mask[2] or output_mask[3]:
        sums = bn_grad_sums(pr, go, d, bn, "silu")  # = grad bn bias, grad bn weight
    grad_x = grad_w = None
    if need_gx or need_gw:
        grad_x, grad_w, _ = conv_backward(pr, go, d, x, weight, bn, sums, training, need_gx,
                                          need_gw)
    return (grad_x, grad_w,
            sums[1] if output_mask[2] else None,
            sums[0] if output_mask[3] else None)
