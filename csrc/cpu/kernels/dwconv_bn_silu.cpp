// CPU kernels of dwconv_bn_silu_forward / _backward (the "cpu" backend).
//
// Work is split by (n, c) plane with at::parallel_for; the inner loops run along a row with
// `omp simd` and the shared stencil/BN/SiLU math of fused_mbconv/math.h. Statistics are exact
// per plane (two passes over the cache-resident plane) and merged across the batch in a fixed
// order with Chan's formula, so results do not depend on the thread count.
// channels_last inputs are computed through an NCHW copy (outputs come back channels_last).
#include "fused_mbconv/cpu/capability.h"  // the headers, outside the capability's target

namespace fused_mbconv::cpu::CPU_CAPABILITY {
namespace {

struct Geometry {
  int64_t N, C, H, W, Ho, Wo;
  int k, s;
  int64_t in_plane() const { return H * W; }
  int64_t out_plane() const { return Ho * Wo; }
};

Geometry geometry_of(const Tensor& x, int64_t k, int64_t stride) {
  const int kk = static_cast<int>(k), s = static_cast<int>(stride);
  return {x.size(0), x.size(1), x.size(2), x.size(3), conv_out_size(x.size(2), kk, s),
          conv_out_size(x.size(3), kk, s), kk, s};
}

// Calls f(integral_constant K, integral_constant S): k = 3 and 5 (EfficientNet's) unrolled,
// any other odd k at run time.
template <typename F>
void dispatch_kernel_size(int k, int s, F&& f) {
  auto with_s = [&](auto K) {
    if (s == 1) f(K, std::integral_constant<int, 1>{});
    else f(K, std::integral_constant<int, 2>{});
  };
  if (k == 3) with_s(std::integral_constant<int, 3>{});
  else if (k == 5) with_s(std::integral_constant<int, 5>{});
  else with_s(std::integral_constant<int, 0>{});
}

// One output row of `cols` values: value(checked, c) with checked = std::true_type (the
// stencil bounds-checks its taps) outside the interior columns [c_lo, c_hi) or on a row outside
// the interior rows, std::false_type (unchecked, vectorized) inside.
template <typename scalar_t, typename F>
void stencil_row(scalar_t* row, int64_t cols, bool interior_row, int64_t c_lo, int64_t c_hi,
                 const F& value) {
  if (!interior_row) c_lo = c_hi = cols;
  for (int64_t c = 0; c < c_lo; ++c) row[c] = static_cast<scalar_t>(value(std::true_type{}, c));
#pragma omp simd
  for (int64_t c = c_lo; c < c_hi; ++c) {
    row[c] = static_cast<scalar_t>(value(std::false_type{}, c));
  }
  for (int64_t c = c_hi; c < cols; ++c) row[c] = static_cast<scalar_t>(value(std::true_type{}, c));
}

// Depthwise conv of one NCHW plane into d (in the data dtype, like the saved conv_out).
template <int K, int S, typename acc_t, typename scalar_t>
void conv_plane(const scalar_t* x, const acc_t* w, scalar_t* d, const Geometry& g) {
  const int k = K > 0 ? K : g.k;
  const int p = k / 2;
  int64_t h_lo, h_hi, w_lo, w_hi;
  interior_range(g.H, g.Ho, k, S, &h_lo, &h_hi);
  interior_range(g.W, g.Wo, k, S, &w_lo, &w_hi);
  for (int64_t ho = 0; ho < g.Ho; ++ho) {
    const int64_t hi0 = ho * S - p;
    stencil_row(d + ho * g.Wo, g.Wo, ho >= h_lo && ho < h_hi, w_lo, w_hi,
                [&](auto checked, int64_t wo) {
                  return dw_stencil<decltype(checked)::value, K, acc_t>(x, g.W, 1, g.H, g.W, w, 1,
                                                                        k, hi0, wo * S - p);
                });
  }
}

// Exact moments of one plane: mean first, then squared deviations from it.
template <typename acc_t, typename scalar_t>
Moments<acc_t> plane_moments(const scalar_t* d, int64_t n) {
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += static_cast<acc_t>(d[i]);
  const acc_t mean = sum / static_cast<acc_t>(n);
  acc_t m2 = 0;
#pragma omp simd reduction(+ : m2)
  for (int64_t i = 0; i < n; ++i) {
    const acc_t t = static_cast<acc_t>(d[i]) - mean;
    m2 += t * t;
  }
  return {static_cast<acc_t>(n), mean, m2};
}

template <typename acc_t, typename scalar_t>
void bn_silu_plane(const scalar_t* d, scalar_t* out, int64_t n, BnAffine<acc_t> a) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    out[i] = static_cast<scalar_t>(silu(static_cast<acc_t>(d[i]) * a.scale + a.shift));
  }
}

