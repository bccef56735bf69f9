// CUDA kernels of the MBConv block's kernel interface (mbconv_*; fused_mbconv/reference.py
// specifies each function, docs/DESIGN.md gives the plan): the block on the "cuda"
// backend.
//
// The memory-bound work runs as fused passes of two kinds, one kernel source each: an
// elementwise map over an activation in memory order (map_kernel), and a per-channel or
// per-(image, channel) reduction that may also write elementwise outputs
// (channel_reduce_kernel, reduce.cuh). What a pass computes is a functor below; activations
// are template flags. The 1x1 convolutions run on cuDNN through ATen with the passes placed
// around them: K5 builds its operand act(BN2(d)) * gate in one pass, convolves, then takes
// BN3's statistics in one pass; the backward likewise, but for the weight gradients, our own
// GEMM (pointwise_wgrad.cuh: a grid sized to fill the GPU). The squeeze-excite FC layers are
// csrc/cuda/excite.cu. NCHW and channels_last are addressed in place (Plane). Reductions are
// deterministic: fixed-order trees and merges, no atomics.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <array>
#include <tuple>

#include "fused_mbconv/block_checks.h"
#include "fused_mbconv/bn.h"
#include "fused_mbconv/cuda/plane.cuh"
#include "fused_mbconv/cuda/pointwise_wgrad.cuh"
#include "fused_mbconv/cuda/reduce.cuh"
#include "fused_mbconv/cuda/runtime.cuh"
#include "fused_mbconv/host.h"
#include "fused_mbconv/math.h"

