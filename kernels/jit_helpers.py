"""Triton JIT helpers every kernel module shares: tile addressing, the activations (by name, a
string constexpr of ``fused_mbconv.activations.KERNEL_ACTIVATIONS``), and the BatchNorm math.

A tile is [positions, channels] of one image; math runs in ACC (float32, or float64 for
float64 inputs). The formulas are those of ``fused_mbconv.reference`` (the specification),
written once here for Triton.
"""

from __future__ import annotations

import triton
import triton.language as tl


# ----------------------------------------------------------------------------- tiles

@triton.jit
def tile(pid_p, pid_c, HW, C, W, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """(position mask, channels c, channel mask, h, w) of this program's tile: positions
    p = h·W + w of one image."""
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    return p < HW, c, c < C, p // W, p % W


@triton.jit
def image(ptr, n, C, H, W):
    """Pointer to image n; the only 64-bit offset, so per-element offsets stay 32-bit."""
    return ptr + tl.cast(n, tl.int64) * C * H * W


@triton.jit
def offsets(c, h, w, C, H, W, CHANNELS_LAST: tl.constexpr):
    """Element offsets of a [positions (h, w), channels c] tile within one image."""
    return flat_offsets(c, h * W + w, C, H * W, CHANNELS_LAST)


@triton.jit
def flat_offsets(c, p, C, HW, CHANNELS_LAST: tl.constexpr):
    """Element offsets of a [positions p = h·W + w, channels c] tile within one image."""
    if CHANNELS_LAST:
        return p[:, None] * C + c[None, :]
    return c[None, :] * HW + p[:, None]


@triton.jit
def tap_offset(dh, dw, C, W, CHANNELS_LAST: tl.constexpr):
    """Offset of the element (dh, dw) away: a scalar added to a tile's centre offsets."""
    if CHANNELS_LAST:
        return (dh * W + dw) * C
    return dh * W + dw


# ----------------------------------------------------------------------------- activations

@triton.jit
def _sigmoid(y):
    return 1.0 / (1.0 + tl.exp(-y))


@triton.jit
def activation(y, ACT: tl.constexpr, GRAD: tl.constexpr):
    """act(y), or with GRAD d act / dy (aten's choices at the kinks, as
    fused_mbconv.activations.KINDS), for the kind named ACT: each kind's forward and gradient
    side by side. An unknown name fails to compile."""
    if GRAD:
        one = tl.full(y.shape, 1.0, y.dtype)
        zero = tl.zeros(y.shape, y.dtype)
    if ACT == "identity":
        if GRAD:
            out = one
        else:
            out = y
    elif ACT == "silu":
        s = _sigmoid(y)
        if GRAD:
            out = s * (1.0 + y * (1.0 - s))
        else:
            out = y * s
    elif ACT == "relu":
        if GRAD:
            out = tl.where(y > 0.0, one, zero)
        else:
            out = tl.maximum(y, 0.0)
    elif ACT == "relu6":
        if GRAD:
            out = tl.where((y > 0.0) & (y < 6.0), one, zero)
        else:
            out = tl.minimum(tl.maximum(y, 0.0), 6.0)
    elif ACT == "hardswish":
        if GRAD:
            out = tl.where(y < -3.0, zero, tl.where(y <= 3.0, y / 3.0 + 0.5, one))
        else:
            out = y * (tl.minimum(tl.maximum(y + 3.0, 0.0), 6.0) / 6.0)
    elif ACT == "sigmoid":
        s = _sigmoid(y)
        if GRAD:
            out = s * (1.0 - s)
        else:
            out = s
    elif ACT == "hardsigmoid":
        if GRAD:
            out = tl.where((y > -3.0) & (y < 3.0), one, zero) / 6.0
        else:
            out = tl.minimum(tl.maximum(y + 3.0, 0.0), 6.0) / 6.0
    else:
        tl.static_assert(False, "unknown activation kind")
    return out


@triton.jit
def act(y, ACT: tl.constexpr):
    return activation(y, ACT, False)


@triton.jit
def act_grad(y, ACT: tl.constexpr):
    return activation(y, ACT, True)


# ----------------------------------------------------------------------------- BatchNorm

@triton.jit
def bn_coefficients(c, mc, mean_ptr, var_ptr, gamma_ptr, beta_ptr, eps,
                    HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr, ACC: tl.constexpr):
    """Per-channel mean, 1/std, gamma, beta in ACC (gamma 1, beta 0 when absent)."""
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
def bn_scale_shift(c, mc, mean_ptr, var_ptr, gamma_ptr, beta_ptr, eps,
                   HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr, ACC: tl.constexpr):
    """BN folded into y = x * scale + shift, per channel in ACC."""
    mean, invstd, gamma, beta = bn_coefficients(c, mc, mean_ptr, var_ptr, gamma_ptr, beta_ptr,
                                                eps, HAS_GAMMA, HAS_BETA, ACC)
    scale = gamma * invstd
    return scale, beta - mean * scale


@triton.jit
def bn_normalized(x, mean, invstd):
    """x̂ = (x - mean) / std of a [positions, channels] tile, per-channel mean and 1/std."""
    return (x - mean[None, :]) * invstd[None, :]


@triton.jit
def bn_grad_means(c, mc, sum_dy_ptr, sum_dy_xhat_ptr, count, ACC: tl.constexpr):
    """Per-channel mean dy and mean dy·x̂ over ``count`` values, from their sums."""
    mean_dy = tl.load(sum_dy_ptr + c, mask=mc, other=0.0).to(ACC) / count
    mean_dy_xhat = tl.load(sum_dy_xhat_ptr + c, mask=mc, other=0.0).to(ACC) / count
    return mean_dy, mean_dy_xhat


@triton.jit
def bn_batch_grad(dy, x_hat, mean_dy, mean_dy_xhat):
    """BN's input gradient in training, before its gamma / std scale: the output gradient dy
    less the batch statistics' own gradient (per channel mean dy + x̂ · mean dy·x̂). Eval
    skips this step; both then multiply by gamma / std."""
    return dy - mean_dy[None, :] - x_hat * mean_dy_xhat[None, :]


@triton.jit
def store_grad_partials(row, c, mc, C, g, x_hat):
    """One partial row [Σg | Σg·x̂] per channel of a tile: the BN-backward reductions."""
    tl.store(row + c, tl.sum(g, axis=0), mask=mc)
    tl.store(row + C + c, tl.sum(g * x_hat, axis=0), mask=mc)


@triton.jit
def chan_merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """(count, mean, M2) of two merged sets (Chan et al.): no E[x²]−E[x]² cancellation."""
    n_ab = n_a + n_b
    delta = mean_b - mean_a
    mean_a += delta * (n_b / n_ab)
    m2_a += m2_b + delta * delta * (n_a * n_b / n_ab)
    return n_ab, mean_a, m2_a
