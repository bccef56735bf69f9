// The CUDA kernels of csrc/cuda/, run on the CPU: how the test suite runs them on machines
// without a GPU (csrc/cuda/*.cu compiled as C++ with -DFM_CUDA_EMULATION; see
// fused_mbconv/_build.py and tests/test_cuda_emulation.py).
//
// Every thread of a block is a fiber (ucontext) on the calling OS thread; blocks run one after
// another, so `__shared__` (a function-local static here) is exactly per-block storage. A
// fiber runs until it reaches __syncthreads() or a warp shuffle, then the next one runs; a
// barrier opens once every live thread of the block has reached it, a shuffle once every
// lane of the warp has. Scheduling is fixed, so a run is reproducible, and a kernel that
// syncs divergently (a barrier some threads skip, a shuffle with lanes missing) stops with an
// error naming the kernel's block instead of hanging.
//
// What it does not model: the memory model beyond what barriers order (fibers never run
// concurrently), warp-synchronous code without shuffles, atomics, and the GPU's device-side
// expf (math.h takes its host branch).
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#endif

struct uint3 {
  unsigned x, y, z;
};

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define threadIdx (::fused_mbconv::emulation::scheduler().thread_index())
#define blockIdx (::fused_mbconv::emulation::scheduler().block_index)
#define blockDim (::fused_mbconv::emulation::scheduler().block_dim)
#define gridDim (::fused_mbconv::emulation::scheduler().grid_dim)

namespace fused_mbconv {
namespace emulation {

constexpr int kWarp = 32;
// A fiber's stack. The kernels' frames take a few KiB, red zones included; AddressSanitizer
// clears the shadow of the whole stack at every switch (256 KiB stacks ran the emulated suite
// 2.5x slower), and reports an overflow, the stack being heap memory.
constexpr size_t kStackBytes = 64 * 1024;

enum class Wait { kNone, kBarrier, kShuffle, kDone };

struct Fiber {
  ucontext_t context;
  std::unique_ptr<char[]> stack;
  uint3 index;
  Wait wait = Wait::kNone;
  // A shuffle: this lane's value, the lane it reads, and what it received.
  uint64_t offered = 0, received = 0;
  int source = 0;
  void* asan_fake_stack = nullptr;  // AddressSanitizer's fake stack while switched out
};

class Scheduler {
 public:
  uint3 block_index{0, 0, 0};
  dim3 block_dim, grid_dim;

  const uint3& thread_index() const { return fibers_[current_].index; }

  // Runs `body` as the kernel of every thread of every block of the grid.
  void run(const char* kernel, dim3 grid, dim3 block, size_t shared_bytes,
           std::function<void()> body) {
    if (running_) throw std::logic_error("fused_mbconv emulation: kernel launched from a kernel");
    const size_t threads = size_t(block.x) * block.y * block.z;
    if (threads == 0 || threads > 1024) {
      throw std::invalid_argument(std::string("fused_mbconv emulation: ") + kernel +
                                  " launched with " + std::to_string(threads) + " threads");
    }
    running_ = true;
    kernel_ = kernel;
    body_ = std::move(body);
    grid_dim = grid;
    block_dim = block;
    while (fibers_.size() < threads) {
      fibers_.emplace_back();
      fibers_.back().stack.reset(new char[kStackBytes]);
    }
    shared_bytes_ = shared_bytes;
    try {
      for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
          for (unsigned x = 0; x < grid.x; ++x) run_block({x, y, z}, threads);
    } catch (...) {
      running_ = false;
      throw;
    }
    running_ = false;
  }

  unsigned char* dynamic_shared() { return shared_.data(); }

  void syncthreads() { suspend(Wait::kBarrier); }

  template <typename T>
  T shuffle(T value, int source_lane) {
    static_assert(sizeof(T) <= sizeof(uint64_t), "shuffled values are at most 8 bytes");
    Fiber& f = fibers_[current_];
    std::memcpy(&f.offered, &value, sizeof(T));
    f.source = source_lane;
    suspend(Wait::kShuffle);
    T out;
    std::memcpy(&out, &fibers_[current_].received, sizeof(T));
    return out;
  }

  int lane() const { return static_cast<int>(current_ % kWarp); }

  static Scheduler& instance();

 private:
  std::vector<Fiber> fibers_;
  std::vector<unsigned char> shared_;
  size_t shared_bytes_ = 0;
  std::function<void()> body_;
  const char* kernel_ = "";
  ucontext_t main_{};
  size_t current_ = 0;
  bool running_ = false;
#if defined(__SANITIZE_ADDRESS__)
  void* main_fake_stack_ = nullptr;
  const void* main_stack_bottom_ = nullptr;
  size_t main_stack_size_ = 0;
#endif

  static void entry() {
    Scheduler& s = instance();
    s.entered_fiber(nullptr);
    s.body_();
    s.fibers_[s.current_].wait = Wait::kDone;
#if defined(__SANITIZE_ADDRESS__)
    __sanitizer_start_switch_fiber(nullptr, s.main_stack_bottom_, s.main_stack_size_);
#endif
    swapcontext(&s.fibers_[s.current_].context, &s.main_);
  }