namespace fused_mbconv {
namespace cuda {
namespace {

constexpr int kTapGroup = 9;  // depthwise weight-gradient taps per pass (a whole 3x3)

ChannelTiling tiling_of(const Plane& p) { return channel_tiling(p.N, p.C, p.P, p.channels_last); }

Tensor acc_empty(const Tensor& x, at::IntArrayRef shape = {0}) {
  return at::empty(shape, x.options().dtype(accumulate_type(x.scalar_type())));
}

// An optional vector in the accumulate dtype of x, or undefined.
Tensor acc_vector(const OptTensor& t, const Tensor& x) {
  return given(t) ? t->to(accumulate_type(x.scalar_type())).contiguous() : Tensor();
}

template <typename T>
const T* maybe_ptr(const Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

// ---- the two pass kernels' launchers -------------------------------------------------------

// f(i, n, c) for every element of the activation `pl` describes, i its memory offset.
// grid (blocks per image, N).
template <typename F>
__global__ void map_kernel(Plane pl, F f) {
  const int n = blockIdx.y;
  const int64_t per_image = int64_t(pl.C) * pl.P;
  for (int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; j < per_image;
       j += int64_t(gridDim.x) * blockDim.x) {
    const int within = static_cast<int>(j);
    f(n * per_image + j, n, pl.channels_last ? within % pl.C : within / pl.P);
  }
}

template <typename F>
void map(const char* name, const Plane& pl, const F& f) {
  const int64_t per_image = int64_t(pl.C) * pl.P;
  const int64_t blocks = std::max<int64_t>(1, int64_t(blocks_for(per_image * pl.N)) / pl.N);
  const int64_t covering = (per_image + kThreads - 1) / kThreads;
  launch(name, &map_kernel<F>,
         dim3(static_cast<unsigned>(std::min(blocks, covering)), static_cast<unsigned>(pl.N)),
         dim3(kThreads), 0, pl, f);
}

// ---- per-channel BatchNorm constants -------------------------------------------------------

// One BatchNorm's per-channel constants as the passes apply them (bn.h): bn_constants' four,
// and a, b the means of dy and dy * x_hat of bn_input_grad (0 in eval). Device pointers into one
// (6, C) tensor.
template <typename T>
struct Norm {
  const T *mean, *invstd, *scale, *shift, *a, *b;
};

template <typename T>
__global__ void norm_kernel(int64_t C, const T* __restrict__ mean, const T* __restrict__ var,
                            const T* __restrict__ gamma, const T* __restrict__ beta, T eps,
                            const T* __restrict__ sum_dy, const T* __restrict__ sum_dy_xhat,
                            T count, T* __restrict__ out) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  const BnConstants<T> k = bn_constants(mean[c], var[c], gamma ? gamma[c] : T(1),
                                        beta ? beta[c] : T(0), eps);
  out[c] = k.mean;
  out[C + c] = k.invstd;
  out[2 * C + c] = k.scale;
  out[3 * C + c] = k.shift;
  out[4 * C + c] = sum_dy ? bn_grad_mean(sum_dy[c], count) : T(0);
  out[5 * C + c] = sum_dy_xhat ? bn_grad_mean(sum_dy_xhat[c], count) : T(0);
}

template <typename T>
struct NormBuffer {
  Tensor values;  // (6, C)
  Norm<T> view() const {
    const T* p = values.const_data_ptr<T>();
    const int64_t C = values.size(1);
    return {p, p + C, p + 2 * C, p + 3 * C, p + 4 * C, p + 5 * C};
  }
};

// The constants of a BN over x's channels; with the gradient sums (training backward), also
// a and b over `count` values.
template <typename T>
NormBuffer<T> norm_of(const Tensor& x, const Tensor& mean, const Tensor& var, const OptTensor& w,
                      const OptTensor& b, double eps, const Tensor* sum_dy = nullptr,
                      const Tensor* sum_dy_xhat = nullptr, int64_t count = 1) {
  const auto acc = c10::CppTypeToScalarType<T>::value;
  const int64_t C = x.size(1);
  const Tensor m = mean.to(acc).contiguous(), v = var.to(acc).contiguous();
  const Tensor g = acc_vector(w, x), be = acc_vector(b, x);
  const Tensor s = sum_dy ? sum_dy->to(acc).contiguous() : Tensor();
  const Tensor sx = sum_dy_xhat ? sum_dy_xhat->to(acc).contiguous() : Tensor();
  Tensor out = at::empty({6, C}, x.options().dtype(acc));
  launch("norm", &norm_kernel<T>, dim3(blocks_covering(C)), dim3(kThreads), 0, C,
         m.const_data_ptr<T>(), v.const_data_ptr<T>(), maybe_ptr<T>(g), maybe_ptr<T>(be),
         static_cast<T>(eps), maybe_ptr<T>(s), maybe_ptr<T>(sx), static_cast<T>(count),
         out.mutable_data_ptr<T>());
  return {out};
}

// ---- results of the reductions -------------------------------------------------------------

template <typename T>
struct MomentsOut {  // BN's batch mean and biased variance
  T *mean, *var;
  __device__ void operator()(int, int c, const Moments<T>& m) const {
    mean[c] = m.mean;
    var[c] = div_(m.m2, m.count);
  }
};

template <typename T>
struct SumsOut {  // (sum dy, sum dy * x_hat), one per channel
  T *first, *second;
  __device__ void operator()(int i, int, const Sums<T, 2>& s) const {
    first[i] = s.v[0];
    second[i] = s.v[1];
  }
};

// (sum dy, sum dy * x_hat) per channel of x: the two-value reduction `f` (a reduce_channels
// functor over x's plane) fills, as tensors in the accumulate dtype.
template <typename acc_t, typename F>
std::tuple<Tensor, Tensor> grad_sums(const char* name, const Tensor& x, const F& f) {
  const Plane p = plane_of(x);
  Tensor sum_dy = acc_empty(x, {p.C}), sum_dy_xhat = acc_empty(x, {p.C});
  reduce_channels<Sums<acc_t, 2>>(
      name, tiling_of(p), f, false,
      SumsOut<acc_t>{sum_dy.mutable_data_ptr<acc_t>(), sum_dy_xhat.mutable_data_ptr<acc_t>()}, x);
  return {sum_dy, sum_dy_xhat};
}

template <typename T>
struct ScaledOut {  // one per (image, channel): the squeeze's mean, the gate gradient
  T* out;
  T divisor;
  __device__ void operator()(int i, int, const Sums<T, 1>& s) const {
    out[i] = div_(s.v[0], divisor);
  }
};

template <typename T>
struct TapsOut {  // taps [tap0, tap0 + kTapGroup) of the depthwise weight gradient
  T* grad;
  int tap0, taps;
  __device__ void operator()(int, int c, const Sums<T, kTapGroup>& s) const {
    for (int j = 0; j < kTapGroup && tap0 + j < taps; ++j) {
      grad[int64_t(c) * taps + tap0 + j] = s.v[j];
    }
  }
};

template <typename scalar_t>
struct MomentsOf {
  const scalar_t* t;
  Plane tp;
  __device__ void operator()(int n, int c, int p,
                             Moments<at::opmath_type<scalar_t>>& m) const {
    push(m, static_cast<at::opmath_type<scalar_t>>(t[tp.at(n, c, p)]));
  }
};

// BN batch statistics of an activation, one pass.
std::tuple<Tensor, Tensor> moments_of(const Tensor& t) {
  const Plane p = plane_of(t);
  Tensor mean = acc_empty(t, {p.C}), var = acc_empty(t, {p.C});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "moments", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    reduce_channels<Moments<acc_t>>(
        "moments", tiling_of(p), MomentsOf<scalar_t>{t.const_data_ptr<scalar_t>(), p}, false,
        MomentsOut<acc_t>{mean.mutable_data_ptr<acc_t>(), var.mutable_data_ptr<acc_t>()}, t);
  });
  return {mean, var};
}

// ---- the 1x1 convolutions (cuDNN through ATen) ----------------------------------------------

// t (N, in, H, W) convolved with matrix (out, in), in `format`.
Tensor pointwise_conv(const Tensor& t, const Tensor& matrix, at::MemoryFormat format) {
  return at::conv2d(t, matrix.reshape({matrix.size(0), matrix.size(1), 1, 1})).contiguous(format);
}

// ---- K1 expand -----------------------------------------------------------------------------

std::tuple<Tensor, Tensor, Tensor> expand_forward(const Tensor& x, const Tensor& weight,
                                                  bool need_stats) {
  check_expand_forward(x, weight, kDeviceType);
  const DeviceGuard guard(x.device());
  const Tensor e = pointwise_conv(x, weight, memory_format_of(x));
  Tensor mean = acc_empty(x), var = acc_empty(x);
  if (need_stats) std::tie(mean, var) = moments_of(e);
  return {e, mean, var};
}

// ---- K2 depthwise forward ------------------------------------------------------------------

// What the depthwise passes share: the input h, the k x k weight and stride, the output's size,
// and BN1 (absent without expansion: the conv's input a1 is then h itself).
template <Act A, typename scalar_t>
struct DwInput {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* h;
  Plane hp;
  int H, W, Ho, Wo;
  const scalar_t* weight;  // (C, 1, k, k), contiguous
  int k, s;
  Norm<acc_t> bn1;
  bool with_bn1;

