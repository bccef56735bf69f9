// BatchNorm's per-element math, written once for the CPU (csrc/cpu) and CUDA (csrc/cuda)
// kernels: the per-channel constants of the forward and the input gradient.
//
// Forward, per channel: y = v * scale + shift, x_hat = (v - mean) * invstd. Backward:
// dx = (dy - mean_dy - x_hat * mean_dy_xhat) * scale, where mean_dy and mean_dy_xhat are the
// means of dy and dy * x_hat over the channel's values in training (the gradient through the
// batch statistics) and 0 in eval.
#pragma once

#include "fused_mbconv/math.h"

namespace fused_mbconv {

// BN as one multiply-add per element: y = v * scale + shift.
template <typename T>
struct BnAffine {
  T scale, shift;
};

template <typename T>
FM_HOST_DEVICE BnAffine<T> bn_affine(T mean, T var, T gamma, T beta, T eps) {
  const T scale = gamma * rsqrt_(var + eps);
  return {scale, beta - mean * scale};
}

template <typename T>
FM_HOST_DEVICE T bn_invstd(T var, T eps) {
  return rsqrt_(var + eps);
}

// One channel's forward constants.
template <typename T>
struct BnConstants {
  T mean, invstd, scale, shift;
};

template <typename T>
FM_HOST_DEVICE BnConstants<T> bn_constants(T mean, T var, T gamma, T beta, T eps) {
  const BnAffine<T> a = bn_affine(mean, var, gamma, beta, eps);
  return {mean, bn_invstd(var, eps), a.scale, a.shift};
}

template <typename T>
FM_HOST_DEVICE T bn_xhat(T v, T mean, T invstd) {
  return (v - mean) * invstd;
}

// mean_dy or mean_dy_xhat of the backward from its sum over `count` values.
template <typename T>
FM_HOST_DEVICE T bn_grad_mean(T sum, T count) {
  return div_(sum, count);
}

// d loss / d v from dy = d loss / d y; scale = gamma * invstd.
template <typename T>
FM_HOST_DEVICE T bn_input_grad(T dy, T x_hat, T mean_dy, T mean_dy_xhat, T scale) {
  return (dy - mean_dy - x_hat * mean_dy_xhat) * scale;
}

// Per-channel constants of the backward of SiLU(BN(d)). The forward is recomputed from the
// saved depthwise output d: x_hat = (d - mean) * invstd, y = x_hat * gamma + beta.
template <typename T>
struct BnSiluGrad {
  T mean, invstd, gamma, beta;
  T mean_g, mean_g_xhat;  // training: sum(g) / count, sum(g * x_hat) / count; eval: 0

  // g = d loss / d y (the SiLU input) and x_hat, for the per-channel reductions.
  FM_HOST_DEVICE void terms(T d, T grad_out, T* g, T* x_hat) const {
    *x_hat = bn_xhat(d, mean, invstd);
    *g = grad_out * silu_grad(*x_hat * gamma + beta);
  }

  // d loss / d conv_out once the reductions are known.
  FM_HOST_DEVICE T conv_grad(T d, T grad_out) const {
    T g, x_hat;
    terms(d, grad_out, &g, &x_hat);
    return bn_input_grad(g, x_hat, mean_g, mean_g_xhat, gamma * invstd);
  }
};

}  // namespace fused_mbconv
