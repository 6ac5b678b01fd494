// NF4 dequantize on CUDA, bit-exact with the pure-torch reference in fastlora/nf4.py
// (and so with bitsandbytes' dequantize_4bit).
//
// Each thread owns 16 packed bytes = 32 elements, read with one 16-byte load. Every valid
// blocksize is a multiple of 32, so a thread's elements share one block scale, decoded in
// the same pass when the statistics are double-quantized: code2[q] * absmax2[blk / 256],
// then + offset, with explicitly rounded __fmul_rn / __fadd_rn so the compiler cannot
// contract them into an FMA (bitsandbytes rounds twice). Outputs are written with 16-byte
// stores. Threads at the tail, or views whose pointers are not 16-byte aligned, take a
// scalar path that computes the same values.
//
// No pybind11 here: nf4_cuda_bind.cpp binds the launcher.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "nf4.h"

namespace fastlora {
namespace {

constexpr int kThreads = 256;
constexpr int kElemsPerThread = 32;  // 16 packed bytes

template <typename T>
__device__ __forceinline__ std::uint32_t to_bits(float v);
template <>
__device__ __forceinline__ std::uint32_t to_bits<float>(float v) { return __float_as_uint(v); }
template <>
__device__ __forceinline__ std::uint32_t to_bits<__half>(float v) { return __half_as_ushort(__float2half_rn(v)); }
template <>
__device__ __forceinline__ std::uint32_t to_bits<__nv_bfloat16>(float v) {
  return __bfloat16_as_ushort(__float2bfloat16_rn(v));
}

template <typename T, bool NESTED>
__global__ void __launch_bounds__(kThreads)
    nf4_dequantize_kernel(const std::uint8_t* __restrict__ packed, const void* __restrict__ absmax,
                          const float* __restrict__ code, const float* __restrict__ s2_absmax,
                          const float* __restrict__ s2_code, const float* __restrict__ offset, std::int64_t n,
                          int bs_shift, int s2_shift, bool vectorized, T* __restrict__ out) {
  __shared__ float lut[16];
  if (threadIdx.x < 16) lut[threadIdx.x] = code[threadIdx.x];
  __syncthreads();

  const std::int64_t t = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const std::int64_t e0 = t * kElemsPerThread;
  if (e0 >= n) return;
  const std::int64_t blk = e0 >> bs_shift;
  float scale;
  if constexpr (NESTED) {
    const std::uint8_t q = static_cast<const std::uint8_t*>(absmax)[blk];
    scale = __fadd_rn(__fmul_rn(s2_code[q], s2_absmax[blk >> s2_shift]), *offset);
  } else {
    scale = static_cast<const float*>(absmax)[blk];
  }

  if (vectorized && e0 + kElemsPerThread <= n) {
    const uint4 v = *reinterpret_cast<const uint4*>(packed + e0 / 2);
    const std::uint32_t words[4] = {v.x, v.y, v.z, v.w};
    constexpr int kPerWord = 4 / sizeof(T);  // outputs per 32-bit word
    std::uint32_t o[kElemsPerThread / kPerWord];
#pragma unroll
    for (int b = 0; b < 16; ++b) {
      const std::uint32_t byte = (words[b / 4] >> (8 * (b % 4))) & 0xffu;
      const std::uint32_t hi = to_bits<T>(__fmul_rn(lut[byte >> 4], scale));
      const std::uint32_t lo = to_bits<T>(__fmul_rn(lut[byte & 15u], scale));
      if constexpr (sizeof(T) == 4) {
        o[2 * b] = hi;
        o[2 * b + 1] = lo;
      } else {
        o[b] = hi | (lo << 16);  // element 2b in the low half (little-endian)
      }
    }
    uint4* dst = reinterpret_cast<uint4*>(out + e0);
#pragma unroll
    for (int k = 0; k < static_cast<int>(sizeof(o) / sizeof(uint4)); ++k)
      dst[k] = make_uint4(o[4 * k], o[4 * k + 1], o[4 * k + 2], o[4 * k + 3]);
    return;
  }
  const std::int64_t e1 = e0 + kElemsPerThread < n ? e0 + kElemsPerThread : n;
  for (std::int64_t e = e0; e < e1; ++e) {
    const std::uint8_t byte = packed[e >> 1];
    const std::uint32_t nib = (e & 1) ? (byte & 15u) : (byte >> 4);
    const std::uint32_t bits = to_bits<T>(__fmul_rn(lut[nib], scale));
    if constexpr (sizeof(T) == 4) {
      reinterpret_cast<std::uint32_t*>(out)[e] = bits;
    } else {
      reinterpret_cast<std::uint16_t*>(out)[e] = static_cast<std::uint16_t>(bits);
    }
  }
}

int log2_exact(std::int64_t v, const char* what) {
  int s = 0;
  while ((std::int64_t{1} << s) < v) ++s;
  if ((std::int64_t{1} << s) != v) throw std::invalid_argument(std::string(what) + " must be a power of two");
  return s;
}

template <typename T>
void launch(std::uintptr_t packed, std::uintptr_t absmax, std::uintptr_t code, std::uintptr_t s2_absmax,
            std::uintptr_t s2_code, std::uintptr_t offset, bool nested, std::int64_t n, int bs_shift,
            int s2_shift, std::uintptr_t out, cudaStream_t stream) {
  const bool vectorized = packed % 16 == 0 && out % 16 == 0;
  const std::int64_t threads = (n + kElemsPerThread - 1) / kElemsPerThread;
  const unsigned grid = static_cast<unsigned>((threads + kThreads - 1) / kThreads);
  const auto* p = reinterpret_cast<const std::uint8_t*>(packed);
  const auto* a = reinterpret_cast<const void*>(absmax);
  const auto* c = reinterpret_cast<const float*>(code);
  const auto* a2 = reinterpret_cast<const float*>(s2_absmax);
  const auto* c2 = reinterpret_cast<const float*>(s2_code);
  const auto* off = reinterpret_cast<const float*>(offset);
  auto* o = reinterpret_cast<T*>(out);
  if (nested) {
    nf4_dequantize_kernel<T, true><<<grid, kThreads, 0, stream>>>(p, a, c, a2, c2, off, n, bs_shift, s2_shift,
                                                                  vectorized, o);
  } else {
    nf4_dequantize_kernel<T, false><<<grid, kThreads, 0, stream>>>(p, a, c, a2, c2, off, n, bs_shift, s2_shift,
                                                                   vectorized, o);
  }
}

}  // namespace

void nf4_dequantize_cuda_launch(std::uintptr_t packed, std::uintptr_t absmax, std::uintptr_t code,
                                std::uintptr_t state2_absmax, std::uintptr_t state2_code, std::uintptr_t offset,
                                bool nested, std::int64_t n, std::int64_t blocksize, std::int64_t state2_blocksize,
                                std::uintptr_t out, int out_dtype, std::uintptr_t stream) {
  if (n <= 0) return;
  if (blocksize < kElemsPerThread)
    throw std::invalid_argument("nf4_dequantize_cuda: blocksize must be at least 32, got " + std::to_string(blocksize));
  const int bs_shift = log2_exact(blocksize, "nf4_dequantize_cuda: blocksize");
  const int s2_shift = nested ? log2_exact(state2_blocksize, "nf4_dequantize_cuda: state2 blocksize") : 0;
  auto s = reinterpret_cast<cudaStream_t>(stream);
  switch (out_dtype) {
    case nf4::kFloat32:
      launch<float>(packed, absmax, code, state2_absmax, state2_code, offset, nested, n, bs_shift, s2_shift, out, s);
      break;
    case nf4::kFloat16:
      launch<__half>(packed, absmax, code, state2_absmax, state2_code, offset, nested, n, bs_shift, s2_shift, out, s);
      break;
    case nf4::kBFloat16:
      launch<__nv_bfloat16>(packed, absmax, code, state2_absmax, state2_code, offset, nested, n, bs_shift, s2_shift,
                            out, s);
      break;
    default:
      throw std::invalid_argument("nf4_dequantize_cuda: unknown output dtype code " + std::to_string(out_dtype));
  }
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("nf4_dequantize_cuda: launch failed: ") + cudaGetErrorString(err));
}

}  // namespace fastlora