  // a1 = act(BN1(h)) at input row hi, column wi.
  __device__ acc_t a1(int n, int c, int hi, int wi) const {
    const acc_t v = static_cast<acc_t>(h[hp.at(n, c, hi * W + wi)]);
    return with_bn1 ? activate<A>(v * bn1.scale[c] + bn1.shift[c]) : v;
  }
  __device__ const scalar_t* taps(int c) const { return weight + int64_t(c) * k * k; }
};

// BN1's constants when the block expands (in_bn given), else empty.
template <typename acc_t>
NormBuffer<acc_t> in_norm(const Tensor& h, const OptTensor& mean, const OptTensor& var,
                          const OptTensor& w, const OptTensor& b, double eps) {
  return given(mean) ? norm_of<acc_t>(h, *mean, *var, w, b, eps) : NormBuffer<acc_t>{};
}

template <Act A, typename scalar_t>
DwInput<A, scalar_t> dw_input(const Tensor& h, const Tensor& weight, int64_t stride,
                              const Tensor& d, const NormBuffer<at::opmath_type<scalar_t>>& bn1) {
  const bool with_bn1 = bn1.values.defined();
  return {h.const_data_ptr<scalar_t>(), plane_of(h), static_cast<int>(h.size(2)),
          static_cast<int>(h.size(3)), static_cast<int>(d.size(2)), static_cast<int>(d.size(3)),
          weight.const_data_ptr<scalar_t>(), static_cast<int>(weight.size(2)),
          static_cast<int>(stride), with_bn1 ? bn1.view() : Norm<at::opmath_type<scalar_t>>{},
          with_bn1};
}

// d = the depthwise conv of a1, and d's moments.
template <Act A, typename scalar_t>
struct DwForward {
  DwInput<A, scalar_t> in;
  scalar_t* d;
  Plane dp;

  template <typename Acc>
  __device__ void operator()(int n, int c, int p, Acc& acc) const {
    using acc_t = at::opmath_type<scalar_t>;
    const int ho = p / in.Wo, wo = p % in.Wo, pad = in.k / 2;
    const auto a1 = [&](int hi, int wi) { return in.a1(n, c, hi, wi); };
    const scalar_t v = static_cast<scalar_t>(dw_stencil_at<true, 0, acc_t>(
        a1, in.H, in.W, in.taps(c), 1, in.k, ho * in.s - pad, wo * in.s - pad));
    d[dp.at(n, c, p)] = v;
    push(acc, static_cast<acc_t>(v));
  }
};

DwconvForwardResult dwconv_forward(const DwconvForwardArgs& a, const Act act) {
  const DeviceGuard guard(a.h.device());
  const Tensor weight = a.weight.contiguous();
  const int k = static_cast<int>(weight.size(2)), s = static_cast<int>(a.stride);
  const int64_t C = a.h.size(1);
  Tensor d = empty_like_input(
      a.h, {a.h.size(0), C, conv_out_size(a.h.size(2), k, s), conv_out_size(a.h.size(3), k, s)});
  Tensor mean = a.need_stats ? acc_empty(a.h, {C}) : acc_empty(a.h);
  Tensor var = a.need_stats ? acc_empty(a.h, {C}) : acc_empty(a.h);
  const Plane dp = plane_of(d);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.h.scalar_type(), "mbconv_dwconv", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto bn1 = in_norm<acc_t>(a.h, a.in_mean, a.in_var, a.in_weight, a.in_bias, a.in_eps);
    dispatch_activation(act, [&](auto A) {
      const DwForward<decltype(A)::value, scalar_t> f{
          dw_input<decltype(A)::value, scalar_t>(a.h, weight, a.stride, d, bn1),
          d.mutable_data_ptr<scalar_t>(), dp};
      if (a.need_stats) {
        reduce_channels<Moments<acc_t>>(
            "mbconv_dwconv", tiling_of(dp), f, false,
            MomentsOut<acc_t>{mean.mutable_data_ptr<acc_t>(), var.mutable_data_ptr<acc_t>()}, a.h);
      } else {
        reduce_channels<NoStats>("mbconv_dwconv", tiling_of(dp), f, false, NoStats{}, a.h);
      }
    });
  });
  return {d, mean, var};
}

