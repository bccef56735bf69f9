// CUDA kernels of dwconv_bn_silu_forward / _backward (the "cuda" backend).
//
// Forward, training: conv + per-(channel, slice) Welford partials (d written once) -> merge
// (Chan, fixed order) -> BN + SiLU apply. Eval: one kernel. Backward: BN/SiLU gradient
// reductions -> merge -> input gradient (transposed stencil, conv-output gradient recomputed
// per tap from grad_out and conv_out) and weight gradient (per-slice partials, merged in fixed
// order). Results are deterministic: no atomics. Layout (NCHW or channels_last) is handled
// through strides; the math is fused_mbconv/math.h, shared with the CPU kernels.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <array>
#include <tuple>

#include "fused_mbconv/bn.h"
#include "fused_mbconv/checks.h"
#include "fused_mbconv/cuda/reduce.cuh"
#include "fused_mbconv/cuda/runtime.cuh"
#include "fused_mbconv/host.h"
#include "fused_mbconv/math.h"

namespace fused_mbconv {
namespace cuda {
namespace {

constexpr int kTapGroup = 9;  // weight-gradient taps accumulated per pass (a whole 3x3)

struct Geometry {
  int64_t N, C, H, W, Ho, Wo;
  int k, s;
  // element strides of x (and grad_x) and of the conv output (out, conv_out, grad_out)
  int64_t xn, xc, xh, xw, on, oc, oh, ow;
};

Geometry geometry_of(const Tensor& x, int64_t k, int64_t stride) {
  const int kk = static_cast<int>(k), s = static_cast<int>(stride);
  Geometry g{x.size(0), x.size(1), x.size(2), x.size(3), conv_out_size(x.size(2), kk, s),
             conv_out_size(x.size(3), kk, s), kk, s};
  g.xn = x.stride(0), g.xc = x.stride(1), g.xh = x.stride(2), g.xw = x.stride(3);
  if (is_channels_last(x)) {
    g.oc = 1, g.ow = g.C, g.oh = g.Wo * g.C, g.on = g.Ho * g.Wo * g.C;
  } else {
    g.ow = 1, g.oh = g.Wo, g.oc = g.Ho * g.Wo, g.on = g.C * g.Ho * g.Wo;
  }
  return g;
}

// Position p in [0, N * Ho * Wo) of channel c -> the output element offset.
__device__ __forceinline__ void position(const Geometry& g, int64_t p, int64_t* n, int64_t* ho,
                                         int64_t* wo) {
  *wo = p % g.Wo;
  *ho = (p / g.Wo) % g.Ho;
  *n = p / (g.Wo * g.Ho);
}

// grid (C, slices). Training: d -> dst, Welford partials per (c, slice).
// Eval: out = SiLU(d * scale + shift) directly (d also stored when conv_out is kept).
template <bool kTrain, typename scalar_t>
__global__ void conv_forward_kernel(const scalar_t* __restrict__ x,
                                    const scalar_t* __restrict__ w, scalar_t* __restrict__ d,
                                    scalar_t* __restrict__ out,
                                    const at::opmath_type<scalar_t>* __restrict__ affine,
                                    Moments<at::opmath_type<scalar_t>>* __restrict__ partial,
                                    Geometry g) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t c = blockIdx.x;
  const int64_t positions = g.N * g.Ho * g.Wo;
  const int p = g.k / 2;
  const scalar_t* wc = w + c * g.k * g.k;
  Moments<acc_t> m{0, 0, 0};
  for (int64_t i = blockIdx.y * int64_t(blockDim.x) + threadIdx.x; i < positions;
       i += int64_t(gridDim.y) * blockDim.x) {
    int64_t n, ho, wo;
    position(g, i, &n, &ho, &wo);
    const acc_t v = dw_stencil<true, 0, acc_t>(x + n * g.xn + c * g.xc, g.xh, g.xw, g.H, g.W, wc,
                                               1, g.k, ho * g.s - p, wo * g.s - p);
    const scalar_t dv = static_cast<scalar_t>(v);
    const int64_t o = n * g.on + c * g.oc + ho * g.oh + wo * g.ow;
    if (d != nullptr) d[o] = dv;
    if (kTrain) {
      m = moments_push(m, static_cast<acc_t>(dv));
    } else {
      out[o] = static_cast<scalar_t>(silu(static_cast<acc_t>(dv) * affine[2 * c] + affine[2 * c + 1]));
    }
  }
  if (kTrain) {
    m = block_reduce(m);
    if (threadIdx.x == 0) partial[c * gridDim.y + blockIdx.y] = m;
  }
}

// One thread per channel: merge the slices' partials in order (training) or take the running
// statistics (eval), then the BN affine.
template <typename acc_t>
__global__ void finalize_stats_kernel(const Moments<acc_t>* __restrict__ partial, int slices,
                                      acc_t* __restrict__ mean, acc_t* __restrict__ var,
                                      const acc_t* __restrict__ gamma,
                                      const acc_t* __restrict__ beta, acc_t eps,
                                      acc_t* __restrict__ affine, int64_t C) {
  const int64_t c = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (c >= C) return;
  if (partial != nullptr) {
    Moments<acc_t> m = partial[c * slices];
    for (int i = 1; i < slices; ++i) m = moments_merge(m, partial[c * slices + i]);
    mean[c] = m.mean;
    var[c] = div_(m.m2, m.count);
  }
  const BnAffine<acc_t> a = bn_affine(mean[c], var[c], gamma[c], beta[c], eps);
  affine[2 * c] = a.scale;
  affine[2 * c + 1] = a.shift;
}

// Elementwise over the output in memory order.
template <typename scalar_t>
__global__ void bn_silu_apply_kernel(const scalar_t* __restrict__ d, scalar_t* __restrict__ out,
                                     const at::opmath_type<scalar_t>* __restrict__ affine,
                                     Geometry g) {
  const int64_t total = g.N * g.C * g.Ho * g.Wo;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = (i / g.oc) % g.C;
    out[i] = static_cast<scalar_t>(
        silu(static_cast<at::opmath_type<scalar_t>>(d[i]) * affine[2 * c] + affine[2 * c + 1]));
  }
}

// grid (C, slices): partial sums of g and g * x_hat per (c, slice).
template <typename scalar_t>
__global__ void grad_reduce_kernel(const scalar_t* __restrict__ go,
                                   const scalar_t* __restrict__ d,
                                   const BnSiluGrad<at::opmath_type<scalar_t>>* __restrict__ coef,
                                   Sums<at::opmath_type<scalar_t>, 2>* __restrict__ partial,
                                   Geometry g) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t c = blockIdx.x;
  const BnSiluGrad<acc_t> cf = coef[c];
  Sums<acc_t, 2> s{{0, 0}};
  for (int64_t i = blockIdx.y * int64_t(blockDim.x) + threadIdx.x; i < g.N * g.Ho * g.Wo;
       i += int64_t(gridDim.y) * blockDim.x) {
    int64_t n, ho, wo;
    position(g, i, &n, &ho, &wo);
    const int64_t o = n * g.on + c * g.oc + ho * g.oh + wo * g.ow;
    acc_t gg, xh;
    cf.terms(static_cast<acc_t>(d[o]), static_cast<acc_t>(go[o]), &gg, &xh);
    s.v[0] += gg;
    s.v[1] += gg * xh;
  }
  s = block_reduce(s);
  if (threadIdx.x == 0) partial[c * gridDim.y + blockIdx.y] = s;
}

