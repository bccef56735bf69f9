// Deterministic reductions of the CUDA kernels: fixed-order trees inside a block, per-block
// partials merged in a fixed order by a second kernel, no atomics. A result depends on the
// shape and the GPU's SM count only, never on scheduling.
#pragma once

#include <type_traits>

#include "fused_mbconv/cuda/runtime.cuh"
#include "fused_mbconv/math.h"

namespace fused_mbconv {
namespace cuda {

// ---- accumulators: trivial aggregates (they live in __shared__ arrays); `{}` is empty ------

template <typename T, int M>
struct Sums {
  T v[M];
};

// A reduction with nothing to accumulate: the pass only writes its elementwise outputs.
struct NoStats {};

template <typename T, int M>
FM_HOST_DEVICE Sums<T, M> merge(Sums<T, M> a, const Sums<T, M>& b) {
#pragma unroll
  for (int i = 0; i < M; ++i) a.v[i] += b.v[i];
  return a;
}

template <typename T>
FM_HOST_DEVICE Moments<T> merge(const Moments<T>& a, const Moments<T>& b) {
  return moments_merge(a, b);
}

FM_HOST_DEVICE NoStats merge(NoStats a, NoStats) { return a; }

// What a pass hands its accumulator: one value (moments), or the terms of Sums.
template <typename T>
FM_HOST_DEVICE void push(Moments<T>& m, T v) {
  m = moments_push(m, v);
}
template <typename T>
FM_HOST_DEVICE void push(Sums<T, 1>& s, T a) {
  s.v[0] += a;
}
template <typename T>
FM_HOST_DEVICE void push(Sums<T, 2>& s, T a, T b) {
  s.v[0] += a;
  s.v[1] += b;
}
template <typename... T>
FM_HOST_DEVICE void push(NoStats&, T...) {}

template <typename T>
__device__ __forceinline__ Moments<T> shfl_down(Moments<T> m, int delta) {
  return {shfl_down(m.count, delta), shfl_down(m.mean, delta), shfl_down(m.m2, delta)};
}

template <typename T, int M>
__device__ __forceinline__ Sums<T, M> shfl_down(Sums<T, M> s, int delta) {
#pragma unroll
  for (int i = 0; i < M; ++i) s.v[i] = shfl_down(s.v[i], delta);
  return s;
}

// ---- reductions inside a block ---------------------------------------------------------------

// Over all kThreads threads; the result is valid in thread 0. Once per kernel (the shared
// array is reused without a barrier before it).
template <typename V>
__device__ V block_reduce(V v) {
  __shared__ V warp_results[kThreads / kWarpSize];
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v = merge(v, shfl_down(v, offset));
  if (lane == 0) warp_results[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = warp_results[lane < kThreads / kWarpSize ? lane : 0];
#pragma unroll
    for (int offset = kThreads / (2 * kWarpSize); offset > 0; offset /= 2) {
      const V other = shfl_down(v, offset);
      if (lane + offset < kThreads / kWarpSize) v = merge(v, other);
    }
  }
  return v;
}

// Sum over the 32 lanes of a warp; the result is valid in lane 0.
template <typename T>
__device__ T warp_sum(T v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v += shfl_down(v, offset);
  return v;
}

// Over the `lanes` threads of one position group: lane l of the group is thread
// base + l * stride, where `lane` is this thread's l (lanes: a power of two). A tree in shared
// memory, fixed order; the result is valid where lane == 0. Once per kernel.
template <typename V>
__device__ V tile_reduce(V v, int lane, int lanes, int stride) {
  __shared__ V tile[kThreads];
  const int t = threadIdx.x;
  tile[t] = v;
  for (int half = lanes / 2; half > 0; half /= 2) {
    __syncthreads();
    if (lane < half) tile[t] = merge(tile[t], tile[t + half * stride]);
  }
  return tile[t];
}

// ---- per-channel reductions over an activation ----------------------------------------------

// How channel_reduce_kernel splits one activation (N, C, P positions per image): a block takes
// lanes_c channels by one chunk of one image's positions, its threads lanes_c x lanes_p. The
// lanes follow memory: channels_last puts consecutive channels on consecutive threads (up to
// 32), NCHW consecutive positions (up to 256, fewer for small maps, the rest of the block then
// on further channels), so a warp reads neighbouring addresses and few threads idle. Chunks
// never straddle images, so per-image results (the squeeze) come from the same partials.
// Indices are 32-bit (the host checks the sizes): 64-bit integer division is a called
// subroutine on the GPU, and its calls spill registers.
struct ChannelTiling {
  int N, C, P;
  bool channels_fastest;  // channels_last: channel lanes are the consecutive threads
  int lanes_c, lanes_p;
  int chunk, chunks;  // positions per block, chunks per image

