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
from fused_mbconv.tensors import accumulate_dtype, memory_format_of

Tensor = torch.Tensor

_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
              torch.float32: tl.float32, torch.float64: tl.float64}
NUM_WARPS = 8  # 4 tile elements per thread: the K² tap loop needs ~half the registers
COMPILE_OPTIONS = dict(num_warps=NUM_WARPS)
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
    return ptr + n.to(tl.int64) * C * H * W


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


# ----------------------------------------------------------------------------- kernels

@triton.jit
def dwconv_bn_silu_fwd_kernel(
        x_ptr, w_ptr, d_ptr, out_ptr, part_ptr, mean_ptr, var_ptr, gamma_ptr, beta_ptr,
        mean_out_ptr, var_out_ptr, C, H, W, OH, OW, eps,
        K: tl.constexpr, STRIDE: tl.constexpr, CHANNELS_LAST: tl.constexpr,
        TRAINING: tl.constexpr, WRITE_D: tl.constexpr, HAS_GAMMA: tl.constexpr,
        HAS_BETA: tl.constexpr, ACC: tl.constexpr, BLOCK_P: tl.constexpr,
        BLOCK_C: tl.constexpr):
    """Depthwise conv of one tile of image program_id(2). TRAINING: write d and this tile's
    (mean, M2) per channel. Eval: apply the folded BN + SiLU here, write out (d if WRITE_D)."""
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    n = tl.program_id(2)
    mp, c, mc, oh, ow = _tile(pid_p, pid_c, OH * OW, C, OW, BLOCK_P, BLOCK_C)
    ih0 = oh * STRIDE - K // 2
    iw0 = ow * STRIDE - K // 2
    x_tile = _image(x_ptr, n, C, H, W) + _offsets(c, ih0, iw0, C, H, W, CHANNELS_LAST)
    acc = tl.zeros([BLOCK_P, BLOCK_C], ACC)
    for kh in tl.static_range(K):
        mh = mp & (ih0 + kh >= 0) & (ih0 + kh < H)
        for kw in tl.static_range(K):
            m = mh & (iw0 + kw >= 0) & (iw0 + kw < W)
            xv = tl.load(x_tile + _tap_offset(kh, kw, C, W, CHANNELS_LAST),
                         mask=m[:, None] & mc[None, :], other=0.0)
            wv = tl.load(w_ptr + c * (K * K) + (kh * K + kw), mask=mc, other=0.0)
            acc += xv.to(ACC) * wv.to(ACC)[None, :]
    mask = mp[:, None] & mc[None, :]
    offs = _offsets(c, oh, ow, C, OH, OW, CHANNELS_LAST)
    # Statistics and BN see d as stored (rounded to the input dtype), like backward does.
    d = acc.to(d_ptr.dtype.element_ty)
    if WRITE_D:
        tl.store(_image(d_ptr, n, C, OH, OW) + offs, d, mask=mask)
    d = d.to(ACC)
    if TRAINING:
        count = tl.minimum(OH * OW - pid_p * BLOCK_P, BLOCK_P).to(ACC)
        tile_mean = tl.sum(tl.where(mask, d, 0.0), axis=0) / count
        dev = tl.where(mask, d - tile_mean[None, :], 0.0)
        row = part_ptr + (n * tl.num_programs(0) + pid_p) * (2 * C)
        tl.store(row + c, tile_mean, mask=mc)
        tl.store(row + C + c, tl.sum(dev * dev, axis=0), mask=mc)
    else:
        mean, invstd, gamma, beta = _bn_coefficients(c, mc, mean_ptr, var_ptr, gamma_ptr,
                                                     beta_ptr, eps, HAS_GAMMA, HAS_BETA, ACC)
        scale = gamma * invstd
        y = d * scale[None, :] + (beta - mean * scale)[None, :]
        tl.store(_image(out_ptr, n, C, OH, OW) + offs,
                 (y * _sigmoid(y)).to(out_ptr.dtype.element_ty), mask=mask)
        if (pid_p == 0) & (n == 0):  # eval returns the statistics it used, in ACC
            tl.store(mean_out_ptr + c, mean, mask=mc)
            tl.store(var_out_ptr + c, tl.load(var_ptr + c, mask=mc).to(ACC), mask=mc)