// One thread per channel: grad_beta = sum g, grad_gamma = sum g * x_hat, and the means that
// the conv-output gradient subtracts in training.
template <typename acc_t>
__global__ void finalize_grad_kernel(const Sums<acc_t, 2>* __restrict__ partial, int slices,
                                     BnSiluGrad<acc_t>* __restrict__ coef,
                                     acc_t* __restrict__ grad_gamma,
                                     acc_t* __restrict__ grad_beta, acc_t count, bool training,
                                     int64_t C) {
  const int64_t c = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (c >= C) return;
  acc_t sg = 0, sgx = 0;
  for (int i = 0; i < slices; ++i) {
    sg += partial[c * slices + i].v[0];
    sgx += partial[c * slices + i].v[1];
  }
  grad_beta[c] = sg;
  grad_gamma[c] = sgx;
  if (training) {
    coef[c].mean_g = bn_grad_mean(sg, count);
    coef[c].mean_g_xhat = bn_grad_mean(sgx, count);
  }
}

// One thread per input element (memory order): the transposed stencil over the conv-output
// gradient, recomputed at each tap from grad_out and conv_out.
template <typename scalar_t>
__global__ void input_grad_kernel(const scalar_t* __restrict__ go, const scalar_t* __restrict__ d,
                                  const scalar_t* __restrict__ w,
                                  const BnSiluGrad<at::opmath_type<scalar_t>>* __restrict__ coef,
                                  scalar_t* __restrict__ gx, bool channels_last, Geometry g) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t total = g.N * g.C * g.H * g.W;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    int64_t n, c, hi, wi;
    if (channels_last) {
      c = i % g.C, wi = (i / g.C) % g.W, hi = (i / (g.C * g.W)) % g.H, n = i / (g.C * g.W * g.H);
    } else {
      wi = i % g.W, hi = (i / g.W) % g.H, c = (i / (g.W * g.H)) % g.C, n = i / (g.W * g.H * g.C);
    }
    const BnSiluGrad<acc_t> cf = coef[c];
    const int64_t base = n * g.on + c * g.oc;
    auto grad_at = [&](int64_t ho, int64_t wo) {
      const int64_t o = base + ho * g.oh + wo * g.ow;
      return cf.conv_grad(static_cast<acc_t>(d[o]), static_cast<acc_t>(go[o]));
    };
    gx[i] = static_cast<scalar_t>(dw_input_grad<true, 0, 0, acc_t>(
        grad_at, w + c * g.k * g.k, 1, g.k, g.s, g.Ho, g.Wo, hi, wi));
  }
}