template <typename scalar_t>
void forward_kernel(const Tensor& x, const Tensor& weight, const Tensor& gamma,
                    const Tensor& beta, Tensor& mean, Tensor& var, Tensor& out, Tensor& d,
                    bool training, double eps, const Geometry& g) {
  using acc_t = at::opmath_type<scalar_t>;
  const Tensor w_acc = weight.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const acc_t* wp = w_acc.const_data_ptr<acc_t>();
  scalar_t* dp = d.mutable_data_ptr<scalar_t>();
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  acc_t* meanp = mean.mutable_data_ptr<acc_t>();
  acc_t* varp = var.mutable_data_ptr<acc_t>();
  const acc_t* gp = gamma.const_data_ptr<acc_t>();
  const acc_t* bp = beta.const_data_ptr<acc_t>();
  const int64_t planes = g.N * g.C, kk = int64_t(g.k) * g.k;
  const int64_t in_plane = g.in_plane(), out_plane = g.out_plane();
  std::vector<BnAffine<acc_t>> affine(g.C);
  auto set_affine = [&](int64_t c) {
    affine[c] = bn_affine<acc_t>(meanp[c], varp[c], gp[c], bp[c], static_cast<acc_t>(eps));
  };

  dispatch_kernel_size(g.k, g.s, [&](auto K, auto S) {
    constexpr int kK = decltype(K)::value, kS = decltype(S)::value;
    if (!training) {  // one pass: conv, then BN + SiLU while the plane is in cache
      for (int64_t c = 0; c < g.C; ++c) set_affine(c);
      at::parallel_for(0, planes, 1, [&](int64_t begin, int64_t end) {
        for (int64_t p = begin; p < end; ++p) {
          const int64_t c = p % g.C;
          conv_plane<kK, kS>(xp + p * in_plane, wp + c * kk, dp + p * out_plane, g);
          bn_silu_plane(dp + p * out_plane, op + p * out_plane, out_plane, affine[c]);
        }
      });
      return;
    }
    std::vector<Moments<acc_t>> partial(planes);
    at::parallel_for(0, planes, 1, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        conv_plane<kK, kS>(xp + p * in_plane, wp + (p % g.C) * kk, dp + p * out_plane, g);
        partial[p] = plane_moments<acc_t>(dp + p * out_plane, out_plane);
      }
    });
    for (int64_t c = 0; c < g.C; ++c) {  // fixed merge order: deterministic
      Moments<acc_t> m = partial[c];
      for (int64_t n = 1; n < g.N; ++n) m = moments_merge(m, partial[n * g.C + c]);
      meanp[c] = m.mean;
      varp[c] = m.m2 / m.count;
      set_affine(c);
    }
    at::parallel_for(0, planes, 1, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        bn_silu_plane(dp + p * out_plane, op + p * out_plane, out_plane, affine[p % g.C]);
      }
    });
  });
}

