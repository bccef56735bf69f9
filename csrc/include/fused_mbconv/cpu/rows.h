// What the CPU MBConv kernels (csrc/cpu/kernels/mbconv*.cpp) share: activations as NHWC rows,
// the per-channel BN constants, work chunks and their deterministic merges, vectors, and the 1x1
// convolutions' GEMMs on chunks of rows. csrc/cpu/kernels/mbconv.cpp describes the design.
//
// Compiled once per CPU capability, inside its namespace and target pragma
// (csrc/cpu/capability/*.cpp): the vector width below is the capability's.
#pragma once

#include "fused_mbconv/cpu/capability.h"

#ifndef CPU_CAPABILITY
#error "fused_mbconv/cpu/rows.h is compiled per CPU capability: include it from csrc/cpu/kernels/"
#endif

namespace fused_mbconv::cpu::CPU_CAPABILITY {

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

inline Map nhwc(const Tensor& x) {
  return {x.contiguous(MemoryFormat::ChannelsLast), x.size(0), x.size(1), x.size(2), x.size(3)};
}

// (N, C, H, W) with channels_last storage, from an (N * H * W, C) row matrix.
inline Tensor as_map(const Tensor& rows2d, int64_t N, int64_t H, int64_t W) {
  return rows2d.view({N, H, W, rows2d.size(1)}).permute({0, 3, 1, 2});
}

inline Tensor empty_rows(const Tensor& like, int64_t rows, int64_t C, at::ScalarType dtype) {
  return at::empty({rows, C}, like.options().dtype(dtype));
}

inline Tensor acc_empty(const Tensor& x, at::IntArrayRef shape = {0}) {
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

// bn_input_grad over `rows` rows of one BN's input v and output gradient dy (bn's channels
// each): out = the gradient of v for dy * dy_scale.
template <typename acc_t, typename scalar_t>
void bn_input_grad_rows(const scalar_t* v, const scalar_t* dy, acc_t dy_scale, int64_t rows,
                        const Norm<acc_t>& bn, const NormGrad<acc_t>& ng, acc_t* out) {
  const int64_t C = static_cast<int64_t>(bn.mean.size());
  const acc_t *m = bn.mean.data(), *inv = bn.invstd.data();
  const acc_t *a = ng.a.data(), *b = ng.b.data(), *gi = ng.gi.data();
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* vr = v + r * C;
    const scalar_t* gr = dy + r * C;
    acc_t* dst = out + r * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      dst[c] = bn_input_grad(static_cast<acc_t>(gr[c]) * dy_scale,
                             bn_xhat(static_cast<acc_t>(vr[c]), m[c], inv[c]), a[c], b[c], gi[c]);
    }
  }
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

inline Chunks position_chunks(int64_t N, int64_t P, int64_t C) {
  return Chunks(N, P, kChunkElems / C);
}

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

// The capability's widest vectors and how many of them it has, from its translation unit (a
// target pragma does not define __AVX2__ / __AVX512F__): the register blocks below (gemm_tn's
// accumulators) are sized to fit, as a block that spills runs several times slower (64-byte
// vectors on an AVX2 core, split into two registers each: B0's expand backward ran 5x slower).
constexpr int kVectorBytes = CPU_CAPABILITY_VECTOR_BYTES;
constexpr int kVectorRegisters = CPU_CAPABILITY_VECTOR_REGISTERS;

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
inline Chunks gemm_chunks(int64_t N, int64_t P, int64_t C) {
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
inline void gemm(Tensor out, const Tensor& a, const Tensor& b) {
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

// Chunk partials of [C sums of dy][C sums of dy * x_hat], summed in chunk order: the two
// per-channel vectors (sum dy, sum dy * x_hat) of a BN backward.
template <typename acc_t>
std::tuple<Tensor, Tensor> summed_grad_sums(const std::vector<acc_t>& partial, const Chunks& ch,
                                            int64_t C, const Tensor& like) {
  std::vector<acc_t> total(2 * C);
  sum_chunks(partial, ch, 2 * C, false, total.data());
  return {acc_vector(like, total.data(), {C}), acc_vector(like, total.data() + C, {C})};
}

// An optional per-sample / per-(sample, channel) vector in the accumulate dtype, or empty.
template <typename acc_t>
std::vector<acc_t> acc_values(const OptTensor& t) {
  if (!t.has_value() || !t->defined()) return {};
  const Tensor c = t->to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
  return std::vector<acc_t>(c.const_data_ptr<acc_t>(), c.const_data_ptr<acc_t>() + c.numel());
}


}  // namespace fused_mbconv::cpu::CPU_CAPABILITY
