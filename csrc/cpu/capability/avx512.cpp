// The CPU kernels for AVX-512 F/BW/DQ/VL (Skylake-SP, Ice Lake, Sapphire Rapids, Zen 4 and
// later): 512-bit vectors, 32 registers.
#include "fused_mbconv/cpu/capability.h"

#if defined(__x86_64__)
namespace fused_mbconv::cpu::AVX512 {
bool cpu_supported() {
  __builtin_cpu_init();  // may run from a static initializer, before libgcc's own
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
}
}  // namespace fused_mbconv::cpu::AVX512

// Instruction sets only, no arch= (see avx2.cpp). prefer-vector-width=512: GCC's tuning for
// AVX-512 CPUs prefers 256-bit vectors, and the activation passes, bound by exp's polynomial,
// run faster at 512.
#pragma GCC target("avx2,fma,avx512f,avx512bw,avx512dq,avx512vl,prefer-vector-width=512")
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_VECTOR_BYTES 64
#define CPU_CAPABILITY_VECTOR_REGISTERS 32
#include "../kernels/capability_kernels.h"
#endif
