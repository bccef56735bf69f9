// The CPU kernels of one capability: included once by each csrc/cpu/capability/*.cpp, after it
// has defined CPU_CAPABILITY (the namespace) and its vector width and register count, and set
// its target pragma. The kernel sources are not compiled on their own (fused_mbconv/_build.py
// lists the capability files instead).
#pragma once

#if !defined(CPU_CAPABILITY) || !defined(CPU_CAPABILITY_VECTOR_BYTES) || \
    !defined(CPU_CAPABILITY_VECTOR_REGISTERS)
#error "include csrc/cpu/kernels/capability_kernels.h from csrc/cpu/capability/*.cpp only"
#endif

#include "dwconv_bn_silu.cpp"
#include "mbconv.cpp"
#include "mbconv_depthwise.cpp"

namespace fused_mbconv::cpu::CPU_CAPABILITY {

void register_kernels(torch::Library& m) {
  register_dwconv_bn_silu(m);
  register_mbconv(m);
  register_mbconv_depthwise(m);
}

}  // namespace fused_mbconv::cpu::CPU_CAPABILITY
