// The activations the block kernels specialize on, one list and one type per activation.
//
// FUSED_MBCONV_FOR_EACH_ACTIVATION(X) calls X(kind, "name", role) once per activation. It is
// fused_mbconv.activations.KERNEL_ACTIVATIONS without "identity" (BN3 has no activation: its
// kernels are written without one), in the same order; tests/test_activation_table.py checks
// it. role: Block (the `activation` and `se_activation` arguments) or Gate (`gate`). The enum,
// the name parsing, its error message and the dispatch (block_checks.h) are generated from it.
// A new activation: its line here and its Activation<> specialization below (a missing one does
// not compile).
#pragma once

#include "fused_mbconv/math.h"

#define FUSED_MBCONV_FOR_EACH_ACTIVATION(X) \
  X(kSilu, "silu", Block)                   \
  X(kRelu, "relu", Block)                   \
  X(kRelu6, "relu6", Block)                 \
  X(kHardswish, "hardswish", Block)         \
  X(kSigmoid, "sigmoid", Gate)              \
  X(kHardsigmoid, "hardsigmoid", Gate)

namespace fused_mbconv {

#define FM_ACTIVATION_KIND(kind, name, role) kind,
enum class Act : int { FUSED_MBCONV_FOR_EACH_ACTIVATION(FM_ACTIVATION_KIND) };
#undef FM_ACTIVATION_KIND

// Which argument an activation is a valid value of.
enum class ActRole : int { Block, Gate };

// Activation<A>::forward(y) and ::backward(y) = d forward(y) / dy, with aten's choices at the
// kinks.
template <Act A>
struct Activation;

template <>
struct Activation<Act::kSilu> {
  template <typename T>
  static FM_HOST_DEVICE T forward(T y) { return silu(y); }
  template <typename T>
  static FM_HOST_DEVICE T backward(T y) { return silu_grad(y); }
};

template <>
struct Activation<Act::kRelu> {
  template <typename T>
  static FM_HOST_DEVICE T forward(T y) { return y > T(0) ? y : T(0); }
  template <typename T>
  static FM_HOST_DEVICE T backward(T y) { return y > T(0) ? T(1) : T(0); }
};

template <>
struct Activation<Act::kRelu6> {
  template <typename T>
  static FM_HOST_DEVICE T forward(T y) { return clamp_(y, T(0), T(6)); }
  template <typename T>
  static FM_HOST_DEVICE T backward(T y) { return (y > T(0) && y < T(6)) ? T(1) : T(0); }
};

template <>
struct Activation<Act::kHardswish> {
  template <typename T>
  static FM_HOST_DEVICE T forward(T y) { return div_(y * clamp_(y + T(3), T(0), T(6)), T(6)); }
  template <typename T>
  static FM_HOST_DEVICE T backward(T y) {
    return y < T(-3) ? T(0) : (y <= T(3) ? div_(y, T(3)) + T(0.5) : T(1));
  }
};

template <>
struct Activation<Act::kSigmoid> {
  template <typename T>
  static FM_HOST_DEVICE T forward(T y) { return sigmoid(y); }
  template <typename T>
  static FM_HOST_DEVICE T backward(T y) {
    const T s = sigmoid(y);
    return s * (T(1) - s);
  }
};

template <>
struct Activation<Act::kHardsigmoid> {
  template <typename T>
  static FM_HOST_DEVICE T forward(T y) { return div_(clamp_(y + T(3), T(0), T(6)), T(6)); }
  template <typename T>
  static FM_HOST_DEVICE T backward(T y) {
    return (y > T(-3) && y < T(3)) ? div_(T(1), T(6)) : T(0);
  }
};

template <Act A, typename T>
FM_HOST_DEVICE T activate(T y) {
  return Activation<A>::forward(y);
}

template <Act A, typename T>
FM_HOST_DEVICE T activate_grad(T y) {
  return Activation<A>::backward(y);
}

}  // namespace fused_mbconv
