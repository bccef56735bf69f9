// CPU kernels of the MBConv block's kernel interface (mbconv_*; fused_mbconv/reference.py is the
// specification of each function, FUSION.md the plan).
//
// Everything runs on NHWC rows: an activation is (N * H * W, C), channels fastest, so the
// per-channel BN / activation constants are vectors the inner `omp simd` loops stream alongside
// the data, and the 1x1 convolutions are plain GEMMs (ATen's at::mm) on (rows, C) views.
// channels_last inputs are used in place; NCHW inputs go through one channels_last copy and
// outputs come back NCHW. The elementwise work around each GEMM is one fused pass: K5 builds its
// A operand act(BN2(d)) * gate in one pass into a buffer, then one GEMM, then BN3's statistics
// in one pass over the GEMM output; the backward likewise.
//
// Work is split into fixed chunks of positions (never straddling an image; sizes depend on the
// shape only), each writing its own partial sums / moments, merged in chunk order (Chan's
// formula for moments): results do not depend on the thread count, except the 1x1
// convolutions' (oneDNN's, as eager Conv2d's), which are reproducible at a given thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <memory>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "fused_mbconv/block_checks.h"
#include "fused_mbconv/host.h"
#include "fused_mbconv/math.h"

namespace fused_mbconv {
namespace {

using at::MemoryFormat;
constexpr auto kCPU = c10::DeviceType::CPU;
constexpr int64_t kChunkElems = 16384;  // elements per chunk: L2-resident, shape-determined
constexpr int64_t kBandRows = 4;        // output rows per depthwise work item

// f(scalar_t{}) for the activation dtype (a function, not AT_DISPATCH: the kernels' bodies hold
// pragmas, which macro arguments cannot).
template <typename F>
void dispatch_dtype(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat: return f(float{});
    case at::kDouble: return f(double{});
    case at::kHalf: return f(at::Half{});
    case at::kBFloat16: return f(at::BFloat16{});
    default: TORCH_CHECK_TYPE(false, "fused_mbconv: unsupported dtype ", t);
  }
}

// An activation as NHWC rows (channels_last; an NCHW input is copied once).
struct Map {
  Tensor t;
  int64_t N, C, H, W;
  int64_t P() const { return H * W; }
  int64_t rows() const { return N * H * W; }
  Tensor rows2d() const { return t.permute({0, 2, 3, 1}).reshape({rows(), C}); }
  template <typename T>
  const T* data() const { return t.const_data_ptr<T>(); }
};

Map nhwc(const Tensor& x) {
  return {x.contiguous(MemoryFormat::ChannelsLast), x.size(0), x.size(1), x.size(2), x.size(3)};
}

// (N, C, H, W) with channels_last storage, from an (N * H * W, C) row matrix.
Tensor as_map(const Tensor& rows2d, int64_t N, int64_t H, int64_t W) {
  return rows2d.view({N, H, W, rows2d.size(1)}).permute({0, 3, 1, 2});
}

// rows2d (N * H * W, Cin) times matrix^T, matrix (Cout, Cin): the 1x1 convolution, as rows. It
// runs as at::conv2d on the channels_last view (no copy), which oneDNN serves ~2x faster than
// at::mm's sgemm for these tall-skinny shapes (B0 stage 2, 2 AVX-512 cores: 2.3 vs 5.2 ms).
Tensor pointwise_conv(const Tensor& rows2d, const Tensor& matrix, int64_t N, int64_t H,
                      int64_t W) {
  const Tensor out = at::conv2d(as_map(rows2d, N, H, W),
                                matrix.reshape({matrix.size(0), matrix.size(1), 1, 1}));
  return out.permute({0, 2, 3, 1}).reshape({N * H * W, matrix.size(0)});
}

Tensor empty_rows(const Tensor& like, int64_t rows, int64_t C, at::ScalarType dtype) {
  return at::empty({rows, C}, like.options().dtype(dtype));
}

Tensor acc_empty(const Tensor& x, at::IntArrayRef shape = {0}) {
  return at::empty(shape, x.options().dtype(accumulate_type(x.scalar_type())));
}

// Per-channel constants of one BN: y = v * scale + shift, x_hat = (v - mean) * invstd.
template <typename acc_t>
struct Norm {
  std::vector<acc_t> mean, invstd, scale, shift;
};

template <typename acc_t>
Norm<acc_t> norm_of(const Tensor& x, const Tensor& mean, const Tensor& var, const OptTensor& w,
                    const OptTensor& b, double eps) {
  const auto acc = c10::CppTypeToScalarType<acc_t>::value;
  const Tensor m = mean.to(acc).contiguous(), v = var.to(acc).contiguous();
  const Tensor g = channel_param(w, x, 1.0), be = channel_param(b, x, 0.0);
  const int64_t C = x.size(1);
  Norm<acc_t> n{std::vector<acc_t>(C), std::vector<acc_t>(C), std::vector<acc_t>(C),
                std::vector<acc_t>(C)};
  for (int64_t c = 0; c < C; ++c) {
    n.mean[c] = m.const_data_ptr<acc_t>()[c];
    n.invstd[c] = rsqrt_(v.const_data_ptr<acc_t>()[c] + static_cast<acc_t>(eps));
    const BnAffine<acc_t> a = bn_affine<acc_t>(n.mean[c], v.const_data_ptr<acc_t>()[c],
                                               g.const_data_ptr<acc_t>()[c],
                                               be.const_data_ptr<acc_t>()[c],
                                               static_cast<acc_t>(eps));
    n.scale[c] = a.scale;
    n.shift[c] = a.shift;
  }
  return n;
}

// BN backward as dx = (dy - a - x_hat * b) * gi; in training a, b are the means of dy and
// dy * x_hat (the batch statistics' own gradient), in eval 0.
template <typename acc_t>
struct NormGrad {
  std::vector<acc_t> a, b;
  const std::vector<acc_t>& gi;
};

template <typename acc_t>
NormGrad<acc_t> norm_grad_of(const Norm<acc_t>& n, const Tensor& sum_dy,
                             const Tensor& sum_dy_xhat, int64_t count, bool training) {
  const auto acc = c10::CppTypeToScalarType<acc_t>::value;
  const int64_t C = static_cast<int64_t>(n.mean.size());
  NormGrad<acc_t> g{std::vector<acc_t>(C, 0), std::vector<acc_t>(C, 0), n.scale};
  if (training) {
    const Tensor s = sum_dy.to(acc).contiguous(), sx = sum_dy_xhat.to(acc).contiguous();
    for (int64_t c = 0; c < C; ++c) {
      g.a[c] = s.const_data_ptr<acc_t>()[c] / static_cast<acc_t>(count);
      g.b[c] = sx.const_data_ptr<acc_t>()[c] / static_cast<acc_t>(count);
    }
  }
  return g;
}

// ---- work chunks and their deterministic merges ---------------------------------------------

struct Chunks {
  int64_t N, P, len, per_image;
  Chunks(int64_t n, int64_t p, int64_t l)
      : N(n), P(p), len(std::max<int64_t>(1, l)), per_image((p + len - 1) / len) {}
  int64_t count() const { return N * per_image; }
  int64_t size(int64_t i) const {
    const int64_t p0 = (i % per_image) * len;
    return std::min(p0 + len, P) - p0;
  }
};

Chunks position_chunks(int64_t N, int64_t P, int64_t C) { return Chunks(N, P, kChunkElems / C); }

// f(n, p0, p1, partial) for every chunk, in parallel; partial: `width` zeroed values per chunk.
template <typename acc_t, typename F>
std::vector<acc_t> for_chunks(const Chunks& ch, int64_t width, const F& f) {
  std::vector<acc_t> partial(ch.count() * width, acc_t(0));
  at::parallel_for(0, ch.count(), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t n = i / ch.per_image, p0 = (i % ch.per_image) * ch.len;
      f(n, p0, std::min(p0 + ch.len, ch.P), partial.data() + i * width);
    }
  });
  return partial;
}