ForwardResult forward_cpu(const DwconvBnSiluForwardArgs& a) {
  const auto format = memory_format_of(a.x);
  const Tensor x = a.x.contiguous();
  const Geometry g = geometry_of(x, a.weight.size(2), a.stride);
  const auto acc = accumulate_type(x.scalar_type());
  Tensor out = at::empty({g.N, g.C, g.Ho, g.Wo}, x.options());
  // Without need_conv_out the depthwise output lives in `out` and is overwritten in place.
  Tensor conv_out = a.need_conv_out ? at::empty_like(out) : out;
  Tensor mean = a.training ? at::empty({g.C}, x.options().dtype(acc))
                         : a.running_mean->to(acc, /*non_blocking=*/false, /*copy=*/true);
  Tensor var = a.training ? at::empty({g.C}, x.options().dtype(acc))
                        : a.running_var->to(acc, /*non_blocking=*/false, /*copy=*/true);
  const Tensor gamma = channel_param(a.bn_weight, x, 1.0), beta = channel_param(a.bn_bias, x, 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dwconv_bn_silu_cpu", [&] {
    forward_kernel<scalar_t>(x, a.weight, gamma, beta, mean, var, out, conv_out, a.training,
                             a.eps, g);
  });
  return {out.contiguous(format),
          a.need_conv_out ? conv_out.contiguous(format) : x.new_empty({0}), mean, var};
}

// ---- backward ----------------------------------------------------------------------------

// f(kh, kw, h0, h1, w0, w1) for each tap of a k x k stride-S kernel: outputs [h0, h1) x
// [w0, w1) are those whose tap (kh, kw) lands inside the input.
template <int S, typename F>
void for_each_tap(const Geometry& g, int k, const F& f) {
  const int p = k / 2;
  for (int kh = 0; kh < k; ++kh) {
    int64_t h0, h1;
    tap_range(g.H, g.Ho, S, kh - p, &h0, &h1);
    for (int kw = 0; kw < k; ++kw) {
      int64_t w0, w1;
      tap_range(g.W, g.Wo, S, kw - p, &w0, &w1);
      f(kh, kw, h0, h1, w0, w1);
    }
  }
}

// Input gradient of one NCHW plane from the plane's conv-output gradient gc.
// Stride 1: the transposed stencil (a gather, checks only at the borders).
// Stride 2: half the taps miss each input element, so scatter tap by tap instead: for each tap,
// the outputs in its tap_range add gc * w to input (o * 2 + offset), branch-free.
template <int K, int S, typename acc_t, typename scalar_t>
void input_grad_plane(const acc_t* gc, const acc_t* w, scalar_t* gx, acc_t* scratch,
                      const Geometry& g) {
  const int k = K > 0 ? K : g.k;
  const int p = k / 2;
  if (S != 1) {
    std::fill(scratch, scratch + g.in_plane(), acc_t(0));
    for_each_tap<S>(g, k, [&](int kh, int kw, int64_t h0, int64_t h1, int64_t w0, int64_t w1) {
      const acc_t wt = w[kh * k + kw];
      for (int64_t ho = h0; ho < h1; ++ho) {
        acc_t* dst = scratch + (ho * S + kh - p) * g.W + (kw - p);
        const acc_t* src = gc + ho * g.Wo;
#pragma omp simd
        for (int64_t wo = w0; wo < w1; ++wo) dst[wo * S] += src[wo] * wt;
      }
    });
#pragma omp simd
    for (int64_t i = 0; i < g.in_plane(); ++i) gx[i] = static_cast<scalar_t>(scratch[i]);
    return;
  }
  const int64_t h_lo = p, h_hi = std::max<int64_t>(p, g.Ho - p);
  const int64_t w_lo = std::min<int64_t>(p, g.W), w_hi = std::max<int64_t>(w_lo, g.Wo - p);
  auto at = [&](int64_t ho, int64_t wo) { return gc[ho * g.Wo + wo]; };
  for (int64_t hi = 0; hi < g.H; ++hi) {
    stencil_row(gx + hi * g.W, g.W, hi >= h_lo && hi < h_hi, w_lo, w_hi,
                [&](auto checked, int64_t wi) {
                  return dw_input_grad<decltype(checked)::value, K, 1, acc_t>(
                      at, w, 1, k, 1, g.Ho, g.Wo, hi, wi);
                });
  }
}