// ---- K3 squeeze ----------------------------------------------------------------------------

template <Act A, typename scalar_t>
struct Squeeze {  // sums of a2 = act(BN2(d)) per (image, channel)
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* d;
  Plane dp;
  Norm<acc_t> bn2;
  __device__ void operator()(int n, int c, int p, Sums<acc_t, 1>& acc) const {
    push(acc, activate<A>(static_cast<acc_t>(d[dp.at(n, c, p)]) * bn2.scale[c] + bn2.shift[c]));
  }
};

Tensor squeeze_forward(const Tensor& d, const Tensor& mean, const Tensor& var,
                       const OptTensor& bn_weight, const OptTensor& bn_bias, double eps,
                       c10::string_view activation) {
  const Act act = check_squeeze_forward(d, mean, var, bn_weight, bn_bias, eps, activation,
                                        kDeviceType);
  const DeviceGuard guard(d.device());
  const Plane dp = plane_of(d);
  Tensor pooled = acc_empty(d, {dp.N, dp.C});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, d.scalar_type(), "mbconv_squeeze", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto bn2 = norm_of<acc_t>(d, mean, var, bn_weight, bn_bias, eps);
    dispatch_activation(act, [&](auto A) {
      reduce_channels<Sums<acc_t, 1>>(
          "mbconv_squeeze", tiling_of(dp),
          Squeeze<decltype(A)::value, scalar_t>{d.const_data_ptr<scalar_t>(), dp, bn2.view()},
          true, ScaledOut<acc_t>{pooled.mutable_data_ptr<acc_t>(), static_cast<acc_t>(dp.P)}, d);
    });
  });
  return pooled;
}

// ---- K5 project ----------------------------------------------------------------------------

template <Act A, typename scalar_t>
struct ProjectOperand {  // a3 = act(BN2(d)) * gate[n, c], in d's dtype and layout
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* d;
  Plane dp;
  Norm<acc_t> bn2;
  const acc_t* gate;  // (N, C), or null: no SE
  scalar_t* a3;
  __device__ void operator()(int64_t i, int n, int c) const {
    acc_t v = activate<A>(static_cast<acc_t>(d[i]) * bn2.scale[c] + bn2.shift[c]);
    if (gate) v *= gate[n * dp.C + c];
    a3[i] = static_cast<scalar_t>(v);
  }
};

Tensor project_operand(const Tensor& d, const OptTensor& gate, const Tensor& mean2,
                       const Tensor& var2, const OptTensor& w2, const OptTensor& b2, double eps2,
                       Act act) {
  Tensor a3 = at::empty_like(d);
  const Tensor g = acc_vector(gate, d);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, d.scalar_type(), "mbconv_project", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto bn2 = norm_of<acc_t>(d, mean2, var2, w2, b2, eps2);
    dispatch_activation(act, [&](auto A) {
      map("mbconv_project_operand", plane_of(d),
          ProjectOperand<decltype(A)::value, scalar_t>{d.const_data_ptr<scalar_t>(), plane_of(d),
                                                       bn2.view(), maybe_ptr<acc_t>(g),
                                                       a3.mutable_data_ptr<scalar_t>()});
    });
  });
  return a3;
}

ProjectForwardResult project_forward(const ProjectForwardArgs& a, const Act act) {
  const DeviceGuard guard(a.d.device());
  const Tensor operand = project_operand(a.d, a.gate, a.mean2, a.var2, a.w2, a.b2, a.eps2, act);
  const Tensor q = pointwise_conv(operand, a.weight, memory_format_of(a.d));
  Tensor mean = acc_empty(a.d), var = acc_empty(a.d);
  if (a.need_stats) std::tie(mean, var) = moments_of(q);
  return {q, mean, var};
}

// ---- K6 output -----------------------------------------------------------------------------

template <typename scalar_t>
struct Output {  // out = BN3(q) * sample_scale[n] + residual
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* q;
  Norm<acc_t> bn3;
  const acc_t* sample_scale;   // or null
  const scalar_t* residual;    // like q, or null
  scalar_t* out;
  __device__ void operator()(int64_t i, int n, int c) const {
    acc_t y = static_cast<acc_t>(q[i]) * bn3.scale[c] + bn3.shift[c];
    if (sample_scale) y *= sample_scale[n];
    if (residual) y += static_cast<acc_t>(residual[i]);
    out[i] = static_cast<scalar_t>(y);
  }
};

Tensor output_forward(const Tensor& q, const Tensor& mean3, const Tensor& var3,
                      const OptTensor& w3, const OptTensor& b3, double eps3,
                      const OptTensor& sample_scale, const OptTensor& residual) {
  check_output_forward(q, mean3, var3, w3, b3, eps3, sample_scale, residual, kDeviceType);
  const DeviceGuard guard(q.device());
  Tensor out = at::empty_like(q);
  const Tensor ss = acc_vector(sample_scale, q);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "mbconv_output", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto bn3 = norm_of<acc_t>(q, mean3, var3, w3, b3, eps3);
    map("mbconv_output", plane_of(q),
        Output<scalar_t>{q.const_data_ptr<scalar_t>(), bn3.view(),
                         maybe_ptr<acc_t>(ss),
                         given(residual) ? residual->const_data_ptr<scalar_t>() : nullptr,
                         out.mutable_data_ptr<scalar_t>()});
  });
  return out;
}

