// The CPU kernels for AVX2 + FMA (Haswell, Zen and later): 256-bit vectors, 16 registers.
#include "fused_mbconv/cpu/capability.h"

#if defined(__x86_64__)
namespace fused_mbconv::cpu::AVX2 {
bool cpu_supported() {
  __builtin_cpu_init();  // may run from a static initializer, before libgcc's own
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
}  // namespace fused_mbconv::cpu::AVX2

// Instruction sets only, no arch=: GCC inlines a baseline callee into a caller only when their
// arch and tuning agree, and the kernels' loops rely on inlining the headers' functions.
#pragma GCC target("avx2,fma")
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_VECTOR_BYTES 32
#define CPU_CAPABILITY_VECTOR_REGISTERS 16
#include "../kernels/capability_kernels.h"
#endif