// grid (C, slices): per-slice sums of gc * x for taps [tap0, tap0 + kTapGroup).
template <typename scalar_t>
__global__ void weight_grad_kernel(const scalar_t* __restrict__ go,
                                   const scalar_t* __restrict__ d,
                                   const scalar_t* __restrict__ x,
                                   const BnSiluGrad<at::opmath_type<scalar_t>>* __restrict__ coef,
                                   Sums<at::opmath_type<scalar_t>, kTapGroup>* __restrict__ partial,
                                   int tap0, Geometry g) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t c = blockIdx.x;
  const BnSiluGrad<acc_t> cf = coef[c];
  const int p = g.k / 2, kk = g.k * g.k;
  Sums<acc_t, kTapGroup> s;
#pragma unroll
  for (int j = 0; j < kTapGroup; ++j) s.v[j] = 0;
  for (int64_t i = blockIdx.y * int64_t(blockDim.x) + threadIdx.x; i < g.N * g.Ho * g.Wo;
       i += int64_t(gridDim.y) * blockDim.x) {
    int64_t n, ho, wo;
    position(g, i, &n, &ho, &wo);
    const int64_t o = n * g.on + c * g.oc + ho * g.oh + wo * g.ow;
    const acc_t gc = cf.conv_grad(static_cast<acc_t>(d[o]), static_cast<acc_t>(go[o]));
    const scalar_t* xc = x + n * g.xn + c * g.xc;
#pragma unroll
    for (int j = 0; j < kTapGroup; ++j) {
      const int tap = tap0 + j;
      if (tap >= kk) break;
      const int64_t hi = ho * g.s + tap / g.k - p, wi = wo * g.s + tap % g.k - p;
      if (hi >= 0 && hi < g.H && wi >= 0 && wi < g.W) {
        s.v[j] += gc * static_cast<acc_t>(xc[hi * g.xh + wi * g.xw]);
      }
    }
  }
  s = block_reduce(s);
  if (threadIdx.x == 0) partial[c * gridDim.y + blockIdx.y] = s;
}

// One thread per (channel, tap in the group): sum the slices in order.
template <typename acc_t>
__global__ void finalize_weight_grad_kernel(const Sums<acc_t, kTapGroup>* __restrict__ partial,
                                            int slices, int tap0, int kk,
                                            acc_t* __restrict__ gw, int64_t C) {
  const int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  const int64_t c = t / kTapGroup;
  const int j = static_cast<int>(t % kTapGroup);
  if (c >= C || tap0 + j >= kk) return;
  acc_t sum = 0;
  for (int i = 0; i < slices; ++i) sum += partial[c * slices + i].v[j];
  gw[c * kk + tap0 + j] = sum;
}

// Slices per channel: enough blocks to fill the GPU, at least one block's worth of positions each.
int slices_for(const Geometry& g) {
  const int64_t positions = g.N * g.Ho * g.Wo;
  const int64_t want = std::max<int64_t>(1, (int64_t(multiprocessor_count()) * 8 + g.C - 1) / g.C);
  const int64_t most = (positions + kThreads - 1) / kThreads;
  return static_cast<int>(std::min<int64_t>({want, most, 65535}));
}

Tensor bytes(int64_t n, const Tensor& like) {
  return at::empty({n}, like.options().dtype(at::kByte));
}

