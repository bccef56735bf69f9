// CPU kernels of the MBConv block's kernel interface (mbconv_*; fused_mbconv/reference.py is the
// specification of each function, docs/DESIGN.md the plan).
//
// Everything runs on NHWC rows: an activation is (N * H * W, C), channels fastest, so the
// per-channel BN / activation constants are vectors the inner `omp simd` loops stream alongside
// the data, and the 1x1 convolutions are GEMMs on (rows, C) blocks.
// channels_last inputs are used in place; NCHW inputs go through one channels_last copy and
// outputs come back NCHW.
//
// Work is split into fixed chunks of positions (never straddling an image; sizes depend on the
// shape only), each writing its own partial sums / moments, merged in chunk order (Chan's
// formula for moments): results do not depend on the thread count. The 1x1 convolutions run
// per chunk too, a few hundred rows at a time: each chunk builds its GEMM operand in an
// L2-resident buffer, multiplies (BLAS inside the chunk loop; the weight gradients' row
// reductions with gemm_tn, per chunk, summed in chunk order), and applies the epilogue
// (statistics, the gate gradient, the next operand) while the result is still in cache, so the
// expanded-size operands (a3, the gradients of q and e) are never written to memory.
//
// This file: the 1x1 convolutions, squeeze-excite and output kernels; the depthwise ones are in
// mbconv_depthwise.cpp, what they share in fused_mbconv/cpu/rows.h.

#include "fused_mbconv/cpu/rows.h"

namespace fused_mbconv::cpu::CPU_CAPABILITY {
namespace {

// ---- K1 expand ----------------------------------------------------------------------------

std::tuple<Tensor, Tensor, Tensor> expand_forward(const Tensor& x_in, const Tensor& weight,
                                                  bool need_stats) {
  check_expand_forward(x_in, weight, kCPU);
  const Map x = nhwc(x_in);
  const int64_t Cin = x.C, Ce = weight.size(0), P = x.P();
  Tensor e2 = empty_rows(x_in, x.rows(), Ce, x_in.scalar_type());
  Tensor mean = need_stats ? acc_empty(x_in, {Ce}) : acc_empty(x_in);
  Tensor var = need_stats ? acc_empty(x_in, {Ce}) : acc_empty(x_in);
  dispatch_dtype(x_in.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = at::opmath_type<scalar_t>;
    const Tensor wt = acc_matrix<acc_t>(weight).t();  // (Cin, Ce)
    const scalar_t* xp = x.data<scalar_t>();
    scalar_t* ep = e2.mutable_data_ptr<scalar_t>();
    const Chunks ch = gemm_chunks(x.N, P, Ce);
    struct Scratch {
      std::unique_ptr<acc_t[]> x, e;
    };
    // One pass: e = x * W^T per chunk, BN1's moments while the chunk is in cache.
    const auto part = for_chunks<acc_t>(
        ch, need_stats ? 2 * Ce : 0,
        [&] { return Scratch{buffer<acc_t>(ch.len * Cin), buffer<acc_t>(ch.len * Ce)}; },
        [&](int64_t n, int64_t p0, int64_t p1, acc_t* out, Scratch& s) {
          const int64_t r0 = n * P + p0, R = p1 - p0;
          acc_t* e = acc_target<acc_t>(ep + r0 * Ce, s.e.get());
          gemm(block(e, R, Ce), block(acc_rows(xp + r0 * Cin, R, Cin, s.x.get()), R, Cin), wt);
          store_rows(e, R * Ce, ep + r0 * Ce);
          if (need_stats) block_moments(ep + r0 * Ce, R, Ce, out);
        });
    if (need_stats) merge_moments(part, ch, Ce, mean, var);
  });
  return {as_map(e2, x.N, x.H, x.W).contiguous(memory_format_of(x_in)), mean, var};
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

template <bool kGrad, ActRole kRole>
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
    dispatch_role<kRole>(a, run);
  });
  return out;
}