// Chunk partials summed in chunk order, per image ((N, width) into `out`) or over all (width).
template <typename acc_t>
void sum_chunks(const std::vector<acc_t>& partial, const Chunks& ch, int64_t width,
                bool per_image, acc_t* out) {
  std::fill(out, out + (per_image ? ch.N : 1) * width, acc_t(0));
  for (int64_t i = 0; i < ch.count(); ++i) {
    acc_t* dst = per_image ? out + (i / ch.per_image) * width : out;
    const acc_t* src = partial.data() + i * width;
    for (int64_t j = 0; j < width; ++j) dst[j] += src[j];
  }
}

// Exact moments of a (rows, C) block: out[0, C) = mean, out[C, 2C) = sum of squared deviations.
template <typename acc_t, typename scalar_t>
void block_moments(const scalar_t* p, int64_t rows, int64_t C, acc_t* out) {
  acc_t* mean = out;
  acc_t* m2 = out + C;
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* row = p + r * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) mean[c] += static_cast<acc_t>(row[c]);
  }
  const acc_t inv = acc_t(1) / static_cast<acc_t>(rows);
  for (int64_t c = 0; c < C; ++c) mean[c] *= inv;
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* row = p + r * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const acc_t t = static_cast<acc_t>(row[c]) - mean[c];
      m2[c] += t * t;
    }
  }
}

// Chan merge of per-chunk block_moments in chunk order: BN's batch mean and biased variance.
template <typename acc_t>
void merge_moments(const std::vector<acc_t>& partial, const Chunks& ch, int64_t C, Tensor& mean,
                   Tensor& var) {
  std::vector<Moments<acc_t>> m(C, Moments<acc_t>{0, 0, 0});
  for (int64_t i = 0; i < ch.count(); ++i) {
    const acc_t* src = partial.data() + i * 2 * C;
    const acc_t count = static_cast<acc_t>(ch.size(i));
    for (int64_t c = 0; c < C; ++c) m[c] = moments_merge(m[c], {count, src[c], src[C + c]});
  }
  acc_t* mp = mean.mutable_data_ptr<acc_t>();
  acc_t* vp = var.mutable_data_ptr<acc_t>();
  for (int64_t c = 0; c < C; ++c) {
    mp[c] = m[c].mean;
    vp[c] = m[c].m2 / m[c].count;
  }
}

// BN batch statistics of an (N * P, C) row matrix, one pass of per-chunk exact moments.
std::tuple<Tensor, Tensor> row_moments(const Tensor& rows2d, int64_t N, int64_t P) {
  const int64_t C = rows2d.size(1);
  Tensor mean = acc_empty(rows2d, {C}), var = acc_empty(rows2d, {C});
  dispatch_dtype(rows2d.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* p = rows2d.const_data_ptr<scalar_t>();
    const Chunks ch = position_chunks(N, P, C);
    const auto part = for_chunks<acc_t>(ch, 2 * C, [&](int64_t n, int64_t p0, int64_t p1,
                                                       acc_t* out) {
      block_moments(p + (n * P + p0) * C, p1 - p0, C, out);
    });
    merge_moments(part, ch, C, mean, var);
  });
  return {mean, var};
}

template <typename acc_t>
Tensor acc_vector(const Tensor& like, const acc_t* src, at::IntArrayRef shape) {
  Tensor t = at::empty(shape, like.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  std::copy(src, src + t.numel(), t.mutable_data_ptr<acc_t>());
  return t;
}

// An optional per-sample / per-(sample, channel) vector in the accumulate dtype, or empty.
template <typename acc_t>
std::vector<acc_t> acc_values(const OptTensor& t) {
  if (!t.has_value() || !t->defined()) return {};
  const Tensor c = t->to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
  return std::vector<acc_t>(c.const_data_ptr<acc_t>(), c.const_data_ptr<acc_t>() + c.numel());
}

// ---- depthwise helpers ----------------------------------------------------------------------

// The depthwise weight (C, 1, k, k) as taps x channels in the accumulate dtype.
template <typename acc_t, typename scalar_t>
std::vector<acc_t> taps_of(const Tensor& weight) {
  const Tensor w = weight.contiguous();
  const int64_t C = w.size(0), kk = w.size(2) * w.size(3);
  const scalar_t* p = w.const_data_ptr<scalar_t>();
  std::vector<acc_t> t(kk * C);
  for (int64_t c = 0; c < C; ++c)
    for (int64_t i = 0; i < kk; ++i) t[i * C + c] = static_cast<acc_t>(p[c * kk + i]);
  return t;
}

// Input rows [r0, r1) of one image as the depthwise input a1 = act(BN1(h)) (h itself without
// in_bn), in the accumulate dtype: computed once per band, read k * k times by the stencil.
template <Act A, typename acc_t, typename scalar_t>
void activated_rows(const scalar_t* image, int64_t r0, int64_t r1, int64_t W, int64_t C,
                    const Norm<acc_t>* bn, acc_t* a) {
  for (int64_t pos = r0 * W; pos < r1 * W; ++pos) {
    const scalar_t* src = image + pos * C;
    acc_t* dst = a + (pos - r0 * W) * C;
    if (bn) {
      const acc_t* sc = bn->scale.data();
      const acc_t* sh = bn->shift.data();
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        dst[c] = activate<A>(static_cast<acc_t>(src[c]) * sc[c] + sh[c]);
      }
    } else {
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) dst[c] = static_cast<acc_t>(src[c]);
    }
  }
}