ForwardResult forward_cuda(const DwconvBnSiluForwardArgs& a) {
  const DeviceGuard guard(a.x.device());
  const Geometry g = geometry_of(a.x, a.weight.size(2), a.stride);
  const auto acc = accumulate_type(a.x.scalar_type());
  Tensor out = empty_like_input(a.x, {g.N, g.C, g.Ho, g.Wo});
  Tensor conv_out = a.need_conv_out ? at::empty_like(out) : a.x.new_empty({0});
  Tensor mean = a.training ? at::empty({g.C}, a.x.options().dtype(acc))
                         : a.running_mean->to(acc, false, /*copy=*/true);
  Tensor var = a.training ? at::empty({g.C}, a.x.options().dtype(acc))
                        : a.running_var->to(acc, false, /*copy=*/true);
  const Tensor gamma = channel_param(a.bn_weight, a.x, 1.0);
  const Tensor beta = channel_param(a.bn_bias, a.x, 0.0);
  Tensor affine = at::empty({2 * g.C}, a.x.options().dtype(acc));
  const int slices = slices_for(g);
  const dim3 channel_blocks(blocks_covering(g.C)), block(kThreads);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "dwconv_bn_silu_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const dim3 grid(static_cast<unsigned>(g.C), slices);
    scalar_t* d = a.need_conv_out ? conv_out.mutable_data_ptr<scalar_t>() : nullptr;
    auto finalize = [&](const Moments<acc_t>* partial) {
      launch("dwconv_bn_silu_finalize_stats", &finalize_stats_kernel<acc_t>, channel_blocks,
             block, 0, partial, slices, mean.mutable_data_ptr<acc_t>(),
             var.mutable_data_ptr<acc_t>(), gamma.const_data_ptr<acc_t>(),
             beta.const_data_ptr<acc_t>(), static_cast<acc_t>(a.eps),
             affine.mutable_data_ptr<acc_t>(), g.C);
    };
    if (!a.training) {
      finalize(nullptr);
      launch("dwconv_bn_silu", &conv_forward_kernel<false, scalar_t>, grid, block, 0,
             a.x.const_data_ptr<scalar_t>(), a.weight.const_data_ptr<scalar_t>(), d,
             out.mutable_data_ptr<scalar_t>(), affine.const_data_ptr<acc_t>(),
             static_cast<Moments<acc_t>*>(nullptr), g);
      return;
    }
    // Without need_conv_out, d lives in `out` and the apply runs in place.
    scalar_t* dst = d != nullptr ? d : out.mutable_data_ptr<scalar_t>();
    Tensor partial = bytes(g.C * slices * int64_t(sizeof(Moments<acc_t>)), a.x);
    auto* pp = reinterpret_cast<Moments<acc_t>*>(partial.mutable_data_ptr());
    launch("dwconv_stats", &conv_forward_kernel<true, scalar_t>, grid, block, 0,
           a.x.const_data_ptr<scalar_t>(), a.weight.const_data_ptr<scalar_t>(), dst,
           static_cast<scalar_t*>(nullptr), static_cast<const acc_t*>(nullptr), pp, g);
    finalize(pp);
    launch("bn_silu_apply", &bn_silu_apply_kernel<scalar_t>, dim3(blocks_for(out.numel())),
           block, 0, static_cast<const scalar_t*>(dst), out.mutable_data_ptr<scalar_t>(),
           affine.const_data_ptr<acc_t>(), g);
  });
  return {out, conv_out, mean, var};
}