Tensor excite_forward(const Tensor& pooled, const Tensor& w1, const Tensor& b1,
                      const Tensor& w2, const Tensor& b2, c10::string_view se_activation,
                      c10::string_view gate) {
  const auto [se, gt] = check_excite_forward(pooled, w1, b1, w2, b2, se_activation, gate, kCPU);
  const auto acc = pooled.scalar_type();
  const Tensor p = pooled.contiguous();
  const Tensor z1 = at::addmm(b1.to(acc), p, w1.to(acc).t());
  const Tensor s = map_activation<false, ActRole::Block>(z1, se);
  return map_activation<false, ActRole::Gate>(at::addmm(b2.to(acc), s, w2.to(acc).t()), gt);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> excite_backward(
    const Tensor& grad_gate, const Tensor& pooled, const Tensor& w1, const Tensor& b1,
    const Tensor& w2, const Tensor& b2, c10::string_view se_activation, c10::string_view gate) {
  const auto [se, gt] = check_excite_backward(grad_gate, pooled, w1, b1, w2, b2, se_activation,
                                              gate, kCPU);
  const auto acc = pooled.scalar_type();
  const Tensor p = pooled.contiguous(), w1a = w1.to(acc), w2a = w2.to(acc);
  const Tensor z1 = at::addmm(b1.to(acc), p, w1a.t());
  const Tensor s = map_activation<false, ActRole::Block>(z1, se);
  const Tensor z2 = at::addmm(b2.to(acc), s, w2a.t());
  const Tensor gz2 = grad_gate.to(acc) * map_activation<true, ActRole::Gate>(z2, gt);
  const Tensor gz1 = at::mm(gz2, w2a) * map_activation<true, ActRole::Block>(z1, se);
  return {at::mm(gz1, w1a), at::mm(gz1.t(), p), gz1.sum(0), at::mm(gz2.t(), s), gz2.sum(0)};
}

// ---- K5 project ---------------------------------------------------------------------------

// Rows of the projection's A operand a3 = act(BN2(d)) * gate in the accumulate dtype; `gate`:
// the rows' image's gate values, or nullptr without SE.
template <Act A, typename acc_t, typename scalar_t>
void project_operand(const scalar_t* d, int64_t rows, int64_t C, const Norm<acc_t>& bn,
                     const acc_t* gate, acc_t* a3) {
  const acc_t *sc = bn.scale.data(), *sh = bn.shift.data();
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* src = d + r * C;
    acc_t* dst = a3 + r * C;
    if (gate) {
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        dst[c] = activate<A>(static_cast<acc_t>(src[c]) * sc[c] + sh[c]) * gate[c];
      }
    } else {
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        dst[c] = activate<A>(static_cast<acc_t>(src[c]) * sc[c] + sh[c]);
      }
    }
  }
}