  void run_block(uint3 block, size_t threads) {
    block_index = block;
    shared_.assign(shared_bytes_, 0xff);  // unwritten shared memory reads as NaN
    for (size_t t = 0; t < threads; ++t) {
      Fiber& f = fibers_[t];
      f.index = {static_cast<unsigned>(t % block_dim.x),
                 static_cast<unsigned>((t / block_dim.x) % block_dim.y),
                 static_cast<unsigned>(t / (size_t(block_dim.x) * block_dim.y))};
      f.wait = Wait::kNone;
      getcontext(&f.context);
      f.context.uc_stack.ss_sp = f.stack.get();
      f.context.uc_stack.ss_size = kStackBytes;
      f.context.uc_link = nullptr;
      makecontext(&f.context, &Scheduler::entry, 0);
    }
    for (;;) {
      for (size_t t = 0; t < threads; ++t) {
        if (fibers_[t].wait == Wait::kNone) resume(t);
      }
      if (release_shuffles(threads)) continue;
      size_t live = 0, at_barrier = 0;
      for (size_t t = 0; t < threads; ++t) {
        live += fibers_[t].wait != Wait::kDone;
        at_barrier += fibers_[t].wait == Wait::kBarrier;
      }
      if (live == 0) return;
      if (at_barrier != live) fail(threads);
      for (size_t t = 0; t < threads; ++t) {
        if (fibers_[t].wait == Wait::kBarrier) fibers_[t].wait = Wait::kNone;
      }
    }
  }

  // Warps whose every lane waits at a shuffle exchange their values; false if none did.
  bool release_shuffles(size_t threads) {
    bool released = false;
    for (size_t w = 0; w < threads; w += kWarp) {
      const size_t end = std::min(threads, w + kWarp);
      bool all = true, any = false;
      for (size_t t = w; t < end; ++t) {
        all = all && fibers_[t].wait == Wait::kShuffle;
        any = any || fibers_[t].wait == Wait::kShuffle;
      }
      if (!any) continue;
      if (!all) continue;  // other lanes still running toward it, or diverged (fail() reports)
      for (size_t t = w; t < end; ++t) {
        const size_t src = w + static_cast<size_t>(fibers_[t].source);
        fibers_[t].received = fibers_[src < end ? src : t].offered;
      }
      for (size_t t = w; t < end; ++t) fibers_[t].wait = Wait::kNone;
      released = true;
    }
    return released;
  }

  [[noreturn]] void fail(size_t threads) {
    size_t barrier = 0, shuffle = 0, done = 0;
    for (size_t t = 0; t < threads; ++t) {
      barrier += fibers_[t].wait == Wait::kBarrier;
      shuffle += fibers_[t].wait == Wait::kShuffle;
      done += fibers_[t].wait == Wait::kDone;
    }
    running_ = false;
    throw std::runtime_error(
        std::string("fused_mbconv emulation: divergent synchronization in ") + kernel_ +
        ", block (" + std::to_string(block_index.x) + ", " + std::to_string(block_index.y) +
        ", " + std::to_string(block_index.z) + "): " + std::to_string(barrier) +
        " threads at __syncthreads, " + std::to_string(shuffle) + " at a warp shuffle, " +
        std::to_string(done) + " exited");
  }

  // AddressSanitizer is told of every stack switch, or it reports the fibers' frames as
  // overflows of the main stack.
  void resume(size_t t) {
    current_ = t;
#if defined(__SANITIZE_ADDRESS__)
    __sanitizer_start_switch_fiber(&main_fake_stack_, fibers_[t].stack.get(), kStackBytes);
#endif
    swapcontext(&main_, &fibers_[t].context);
#if defined(__SANITIZE_ADDRESS__)
    __sanitizer_finish_switch_fiber(main_fake_stack_, nullptr, nullptr);
#endif
  }

  void suspend(Wait why) {
    Fiber& f = fibers_[current_];
    f.wait = why;
#if defined(__SANITIZE_ADDRESS__)
    __sanitizer_start_switch_fiber(&f.asan_fake_stack, main_stack_bottom_, main_stack_size_);
#endif
    swapcontext(&f.context, &main_);
    entered_fiber(fibers_[current_].asan_fake_stack);
  }

  void entered_fiber(void* fake_stack) {
#if defined(__SANITIZE_ADDRESS__)
    __sanitizer_finish_switch_fiber(fake_stack, &main_stack_bottom_, &main_stack_size_);
#endif
    (void)fake_stack;
  }
};

inline Scheduler& Scheduler::instance() {
  static Scheduler s;
  return s;
}

inline Scheduler& scheduler() { return Scheduler::instance(); }

}  // namespace emulation
}  // namespace fused_mbconv

inline void __syncthreads() { ::fused_mbconv::emulation::scheduler().syncthreads(); }
