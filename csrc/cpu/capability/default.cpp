// The CPU kernels for the compiler's baseline target (SSE2 on x86-64, the generic vectors of
// NEON on aarch64): every CPU of the architecture runs them.
#include "fused_mbconv/cpu/capability.h"

namespace fused_mbconv::cpu::DEFAULT {
bool cpu_supported() { return true; }
}  // namespace fused_mbconv::cpu::DEFAULT

#define CPU_CAPABILITY DEFAULT
#define CPU_CAPABILITY_VECTOR_BYTES 16  // SSE2, NEON
#if defined(__aarch64__)
#define CPU_CAPABILITY_VECTOR_REGISTERS 32
#else
#define CPU_CAPABILITY_VECTOR_REGISTERS 16
#endif
#include "../kernels/capability_kernels.h"