struct DwGeometry {
  int64_t N, C, H, W, Ho, Wo;
  int k, s;
  int p() const { return k / 2; }
  // Input rows the output rows [ho0, ho1) read.
  int64_t first_row(int64_t ho0) const { return std::max<int64_t>(0, ho0 * s - p()); }
  int64_t end_row(int64_t ho1) const {
    return std::min<int64_t>(H, (ho1 - 1) * s - p() + k);
  }
};

DwGeometry dw_geometry(const Map& h, const Tensor& weight, int64_t stride) {
  const int k = static_cast<int>(weight.size(2)), s = static_cast<int>(stride);
  return {h.N, h.C, h.H, h.W, conv_out_size(h.H, k, s), conv_out_size(h.W, k, s), k, s};
}

// For each output (ho, wo) of rows [ho0, ho1): f(out position, tap index, input position in a),
// over the taps inside the input. `a` holds input rows from r0.
template <typename F>
void for_taps(const DwGeometry& g, int64_t ho0, int64_t ho1, int64_t r0, const F& f) {
  for (int64_t ho = ho0; ho < ho1; ++ho) {
    for (int64_t wo = 0; wo < g.Wo; ++wo) {
      const int64_t out = ho * g.Wo + wo;
      for (int kh = 0; kh < g.k; ++kh) {
        const int64_t hi = ho * g.s - g.p() + kh;
        if (hi < 0 || hi >= g.H) continue;
        for (int kw = 0; kw < g.k; ++kw) {
          const int64_t wi = wo * g.s - g.p() + kw;
          if (wi < 0 || wi >= g.W) continue;
          f(out, kh * g.k + kw, (hi - r0) * g.W + wi);
        }
      }
    }
  }
}

// ---- K1 expand ----------------------------------------------------------------------------

std::tuple<Tensor, Tensor, Tensor> expand_forward(const Tensor& x_in, const Tensor& weight,
                                                  bool need_stats) {
  check_expand_forward(x_in, weight, kCPU);
  const Map x = nhwc(x_in);
  const Tensor e2 = pointwise_conv(x.rows2d(), weight, x.N, x.H, x.W);
  Tensor mean = acc_empty(x_in), var = acc_empty(x_in);
  if (need_stats) std::tie(mean, var) = row_moments(e2, x.N, x.P());
  return {as_map(e2, x.N, x.H, x.W).contiguous(memory_format_of(x_in)), mean, var};
}

// ---- K2 depthwise forward -----------------------------------------------------------------

template <typename acc_t>
std::unique_ptr<Norm<acc_t>> in_norm(const Tensor& h, const OptTensor& mean, const OptTensor& var,
                                     const OptTensor& w, const OptTensor& b, double eps) {
  if (!given(mean)) return nullptr;
  return std::make_unique<Norm<acc_t>>(norm_of<acc_t>(h, *mean, *var, w, b, eps));
}

std::tuple<Tensor, Tensor, Tensor> dwconv_forward(
    const Tensor& h_in, const Tensor& weight, int64_t stride, const OptTensor& in_mean,
    const OptTensor& in_var, const OptTensor& in_weight, const OptTensor& in_bias, double in_eps,
    c10::string_view activation, bool need_stats) {
  const Act act = check_dwconv_forward(h_in, weight, stride, in_mean, in_var, in_weight, in_bias,
                                       in_eps, activation, kCPU);
  const Map h = nhwc(h_in);
  const DwGeometry g = dw_geometry(h, weight, stride);
  Tensor d2 = empty_rows(h_in, g.N * g.Ho * g.Wo, g.C, h_in.scalar_type());
  Tensor mean = need_stats ? acc_empty(h_in, {g.C}) : acc_empty(h_in);
  Tensor var = need_stats ? acc_empty(h_in, {g.C}) : acc_empty(h_in);
  dispatch_dtype(h_in.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = at::opmath_type<scalar_t>;
    const auto bn = in_norm<acc_t>(h_in, in_mean, in_var, in_weight, in_bias, in_eps);
    const auto taps = taps_of<acc_t, scalar_t>(weight);
    const scalar_t* hp = h.data<scalar_t>();
    scalar_t* dp = d2.mutable_data_ptr<scalar_t>();
    const int64_t C = g.C;
    const Chunks ch(g.N, g.Ho * g.Wo, kBandRows * g.Wo);
    dispatch_activation(act, [&](auto A) {
      const auto part = for_chunks<acc_t>(ch, need_stats ? 2 * C : 0, [&](int64_t n, int64_t p0,
                                                                        int64_t p1, acc_t* out) {
        const int64_t ho0 = p0 / g.Wo, ho1 = p1 / g.Wo;
        const int64_t r0 = g.first_row(ho0), r1 = g.end_row(ho1);
        std::vector<acc_t> a((r1 - r0) * g.W * C), sum(C);
        activated_rows<decltype(A)::value>(hp + n * g.H * g.W * C, r0, r1, g.W, C, bn.get(),
                                           a.data());
        scalar_t* image = dp + n * g.Ho * g.Wo * C;
        int64_t current = p0;
        auto flush = [&]() {
          scalar_t* dst = image + current * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) dst[c] = static_cast<scalar_t>(sum[c]);
          std::fill(sum.begin(), sum.end(), acc_t(0));
        };
        for_taps(g, ho0, ho1, r0, [&](int64_t o, int t, int64_t i) {
          if (o != current) {
            flush();
            current = o;
          }
          const acc_t* src = a.data() + i * C;
          const acc_t* w = taps.data() + t * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) sum[c] += src[c] * w[c];
        });
        flush();
        if (need_stats) block_moments(image + p0 * C, p1 - p0, C, out);
      });
      if (need_stats) merge_moments(part, ch, C, mean, var);
    });
  });
  return {as_map(d2, g.N, g.Ho, g.Wo).contiguous(memory_format_of(h_in)), mean, var};
}

// ---- K3 squeeze ---------------------------------------------------------------------------