// Conv-weight gradient of one NCHW plane: for each tap, sum of gc * the input it multiplied.
template <int K, int S, typename acc_t, typename scalar_t>
void weight_grad_plane(const acc_t* gc, const scalar_t* x, acc_t* gw, const Geometry& g) {
  const int k = K > 0 ? K : g.k;
  const int p = k / 2;
  for_each_tap<S>(g, k, [&](int kh, int kw, int64_t h0, int64_t h1, int64_t w0, int64_t w1) {
    acc_t sum = 0;
    for (int64_t ho = h0; ho < h1; ++ho) {
      const scalar_t* xr = x + (ho * S + kh - p) * g.W + (kw - p);
      const acc_t* gr = gc + ho * g.Wo;
#pragma omp simd reduction(+ : sum)
      for (int64_t wo = w0; wo < w1; ++wo) sum += gr[wo] * static_cast<acc_t>(xr[wo * S]);
    }
    gw[kh * k + kw] = sum;
  });
}

template <typename scalar_t>
void backward_kernel(const Tensor& go, const Tensor& x, const Tensor& weight, const Tensor& d,
                     const Tensor& gamma, const Tensor& beta, const Tensor& mean,
                     const Tensor& var, bool training, double eps, const Geometry& g,
                     Tensor& gx, Tensor& gw, Tensor& ggamma, Tensor& gbeta) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto acc = c10::CppTypeToScalarType<acc_t>::value;
  const Tensor w_acc = weight.to(acc).contiguous();
  const Tensor mean_c = mean.to(acc).contiguous(), var_c = var.to(acc).contiguous();
  const scalar_t* gop = go.const_data_ptr<scalar_t>();
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* dp = d.const_data_ptr<scalar_t>();
  const acc_t* wp = w_acc.const_data_ptr<acc_t>();
  const int64_t planes = g.N * g.C, kk = int64_t(g.k) * g.k;
  const int64_t in_plane = g.in_plane(), out_plane = g.out_plane();

  std::vector<BnSiluGrad<acc_t>> coef(g.C);
  for (int64_t c = 0; c < g.C; ++c) {
    coef[c] = {mean_c.const_data_ptr<acc_t>()[c],
               bn_invstd(var_c.const_data_ptr<acc_t>()[c], static_cast<acc_t>(eps)),
               gamma.const_data_ptr<acc_t>()[c], beta.const_data_ptr<acc_t>()[c], 0, 0};
  }

  // Pass 1: per-plane sums of g and g * x_hat (BN's two backward reductions).
  std::vector<acc_t> partial(2 * planes);
  at::parallel_for(0, planes, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const BnSiluGrad<acc_t> cf = coef[p % g.C];
      const scalar_t* dr = dp + p * out_plane;
      const scalar_t* gr = gop + p * out_plane;
      acc_t sg = 0, sgx = 0;
#pragma omp simd reduction(+ : sg, sgx)
      for (int64_t i = 0; i < out_plane; ++i) {
        acc_t gg, xh;
        cf.terms(static_cast<acc_t>(dr[i]), static_cast<acc_t>(gr[i]), &gg, &xh);
        sg += gg;
        sgx += gg * xh;
      }
      partial[2 * p] = sg;
      partial[2 * p + 1] = sgx;
    }
  });
  acc_t* gbp = gbeta.mutable_data_ptr<acc_t>();
  acc_t* ggp = ggamma.mutable_data_ptr<acc_t>();
  const acc_t count = static_cast<acc_t>(g.N * out_plane);
  for (int64_t c = 0; c < g.C; ++c) {  // fixed order over the batch
    acc_t sg = 0, sgx = 0;
    for (int64_t n = 0; n < g.N; ++n) {
      sg += partial[2 * (n * g.C + c)];
      sgx += partial[2 * (n * g.C + c) + 1];
    }
    gbp[c] = sg;
    ggp[c] = sgx;
    if (training) {
      coef[c].mean_g = bn_grad_mean(sg, count);
      coef[c].mean_g_xhat = bn_grad_mean(sgx, count);
    }
  }
  if (!gx.defined() && !gw.defined()) return;

  // Pass 2: the conv-output gradient per plane (kept in a per-thread buffer), then the
  // transposed stencil for the input gradient and per-tap sums for the weight gradient.
  std::vector<acc_t> gw_partial(gw.defined() ? planes * kk : 0);
  scalar_t* gxp = gx.defined() ? gx.mutable_data_ptr<scalar_t>() : nullptr;
  dispatch_kernel_size(g.k, g.s, [&](auto K, auto S) {
    constexpr int kK = decltype(K)::value, kS = decltype(S)::value;
    at::parallel_for(0, planes, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> gc(out_plane), scratch(g.s == 1 ? 0 : in_plane);
      for (int64_t p = begin; p < end; ++p) {
        const int64_t c = p % g.C;
        const BnSiluGrad<acc_t> cf = coef[c];
        const scalar_t* dr = dp + p * out_plane;
        const scalar_t* gr = gop + p * out_plane;
        acc_t* gcp = gc.data();
#pragma omp simd
        for (int64_t i = 0; i < out_plane; ++i) {
          gcp[i] = cf.conv_grad(static_cast<acc_t>(dr[i]), static_cast<acc_t>(gr[i]));
        }
        if (gxp) {
          input_grad_plane<kK, kS>(gcp, wp + c * kk, gxp + p * in_plane, scratch.data(), g);
        }
        if (!gw_partial.empty()) {
          weight_grad_plane<kK, kS>(gcp, xp + p * in_plane, gw_partial.data() + p * kk, g);
        }
      }
    });
  });
  if (gw.defined()) {
    std::vector<acc_t> sum(g.C * kk, acc_t(0));
    for (int64_t n = 0; n < g.N; ++n) {
      for (int64_t i = 0; i < g.C * kk; ++i) sum[i] += gw_partial[n * g.C * kk + i];
    }
    scalar_t* gwp = gw.mutable_data_ptr<scalar_t>();
    for (int64_t i = 0; i < g.C * kk; ++i) gwp[i] = static_cast<scalar_t>(sum[i]);
  }
}

