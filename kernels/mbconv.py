"""Triton kernels of the whole MBConv block (docs/DESIGN.md's K1..K6 and B6..B1) and their
launchers.

The kernel-interface functions below have exactly the contracts of ``fused_mbconv.reference``
(read its docstring for the math and the call order). Kernel sources:

- ``pointwise_conv_kernel``: the 1x1-conv GEMM out[n, :, p] = W · A[n, :, p] (tl.dot over
  channels), one program per (output-channel block, image) walking the image's positions.
  A is built on load by a constexpr prologue (raw x; act(BN(d))·gate; BN backward applied to
  dy from grad and the recomputed x̂); the epilogue writes out and, by flag, BN statistics
  (Chan-merged over the image's tiles: one (mean, M2) row per image), the SE gate gradient
  (Σ_p out·a2, a2 recomputed) with out·gate written, or a residual add. K1, K5, B5 dgrad,
  B1 dgrad. The weight is read through strides, so dgrad is the same kernel on Wᵀ.
- ``pointwise_wgrad_kernel``: grad W = Σ_{n,p} G[n, :, p] A[n, :, p]ᵀ with both operands built
  by the same prologues; programs split the images in a fixed order, per-split partials are
  summed by ``sum_rows_kernel`` (deterministic, no atomics). B5 and B1 wgrad.
- ``squeeze_kernel`` (K3), ``excite_kernel`` (K4), ``excite_bwd_sample_kernel`` and
  ``excite_bwd_weight_kernel`` (B4), ``output_kernel`` (K6).
- the depthwise kernels of ``dwconv_bn_silu`` with their flags (input-BN prologue, activation
  kind, statistics, pooled-gradient share, drop-path scale): K2, B6, B3, B2.

Activations and gates are string constexprs (names of
``fused_mbconv.activations.KERNEL_ACTIVATIONS``), and so are the GEMM's operand prologues and
epilogues (``PROLOGUES``, ``EPILOGUES``); math and statistics in ACC
(float32, float64 for float64 inputs), GEMM operands in the activation dtype with ACC
accumulation (fp32 operands with IEEE, not TF32, products).
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from fused_mbconv import reference
from fused_mbconv.accounting import MIN_PROGRAMS
from fused_mbconv.activations import kernel_kind
from fused_mbconv.interface import specified_by
from fused_mbconv.tensors import NormArgs, accumulate_dtype

from .common import (COMPILE_OPTIONS, NUM_WARPS, TILE_ELEMENTS, Problem, acc_type, bn_args,
                     bn_bytes, finalize_stats, launch, nbytes, splits_to_fill, sum_rows,
                     tile_sizes)
from .dwconv_bn_silu import bn_grad_sums, conv_backward, conv_forward
from .jit_helpers import (act, act_grad, bn_batch_grad, bn_coefficients, bn_grad_means,
                          bn_normalized, bn_scale_shift, chan_merge, flat_offsets, image,
                          offsets, tile)

Tensor = torch.Tensor

# Without a cap, ptxas holds some 8-warp GEMM variants to 128 registers and spills a few bytes;
# a 168 cap lets them fit. The gate-gradient epilogue needs up to ~240 and spills under that
# cap, so it gets the whole register file per thread (255). Launchers and the compile report
# use the same options.
CAPPED_OPTIONS = dict(num_warps=NUM_WARPS, maxnreg=168)
GATE_GRAD_OPTIONS = dict(num_warps=NUM_WARPS, maxnreg=255)


# The GEMM's operand prologues (A_KIND) and epilogues (EPILOGUE), string constexprs the kernels
# compare against these names.
PROLOGUES = RAW, ACT_BN, BN_BWD = "raw", "act_bn", "bn_bwd"
EPILOGUES = PLAIN, STATS, GATE_GRAD, RESIDUAL = "plain", "stats", "gate_grad", "residual"


def gemm_options(epilogue: str) -> dict:
    return GATE_GRAD_OPTIONS if epilogue == GATE_GRAD else CAPPED_OPTIONS


# ----------------------------------------------------------------------------- helpers (jit)

@triton.jit
def _operand_coeffs(c, mc, mean_ptr, var_ptr, gamma_ptr, beta_ptr, sdy_ptr, sdyx_ptr, eps,
                    count, KIND: tl.constexpr, HAS_GAMMA: tl.constexpr,
                    HAS_BETA: tl.constexpr, ACC: tl.constexpr):
    """Per-channel coefficients of a prologue: ACT_BN (scale, shift, -, -, -); BN_BWD (mean,
    invstd, gamma·invstd, mean dy, mean dy·x̂)."""
    c0 = tl.zeros(c.shape, ACC)
    c1 = c0
    c2 = c0
    c3 = c0
    c4 = c0
    if KIND == "act_bn":
        c0, c1 = bn_scale_shift(c, mc, mean_ptr, var_ptr, gamma_ptr, beta_ptr, eps,
                                HAS_GAMMA, HAS_BETA, ACC)
    if KIND == "bn_bwd":
        c0, c1, gamma, _ = bn_coefficients(c, mc, mean_ptr, var_ptr, gamma_ptr, beta_ptr, eps,
                                           HAS_GAMMA, False, ACC)
        c2 = gamma * c1
        c3, c4 = bn_grad_means(c, mc, sdy_ptr, sdyx_ptr, count, ACC)
    return c0, c1, c2, c3, c4


@triton.jit
def _operand(img, aux_img, n, c, mc, p, mp, C, HW, c0, c1, c2, c3, c4, gate_ptr, scale_ptr,
             KIND: tl.constexpr, ACT: tl.constexpr, GATE: tl.constexpr, SCALE: tl.constexpr,
             TRAINING: tl.constexpr, CHANNELS_LAST: tl.constexpr, ACC: tl.constexpr):
    """A [positions, channels] GEMM operand tile in ACC, zero off-mask: RAW the stored
    values; ACT_BN act(BN(v)) (· gate[n, c]); BN_BWD the BN input gradient of dy = v
    (· scale[n]) with x̂ from aux (batch-statistics terms in TRAINING)."""
    mask = mp[:, None] & mc[None, :]
    offs = flat_offsets(c, p, C, HW, CHANNELS_LAST)
    v = tl.load(img + offs, mask=mask, other=0.0).to(ACC)
    if KIND == "act_bn":
        v = act(v * c0[None, :] + c1[None, :], ACT)
        if GATE:
            v *= tl.load(gate_ptr + n * C + c, mask=mc, other=0.0).to(ACC)[None, :]
    if KIND == "bn_bwd":
        if SCALE:
            v *= tl.load(scale_ptr + n).to(ACC)
        if TRAINING:
            x_hat = bn_normalized(tl.load(aux_img + offs, mask=mask, other=0.0).to(ACC), c0,
                                  c1)
            v = bn_batch_grad(v, x_hat, c3, c4)
        v *= c2[None, :]
    return tl.where(mask, v, 0.0)


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr):
    """acc + a·b with IEEE fp32 products. UPCAST: the operands (already rounded to bfloat16)
    go in as float32, exactly: Triton's interpreter multiplies bfloat16 bit patterns as
    integers, so it is set for bfloat16 under TRITON_INTERPRET only.

    out_dtype is the accumulator's own (float64 for float64 operands): Triton 3.7
    defaults it to float32 whatever acc is and asserts that acc has that dtype (3.8: acc's)."""
    if UPCAST:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee",
                     out_dtype=acc.dtype)
    else:
        out = tl.dot(a, b, acc, input_precision="ieee", out_dtype=acc.dtype)
    return out