Tensor squeeze_forward(const Tensor& d_in, const Tensor& mean, const Tensor& var,
                       const OptTensor& bn_weight, const OptTensor& bn_bias, double eps,
                       c10::string_view activation) {
  const Act act = check_squeeze_forward(d_in, mean, var, bn_weight, bn_bias, eps, activation, kCPU);
  const Map d = nhwc(d_in);
  Tensor pooled = acc_empty(d_in, {d.N, d.C});
  dispatch_dtype(d_in.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = at::opmath_type<scalar_t>;
    const Norm<acc_t> bn = norm_of<acc_t>(d_in, mean, var, bn_weight, bn_bias, eps);
    const scalar_t* dp = d.data<scalar_t>();
    const int64_t C = d.C, P = d.P();
    const Chunks ch = position_chunks(d.N, P, C);
    dispatch_activation(act, [&](auto A) {
      const auto part = for_chunks<acc_t>(ch, C, [&](int64_t n, int64_t p0, int64_t p1,
                                                     acc_t* out) {
        const acc_t* sc = bn.scale.data();
        const acc_t* sh = bn.shift.data();
        for (int64_t r = p0; r < p1; ++r) {
          const scalar_t* row = dp + (n * P + r) * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            out[c] += activate<decltype(A)::value>(static_cast<acc_t>(row[c]) * sc[c] + sh[c]);
          }
        }
      });
      acc_t* pp = pooled.mutable_data_ptr<acc_t>();
      sum_chunks(part, ch, C, true, pp);
      for (int64_t i = 0; i < d.N * C; ++i) pp[i] /= static_cast<acc_t>(P);
    });
  });
  return pooled;
}

// ---- K4 / B4 excite (per-sample vectors: a few small GEMMs) --------------------------------

template <bool kGrad>
Tensor map_activation(const Tensor& t, Act a) {
  Tensor out = at::empty_like(t);
  AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "mbconv_excite", [&] {
    const scalar_t* src = t.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    auto run = [&](auto A) {
      for (int64_t i = 0; i < t.numel(); ++i) {
        dst[i] = kGrad ? activate_grad<decltype(A)::value>(src[i])
                       : activate<decltype(A)::value>(src[i]);
      }
    };
    if (a == Act::kSigmoid || a == Act::kHardsigmoid) dispatch_gate(a, run);
    else dispatch_activation(a, run);
  });
  return out;
}

Tensor excite_forward(const Tensor& pooled, const Tensor& w1, const Tensor& b1,
                      const Tensor& w2, const Tensor& b2, c10::string_view se_activation,
                      c10::string_view gate) {
  const auto [se, gt] = check_excite_forward(pooled, w1, b1, w2, b2, se_activation, gate, kCPU);
  const auto acc = pooled.scalar_type();
  const Tensor p = pooled.contiguous();
  const Tensor s = map_activation<false>(at::addmm(b1.to(acc), p, w1.to(acc).t()), se);
  return map_activation<false>(at::addmm(b2.to(acc), s, w2.to(acc).t()), gt);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> excite_backward(
    const Tensor& grad_gate, const Tensor& pooled, const Tensor& w1, const Tensor& b1,
    const Tensor& w2, const Tensor& b2, c10::string_view se_activation, c10::string_view gate) {
  const auto [se, gt] = check_excite_backward(grad_gate, pooled, w1, b1, w2, b2, se_activation,
                                              gate, kCPU);
  const auto acc = pooled.scalar_type();
  const Tensor p = pooled.contiguous(), w1a = w1.to(acc), w2a = w2.to(acc);
  const Tensor z1 = at::addmm(b1.to(acc), p, w1a.t());
  const Tensor s = map_activation<false>(z1, se);
  const Tensor z2 = at::addmm(b2.to(acc), s, w2a.t());
  const Tensor gz2 = grad_gate.to(acc) * map_activation<true>(z2, gt);
  const Tensor gz1 = at::mm(gz2, w2a) * map_activation<true>(z1, se);
  return {at::mm(gz1, w1a), at::mm(gz1.t(), p), gz1.sum(0), at::mm(gz2.t(), s), gz2.sum(0)};
}

// ---- K5 project ---------------------------------------------------------------------------

// The projection's A operand a3 = act(BN2(d)) * gate[n, c] as (rows, C) in d's dtype, one pass.
Tensor project_operand(const Map& d, const Tensor& d_in, const Tensor& mean, const Tensor& var,
                       const OptTensor& w, const OptTensor& b, double eps, Act act,
                       const OptTensor& gate) {
  Tensor a3 = empty_rows(d_in, d.rows(), d.C, d_in.scalar_type());
  dispatch_dtype(d_in.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = at::opmath_type<scalar_t>;
    const Norm<acc_t> bn = norm_of<acc_t>(d_in, mean, var, w, b, eps);
    const auto gv = acc_values<acc_t>(gate);
    const scalar_t* dp = d.data<scalar_t>();
    scalar_t* ap = a3.mutable_data_ptr<scalar_t>();
    const int64_t C = d.C, P = d.P();
    dispatch_activation(act, [&](auto A) {
      for_chunks<acc_t>(position_chunks(d.N, P, C), 0, [&](int64_t n, int64_t p0, int64_t p1,
                                                           acc_t*) {
        const acc_t* sc = bn.scale.data();
        const acc_t* sh = bn.shift.data();
        const acc_t* g = gv.empty() ? nullptr : gv.data() + n * C;
        for (int64_t r = n * P + p0; r < n * P + p1; ++r) {
          const scalar_t* src = dp + r * C;
          scalar_t* dst = ap + r * C;
          if (g) {
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) {
              dst[c] = static_cast<scalar_t>(
                  activate<decltype(A)::value>(static_cast<acc_t>(src[c]) * sc[c] + sh[c]) * g[c]);
            }
          } else {
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) {
              dst[c] = static_cast<scalar_t>(
                  activate<decltype(A)::value>(static_cast<acc_t>(src[c]) * sc[c] + sh[c]));
            }
          }
        }
      });
    });
  });
  return a3;
}

std::tuple<Tensor, Tensor, Tensor> project_forward(
    const Tensor& d_in, const OptTensor& gate, const Tensor& weight, const Tensor& mean2,
    const Tensor& var2, const OptTensor& w2, const OptTensor& b2, double eps2,
    c10::string_view activation, bool need_stats) {
  const Act act = check_project_forward(d_in, gate, weight, mean2, var2, w2, b2, eps2, activation,
                                        kCPU);
  const Map d = nhwc(d_in);
  const Tensor q2 = pointwise_conv(
      project_operand(d, d_in, mean2, var2, w2, b2, eps2, act, gate), weight, d.N, d.H, d.W);
  Tensor mean = acc_empty(d_in), var = acc_empty(d_in);
  if (need_stats) std::tie(mean, var) = row_moments(q2, d.N, d.P());
  return {as_map(q2, d.N, d.H, d.W).contiguous(memory_format_of(d_in)), mean, var};
}

// ---- K6 output ----------------------------------------------------------------------------

