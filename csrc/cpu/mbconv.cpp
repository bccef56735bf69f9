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

// 512-bit vectors where the target has them. GCC's tuning for AVX-512 CPUs prefers 256-bit ones;
// the activation passes, bound by exp's polynomial, run ~1.4x faster at 512 on a Sapphire Rapids
// core (a 3.6M-value SiLU reduction: 2.35 -> 1.65 ms). Set before the includes: the loop bodies
// are inlined into ATen's parallel_for, whose OpenMP outlined functions the headers define.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC target("prefer-vector-width=512")
#endif

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <memory>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "fused_mbconv/block_checks.h"
#include "fused_mbconv/bn.h"
#include "fused_mbconv/host.h"
#include "fused_mbconv/math.h"

namespace fused_mbconv {
namespace {

using at::MemoryFormat;
constexpr auto kCPU = c10::DeviceType::CPU;
constexpr int64_t kChunkElems = 16384;  // elements per chunk: L2-resident, shape-determined
// Elements of the widest operand per GEMM chunk (512 KB in fp32): rows enough for BLAS to run at
// its full-size speed (B0 stage 2: 784 rows), buffers that stay in a 2 MB L2.
constexpr int64_t kGemmChunkElems = 131072;

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
    const BnConstants<acc_t> k = bn_constants<acc_t>(
        m.const_data_ptr<acc_t>()[c], v.const_data_ptr<acc_t>()[c], g.const_data_ptr<acc_t>()[c],
        be.const_data_ptr<acc_t>()[c], static_cast<acc_t>(eps));
    n.mean[c] = k.mean;
    n.invstd[c] = k.invstd;
    n.scale[c] = k.scale;
    n.shift[c] = k.shift;
  }
  return n;
}

// BN backward constants (bn.h's bn_input_grad): a, b the means of dy and dy * x_hat in
// training, 0 in eval; gi = scale.
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
      g.a[c] = bn_grad_mean(s.const_data_ptr<acc_t>()[c], static_cast<acc_t>(count));
      g.b[c] = bn_grad_mean(sx.const_data_ptr<acc_t>()[c], static_cast<acc_t>(count));
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

// f(n, p0, p1, partial, scratch) for every chunk, in parallel; partial: `width` zeroed values per
// chunk; scratch: one make_scratch() per thread, reused by its chunks (their buffers).
template <typename acc_t, typename MakeScratch, typename F>
std::vector<acc_t> for_chunks(const Chunks& ch, int64_t width, const MakeScratch& make_scratch,
                              const F& f) {
  std::vector<acc_t> partial(ch.count() * width, acc_t(0));
  at::parallel_for(0, ch.count(), 1, [&](int64_t begin, int64_t end) {
    auto scratch = make_scratch();
    for (int64_t i = begin; i < end; ++i) {
      const int64_t n = i / ch.per_image, p0 = (i % ch.per_image) * ch.len;
      f(n, p0, std::min(p0 + ch.len, ch.P), partial.data() + i * width, scratch);
    }
  });
  return partial;
}