ProjectForwardResult project_forward(const ProjectForwardArgs& a, const Act act) {
  const Map d = nhwc(a.d);
  const int64_t C = d.C, Cout = a.weight.size(0), P = d.P();
  Tensor q2 = empty_rows(a.d, d.rows(), Cout, a.d.scalar_type());
  Tensor mean = a.need_stats ? acc_empty(a.d, {Cout}) : acc_empty(a.d);
  Tensor var = a.need_stats ? acc_empty(a.d, {Cout}) : acc_empty(a.d);
  dispatch_dtype(a.d.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = at::opmath_type<scalar_t>;
    const Norm<acc_t> bn = norm_of<acc_t>(a.d, a.mean2, a.var2, a.w2, a.b2, a.eps2);
    const auto gv = acc_values<acc_t>(a.gate);
    const Tensor wt = acc_matrix<acc_t>(a.weight).t();  // (C, Cout)
    const scalar_t* dp = d.data<scalar_t>();
    scalar_t* qp = q2.mutable_data_ptr<scalar_t>();
    const Chunks ch = gemm_chunks(d.N, P, C);
    struct Scratch {
      std::unique_ptr<acc_t[]> a3, q;
    };
    dispatch_activation(act, [&](auto A) {
      // One pass: a3 built per chunk in cache, q = a3 * W^T, BN3's moments of q.
      const auto part = for_chunks<acc_t>(
          ch, a.need_stats ? 2 * Cout : 0,
          [&] { return Scratch{buffer<acc_t>(ch.len * C), buffer<acc_t>(ch.len * Cout)}; },
          [&](int64_t n, int64_t p0, int64_t p1, acc_t* out, Scratch& s) {
            const int64_t r0 = n * P + p0, R = p1 - p0;
            project_operand<decltype(A)::value>(dp + r0 * C, R, C, bn,
                                                gv.empty() ? nullptr : gv.data() + n * C,
                                                s.a3.get());
            acc_t* q = acc_target<acc_t>(qp + r0 * Cout, s.q.get());
            gemm(block(q, R, Cout), block(s.a3.get(), R, C), wt);
            store_rows(q, R * Cout, qp + r0 * Cout);
            if (a.need_stats) block_moments(qp + r0 * Cout, R, Cout, out);
          });
      if (a.need_stats) merge_moments(part, ch, Cout, mean, var);
    });
  });
  return {as_map(q2, d.N, d.H, d.W).contiguous(memory_format_of(a.d)), mean, var};
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
  std::tuple<Tensor, Tensor> sums;
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
    sums = summed_grad_sums(part, ch, C, q_in);
  });
  return sums;
}

// ---- B5 project backward ------------------------------------------------------------------

