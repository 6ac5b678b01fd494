// fastlora._C: raw-pointer kernels for Python. No libtorch: Python passes data_ptr(),
// shapes, strides and the CUDA stream as integers, so a torch upgrade cannot break us.
#include "registry.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastlora C++/CUDA kernels (pointers, shapes, streams)";
#ifdef FASTLORA_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  for (auto f : fastlora::registrars()) f(m);
}