// f(n, p0, p1, partial) for every chunk, in parallel.
template <typename acc_t, typename F>
std::vector<acc_t> for_chunks(const Chunks& ch, int64_t width, const F& f) {
  return for_chunks<acc_t>(ch, width, [] { return 0; },
                           [&](int64_t n, int64_t p0, int64_t p1, acc_t* out, int) {
                             f(n, p0, p1, out);
                           });
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

// ---- vectors ------------------------------------------------------------------------------

// The target's widest vectors and how many of them it has: the register blocks below (gemm_tn's
// accumulators) are sized to fit, as a block that spills runs several times slower (64-byte
// vectors on an AVX2 core, split into two registers each: B0's expand backward ran 5x slower).
#if defined(__AVX512F__)
constexpr int kVectorBytes = 64, kVectorRegisters = 32;
#elif defined(__AVX__)
constexpr int kVectorBytes = 32, kVectorRegisters = 16;
#elif defined(__aarch64__)
constexpr int kVectorBytes = 16, kVectorRegisters = 32;
#else
constexpr int kVectorBytes = 16, kVectorRegisters = 16;
#endif

// Vectors of the accumulate dtype (GCC / Clang vector extensions).
template <typename T>
struct Simd {
  typedef T V __attribute__((vector_size(kVectorBytes)));
};

template <typename V, typename T>
inline V load(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

template <typename V, typename T>
inline void store(T* p, const V& v) {
  std::memcpy(p, &v, sizeof(V));
}

// ---- 1x1 convolutions as GEMMs on chunks of rows -----------------------------------------

// Chunks for the row-blocked GEMMs: at most kGemmChunkElems / C rows, equal within an image (a
// short remainder chunk runs BLAS at a worse shape: 406 rows of B0 stage 2 took 2x 784's time).
Chunks gemm_chunks(int64_t N, int64_t P, int64_t C) {
  const int64_t per_image = (P * C + kGemmChunkElems - 1) / kGemmChunkElems;
  return Chunks(N, P, (P + per_image - 1) / per_image);
}

// Uninitialized buffer of n values (a chunk's operand or result).
template <typename T>
std::unique_ptr<T[]> buffer(int64_t n) {
  return std::unique_ptr<T[]>(new T[n]);
}

// A row-major (rows, C) block as a tensor for BLAS: no copy, no autograd history.
template <typename T>
Tensor block(const T* p, int64_t rows, int64_t C) {
  return at::from_blob(const_cast<T*>(p), {rows, C},
                       at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
}

// out = a * b through BLAS (at::mm_out): the products with a weight matrix, reductions over
// channels. Called from the chunk loop's worker threads.
void gemm(Tensor out, const Tensor& a, const Tensor& b) {
  at::AutoDispatchBelowADInplaceOrView guard;  // worker threads: straight to the CPU kernel
  at::mm_out(out, a, b);
}

// out (M, N) = A^T B for row-major A (R, M) and B (R, N), summed over r in order: the weight
// gradients, reductions over a chunk's rows. BLAS blocks a long reduction by its thread count
// (1 and 2 threads differed in the last bits); this depends on the shape only, and runs at
// BLAS speed here (B0 stage 2 shapes, one core: ~100 GFLOPS, BLAS ~75). B must stay readable one
// vector past its last row (a padded buffer): a partial vector of columns is loaded whole.
template <int MB, int NV, typename acc_t>
inline void gemm_tn_block(const acc_t* A, int64_t lda, const acc_t* B, int64_t ldb, int64_t R,
                          int64_t last_lanes, acc_t* out, int64_t ldo) {
  using V = typename Simd<acc_t>::V;
  constexpr int64_t L = sizeof(V) / sizeof(acc_t);
  V acc[MB][NV] = {};
  for (int64_t r = 0; r < R; ++r) {
    V b[NV];
    for (int j = 0; j < NV; ++j) b[j] = load<V>(B + r * ldb + j * L);
    for (int i = 0; i < MB; ++i) {
      const acc_t a = A[r * lda + i];
      for (int j = 0; j < NV; ++j) acc[i][j] += a * b[j];
    }
  }
  for (int i = 0; i < MB; ++i) {
    for (int j = 0; j + 1 < NV; ++j) store(out + i * ldo + j * L, acc[i][j]);
    std::memcpy(out + i * ldo + (NV - 1) * L, &acc[i][NV - 1], last_lanes * sizeof(acc_t));
  }
}

// Rows of out per gemm_tn block of 3 vectors: its MB x 3 accumulators, 3 loads of B and the
// broadcast of A fill the vector registers.
constexpr int kGemmRows = (kVectorRegisters - 4) / 3 >= 8 ? 8 : 4;

// Columns [c, c + (NV - 1) * L + last_lanes) of gemm_tn, in blocks of kGemmRows, half that and
// 1 rows of out.
template <int NV, typename acc_t>
void gemm_tn_columns(const acc_t* A, const acc_t* B, int64_t R, int64_t M, int64_t N, int64_t c,
                     int64_t last_lanes, acc_t* out) {
  constexpr int MB = kGemmRows, HB = kGemmRows / 2;
  int64_t o = 0;
  const acc_t* b = B + c;
  acc_t* dst = out + c;
  for (; o + MB <= M; o += MB) {
    gemm_tn_block<MB, NV>(A + o, M, b, N, R, last_lanes, dst + o * N, N);
  }
  for (; o + HB <= M; o += HB) {
    gemm_tn_block<HB, NV>(A + o, M, b, N, R, last_lanes, dst + o * N, N);
  }
  for (; o < M; ++o) gemm_tn_block<1, NV>(A + o, M, b, N, R, last_lanes, dst + o * N, N);
}

template <typename acc_t>
void gemm_tn(const acc_t* A, const acc_t* B, int64_t R, int64_t M, int64_t N, acc_t* out) {
  constexpr int64_t L = sizeof(typename Simd<acc_t>::V) / sizeof(acc_t);
  int64_t c = 0;
  for (; c + 3 * L <= N; c += 3 * L) gemm_tn_columns<3>(A, B, R, M, N, c, L, out);
  for (; c + L <= N; c += L) gemm_tn_columns<1>(A, B, R, M, N, c, L, out);
  if (c < N) gemm_tn_columns<1>(A, B, R, M, N, c, N - c, out);
}

// A chunk's (rows, C) operand buffer for gemm_tn's B: one zeroed vector of padding.
template <typename acc_t>
std::unique_ptr<acc_t[]> padded_buffer(int64_t rows, int64_t C) {
  constexpr int64_t L = sizeof(typename Simd<acc_t>::V) / sizeof(acc_t);
  auto b = buffer<acc_t>(rows * C + L);
  std::fill(b.get() + rows * C, b.get() + rows * C + L, acc_t(0));
  return b;
}

// A weight matrix in the accumulate dtype (the GEMMs run in it whatever the activations' dtype).
template <typename acc_t>
Tensor acc_matrix(const Tensor& w) {
  return w.detach().to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
}

// Rows [r0, r0 + rows) of an (., C) scalar_t matrix as acc_t: in place when the types agree,
// else converted into `scratch`.
template <typename acc_t, typename scalar_t>
const acc_t* acc_rows(const scalar_t* src, int64_t rows, int64_t C, acc_t* scratch) {
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    return src;
  } else {
#pragma omp simd
    for (int64_t i = 0; i < rows * C; ++i) scratch[i] = static_cast<acc_t>(src[i]);
    return scratch;
  }
}

// Where an acc_t result for rows of a scalar_t matrix goes: the rows themselves when the types
// agree, else `scratch` (store_rows then rounds it into place).
template <typename acc_t, typename scalar_t>
acc_t* acc_target(scalar_t* dst, acc_t* scratch) {
  if constexpr (std::is_same_v<acc_t, scalar_t>) return dst;
  else return scratch;
}

template <typename acc_t, typename scalar_t>
void store_rows(const acc_t* src, int64_t n, scalar_t* dst) {
  if constexpr (!std::is_same_v<acc_t, scalar_t>) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<scalar_t>(src[i]);
  }
}

// Per-chunk (rows, cols) GEMM partials (weight gradients) summed in chunk order, rounded to
// scalar_t; transposed: returned as (cols, rows).
template <typename scalar_t, typename acc_t>
Tensor summed_matrix(const std::vector<acc_t>& partial, const Chunks& ch, int64_t rows,
                     int64_t cols, bool transposed, const Tensor& like) {
  std::vector<acc_t> total(rows * cols);
  sum_chunks(partial, ch, rows * cols, false, total.data());
  Tensor out = at::empty(transposed ? at::IntArrayRef{cols, rows} : at::IntArrayRef{rows, cols},
                         like.options());
  scalar_t* o = out.mutable_data_ptr<scalar_t>();
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      o[transposed ? c * rows + r : r * cols + c] = static_cast<scalar_t>(total[r * cols + c]);
    }
  }
  return out;
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
    const PaddedBand pb = padded_band<acc_t>(g.C, g.W, g.Wo, g.k, g.s);
    const auto taps = taps_of<acc_t, scalar_t>(weight, pb.ld);
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
          ch, need_stats ? 2 * C : 0,
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