ProjectBackwardResult project_backward(const ProjectBackwardArgs& a, const Act act) {
  const int64_t Cout = a.weight.size(0);
  const Map d = nhwc(a.d), q = nhwc(a.q), go = nhwc(a.grad_out);
  const int64_t C = d.C, P = d.P();
  const bool dgrad = a.output_mask[0], wgrad = a.output_mask[1], gated = given(a.gate);
  Tensor grad_a2 = a.d.new_empty({0}), grad_gate = acc_empty(a.d);
  Tensor grad_weight = a.d.new_empty({0});
  if (!dgrad && !wgrad) return {grad_a2, grad_gate, grad_weight};
  Tensor ga2 = dgrad ? empty_rows(a.d, d.rows(), C, a.d.scalar_type()) : Tensor();
  dispatch_dtype(a.d.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = at::opmath_type<scalar_t>;
    const Norm<acc_t> bn3 = norm_of<acc_t>(a.q, a.mean3, a.var3, a.w3, a.b3, a.eps3);
    const NormGrad<acc_t> ng = norm_grad_of(bn3, a.sum_dy3, a.sum_dy3_xhat3, d.rows(), a.training);
    const Norm<acc_t> bn2 = norm_of<acc_t>(a.d, a.mean2, a.var2, a.w2, a.b2, a.eps2);
    const auto ss = acc_values<acc_t>(a.sample_scale);
    const auto gv = acc_values<acc_t>(a.gate);
    const Tensor w = acc_matrix<acc_t>(a.weight);  // (Cout, C)
    const scalar_t* qp = q.data<scalar_t>();
    const scalar_t* gop = go.data<scalar_t>();
    const scalar_t* dp = d.data<scalar_t>();
    scalar_t* ga2p = dgrad ? ga2.mutable_data_ptr<scalar_t>() : nullptr;
    const Chunks ch = gemm_chunks(d.N, P, C);
    std::vector<acc_t> wparts(wgrad ? ch.count() * Cout * C : 0);
    struct Scratch {
      std::unique_ptr<acc_t[]> gq, buf;
    };
    dispatch_activation(act, [&](auto A) {
      constexpr Act kA = decltype(A)::value;
      // Per chunk: gq = BN3 backward of dy3 = grad_out * sample_scale; ga3 = gq * W; then one
      // elementwise pass recomputing a2 = act(BN2(d)) for grad_a2 = ga3 * gate and the gate
      // gradient, leaving a3 = a2 * gate in place of ga3 for the weight gradient gq^T * a3.
      const auto part = for_chunks<acc_t>(
          ch, dgrad && gated ? C : 0,
          [&] { return Scratch{buffer<acc_t>(ch.len * Cout), padded_buffer<acc_t>(ch.len, C)}; },
          [&](int64_t n, int64_t p0, int64_t p1, acc_t* gate_sums, Scratch& s) {
            const int64_t r0 = n * P + p0, R = p1 - p0;
            const acc_t sn = ss.empty() ? acc_t(1) : ss[n];
            acc_t* gq = s.gq.get();
            bn_input_grad_rows(qp + r0 * Cout, gop + r0 * Cout, sn, R, bn3, ng, gq);
            acc_t* buf = s.buf.get();
            const acc_t* g = gated ? gv.data() + n * C : nullptr;
            if (dgrad) {
              gemm(block(buf, R, C), block(gq, R, Cout), w);
              if (gated) {
                const acc_t *sc = bn2.scale.data(), *sh = bn2.shift.data();
                for (int64_t r = 0; r < R; ++r) {
                  const scalar_t* dr = dp + (r0 + r) * C;
                  scalar_t* dst = ga2p + (r0 + r) * C;
                  acc_t* br = buf + r * C;
#pragma omp simd
                  for (int64_t c = 0; c < C; ++c) {
                    const acc_t a2 = activate<kA>(static_cast<acc_t>(dr[c]) * sc[c] + sh[c]);
                    const acc_t v = br[c];
                    dst[c] = static_cast<scalar_t>(v * g[c]);
                    gate_sums[c] += v * a2;
                    br[c] = a2 * g[c];
                  }
                }
              } else {
                scalar_t* dst = ga2p + r0 * C;
#pragma omp simd
                for (int64_t i = 0; i < R * C; ++i) dst[i] = static_cast<scalar_t>(buf[i]);
                if (wgrad) project_operand<kA>(dp + r0 * C, R, C, bn2, g, buf);
              }
            } else {
              project_operand<kA>(dp + r0 * C, R, C, bn2, g, buf);
            }
            if (wgrad) {
              const int64_t i = n * ch.per_image + p0 / ch.len;
              gemm_tn(gq, buf, R, Cout, C, wparts.data() + i * Cout * C);
            }
          });
      if (dgrad && gated) {
        grad_gate = acc_empty(a.d, {d.N, C});
        sum_chunks(part, ch, C, true, grad_gate.mutable_data_ptr<acc_t>());
      }
      if (wgrad) grad_weight = summed_matrix<scalar_t>(wparts, ch, Cout, C, false, a.d);
    });
  });
  if (dgrad) grad_a2 = as_map(ga2, d.N, d.H, d.W).contiguous(memory_format_of(a.d));
  return {grad_a2, grad_gate, grad_weight};
}

// ---- B1 expand backward -------------------------------------------------------------------

