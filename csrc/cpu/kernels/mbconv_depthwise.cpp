// CPU depthwise kernels of the MBConv block's kernel interface (K2 forward, B3 / B2 backward);
// csrc/cpu/kernels/mbconv.cpp describes the design, fused_mbconv/cpu/rows.h holds what they share.

#include "fused_mbconv/cpu/rows.h"

namespace fused_mbconv::cpu::CPU_CAPABILITY {
namespace {

// ---- depthwise helpers ----------------------------------------------------------------------

// The depthwise weight (C, 1, k, k) as taps x channels in the accumulate dtype, ld >= C values
// per tap (the rest zero); `flipped`: taps in reverse order, the stencil of the stride-1 input
// gradient.
template <typename acc_t, typename scalar_t>
std::vector<acc_t> taps_of(const Tensor& weight, int64_t ld, bool flipped = false) {
  const Tensor w = weight.contiguous();
  const int64_t C = w.size(0), kk = w.size(2) * w.size(3);
  const scalar_t* p = w.const_data_ptr<scalar_t>();
  std::vector<acc_t> t(kk * ld, acc_t(0));
  for (int64_t c = 0; c < C; ++c)
    for (int64_t i = 0; i < kk; ++i)
      t[(flipped ? kk - 1 - i : i) * ld + c] = static_cast<acc_t>(p[c * kk + i]);
  return t;
}

// Input rows [r0, r1) of one image as the depthwise input a1 = act(BN1(h)) (h itself without
// in_bn), in the accumulate dtype: computed once per band, read k * k times by the stencil.
// Pixel (r, wi) goes to a + (r - r0) * row_ld + wi * ld (ld = C, row_ld = W * C: packed rows).
template <Act A, typename acc_t, typename scalar_t>
void activated_rows(const scalar_t* image, int64_t r0, int64_t r1, int64_t W, int64_t C,
                    const Norm<acc_t>* bn, acc_t* a, int64_t ld, int64_t row_ld) {
  for (int64_t pos = r0 * W; pos < r1 * W; ++pos) {
    const scalar_t* src = image + pos * C;
    acc_t* dst = a + (pos / W - r0) * row_ld + pos % W * ld;
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

// Bands of output rows, the depthwise kernels' work chunks: as tall as keeps a band's input rows
// (with the k - 1 halo rows recomputed per band) within kGemmChunkElems values, equal per image.
Chunks band_chunks(const DwGeometry& g) {
  const int64_t fit = std::max<int64_t>(1, (kGemmChunkElems / (g.W * g.C) - (g.k - 1)) / g.s);
  const int64_t bands = (g.Ho + fit - 1) / fit;
  return Chunks(g.N, g.Ho * g.Wo, (g.Ho + bands - 1) / bands * g.Wo);
}

// Vectors of channels the depthwise sums keep in registers at a time: 256 bytes of them, eight
// independent accumulator chains on 32-byte targets, enough to hide the FMA latency.
constexpr int kTapVectors = std::max(4, 256 / kVectorBytes);

// Outputs per register block of the row stencil: with k vectors of taps and one of input beside
// them, 8 fit AVX2's 16 registers for k <= 5.
constexpr int kStencilRow = 8;

// Rows laid out for stencil_row and wgrad_row (a band's activated inputs, or gd for the input
// gradient's stencil): channels padded with zeros to whole vectors (ld), p = k / 2 zero columns
// left of each row and enough right of it that every block of kStencilRow outputs (out_cols,
// rounded up) reads inside the row. Zeroed once per thread; only the interior is written after.
struct PaddedBand {
  int64_t ld, out_cols, cols;
  int64_t row_ld() const { return cols * ld; }
};

// The layout for rows of in_cols pixels read by out_cols outputs of a k-tap stencil, stride s.
template <typename acc_t>
PaddedBand padded_band(int64_t C, int64_t in_cols, int64_t out_cols, int k, int s) {
  constexpr int64_t L = kVectorBytes / sizeof(acc_t);
  out_cols = (out_cols + kStencilRow - 1) / kStencilRow * kStencilRow;
  return {(C + L - 1) / L * L, out_cols, std::max(in_cols + k - 1, (out_cols - 1) * s + k)};
}

// compiled(K, S) as std::integral_constant<int, .> for the kernel sizes and strides the row
// kernels are compiled for (k 3 / 5 / 7, stride 1 / 2), generic() otherwise.
template <typename Compiled, typename Generic>
void dispatch_kernel_shape(int k, int s, const Compiled& compiled, const Generic& generic) {
  const auto at_stride = [&](auto K) {
    if (s == 1) return compiled(K, std::integral_constant<int, 1>{});
    if (s == 2) return compiled(K, std::integral_constant<int, 2>{});
    generic();
  };
  if (k == 3) return at_stride(std::integral_constant<int, 3>{});
  if (k == 5) return at_stride(std::integral_constant<int, 5>{});
  if (k == 7) return at_stride(std::integral_constant<int, 7>{});
  generic();
}

// One output row of the depthwise stencil, out[wo * ld + c] for wo < out_cols, c < ld: the sum
// over kh (rows[kh]: nullptr for a row outside the image) and then kw of
// rows[kh][(wo * S + kw) * ld + c] * taps[(kh * K + kw) * ld + c]. Per vector of channels,
// kStencilRow outputs accumulate in registers while each input vector of a kernel row is loaded
// once and meets every tap that reads it (the per-output sums loaded two operands per FMA).
template <int K, int S, typename acc_t>
void stencil_row(const acc_t* const* rows, const acc_t* taps, int64_t out_cols, int64_t ld,
                 acc_t* out) {
  using V = typename Simd<acc_t>::V;
  constexpr int64_t L = sizeof(V) / sizeof(acc_t);
  constexpr int R = kStencilRow, J = (R - 1) * S + K;  // input columns a block reads
  for (int64_t c = 0; c < ld; c += L) {
    for (int64_t wo = 0; wo < out_cols; wo += R) {
      V acc[R] = {};
      for (int kh = 0; kh < K; ++kh) {
        if (!rows[kh]) continue;
        const acc_t* x = rows[kh] + wo * S * ld + c;
        V w[K];
#pragma GCC unroll 16
        for (int kw = 0; kw < K; ++kw) w[kw] = load<V>(taps + (kh * K + kw) * ld + c);
#pragma GCC unroll 64
        for (int j = 0; j < J; ++j) {
          const V v = load<V>(x + j * ld);
#pragma GCC unroll 16
          for (int kw = 0; kw < K; ++kw) {
            const int d = j - kw;
            if (d >= 0 && d % S == 0 && d / S < R) acc[d / S] += v * w[kw];
          }
        }
      }
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) store(out + (wo + r) * ld + c, acc[r]);
    }
  }
}

// stencil_row for any kernel size and stride (the common ones are compiled for theirs).
template <typename acc_t>
void stencil_row_any(const acc_t* const* rows, const acc_t* taps, int k, int s,
                     int64_t out_cols, int64_t ld, acc_t* out) {
  using V = typename Simd<acc_t>::V;
  constexpr int64_t L = sizeof(V) / sizeof(acc_t);
  for (int64_t wo = 0; wo < out_cols; ++wo) {
    for (int64_t c = 0; c < ld; c += L) {
      V acc{};
      for (int kh = 0; kh < k; ++kh) {
        if (!rows[kh]) continue;
        for (int kw = 0; kw < k; ++kw) {
          acc += load<V>(rows[kh] + (wo * s + kw) * ld + c) *
                 load<V>(taps + (kh * k + kw) * ld + c);
        }
      }
      store(out + wo * ld + c, acc);
    }
  }
}

template <typename acc_t>
void dispatch_stencil_row(const acc_t* const* rows, const acc_t* taps, int k, int s,
                          int64_t out_cols, int64_t ld, acc_t* out) {
  dispatch_kernel_shape(
      k, s,
      [&](auto K, auto S) {
        stencil_row<decltype(K)::value, decltype(S)::value>(rows, taps, out_cols, ld, out);
      },
      [&] { stencil_row_any(rows, taps, k, s, out_cols, ld, out); });
}

// One output row's share of a kernel row of the depthwise weight gradient: wout[kw * ld + c] +=
// the sum over wo < Wo (in order) of g[wo * ld + c] * x[(wo * S + kw) * ld + c], kw < K, c < ld;
// x is a zero-bordered input row (PaddedBand). The K taps' sums stay in registers and each g
// vector is loaded once for all of them (a sum per tap loaded two operands per FMA).
template <int K, int S, typename acc_t>
void wgrad_row(const acc_t* g, const acc_t* x, int64_t Wo, int64_t ld, acc_t* wout) {
  using V = typename Simd<acc_t>::V;
  constexpr int64_t L = sizeof(V) / sizeof(acc_t);
  for (int64_t c = 0; c < ld; c += L) {
    V acc[K] = {};
    for (int64_t wo = 0; wo < Wo; ++wo) {
      const V gv = load<V>(g + wo * ld + c);
      const acc_t* xr = x + wo * S * ld + c;
#pragma GCC unroll 16
      for (int kw = 0; kw < K; ++kw) acc[kw] += gv * load<V>(xr + kw * ld);
    }
#pragma GCC unroll 16
    for (int kw = 0; kw < K; ++kw) {
      store(wout + kw * ld + c, load<V>(wout + kw * ld + c) + acc[kw]);
    }
  }
}

template <typename acc_t>
void wgrad_row_any(const acc_t* g, const acc_t* x, int k, int s, int64_t Wo, int64_t ld,
                   acc_t* wout) {
  using V = typename Simd<acc_t>::V;
  constexpr int64_t L = sizeof(V) / sizeof(acc_t);
  for (int kw = 0; kw < k; ++kw) {
    for (int64_t c = 0; c < ld; c += L) {
      V acc{};
      for (int64_t wo = 0; wo < Wo; ++wo) {
        acc += load<V>(g + wo * ld + c) * load<V>(x + (wo * s + kw) * ld + c);
      }
      store(wout + kw * ld + c, load<V>(wout + kw * ld + c) + acc);
    }
  }
}

template <typename acc_t>
void dispatch_wgrad_row(const acc_t* g, const acc_t* x, int k, int s, int64_t Wo, int64_t ld,
                        acc_t* wout) {
  dispatch_kernel_shape(
      k, s,
      [&](auto K, auto S) {
        wgrad_row<decltype(K)::value, decltype(S)::value>(g, x, Wo, ld, wout);
      },
      [&] { wgrad_row_any(g, x, k, s, Wo, ld, wout); });
}

// dst[c] = sum over taps i < n (in order) of src[i][c] * w[i][c], c < C: one output of the
// depthwise stencil or of its transpose, accumulated in registers per block of channels (the
// taps' operands come from L1 / L2; a memory accumulator would cost a load and a store per tap).
template <typename acc_t>
void tap_sum(const acc_t* const* src, const acc_t* const* w, int n, int64_t C, acc_t* dst) {
  using V = typename Simd<acc_t>::V;
  constexpr int64_t L = sizeof(V) / sizeof(acc_t), B = kTapVectors;
  int64_t c = 0;
  for (; c + B * L <= C; c += B * L) {
    V a[B] = {};
    for (int i = 0; i < n; ++i) {
      const acc_t* x = src[i] + c;
      const acc_t* y = w[i] + c;
#pragma GCC unroll 16
      for (int j = 0; j < B; ++j) a[j] += load<V>(x + j * L) * load<V>(y + j * L);
    }
#pragma GCC unroll 16
    for (int j = 0; j < B; ++j) store(dst + c + j * L, a[j]);
  }
  for (; c + L <= C; c += L) {
    V a{};
    for (int i = 0; i < n; ++i) a += load<V>(src[i] + c) * load<V>(w[i] + c);
    store(dst + c, a);
  }
  for (; c < C; ++c) {
    acc_t a = 0;
    for (int i = 0; i < n; ++i) a += src[i][c] * w[i][c];
    dst[c] = a;
  }
}

// ---- K2 depthwise forward -----------------------------------------------------------------

template <typename acc_t>
std::unique_ptr<Norm<acc_t>> in_norm(const Tensor& h, const OptTensor& mean, const OptTensor& var,
                                     const OptTensor& w, const OptTensor& b, double eps) {
  if (!given(mean)) return nullptr;
  return std::make_unique<Norm<acc_t>>(norm_of<acc_t>(h, *mean, *var, w, b, eps));
}

DwconvForwardResult dwconv_forward(const DwconvForwardArgs& a, const Act act) {
  const Map h = nhwc(a.h);
  const DwGeometry g = dw_geometry(h, a.weight, a.stride);
  Tensor d2 = empty_rows(a.h, g.N * g.Ho * g.Wo, g.C, a.h.scalar_type());
  Tensor mean = a.need_stats ? acc_empty(a.h, {g.C}) : acc_empty(a.h);
  Tensor var = a.need_stats ? acc_empty(a.h, {g.C}) : acc_empty(a.h);
  dispatch_dtype(a.h.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = at::opmath_type<scalar_t>;
    const auto bn = in_norm<acc_t>(a.h, a.in_mean, a.in_var, a.in_weight, a.in_bias, a.in_eps);
    const PaddedBand pb = padded_band<acc_t>(g.C, g.W, g.Wo, g.k, g.s);
    const auto taps = taps_of<acc_t, scalar_t>(a.weight, pb.ld);
    const scalar_t* hp = h.data<scalar_t>();
    scalar_t* dp = d2.mutable_data_ptr<scalar_t>();
    const int64_t C = g.C;
    const Chunks ch = band_chunks(g);
    const int64_t band_rows = ch.len / g.Wo;
    struct Scratch {
      std::unique_ptr<acc_t[]> a, out;
      std::vector<const acc_t*> rows;
    };
    dispatch_activation(act, [&](auto A) {
      // Per band of output rows: its input rows activated once into cache, then the stencil a
      // row at a time, then BN2's moments of the band.
      const auto part = for_chunks<acc_t>(
          ch, a.need_stats ? 2 * C : 0,
          [&] {
            const int64_t n = ((band_rows - 1) * g.s + g.k) * pb.row_ld();
            Scratch s{buffer<acc_t>(n), buffer<acc_t>(pb.out_cols * pb.ld),
                      std::vector<const acc_t*>(g.k)};
            std::fill_n(s.a.get(), n, acc_t(0));
            return s;
          },
          [&](int64_t n, int64_t p0, int64_t p1, acc_t* out, Scratch& s) {
            const int64_t ho0 = p0 / g.Wo, ho1 = p1 / g.Wo;
            const int64_t r0 = g.first_row(ho0), r1 = g.end_row(ho1);
            activated_rows<decltype(A)::value>(hp + n * g.H * g.W * C, r0, r1, g.W, C, bn.get(),
                                               s.a.get() + g.p() * pb.ld, pb.ld, pb.row_ld());
            scalar_t* image = dp + n * g.Ho * g.Wo * C;
            for (int64_t ho = ho0; ho < ho1; ++ho) {
              for (int kh = 0; kh < g.k; ++kh) {
                const int64_t hi = ho * g.s - g.p() + kh;
                s.rows[kh] = hi < 0 || hi >= g.H ? nullptr : s.a.get() + (hi - r0) * pb.row_ld();
              }
              dispatch_stencil_row(s.rows.data(), taps.data(), g.k, g.s, pb.out_cols, pb.ld,
                                   s.out.get());
              scalar_t* dst = image + ho * g.Wo * C;
              for (int64_t wo = 0; wo < g.Wo; ++wo) {
                const acc_t* src = s.out.get() + wo * pb.ld;
#pragma omp simd
                for (int64_t c = 0; c < C; ++c) dst[wo * C + c] = static_cast<scalar_t>(src[c]);
              }
            }
            if (a.need_stats) block_moments(image + p0 * C, p1 - p0, C, out);
          });
      if (a.need_stats) merge_moments(part, ch, C, mean, var);
    });
  });
  return {as_map(d2, g.N, g.Ho, g.Wo).contiguous(memory_format_of(a.h)), mean, var};
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
        bn_xhat(v, m[c], inv[c]));
    }
  } else {
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const acc_t v = static_cast<acc_t>(dr[c]);
      f(c, static_cast<acc_t>(ga[c]) * activate_grad<A>(v * sc[c] + sh[c]),
        bn_xhat(v, m[c], inv[c]));
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
  std::tuple<Tensor, Tensor> sums;
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
      sums = summed_grad_sums(part, ch, C, d_in);
    });
  });
  return sums;
}