std::tuple<Tensor, Tensor, Tensor> project_forward(
    const Tensor& d_in, const OptTensor& gate, const Tensor& weight, const Tensor& mean2,
    const Tensor& var2, const OptTensor& w2, const OptTensor& b2, double eps2,
    c10::string_view activation, bool need_stats) {
  const Act act = check_project_forward(d_in, gate, weight, mean2, var2, w2, b2, eps2, activation,
                                        kCPU);
  const Map d = nhwc(d_in);
  const int64_t C = d.C, Cout = weight.size(0), P = d.P();
  Tensor q2 = empty_rows(d_in, d.rows(), Cout, d_in.scalar_type());
  Tensor mean = need_stats ? acc_empty(d_in, {Cout}) : acc_empty(d_in);
  Tensor var = need_stats ? acc_empty(d_in, {Cout}) : acc_empty(d_in);
  dispatch_dtype(d_in.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = at::opmath_type<scalar_t>;
    const Norm<acc_t> bn = norm_of<acc_t>(d_in, mean2, var2, w2, b2, eps2);
    const auto gv = acc_values<acc_t>(gate);
    const Tensor wt = acc_matrix<acc_t>(weight).t();  // (C, Cout)
    const scalar_t* dp = d.data<scalar_t>();
    scalar_t* qp = q2.mutable_data_ptr<scalar_t>();
    const Chunks ch = gemm_chunks(d.N, P, C);
    struct Scratch {
      std::unique_ptr<acc_t[]> a3, q;
    };
    dispatch_activation(act, [&](auto A) {
      // One pass: a3 built per chunk in cache, q = a3 * W^T, BN3's moments of q.
      const auto part = for_chunks<acc_t>(
          ch, need_stats ? 2 * Cout : 0,
          [&] { return Scratch{buffer<acc_t>(ch.len * C), buffer<acc_t>(ch.len * Cout)}; },
          [&](int64_t n, int64_t p0, int64_t p1, acc_t* out, Scratch& s) {
            const int64_t r0 = n * P + p0, R = p1 - p0;
            project_operand<decltype(A)::value>(dp + r0 * C, R, C, bn,
                                                gv.empty() ? nullptr : gv.data() + n * C,
                                                s.a3.get());
            acc_t* q = acc_target<acc_t>(qp + r0 * Cout, s.q.get());
            gemm(block(q, R, Cout), block(s.a3.get(), R, C), wt);
            store_rows(q, R * Cout, qp + r0 * Cout);
            if (need_stats) block_moments(qp + r0 * Cout, R, Cout, out);
          });
      if (need_stats) merge_moments(part, ch, Cout, mean, var);
    });
  });
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
  const bool dgrad = output_mask[0], wgrad = output_mask[1], gated = given(gate);
  Tensor grad_a2 = d_in.new_empty({0}), grad_gate = acc_empty(d_in);
  Tensor grad_weight = d_in.new_empty({0});
  if (!dgrad && !wgrad) return {grad_a2, grad_gate, grad_weight};
  Tensor ga2 = dgrad ? empty_rows(d_in, d.rows(), C, d_in.scalar_type()) : Tensor();
  dispatch_dtype(d_in.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = at::opmath_type<scalar_t>;
    const Norm<acc_t> bn3 = norm_of<acc_t>(q_in, mean3, var3, w3, b3, eps3);
    const NormGrad<acc_t> ng = norm_grad_of(bn3, sum_dy3, sum_dy3_xhat3, d.rows(), training);
    const Norm<acc_t> bn2 = norm_of<acc_t>(d_in, mean2, var2, w2, b2, eps2);
    const auto ss = acc_values<acc_t>(sample_scale);
    const auto gv = acc_values<acc_t>(gate);
    const Tensor w = acc_matrix<acc_t>(weight);  // (Cout, C)
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
            const acc_t *m = bn3.mean.data(), *inv = bn3.invstd.data();
            const acc_t *a = ng.a.data(), *b = ng.b.data(), *gi = ng.gi.data();
            acc_t* gq = s.gq.get();
            for (int64_t r = 0; r < R; ++r) {
              const scalar_t* qr = qp + (r0 + r) * Cout;
              const scalar_t* gr = gop + (r0 + r) * Cout;
              acc_t* dst = gq + r * Cout;
#pragma omp simd
              for (int64_t c = 0; c < Cout; ++c) {
                dst[c] = bn_input_grad(static_cast<acc_t>(gr[c]) * sn,
                                       bn_xhat(static_cast<acc_t>(qr[c]), m[c], inv[c]), a[c],
                                       b[c], gi[c]);
              }
            }
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
        grad_gate = acc_empty(d_in, {d.N, C});
        sum_chunks(part, ch, C, true, grad_gate.mutable_data_ptr<acc_t>());
      }
      if (wgrad) grad_weight = summed_matrix<scalar_t>(wparts, ch, Cout, C, false, d_in);
    });
  });
  if (dgrad) grad_a2 = as_map(ga2, d.N, d.H, d.W).contiguous(memory_format_of(d_in));
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
  const int64_t C = g.C, Po = g.Ho * g.Wo, P = g.H * g.W, kk = int64_t(g.k) * g.k;
  const bool dgrad = output_mask[0], wgrad = output_mask[1], with_bn1 = given(in_mean);
  Tensor grad_h = h_in.new_empty({0}), grad_w = h_in.new_empty({0});
  Tensor sum_dy1 = acc_empty(h_in), sum_dy1_xhat1 = acc_empty(h_in);
  if (!dgrad && !wgrad) return {grad_h, grad_w, sum_dy1, sum_dy1_xhat1};
  Tensor gh2 = dgrad ? empty_rows(h_in, h.rows(), C, h_in.scalar_type()) : Tensor();
  dispatch_dtype(h_in.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = at::opmath_type<scalar_t>;
    const Norm<acc_t> bn2 = norm_of<acc_t>(d_in, mean2, var2, w2, b2, eps2);
    const NormGrad<acc_t> ng = norm_grad_of(bn2, sum_dy2, sum_dy2_xhat2, g.N * Po, training);
    const auto bn1 = in_norm<acc_t>(h_in, in_mean, in_var, in_weight, in_bias, in_eps);
    const auto share = pooled_share<acc_t>(grad_pooled, Po);
    // gd rows in the stencil's layout: the stride-1 input gradient is the stencil of gd with
    // the taps flipped; stride 2 sums its taps per input pixel (tap_sum).
    const PaddedBand pg = padded_band<acc_t>(C, g.Wo, g.W, g.k, 1);
    const PaddedBand pa = padded_band<acc_t>(C, g.W, g.Wo, g.k, g.s);  // a1's rows, for wgrad_row
    const bool dgrad_stencil = g.s == 1;
    const auto taps = dgrad && !dgrad_stencil ? taps_of<acc_t, scalar_t>(weight, C)
                                              : std::vector<acc_t>();
    const auto flipped = dgrad && dgrad_stencil ? taps_of<acc_t, scalar_t>(weight, pg.ld, true)
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
        sum_dy1 = acc_vector(h_in, total.data(), {C});
        sum_dy1_xhat1 = acc_vector(h_in, total.data() + C, {C});
      }
      if (wgrad) {
        grad_w = at::empty(weight.sizes(), weight.options());
        scalar_t* wp = grad_w.mutable_data_ptr<scalar_t>();
        const acc_t* tw = total.data() + sums_width;
        for (int64_t c = 0; c < C; ++c)
          for (int64_t i = 0; i < kk; ++i) {
            wp[c * kk + i] = static_cast<scalar_t>(tw[i * pa.ld + c]);
          }
      }
    });
  });
  if (dgrad) grad_h = as_map(gh2, g.N, g.H, g.W).contiguous(memory_format_of(h_in));
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
  const Map res = given(grad_residual) ? nhwc(*grad_residual) : Map{};
  const int64_t Cin = x.C, P = x.P();
  const bool dgrad = output_mask[0], wgrad = output_mask[1];
  Tensor grad_x = x_in.new_empty({0}), grad_w = x_in.new_empty({0});
  if (!dgrad && !wgrad) return {grad_x, grad_w};
  Tensor gx2 = dgrad ? empty_rows(x_in, x.rows(), Cin, x_in.scalar_type()) : Tensor();
  dispatch_dtype(x_in.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = at::opmath_type<scalar_t>;
    const Norm<acc_t> bn = norm_of<acc_t>(e_in, mean1, var1, w1, b1, eps1);
    const NormGrad<acc_t> ng = norm_grad_of(bn, sum_dy1, sum_dy1_xhat1, x.rows(), training);
    const Tensor w = acc_matrix<acc_t>(weight);  // (Ce, Cin)
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
          const acc_t *m = bn.mean.data(), *inv = bn.invstd.data();
          const acc_t *a = ng.a.data(), *b = ng.b.data(), *gi = ng.gi.data();
          acc_t* ge = s.ge.get();
          for (int64_t r = 0; r < R; ++r) {
            const scalar_t* er = ep + (r0 + r) * Ce;
            const scalar_t* gr = gp + (r0 + r) * Ce;
            acc_t* dst = ge + r * Ce;
#pragma omp simd
            for (int64_t c = 0; c < Ce; ++c) {
              dst[c] = bn_input_grad(static_cast<acc_t>(gr[c]),
                                     bn_xhat(static_cast<acc_t>(er[c]), m[c], inv[c]), a[c], b[c],
                                     gi[c]);
            }
          }
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
    if (wgrad) grad_w = summed_matrix<scalar_t>(wparts, ch, Cin, Ce, true, x_in);
  });
  if (dgrad) grad_x = as_map(gx2, x.N, x.H, x.W).contiguous(memory_format_of(x_in));
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