@triton.jit
def bn_stats_finalize_kernel(part_ptr, mean_ptr, var_ptr, C, HW, TILES, T, ACC: tl.constexpr,
                             BLOCK_P: tl.constexpr, BLOCK_T: tl.constexpr,
                             BLOCK_C: tl.constexpr):
    """Merge per-tile (mean, M2) into the batch mean and biased variance (Chan et al.); row t
    is tile t % TILES of an image of HW positions. A
    block of BLOCK_T tiles is combined around its own mean, then merged into the running
    result; no E[x²]−E[x]² cancellation anywhere."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    mc = c < C
    n_a = tl.zeros([BLOCK_C], ACC)
    mean_a = tl.zeros([BLOCK_C], ACC)
    m2_a = tl.zeros([BLOCK_C], ACC)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        count = tl.minimum(HW - (t % TILES) * BLOCK_P, BLOCK_P)
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
                         HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr, ACC: tl.constexpr,
                         BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
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
             (y * _sigmoid(y)).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _silu_bn_grad(go_ptr, d_ptr, offs, mask, mean, invstd, gamma, beta, ACC: tl.constexpr):
    """g = dL/dy (through SiLU) and x̂, both recomputed from grad_out and d; zero off-mask."""
    x_hat = (tl.load(d_ptr + offs, mask=mask, other=0.0).to(ACC) - mean[None, :]) \
        * invstd[None, :]
    y = x_hat * gamma[None, :] + beta[None, :]
    s = _sigmoid(y)
    go = tl.load(go_ptr + offs, mask=mask, other=0.0).to(ACC)
    return tl.where(mask, go * s * (1.0 + y * (1.0 - s)), 0.0), x_hat


@triton.jit
def bn_silu_bwd_reduce_kernel(go_ptr, d_ptr, mean_ptr, var_ptr, gamma_ptr, beta_ptr, part_ptr,
                              C, OH, OW, eps, CHANNELS_LAST: tl.constexpr,
                              HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr,
                              ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per-tile Σg and Σg·x̂ per channel (the BN-backward reductions), rows [Σg | Σg·x̂]."""
    pid_p = tl.program_id(0)
    n = tl.program_id(2)
    mp, c, mc, oh, ow = _tile(pid_p, tl.program_id(1), OH * OW, C, OW, BLOCK_P, BLOCK_C)
    mean, invstd, gamma, beta = _bn_coefficients(c, mc, mean_ptr, var_ptr, gamma_ptr, beta_ptr,
                                                 eps, HAS_GAMMA, HAS_BETA, ACC)
    mask = mp[:, None] & mc[None, :]
    image = n.to(tl.int64) * C * OH * OW
    g, x_hat = _silu_bn_grad(go_ptr + image, d_ptr + image,
                             _offsets(c, oh, ow, C, OH, OW, CHANNELS_LAST), mask, mean, invstd,
                             gamma, beta, ACC)
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
        sum_g_ptr, sum_gx_ptr, C, H, W, OH, OW, count, eps,
        K: tl.constexpr, STRIDE: tl.constexpr, CHANNELS_LAST: tl.constexpr,
        TRAINING: tl.constexpr, WRITE_GC: tl.constexpr, NEED_GW: tl.constexpr,
        HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr, ACC: tl.constexpr,
        BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """grad_conv of one output tile, recomputed from grad_out, d and the BN reductions over
    ``count`` values per channel; its weight-gradient partials Σ gc·x(shifted) per (channel,
    tap); gc written once (WRITE_GC) for the transposed conv."""
    pid_p = tl.program_id(0)
    n = tl.program_id(2)
    mp, c, mc, oh, ow = _tile(pid_p, tl.program_id(1), OH * OW, C, OW, BLOCK_P, BLOCK_C)
    mean, invstd, gamma, beta = _bn_coefficients(c, mc, mean_ptr, var_ptr, gamma_ptr, beta_ptr,
                                                 eps, HAS_GAMMA, HAS_BETA, ACC)
    mask = mp[:, None] & mc[None, :]
    offs = _offsets(c, oh, ow, C, OH, OW, CHANNELS_LAST)
    image = n.to(tl.int64) * C * OH * OW
    g, x_hat = _silu_bn_grad(go_ptr + image, d_ptr + image, offs, mask, mean, invstd, gamma,
                             beta, ACC)
    if TRAINING:
        mean_g = tl.load(sum_g_ptr + c, mask=mc, other=0.0).to(ACC) / count
        mean_gx = tl.load(sum_gx_ptr + c, mask=mc, other=0.0).to(ACC) / count
        g = tl.where(mask, g - mean_g[None, :] - x_hat * mean_gx[None, :], 0.0)
    gc = g * (gamma * invstd)[None, :]
    if WRITE_GC:
        tl.store(gc_ptr + image + offs, gc.to(gc_ptr.dtype.element_ty), mask=mask)
    if NEED_GW:
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
                tl.store(row + (kh * K + kw), tl.sum(gc * xv.to(ACC), axis=0), mask=mc)