// ---- B6 output backward statistics ---------------------------------------------------------

template <typename scalar_t>
struct OutputGradSums {  // dy3 = grad_out * sample_scale[n]: sum dy3, sum dy3 * x_hat3
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* grad_out;
  const scalar_t* q;
  Plane qp;
  Norm<acc_t> bn3;
  const acc_t* sample_scale;
  __device__ void operator()(int n, int c, int p, Sums<acc_t, 2>& acc) const {
    const int64_t i = qp.at(n, c, p);
    const acc_t dy = static_cast<acc_t>(grad_out[i]) * (sample_scale ? sample_scale[n] : acc_t(1));
    push(acc, dy, dy * (static_cast<acc_t>(q[i]) - bn3.mean[c]) * bn3.invstd[c]);
  }
};

std::tuple<Tensor, Tensor> output_backward_stats(const Tensor& grad_out, const Tensor& q,
                                                 const Tensor& mean3, const Tensor& var3,
                                                 const OptTensor& w3, const OptTensor& b3,
                                                 double eps3, const OptTensor& sample_scale) {
  check_output_backward_stats(grad_out, q, mean3, var3, w3, b3, eps3, sample_scale, kDeviceType);
  const DeviceGuard guard(q.device());
  const Plane qp = plane_of(q);
  const Tensor ss = acc_vector(sample_scale, q);
  std::tuple<Tensor, Tensor> sums;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "mbconv_output_grad", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto bn3 = norm_of<acc_t>(q, mean3, var3, w3, b3, eps3);
    sums = grad_sums<acc_t>(
        "mbconv_output_grad_reduce", q,
        OutputGradSums<scalar_t>{grad_out.const_data_ptr<scalar_t>(), q.const_data_ptr<scalar_t>(),
                                 qp, bn3.view(), maybe_ptr<acc_t>(ss)});
  });
  return sums;
}

// ---- B5 project backward -------------------------------------------------------------------

template <typename scalar_t>
struct ProjectGradOut {  // gq = BN3 backward of dy3 = grad_out * sample_scale[n]
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* grad_out;
  const scalar_t* q;
  Norm<acc_t> bn3;
  const acc_t* sample_scale;
  scalar_t* gq;
  __device__ void operator()(int64_t i, int n, int c) const {
    const acc_t s = sample_scale ? sample_scale[n] : acc_t(1);
    const acc_t xh = bn_xhat(static_cast<acc_t>(q[i]), bn3.mean[c], bn3.invstd[c]);
    gq[i] = static_cast<scalar_t>(
        bn_input_grad(static_cast<acc_t>(grad_out[i]) * s, xh, bn3.a[c], bn3.b[c], bn3.scale[c]));
  }
};

// With SE: grad_a2 = grad_a3 * gate[n, c], the gate gradient sum_p grad_a3 * a2 per (image,
// channel), and (for the weight gradient) the operand a3 = a2 * gate, in one pass over d.
template <Act A, typename scalar_t>
struct GateGrad {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* grad_a3;
  const scalar_t* d;
  Plane dp;
  Norm<acc_t> bn2;
  const acc_t* gate;
  scalar_t* grad_a2;
  scalar_t* operand;  // or null
  __device__ void operator()(int n, int c, int p, Sums<acc_t, 1>& acc) const {
    const int64_t i = dp.at(n, c, p);
    const acc_t a2 = activate<A>(static_cast<acc_t>(d[i]) * bn2.scale[c] + bn2.shift[c]);
    const acc_t v = static_cast<acc_t>(grad_a3[i]), g = gate[n * dp.C + c];
    grad_a2[i] = static_cast<scalar_t>(v * g);
    push(acc, v * a2);
    if (operand) operand[i] = static_cast<scalar_t>(a2 * g);
  }
};

