// The 1x1 convolution's weight gradient, a tiled GEMM of our own rather than cuBLAS: its grid
// is ours to size (issue 19's rule, fused_mbconv/accounting.py) and its sums are
// deterministic. grad_weight (M, K) sums grad_out[n, m, p] * input[n, k, p] over the R = N * P
// (image, position) rows; grid (output tiles, chunks of rows), each block one tile's partial
// over its chunk, merged in chunk order by merge_partials_kernel (reduce.cuh). The design of
// kernels/mbconv.py's pointwise_wgrad_kernel and _wgrad.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <cstdint>

#include "fused_mbconv/cuda/plane.cuh"
#include "fused_mbconv/cuda/reduce.cuh"
#include "fused_mbconv/cuda/runtime.cuh"

namespace fused_mbconv {
namespace cuda {

constexpr int kWgradStep = 16;  // rows of both operands staged in shared memory per step
constexpr int kWgradSide = 16;  // a block's threads: kWgradSide x kWgradSide over its tile
static_assert(kWgradSide * kWgradSide == kThreads, "one thread per cell of the thread grid");

struct WgradTiling {
  int M, K, R;
  int k_tiles, tiles;  // output tiles along K, and in all: block x is m_tile * k_tiles + k_tile
  int chunk, chunks;   // rows per chunk (whole steps), and chunks
};

// Tiles of 64 x 64 outputs, or 32 x 32 where a side has at most 32 channels (B0's narrowest
// layers have 16: a 64-wide tile would idle three quarters of its threads). Chunks: enough
// for 4 blocks per SM, each of whole steps; at most one per step, fewer on small problems.
inline WgradTiling wgrad_tiling(int tile, const Plane& g, const Plane& a) {
  const int64_t R = int64_t(g.N) * g.P;
  TORCH_CHECK_VALUE(R <= 0x7fffffff && int64_t(g.C) * a.C <= 0x7fffffff,
                    "fused_mbconv: a 1x1 weight gradient of ", g.C, " x ", a.C, " over ", R,
                    " positions exceeds the CUDA kernels' 32-bit indexing");
  const int64_t k_tiles = (a.C + tile - 1) / tile, tiles = (g.C + tile - 1) / tile * k_tiles;
  const int64_t steps = (R + kWgradStep - 1) / kWgradStep;
  const int64_t wanted = (fill_blocks() + tiles - 1) / tiles;
  const int64_t chunk = std::max<int64_t>(1, steps / wanted) * kWgradStep;  // >= wanted chunks
  return {g.C, a.C, static_cast<int>(R), static_cast<int>(k_tiles), static_cast<int>(tiles),
          static_cast<int>(chunk), static_cast<int>((R + chunk - 1) / chunk)};
}

// Stages rows [r, r + kWgradStep) of x's channels [c0, c0 + Tile) into tile[row][channel],
// zero past the chunk's end r1 or the channels. Neighbouring threads read neighbouring
// addresses: channels in channels_last, rows (positions) in NCHW; the tile's padding column
// keeps NCHW's column-wise stores free of bank conflicts.
template <int Tile, typename scalar_t, typename acc_t>
__device__ void stage_rows(const scalar_t* __restrict__ x, const Plane& xp, int c0, int r, int r1,
                           acc_t (*tile)[Tile + 1]) {
#pragma unroll
  for (int l = 0; l < kWgradStep * Tile / kThreads; ++l) {
    const int e = threadIdx.x + l * kThreads;
    const int s = xp.channels_last ? e / Tile : e % kWgradStep;
    const int c = xp.channels_last ? e % Tile : e / kWgradStep;
    const int row = r + s;
    acc_t v = 0;
    if (row < r1 && c0 + c < xp.C) {
      const int n = row / xp.P;
      v = static_cast<acc_t>(x[xp.at(n, c0 + c, row - n * xp.P)]);
    }
    tile[s][c] = v;
  }
}

// Block (tile, chunk): its Tile x Tile outputs summed over its chunk's rows in order, each
// thread (Tile / kWgradSide)^2 of them strided by kWgradSide (conflict-free shared reads);
// partial[output * chunks + chunk], the layout merge_partials_kernel reads.
template <int Tile, typename scalar_t>
__global__ void pointwise_wgrad_kernel(const scalar_t* __restrict__ g, Plane gp,
                                       const scalar_t* __restrict__ a, Plane ap, WgradTiling t,
                                       Sums<at::opmath_type<scalar_t>, 1>* __restrict__ partial) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kPer = Tile / kWgradSide;
  __shared__ acc_t gs[kWgradStep][Tile + 1], as[kWgradStep][Tile + 1];
  const int m0 = (blockIdx.x / t.k_tiles) * Tile, k0 = (blockIdx.x % t.k_tiles) * Tile;
  const int tm = threadIdx.x / kWgradSide, tk = threadIdx.x % kWgradSide;
  const int r0 = blockIdx.y * t.chunk;
  const int r1 = r0 + t.chunk < t.R ? r0 + t.chunk : t.R;
  acc_t acc[kPer][kPer] = {};
  for (int r = r0; r < r1; r += kWgradStep) {
    stage_rows<Tile>(g, gp, m0, r, r1, gs);
    stage_rows<Tile>(a, ap, k0, r, r1, as);
    __syncthreads();
#pragma unroll
    for (int s = 0; s < kWgradStep; ++s) {
      acc_t gv[kPer], av[kPer];
#pragma unroll
      for (int i = 0; i < kPer; ++i) {
        gv[i] = gs[s][tm + i * kWgradSide];
        av[i] = as[s][tk + i * kWgradSide];
      }
#pragma unroll
      for (int i = 0; i < kPer; ++i) {
#pragma unroll
        for (int j = 0; j < kPer; ++j) acc[i][j] += gv[i] * av[j];
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
#pragma unroll
    for (int j = 0; j < kPer; ++j) {
      const int m = m0 + tm + i * kWgradSide, k = k0 + tk + j * kWgradSide;
      if (m < t.M && k < t.K) {
        partial[(int64_t(m) * t.K + k) * t.chunks + blockIdx.y] = Sums<acc_t, 1>{{acc[i][j]}};
      }
    }
  }
}

template <typename scalar_t>
struct WeightOut {  // the merged sum of output element i, in the inputs' dtype
  scalar_t* out;
  template <typename acc_t>
  __device__ void operator()(int i, int, const Sums<acc_t, 1>& s) const {
    out[i] = static_cast<scalar_t>(s.v[0]);
  }
};

// The 1x1 convolution's weight gradient (out, in), contiguous, in grad_out's dtype: the sum
// over images and positions of grad_out[n, o, p] * input[n, c, p]. Two launches named `name`.
inline Tensor pointwise_weight_grad(const char* name, const Tensor& grad_out,
                                    const Tensor& input) {
  const Plane gp = plane_of(grad_out), ap = plane_of(input);
  const int tile = std::min(gp.C, ap.C) > 32 ? 64 : 32;
  const WgradTiling t = wgrad_tiling(tile, gp, ap);
  const int64_t outputs = int64_t(t.M) * t.K;
  Tensor grad = at::empty({t.M, t.K}, grad_out.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(), "wgrad", [&] {
    using Acc = Sums<at::opmath_type<scalar_t>, 1>;
    Tensor partial = at::empty({outputs * t.chunks * int64_t(sizeof(Acc))},
                               grad_out.options().dtype(at::kByte));
    Acc* pp = reinterpret_cast<Acc*>(partial.mutable_data_ptr());
    launch(name, tile == 64 ? &pointwise_wgrad_kernel<64, scalar_t>
                            : &pointwise_wgrad_kernel<32, scalar_t>,
           dim3(static_cast<unsigned>(t.tiles), static_cast<unsigned>(t.chunks)),
           dim3(kThreads), 0, grad_out.const_data_ptr<scalar_t>(), gp,
           input.const_data_ptr<scalar_t>(), ap, t, pp);
    // Each output element as one channel of merge_partials_kernel, its chunks its partials.
    const ChannelTiling merged{1, static_cast<int>(outputs), t.R, false, 1, 1, t.chunk, t.chunks};
    launch(name, &merge_partials_kernel<Acc, WeightOut<scalar_t>>,
           dim3(blocks_covering(outputs)), dim3(kThreads), 0, merged,
           static_cast<const Acc*>(pp), false,
           WeightOut<scalar_t>{grad.mutable_data_ptr<scalar_t>()});
  });
  return grad;
}

}  // namespace cuda
}  // namespace fused_mbconv