Tensor output_forward(const Tensor& q_in, const Tensor& mean3, const Tensor& var3,
                      const OptTensor& w3, const OptTensor& b3, double eps3,
                      const OptTensor& sample_scale, const OptTensor& residual) {
  check_output_forward(q_in, mean3, var3, w3, b3, eps3, sample_scale, residual, kCPU);
  const Map q = nhwc(q_in);
  const Map res = given(residual) ? nhwc(*residual) : Map{};
  Tensor out2 = empty_rows(q_in, q.rows(), q.C, q_in.scalar_type());
  dispatch_dtype(q_in.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = at::opmath_type<scalar_t>;
    const Norm<acc_t> bn = norm_of<acc_t>(q_in, mean3, var3, w3, b3, eps3);
    const auto ss = acc_values<acc_t>(sample_scale);
    const scalar_t* qp = q.data<scalar_t>();
    const scalar_t* rp = res.t.defined() ? res.data<scalar_t>() : nullptr;
    scalar_t* op_ = out2.mutable_data_ptr<scalar_t>();
    const int64_t C = q.C, P = q.P();
    for_chunks<acc_t>(position_chunks(q.N, P, C), 0, [&](int64_t n, int64_t p0, int64_t p1,
                                                         acc_t*) {
      const acc_t s = ss.empty() ? acc_t(1) : ss[n];
      const acc_t* sc = bn.scale.data();
      const acc_t* sh = bn.shift.data();
      for (int64_t r = n * P + p0; r < n * P + p1; ++r) {
        const scalar_t* src = qp + r * C;
        scalar_t* dst = op_ + r * C;
        if (rp) {
          const scalar_t* rr = rp + r * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            dst[c] = static_cast<scalar_t>((static_cast<acc_t>(src[c]) * sc[c] + sh[c]) * s +
                                           static_cast<acc_t>(rr[c]));
          }
        } else {
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            dst[c] = static_cast<scalar_t>((static_cast<acc_t>(src[c]) * sc[c] + sh[c]) * s);
          }
        }
      }
    });
  });
  return as_map(out2, q.N, q.H, q.W).contiguous(memory_format_of(q_in));
}

// ---- B6 output backward statistics --------------------------------------------------------

std::tuple<Tensor, Tensor> output_backward_stats(const Tensor& grad_out, const Tensor& q_in,
                                                 const Tensor& mean3, const Tensor& var3,
                                                 const OptTensor& w3, const OptTensor& b3,
                                                 double eps3, const OptTensor& sample_scale) {
  check_output_backward_stats(grad_out, q_in, mean3, var3, w3, b3, eps3, sample_scale, kCPU);
  const Map q = nhwc(q_in), go = nhwc(grad_out);
  const int64_t C = q.C, P = q.P();
  Tensor sum_dy = acc_empty(q_in, {C}), sum_dy_xhat = acc_empty(q_in, {C});
  dispatch_dtype(q_in.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = at::opmath_type<scalar_t>;
    const Norm<acc_t> bn = norm_of<acc_t>(q_in, mean3, var3, w3, b3, eps3);
    const auto ss = acc_values<acc_t>(sample_scale);
    const scalar_t* qp = q.data<scalar_t>();
    const scalar_t* gp = go.data<scalar_t>();
    const Chunks ch = position_chunks(q.N, P, C);
    const auto part = for_chunks<acc_t>(ch, 2 * C, [&](int64_t n, int64_t p0, int64_t p1,
                                                       acc_t* out) {
      const acc_t s = ss.empty() ? acc_t(1) : ss[n];
      const acc_t* m = bn.mean.data();
      const acc_t* inv = bn.invstd.data();
      for (int64_t r = n * P + p0; r < n * P + p1; ++r) {
        const scalar_t* qr = qp + r * C;
        const scalar_t* gr = gp + r * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          const acc_t dy = static_cast<acc_t>(gr[c]) * s;
          out[c] += dy;
          out[C + c] += dy * (static_cast<acc_t>(qr[c]) - m[c]) * inv[c];
        }
      }
    });
    std::vector<acc_t> total(2 * C);
    sum_chunks(part, ch, 2 * C, false, total.data());
    std::copy(total.begin(), total.begin() + C, sum_dy.mutable_data_ptr<acc_t>());
    std::copy(total.begin() + C, total.end(), sum_dy_xhat.mutable_data_ptr<acc_t>());
  });
  return {sum_dy, sum_dy_xhat};
}

// ---- B5 project backward ------------------------------------------------------------------

