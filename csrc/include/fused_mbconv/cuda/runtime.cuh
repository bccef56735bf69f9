// What csrc/cuda/*.cu take from the CUDA runtime, in one place: kernel launches, the device
// guard, the SM count, warp shuffles and dynamic shared memory. Compiled by nvcc this is the
// CUDA runtime and ATen's CUDA context. Compiled as C++ with -DFM_CUDA_EMULATION it is the CPU
// emulation of emulation.h, and the kernels register for CPU tensors: that is how the test
// suite runs these exact kernels on machines without a GPU.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#if defined(FM_CUDA_EMULATION)
#include "fused_mbconv/cuda/emulation.h"
#define FM_CUDA_DISPATCH_KEY CPU
#else
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#define FM_CUDA_DISPATCH_KEY CUDA
#endif

namespace fused_mbconv {
namespace cuda {

constexpr int kThreads = 256;  // threads per block of every kernel
constexpr int kWarpSize = 32;

// The grids of this thread's launches, while fused_mbconv.accounting listens (the ops
// fused_mbconv_cuda_launches::start / stop, registered in dwconv_bn_silu.cu, the library's
// first source; fused_mbconv.extension calls them around each kernel-interface call): every
// launch() below appends
// its kernel name and programs (grid.x * grid.y * grid.z), so the accounting reports the grid
// the launcher used. `dry`: record without running the kernel. `multiprocessors` > 0: size
// grids for that many SMs instead of this device's (to record another GPU's geometry).
struct LaunchRecord {
  bool recording = false, dry = false;
  int multiprocessors = 0;
  std::vector<std::pair<std::string, int64_t>> launches;
};

inline LaunchRecord& launch_record() {
  static thread_local LaunchRecord record;
  return record;
}

// Records the launch when asked; false when it must not run (a dry run).
inline bool note_grid(const char* name, dim3 grid) {
  LaunchRecord& r = launch_record();
  if (r.recording) r.launches.emplace_back(name, int64_t(grid.x) * grid.y * grid.z);
  return !r.dry;
}

// start(): record from now on (multiprocessors 0: the device's own SM count).
inline void start_launch_record(bool dry_run, int64_t multiprocessors) {
  TORCH_CHECK_VALUE(multiprocessors >= 0, "fused_mbconv launch record: multiprocessors must be "
                    ">= 0 (0: the device's own), got ", multiprocessors);
  LaunchRecord& r = launch_record();
  r.launches.clear();
  r.recording = true;
  r.dry = dry_run;
  r.multiprocessors = static_cast<int>(multiprocessors);
}

// stop(): the launches since start(), one "name programs" line each; recording ends.
inline std::string stop_launch_record() {
  LaunchRecord& r = launch_record();
  std::ostringstream out;
  for (const auto& [name, programs] : r.launches) out << name << ' ' << programs << '\n';
  r = LaunchRecord{};
  return out.str();
}

#if defined(FM_CUDA_EMULATION)

constexpr c10::DeviceType kDeviceType = c10::DeviceType::CPU;

struct DeviceGuard {
  explicit DeviceGuard(c10::Device) {}
};

// A small GPU: test-sized problems then still split into several blocks per channel, so the
// partial-result merges run.
inline int multiprocessor_count() {
  const int asked = launch_record().multiprocessors;
  return asked > 0 ? asked : 4;
}

// `name` says which kernel failed when one does.
template <typename... Params, typename... Args>
void launch(const char* name, void (*kernel)(Params...), dim3 grid, dim3 block,
            size_t shared_bytes, Args... args) {
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return;
  if (!note_grid(name, grid)) return;
  emulation::scheduler().run(name, grid, block, shared_bytes, [&] { kernel(args...); });
}

template <typename T>
T shfl_down(T v, int delta) {
  auto& s = emulation::scheduler();
  const int lane = s.lane();
  return s.shuffle(v, lane + delta < kWarpSize ? lane + delta : lane);
}

template <typename T>
T* dynamic_shared() {
  return reinterpret_cast<T*>(emulation::scheduler().dynamic_shared());
}

#else

constexpr c10::DeviceType kDeviceType = c10::DeviceType::CUDA;
using DeviceGuard = c10::cuda::CUDAGuard;

inline int multiprocessor_count() {
  const int asked = launch_record().multiprocessors;
  return asked > 0 ? asked : at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
}

template <typename... Params, typename... Args>
void launch(const char* name, void (*kernel)(Params...), dim3 grid, dim3 block,
            size_t shared_bytes, Args... args) {
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return;
  if (!note_grid(name, grid)) return;
  kernel<<<grid, block, shared_bytes, at::cuda::getCurrentCUDAStream()>>>(args...);
  const cudaError_t err = cudaGetLastError();
  TORCH_CHECK(err == cudaSuccess, "fused_mbconv: launching CUDA kernel ", name, " failed: ",
              cudaGetErrorString(err));
}

template <typename T>
__device__ __forceinline__ T shfl_down(T v, int delta) {
  return __shfl_down_sync(0xffffffffu, v, delta);
}

template <typename T>
__device__ __forceinline__ T* dynamic_shared() {
  extern __shared__ __align__(16) unsigned char fm_dynamic_shared[];
  return reinterpret_cast<T*>(fm_dynamic_shared);
}

#endif

// Issue 19's occupancy rule, as fused_mbconv/accounting.py states it (BIG_LAUNCH_BYTES,
// MIN_PROGRAMS): a launch moving more than kBigLaunchBytes runs at least fill_blocks() blocks.
constexpr int64_t kBigLaunchBytes = 1000 * 1000;
inline int64_t fill_blocks() { return 4 * int64_t(multiprocessor_count()); }

// Blocks for a grid-stride loop over n elements: enough to fill the GPU, no more.
inline unsigned blocks_for(int64_t n) {
  const int64_t most = int64_t(multiprocessor_count()) * 32;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min((n + kThreads - 1) / kThreads, most)));
}

// Blocks for one thread per element.
inline unsigned blocks_covering(int64_t n) {
  return static_cast<unsigned>(std::max<int64_t>(1, (n + kThreads - 1) / kThreads));
}

}  // namespace cuda
}  // namespace fused_mbconv