ProjectBackwardResult project_backward(const ProjectBackwardArgs& a, const Act act) {
  const DeviceGuard guard(a.d.device());
  const auto format = memory_format_of(a.d);
  const Plane dp = plane_of(a.d);
  const Tensor ss = acc_vector(a.sample_scale, a.d), g = acc_vector(a.gate, a.d);
  Tensor gq = at::empty_like(a.q);
  Tensor grad_a2 = a.d.new_empty({0}), grad_gate = acc_empty(a.d), grad_weight = a.d.new_empty({0});
  Tensor operand;  // a3, when the gate-gradient pass writes it
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.d.scalar_type(), "mbconv_project_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto bn3 = norm_of<acc_t>(a.q, a.mean3, a.var3, a.w3, a.b3, a.eps3,
                                    a.training ? &a.sum_dy3 : nullptr,
                                    a.training ? &a.sum_dy3_xhat3 : nullptr, dp.N * dp.P);
    map("mbconv_project_grad_out", plane_of(a.q),
        ProjectGradOut<scalar_t>{a.grad_out.const_data_ptr<scalar_t>(),
                                 a.q.const_data_ptr<scalar_t>(), bn3.view(), maybe_ptr<acc_t>(ss),
                                 gq.mutable_data_ptr<scalar_t>()});
    if (!a.output_mask[0]) return;
    const Tensor grad_a3 = pointwise_conv(gq, a.weight.t(), format);
    if (!g.defined()) {
      grad_a2 = grad_a3;
      return;
    }
    grad_a2 = at::empty_like(a.d);
    grad_gate = acc_empty(a.d, {dp.N, dp.C});
    if (a.output_mask[1]) operand = at::empty_like(a.d);
    const auto bn2 = norm_of<acc_t>(a.d, a.mean2, a.var2, a.w2, a.b2, a.eps2);
    dispatch_activation(act, [&](auto A) {
      reduce_channels<Sums<acc_t, 1>>(
          "mbconv_project_gate_grad", tiling_of(dp),
          GateGrad<decltype(A)::value, scalar_t>{
              grad_a3.const_data_ptr<scalar_t>(), a.d.const_data_ptr<scalar_t>(), dp, bn2.view(),
              g.const_data_ptr<acc_t>(), grad_a2.mutable_data_ptr<scalar_t>(),
              operand.defined() ? operand.mutable_data_ptr<scalar_t>() : nullptr},
          true, ScaledOut<acc_t>{grad_gate.mutable_data_ptr<acc_t>(), acc_t(1)}, a.d);
    });
  });
  if (a.output_mask[1]) {
    if (!operand.defined()) {
      operand = project_operand(a.d, a.gate, a.mean2, a.var2, a.w2, a.b2, a.eps2, act);
    }
    grad_weight = pointwise_weight_grad("mbconv_project_wgrad", gq, operand);
  }
  return {grad_a2, grad_gate, grad_weight};
}

// ---- B3 / B2 depthwise backward ------------------------------------------------------------

// dy2 = (grad_a2 + grad_pooled[n, c] / P) * act'(BN2(d)) and x_hat2 at element i.
template <Act A, typename scalar_t>
struct Dy2 {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* grad_a2;
  const acc_t* grad_pooled;  // (N, C), or null: no SE
  const scalar_t* d;
  Plane dp;
  Norm<acc_t> bn2;

  __device__ void at(int64_t i, int n, int c, acc_t* dy, acc_t* x_hat) const {
    const acc_t v = static_cast<acc_t>(d[i]);
    acc_t upstream = static_cast<acc_t>(grad_a2[i]);
    if (grad_pooled) upstream += div_(grad_pooled[n * dp.C + c], static_cast<acc_t>(dp.P));
    *dy = upstream * activate_grad<A>(v * bn2.scale[c] + bn2.shift[c]);
    *x_hat = bn_xhat(v, bn2.mean[c], bn2.invstd[c]);
  }
};

template <Act A, typename scalar_t>
struct Dy2Sums {
  using acc_t = at::opmath_type<scalar_t>;
  Dy2<A, scalar_t> dy2;
  __device__ void operator()(int n, int c, int p, Sums<acc_t, 2>& acc) const {
    acc_t dy, xh;
    dy2.at(dy2.dp.at(n, c, p), n, c, &dy, &xh);
    push(acc, dy, dy * xh);
  }
};

template <Act A, typename scalar_t>
Dy2<A, scalar_t> dy2_of(const Tensor& grad_a2, const Tensor& grad_pooled, const Tensor& d,
                        const NormBuffer<at::opmath_type<scalar_t>>& bn2) {
  return {grad_a2.const_data_ptr<scalar_t>(), maybe_ptr<at::opmath_type<scalar_t>>(grad_pooled),
          d.const_data_ptr<scalar_t>(), plane_of(d), bn2.view()};
}

std::tuple<Tensor, Tensor> dwconv_backward_stats(
    const Tensor& grad_a2, const OptTensor& grad_pooled, const Tensor& d, const Tensor& mean2,
    const Tensor& var2, const OptTensor& w2, const OptTensor& b2, double eps2,
    c10::string_view activation) {
  const Act act = check_dwconv_backward_stats(grad_a2, grad_pooled, d, mean2, var2, w2, b2, eps2,
                                              activation, kDeviceType);
  const DeviceGuard guard(d.device());
  const Tensor gp = acc_vector(grad_pooled, d);
  std::tuple<Tensor, Tensor> sums;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, d.scalar_type(), "mbconv_dwconv_grad_reduce", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto bn2 = norm_of<acc_t>(d, mean2, var2, w2, b2, eps2);
    dispatch_activation(act, [&](auto A) {
      constexpr Act kA = decltype(A)::value;
      sums = grad_sums<acc_t>("mbconv_dwconv_grad_reduce", d,
                              Dy2Sums<kA, scalar_t>{dy2_of<kA, scalar_t>(grad_a2, gp, d, bn2)});
    });
  });
  return sums;
}

