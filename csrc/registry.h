// Self-registration of binding functions, so each kernel family adds its Python
// bindings from its own file and module.cpp never needs editing.
#pragma once
#include <pybind11/pybind11.h>

#include <vector>

namespace fastlora {

using Registrar = void (*)(pybind11::module_&);

// Function-local static: safe against static-initialisation order across files.
inline std::vector<Registrar>& registrars() {
  static std::vector<Registrar> r;
  return r;
}

struct Register {
  explicit Register(Registrar f) { registrars().push_back(f); }
};

}  // namespace fastlora

#define FASTLORA_REGISTER(fn) static ::fastlora::Register fastlora_register_##fn(fn)
