// Math shared by the CPU (csrc/cpu) and CUDA (csrc/cuda) kernels, written once.
//
// Everything here is a __host__ __device__ inline function of scalars, so the CPU build
// (which runs in CI) exercises exactly the arithmetic the CUDA kernels use. `acc_t` is the
// accumulation type: float for float16/bfloat16/float32 data, double for float64.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define FM_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FM_HOST_DEVICE inline
#endif

namespace fused_mbconv {

// expf. On the host, a branch-free version that `omp simd` loops vectorize (a libm call
// stops them; ATen's own kernels use a vector exp the same way): Cody-Waite reduction to
// r in [-ln2/2, ln2/2], Cephes' degree-6 polynomial, scaled by 2^n built in the exponent bits;
// about 1 ulp. Arguments are clamped to [-87.3, 88] so 2^n stays a normal float: exp of
// anything below is FLT_MIN instead of a denormal, above 1.65e38 instead of up to inf, which
// leaves sigmoid and SiLU within an ulp of exact. NaN propagates. The clamp works on the bits:
// as a float select, GCC's PRE folds the saturated branch to a constant (silu(y) = y * 6e-39)
// that the vectorized loop computes for every lane, a denormal multiply, and the microcode
// assist made SiLU passes ~10x slower on AVX-512 (12 ms instead of 1 ms per 3.6M values).
FM_HOST_DEVICE float exp_(float v) {
#if defined(__CUDA_ARCH__)
  return expf(v);
#else
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  int32_t bits;
  memcpy(&bits, &v, sizeof(bits));
  const int32_t magnitude = bits & 0x7FFFFFFF;
  const int32_t bound = bits < 0 ? 0x42AEAC4F : 0x42B00000;  // 87.33654f below, 88.0f above
  const int32_t clamped =
      magnitude > 0x7F800000 ? magnitude : (magnitude < bound ? magnitude : bound);  // NaN kept
  bits = (bits & INT32_MIN) | clamped;
  memcpy(&v, &bits, sizeof(v));
  const float t = v * 1.44269504088896341f + kRound;
  const float n = t - kRound;
  const float r = (v - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  memcpy(&bits, &t, sizeof(bits));
  bits = (bits - 0x4B400000 + 127) << 23;  // n's integer value, biased, in the exponent field
  float scale;
  memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
#endif
}
FM_HOST_DEVICE double exp_(double v) { return exp(v); }

// a / b. On the GPU, without IEEE division's slow path: that path is a called subroutine, and
// the registers saved around the call show up as spills in every kernel that divides. float
// takes div.full.f32 (2 ulp over the full range, what Triton's `/` compiles to); double a
// reciprocal refined by two Newton steps and a final correction (within an ulp; infinite and
// zero divisors as IEEE). On the host, plain division.
FM_HOST_DEVICE float div_(float a, float b) {
#if defined(__CUDA_ARCH__)
  float q;
  asm("div.full.f32 %0, %1, %2;" : "=f"(q) : "f"(a), "f"(b));
  return q;
#else
  return a / b;
#endif
}
FM_HOST_DEVICE double div_(double a, double b) {
#if defined(__CUDA_ARCH__)
  double r;
  asm("rcp.approx.ftz.f64 %0, %1;" : "=d"(r) : "d"(b));
  if (r == 0.0 || isinf(r)) return a * r;  // b infinite or zero
  r = fma(r, fma(-b, r, 1.0), r);
  r = fma(r, fma(-b, r, 1.0), r);
  const double q = a * r;
  return fma(r, fma(-b, q, a), q);
#else
  return a / b;
#endif
}
FM_HOST_DEVICE float rsqrt_(float v) { return 1.0f / sqrtf(v); }
FM_HOST_DEVICE double rsqrt_(double v) { return 1.0 / sqrt(v); }

// ---- geometry: depthwise k x k, stride s, padding k / 2 ------------------------------------

FM_HOST_DEVICE int64_t conv_out_size(int64_t in, int k, int s) {
  return (in + 2 * (k / 2) - k) / s + 1;
}

// Outputs o whose input index o * s + offset lies in [0, in): [*lo, *hi). `offset` is
// tap - k / 2, so this is the range over which one tap of the stencil needs no bounds check.
FM_HOST_DEVICE void tap_range(int64_t in, int64_t out, int s, int64_t offset, int64_t* lo,
                              int64_t* hi) {
  int64_t first = offset >= 0 ? 0 : (-offset + s - 1) / s;
  int64_t last = in - 1 - offset;  // o * s <= last
  int64_t end = last < 0 ? 0 : last / s + 1;
  *lo = first < out ? first : out;
  *hi = end < out ? end : out;
  if (*hi < *lo) *hi = *lo;
}

// Outputs whose whole k-wide window lies inside the input: the intersection of every tap's range.
FM_HOST_DEVICE void interior_range(int64_t in, int64_t out, int k, int s, int64_t* lo,
                                   int64_t* hi) {
  int64_t lo_first, hi_first, lo_last, hi_last;
  tap_range(in, out, s, -(k / 2), &lo_first, &hi_first);
  tap_range(in, out, s, k - 1 - k / 2, &lo_last, &hi_last);
  *lo = lo_first > lo_last ? lo_first : lo_last;
  *hi = hi_first < hi_last ? hi_first : hi_last;
  if (*hi < *lo) *hi = *lo;
}

// One output element of the depthwise conv: the sum over taps (kh, kw) of
// in(hi0 + kh, wi0 + kw) * w[kh, kw], with hi0 = ho * s - k / 2 (likewise wi0), over the taps
// inside the H x W input (all of them when kCheck is false: the window is known to be inside).
// in(hi, wi) supplies the conv's input: a load, or a BatchNorm and activation built on load.
// `w` points at the channel's taps, stride ws apart. K > 0 fixes k at compile time (unrolled,
// vectorizable). I: the index type (32-bit in the GPU block kernels).
template <bool kCheck, int K, typename acc_t, typename InputAt, typename weight_t, typename I>
FM_HOST_DEVICE acc_t dw_stencil_at(const InputAt& in, I H, I W, const weight_t* w, int64_t ws,
                                   int k, I hi0, I wi0) {
  const int kk = K > 0 ? K : k;
  acc_t acc = 0;
  for (int kh = 0; kh < kk; ++kh) {
    const I hi = hi0 + kh;
    if (kCheck && (hi < 0 || hi >= H)) continue;
    for (int kw = 0; kw < kk; ++kw) {
      const I wi = wi0 + kw;
      if (kCheck && (wi < 0 || wi >= W)) continue;
      acc += in(hi, wi) * static_cast<acc_t>(w[(kh * kk + kw) * ws]);
    }
  }
  return acc;
}

// dw_stencil_at over the (n, c) plane x of a tensor with row/column strides sh/sw.
template <bool kCheck, int K, typename acc_t, typename scalar_t, typename weight_t>
FM_HOST_DEVICE acc_t dw_stencil(const scalar_t* x, int64_t sh, int64_t sw, int64_t H, int64_t W,
                                const weight_t* w, int64_t ws, int k, int64_t hi0, int64_t wi0) {
  const auto in = [&](int64_t hi, int64_t wi) { return static_cast<acc_t>(x[hi * sh + wi * sw]); };
  return dw_stencil_at<kCheck, K, acc_t>(in, H, W, w, ws, k, hi0, wi0);
}

// One element of the depthwise conv's input gradient (the transposed stencil):
// sum over taps whose output (ho, wo) = ((hi + p - kh) / s, (wi + p - kw) / s) exists of
// grad_at(ho, wo) * w[kh, kw]. grad_at supplies the conv-output gradient (read from a buffer on
// the CPU, recomputed from grad_out and conv_out on the GPU). kCheck = false only for stride 1
// inputs whose every tap lands inside the output.
template <bool kCheck, int K, int S, typename acc_t, typename GradAt, typename weight_t,
          typename I>
FM_HOST_DEVICE acc_t dw_input_grad(const GradAt& grad_at, const weight_t* w, int64_t ws, int k,
                                   int s, I Ho, I Wo, I hi, I wi) {
  const int kk = K > 0 ? K : k;
  const int ss = S > 0 ? S : s;
  const int p = kk / 2;
  acc_t acc = 0;
  for (int kh = 0; kh < kk; ++kh) {
    const I th = hi + p - kh;
    if (kCheck && (th < 0 || th % ss != 0 || th / ss >= Ho)) continue;
    for (int kw = 0; kw < kk; ++kw) {
      const I tw = wi + p - kw;
      if (kCheck && (tw < 0 || tw % ss != 0 || tw / ss >= Wo)) continue;
      acc += grad_at(th / ss, tw / ss) * static_cast<acc_t>(w[(kh * kk + kw) * ws]);
    }
  }
  return acc;
}

// ---- statistics: count, mean and sum of squared deviations, merged with Chan's formula -------

template <typename T>
struct Moments {
  T count, mean, m2;
};

// Welford's one-value update.
template <typename T>
FM_HOST_DEVICE Moments<T> moments_push(Moments<T> a, T v) {
  a.count += T(1);
  const T delta = v - a.mean;
  a.mean += div_(delta, a.count);
  a.m2 += delta * (v - a.mean);
  return a;
}

// Chan et al.'s pairwise merge: exact for partials of any sizes, no E[x^2] - E[x]^2 cancellation.
template <typename T>
FM_HOST_DEVICE Moments<T> moments_merge(Moments<T> a, Moments<T> b) {
  const T n = a.count + b.count;
  if (b.count == T(0)) return a;
  if (a.count == T(0)) return b;
  const T delta = b.mean - a.mean;
  const T wb = div_(b.count, n);
  return {n, a.mean + delta * wb, a.m2 + b.m2 + delta * delta * a.count * wb};
}

// ---- sigmoid, SiLU ------------------------------------------------------------------------

template <typename T>
FM_HOST_DEVICE T sigmoid(T y) {
  return div_(T(1), T(1) + exp_(-y));
}

template <typename T>
FM_HOST_DEVICE T silu(T y) {
  return y * sigmoid(y);
}

// d silu(y) / dy = sigmoid(y) * (1 + y * (1 - sigmoid(y))).
template <typename T>
FM_HOST_DEVICE T silu_grad(T y) {
  const T sg = sigmoid(y);
  return sg * (T(1) + y * (T(1) - sg));
}

template <typename T>
FM_HOST_DEVICE T clamp_(T v, T lo, T hi) {
  return v < lo ? lo : (v > hi ? hi : v);
}

}  // namespace fused_mbconv