BackwardResult backward_cuda(const DwconvBnSiluBackwardArgs& a) {
  const DeviceGuard guard(a.x.device());
  const Geometry g = geometry_of(a.x, a.weight.size(2), a.stride);
  const auto acc = accumulate_type(a.x.scalar_type());
  const Tensor gamma = channel_param(a.bn_weight, a.x, 1.0);
  const Tensor beta = channel_param(a.bn_bias, a.x, 0.0);
  const Tensor mean_c = a.mean.to(acc).contiguous(), invstd = (a.var.to(acc) + a.eps).rsqrt();
  Tensor ggamma = at::empty({g.C}, a.x.options().dtype(acc));
  Tensor gbeta = at::empty({g.C}, a.x.options().dtype(acc));
  Tensor gx = a.output_mask[0] ? at::empty_like(a.x) : a.x.new_empty({0});
  Tensor gw_acc =
      a.output_mask[1] ? at::empty({g.C * g.k * g.k}, a.x.options().dtype(acc)) : Tensor();
  const int slices = slices_for(g);
  const dim3 channel_blocks(blocks_covering(g.C)), block(kThreads);
  const int kk = g.k * g.k;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "dwconv_bn_silu_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // Per-channel constants, laid out as BnSiluGrad structs: mean, invstd, gamma, beta, 0, 0.
    static_assert(sizeof(BnSiluGrad<acc_t>) == 6 * sizeof(acc_t), "BnSiluGrad layout");
    Tensor coef = at::stack({mean_c, invstd, gamma, beta, at::zeros_like(gamma),
                             at::zeros_like(gamma)}, 1).contiguous();
    auto* cf = reinterpret_cast<BnSiluGrad<acc_t>*>(coef.mutable_data_ptr<acc_t>());
    const dim3 grid(static_cast<unsigned>(g.C), slices);
    const scalar_t* gop = a.grad_out.const_data_ptr<scalar_t>();
    const scalar_t* dp = a.conv_out.const_data_ptr<scalar_t>();
    Tensor partial = bytes(g.C * slices * int64_t(sizeof(Sums<acc_t, kTapGroup>)), a.x);
    auto* sums2 = reinterpret_cast<Sums<acc_t, 2>*>(partial.mutable_data_ptr());
    launch("bn_silu_grad_reduce", &grad_reduce_kernel<scalar_t>, grid, block, 0, gop, dp,
           static_cast<const BnSiluGrad<acc_t>*>(cf), sums2, g);
    launch("bn_silu_grad_finalize", &finalize_grad_kernel<acc_t>, channel_blocks, block, 0,
           static_cast<const Sums<acc_t, 2>*>(sums2), slices, cf,
           ggamma.mutable_data_ptr<acc_t>(), gbeta.mutable_data_ptr<acc_t>(),
           static_cast<acc_t>(g.N * g.Ho * g.Wo), a.training, g.C);
    if (a.output_mask[0]) {
      launch("dwconv_input_grad", &input_grad_kernel<scalar_t>, dim3(blocks_for(a.x.numel())),
             block, 0, gop, dp, a.weight.const_data_ptr<scalar_t>(),
             static_cast<const BnSiluGrad<acc_t>*>(cf), gx.mutable_data_ptr<scalar_t>(),
             is_channels_last(a.x), g);
    }
    if (a.output_mask[1]) {
      auto* sums = reinterpret_cast<Sums<acc_t, kTapGroup>*>(partial.mutable_data_ptr());
      for (int tap0 = 0; tap0 < kk; tap0 += kTapGroup) {
        launch("dwconv_weight_grad", &weight_grad_kernel<scalar_t>, grid, block, 0, gop, dp,
               a.x.const_data_ptr<scalar_t>(), static_cast<const BnSiluGrad<acc_t>*>(cf), sums,
               tap0, g);
        launch("dwconv_weight_grad_finalize", &finalize_weight_grad_kernel<acc_t>,
               dim3(blocks_covering(g.C * kTapGroup)), block, 0,
               static_cast<const Sums<acc_t, kTapGroup>*>(sums), slices, tap0, kk,
               gw_acc.mutable_data_ptr<acc_t>(), g.C);
      }
    }
  });
  const Tensor empty_acc = a.x.new_empty({0}, a.x.options().dtype(acc));
  const Tensor gw = a.output_mask[1] ? gw_acc.view(a.weight.sizes()).to(a.x.scalar_type())
                                     : a.x.new_empty({0});
  return {gx, gw, a.output_mask[2] ? ggamma : empty_acc,
          a.output_mask[3] ? gbeta : empty_acc.clone()};
}

}  // namespace
}  // namespace cuda
}  // namespace fused_mbconv

TORCH_LIBRARY_IMPL(fused_mbconv_ext, FM_CUDA_DISPATCH_KEY, m) {
  using fused_mbconv::cuda::kDeviceType;
  m.impl("dwconv_bn_silu_forward",
         &fused_mbconv::forward_entry<kDeviceType, fused_mbconv::cuda::forward_cuda>);
  m.impl("dwconv_bn_silu_backward",
         &fused_mbconv::backward_entry<kDeviceType, fused_mbconv::cuda::backward_cuda>);
}

// The launch record of runtime.cuh, for every kernel of this library (the CUDA kernels, or
// their CPU emulation; the C++ CPU kernels have no grids and no such ops).
TORCH_LIBRARY(fused_mbconv_cuda_launches, m) {
  m.def("start(bool dry_run, int multiprocessors) -> ()",
        &fused_mbconv::cuda::start_launch_record);
  m.def("stop() -> str", &fused_mbconv::cuda::stop_launch_record);
}