std::tuple<Tensor, Tensor, Tensor> project_backward(
    const Tensor& grad_out, const Tensor& q_in, const Tensor& d_in, const OptTensor& gate,
    const Tensor& weight, const Tensor& mean2, const Tensor& var2, const OptTensor& w2,
    const OptTensor& b2, double eps2, c10::string_view activation, const Tensor& mean3,
    const Tensor& var3, const OptTensor& w3, const OptTensor& b3, double eps3,
    const Tensor& sum_dy3, const Tensor& sum_dy3_xhat3, const OptTensor& sample_scale,
    bool training, std::array<bool, 2> output_mask) {
  const Act act = check_project_backward(grad_out, q_in, d_in, gate, weight, mean2, var2, w2, b2,
                                         eps2, activation, mean3, var3, w3, b3, eps3, sum_dy3,
                                         sum_dy3_xhat3, sample_scale, kCPU);
  const int64_t Cout = weight.size(0);
  const Map d = nhwc(d_in), q = nhwc(q_in), go = nhwc(grad_out);
  const int64_t C = d.C, P = d.P();
  const auto format = memory_format_of(d_in);
  // gq = BN3 backward of dy3 = grad_out * sample_scale, in d's dtype (the GEMMs' operand).
  Tensor gq = empty_rows(d_in, d.rows(), Cout, d_in.scalar_type());
  dispatch_dtype(d_in.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = at::opmath_type<scalar_t>;
    const Norm<acc_t> bn = norm_of<acc_t>(q_in, mean3, var3, w3, b3, eps3);
    const NormGrad<acc_t> ng = norm_grad_of(bn, sum_dy3, sum_dy3_xhat3, d.rows(), training);
    const auto ss = acc_values<acc_t>(sample_scale);
    const scalar_t* qp = q.data<scalar_t>();
    const scalar_t* gp = go.data<scalar_t>();
    scalar_t* out = gq.mutable_data_ptr<scalar_t>();
    for_chunks<acc_t>(position_chunks(d.N, P, Cout), 0, [&](int64_t n, int64_t p0, int64_t p1,
                                                            acc_t*) {
      const acc_t s = ss.empty() ? acc_t(1) : ss[n];
      const acc_t *m = bn.mean.data(), *inv = bn.invstd.data();
      const acc_t *a = ng.a.data(), *b = ng.b.data(), *gi = ng.gi.data();
      for (int64_t r = n * P + p0; r < n * P + p1; ++r) {
        const scalar_t* qr = qp + r * Cout;
        const scalar_t* gr = gp + r * Cout;
        scalar_t* dst = out + r * Cout;
#pragma omp simd
        for (int64_t c = 0; c < Cout; ++c) {
          const acc_t xh = (static_cast<acc_t>(qr[c]) - m[c]) * inv[c];
          dst[c] = static_cast<scalar_t>((static_cast<acc_t>(gr[c]) * s - a[c] - xh * b[c]) *
                                         gi[c]);
        }
      }
    });
  });
  Tensor grad_a2 = d_in.new_empty({0}), grad_gate = acc_empty(d_in), grad_weight = d_in.new_empty({0});
  Tensor operand;  // act(BN2(d)) * gate, when the gate-gradient pass below builds it
  if (output_mask[0]) {
    const Tensor ga3 = pointwise_conv(gq, weight.t(), d.N, d.H, d.W);  // (rows, C)
    if (!given(gate)) {
      grad_a2 = as_map(ga3, d.N, d.H, d.W).contiguous(format);
    } else {
      Tensor ga2 = empty_rows(d_in, d.rows(), C, d_in.scalar_type());
      grad_gate = acc_empty(d_in, {d.N, C});
      // This pass recomputes a2 = act(BN2(d)) for the gate gradient: it also writes the weight
      // gradient's operand a2 * gate, sparing project_operand a second pass over d.
      if (output_mask[1]) operand = empty_rows(d_in, d.rows(), C, d_in.scalar_type());
      dispatch_dtype(d_in.scalar_type(), [&](auto tag) {
        using scalar_t = decltype(tag);
        using acc_t = at::opmath_type<scalar_t>;
        const Norm<acc_t> bn = norm_of<acc_t>(d_in, mean2, var2, w2, b2, eps2);
        const auto gv = acc_values<acc_t>(gate);
        const scalar_t* dp = d.data<scalar_t>();
        const scalar_t* gap = ga3.const_data_ptr<scalar_t>();
        scalar_t* out = ga2.mutable_data_ptr<scalar_t>();
        scalar_t* opp = operand.defined() ? operand.mutable_data_ptr<scalar_t>() : nullptr;
        const Chunks ch = position_chunks(d.N, P, C);
        dispatch_activation(act, [&](auto A) {
          auto pass = [&](auto keep_operand) {
            return for_chunks<acc_t>(ch, C, [&](int64_t n, int64_t p0, int64_t p1, acc_t* sums) {
              const acc_t *sc = bn.scale.data(), *sh = bn.shift.data(), *g = gv.data() + n * C;
              for (int64_t r = n * P + p0; r < n * P + p1; ++r) {
                const scalar_t* dr = dp + r * C;
                const scalar_t* ga = gap + r * C;
                scalar_t* dst = out + r * C;
#pragma omp simd
                for (int64_t c = 0; c < C; ++c) {
                  const acc_t a2 =
                      activate<decltype(A)::value>(static_cast<acc_t>(dr[c]) * sc[c] + sh[c]);
                  const acc_t v = static_cast<acc_t>(ga[c]);
                  dst[c] = static_cast<scalar_t>(v * g[c]);
                  sums[c] += v * a2;
                  if constexpr (decltype(keep_operand)::value) {
                    opp[r * C + c] = static_cast<scalar_t>(a2 * g[c]);
                  }
                }
              }
            });
          };
          const auto part = opp ? pass(std::true_type{}) : pass(std::false_type{});
          sum_chunks(part, ch, C, true, grad_gate.mutable_data_ptr<acc_t>());
        });
      });
      grad_a2 = as_map(ga2, d.N, d.H, d.W).contiguous(format);
    }
  }
  if (output_mask[1]) {
    if (!operand.defined()) {
      operand = project_operand(d, d_in, mean2, var2, w2, b2, eps2, act, gate);
    }
    grad_weight = at::mm(gq.t(), operand);
  }
  return {grad_a2, grad_gate, grad_weight};
}

// ---- B3 / B2 depthwise backward -----------------------------------------------------------

// dy2 = (grad_a2 + grad_pooled[n, c] / P) * act'(BN2(d)), handed to f(c, dy2, x_hat2) along a
// row; `share` is grad_pooled / P of the row's image (nullptr without SE).
template <Act A, typename acc_t, typename scalar_t, typename F>
inline void dy2_row(const scalar_t* ga, const scalar_t* dr, const acc_t* share,
                    const Norm<acc_t>& bn, int64_t C, const F& f) {
  const acc_t *sc = bn.scale.data(), *sh = bn.shift.data();
  const acc_t *m = bn.mean.data(), *inv = bn.invstd.data();
  if (share) {
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const acc_t v = static_cast<acc_t>(dr[c]);
      f(c, (static_cast<acc_t>(ga[c]) + share[c]) * activate_grad<A>(v * sc[c] + sh[c]),
        (v - m[c]) * inv[c]);
    }
  } else {
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const acc_t v = static_cast<acc_t>(dr[c]);
      f(c, static_cast<acc_t>(ga[c]) * activate_grad<A>(v * sc[c] + sh[c]), (v - m[c]) * inv[c]);
    }
  }
}

template <typename acc_t>
std::vector<acc_t> pooled_share(const OptTensor& grad_pooled, int64_t P) {
  auto v = acc_values<acc_t>(grad_pooled);
  for (auto& x : v) x /= static_cast<acc_t>(P);
  return v;
}

