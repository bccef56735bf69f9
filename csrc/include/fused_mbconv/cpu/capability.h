// CPU capabilities: the CPU kernels (csrc/cpu/kernels/) are compiled once per capability, each
// copy in its own namespace fused_mbconv::cpu::<CAPABILITY> under that capability's
// `#pragma GCC target` (csrc/cpu/capability/<name>.cpp), and csrc/cpu/dispatch.cpp registers
// one copy when the library loads: the best this CPU runs, or FUSED_MBCONV_CPU_CAPABILITY's.
//
// Every header the kernels use is included here, before any target pragma, so torch's, the
// standard library's and our shared inline functions are compiled for the baseline in every
// translation unit: the linker keeps one copy of each (inline functions are weak symbols), and
// a copy built for AVX-512 kept for baseline callers would die with SIGILL on an AVX2 CPU. The
// kernels' own code, in the capability namespace, is the only code compiled for the target;
// the baseline functions it calls inline into it (GCC inlines a callee whose instruction sets
// are a subset of the caller's). tests/test_cpu_capability.py disassembles the library to
// check that every function outside a capability namespace is baseline code.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <memory>
#include <tuple>
#include <type_traits>
#include <vector>

#include "fused_mbconv/activations.h"
#include "fused_mbconv/block_checks.h"
#include "fused_mbconv/bn.h"
#include "fused_mbconv/checks.h"
#include "fused_mbconv/host.h"
#include "fused_mbconv/math.h"

// X(NAMESPACE, "name") for each capability built for this architecture, baseline first, best
// last. "name" is FUSED_MBCONV_CPU_CAPABILITY's value (ATen's ATEN_CPU_CAPABILITY names).
#if defined(__x86_64__)
#define FUSED_MBCONV_FOR_EACH_CPU_CAPABILITY(X) \
  X(DEFAULT, "default")                         \
  X(AVX2, "avx2")                               \
  X(AVX512, "avx512")
#else  // aarch64 and the rest: the generic vectors of the compiler's baseline only
#define FUSED_MBCONV_FOR_EACH_CPU_CAPABILITY(X) X(DEFAULT, "default")
#endif

// What each capability's translation unit defines: whether this CPU runs its instructions
// (checked beside its target pragma, so the two cannot drift apart), and the registration of
// its kernels for the CPU dispatch key.
#define FM_DECLARE_CPU_CAPABILITY(ns, name)    \
  namespace fused_mbconv::cpu::ns {            \
  bool cpu_supported();                        \
  void register_kernels(torch::Library& m);    \
  }
FUSED_MBCONV_FOR_EACH_CPU_CAPABILITY(FM_DECLARE_CPU_CAPABILITY)
#undef FM_DECLARE_CPU_CAPABILITY