@triton.jit
def dwconv_bwd_input_kernel(gc_ptr, w_ptr, gx_ptr, C, H, W, OH, OW,
                            K: tl.constexpr, STRIDE: tl.constexpr, CHANNELS_LAST: tl.constexpr,
                            ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """grad_input: the transposed depthwise conv, gathered per input position (no atomics)."""
    n = tl.program_id(2)
    mq, c, mc, ih, iw = _tile(tl.program_id(0), tl.program_id(1), H * W, C, W,
                              BLOCK_P, BLOCK_C)
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
    tl.store(_image(gx_ptr, n, C, H, W) + _offsets(c, ih, iw, C, H, W, CHANNELS_LAST),
             acc.to(gx_ptr.dtype.element_ty), mask=mq[:, None] & mc[None, :])


# ----------------------------------------------------------------------------- launch config

TILE_ELEMENTS = 1024


def tile_sizes(channels: int, positions: int, channels_last: bool) -> Tuple[int, int]:
    """(BLOCK_P, BLOCK_C) for ``positions`` per image: wide along the unit-stride dimension."""
    block_c = min(triton.next_power_of_2(channels), 32 if channels_last else 16)
    block_p = min(triton.next_power_of_2(positions), TILE_ELEMENTS // block_c)
    return block_p, block_c


def _acc(dtype: torch.dtype):
    return _TL_DTYPES[accumulate_dtype(dtype)]


def _check(x: Tensor, weight: Tensor) -> None:
    if x.dtype not in _TL_DTYPES:
        raise TypeError(f"triton dwconv_bn_silu supports float16, bfloat16, float32 and "
                        f"float64 inputs, got {x.dtype}")
    if weight.dtype != x.dtype:
        raise TypeError(f"triton dwconv_bn_silu: conv weight dtype {weight.dtype} must match "
                        f"the input dtype {x.dtype}")
    k = weight.shape[-1]
    if weight.shape != (x.shape[1], 1, k, k) or k % 2 == 0:
        raise ValueError(f"triton dwconv_bn_silu: conv weight must be (C, 1, k, k) with odd k "
                         f"and C={x.shape[1]}, got {tuple(weight.shape)}")


def _nbytes(*tensors: Optional[Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class _Problem:
    """Shapes, layout and tiling of one call, shared by the forward and backward launchers."""

    def __init__(self, x: Tensor, weight: Tensor, stride: int):
        _check(x, weight)
        self.fmt = memory_format_of(x)
        self.channels_last = self.fmt == torch.channels_last
        self.n, self.c, self.h, self.w = x.shape
        self.k = weight.shape[-1]
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


def _sum_rows(part: Tensor, outs: Tuple[Tensor, ...], acc) -> None:
    """Column sums of ``part`` [T, len(outs)·M] into the M-element tensors ``outs``."""
    m = outs[0].numel()
    block_m = min(triton.next_power_of_2(m), 128)
    sum_rows_kernel[(triton.cdiv(m, block_m), len(outs))](
        part, outs[0], outs[-1], part.shape[0], m, ACC=acc, BLOCK_T=BLOCK_T, BLOCK_M=block_m,
        num_warps=NUM_WARPS)
    note_launch("sum_rows_kernel", "triton", _nbytes(part), _nbytes(*outs))


# ----------------------------------------------------------------------------- interface

def dwconv_bn_silu_forward(x: Tensor, weight: Tensor, bn_weight: Optional[Tensor],
                           bn_bias: Optional[Tensor], running_mean: Optional[Tensor],
                           running_var: Optional[Tensor], stride: int, training: bool,
                           eps: float, need_conv_out: bool
                           ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Same contract as ``fused_mbconv.reference.dwconv_bn_silu_forward``."""
    pr = _Problem(x, weight, stride)
    x, weight = pr.layout(x), weight.contiguous()
    out = pr.empty_out(x)
    mean, var = pr.stats(x), pr.stats(x)
    write_d = training or need_conv_out
    d = pr.empty_out(x) if write_d else out  # out: an unused placeholder pointer
    affine = (bn_weight if bn_weight is not None else x, bn_bias if bn_bias is not None else x)
    flags = dict(HAS_GAMMA=bn_weight is not None, HAS_BETA=bn_bias is not None, ACC=pr.acc,
                 BLOCK_P=pr.block_p, BLOCK_C=pr.block_c, num_warps=NUM_WARPS)
    conv = dict(K=pr.k, STRIDE=stride, CHANNELS_LAST=pr.channels_last)
    per_channel = _nbytes(bn_weight, bn_bias)
    if training:
        part = torch.empty((pr.rows, 2, pr.c), dtype=pr.acc_dtype, device=x.device)
        dwconv_bn_silu_fwd_kernel[pr.grid](
            x, weight, d, out, part, mean, var, *affine, mean, var, pr.c, pr.h, pr.w, pr.oh,
            pr.ow, eps, TRAINING=True, WRITE_D=True, **conv, **flags)
        note_launch("dwconv_bn_silu_fwd_kernel", "triton", _nbytes(x, weight),
                    _nbytes(d, part))
        bn_stats_finalize_kernel[(pr.grid[1],)](
            part, mean, var, pr.c, pr.oh * pr.ow, pr.tiles, pr.rows, ACC=pr.acc, BLOCK_P=pr.block_p,
            BLOCK_T=BLOCK_T, BLOCK_C=pr.block_c, num_warps=NUM_WARPS)
        note_launch("bn_stats_finalize_kernel", "triton", _nbytes(part), _nbytes(mean, var))
        bn_silu_apply_kernel[pr.grid](
            d, out, mean, var, *affine, pr.c, pr.oh, pr.ow, eps,
            CHANNELS_LAST=pr.channels_last, **flags)
        note_launch("bn_silu_apply_kernel", "triton", _nbytes(d, mean, var) + per_channel,
                    _nbytes(out))
    else:
        dwconv_bn_silu_fwd_kernel[pr.grid](
            x, weight, d, out, out, running_mean, running_var, *affine, mean, var, pr.c, pr.h,
            pr.w, pr.oh, pr.ow, eps, TRAINING=False, WRITE_D=write_d, **conv, **flags)
        note_launch("dwconv_bn_silu_fwd_kernel", "triton",
                    _nbytes(x, weight, running_mean, running_var) + per_channel,
                    _nbytes(out, mean, var) + (_nbytes(d) if write_d else 0))
    conv_out = d if need_conv_out else x.new_empty(0)
    return out, conv_out, mean, var


def dwconv_bn_silu_backward(grad_out: Tensor, x: Tensor, weight: Tensor, conv_out: Tensor,
                            bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
                            mean: Tensor, var: Tensor, stride: int, training: bool, eps: float,
                            output_mask: List[bool]
                            ) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor],
                                       Optional[Tensor]]:
    """Same contract as ``fused_mbconv.reference.dwconv_bn_silu_backward``."""
    pr = _Problem(x, weight, stride)
    x, weight = pr.layout(x), weight.contiguous()
    go, d = pr.layout(grad_out), pr.layout(conv_out)
    need_gx, need_gw = bool(output_mask[0]), bool(output_mask[1])
    affine = (bn_weight if bn_weight is not None else x, bn_bias if bn_bias is not None else x)
    flags = dict(HAS_GAMMA=bn_weight is not None, HAS_BETA=bn_bias is not None, ACC=pr.acc,
                 BLOCK_P=pr.block_p, BLOCK_C=pr.block_c, num_warps=NUM_WARPS)
    per_channel = _nbytes(mean, var, bn_weight, bn_bias)
    dev = x.device

    sum_g, sum_gx = pr.stats(x), pr.stats(x)  # = grad bn bias, grad bn weight
    need_sums = training and (need_gx or need_gw) or output_mask[2] or output_mask[3]
    if need_sums:
        part = torch.empty((pr.rows, 2 * pr.c), dtype=pr.acc_dtype, device=dev)
        bn_silu_bwd_reduce_kernel[pr.grid](
            go, d, mean, var, *affine, part, pr.c, pr.oh, pr.ow, eps,
            CHANNELS_LAST=pr.channels_last, **flags)
        note_launch("bn_silu_bwd_reduce_kernel", "triton", _nbytes(go, d) + per_channel,
                    _nbytes(part))
        _sum_rows(part, (sum_g, sum_gx), pr.acc)

    grad_x = grad_w = None
    if need_gx or need_gw:
        gc = pr.empty_out(x) if need_gx else go  # go: an unused placeholder pointer
        gw_part = torch.empty((pr.rows if need_gw else 0, pr.c * pr.k * pr.k),
                              dtype=pr.acc_dtype, device=dev)
        dwconv_bwd_grad_conv_kernel[pr.grid](
            go, d, x, gc, gw_part, mean, var, *affine, sum_g, sum_gx, pr.c, pr.h, pr.w, pr.oh,
            pr.ow, pr.count, eps, K=pr.k, STRIDE=stride, CHANNELS_LAST=pr.channels_last,
            TRAINING=training, WRITE_GC=need_gx, NEED_GW=need_gw, **flags)
        note_launch("dwconv_bwd_grad_conv_kernel", "triton",
                    _nbytes(go, d) + per_channel + (_nbytes(x) if need_gw else 0)
                    + (_nbytes(sum_g, sum_gx) if training else 0),
                    (_nbytes(gc) if need_gx else 0) + _nbytes(gw_part))
        if need_gw:
            grad_w = torch.empty_like(weight)
            _sum_rows(gw_part, (grad_w,), pr.acc)
        if need_gx:
            grad_x = torch.empty_like(x)
            block_q, block_c = tile_sizes(pr.c, pr.h * pr.w, pr.channels_last)
            grid = (triton.cdiv(pr.h * pr.w, block_q), triton.cdiv(pr.c, block_c), pr.n)
            dwconv_bwd_input_kernel[grid](
                gc, weight, grad_x, pr.c, pr.h, pr.w, pr.oh, pr.ow, K=pr.k,
                STRIDE=stride, CHANNELS_LAST=pr.channels_last, ACC=pr.acc, BLOCK_P=block_q,
                BLOCK_C=block_c, num_warps=NUM_WARPS)
            note_launch("dwconv_bwd_input_kernel", "triton", _nbytes(gc, weight),
                        _nbytes(grad_x))
    return (grad_x, grad_w,
            sum_gx if output_mask[2] else None,
            sum_g if output_mask[3] else None)


# ----------------------------------------------------------------------------- compile registry

# (channels, kernel size, stride) of every depthwise conv in EfficientNet-B0.
B0_DEPTHWISE_LAYERS = ((32, 3, 1), (96, 3, 2), (144, 3, 1), (144, 5, 2), (240, 5, 1),
                       (240, 3, 2), (480, 3, 1), (480, 5, 1), (672, 5, 1), (672, 5, 2),
                       (1152, 5, 1), (1152, 3, 1))
_ACTIVATION_PTRS = {"x_ptr", "w_ptr", "d_ptr", "out_ptr", "go_ptr", "gc_ptr", "gx_ptr"}
_TL_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def _signature(kernel, constexprs, act: str, activation_ptrs=_ACTIVATION_PTRS):
    """Argument types as the JIT would see them: activation tensors in ``act``, statistics
    and partials in fp32, eps fp32, sizes i32."""
    def kind(name):
        if name in constexprs:
            return "constexpr"
        if name.endswith("_ptr"):
            return "*" + (act if name in activation_ptrs else "fp32")
        return "fp32" if name == "eps" else "i32"
    return {name: kind(name) for name in kernel.arg_names}


def specializations(layers=B0_DEPTHWISE_LAYERS, dtypes=tuple(_TL_NAMES)):
    """(kernel, signature, constexprs, label) for each distinct compiled variant the launchers
    produce for ``layers`` (at a large batch), in train and eval, NCHW and channels_last."""
    specs = {}

    def add(kernel, act, label, constexprs, **kw):
        key = (kernel.__name__, act, tuple(sorted((k, str(v)) for k, v in constexprs.items())))
        specs.setdefault(key, (kernel, _signature(kernel, constexprs, act, **kw), constexprs,
                               f"{kernel.__name__} {label}"))

    big = 7 * 7  # positions of B0's smallest map: every tile at full size
    sums = dict(ACC=tl.float32, BLOCK_T=BLOCK_T, BLOCK_M=128)
    add(sum_rows_kernel, "fp32", "bn grads", sums, activation_ptrs=())
    for dtype in dtypes:
        act = _TL_NAMES[dtype]
        for channels_last in (False, True):
            fmt = "nhwc" if channels_last else "nchw"
            for channels, k, stride in layers:
                block_p, block_c = tile_sizes(channels, big, channels_last)
                tile = dict(BLOCK_P=block_p, BLOCK_C=block_c)
                common = dict(HAS_GAMMA=True, HAS_BETA=True, ACC=tl.float32, **tile)
                conv = dict(K=k, STRIDE=stride, CHANNELS_LAST=channels_last)
                where = f"k{k} s{stride} {act} {fmt} {block_p}x{block_c}"
                for training in (True, False):
                    add(dwconv_bn_silu_fwd_kernel, act,
                        f"{where} {'train' if training else 'eval'}",
                        dict(TRAINING=training, WRITE_D=training, **conv, **common))
                add(dwconv_bwd_grad_conv_kernel, act, f"{where} train",
                    dict(TRAINING=True, WRITE_GC=True, NEED_GW=True, **conv, **common))
                add(dwconv_bwd_input_kernel, act, where,
                    dict(ACC=tl.float32, **conv, **tile))
                where = f"{act} {fmt} {block_p}x{block_c}"
                add(bn_silu_apply_kernel, act, where, dict(CHANNELS_LAST=channels_last, **common))
                add(bn_silu_bwd_reduce_kernel, act, where,
                    dict(CHANNELS_LAST=channels_last, **common))
                add(bn_stats_finalize_kernel, "fp32", f"statistics {block_p}x{block_c}",
                    dict(ACC=tl.float32, BLOCK_P=block_p, BLOCK_T=BLOCK_T, BLOCK_C=block_c))
        add(sum_rows_kernel, act, f"{act} grad weight", sums,
            activation_ptrs={"out0_ptr", "out1_ptr"})
    return list(specs.values())


SPECIALIZATIONS = specializations()