std::tuple<Tensor, Tensor> dwconv_backward_stats(
    const Tensor& grad_a2, const OptTensor& grad_pooled, const Tensor& d_in, const Tensor& mean2,
    const Tensor& var2, const OptTensor& w2, const OptTensor& b2, double eps2,
    c10::string_view activation) {
  const Act act = check_dwconv_backward_stats(grad_a2, grad_pooled, d_in, mean2, var2, w2, b2,
                                              eps2, activation, kCPU);
  const Map d = nhwc(d_in), ga = nhwc(grad_a2);
  const int64_t C = d.C, P = d.P();
  Tensor sum_dy = acc_empty(d_in, {C}), sum_dy_xhat = acc_empty(d_in, {C});
  dispatch_dtype(d_in.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = at::opmath_type<scalar_t>;
    const Norm<acc_t> bn = norm_of<acc_t>(d_in, mean2, var2, w2, b2, eps2);
    const auto share = pooled_share<acc_t>(grad_pooled, P);
    const scalar_t* dp = d.data<scalar_t>();
    const scalar_t* gp = ga.data<scalar_t>();
    const Chunks ch = position_chunks(d.N, P, C);
    dispatch_activation(act, [&](auto A) {
      const auto part = for_chunks<acc_t>(ch, 2 * C, [&](int64_t n, int64_t p0, int64_t p1,
                                                         acc_t* out) {
        const acc_t* sh = share.empty() ? nullptr : share.data() + n * C;
        for (int64_t r = n * P + p0; r < n * P + p1; ++r) {
          dy2_row<decltype(A)::value>(gp + r * C, dp + r * C, sh, bn, C,
                                      [&](int64_t c, acc_t dy, acc_t xh) {
                                        out[c] += dy;
                                        out[C + c] += dy * xh;
                                      });
        }
      });
      std::vector<acc_t> total(2 * C);
      sum_chunks(part, ch, 2 * C, false, total.data());
      std::copy(total.begin(), total.begin() + C, sum_dy.mutable_data_ptr<acc_t>());
      std::copy(total.begin() + C, total.end(), sum_dy_xhat.mutable_data_ptr<acc_t>());
    });
  });
  return {sum_dy, sum_dy_xhat};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> dwconv_backward(
    const Tensor& grad_a2, const OptTensor& grad_pooled, const Tensor& d_in, const Tensor& h_in,
    const Tensor& weight, int64_t stride, const Tensor& mean2, const Tensor& var2,
    const OptTensor& w2, const OptTensor& b2, double eps2, c10::string_view activation,
    const Tensor& sum_dy2, const Tensor& sum_dy2_xhat2, const OptTensor& in_mean,
    const OptTensor& in_var, const OptTensor& in_weight, const OptTensor& in_bias, double in_eps,
    bool training, std::array<bool, 2> output_mask) {
  const Act act = check_dwconv_backward(grad_a2, grad_pooled, d_in, h_in, weight, stride, mean2,
                                        var2, w2, b2, eps2, activation, sum_dy2, sum_dy2_xhat2,
                                        in_mean, in_var, in_weight, in_bias, in_eps, kCPU);
  const Map h = nhwc(h_in);
  const DwGeometry g = dw_geometry(h, weight, stride);
  const Map d = nhwc(d_in), ga = nhwc(grad_a2);
  const int64_t C = g.C, Po = g.Ho * g.Wo, P = g.H * g.W;
  const bool with_bn1 = given(in_mean);
  Tensor grad_h = h_in.new_empty({0}), grad_w = h_in.new_empty({0});
  Tensor sum_dy1 = acc_empty(h_in), sum_dy1_xhat1 = acc_empty(h_in);
  if (!output_mask[0] && !output_mask[1]) return {grad_h, grad_w, sum_dy1, sum_dy1_xhat1};
  dispatch_dtype(h_in.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = at::opmath_type<scalar_t>;
    const Norm<acc_t> bn2 = norm_of<acc_t>(d_in, mean2, var2, w2, b2, eps2);
    const NormGrad<acc_t> ng = norm_grad_of(bn2, sum_dy2, sum_dy2_xhat2, g.N * Po, training);
    const auto bn1 = in_norm<acc_t>(h_in, in_mean, in_var, in_weight, in_bias, in_eps);
    const auto share = pooled_share<acc_t>(grad_pooled, Po);
    const auto taps = taps_of<acc_t, scalar_t>(weight);
    const scalar_t* dp = d.data<scalar_t>();
    const scalar_t* gap = ga.data<scalar_t>();
    const scalar_t* hp = h.data<scalar_t>();
    dispatch_activation(act, [&](auto A) {
      constexpr Act kA = decltype(A)::value;
      // gd = BN2 backward of dy2 (accumulate dtype; each value is read k * k times).
      std::vector<acc_t> gd(g.N * Po * C);
      for_chunks<acc_t>(position_chunks(g.N, Po, C), 0, [&](int64_t n, int64_t p0, int64_t p1,
                                                            acc_t*) {
        const acc_t* sh = share.empty() ? nullptr : share.data() + n * C;
        const acc_t *a = ng.a.data(), *b = ng.b.data(), *gi = ng.gi.data();
        for (int64_t r = n * Po + p0; r < n * Po + p1; ++r) {
          acc_t* dst = gd.data() + r * C;
          dy2_row<kA>(gap + r * C, dp + r * C, sh, bn2, C, [&](int64_t c, acc_t dy, acc_t xh) {
            dst[c] = (dy - a[c] - xh * b[c]) * gi[c];
          });
        }
      });
      if (output_mask[0]) {
        // Input gradient: the transposed stencil gathered per input position, then (with BN1)
        // dy1 = grad_a1 * act'(BN1(h)) and BN1's reductions, one input row per chunk.
        Tensor gh2 = empty_rows(h_in, h.rows(), C, h_in.scalar_type());
        scalar_t* ghp = gh2.mutable_data_ptr<scalar_t>();
        const Chunks ch(g.N, P, g.W);
        const auto part = for_chunks<acc_t>(ch, with_bn1 ? 2 * C : 0, [&](int64_t n, int64_t p0,
                                                                         int64_t, acc_t* out) {
          const int64_t hi = p0 / g.W;
          const int p = g.p();
          std::vector<acc_t> sum(C);
          for (int64_t wi = 0; wi < g.W; ++wi) {
            std::fill(sum.begin(), sum.end(), acc_t(0));
            for (int kh = 0; kh < g.k; ++kh) {
              const int64_t th = hi + p - kh;
              if (th < 0 || th % g.s != 0 || th / g.s >= g.Ho) continue;
              for (int kw = 0; kw < g.k; ++kw) {
                const int64_t tw = wi + p - kw;
                if (tw < 0 || tw % g.s != 0 || tw / g.s >= g.Wo) continue;
                const acc_t* src = gd.data() + ((n * g.Ho + th / g.s) * g.Wo + tw / g.s) * C;
                const acc_t* w = taps.data() + (kh * g.k + kw) * C;
                acc_t* s = sum.data();
#pragma omp simd
                for (int64_t c = 0; c < C; ++c) s[c] += src[c] * w[c];
              }
            }
            const int64_t pos = (n * g.H + hi) * g.W + wi;
            scalar_t* dst = ghp + pos * C;
            const acc_t* s = sum.data();
            if (bn1) {
              const scalar_t* hr = hp + pos * C;
              const acc_t *sc = bn1->scale.data(), *sf = bn1->shift.data();
              const acc_t *m = bn1->mean.data(), *inv = bn1->invstd.data();
#pragma omp simd
              for (int64_t c = 0; c < C; ++c) {
                const acc_t v = static_cast<acc_t>(hr[c]);
                const acc_t dy1 = s[c] * activate_grad<kA>(v * sc[c] + sf[c]);
                dst[c] = static_cast<scalar_t>(dy1);
                out[c] += dy1;
                out[C + c] += dy1 * (v - m[c]) * inv[c];
              }
            } else {
#pragma omp simd
              for (int64_t c = 0; c < C; ++c) dst[c] = static_cast<scalar_t>(s[c]);
            }
          }
        });
        if (with_bn1) {
          std::vector<acc_t> total(2 * C);
          sum_chunks(part, ch, 2 * C, false, total.data());
          sum_dy1 = acc_vector(h_in, total.data(), {C});
          sum_dy1_xhat1 = acc_vector(h_in, total.data() + C, {C});
        }
        grad_h = as_map(gh2, g.N, g.H, g.W).contiguous(memory_format_of(h_in));
      }
      if (output_mask[1]) {
        // Weight gradient: per band, a1 recomputed once, then per-tap sums of gd * a1.
        const int64_t kk = int64_t(g.k) * g.k;
        const Chunks ch(g.N, Po, kBandRows * g.Wo);
        const auto part = for_chunks<acc_t>(ch, kk * C, [&](int64_t n, int64_t p0, int64_t p1,
                                                           acc_t* out) {
          const int64_t ho0 = p0 / g.Wo, ho1 = p1 / g.Wo;
          const int64_t r0 = g.first_row(ho0), r1 = g.end_row(ho1);
          std::vector<acc_t> a((r1 - r0) * g.W * C);
          activated_rows<kA>(hp + n * P * C, r0, r1, g.W, C, bn1.get(), a.data());
          for_taps(g, ho0, ho1, r0, [&](int64_t o, int t, int64_t i) {
            const acc_t* src = gd.data() + (n * Po + o) * C;
            const acc_t* x = a.data() + i * C;
            acc_t* dst = out + t * C;
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) dst[c] += src[c] * x[c];
          });
        });
        std::vector<acc_t> total(kk * C);
        sum_chunks(part, ch, kk * C, false, total.data());
        grad_w = at::empty(weight.sizes(), weight.options());
        scalar_t* wp = grad_w.mutable_data_ptr<scalar_t>();
        for (int64_t c = 0; c < C; ++c)
          for (int64_t t = 0; t < kk; ++t) wp[c * kk + t] = static_cast<scalar_t>(total[t * C + c]);
      }
    });
  });
  return {grad_h, grad_w, sum_dy1, sum_dy1_xhat1};
}