// gd = BN2 backward of dy2, in the accumulate dtype: the stencils read each value k * k times.
template <Act A, typename scalar_t>
struct GradD {
  using acc_t = at::opmath_type<scalar_t>;
  Dy2<A, scalar_t> dy2;
  acc_t* gd;
  __device__ void operator()(int64_t i, int n, int c) const {
    acc_t dy, xh;
    dy2.at(i, n, c, &dy, &xh);
    const Norm<acc_t>& bn = dy2.bn2;
    gd[i] = bn_input_grad(dy, xh, bn.a[c], bn.b[c], bn.scale[c]);
  }
};

// The input gradient at each position of h: the transposed stencil over gd; with BN1,
// dy1 = grad_a1 * act'(BN1(h)) and BN1's gradient sums.
template <Act A, typename scalar_t>
struct DwInputGrad {
  using acc_t = at::opmath_type<scalar_t>;
  DwInput<A, scalar_t> in;
  const acc_t* gd;
  Plane dp;
  scalar_t* grad_h;

  template <typename Acc>
  __device__ void operator()(int n, int c, int p, Acc& acc) const {
    const int hi = p / in.W, wi = p % in.W;
    const auto grad_at = [&](int ho, int wo) { return gd[dp.at(n, c, ho * in.Wo + wo)]; };
    const acc_t sum = dw_input_grad<true, 0, 0, acc_t>(grad_at, in.taps(c), 1, in.k, in.s, in.Ho,
                                                       in.Wo, hi, wi);
    const int64_t i = in.hp.at(n, c, p);
    if (in.with_bn1) {
      const Norm<acc_t>& bn1 = in.bn1;
      const acc_t v = static_cast<acc_t>(in.h[i]);
      const acc_t dy1 = sum * activate_grad<A>(v * bn1.scale[c] + bn1.shift[c]);
      grad_h[i] = static_cast<scalar_t>(dy1);
      push(acc, dy1, dy1 * (v - bn1.mean[c]) * bn1.invstd[c]);
    } else {
      grad_h[i] = static_cast<scalar_t>(sum);
    }
  }
};

// Taps [tap0, tap0 + kTapGroup) of the weight gradient at one output position: gd * a1.
template <Act A, typename scalar_t>
struct DwWeightGrad {
  using acc_t = at::opmath_type<scalar_t>;
  DwInput<A, scalar_t> in;
  const acc_t* gd;
  Plane dp;
  int tap0;

  __device__ void operator()(int n, int c, int p, Sums<acc_t, kTapGroup>& acc) const {
    const int ho = p / in.Wo, wo = p % in.Wo, pad = in.k / 2;
    const acc_t g = gd[dp.at(n, c, p)];
#pragma unroll
    for (int j = 0; j < kTapGroup; ++j) {
      const int tap = tap0 + j;
      if (tap >= in.k * in.k) break;
      const int hi = ho * in.s - pad + tap / in.k, wi = wo * in.s - pad + tap % in.k;
      if (hi < 0 || hi >= in.H || wi < 0 || wi >= in.W) continue;
      acc.v[j] += g * in.a1(n, c, hi, wi);
    }
  }
};

DwconvBackwardResult dwconv_backward(const DwconvBackwardArgs& a, const Act act) {
  const DeviceGuard guard(a.h.device());
  const Tensor weight = a.weight.contiguous();
  const int taps = static_cast<int>(weight.size(2) * weight.size(3));
  const Plane hp = plane_of(a.h), dp = plane_of(a.d);
  const bool with_bn1 = given(a.in_mean);
  Tensor grad_h = a.h.new_empty({0}), grad_w = a.h.new_empty({0});
  Tensor sum_dy1 = acc_empty(a.h), sum_dy1_xhat1 = acc_empty(a.h);
  if (!a.output_mask[0] && !a.output_mask[1]) return {grad_h, grad_w, sum_dy1, sum_dy1_xhat1};
  const Tensor gp = acc_vector(a.grad_pooled, a.d);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.h.scalar_type(), "mbconv_dwconv_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto bn2 = norm_of<acc_t>(a.d, a.mean2, a.var2, a.w2, a.b2, a.eps2,
                                    a.training ? &a.sum_dy2 : nullptr,
                                    a.training ? &a.sum_dy2_xhat2 : nullptr, dp.N * dp.P);
    const auto bn1 = in_norm<acc_t>(a.h, a.in_mean, a.in_var, a.in_weight, a.in_bias, a.in_eps);
    Tensor gd = at::empty_like(a.d, a.d.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    acc_t* gdp = gd.mutable_data_ptr<acc_t>();
    dispatch_activation(act, [&](auto A) {
      constexpr Act kA = decltype(A)::value;
      const auto in = dw_input<kA, scalar_t>(a.h, weight, a.stride, a.d, bn1);
      map("mbconv_dwconv_grad_d", dp,
          GradD<kA, scalar_t>{dy2_of<kA, scalar_t>(a.grad_a2, gp, a.d, bn2), gdp});
      if (a.output_mask[0]) {
        grad_h = at::empty_like(a.h);
        const DwInputGrad<kA, scalar_t> f{in, gdp, dp, grad_h.mutable_data_ptr<scalar_t>()};
        if (with_bn1) {
          std::tie(sum_dy1, sum_dy1_xhat1) = grad_sums<acc_t>("mbconv_dwconv_dgrad", a.h, f);
        } else {
          reduce_channels<NoStats>("mbconv_dwconv_dgrad", tiling_of(hp), f, false, NoStats{}, a.h);
        }
      }
      if (a.output_mask[1]) {
        Tensor grad_acc = acc_empty(a.h, {hp.C * taps});
        for (int tap0 = 0; tap0 < taps; tap0 += kTapGroup) {
          reduce_channels<Sums<acc_t, kTapGroup>>(
              "mbconv_dwconv_wgrad", tiling_of(dp),
              DwWeightGrad<kA, scalar_t>{in, gdp, dp, tap0}, false,
              TapsOut<acc_t>{grad_acc.mutable_data_ptr<acc_t>(), tap0, taps}, a.h);
        }
        grad_w = grad_acc.view(weight.sizes()).to(a.h.scalar_type());
      }
    });
  });
  return {grad_h, grad_w, sum_dy1, sum_dy1_xhat1};
}