  FM_HOST_DEVICE int partials() const { return N * chunks; }  // per channel
  FM_HOST_DEVICE int channel_tiles() const { return (C + lanes_c - 1) / lanes_c; }
};

inline int pow2_at_least(int64_t n, int most) {
  int p = 1;
  while (p < n && p < most) p *= 2;
  return p;
}

inline ChannelTiling channel_tiling(int64_t N, int64_t C, int64_t P, bool channels_last) {
  const int lanes_c =
      channels_last ? pow2_at_least(C, kWarpSize) : kThreads / pow2_at_least(P, kThreads);
  const int lanes_p = kThreads / lanes_c;
  const int64_t tiles = (C + lanes_c - 1) / lanes_c;
  TORCH_CHECK_VALUE(tiles <= 65535, "fused_mbconv: ", C,
                    " channels exceed the CUDA kernels' grid (at most ", 65535 * int64_t(lanes_c),
                    ")");
  // Enough blocks for 8 per SM, each with at least 4 positions per lane; on maps too small for
  // 4 blocks per SM that way (issue 19's rule), fewer positions per lane, down to one.
  const int64_t want = int64_t(multiprocessor_count()) * 8;
  const int64_t per_image = std::max<int64_t>(1, (want + tiles * N - 1) / (tiles * N));
  const int64_t fill = (fill_blocks() + tiles * N - 1) / (tiles * N);
  const int64_t most = std::max<int64_t>(
      {int64_t(1), P / (4 * lanes_p), std::min<int64_t>(P / lanes_p, fill)});
  const int64_t chunk = (P + std::min(per_image, most) - 1) / std::min(per_image, most);
  const int64_t chunks = (P + chunk - 1) / chunk;  // no empty chunk
  TORCH_CHECK_VALUE(N * chunks <= 0x7fffffff, "fused_mbconv: batch of ", N,
                    " images exceeds the CUDA kernels' grid");
  return {static_cast<int>(N), static_cast<int>(C), static_cast<int>(P), channels_last, lanes_c,
          lanes_p, static_cast<int>(chunk), static_cast<int>(chunks)};
}

// f(n, c, p, acc) for every position p of every (image, channel) pair; partial[c][n, chunk]
// receives each block's result. grid (N * chunks, channel tiles).
template <typename Acc, typename F>
__global__ void channel_reduce_kernel(ChannelTiling t, F f, Acc* __restrict__ partial) {
  const int lane_c = t.channels_fastest ? threadIdx.x % t.lanes_c : threadIdx.x / t.lanes_p;
  const int lane_p = t.channels_fastest ? threadIdx.x / t.lanes_c : threadIdx.x % t.lanes_p;
  const int c = blockIdx.y * t.lanes_c + lane_c;
  const int n = blockIdx.x / t.chunks;
  const int p0 = (blockIdx.x % t.chunks) * t.chunk;
  const int p1 = p0 + t.chunk < t.P ? p0 + t.chunk : t.P;
  Acc acc{};
  if (c < t.C) {
    for (int p = p0 + lane_p; p < p1; p += t.lanes_p) f(n, c, p, acc);
  }
  if constexpr (!std::is_empty<Acc>::value) {
    acc = tile_reduce(acc, lane_p, t.lanes_p, t.channels_fastest ? t.lanes_c : 1);
    if (lane_p == 0 && c < t.C) partial[int64_t(c) * t.partials() + blockIdx.x] = acc;
  }
}

// Merges each channel's partials in order, over the batch (C results) or per image (N * C,
// index n * C + c), and hands each to out(index, c, result).
template <typename Acc, typename Out>
__global__ void merge_partials_kernel(ChannelTiling t, const Acc* __restrict__ partial,
                                      bool per_image, Out out) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= (per_image ? t.N * t.C : t.C)) return;
  const int c = i % t.C;
  const Acc* p = partial + int64_t(c) * t.partials() + (per_image ? (i / t.C) * t.chunks : 0);
  const int count = per_image ? t.chunks : t.partials();
  Acc acc = p[0];
  for (int j = 1; j < count; ++j) acc = merge(acc, p[j]);
  out(i, c, acc);
}

// One fused pass: f over every element of the tiled activation, then (unless Acc is NoStats)
// the merged results to out.
template <typename Acc, typename F, typename Out>
void reduce_channels(const char* name, const ChannelTiling& t, const F& f, bool per_image,
                     const Out& out, const at::Tensor& like) {
  if constexpr (std::is_empty<Acc>::value) {
    launch(name, &channel_reduce_kernel<Acc, F>,
           dim3(static_cast<unsigned>(t.partials()), static_cast<unsigned>(t.channel_tiles())),
           dim3(kThreads), 0, t, f, static_cast<Acc*>(nullptr));
  } else {
    at::Tensor partial = at::empty({t.C * t.partials() * int64_t(sizeof(Acc))},
                                   like.options().dtype(at::kByte));
    Acc* pp = reinterpret_cast<Acc*>(partial.mutable_data_ptr());
    launch(name, &channel_reduce_kernel<Acc, F>,
           dim3(static_cast<unsigned>(t.partials()), static_cast<unsigned>(t.channel_tiles())),
           dim3(kThreads), 0, t, f, pp);
    launch(name, &merge_partials_kernel<Acc, Out>,
           dim3(blocks_covering(per_image ? t.N * t.C : t.C)), dim3(kThreads), 0, t,
           static_cast<const Acc*>(pp), per_image, out);
  }
}

}  // namespace cuda
}  // namespace fused_mbconv
