// Which copy of the CPU kernels this process runs (fused_mbconv/cpu/capability.h): chosen once,
// when the library loads, and registered for the CPU dispatch key. Compiled for the baseline.
//
// FUSED_MBCONV_CPU_CAPABILITY=default|avx2|avx512 chooses one (it must be built for this
// architecture and run on this CPU); unset or empty, the best this CPU runs. A bad value
// registers no kernels: the choice's error is kept and raised by cpu_capability(), which
// fused_mbconv.extension calls right after loading, so the backend reports it as the reason it
// is unusable (an exception cannot leave a library's static initializer).
#include "fused_mbconv/cpu/capability.h"

#include <cstdlib>
#include <string>

namespace fused_mbconv::cpu {
namespace {

constexpr const char* kEnvironment = "FUSED_MBCONV_CPU_CAPABILITY";
// Every capability name, built here or not: a name of another architecture is unsupported,
// not unknown.
constexpr const char* kNames[] = {"default", "avx2", "avx512"};

struct Capability {
  const char* name;
  bool (*cpu_supported)();
  void (*register_kernels)(torch::Library&);
};

#define FM_CAPABILITY_ENTRY(ns, name) Capability{name, &ns::cpu_supported, &ns::register_kernels},
constexpr Capability kBuilt[] = {FUSED_MBCONV_FOR_EACH_CPU_CAPABILITY(FM_CAPABILITY_ENTRY)};
#undef FM_CAPABILITY_ENTRY

std::string joined(const std::vector<std::string>& names) {
  std::string out;
  for (const auto& n : names) out += (out.empty() ? "" : ", ") + n;
  return out;
}

// The capabilities built for this architecture that this CPU runs, baseline first.
std::vector<std::string> supported_capabilities() {
  std::vector<std::string> names;
  for (const Capability& c : kBuilt) {
    if (c.cpu_supported()) names.emplace_back(c.name);
  }
  return names;
}

// The rule: `requested` (FUSED_MBCONV_CPU_CAPABILITY's value; empty: unset) given the
// capabilities `supported` here (baseline first) -> the capability to run.
std::string choose_cpu_capability(c10::string_view requested_view,
                                  const std::vector<std::string>& supported) {
  std::string requested(requested_view);
  const auto first = requested.find_first_not_of(" \t\n");
  requested = first == std::string::npos
                  ? std::string()
                  : requested.substr(first, requested.find_last_not_of(" \t\n") - first + 1);
  TORCH_CHECK(!supported.empty(), "fused_mbconv: no CPU capability supported");
  if (requested.empty()) return supported.back();
  const bool known = std::find(std::begin(kNames), std::end(kNames), requested) != std::end(kNames);
  TORCH_CHECK_VALUE(known, kEnvironment, "='", requested, "' is not a CPU capability: use ",
                    joined(std::vector<std::string>(std::begin(kNames), std::end(kNames))),
                    ", or leave it unset for the best this CPU supports");
  TORCH_CHECK(std::find(supported.begin(), supported.end(), requested) != supported.end(),
              kEnvironment, "=", requested, ", but this machine supports only ", joined(supported),
              " (the capabilities built for its architecture that its CPU runs): the ", requested,
              " kernels would die with an illegal instruction here");
  return requested;
}

// The load-time choice: a capability, or the error that chose none.
struct Choice {
  const Capability* capability;
  std::string error;
};

const Choice& load_choice() {
  static const Choice choice = [] {
    const char* env = std::getenv(kEnvironment);
    try {
      const std::string name = choose_cpu_capability(env ? env : "", supported_capabilities());
      for (const Capability& c : kBuilt) {
        if (name == c.name) return Choice{&c, ""};
      }
      return Choice{nullptr, "fused_mbconv: CPU capability " + name + " is not built"};
    } catch (const c10::Error& e) {
      return Choice{nullptr, e.what_without_backtrace()};
    }
  }();
  return choice;
}

std::string cpu_capability() {
  const Choice& choice = load_choice();
  TORCH_CHECK(choice.capability != nullptr, "fused_mbconv CPU kernels not loaded: ",
              choice.error);
  return choice.capability->name;
}

}  // namespace
}  // namespace fused_mbconv::cpu

// Not kernel-interface ops (csrc/ops.cpp): what the library chose, and the rule it chose by.
TORCH_LIBRARY_FRAGMENT(fused_mbconv_ext, m) {
  m.def("cpu_capability() -> str", &fused_mbconv::cpu::cpu_capability);
  m.def("cpu_capabilities() -> str[]", &fused_mbconv::cpu::supported_capabilities);
  m.def("choose_cpu_capability(str requested, str[] supported) -> str",
        &fused_mbconv::cpu::choose_cpu_capability);
}

TORCH_LIBRARY_IMPL(fused_mbconv_ext, CPU, m) {
  const fused_mbconv::cpu::Choice& choice = fused_mbconv::cpu::load_choice();
  if (choice.capability != nullptr) choice.capability->register_kernels(m);
}