DwconvBackwardResult dwconv_backward(const DwconvBackwardArgs& a, const Act act) {
  const Map h = nhwc(a.h);
  const DwGeometry g = dw_geometry(h, a.weight, a.stride);
  const Map d = nhwc(a.d), ga = nhwc(a.grad_a2);
  const int64_t C = g.C, Po = g.Ho * g.Wo, P = g.H * g.W, kk = int64_t(g.k) * g.k;
  const bool dgrad = a.output_mask[0], wgrad = a.output_mask[1], with_bn1 = given(a.in_mean);
  Tensor grad_h = a.h.new_empty({0}), grad_w = a.h.new_empty({0});
  Tensor sum_dy1 = acc_empty(a.h), sum_dy1_xhat1 = acc_empty(a.h);
  if (!dgrad && !wgrad) return {grad_h, grad_w, sum_dy1, sum_dy1_xhat1};
  Tensor gh2 = dgrad ? empty_rows(a.h, h.rows(), C, a.h.scalar_type()) : Tensor();
  dispatch_dtype(a.h.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = at::opmath_type<scalar_t>;
    const Norm<acc_t> bn2 = norm_of<acc_t>(a.d, a.mean2, a.var2, a.w2, a.b2, a.eps2);
    const NormGrad<acc_t> ng = norm_grad_of(bn2, a.sum_dy2, a.sum_dy2_xhat2, g.N * Po, a.training);
    const auto bn1 = in_norm<acc_t>(a.h, a.in_mean, a.in_var, a.in_weight, a.in_bias, a.in_eps);
    const auto share = pooled_share<acc_t>(a.grad_pooled, Po);
    // gd rows in the stencil's layout: the stride-1 input gradient is the stencil of gd with
    // the taps flipped; stride 2 sums its taps per input pixel (tap_sum).
    const PaddedBand pg = padded_band<acc_t>(C, g.Wo, g.W, g.k, 1);
    const PaddedBand pa = padded_band<acc_t>(C, g.W, g.Wo, g.k, g.s);  // a1's rows, for wgrad_row
    const bool dgrad_stencil = g.s == 1;
    const auto taps = dgrad && !dgrad_stencil ? taps_of<acc_t, scalar_t>(a.weight, C)
                                              : std::vector<acc_t>();
    const auto flipped = dgrad && dgrad_stencil ? taps_of<acc_t, scalar_t>(a.weight, pg.ld, true)
                                                : std::vector<acc_t>();
    const scalar_t* dp = d.data<scalar_t>();
    const scalar_t* gap = ga.data<scalar_t>();
    const scalar_t* hp = h.data<scalar_t>();
    scalar_t* ghp = dgrad ? gh2.mutable_data_ptr<scalar_t>() : nullptr;
    const Chunks ch = band_chunks(g);
    const int64_t band_rows = ch.len / g.Wo, p = g.p();
    // Per chunk: [BN1's two reductions (with BN1 and dgrad)][the k * k taps' weight gradient,
    // pa.ld values per tap].
    const int64_t sums_width = dgrad && with_bn1 ? 2 * C : 0;
    const int64_t wgrad_width = wgrad ? kk * pa.ld : 0;
    struct Scratch {
      std::unique_ptr<acc_t[]> gd, a, row;
      std::vector<const acc_t*> src, w, rows;
    };
    dispatch_activation(act, [&](auto A) {
      constexpr Act kA = decltype(A)::value;
      // One pass per band of output rows [ho0, ho1), all in cache: gd = BN2 backward of dy2 for
      // the output rows the band's input rows [hi0, hi1) read back (halo included); the input
      // gradient of those rows, with BN1's backward terms and, sharing its sigmoid, a1 =
      // act(BN1(h)); a1's halo rows; the weight gradient of the band's outputs.
      const auto part = for_chunks<acc_t>(
          ch, sums_width + wgrad_width,
          [&] {
            const int64_t gd_size = (band_rows + g.k + 1) * pg.row_ld();
            const int64_t a_size = wgrad ? (band_rows * g.s + g.k + 1) * pa.row_ld() : 0;
            Scratch s{buffer<acc_t>(gd_size), buffer<acc_t>(a_size),
                      buffer<acc_t>(pg.out_cols * pg.ld), std::vector<const acc_t*>(kk),
                      std::vector<const acc_t*>(kk), std::vector<const acc_t*>(g.k)};
            std::fill_n(s.gd.get(), gd_size, acc_t(0));  // the borders stay zero
            std::fill_n(s.a.get(), a_size, acc_t(0));
            return s;
          },
          [&](int64_t n, int64_t p0, int64_t p1, acc_t* out, Scratch& s) {
            const int64_t ho0 = p0 / g.Wo, ho1 = p1 / g.Wo;
            const int64_t hi0 = ho0 * g.s, hi1 = ho1 == g.Ho ? g.H : ho1 * g.s;
            const int64_t first = hi0 + p - (g.k - 1);  // output rows [g0, g1) feed [hi0, hi1)
            const int64_t g0 = first <= 0 ? 0 : (first + g.s - 1) / g.s;
            const int64_t g1 = std::min<int64_t>(g.Ho, (hi1 - 1 + p) / g.s + 1);
            const int64_t a0 = g.first_row(ho0), a1 = std::max(g.end_row(ho1), hi1);
            const acc_t* sh = share.empty() ? nullptr : share.data() + n * C;
            const acc_t *ma = ng.a.data(), *mb = ng.b.data(), *gi = ng.gi.data();
            acc_t* gd = s.gd.get();  // output pixel (ho, wo) of the band at gd_at(ho, wo)
            const auto gd_at = [&](int64_t ho, int64_t wo) {
              return gd + (ho - g0) * pg.row_ld() + (wo + p) * pg.ld;
            };
            for (int64_t r = g0 * g.Wo; r < g1 * g.Wo; ++r) {
              acc_t* dst = gd_at(r / g.Wo, r % g.Wo);
              const int64_t pos = n * Po + r;
              dy2_row<kA>(gap + pos * C, dp + pos * C, sh, bn2, C,
                          [&](int64_t c, acc_t dy, acc_t xh) {
                            dst[c] = bn_input_grad(dy, xh, ma[c], mb[c], gi[c]);
                          });
            }
            // a1 of input rows from a0: pixel (hi, wi) at a_at(hi, wi)
            const auto a_at = [&](int64_t hi, int64_t wi) {
              return s.a.get() + (hi - a0) * pa.row_ld() + (wi + p) * pa.ld;
            };
            const scalar_t* image = hp + n * P * C;
            if (dgrad) {
              acc_t* row = s.row.get();  // the input gradient of row hi, pixels pg.ld apart
              for (int64_t hi = hi0; hi < hi1; ++hi) {
                if (dgrad_stencil) {
                  for (int kh = 0; kh < g.k; ++kh) {
                    const int64_t th = hi - p + kh;
                    s.rows[kh] = th < 0 || th >= g.Ho ? nullptr : gd_at(th, -p);
                  }
                  dispatch_stencil_row(s.rows.data(), flipped.data(), g.k, 1, pg.out_cols, pg.ld,
                                       row);
                }
                for (int64_t wi = 0; wi < g.W && !dgrad_stencil; ++wi) {
                  int n_taps = 0;
                  for (int kh = 0; kh < g.k; ++kh) {
                    const int64_t th = hi + p - kh;
                    if (th < 0 || th % g.s != 0 || th / g.s >= g.Ho) continue;
                    for (int kw = 0; kw < g.k; ++kw) {
                      const int64_t tw = wi + p - kw;
                      if (tw < 0 || tw % g.s != 0 || tw / g.s >= g.Wo) continue;
                      s.src[n_taps] = gd_at(th / g.s, tw / g.s);
                      s.w[n_taps++] = taps.data() + (kh * g.k + kw) * C;
                    }
                  }
                  tap_sum(s.src.data(), s.w.data(), n_taps, C, row + wi * pg.ld);
                }
                const scalar_t* hr = image + hi * g.W * C;
                scalar_t* dst = ghp + (n * P + hi * g.W) * C;
                if (bn1) {
                  const acc_t *sc = bn1->scale.data(), *sf = bn1->shift.data();
                  const acc_t *m = bn1->mean.data(), *inv = bn1->invstd.data();
                  for (int64_t wi = 0; wi < g.W; ++wi) {
                    const int64_t o = wi * C;
                    const acc_t* gr = row + wi * pg.ld;
                    acc_t* ar = wgrad ? a_at(hi, wi) : nullptr;
#pragma omp simd
                    for (int64_t c = 0; c < C; ++c) {
                      const acc_t v = static_cast<acc_t>(hr[o + c]);
                      const acc_t y = v * sc[c] + sf[c];
                      const acc_t dy1 = gr[c] * activate_grad<kA>(y);
                      dst[o + c] = static_cast<scalar_t>(dy1);
                      out[c] += dy1;
                      out[C + c] += dy1 * (v - m[c]) * inv[c];
                      if (wgrad) ar[c] = activate<kA>(y);
                    }
                  }
                } else {
                  for (int64_t wi = 0; wi < g.W; ++wi) {
                    const int64_t o = wi * C;
                    const acc_t* gr = row + wi * pg.ld;
                    acc_t* ar = wgrad ? a_at(hi, wi) : nullptr;
#pragma omp simd
                    for (int64_t c = 0; c < C; ++c) {
                      dst[o + c] = static_cast<scalar_t>(gr[c]);
                      if (wgrad) ar[c] = static_cast<acc_t>(hr[o + c]);
                    }
                  }
                }
              }
            }
            if (wgrad) {
              const int64_t lda = pa.ld, row_lda = pa.row_ld();
              if (dgrad) {
                activated_rows<kA>(image, a0, hi0, g.W, C, bn1.get(), a_at(a0, 0), lda, row_lda);
                activated_rows<kA>(image, hi1, a1, g.W, C, bn1.get(), a_at(hi1, 0), lda, row_lda);
              } else {
                activated_rows<kA>(image, a0, a1, g.W, C, bn1.get(), a_at(a0, 0), lda, row_lda);
              }
              acc_t* wout = out + sums_width;
              for (int64_t ho = ho0; ho < ho1; ++ho) {
                for (int kh = 0; kh < g.k; ++kh) {
                  const int64_t hi = ho * g.s - p + kh;
                  if (hi < 0 || hi >= g.H) continue;
                  dispatch_wgrad_row(gd_at(ho, 0), a_at(hi, -p), g.k, g.s, g.Wo, pa.ld,
                                     wout + kh * g.k * pa.ld);
                }
              }
            }
          });
      std::vector<acc_t> total(sums_width + wgrad_width);
      sum_chunks(part, ch, static_cast<int64_t>(total.size()), false, total.data());
      if (sums_width) {
        sum_dy1 = acc_vector(a.h, total.data(), {C});
        sum_dy1_xhat1 = acc_vector(a.h, total.data() + C, {C});
      }
      if (wgrad) {
        grad_w = at::empty(a.weight.sizes(), a.weight.options());
        scalar_t* wp = grad_w.mutable_data_ptr<scalar_t>();
        const acc_t* tw = total.data() + sums_width;
        for (int64_t c = 0; c < C; ++c)
          for (int64_t i = 0; i < kk; ++i) {
            wp[c * kk + i] = static_cast<scalar_t>(tw[i * pa.ld + c]);
          }
      }
    });
  });
  if (dgrad) grad_h = as_map(gh2, g.N, g.H, g.W).contiguous(memory_format_of(a.h));
  return {grad_h, grad_w, sum_dy1, sum_dy1_xhat1};
}

}  // namespace

void register_mbconv_depthwise(torch::Library& m) {
  m.impl("mbconv_dwconv_forward", &dwconv_forward_entry<kCPU, dwconv_forward>);
  m.impl("mbconv_dwconv_backward_stats", &dwconv_backward_stats);
  m.impl("mbconv_dwconv_backward", &dwconv_backward_entry<kCPU, dwconv_backward>);
}

}  // namespace fused_mbconv::cpu::CPU_CAPABILITY