ExpandBackwardResult expand_backward(const ExpandBackwardArgs& a) {
  const int64_t Ce = a.weight.size(0);
  const Map x = nhwc(a.x), e = nhwc(a.e), gy = nhwc(a.grad_y1);
  const Map res = given(a.grad_residual) ? nhwc(*a.grad_residual) : Map{};
  const int64_t Cin = x.C, P = x.P();
  const bool dgrad = a.output_mask[0], wgrad = a.output_mask[1];
  Tensor grad_x = a.x.new_empty({0}), grad_w = a.x.new_empty({0});
  if (!dgrad && !wgrad) return {grad_x, grad_w};
  Tensor gx2 = dgrad ? empty_rows(a.x, x.rows(), Cin, a.x.scalar_type()) : Tensor();
  dispatch_dtype(a.x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = at::opmath_type<scalar_t>;
    const Norm<acc_t> bn = norm_of<acc_t>(a.e, a.mean1, a.var1, a.w1, a.b1, a.eps1);
    const NormGrad<acc_t> ng = norm_grad_of(bn, a.sum_dy1, a.sum_dy1_xhat1, x.rows(), a.training);
    const Tensor w = acc_matrix<acc_t>(a.weight);  // (Ce, Cin)
    const scalar_t* ep = e.data<scalar_t>();
    const scalar_t* gp = gy.data<scalar_t>();
    const scalar_t* xp = x.data<scalar_t>();
    const scalar_t* rp = res.t.defined() ? res.data<scalar_t>() : nullptr;
    scalar_t* gxp = dgrad ? gx2.mutable_data_ptr<scalar_t>() : nullptr;
    const Chunks ch = gemm_chunks(x.N, P, Ce);
    std::vector<acc_t> wparts(wgrad ? ch.count() * Ce * Cin : 0);
    struct Scratch {
      std::unique_ptr<acc_t[]> ge, gx, x;
    };
    // Per chunk: ge = BN1 backward of grad_y1 in cache, then grad_x = ge * W (+ the residual's
    // gradient) and the weight gradient's chunk ge^T * x.
    for_chunks<acc_t>(
        ch, 0,
        [&] {
          return Scratch{padded_buffer<acc_t>(ch.len, Ce), buffer<acc_t>(ch.len * Cin),
                         buffer<acc_t>(ch.len * Cin)};
        },
        [&](int64_t n, int64_t p0, int64_t p1, acc_t*, Scratch& s) {
          const int64_t r0 = n * P + p0, R = p1 - p0;
          acc_t* ge = s.ge.get();
          bn_input_grad_rows(ep + r0 * Ce, gp + r0 * Ce, acc_t(1), R, bn, ng, ge);
          if (dgrad) {
            acc_t* gx = s.gx.get();
            gemm(block(gx, R, Cin), block(ge, R, Ce), w);
            scalar_t* dst = gxp + r0 * Cin;
            if (rp) {
              const scalar_t* rr = rp + r0 * Cin;
#pragma omp simd
              for (int64_t i = 0; i < R * Cin; ++i) {
                dst[i] = static_cast<scalar_t>(gx[i] + static_cast<acc_t>(rr[i]));
              }
            } else {
#pragma omp simd
              for (int64_t i = 0; i < R * Cin; ++i) dst[i] = static_cast<scalar_t>(gx[i]);
            }
          }
          if (wgrad) {  // as (x^T ge)^T: gemm_tn vectorizes along the wide side, Ce
            const int64_t i = n * ch.per_image + p0 / ch.len;
            gemm_tn(acc_rows(xp + r0 * Cin, R, Cin, s.x.get()), ge, R, Cin, Ce,
                    wparts.data() + i * Cin * Ce);
          }
        });
    if (wgrad) grad_w = summed_matrix<scalar_t>(wparts, ch, Cin, Ce, true, a.x);
  });
  if (dgrad) grad_x = as_map(gx2, x.N, x.H, x.W).contiguous(memory_format_of(a.x));
  return {grad_x, grad_w};
}

}  // namespace

void register_mbconv(torch::Library& m) {
  m.impl("mbconv_expand_forward", &expand_forward);
  m.impl("mbconv_squeeze_forward", &squeeze_forward);
  m.impl("mbconv_excite_forward", &excite_forward);
  m.impl("mbconv_project_forward", &project_forward_entry<kCPU, project_forward>);
  m.impl("mbconv_output_forward", &output_forward);
  m.impl("mbconv_output_backward_stats", &output_backward_stats);
  m.impl("mbconv_project_backward", &project_backward_entry<kCPU, project_backward>);
  m.impl("mbconv_excite_backward", &excite_backward);
  m.impl("mbconv_expand_backward", &expand_backward_entry<kCPU, expand_backward>);
}

}  // namespace fused_mbconv::cpu::CPU_CAPABILITY