# ----------------------------------------------------------------------------- kernels

@triton.jit
def pointwise_conv_kernel(
        a_ptr, aux_ptr, w_ptr, out_ptr, epi_ptr, part_ptr, gate_ptr, scale_ptr, ggate_ptr,
        a_mean_ptr, a_var_ptr, a_gamma_ptr, a_beta_ptr, a_sdy_ptr, a_sdyx_ptr,
        e_mean_ptr, e_var_ptr, e_gamma_ptr, e_beta_ptr,
        KC, NC, HW, CHUNK_P, stride_wk, stride_wn, count, a_eps, e_eps,
        A_KIND: tl.constexpr, ACT: tl.constexpr, GATE: tl.constexpr, SCALE: tl.constexpr,
        TRAINING: tl.constexpr, A_HAS_GAMMA: tl.constexpr, A_HAS_BETA: tl.constexpr,
        EPILOGUE: tl.constexpr, E_HAS_GAMMA: tl.constexpr, E_HAS_BETA: tl.constexpr,
        CHANNELS_LAST: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr,
        BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[n, co, p] = Σ_k W[co, k] A[n, k, p] for output channels block program_id(0),
    positions chunk program_id(1) (CHUNK_P positions, whole BLOCK_P tiles) of image
    program_id(2) (see the module docstring). The chunk's statistics are one (mean, M2) row
    n·chunks + chunk of part, its gate-gradient sums row chunk of ggate [chunks, N·NC]."""
    chunk = tl.program_id(1)
    n = tl.program_id(2)
    first = chunk * CHUNK_P
    end = tl.minimum(first + CHUNK_P, HW)
    co = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mco = co < NC
    dt = out_ptr.dtype.element_ty
    a_img = image(a_ptr, n, KC, 1, HW)
    aux_img = image(aux_ptr, n, KC, 1, HW)
    out_img = image(out_ptr, n, NC, 1, HW)
    epi_img = image(epi_ptr, n, NC, 1, HW)
    if EPILOGUE == "gate_grad":
        e_scale, e_shift = bn_scale_shift(co, mco, e_mean_ptr, e_var_ptr, e_gamma_ptr,
                                          e_beta_ptr, e_eps, E_HAS_GAMMA, E_HAS_BETA, ACC)
        gate = tl.load(gate_ptr + n * NC + co, mask=mco, other=0.0).to(ACC)
    gate_sum = tl.zeros([BLOCK_N], ACC)
    n_a = tl.zeros([BLOCK_N], ACC)
    mean_a = tl.zeros([BLOCK_N], ACC)
    m2_a = tl.zeros([BLOCK_N], ACC)
    for p0 in range(first, end, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        mp = p < end
        acc = tl.zeros([BLOCK_P, BLOCK_N], ACC)
        for k0 in range(0, KC, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            mk = k < KC
            c0, c1, c2, c3, c4 = _operand_coeffs(k, mk, a_mean_ptr, a_var_ptr, a_gamma_ptr,
                                                 a_beta_ptr, a_sdy_ptr, a_sdyx_ptr, a_eps,
                                                 count, A_KIND, A_HAS_GAMMA, A_HAS_BETA, ACC)
            a = _operand(a_img, aux_img, n, k, mk, p, mp, KC, HW, c0, c1, c2, c3, c4,
                         gate_ptr, scale_ptr, A_KIND, ACT, GATE, SCALE, TRAINING,
                         CHANNELS_LAST, ACC)
            w = tl.load(w_ptr + k[:, None] * stride_wk + co[None, :] * stride_wn,
                        mask=mk[:, None] & mco[None, :], other=0.0)
            acc = _dot(a.to(dt), w, acc, UPCAST)
        mask = mp[:, None] & mco[None, :]
        offs = flat_offsets(co, p, NC, HW, CHANNELS_LAST)
        v = acc.to(dt)  # what the unfused conv stores; everything after sees that
        if EPILOGUE == "gate_grad":
            a2 = act(tl.load(epi_img + offs, mask=mask, other=0.0).to(ACC) * e_scale[None, :]
                     + e_shift[None, :], ACT)
            gate_sum += tl.sum(tl.where(mask, v.to(ACC) * a2, 0.0), axis=0)
            v = (v.to(ACC) * gate[None, :]).to(dt)
        if EPILOGUE == "residual":
            v = (v.to(ACC) + tl.load(epi_img + offs, mask=mask, other=0.0).to(ACC)).to(dt)
        tl.store(out_img + offs, v, mask=mask)
        if EPILOGUE == "stats":  # this tile merged into the chunk's running (mean, M2)
            vt = tl.where(mask, v.to(ACC), 0.0)
            n_b = tl.sum(tl.where(mp, 1.0, 0.0).to(ACC), axis=0)
            mean_b = tl.sum(vt, axis=0) / n_b
            dev = tl.where(mask, vt - mean_b[None, :], 0.0)
            n_a, mean_a, m2_a = chan_merge(n_a, mean_a, m2_a, n_b, mean_b,
                                           tl.sum(dev * dev, axis=0))
    if EPILOGUE == "stats":
        row = part_ptr + (n * tl.num_programs(1) + chunk) * (2 * NC)
        tl.store(row + co, mean_a, mask=mco)
        tl.store(row + NC + co, m2_a, mask=mco)
    if EPILOGUE == "gate_grad":
        tl.store(ggate_ptr + (chunk * tl.num_programs(2) + n) * NC + co, gate_sum, mask=mco)


@triton.jit
def pointwise_wgrad_kernel(
        g_ptr, g_aux_ptr, a_ptr, out_ptr, gate_ptr, scale_ptr,
        g_mean_ptr, g_var_ptr, g_gamma_ptr, g_beta_ptr, g_sdy_ptr, g_sdyx_ptr,
        a_mean_ptr, a_var_ptr, a_gamma_ptr, a_beta_ptr,
        GC, AC, NB, HW, CHUNKS, CHUNK_P, count, g_eps, a_eps,
        A_KIND: tl.constexpr, ACT: tl.constexpr, GATE: tl.constexpr, SCALE: tl.constexpr,
        TRAINING: tl.constexpr, G_HAS_GAMMA: tl.constexpr, A_HAS_GAMMA: tl.constexpr,
        A_HAS_BETA: tl.constexpr, CHANNELS_LAST: tl.constexpr, UPCAST: tl.constexpr,
        ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr):
    """Partial grad W[m, k] = Σ G[n, m, p] A[n, k, p] over the work items i ≡ program_id(2)
    mod the number of splits, in order; item i is positions chunk i % CHUNKS (CHUNK_P
    positions) of image i // CHUNKS. G is the BN-backward prologue of g (x̂ from g_aux), A
    that of a."""
    split = tl.program_id(2)
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mm = m < GC
    k = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mk = k < AC
    dt = g_ptr.dtype.element_ty
    g0, g1, g2, g3, g4 = _operand_coeffs(m, mm, g_mean_ptr, g_var_ptr, g_gamma_ptr, g_beta_ptr,
                                         g_sdy_ptr, g_sdyx_ptr, g_eps, count, "bn_bwd",
                                         G_HAS_GAMMA, False, ACC)
    a0, a1, a2, a3, a4 = _operand_coeffs(k, mk, a_mean_ptr, a_var_ptr, a_gamma_ptr, a_beta_ptr,
                                         a_mean_ptr, a_mean_ptr, a_eps, count, A_KIND,
                                         A_HAS_GAMMA, A_HAS_BETA, ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_N], ACC)
    for item in range(split, NB * CHUNKS, tl.num_programs(2)):
        n = item // CHUNKS
        first = (item % CHUNKS) * CHUNK_P
        end = tl.minimum(first + CHUNK_P, HW)
        g_img = image(g_ptr, n, GC, 1, HW)
        g_aux_img = image(g_aux_ptr, n, GC, 1, HW)
        a_img = image(a_ptr, n, AC, 1, HW)
        for p0 in range(first, end, BLOCK_P):
            p = p0 + tl.arange(0, BLOCK_P)
            mp = p < end
            g = _operand(g_img, g_aux_img, n, m, mm, p, mp, GC, HW, g0, g1, g2, g3, g4, gate_ptr,
                         scale_ptr, "bn_bwd", "identity", False, SCALE, TRAINING, CHANNELS_LAST,
                         ACC)
            a = _operand(a_img, a_img, n, k, mk, p, mp, AC, HW, a0, a1, a2, a3, a4, gate_ptr,
                         scale_ptr, A_KIND, ACT, GATE, False, False, CHANNELS_LAST, ACC)
            acc = _dot(tl.trans(g.to(dt)), a.to(dt), acc, UPCAST)
    tl.store(out_ptr + split * GC * AC + m[:, None] * AC + k[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=mm[:, None] & mk[None, :])


@triton.jit
def squeeze_kernel(d_ptr, pooled_ptr, mean_ptr, var_ptr, gamma_ptr, beta_ptr, C, HW, CHUNK_P,
                   eps,
                   HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr, ACT: tl.constexpr,
                   CHANNELS_LAST: tl.constexpr, ACC: tl.constexpr, BLOCK_P: tl.constexpr,
                   BLOCK_C: tl.constexpr):
    """pooled[n, c] = mean over positions of act(BN(d)); program (channel block, chunk,
    image n) sums CHUNK_P positions in a fixed order, its share of the mean stored at row
    chunk of pooled [chunks, N, C] (the launcher sums the rows when there are several)."""
    chunk = tl.program_id(1)
    n = tl.program_id(2)
    first = chunk * CHUNK_P
    end = tl.minimum(first + CHUNK_P, HW)
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    mc = c < C
    scale, shift = bn_scale_shift(c, mc, mean_ptr, var_ptr, gamma_ptr, beta_ptr, eps,
                                  HAS_GAMMA, HAS_BETA, ACC)
    img = image(d_ptr, n, C, 1, HW)
    total = tl.zeros([BLOCK_C], ACC)
    for p0 in range(first, end, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        mask = (p < end)[:, None] & mc[None, :]
        v = tl.load(img + flat_offsets(c, p, C, HW, CHANNELS_LAST), mask=mask, other=0.0).to(ACC)
        total += tl.sum(tl.where(mask, act(v * scale[None, :] + shift[None, :], ACT), 0.0),
                        axis=0)
    tl.store(pooled_ptr + (chunk * tl.num_programs(2) + n) * C + c, total / HW, mask=mc)


@triton.jit
def _excite_hidden(pooled_ptr, w1_ptr, b1_ptr, n, C, S, ACC: tl.constexpr,
                   BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """z1 = fc1(pooled[n]) over S hidden units (zero beyond S)."""
    s = tl.arange(0, BLOCK_S)
    ms = s < S
    z1 = tl.zeros([BLOCK_S], ACC)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        mc = c < C
        p = tl.load(pooled_ptr + n * C + c, mask=mc, other=0.0).to(ACC)
        w1 = tl.load(w1_ptr + s[:, None] * C + c[None, :], mask=ms[:, None] & mc[None, :],
                     other=0.0).to(ACC)
        z1 += tl.sum(w1 * p[None, :], axis=1)
    return z1 + tl.load(b1_ptr + s, mask=ms, other=0.0).to(ACC)


@triton.jit
def _excite_output(w2_ptr, b2_ptr, h, s, ms, c, mc, S, ACC: tl.constexpr):
    """(fc2 weight block [S, channels c], z2 = fc2(h) at channels c)."""
    w2 = tl.load(w2_ptr + c[None, :] * S + s[:, None], mask=ms[:, None] & mc[None, :],
                 other=0.0).to(ACC)
    return w2, tl.sum(w2 * h[:, None], axis=0) + tl.load(b2_ptr + c, mask=mc, other=0.0).to(ACC)


@triton.jit
def excite_kernel(pooled_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, gate_ptr, C, S,
                  SE_ACT: tl.constexpr, GATE_ACT: tl.constexpr, ACC: tl.constexpr,
                  BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """gate[n, c] = gate_act(fc2(se_act(fc1(pooled[n]))))[c] for image n = program_id(0),
    channel block program_id(1); each program computes the whole hidden vector."""
    n = tl.program_id(0)
    s = tl.arange(0, BLOCK_S)
    ms = s < S
    h = tl.where(ms, act(_excite_hidden(pooled_ptr, w1_ptr, b1_ptr, n, C, S, ACC, BLOCK_S,
                                        BLOCK_C), SE_ACT), 0.0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mc = c < C
    _, z2 = _excite_output(w2_ptr, b2_ptr, h, s, ms, c, mc, S, ACC)
    tl.store(gate_ptr + n * C + c, act(z2, GATE_ACT), mask=mc)


@triton.jit
def excite_bwd_sample_kernel(gg_ptr, pooled_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, gp_ptr,
                             gz1_ptr, gz2_ptr, h_ptr, C, S, SE_ACT: tl.constexpr,
                             GATE_ACT: tl.constexpr, ACC: tl.constexpr, BLOCK_S: tl.constexpr,
                             BLOCK_C: tl.constexpr):
    """Image n = program_id(0): the hidden vectors recomputed, gz2 = dL/dz2, gz1 = dL/dz1
    and grad_pooled, for channel block program_id(1) (gz1 needs every channel's gz2: each
    program computes all of it, the first block stores the per-image vectors); gz1, gz2 and
    h = se_act(z1) kept for the weight-gradient kernel."""
    n = tl.program_id(0)
    first = tl.program_id(1) * BLOCK_C
    s = tl.arange(0, BLOCK_S)
    ms = s < S
    z1 = _excite_hidden(pooled_ptr, w1_ptr, b1_ptr, n, C, S, ACC, BLOCK_S, BLOCK_C)
    h = tl.where(ms, act(z1, SE_ACT), 0.0)
    tl.store(h_ptr + n * S + s, h, mask=ms & (first == 0))
    gh = tl.zeros([BLOCK_S], ACC)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        mc = c < C
        w2, z2 = _excite_output(w2_ptr, b2_ptr, h, s, ms, c, mc, S, ACC)
        gz2 = tl.load(gg_ptr + n * C + c, mask=mc, other=0.0).to(ACC) * act_grad(z2, GATE_ACT)
        gz2 = tl.where(mc, gz2, 0.0)
        tl.store(gz2_ptr + n * C + c, gz2, mask=mc & (c0 == first))
        gh += tl.sum(w2 * gz2[None, :], axis=1)
    gz1 = tl.where(ms, gh * act_grad(z1, SE_ACT), 0.0)
    tl.store(gz1_ptr + n * S + s, gz1, mask=ms & (first == 0))
    c = first + tl.arange(0, BLOCK_C)
    mc = c < C
    w1 = tl.load(w1_ptr + s[:, None] * C + c[None, :], mask=ms[:, None] & mc[None, :],
                 other=0.0).to(ACC)
    tl.store(gp_ptr + n * C + c, tl.sum(w1 * gz1[:, None], axis=0), mask=mc)


@triton.jit
def excite_bwd_weight_kernel(pooled_ptr, gz1_ptr, gz2_ptr, h_ptr, gw1_ptr, gb1_ptr, gw2_ptr,
                             gb2_ptr, N, C, S, ACC: tl.constexpr, BLOCK_S: tl.constexpr,
                             BLOCK_C: tl.constexpr):
    """SE weight gradients of the [hidden block program_id(1), channel block program_id(0)]
    tile, summed over images in order: gW1[s, c] = Σ gz1 pooledᵀ, gW2[c, s] = Σ gz2 hᵀ,
    gb2[c] = Σ gz2 (hidden block 0), gb1[s] = Σ gz1 (channel block 0)."""
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    ms = s < S
    c = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    mc = c < C
    gw1 = tl.zeros([BLOCK_S, BLOCK_C], ACC)
    gw2 = tl.zeros([BLOCK_S, BLOCK_C], ACC)
    gb2 = tl.zeros([BLOCK_C], ACC)
    gb1 = tl.zeros([BLOCK_S], ACC)
    for n in range(0, N):
        gz1 = tl.load(gz1_ptr + n * S + s, mask=ms, other=0.0)
        h = tl.load(h_ptr + n * S + s, mask=ms, other=0.0)
        gz2 = tl.load(gz2_ptr + n * C + c, mask=mc, other=0.0)
        p = tl.load(pooled_ptr + n * C + c, mask=mc, other=0.0).to(ACC)
        gw1 += gz1[:, None] * p[None, :]
        gw2 += h[:, None] * gz2[None, :]
        gb2 += gz2
        gb1 += gz1
    m = ms[:, None] & mc[None, :]
    tl.store(gw1_ptr + s[:, None] * C + c[None, :], gw1, mask=m)
    tl.store(gw2_ptr + c[None, :] * S + s[:, None], gw2, mask=m)
    tl.store(gb2_ptr + c, gb2, mask=mc & (pid_s == 0))
    if pid == 0:
        tl.store(gb1_ptr + s, gb1, mask=ms)


@triton.jit
def output_kernel(q_ptr, res_ptr, out_ptr, scale_ptr, mean_ptr, var_ptr, gamma_ptr, beta_ptr,
                  C, H, W, eps, HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr,
                  SCALE: tl.constexpr, RESIDUAL: tl.constexpr, CHANNELS_LAST: tl.constexpr,
                  ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """out = BN(q) (· scale[n]) (+ residual), one tile of image program_id(2)."""
    n = tl.program_id(2)
    mp, c, mc, h, w = tile(tl.program_id(0), tl.program_id(1), H * W, C, W, BLOCK_P, BLOCK_C)
    scale, shift = bn_scale_shift(c, mc, mean_ptr, var_ptr, gamma_ptr, beta_ptr, eps,
                                  HAS_GAMMA, HAS_BETA, ACC)
    mask = mp[:, None] & mc[None, :]
    offs = offsets(c, h, w, C, H, W, CHANNELS_LAST)
    y = tl.load(image(q_ptr, n, C, H, W) + offs, mask=mask, other=0.0).to(ACC) \
        * scale[None, :] + shift[None, :]
    if SCALE:
        y *= tl.load(scale_ptr + n).to(ACC)
    if RESIDUAL:
        y += tl.load(image(res_ptr, n, C, H, W) + offs, mask=mask, other=0.0).to(ACC)
    tl.store(image(out_ptr, n, C, H, W) + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launchers

def _pow2_clamp(x: int, low: int, high: int) -> int:
    return max(low, min(triton.next_power_of_2(max(x, 1)), high))


def gemm_blocks(k_channels: int, n_channels: int, positions: int) -> Tuple[int, int, int]:
    """(BLOCK_P, BLOCK_K, BLOCK_N) of pointwise_conv_kernel; tl.dot needs 16 per dimension."""
    return (_pow2_clamp(positions, 16, 64), _pow2_clamp(k_channels, 16, 32),
            _pow2_clamp(n_channels, 16, 64))


def _chunk_positions(positions: int, block_p: int, work_programs: int) -> Tuple[int, int]:
    """(chunks, positions per chunk) splitting an image's ``positions`` into whole BLOCK_P
    tiles so that ``work_programs`` programs per chunk make MIN_PROGRAMS."""
    tiles = triton.cdiv(positions, block_p)
    chunk_p = max(1, tiles // splits_to_fill(work_programs, tiles)) * block_p  # >= asked
    return triton.cdiv(positions, chunk_p), chunk_p


def gemm_geometry(k_channels: int, n_channels: int, positions: int, images: int
                  ) -> Tuple[int, int, int, int, int]:
    """(BLOCK_P, BLOCK_K, BLOCK_N, chunks, CHUNK_P) of pointwise_conv_kernel for ``images``
    images: gemm_blocks' tiles, each image's positions split into chunks until the grid has
    MIN_PROGRAMS programs; where even one tile per chunk falls short (small maps), smaller
    tiles first (BLOCK_P, then BLOCK_N, down to tl.dot's 16)."""
    block_p, block_k, block_n = gemm_blocks(k_channels, n_channels, positions)

    def most_programs(bp: int, bn: int) -> int:
        return triton.cdiv(n_channels, bn) * images * triton.cdiv(positions, bp)

    while most_programs(block_p, block_n) < MIN_PROGRAMS:  # one tile per chunk falls short
        if block_p > 16 and triton.cdiv(positions, block_p // 2) > triton.cdiv(positions,
                                                                               block_p):
            block_p //= 2
        elif block_n > 16:
            block_n //= 2
        else:
            break
    chunks, chunk_p = _chunk_positions(positions, block_p,
                                       triton.cdiv(n_channels, block_n) * images)
    return block_p, block_k, block_n, chunks, chunk_p


def wgrad_blocks(g_channels: int, a_channels: int, positions: int) -> Tuple[int, int, int]:
    """(BLOCK_P, BLOCK_M, BLOCK_N) of pointwise_wgrad_kernel."""
    return (_pow2_clamp(positions, 16, 32), _pow2_clamp(g_channels, 16, 64),
            _pow2_clamp(a_channels, 16, 64))


def _upcast_dot(dtype: torch.dtype) -> bool:
    return dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _prologue_args(bn: Optional[NormArgs], sums, placeholder: Tensor, prefix: str):
    ptrs, eps, flags = bn_args(bn, placeholder, prefix)
    sums = sums if sums is not None else (placeholder, placeholder)
    return (*ptrs, *sums), eps, flags


def _gemm(a: Tensor, weight: Tensor, transpose: bool, out: Tensor, channels_last: bool, *,
          kind: str = RAW,
          aux: Optional[Tensor] = None, a_bn: Optional[NormArgs] = None, sums=None,
          gate: Optional[Tensor] = None, scale: Optional[Tensor] = None,
          activation: str = "identity", training: bool = False, epilogue: str = PLAIN,
          epi: Optional[Tensor] = None, e_bn: Optional[NormArgs] = None,
          part: Optional[Tensor] = None, ggate: Optional[Tensor] = None) -> None:
    """One pointwise_conv_kernel launch: out = conv1x1(prologue(a)) with weight (out, in), or
    with its transpose (dgrad); a, aux, out, epi all laid out as the problem's
    ``channels_last`` says (a one-channel tensor is both: the flag cannot come from it)."""
    n, kc, h, w = a.shape
    nc, hw = out.shape[1], h * w
    cols = weight.shape[1]
    stride_wk, stride_wn = (cols, 1) if transpose else (1, cols)
    block_p, block_k, block_n, chunks, chunk_p = gemm_geometry(kc, nc, hw, n)
    a_ptrs, a_eps, a_flags = _prologue_args(a_bn, sums, a, "A_")
    e_ptrs, e_eps, e_flags = bn_args(e_bn, a, "E_")
    gate_in = kind == ACT_BN and gate is not None
    gate_sums = ggate
    if ggate is not None and chunks > 1:  # one row of per-chunk sums, summed after
        gate_sums = torch.empty((chunks, ggate.numel()), dtype=ggate.dtype, device=a.device)
    reads = nbytes(a, weight, gate, scale) + bn_bytes(a_bn) + bn_bytes(e_bn)
    if kind == BN_BWD and training:
        reads += nbytes(aux, *sums)
    if epilogue in (GATE_GRAD, RESIDUAL):
        reads += nbytes(epi)
    launch(
        pointwise_conv_kernel, (triton.cdiv(nc, block_n), chunks, n), reads,
        nbytes(out, part, gate_sums),
        a, aux if aux is not None else a, weight, out, epi if epi is not None else out,
        part if part is not None else out, gate if gate is not None else a,
        scale if scale is not None else a, gate_sums if gate_sums is not None else out,
        *a_ptrs, *e_ptrs, kc, nc, hw, chunk_p, stride_wk, stride_wn, n * hw, a_eps, e_eps,
        A_KIND=kind, ACT=kernel_kind(activation), GATE=gate_in, SCALE=scale is not None,
        TRAINING=training, EPILOGUE=epilogue, CHANNELS_LAST=channels_last,
        UPCAST=_upcast_dot(a.dtype), ACC=acc_type(a.dtype), BLOCK_P=block_p, BLOCK_K=block_k,
        BLOCK_N=block_n, **gemm_options(epilogue), **a_flags, **e_flags)
    if gate_sums is not ggate:
        sum_rows(gate_sums, (ggate,), acc_type(a.dtype))


def _wgrad(g: Tensor, g_aux: Tensor, g_bn: NormArgs, sums, a: Tensor, grad_weight: Tensor,
           channels_last: bool, *,
           kind: str = RAW, a_bn: Optional[NormArgs] = None, gate: Optional[Tensor] = None,
           scale: Optional[Tensor] = None, activation: str = "identity",
           training: bool = False) -> None:
    """grad_weight (G channels, A channels) = Σ BN_backward(g) prologue(a)ᵀ: one
    pointwise_wgrad_kernel launch, plus a sum_rows launch when the work is split (over
    (image, positions chunk) items, enough splits for MIN_PROGRAMS programs)."""
    n, gc, h, w = g.shape
    ac, hw = a.shape[1], h * w
    block_p, block_m, block_n = wgrad_blocks(gc, ac, hw)
    tiles = triton.cdiv(gc, block_m) * triton.cdiv(ac, block_n)
    splits = splits_to_fill(tiles, n * triton.cdiv(hw, block_p))
    chunks, chunk_p = _chunk_positions(hw, block_p, tiles * n)
    splits = min(splits, n * chunks)
    acc = accumulate_dtype(g.dtype)
    part = grad_weight if splits == 1 else torch.empty((splits, gc * ac), dtype=acc,
                                                       device=g.device)
    g_ptrs, g_eps, g_flags = _prologue_args(g_bn, sums, g, "G_")
    g_flags.pop("G_HAS_BETA")
    a_ptrs, a_eps, a_flags = bn_args(a_bn, a, "A_")
    launch(
        pointwise_wgrad_kernel, (triton.cdiv(gc, block_m), triton.cdiv(ac, block_n), splits),
        nbytes(g, a, gate, scale) + bn_bytes(g_bn) + bn_bytes(a_bn)
        + (nbytes(g_aux, *sums) if training else 0), nbytes(part),
        g, g_aux, a, part, gate if gate is not None else a, scale if scale is not None else a,
        *g_ptrs, *a_ptrs, gc, ac, n, hw, chunks, chunk_p, n * hw, g_eps, a_eps, A_KIND=kind,
        ACT=kernel_kind(activation), GATE=gate is not None, SCALE=scale is not None,
        TRAINING=training, CHANNELS_LAST=channels_last,
        UPCAST=_upcast_dot(g.dtype), ACC=acc_type(g.dtype),
        BLOCK_P=block_p, BLOCK_M=block_m, BLOCK_N=block_n, **CAPPED_OPTIONS,
        **g_flags, **a_flags)
    if splits > 1:
        sum_rows(part, (grad_weight,), acc_type(g.dtype))


def _check_matrix(w: Tensor, x: Tensor, shape, what: str) -> None:
    if w.dtype != x.dtype:
        raise TypeError(f"triton mbconv: {what} dtype {w.dtype} must match the input dtype "
                        f"{x.dtype}")
    if tuple(w.shape) != tuple(shape):
        raise ValueError(f"triton mbconv: {what} must be {tuple(shape)}, got {tuple(w.shape)}")


def _empty_stats(x: Tensor) -> Tuple[Tensor, Tensor]:
    acc = accumulate_dtype(x.dtype)
    return x.new_empty(0, dtype=acc), x.new_empty(0, dtype=acc)


def _vector(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.contiguous()


def _gemm_forward(a: Tensor, weight: Tensor, need_stats: bool, **prologue
                  ) -> Tuple[Tensor, Tensor, Tensor]:
    pr = Problem(a, op="mbconv")
    a = pr.layout(a)
    cout = weight.shape[0]
    out = torch.empty((pr.n, cout, pr.h, pr.w), dtype=a.dtype, device=a.device,
                      memory_format=pr.fmt)
    if not need_stats:
        _gemm(a, weight.contiguous(), False, out, pr.channels_last, **prologue)
        return (out, *_empty_stats(a))
    acc = accumulate_dtype(a.dtype)
    hw = pr.h * pr.w
    block_p, _, _, chunks, chunk_p = gemm_geometry(a.shape[1], cout, hw, pr.n)
    part = torch.empty((pr.n * chunks, 2 * cout), dtype=acc, device=a.device)
    _gemm(a, weight.contiguous(), False, out, pr.channels_last, epilogue=STATS, part=part,
          **prologue)
    mean = torch.empty(cout, dtype=acc, device=a.device)
    var = torch.empty(cout, dtype=acc, device=a.device)
    finalize_stats(part, mean, var, hw, chunks, chunk_p, acc_type(a.dtype))
    return out, mean, var


# ----------------------------------------------------------------------------- interface

@specified_by(reference.mbconv_expand_forward)
def mbconv_expand_forward(x, weight, need_stats):
    _check_matrix(weight, x, (weight.shape[0], x.shape[1]), "expand weight")
    return _gemm_forward(x, weight, need_stats)


@specified_by(reference.mbconv_dwconv_forward)
def mbconv_dwconv_forward(h, weight, stride, in_bn, activation, need_stats):
    pr = Problem(h, weight, stride, op="mbconv")
    h, weight = pr.layout(h), weight.contiguous()
    d = pr.empty_out(h)
    mean, var = conv_forward(pr, h, weight, d, stats=need_stats, in_bn=in_bn,
                             activation=activation)
    return (d, mean, var) if need_stats else (d, *_empty_stats(h))


@specified_by(reference.mbconv_squeeze_forward)
def mbconv_squeeze_forward(d, bn2, activation):
    pr = Problem(d, op="mbconv")
    d = pr.layout(d)
    pooled = torch.empty((pr.n, pr.c), dtype=pr.acc_dtype, device=d.device)
    ptrs, eps, flags = bn_args(bn2, d)
    hw = pr.h * pr.w
    block_p, block_c = squeeze_tile(pr.c, hw, pr.channels_last)
    channel_blocks = triton.cdiv(pr.c, block_c)
    chunks, chunk_p = _chunk_positions(hw, block_p, channel_blocks * pr.n)
    shares = pooled if chunks == 1 else torch.empty((chunks, pr.n * pr.c), dtype=pr.acc_dtype,
                                                    device=d.device)
    launch(squeeze_kernel, (channel_blocks, chunks, pr.n), nbytes(d) + bn_bytes(bn2),
           nbytes(shares), d, shares, *ptrs, pr.c, hw, chunk_p, eps,
           ACT=kernel_kind(activation), CHANNELS_LAST=pr.channels_last, ACC=pr.acc,
           BLOCK_P=block_p, BLOCK_C=block_c, **COMPILE_OPTIONS, **flags)
    if chunks > 1:
        sum_rows(shares, (pooled,), pr.acc)
    return pooled


def squeeze_tile(channels: int, positions: int, channels_last: bool) -> Tuple[int, int]:
    """(BLOCK_P, BLOCK_C) of squeeze_kernel: the elementwise tile's channels, positions filling
    a full tile."""
    block_c = tile_sizes(channels, positions, channels_last)[1]
    return max(16, TILE_ELEMENTS // block_c), block_c


def excite_blocks(channels: int, hidden: int, images: Optional[int] = None) -> Tuple[int, int]:
    """(BLOCK_S, BLOCK_C): all S hidden units at once, [S, C] tiles of <= 4096 elements; for
    the (image, channel block) grids of ``images`` images, narrower channel blocks (down to
    16) while the grid falls short of MIN_PROGRAMS."""
    block_s = triton.next_power_of_2(hidden)
    block_c = _pow2_clamp(channels, 16, max(16, 4096 // block_s))
    while (images is not None and block_c > 16
           and images * triton.cdiv(channels, block_c) < MIN_PROGRAMS):
        block_c //= 2
    return block_s, block_c


def excite_weight_blocks(channels: int, hidden: int) -> Tuple[int, int]:
    """(BLOCK_S, BLOCK_C) of the SE weight-gradient tiles: ``excite_blocks``' tile, narrowed
    (channels, then hidden units, down to 8) while the [hidden, channel] grid falls short of
    MIN_PROGRAMS. Each tile sums every image itself, so no partial sums are written."""
    block_s, block_c = excite_blocks(channels, hidden)
    while triton.cdiv(channels, block_c) * triton.cdiv(hidden, block_s) < MIN_PROGRAMS:
        if block_c > 8 and block_c >= block_s:
            block_c //= 2
        elif block_s > 8:
            block_s //= 2
        else:
            break
    return block_s, block_c


@specified_by(reference.mbconv_excite_forward)
def mbconv_excite_forward(pooled, fc1_weight, fc1_bias, fc2_weight, fc2_bias, se_activation, gate):
    n, c = pooled.shape
    s = fc1_weight.shape[0]
    block_s, block_c = excite_blocks(c, s, n)
    out = torch.empty((n, c), dtype=pooled.dtype, device=pooled.device)
    weights = [t.contiguous() for t in (fc1_weight, fc1_bias, fc2_weight, fc2_bias)]
    launch(excite_kernel, (n, triton.cdiv(c, block_c)), nbytes(pooled, *weights),
           nbytes(out),
           pooled.contiguous(), *weights, out, c, s,
           SE_ACT=kernel_kind(se_activation, "se_activation"),
           GATE_ACT=kernel_kind(gate, "gate"), ACC=acc_type(pooled.dtype), BLOCK_S=block_s,
           BLOCK_C=block_c, **COMPILE_OPTIONS)
    return out


@specified_by(reference.mbconv_project_forward)
def mbconv_project_forward(d, gate_values, weight, bn2, activation, need_stats):
    _check_matrix(weight, d, (weight.shape[0], d.shape[1]), "project weight")
    return _gemm_forward(d, weight, need_stats, kind=ACT_BN, a_bn=bn2,
                         gate=_vector(gate_values), activation=activation)


@specified_by(reference.mbconv_output_forward)
def mbconv_output_forward(q, bn3, sample_scale, residual):
    pr = Problem(q, op="mbconv")
    q = pr.layout(q)
    residual = pr.layout(residual) if residual is not None else None
    out = pr.empty_out(q)
    ptrs, eps, flags = bn_args(bn3, q)
    sample_scale = _vector(sample_scale)
    launch(
        output_kernel, pr.grid, nbytes(q, residual, sample_scale) + bn_bytes(bn3), nbytes(out),
        q, residual if residual is not None else q, out,
        sample_scale if sample_scale is not None else q, *ptrs, pr.c, pr.h, pr.w, eps,
        SCALE=sample_scale is not None, RESIDUAL=residual is not None,
        CHANNELS_LAST=pr.channels_last, ACC=pr.acc, BLOCK_P=pr.block_p, BLOCK_C=pr.block_c,
        **COMPILE_OPTIONS, **flags)
    return out


@specified_by(reference.mbconv_output_backward_stats)
def mbconv_output_backward_stats(grad_out, q, bn3, sample_scale):
    pr = Problem(q, op="mbconv")
    return bn_grad_sums(pr, pr.layout(grad_out), pr.layout(q), bn3, "identity",
                        scale=_vector(sample_scale))


@specified_by(reference.mbconv_project_backward)
def mbconv_project_backward(grad_out, q, d, gate_values, weight, bn2, activation, bn3, sum_dy3,
                            sum_dy3_xhat3, sample_scale, training, output_mask):
    pr = Problem(d, op="mbconv")
    go, q, d = pr.layout(grad_out), pr.layout(q), pr.layout(d)
    gate_values, sample_scale = _vector(gate_values), _vector(sample_scale)
    weight = weight.contiguous()
    sums = (sum_dy3, sum_dy3_xhat3)
    grad_a2 = grad_gate = grad_weight = None
    if output_mask[0]:
        grad_a2 = pr.empty_out(d)
        if gate_values is None:
            grad_gate = _empty_stats(d)[0]
            _gemm(go, weight, True, grad_a2, pr.channels_last, kind=BN_BWD, aux=q, a_bn=bn3,
                  sums=sums, scale=sample_scale, training=training)
        else:
            grad_gate = torch.empty((pr.n, pr.c), dtype=pr.acc_dtype, device=d.device)
            _gemm(go, weight, True, grad_a2, pr.channels_last, kind=BN_BWD, aux=q, a_bn=bn3,
                  sums=sums, scale=sample_scale, training=training, epilogue=GATE_GRAD, epi=d,
                  e_bn=bn2, gate=gate_values, ggate=grad_gate, activation=activation)
    if output_mask[1]:
        grad_weight = torch.empty(tuple(weight.shape), dtype=weight.dtype, device=d.device)
        _wgrad(go, q, bn3, sums, d, grad_weight, pr.channels_last, kind=ACT_BN, a_bn=bn2,
               gate=gate_values, scale=sample_scale, activation=activation, training=training)
    return grad_a2, grad_gate, grad_weight


@specified_by(reference.mbconv_excite_backward)
def mbconv_excite_backward(grad_gate, pooled, fc1_weight, fc1_bias, fc2_weight, fc2_bias,
                           se_activation, gate):
    """Two launches: per image, then the weight gradients summed over images per tile."""
    n, c = pooled.shape
    s = fc1_weight.shape[0]
    acc, dev = pooled.dtype, pooled.device
    block_s, block_c = excite_blocks(c, s, n)
    weights = [t.contiguous() for t in (fc1_weight, fc1_bias, fc2_weight, fc2_bias)]
    grad_gate, pooled = grad_gate.contiguous(), pooled.contiguous()
    grad_pooled = torch.empty((n, c), dtype=acc, device=dev)
    gz1, h = (torch.empty((n, s), dtype=acc, device=dev) for _ in range(2))
    gz2 = torch.empty((n, c), dtype=acc, device=dev)
    flags = dict(ACC=acc_type(pooled.dtype), BLOCK_S=block_s, **COMPILE_OPTIONS)
    launch(
        excite_bwd_sample_kernel, (n, triton.cdiv(c, block_c)),
        nbytes(grad_gate, pooled, *weights), nbytes(grad_pooled, gz1, gz2, h),
        grad_gate, pooled, *weights, grad_pooled, gz1, gz2, h, c, s,
        SE_ACT=kernel_kind(se_activation, "se_activation"), GATE_ACT=kernel_kind(gate, "gate"),
        BLOCK_C=block_c, **flags)
    gw1 = torch.empty((s, c), dtype=acc, device=dev)
    gb1 = torch.empty(s, dtype=acc, device=dev)
    gw2 = torch.empty((c, s), dtype=acc, device=dev)
    gb2 = torch.empty(c, dtype=acc, device=dev)
    # [hidden, channel] tiles, each summing every image: splitting the images instead would
    # write more partial-gradient bytes than the kernel reads.
    block_s, block_c = excite_weight_blocks(c, s)
    launch(excite_bwd_weight_kernel, (triton.cdiv(c, block_c), triton.cdiv(s, block_s)),
           nbytes(pooled, gz1, gz2, h), nbytes(gw1, gb1, gw2, gb2),
           pooled, gz1, gz2, h, gw1, gb1, gw2, gb2, n, c, s,
           BLOCK_C=block_c, **{**flags, "BLOCK_S": block_s})
    return grad_pooled, gw1, gb1, gw2, gb2


@specified_by(reference.mbconv_dwconv_backward_stats)
def mbconv_dwconv_backward_stats(grad_a2, grad_pooled, d, bn2, activation):
    pr = Problem(d, op="mbconv")
    return bn_grad_sums(pr, pr.layout(grad_a2), pr.layout(d), bn2, activation,
                        pooled=_vector(grad_pooled))


@specified_by(reference.mbconv_dwconv_backward)
def mbconv_dwconv_backward(grad_a2, grad_pooled, d, h, weight, stride, bn2, activation, sum_dy2,
                           sum_dy2_xhat2, in_bn, training, output_mask):
    pr = Problem(h, weight, stride, op="mbconv")
    h, weight = pr.layout(h), weight.contiguous()
    need_gx, need_gw = bool(output_mask[0]), bool(output_mask[1])
    if not (need_gx or need_gw):
        return (None, None, *_empty_stats(h))
    grad_h, grad_w, in_sums = conv_backward(
        pr, pr.layout(grad_a2), pr.layout(d), h, weight, bn2, (sum_dy2, sum_dy2_xhat2),
        training, need_gx, need_gw, activation=activation, pooled=_vector(grad_pooled),
        in_bn=in_bn)
    return (grad_h, grad_w, *(in_sums if in_sums is not None else _empty_stats(h)))


@specified_by(reference.mbconv_expand_backward)
def mbconv_expand_backward(grad_y1, e, x, weight, bn1, sum_dy1, sum_dy1_xhat1, training,
                           grad_residual, output_mask):
    pr = Problem(x, op="mbconv")
    x, gy, e = pr.layout(x), pr.layout(grad_y1), pr.layout(e)
    weight = weight.contiguous()
    sums = (sum_dy1, sum_dy1_xhat1)
    grad_x = grad_weight = None
    if output_mask[0]:
        grad_x = pr.empty_out(x)
        residual = pr.layout(grad_residual) if grad_residual is not None else None
        _gemm(gy, weight, True, grad_x, pr.channels_last, kind=BN_BWD, aux=e, a_bn=bn1,
              sums=sums, training=training, epilogue=RESIDUAL if residual is not None else PLAIN,
              epi=residual)
    if output_mask[1]:
        grad_weight = torch.empty(tuple(weight.shape), dtype=weight.dtype, device=x.device)
        _wgrad(gy, e, bn1, sums, x, grad_weight, pr.channels_last, training=training)
    return grad_x, grad_weight
