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

from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from fused_mbconv.accounting import note_launch
from fused_mbconv.tensors import NormArgs, accumulate_dtype, memory_format_of

Tensor = torch.Tensor

_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
              torch.float32: tl.float32, torch.float64: tl.float64}
NUM_WARPS = 8  # 4 tile elements per thread: the K² tap loop needs ~half the registers
COMPILE_OPTIONS = dict(num_warps=NUM_WARPS)


def forward_options(k: int, apply: bool) -> dict:
    """Compile options of dwconv_bn_silu_fwd_kernel, used by its launcher and the compile
    report alike. Uncapped, ptxas holds the k=3 eval (APPLY) forward to 64 registers on sm_90
    and spills (fp16); a 96-register cap gives it 88, spill-free. Other variants stay uncapped:
    a cap there makes ptxas schedule more loads ahead and spill."""
    return dict(num_warps=NUM_WARPS, maxnreg=96) if apply and k == 3 else COMPILE_OPTIONS


BLOCK_T = 64  # partial rows merged per step by the finalize / sum kernels


# ----------------------------------------------------------------------------- helpers (jit)

@triton.jit
def _tile(pid_p, pid_c, HW, C, W, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Positions p = h·W + w of one image and channels c of this program."""
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    return p < HW, c, c < C, p // W, p % W


@triton.jit
def _image(ptr, n, C, H, W):
    """Pointer to image n; the only 64-bit offset, so per-element offsets stay 32-bit."""
    return ptr + tl.cast(n, tl.int64) * C * H * W


@triton.jit
def _offsets(c, h, w, C, H, W, CHANNELS_LAST: tl.constexpr):
    """Element offsets of a [positions, channels] tile within one image."""
    if CHANNELS_LAST:
        return (h * W + w)[:, None] * C + c[None, :]
    return c[None, :] * (H * W) + (h * W + w)[:, None]


@triton.jit
def _tap_offset(dh, dw, C, W, CHANNELS_LAST: tl.constexpr):
    """Offset of the element (dh, dw) away: a scalar added to a tile's centre offsets."""
    if CHANNELS_LAST:
        return (dh * W + dw) * C
    return dh * W + dw


@triton.jit
def _bn_coefficients(c, mc, mean_ptr, var_ptr, gamma_ptr, beta_ptr, eps,
                     HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr, ACC: tl.constexpr):
    """Per-channel mean, 1/std, gamma, beta in ACC."""
    mean = tl.load(mean_ptr + c, mask=mc, other=0.0).to(ACC)
    var = tl.load(var_ptr + c, mask=mc, other=1.0).to(ACC)
    invstd = 1.0 / tl.sqrt(var + eps)
    gamma = tl.full(mean.shape, 1.0, ACC)
    beta = tl.zeros(mean.shape, ACC)
    if HAS_GAMMA:
        gamma = tl.load(gamma_ptr + c, mask=mc, other=1.0).to(ACC)
    if HAS_BETA:
        beta = tl.load(beta_ptr + c, mask=mc, other=0.0).to(ACC)
    return mean, invstd, gamma, beta


@triton.jit
def _sigmoid(y):
    return 1.0 / (1.0 + tl.exp(-y))


# Activation kinds, a compile-time flag of every kernel that applies or differentiates one
# (names of fused_mbconv.activations, plus "identity" for BN3, which has none).
ACTIVATION_IDS = {"identity": 0, "silu": 1, "relu": 2, "relu6": 3, "hardswish": 4,
                  "sigmoid": 5, "hardsigmoid": 6}


@triton.jit
def _act(y, ACT: tl.constexpr):
    out = y
    if ACT == 1:
        out = y * _sigmoid(y)
    elif ACT == 2:
        out = tl.maximum(y, 0.0)
    elif ACT == 3:
        out = tl.minimum(tl.maximum(y, 0.0), 6.0)
    elif ACT == 4:
        out = y * (tl.minimum(tl.maximum(y + 3.0, 0.0), 6.0) / 6.0)
    elif ACT == 5:
        out = _sigmoid(y)
    elif ACT == 6:
        out = tl.minimum(tl.maximum(y + 3.0, 0.0), 6.0) / 6.0
    return out


@triton.jit
def _act_grad(y, ACT: tl.constexpr):
    """d act / dy with aten's choices at the kinks (as fused_mbconv.reference._act_grad)."""
    one = tl.full(y.shape, 1.0, y.dtype)
    zero = tl.zeros(y.shape, y.dtype)
    out = one
    if ACT == 1:
        s = _sigmoid(y)
        out = s * (1.0 + y * (1.0 - s))
    elif ACT == 2:
        out = tl.where(y > 0.0, one, zero)
    elif ACT == 3:
        out = tl.where((y > 0.0) & (y < 6.0), one, zero)
    elif ACT == 4:
        out = tl.where(y < -3.0, zero, tl.where(y <= 3.0, y / 3.0 + 0.5, one))
    elif ACT == 5:
        s = _sigmoid(y)
        out = s * (1.0 - s)
    elif ACT == 6:
        out = tl.where((y > -3.0) & (y < 3.0), one, zero) / 6.0
    return out


@triton.jit
def _bn_scale_shift(c, mc, mean_ptr, var_ptr, gamma_ptr, beta_ptr, eps,
                    HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr, ACC: tl.constexpr):
    """BN folded into y = x * scale + shift, per channel in ACC."""
    mean, invstd, gamma, beta = _bn_coefficients(c, mc, mean_ptr, var_ptr, gamma_ptr, beta_ptr,
                                                 eps, HAS_GAMMA, HAS_BETA, ACC)
    scale = gamma * invstd
    return scale, beta - mean * scale


# ----------------------------------------------------------------------------- kernels

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
    mp, c, mc, oh, ow = _tile(pid_p, pid_c, OH * OW, C, OW, BLOCK_P, BLOCK_C)
    ih0 = oh * STRIDE - K // 2
    iw0 = ow * STRIDE - K // 2
    x_tile = _image(x_ptr, n, C, H, W) + _offsets(c, ih0, iw0, C, H, W, CHANNELS_LAST)
    if IN_BN:
        in_scale, in_shift = _bn_scale_shift(c, mc, in_mean_ptr, in_var_ptr, in_gamma_ptr,
                                             in_beta_ptr, in_eps, IN_HAS_GAMMA, IN_HAS_BETA, ACC)
    acc = tl.zeros([BLOCK_P, BLOCK_C], ACC)
    for kh in tl.static_range(K):
        mh = mp & (ih0 + kh >= 0) & (ih0 + kh < H)
        for kw in tl.static_range(K):
            m = mh & (iw0 + kw >= 0) & (iw0 + kw < W)
            xv = tl.load(x_tile + _tap_offset(kh, kw, C, W, CHANNELS_LAST),
                         mask=m[:, None] & mc[None, :], other=0.0)
            if IN_BN:  # rounded to the input dtype, as the unfused block stores a1
                a = _act(xv.to(ACC) * in_scale[None, :] + in_shift[None, :], ACT)
                xv = tl.where(m[:, None], a, 0.0).to(x_ptr.dtype.element_ty)
            wv = tl.load(w_ptr + c * (K * K) + (kh * K + kw), mask=mc, other=0.0)
            acc += xv.to(ACC) * wv.to(ACC)[None, :]
    mask = mp[:, None] & mc[None, :]
    offs = _offsets(c, oh, ow, C, OH, OW, CHANNELS_LAST)
    # Statistics and BN see d as stored (rounded to the input dtype), like backward does.
    d = acc.to(d_ptr.dtype.element_ty)
    if WRITE_D:
        tl.store(_image(d_ptr, n, C, OH, OW) + offs, d, mask=mask)
    d = d.to(ACC)
    if STATS:
        count = tl.minimum(OH * OW - pid_p * BLOCK_P, BLOCK_P).to(ACC)
        tile_mean = tl.sum(tl.where(mask, d, 0.0), axis=0) / count
        dev = tl.where(mask, d - tile_mean[None, :], 0.0)
        row = part_ptr + (n * tl.num_programs(0) + pid_p) * (2 * C)
        tl.store(row + c, tile_mean, mask=mc)
        tl.store(row + C + c, tl.sum(dev * dev, axis=0), mask=mc)
    if APPLY:
        scale, shift = _bn_scale_shift(c, mc, mean_ptr, var_ptr, gamma_ptr, beta_ptr, eps,
                                       HAS_GAMMA, HAS_BETA, ACC)
        y = d * scale[None, :] + shift[None, :]
        tl.store(_image(out_ptr, n, C, OH, OW) + offs,
                 _act(y, ACT).to(out_ptr.dtype.element_ty), mask=mask)
        if (pid_p == 0) & (n == 0):  # eval returns the statistics it used, in ACC
            tl.store(mean_out_ptr + c, tl.load(mean_ptr + c, mask=mc).to(ACC), mask=mc)
            tl.store(var_out_ptr + c, tl.load(var_ptr + c, mask=mc).to(ACC), mask=mc)


@triton.jit
def bn_stats_finalize_kernel(part_ptr, mean_ptr, var_ptr, C, HW, TILES, T, TILE_P,
                             ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """Merge per-tile (mean, M2) into the batch mean and biased variance (Chan et al.); row t
    is tile t % TILES (of TILE_P positions) of an image of HW positions. A
    block of BLOCK_T tiles is combined around its own mean, then merged into the running
    result; no E[x²]−E[x]² cancellation anywhere."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    mc = c < C
    n_a = tl.zeros([BLOCK_C], ACC)
    mean_a = tl.zeros([BLOCK_C], ACC)
    m2_a = tl.zeros([BLOCK_C], ACC)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        count = tl.minimum(HW - (t % TILES) * TILE_P, TILE_P)
        count = tl.where(t < T, count, 0).to(ACC)[:, None]
        m = (t < T)[:, None] & mc[None, :]
        rows = part_ptr + t[:, None] * (2 * C) + c[None, :]
        mu = tl.load(rows, mask=m, other=0.0)
        q = tl.load(rows + C, mask=m, other=0.0)
        n_b = tl.sum(count, axis=0)
        mean_b = tl.sum(count * mu, axis=0) / n_b
        m2_b = tl.sum(q + count * (mu - mean_b[None, :]) * (mu - mean_b[None, :]), axis=0)
        n_ab = n_a + n_b
        delta = mean_b - mean_a
        mean_a += delta * (n_b / n_ab)
        m2_a += m2_b + delta * delta * (n_a * n_b / n_ab)
        n_a = n_ab
    tl.store(mean_ptr + c, mean_a, mask=mc)
    tl.store(var_ptr + c, m2_a / n_a, mask=mc)


@triton.jit
def bn_silu_apply_kernel(d_ptr, out_ptr, mean_ptr, var_ptr, gamma_ptr, beta_ptr,
                         C, OH, OW, eps, CHANNELS_LAST: tl.constexpr,
                         HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr, ACT: tl.constexpr,
                         ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    n = tl.program_id(2)
    mp, c, mc, oh, ow = _tile(tl.program_id(0), tl.program_id(1), OH * OW, C, OW,
                              BLOCK_P, BLOCK_C)
    mean, invstd, gamma, beta = _bn_coefficients(c, mc, mean_ptr, var_ptr, gamma_ptr, beta_ptr,
                                                 eps, HAS_GAMMA, HAS_BETA, ACC)
    scale = gamma * invstd
    mask = mp[:, None] & mc[None, :]
    offs = _offsets(c, oh, ow, C, OH, OW, CHANNELS_LAST)
    d = tl.load(_image(d_ptr, n, C, OH, OW) + offs, mask=mask, other=0.0).to(ACC)
    y = d * scale[None, :] + (beta - mean * scale)[None, :]
    tl.store(_image(out_ptr, n, C, OH, OW) + offs,
             _act(y, ACT).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _act_bn_grad(go_ptr, d_ptr, offs, mask, n, c, mc, C, HW, mean, invstd, gamma, beta,
                 pooled_ptr, scale_ptr, ACT: tl.constexpr, POOLED: tl.constexpr,
                 SCALE: tl.constexpr, ACC: tl.constexpr):
    """g = dL/dy at the BN output (through the activation) and x̂, recomputed from grad_out
    and d; zero off-mask. POOLED adds the squeeze's share pooled[n, c] / HW to grad_out,
    SCALE multiplies it by the drop-path scale[n]."""
    x_hat = (tl.load(d_ptr + offs, mask=mask, other=0.0).to(ACC) - mean[None, :]) \
        * invstd[None, :]
    go = tl.load(go_ptr + offs, mask=mask, other=0.0).to(ACC)
    if POOLED:
        share = tl.load(pooled_ptr + n * C + c, mask=mc, other=0.0).to(ACC) / HW
        go += share[None, :]
    if SCALE:
        go *= tl.load(scale_ptr + n).to(ACC)
    if ACT != 0:
        go *= _act_grad(x_hat * gamma[None, :] + beta[None, :], ACT)
    return tl.where(mask, go, 0.0), x_hat


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
    mp, c, mc, oh, ow = _tile(pid_p, tl.program_id(1), OH * OW, C, OW, BLOCK_P, BLOCK_C)
    mean, invstd, gamma, beta = _bn_coefficients(c, mc, mean_ptr, var_ptr, gamma_ptr, beta_ptr,
                                                 eps, HAS_GAMMA, HAS_BETA, ACC)
    mask = mp[:, None] & mc[None, :]
    image = n.to(tl.int64) * C * OH * OW
    g, x_hat = _act_bn_grad(go_ptr + image, d_ptr + image,
                            _offsets(c, oh, ow, C, OH, OW, CHANNELS_LAST), mask, n, c, mc, C,
                            OH * OW, mean, invstd, gamma, beta, pooled_ptr, scale_ptr, ACT,
                            POOLED, SCALE, ACC)
    row = part_ptr + (n * tl.num_programs(0) + pid_p) * (2 * C)
    tl.store(row + c, tl.sum(g, axis=0), mask=mc)
    tl.store(row + C + c, tl.sum(g * x_hat, axis=0), mask=mc)


@triton.jit
def sum_rows_kernel(part_ptr, out0_ptr, out1_ptr, T, M, ACC: tl.constexpr,
                    BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr):
    """out_j[m] = Σ_t part[t, j·M + m] in a fixed order (deterministic), j = program_id(1)
    in {0, 1} for two-output rows [a | b] (separate tensors, as custom ops must not return
    views of one buffer); stored in the output's dtype."""
    half = tl.program_id(1)
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mm = m < M
    row_len = M * tl.num_programs(1)
    total = tl.zeros([BLOCK_M], ACC)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        total += tl.sum(tl.load(part_ptr + t[:, None].to(tl.int64) * row_len + half * M
                                + m[None, :], mask=(t < T)[:, None] & mm[None, :], other=0.0),
                        axis=0)
    if half == 0:
        tl.store(out0_ptr + m, total.to(out0_ptr.dtype.element_ty), mask=mm)
    else:
        tl.store(out1_ptr + m, total.to(out1_ptr.dtype.element_ty), mask=mm)


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
    mp, c, mc, oh, ow = _tile(pid_p, tl.program_id(1), OH * OW, C, OW, BLOCK_P, BLOCK_C)
    mean, invstd, gamma, beta = _bn_coefficients(c, mc, mean_ptr, var_ptr, gamma_ptr, beta_ptr,
                                                 eps, HAS_GAMMA, HAS_BETA, ACC)
    mask = mp[:, None] & mc[None, :]
    offs = _offsets(c, oh, ow, C, OH, OW, CHANNELS_LAST)
    image = n.to(tl.int64) * C * OH * OW
    g, x_hat = _act_bn_grad(go_ptr + image, d_ptr + image, offs, mask, n, c, mc, C, OH * OW,
                            mean, invstd, gamma, beta, pooled_ptr, pooled_ptr, ACT, POOLED,
                            False, ACC)
    if TRAINING:
        mean_g = tl.load(sum_g_ptr + c, mask=mc, other=0.0).to(ACC) / count
        mean_gx = tl.load(sum_gx_ptr + c, mask=mc, other=0.0).to(ACC) / count
        g = tl.where(mask, g - mean_g[None, :] - x_hat * mean_gx[None, :], 0.0)
    gc = g * (gamma * invstd)[None, :]
    if WRITE_GC:
        tl.store(gc_ptr + image + offs, gc.to(gc_ptr.dtype.element_ty), mask=mask)
    if NEED_GW:
        if IN_BN:
            in_scale, in_shift = _bn_scale_shift(c, mc, in_mean_ptr, in_var_ptr, in_gamma_ptr,
                                                 in_beta_ptr, in_eps, IN_HAS_GAMMA,
                                                 IN_HAS_BETA, ACC)
        row = part_ptr + (n * tl.num_programs(0) + pid_p) * (C * K * K) + c * (K * K)
        ih0 = oh * STRIDE - K // 2
        iw0 = ow * STRIDE - K // 2
        x_tile = _image(x_ptr, n, C, H, W) + _offsets(c, ih0, iw0, C, H, W, CHANNELS_LAST)
        for kh in tl.static_range(K):
            mh = mp & (ih0 + kh >= 0) & (ih0 + kh < H)
            for kw in tl.static_range(K):
                m = mh & (iw0 + kw >= 0) & (iw0 + kw < W)
                xv = tl.load(x_tile + _tap_offset(kh, kw, C, W, CHANNELS_LAST),
                             mask=m[:, None] & mc[None, :], other=0.0)
                if IN_BN:
                    a = _act(xv.to(ACC) * in_scale[None, :] + in_shift[None, :], ACT)
                    xv = tl.where(m[:, None], a, 0.0).to(x_ptr.dtype.element_ty)
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
    mq, c, mc, ih, iw = _tile(pid_q, tl.program_id(1), H * W, C, W, BLOCK_P, BLOCK_C)
    gc_image = _image(gc_ptr, n, C, OH, OW)
    if STRIDE == 1:  # every tap reaches an output: a fixed shift of the centre offsets
        gc_tile = gc_image + _offsets(c, ih + K // 2, iw + K // 2, C, OH, OW, CHANNELS_LAST)
    acc = tl.zeros([BLOCK_P, BLOCK_C], ACC)
    for kh in tl.static_range(K):
        th = ih + K // 2 - kh  # = oh * STRIDE when this tap reaches (ih, iw)
        mh = mq & (th >= 0) & (th < OH * STRIDE) & (th % STRIDE == 0)
        for kw in tl.static_range(K):
            tw = iw + K // 2 - kw
            m = (mh & (tw >= 0) & (tw < OW * STRIDE) & (tw % STRIDE == 0))[:, None] & mc[None, :]
            if STRIDE == 1:
                gv = tl.load(gc_tile - _tap_offset(kh, kw, C, OW, CHANNELS_LAST), mask=m,
                             other=0.0)
            else:
                gv = tl.load(gc_image + _offsets(c, th // STRIDE, tw // STRIDE, C, OH, OW,
                                                 CHANNELS_LAST), mask=m, other=0.0)
            wv = tl.load(w_ptr + c * (K * K) + (kh * K + kw), mask=mc, other=0.0)
            acc += gv.to(ACC) * wv.to(ACC)[None, :]
    mask = mq[:, None] & mc[None, :]
    offs = _offsets(c, ih, iw, C, H, W, CHANNELS_LAST)
    grad = acc.to(gx_ptr.dtype.element_ty)
    if IN_BN:
        mean, invstd, gamma, beta = _bn_coefficients(c, mc, in_mean_ptr, in_var_ptr,
                                                     in_gamma_ptr, in_beta_ptr, in_eps,
                                                     IN_HAS_GAMMA, IN_HAS_BETA, ACC)
        x_hat = (tl.load(_image(x_ptr, n, C, H, W) + offs, mask=mask, other=0.0).to(ACC)
                 - mean[None, :]) * invstd[None, :]
        g = tl.where(mask, grad.to(ACC) * _act_grad(x_hat * gamma[None, :] + beta[None, :],
                                                    ACT), 0.0)
        row = part_ptr + (n * tl.num_programs(0) + pid_q) * (2 * C)
        tl.store(row + c, tl.sum(g, axis=0), mask=mc)
        tl.store(row + C + c, tl.sum(g * x_hat, axis=0), mask=mc)
        grad = g.to(gx_ptr.dtype.element_ty)
    tl.store(_image(gx_ptr, n, C, H, W) + offs, grad, mask=mask)


# ----------------------------------------------------------------------------- launch config

TILE_ELEMENTS = 1024


def tile_sizes(channels: int, positions: int, channels_last: bool) -> Tuple[int, int]:
    """(BLOCK_P, BLOCK_C) for ``positions`` per image: wide along the unit-stride dimension."""
    block_c = min(triton.next_power_of_2(channels), 32 if channels_last else 16)
    block_p = min(triton.next_power_of_2(positions), TILE_ELEMENTS // block_c)
    return block_p, block_c


def _acc(dtype: torch.dtype):
    return _TL_DTYPES[accumulate_dtype(dtype)]


def check_dtype(x: Tensor, op: str = "dwconv_bn_silu") -> None:
    if x.dtype not in _TL_DTYPES:
        raise TypeError(f"triton {op} supports float16, bfloat16, float32 and float64 inputs, "
                        f"got {x.dtype}")


def _check(x: Tensor, weight: Tensor, op: str) -> None:
    check_dtype(x, op)
    if weight.dtype != x.dtype:
        raise TypeError(f"triton {op}: conv weight dtype {weight.dtype} must match the input "
                        f"dtype {x.dtype}")
    k = weight.shape[-1]
    if weight.shape != (x.shape[1], 1, k, k) or k % 2 == 0:
        raise ValueError(f"triton {op}: conv weight must be (C, 1, k, k) with odd k and "
                         f"C={x.shape[1]}, got {tuple(weight.shape)}")


def nbytes(*tensors: Optional[Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def bn_args(bn: Optional[NormArgs], placeholder: Tensor, prefix: str = ""):
    """(pointer tuple (mean, var, gamma, beta), eps, constexpr flags) of an optional BN; absent
    pointers are ``placeholder`` (never read)."""
    if bn is None:
        return (placeholder,) * 4, 1.0, {f"{prefix}HAS_GAMMA": False, f"{prefix}HAS_BETA": False}
    ptrs = (bn.mean, bn.var, bn.weight if bn.weight is not None else placeholder,
            bn.bias if bn.bias is not None else placeholder)
    return ptrs, bn.eps, {f"{prefix}HAS_GAMMA": bn.weight is not None,
                          f"{prefix}HAS_BETA": bn.bias is not None}


def bn_bytes(bn: Optional[NormArgs]) -> int:
    return 0 if bn is None else nbytes(bn.mean, bn.var, bn.weight, bn.bias)


class Problem:
    """Shapes, layout and tiling of one depthwise call (or, without ``weight``, of one
    elementwise pass over ``x``), shared by the forward and backward launchers."""

    def __init__(self, x: Tensor, weight: Optional[Tensor] = None, stride: int = 1,
                 op: str = "dwconv_bn_silu"):
        if weight is None:
            check_dtype(x, op)
        else:
            _check(x, weight, op)
        self.fmt = memory_format_of(x)
        self.channels_last = self.fmt == torch.channels_last
        self.n, self.c, self.h, self.w = x.shape
        self.k = 1 if weight is None else weight.shape[-1]
        self.stride = stride
        pad = self.k // 2
        self.oh = (self.h + 2 * pad - self.k) // stride + 1
        self.ow = (self.w + 2 * pad - self.k) // stride + 1
        self.count = self.n * self.oh * self.ow  # values per channel
        self.block_p, self.block_c = tile_sizes(self.c, self.oh * self.ow, self.channels_last)
        self.tiles = triton.cdiv(self.oh * self.ow, self.block_p)  # per image
        self.rows = self.n * self.tiles  # partial-result rows, one per (image, tile)
        self.grid = (self.tiles, triton.cdiv(self.c, self.block_c), self.n)
        self.acc_dtype = accumulate_dtype(x.dtype)
        self.acc = _acc(x.dtype)

    def layout(self, t: Tensor) -> Tensor:
        return t.contiguous(memory_format=self.fmt)

    def empty_out(self, x: Tensor, dtype=None) -> Tensor:
        return torch.empty((self.n, self.c, self.oh, self.ow), dtype=dtype or x.dtype,
                           device=x.device, memory_format=self.fmt)

    def stats(self, x: Tensor) -> Tensor:
        return torch.empty(self.c, dtype=self.acc_dtype, device=x.device)

    def partials(self, x: Tensor, width: int) -> Tensor:
        return torch.empty((self.rows, width), dtype=self.acc_dtype, device=x.device)


def sum_rows(part: Tensor, outs: Tuple[Tensor, ...], acc) -> None:
    """Column sums of ``part`` [T, len(outs)·M] into the M-element tensors ``outs``."""
    m = outs[0].numel()
    block_m = min(triton.next_power_of_2(m), 128)
    sum_rows_kernel[(triton.cdiv(m, block_m), len(outs))](
        part, outs[0], outs[-1], part.shape[0], m, ACC=acc, BLOCK_T=BLOCK_T, BLOCK_M=block_m,
        **COMPILE_OPTIONS)
    note_launch("sum_rows_kernel", "triton", nbytes(part), nbytes(*outs))


def finalize_stats(part: Tensor, mean: Tensor, var: Tensor, positions: int, tiles: int,
                   tile_p: int, acc) -> None:
    """Batch mean and biased variance from (mean, M2) rows of ``tile_p``-position tiles,
    ``tiles`` per image of ``positions``."""
    c = mean.numel()
    block_c = min(triton.next_power_of_2(c), 32)
    bn_stats_finalize_kernel[(triton.cdiv(c, block_c),)](
        part, mean, var, c, positions, tiles, part.shape[0], tile_p, ACC=acc, BLOCK_T=BLOCK_T,
        BLOCK_C=block_c, **COMPILE_OPTIONS)
    note_launch("bn_stats_finalize_kernel", "triton", nbytes(part), nbytes(mean, var))


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
    dwconv_bn_silu_fwd_kernel[pr.grid](
        x, weight, d if d is not None else x, out, part, *ptrs, mean_out, var_out, *in_ptrs,
        pr.c, pr.h, pr.w, pr.oh, pr.ow, eps, in_eps, K=pr.k, STRIDE=pr.stride,
        CHANNELS_LAST=pr.channels_last, STATS=stats, APPLY=apply is not None,
        WRITE_D=d is not None, IN_BN=in_bn is not None, ACT=ACTIVATION_IDS[activation],
        ACC=pr.acc, BLOCK_P=pr.block_p, BLOCK_C=pr.block_c,
        **forward_options(pr.k, apply is not None), **flags,
        **in_flags)
    note_launch("dwconv_bn_silu_fwd_kernel", "triton",
                nbytes(x, weight) + bn_bytes(in_bn) + bn_bytes(bn),
                nbytes(d) + (nbytes(part) if stats else 0)
                + (nbytes(out, mean_out, var_out) if apply is not None else 0))
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
    bn_silu_bwd_reduce_kernel[pr.grid](
        go, d, *ptrs, part, pooled if pooled is not None else d,
        scale if scale is not None else d, pr.c, pr.oh, pr.ow, eps,
        CHANNELS_LAST=pr.channels_last, ACT=ACTIVATION_IDS[activation],
        POOLED=pooled is not None, SCALE=scale is not None, ACC=pr.acc, BLOCK_P=pr.block_p,
        BLOCK_C=pr.block_c, **COMPILE_OPTIONS, **flags)
    note_launch("bn_silu_bwd_reduce_kernel", "triton",
                nbytes(go, d, pooled, scale) + bn_bytes(bn), nbytes(part))
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
    act = ACTIVATION_IDS[activation]
    gc = pr.empty_out(x) if need_gx else go  # go: an unused placeholder pointer
    gw_part = torch.empty((pr.rows if need_gw else 0, pr.c * pr.k * pr.k),
                          dtype=pr.acc_dtype, device=x.device)
    dwconv_bwd_grad_conv_kernel[pr.grid](
        go, d, x, gc, gw_part, *ptrs, *sums, pooled if pooled is not None else x, *in_ptrs,
        pr.c, pr.h, pr.w, pr.oh, pr.ow, pr.count, eps, in_eps, K=pr.k, STRIDE=pr.stride,
        CHANNELS_LAST=pr.channels_last, TRAINING=training, WRITE_GC=need_gx, NEED_GW=need_gw,
        ACT=act, POOLED=pooled is not None, IN_BN=in_bn is not None, ACC=pr.acc,
        BLOCK_P=pr.block_p, BLOCK_C=pr.block_c, **COMPILE_OPTIONS, **flags, **in_flags)
    note_launch("dwconv_bwd_grad_conv_kernel", "triton",
                nbytes(go, d, pooled) + bn_bytes(bn)
                + (nbytes(x) + bn_bytes(in_bn) if need_gw else 0)
                + (nbytes(*sums) if training else 0),
                (nbytes(gc) if need_gx else 0) + nbytes(gw_part))
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
        dwconv_bwd_input_kernel[(tiles, triton.cdiv(pr.c, block_c), pr.n)](
            gc, weight, grad_x, x, part, *in_ptrs, pr.c, pr.h, pr.w, pr.oh, pr.ow, in_eps,
            K=pr.k, STRIDE=pr.stride, CHANNELS_LAST=pr.channels_last, IN_BN=in_bn is not None,
            ACT=act, ACC=pr.acc, BLOCK_P=block_q, BLOCK_C=block_c, **COMPILE_OPTIONS,
            **in_flags)
        note_launch("dwconv_bwd_input_kernel", "triton",
                    nbytes(gc, weight) + (nbytes(x) + bn_bytes(in_bn) if in_bn else 0),
                    nbytes(grad_x, part))
        if in_bn is not None:
            in_sums = (pr.stats(x), pr.stats(x))
            sum_rows(part, in_sums, pr.acc)
    return grad_x, grad_w, in_sums


# ----------------------------------------------------------------------------- interface

def dwconv_bn_silu_forward(x: Tensor, weight: Tensor, bn_weight: Optional[Tensor],
                           bn_bias: Optional[Tensor], running_mean: Optional[Tensor],
                           running_var: Optional[Tensor], stride: int, training: bool,
                           eps: float, need_conv_out: bool
                           ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Same contract as ``fused_mbconv.reference.dwconv_bn_silu_forward``."""
    pr = Problem(x, weight, stride)
    x, weight = pr.layout(x), weight.contiguous()
    out = pr.empty_out(x)
    write_d = training or need_conv_out
    d = pr.empty_out(x) if write_d else None
    if training:
        mean, var = conv_forward(pr, x, weight, d, stats=True)
        bn = NormArgs(mean, var, bn_weight, bn_bias, eps)
        ptrs, eps, flags = bn_args(bn, x)
        bn_silu_apply_kernel[pr.grid](
            d, out, *ptrs, pr.c, pr.oh, pr.ow, eps, CHANNELS_LAST=pr.channels_last,
            ACT=ACTIVATION_IDS["silu"], ACC=pr.acc, BLOCK_P=pr.block_p, BLOCK_C=pr.block_c,
            **COMPILE_OPTIONS, **flags)
        note_launch("bn_silu_apply_kernel", "triton", nbytes(d) + bn_bytes(bn), nbytes(out))
    else:
        mean, var = pr.stats(x), pr.stats(x)
        conv_forward(pr, x, weight, d, stats=False, apply=(
            NormArgs(running_mean, running_var, bn_weight, bn_bias, eps), out, mean, var))
    conv_out = d if need_conv_out else x.new_empty(0)
    return out, conv_out, mean, var


def dwconv_bn_silu_backward(grad_out: Tensor, x: Tensor, weight: Tensor, conv_out: Tensor,
                            bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
                            mean: Tensor, var: Tensor, stride: int, training: bool, eps: float,
                            output_mask: List[bool]
                            ) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor],
                                       Optional[Tensor]]:
    """Same contract as ``fused_mbconv.reference.dwconv_bn_silu_backward``."""
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


# ----------------------------------------------------------------------------- compile registry

# (channels, kernel size, stride) of every depthwise conv in EfficientNet-B0.
B0_DEPTHWISE_LAYERS = ((32, 3, 1), (96, 3, 2), (144, 3, 1), (144, 5, 2), (240, 5, 1),
                       (240, 3, 2), (480, 3, 1), (480, 5, 1), (672, 5, 1), (672, 5, 2),
                       (1152, 5, 1), (1152, 3, 1))
_ACTIVATION_PTRS = {"x_ptr", "w_ptr", "d_ptr", "out_ptr", "go_ptr", "gc_ptr", "gx_ptr"}
TL_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def signature(kernel, constexprs, act: str, activation_ptrs=_ACTIVATION_PTRS):
    """Argument types as the JIT would see them: activation tensors in ``act``, statistics
    and partials in fp32, eps fp32, sizes i32."""
    def kind(name):
        if name in constexprs:
            return "constexpr"
        if name.endswith("_ptr"):
            return "*" + (act if name in activation_ptrs else "fp32")
        return "fp32" if name.endswith("eps") else "i32"
    return {name: kind(name) for name in kernel.arg_names}


class Registry:
    """Distinct (kernel, signature, constexprs, label) specializations, first label wins."""

    def __init__(self):
        self.specs = {}

    def add(self, kernel, act, label, constexprs, options=None, **kw):
        """``options``: compile options when they differ from the module's COMPILE_OPTIONS."""
        key = (kernel.__name__, act, tuple(sorted((k, str(v)) for k, v in constexprs.items())))
        self.specs.setdefault(key, (kernel, signature(kernel, constexprs, act, **kw),
                                    constexprs, f"{kernel.__name__} {label}", options))

    def list(self):
        return list(self.specs.values())


BLOCK_ACTIVATION = ACTIVATION_IDS["silu"]  # EfficientNet's


def add_depthwise_specializations(reg: Registry, act: str, channels_last: bool, channels: int,
                                  k: int, stride: int, block: bool, in_bn: bool = False) -> None:
    """The depthwise kernels the launchers compile for one layer: the dwconv_bn_silu op's
    (block=False) or the MBConv block's K2 / B3 / B2 (block=True; in_bn: the BN1 prologue of
    an expanded block)."""
    fmt = "nhwc" if channels_last else "nchw"
    big = 7 * 7  # positions of B0's smallest map: every tile at full size
    block_p, block_c = tile_sizes(channels, big, channels_last)
    tile = dict(BLOCK_P=block_p, BLOCK_C=block_c)
    common = dict(HAS_GAMMA=True, HAS_BETA=True, ACT=BLOCK_ACTIVATION, ACC=tl.float32, **tile)
    inb = dict(IN_BN=in_bn, IN_HAS_GAMMA=in_bn, IN_HAS_BETA=in_bn)
    conv = dict(K=k, STRIDE=stride, CHANNELS_LAST=channels_last)
    where = f"k{k} s{stride} {act} {fmt} {block_p}x{block_c}" + (
        (" block bn1" if in_bn else " block") if block else "")
    for training in (True, False):
        apply = not (training or block)
        reg.add(dwconv_bn_silu_fwd_kernel, act, f"{where} {'train' if training else 'eval'}",
                dict(STATS=training, APPLY=apply, WRITE_D=training or block, **conv, **common,
                     **inb), options=forward_options(k, apply))
    reg.add(dwconv_bwd_grad_conv_kernel, act, f"{where} train",
            dict(TRAINING=True, WRITE_GC=True, NEED_GW=True, POOLED=block, **conv, **common,
                 **inb))
    reg.add(dwconv_bwd_input_kernel, act, where,
            dict(ACC=tl.float32, ACT=BLOCK_ACTIVATION, **conv, **tile, **inb))
    where = f"{act} {fmt} {block_p}x{block_c}"
    if not block:
        reg.add(bn_silu_apply_kernel, act, where, dict(CHANNELS_LAST=channels_last, **common))
    reg.add(bn_silu_bwd_reduce_kernel, act, where + (" block" if block else ""),
            dict(CHANNELS_LAST=channels_last, POOLED=block, SCALE=False, **common))
    finalize_c = min(triton.next_power_of_2(channels), 32)  # as finalize_stats picks it
    reg.add(bn_stats_finalize_kernel, "fp32", f"statistics {finalize_c}",
            dict(ACC=tl.float32, BLOCK_T=BLOCK_T, BLOCK_C=finalize_c))


def specializations(layers=B0_DEPTHWISE_LAYERS, dtypes=tuple(TL_NAMES)):
    """(kernel, signature, constexprs, label) for each distinct compiled variant the
    dwconv_bn_silu launchers produce for ``layers`` (at a large batch), in train and eval,
    NCHW and channels_last."""
    reg = Registry()
    sums = dict(ACC=tl.float32, BLOCK_T=BLOCK_T, BLOCK_M=128)
    reg.add(sum_rows_kernel, "fp32", "bn grads", sums, activation_ptrs=())
    for dtype in dtypes:
        act = TL_NAMES[dtype]
        for channels_last in (False, True):
            for channels, k, stride in layers:
                add_depthwise_specializations(reg, act, channels_last, channels, k, stride,
                                              block=False)
        reg.add(sum_rows_kernel, act, f"{act} grad weight", sums,
                activation_ptrs={"out0_ptr", "out1_ptr"})
    return reg.list()


SPECIALIZATIONS = specializations()
