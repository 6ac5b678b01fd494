// Python binding of the CUDA NF4 dequantize launcher (nf4_cuda.cu). Built only with CUDA.
#include "registry.h"

#ifdef FASTLORA_WITH_CUDA
#include "nf4.h"

static void nf4_cuda_bind(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("nf4_dequantize_cuda", &fastlora::nf4_dequantize_cuda_launch, py::call_guard<py::gil_scoped_release>(),
        "NF4 dequantize (CUDA): packed, absmax, code, state2_absmax, state2_code, offset (device pointer), "
        "nested, n, blocksize, state2_blocksize, out, out_dtype (0 f32, 1 f16, 2 bf16), stream");
}

FASTLORA_REGISTER(nf4_cuda_bind);
#endif  // FASTLORA_WITH_CUDA