// ---- B1 expand backward -------------------------------------------------------------------

std::tuple<Tensor, Tensor> expand_backward(
    const Tensor& grad_y1, const Tensor& e_in, const Tensor& x_in, const Tensor& weight,
    const Tensor& mean1, const Tensor& var1, const OptTensor& w1, const OptTensor& b1,
    double eps1, const Tensor& sum_dy1, const Tensor& sum_dy1_xhat1, bool training,
    const OptTensor& grad_residual, std::array<bool, 2> output_mask) {
  check_expand_backward(grad_y1, e_in, x_in, weight, mean1, var1, w1, b1, eps1, sum_dy1,
                        sum_dy1_xhat1, grad_residual, kCPU);
  const int64_t Ce = weight.size(0);
  const Map x = nhwc(x_in), e = nhwc(e_in), gy = nhwc(grad_y1);
  const int64_t P = x.P();
  Tensor ge = empty_rows(x_in, x.rows(), Ce, x_in.scalar_type());
  dispatch_dtype(x_in.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = at::opmath_type<scalar_t>;
    const Norm<acc_t> bn = norm_of<acc_t>(e_in, mean1, var1, w1, b1, eps1);
    const NormGrad<acc_t> ng = norm_grad_of(bn, sum_dy1, sum_dy1_xhat1, x.rows(), training);
    const scalar_t* ep = e.data<scalar_t>();
    const scalar_t* gp = gy.data<scalar_t>();
    scalar_t* out = ge.mutable_data_ptr<scalar_t>();
    for_chunks<acc_t>(position_chunks(x.N, P, Ce), 0, [&](int64_t n, int64_t p0, int64_t p1,
                                                          acc_t*) {
      const acc_t *m = bn.mean.data(), *inv = bn.invstd.data();
      const acc_t *a = ng.a.data(), *b = ng.b.data(), *gi = ng.gi.data();
      for (int64_t r = n * P + p0; r < n * P + p1; ++r) {
        const scalar_t* er = ep + r * Ce;
        const scalar_t* gr = gp + r * Ce;
        scalar_t* dst = out + r * Ce;
#pragma omp simd
        for (int64_t c = 0; c < Ce; ++c) {
          const acc_t xh = (static_cast<acc_t>(er[c]) - m[c]) * inv[c];
          dst[c] = static_cast<scalar_t>((static_cast<acc_t>(gr[c]) - a[c] - xh * b[c]) * gi[c]);
        }
      }
    });
  });
  Tensor grad_x = x_in.new_empty({0}), grad_w = x_in.new_empty({0});
  if (output_mask[0]) {
    Tensor gx2 = pointwise_conv(ge, weight.t(), x.N, x.H, x.W);
    if (given(grad_residual)) gx2 += nhwc(*grad_residual).rows2d();
    grad_x = as_map(gx2, x.N, x.H, x.W).contiguous(memory_format_of(x_in));
  }
  if (output_mask[1]) grad_w = at::mm(ge.t(), x.rows2d());
  return {grad_x, grad_w};
}

}  // namespace
}  // namespace fused_mbconv

TORCH_LIBRARY_IMPL(fused_mbconv_ext, CPU, m) {
  m.impl("mbconv_expand_forward", &fused_mbconv::expand_forward);
  m.impl("mbconv_dwconv_forward", &fused_mbconv::dwconv_forward);
  m.impl("mbconv_squeeze_forward", &fused_mbconv::squeeze_forward);
  m.impl("mbconv_excite_forward", &fused_mbconv::excite_forward);
  m.impl("mbconv_project_forward", &fused_mbconv::project_forward);
  m.impl("mbconv_output_forward", &fused_mbconv::output_forward);
  m.impl("mbconv_output_backward_stats", &fused_mbconv::output_backward_stats);
  m.impl("mbconv_project_backward", &fused_mbconv::project_backward);
  m.impl("mbconv_excite_backward", &fused_mbconv::excite_backward);
  m.impl("mbconv_dwconv_backward_stats", &fused_mbconv::dwconv_backward_stats);
  m.impl("mbconv_dwconv_backward", &fused_mbconv::dwconv_backward);
  m.impl("mbconv_expand_backward", &fused_mbconv::expand_backward);
}