BackwardResult backward_cpu(const DwconvBnSiluBackwardArgs& a) {
  const auto format = memory_format_of(a.x);
  const Tensor x = a.x.contiguous(), go = a.grad_out.contiguous(), d = a.conv_out.contiguous();
  const Geometry g = geometry_of(x, a.weight.size(2), a.stride);
  const auto acc = accumulate_type(x.scalar_type());
  Tensor gx = a.output_mask[0] ? at::empty_like(x) : Tensor();
  Tensor gw = a.output_mask[1] ? at::empty_like(a.weight) : Tensor();
  Tensor ggamma = at::empty({g.C}, x.options().dtype(acc));
  Tensor gbeta = at::empty({g.C}, x.options().dtype(acc));
  const Tensor gamma = channel_param(a.bn_weight, x, 1.0);
  const Tensor beta = channel_param(a.bn_bias, x, 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dwconv_bn_silu_backward_cpu", [&] {
    backward_kernel<scalar_t>(go, x, a.weight, d, gamma, beta, a.mean, a.var, a.training, a.eps,
                              g, gx, gw, ggamma, gbeta);
  });
  const Tensor empty_acc = x.new_empty({0}, x.options().dtype(acc));
  return {a.output_mask[0] ? gx.contiguous(format) : x.new_empty({0}),
          a.output_mask[1] ? gw : x.new_empty({0}), a.output_mask[2] ? ggamma : empty_acc,
          a.output_mask[3] ? gbeta : empty_acc.clone()};
}

}  // namespace

void register_dwconv_bn_silu(torch::Library& m) {
  m.impl("dwconv_bn_silu_forward", &forward_entry<c10::DeviceType::CPU, forward_cpu>);
  m.impl("dwconv_bn_silu_backward", &backward_entry<c10::DeviceType::CPU, backward_cpu>);
}

}  // namespace fused_mbconv::cpu::CPU_CAPABILITY
