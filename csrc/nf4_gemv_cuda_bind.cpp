// Python binding of the NF4 decode GEMV (csrc/nf4_gemv_cuda.cu). Compiled only with
// CUDA: the .cu file has no pybind11, this file has no CUDA headers.
#ifdef FASTLORA_WITH_CUDA
#include <cstdint>

#include "registry.h"

namespace fastlora {
void nf4_gemv_launch(uintptr_t x, int64_t stride_xm, uintptr_t packed, uintptr_t absmax,
                     uintptr_t code, uintptr_t state2_absmax, uintptr_t state2_code,
                     uintptr_t offset, uintptr_t bias, uintptr_t y, int64_t M, int64_t N,
                     int64_t K, int64_t blocksize, int x_dtype, int w_dtype, uintptr_t stream);
}  // namespace fastlora

static void bind_nf4_gemv(pybind11::module_& m) {
  m.def("nf4_gemv", &fastlora::nf4_gemv_launch,
        "y[M, N] = x[M, K] · W[N, K]ᵀ (+ bias) with W in bnb NF4 layout, M ≤ 16.\n"
        "absmax: fp32, or uint8 codes with the nested statistics (state2_*, offset; 0 = none).\n"
        "Pointers as ints; dtype codes 0=f32, 1=f16, 2=bf16; stream = cuda_stream int.",
        pybind11::arg("x"), pybind11::arg("stride_xm"), pybind11::arg("packed"),
        pybind11::arg("absmax"), pybind11::arg("code"), pybind11::arg("state2_absmax"),
        pybind11::arg("state2_code"), pybind11::arg("offset"), pybind11::arg("bias"), pybind11::arg("y"),
        pybind11::arg("M"), pybind11::arg("N"), pybind11::arg("K"), pybind11::arg("blocksize"),
        pybind11::arg("x_dtype"), pybind11::arg("w_dtype"), pybind11::arg("stream"));
}
FASTLORA_REGISTER(bind_nf4_gemv);
#endif  // FASTLORA_WITH_CUDA
