// CUDA kernels of the squeeze-excite vectors (mbconv_excite_forward / _backward; K4 and B4 of
// docs/DESIGN.md, specified by fused_mbconv/reference.py): the SE block's two small FC layers
// per sample, the rest of the block being csrc/cuda/mbconv.cu. The FC weight gradients sum
// over the batch and run as cuBLAS GEMMs through ATen.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <initializer_list>
#include <tuple>

#include "fused_mbconv/block_checks.h"
#include "fused_mbconv/cuda/reduce.cuh"
#include "fused_mbconv/cuda/runtime.cuh"
#include "fused_mbconv/math.h"

namespace fused_mbconv {
namespace cuda {
namespace {

// ---- K4 / B4 excite: blocks of (sample, channel slice) --------------------------------------

// gate = gate_act(fc2(se_act(fc1(pooled)))) for sample blockIdx.x, channel slice blockIdx.y of
// `width` channels: fc1 one warp per hidden unit, fc2 one thread per channel. Dynamic shared
// memory: the S hidden values.
template <Act kSe, Act kGate, typename T>
__global__ void excite_forward_kernel(const T* __restrict__ pooled, const T* __restrict__ w1,
                                      const T* __restrict__ b1, const T* __restrict__ w2,
                                      const T* __restrict__ b2, int C, int S, int width,
                                      T* __restrict__ gate) {
  T* hidden = dynamic_shared<T>();
  const int64_t n = blockIdx.x;
  const T* p = pooled + n * C;
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  for (int j = warp; j < S; j += kThreads / kWarpSize) {
    T acc = 0;
    for (int c = lane; c < C; c += kWarpSize) acc += w1[int64_t(j) * C + c] * p[c];
    acc = warp_sum(acc);
    if (lane == 0) hidden[j] = activate<kSe>(acc + b1[j]);
  }
  __syncthreads();
  const int c = blockIdx.y * width + threadIdx.x;  // this block's channel slice
  if (threadIdx.x < width && c < C) {
    T acc = b2[c];
    for (int j = 0; j < S; ++j) acc += w2[int64_t(c) * S + j] * hidden[j];
    gate[n * C + c] = activate<kGate>(acc);
  }
}

// Per sample n = blockIdx.x: the hidden values, the gradients of both FC outputs and of
// pooled, for the channel slice blockIdx.y (`width` channels). gz1 needs every channel's
// gz2: each block computes all of it into shared memory and stores its slice; the first
// slice's block stores the per-sample vectors. Dynamic shared memory: z1, hidden, gz1 (3 S
// values) and gz2 (C values).
template <Act kSe, Act kGate, typename T>
__global__ void excite_backward_kernel(const T* __restrict__ grad_gate,
                                       const T* __restrict__ pooled, const T* __restrict__ w1,
                                       const T* __restrict__ b1, const T* __restrict__ w2,
                                       const T* __restrict__ b2, int C, int S, int width,
                                       T* __restrict__ grad_pooled, T* __restrict__ hidden_out,
                                       T* gz2, T* __restrict__ gz1_out) {
  T* z1 = dynamic_shared<T>();
  T* hidden = z1 + S;
  T* gz1 = z1 + 2 * S;
  T* gz2_all = z1 + 3 * S;
  const int64_t n = blockIdx.x;
  const bool first = blockIdx.y == 0;
  const int c0 = blockIdx.y * width;
  const T* p = pooled + n * C;
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  constexpr int kWarps = kThreads / kWarpSize;
  for (int j = warp; j < S; j += kWarps) {
    T acc = 0;
    for (int c = lane; c < C; c += kWarpSize) acc += w1[int64_t(j) * C + c] * p[c];
    acc = warp_sum(acc);
    if (lane == 0) {
      z1[j] = acc + b1[j];
      hidden[j] = activate<kSe>(z1[j]);
      if (first) hidden_out[n * S + j] = hidden[j];
    }
  }
  __syncthreads();
  for (int c = threadIdx.x; c < C; c += kThreads) {
    T z2 = b2[c];
    for (int j = 0; j < S; ++j) z2 += w2[int64_t(c) * S + j] * hidden[j];
    gz2_all[c] = grad_gate[n * C + c] * activate_grad<kGate>(z2);
    if (c >= c0 && c < c0 + width) gz2[n * C + c] = gz2_all[c];
  }
  __syncthreads();
  for (int j = warp; j < S; j += kWarps) {
    T acc = 0;
    for (int c = lane; c < C; c += kWarpSize) acc += gz2_all[c] * w2[int64_t(c) * S + j];
    acc = warp_sum(acc);
    if (lane == 0) {
      gz1[j] = acc * activate_grad<kSe>(z1[j]);
      if (first) gz1_out[n * S + j] = gz1[j];
    }
  }
  __syncthreads();
  const int c = c0 + threadIdx.x;
  if (threadIdx.x < width && c < C) {
    T acc = 0;
    for (int j = 0; j < S; ++j) acc += gz1[j] * w1[int64_t(j) * C + c];
    grad_pooled[n * C + c] = acc;
  }
}

// The bytes of the tensors' elements, summed.
int64_t nbytes(std::initializer_list<Tensor> tensors) {
  int64_t bytes = 0;
  for (const Tensor& t : tensors) bytes += static_cast<int64_t>(t.nbytes());
  return bytes;
}

// The excite kernels' dynamic shared memory (`values` elements), checked against the 48 KiB
// every GPU allows.
size_t excite_shared_bytes(int64_t values, int64_t S, int64_t C, const Tensor& pooled) {
  const size_t bytes = size_t(values) * pooled.element_size();
  TORCH_CHECK_VALUE(bytes <= 48 * 1024, "fused_mbconv: squeeze-excite of ", C, " channels and "
                    "width ", S, " is too large for the CUDA excite kernel");
  return bytes;
}

struct ExciteGrid {
  dim3 grid;  // (sample, channel slice)
  int width;  // channels per slice
};

// Slices of kThreads channels; a launch moving `bytes` > 1 MB that leaves fewer than 4 blocks
// per SM takes narrower ones (by warps, the widest that reaches it, down to one warp). Every
// block recomputes its sample's whole chain, so small launches keep the wide slices.
ExciteGrid excite_grid(int64_t N, int64_t C, int64_t bytes) {
  const int64_t want = bytes > kBigLaunchBytes ? fill_blocks() : 0;
  int width = kThreads;
  while (width > kWarpSize && N * ((C + width - 1) / width) < want) width -= kWarpSize;
  return {dim3(static_cast<unsigned>(N), static_cast<unsigned>((C + width - 1) / width)), width};
}

Tensor excite_forward(const Tensor& pooled_in, const Tensor& w1, const Tensor& b1,
                      const Tensor& w2, const Tensor& b2, c10::string_view se_activation,
                      c10::string_view gate) {
  const auto [se, gt] = check_excite_forward(pooled_in, w1, b1, w2, b2, se_activation, gate,
                                             kDeviceType);
  const DeviceGuard guard(pooled_in.device());
  const auto acc = pooled_in.scalar_type();
  const Tensor p = pooled_in.contiguous(), w1a = w1.to(acc).contiguous(),
               b1a = b1.to(acc).contiguous(), w2a = w2.to(acc).contiguous(),
               b2a = b2.to(acc).contiguous();
  const int64_t N = p.size(0);
  const int C = static_cast<int>(p.size(1)), S = static_cast<int>(w1.size(0));
  Tensor out = at::empty_like(p);
  const size_t shared = excite_shared_bytes(S, S, C, p);
  // Bytes as fused_mbconv.extension notes the op: its inputs and output.
  const ExciteGrid eg = excite_grid(N, C, nbytes({pooled_in, w1, b1, w2, b2, out}));
  AT_DISPATCH_FLOATING_TYPES(acc, "mbconv_excite", [&] {
    dispatch_activation(se, [&](auto SE) {
      dispatch_gate(gt, [&](auto G) {
        launch("mbconv_excite", &excite_forward_kernel<decltype(SE)::value, decltype(G)::value,
                                                       scalar_t>,
               eg.grid, dim3(kThreads), shared,
               p.const_data_ptr<scalar_t>(), w1a.const_data_ptr<scalar_t>(),
               b1a.const_data_ptr<scalar_t>(), w2a.const_data_ptr<scalar_t>(),
               b2a.const_data_ptr<scalar_t>(), C, S, eg.width, out.mutable_data_ptr<scalar_t>());
      });
    });
  });
  return out;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> excite_backward(
    const Tensor& grad_gate, const Tensor& pooled_in, const Tensor& w1, const Tensor& b1,
    const Tensor& w2, const Tensor& b2, c10::string_view se_activation, c10::string_view gate) {
  const auto [se, gt] = check_excite_backward(grad_gate, pooled_in, w1, b1, w2, b2,
                                              se_activation, gate, kDeviceType);
  const DeviceGuard guard(pooled_in.device());
  const auto acc = pooled_in.scalar_type();
  const Tensor p = pooled_in.contiguous(), gg = grad_gate.to(acc).contiguous(),
               w1a = w1.to(acc).contiguous(), b1a = b1.to(acc).contiguous(),
               w2a = w2.to(acc).contiguous(), b2a = b2.to(acc).contiguous();
  const int64_t N = p.size(0);
  const int C = static_cast<int>(p.size(1)), S = static_cast<int>(w1.size(0));
  Tensor grad_pooled = at::empty_like(p), hidden = at::empty({N, S}, p.options()),
         gz2 = at::empty_like(p), gz1 = at::empty({N, S}, p.options());
  const size_t shared = excite_shared_bytes(3 * S + C, S, C, p);
  // Bytes as fused_mbconv.extension notes the op: its inputs and outputs (grad_pooled, and the
  // FC weight and bias gradients that the GEMMs below write).
  const ExciteGrid eg = excite_grid(
      N, C, nbytes({grad_gate, pooled_in, w1, b1, w2, b2, grad_pooled}) +
                (2 * int64_t(S) * C + S + C) * p.element_size());
  AT_DISPATCH_FLOATING_TYPES(acc, "mbconv_excite_backward", [&] {
    dispatch_activation(se, [&](auto SE) {
      dispatch_gate(gt, [&](auto G) {
        launch("mbconv_excite_backward",
               &excite_backward_kernel<decltype(SE)::value, decltype(G)::value, scalar_t>,
               eg.grid, dim3(kThreads), shared,
               gg.const_data_ptr<scalar_t>(), p.const_data_ptr<scalar_t>(),
               w1a.const_data_ptr<scalar_t>(), b1a.const_data_ptr<scalar_t>(),
               w2a.const_data_ptr<scalar_t>(), b2a.const_data_ptr<scalar_t>(), C, S, eg.width,
               grad_pooled.mutable_data_ptr<scalar_t>(), hidden.mutable_data_ptr<scalar_t>(),
               gz2.mutable_data_ptr<scalar_t>(), gz1.mutable_data_ptr<scalar_t>());
      });
    });
  });
  // The FC weight gradients sum over the batch: GEMMs.
  return {grad_pooled, at::mm(gz1.t(), p), gz1.sum(0), at::mm(gz2.t(), hidden), gz2.sum(0)};
}

}  // namespace
}  // namespace cuda
}  // namespace fused_mbconv

TORCH_LIBRARY_IMPL(fused_mbconv_ext, FM_CUDA_DISPATCH_KEY, m) {
  m.impl("mbconv_excite_forward", &fused_mbconv::cuda::excite_forward);
  m.impl("mbconv_excite_backward", &fused_mbconv::cuda::excite_backward);
}