// ---- B1 expand backward --------------------------------------------------------------------

template <typename scalar_t>
struct ExpandGrad {  // ge = BN1 backward of grad_y1
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* grad_y1;
  const scalar_t* e;
  Norm<acc_t> bn1;
  scalar_t* ge;
  __device__ void operator()(int64_t i, int, int c) const {
    const acc_t xh = bn_xhat(static_cast<acc_t>(e[i]), bn1.mean[c], bn1.invstd[c]);
    ge[i] = static_cast<scalar_t>(
        bn_input_grad(static_cast<acc_t>(grad_y1[i]), xh, bn1.a[c], bn1.b[c], bn1.scale[c]));
  }
};

ExpandBackwardResult expand_backward(const ExpandBackwardArgs& a) {
  const DeviceGuard guard(a.x.device());
  const Plane ep = plane_of(a.e);
  Tensor ge = at::empty_like(a.e);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "mbconv_expand_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto bn1 = norm_of<acc_t>(a.e, a.mean1, a.var1, a.w1, a.b1, a.eps1,
                                    a.training ? &a.sum_dy1 : nullptr,
                                    a.training ? &a.sum_dy1_xhat1 : nullptr, ep.N * ep.P);
    map("mbconv_expand_grad", ep,
        ExpandGrad<scalar_t>{a.grad_y1.const_data_ptr<scalar_t>(), a.e.const_data_ptr<scalar_t>(),
                             bn1.view(), ge.mutable_data_ptr<scalar_t>()});
  });
  Tensor grad_x = a.x.new_empty({0}), grad_w = a.x.new_empty({0});
  if (a.output_mask[0]) {
    grad_x = pointwise_conv(ge, a.weight.t(), memory_format_of(a.x));
    if (given(a.grad_residual)) grad_x.add_(*a.grad_residual);
  }
  if (a.output_mask[1]) grad_w = pointwise_weight_grad("mbconv_expand_wgrad", ge, a.x);
  return {grad_x, grad_w};
}

}  // namespace
}  // namespace cuda
}  // namespace fused_mbconv

TORCH_LIBRARY_IMPL(fused_mbconv_ext, FM_CUDA_DISPATCH_KEY, m) {
  using fused_mbconv::cuda::kDeviceType;
  m.impl("mbconv_expand_forward", &fused_mbconv::cuda::expand_forward);
  m.impl("mbconv_dwconv_forward",
         &fused_mbconv::dwconv_forward_entry<kDeviceType, fused_mbconv::cuda::dwconv_forward>);
  m.impl("mbconv_squeeze_forward", &fused_mbconv::cuda::squeeze_forward);
  m.impl("mbconv_project_forward",
         &fused_mbconv::project_forward_entry<kDeviceType, fused_mbconv::cuda::project_forward>);
  m.impl("mbconv_output_forward", &fused_mbconv::cuda::output_forward);
  m.impl("mbconv_output_backward_stats", &fused_mbconv::cuda::output_backward_stats);
  m.impl("mbconv_project_backward",
         &fused_mbconv::project_backward_entry<kDeviceType, fused_mbconv::cuda::project_backward>);
  m.impl("mbconv_dwconv_backward_stats", &fused_mbconv::cuda::dwconv_backward_stats);
  m.impl("mbconv_dwconv_backward",
         &fused_mbconv::dwconv_backward_entry<kDeviceType, fused_mbconv::cuda::dwconv_backward>);
  m.impl("mbconv_expand_backward",
         &fused_mbconv::expand_backward_entry<kDeviceType, fused_mbconv::cuda::expand_backward>);
}
