// NF4 decode GEMV: y[M, N] = x[M, K] · W[N, K]ᵀ (+ bias) for M = 1..16 (generation).
//
// Memory-bound: each warp owns one output column n and streams row n of the packed
// weight exactly once, 16 bytes (32 weights) per lane per load, accumulating all M rows
// in fp32 registers; a warp shuffle reduction finishes the dot products. The 16-entry
// NF4 table lives in lanes 0..15 and is read with __shfl_sync, so the decode needs no
// shared memory and has no bank conflicts.
//
// Numerics follow bitsandbytes' dequantize_4bit(W).to(x.dtype) then an fp32-accumulated
// matmul: value = code[nib] * absmax (fp32), rounded to the weight's dtype (RNE), then to
// x's dtype (RNE). (bnb's own gemv casts code and absmax to T first; we keep the
// dequantize semantics so decode and training see the same weights.)
//
// Double-quantized statistics (bnb's compress_statistics, the default) are decoded here,
// per 32-weight chunk, as code2[q] * absmax2[block / 256] then + offset (two roundings,
// no FMA, as bitsandbytes): no torch ops run per call to build an fp32 absmax.
//
// Layout (bnb): element 2i in the high nibble of byte i, flat row-major over [N, K];
// block b covers flat elements [b*blocksize, (b+1)*blocksize) and may span rows.
// The vector path needs K % 32 == 0, blocksize % 32 == 0 and 16-byte aligned packed
// and x (rows and base); anything else takes the scalar path, same results.
//
// No pybind11 here: nf4_gemv_cuda_bind.cpp binds nf4_gemv_launch.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace fastlora {
namespace {

constexpr int kWarpsPerBlock = 4;
constexpr int64_t kStats2Blocksize = 256;  // bitsandbytes' blocksize of the nested statistics

// The block scales: fp32 absmax, or uint8 codes into the nested statistics.
struct Scales {
  const void* absmax;
  const float* s2_absmax;  // nullptr: not nested
  const float* s2_code;
  const float* offset;
};

__device__ __forceinline__ float block_scale(const Scales& s, float offset, int64_t blk) {
  if (s.s2_absmax != nullptr) {
    const uint32_t q = __ldg(static_cast<const uint8_t*>(s.absmax) + blk);
    return __fadd_rn(__fmul_rn(__ldg(s.s2_code + q), __ldg(s.s2_absmax + blk / kStats2Blocksize)), offset);
  }
  return __ldg(static_cast<const float*>(s.absmax) + blk);
}
constexpr unsigned kFull = 0xffffffffu;

// dtype codes shared with fastlora/ops/lora_linear.py (_GEMV_DTYPE)
enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

template <typename T> __device__ __forceinline__ float to_f32(T v);
template <> __device__ __forceinline__ float to_f32<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// code·absmax (fp32) → weight dtype (RNE) → activation dtype T (RNE), as fp32.
template <typename T, int WDT>
__device__ __forceinline__ float round_weight(float v) {
  if (WDT == kF16) v = __half2float(__float2half_rn(v));
  if (WDT == kBF16) v = __bfloat162float(__float2bfloat16_rn(v));
  return to_f32<T>(from_f32<T>(v));
}

template <typename T, int WDT, int MROWS, bool VEC>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
nf4_gemv_kernel(const T* __restrict__ x, int64_t stride_xm, const uint8_t* __restrict__ packed,
                const Scales scales, const float* __restrict__ code,
                const T* __restrict__ bias, T* __restrict__ y, int M, int64_t N, int64_t K,
                int64_t blocksize) {
  const int lane = threadIdx.x & 31;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (n >= N) return;  // whole warp leaves together: n is warp-uniform
  const float my_code = code[lane & 15];
  const float offset = scales.s2_absmax != nullptr ? __ldg(scales.offset) : 0.f;

  float acc[MROWS];
#pragma unroll
  for (int m = 0; m < MROWS; ++m) acc[m] = 0.f;

  const int64_t row0 = n * K;  // flat index of W[n, 0]
  if (VEC) {
    const int64_t chunks = K / 32;  // 32 weights = 16 packed bytes per lane-load
    const uint4* wrow = reinterpret_cast<const uint4*>(packed + row0 / 2);
    // every lane runs the same trip count so the table shuffles stay converged
    for (int64_t c0 = 0; c0 < chunks; c0 += 32) {
      const int64_t c = c0 + lane;
      const bool valid = c < chunks;
      uint4 q = make_uint4(0, 0, 0, 0);
      float scale = 0.f;
      if (valid) {
        q = __ldg(wrow + c);
        scale = block_scale(scales, offset, (row0 + c * 32) / blocksize);
      }
      const uint32_t words[4] = {q.x, q.y, q.z, q.w};
      float w[32];
#pragma unroll
      for (int b = 0; b < 16; ++b) {
        const uint32_t byte = (words[b >> 2] >> (8 * (b & 3))) & 0xffu;
        w[2 * b] = round_weight<T, WDT>(__shfl_sync(kFull, my_code, byte >> 4) * scale);
        w[2 * b + 1] = round_weight<T, WDT>(__shfl_sync(kFull, my_code, byte & 0xf) * scale);
      }
      if (valid) {
#pragma unroll
        for (int m = 0; m < MROWS; ++m) {
          if (m < M) {
            const uint4* xr = reinterpret_cast<const uint4*>(x + m * stride_xm + c * 32);
#pragma unroll
            for (int v = 0; v < 4; ++v) {  // 4 × 8 activations
              const uint4 xv = __ldg(xr + v);
              const T* xe = reinterpret_cast<const T*>(&xv);
#pragma unroll
              for (int e = 0; e < 8; ++e) acc[m] = fmaf(w[8 * v + e], to_f32<T>(xe[e]), acc[m]);
            }
          }
        }
      }
    }
  } else {
    for (int64_t k0 = 0; k0 < K; k0 += 32) {
      const int64_t k = k0 + lane;
      const bool valid = k < K;
      uint32_t nib = 0;
      float scale = 0.f;
      if (valid) {
        const int64_t idx = row0 + k;
        const uint32_t byte = __ldg(packed + idx / 2);
        nib = (idx & 1) ? (byte & 0xf) : (byte >> 4);
        scale = block_scale(scales, offset, idx / blocksize);
      }
      const float w = round_weight<T, WDT>(__shfl_sync(kFull, my_code, nib) * scale);
      if (valid) {
#pragma unroll
        for (int m = 0; m < MROWS; ++m)
          if (m < M) acc[m] = fmaf(w, to_f32<T>(x[m * stride_xm + k]), acc[m]);
      }
    }
  }

#pragma unroll
  for (int m = 0; m < MROWS; ++m) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) acc[m] += __shfl_xor_sync(kFull, acc[m], off);
  }
  if (lane == 0) {
    const float b = bias ? to_f32<T>(bias[n]) : 0.f;
#pragma unroll
    for (int m = 0; m < MROWS; ++m)
      if (m < M) y[m * N + n] = from_f32<T>(acc[m] + b);
  }
}

template <typename T, int WDT, int MROWS>
void launch_rows(const T* x, int64_t sxm, const uint8_t* packed, const Scales& absmax,
                 const float* code, const T* bias, T* y, int M, int64_t N, int64_t K,
                 int64_t bs, bool vec, cudaStream_t stream) {
  const dim3 block(kWarpsPerBlock * 32);
  const dim3 grid(static_cast<unsigned>((N + kWarpsPerBlock - 1) / kWarpsPerBlock));
  if (vec)
    nf4_gemv_kernel<T, WDT, MROWS, true><<<grid, block, 0, stream>>>(x, sxm, packed, absmax, code, bias, y, M, N, K, bs);
  else
    nf4_gemv_kernel<T, WDT, MROWS, false><<<grid, block, 0, stream>>>(x, sxm, packed, absmax, code, bias, y, M, N, K, bs);
}

template <typename T, int WDT>
void launch_wdt(uintptr_t x, int64_t sxm, uintptr_t packed, const Scales& ap, uintptr_t code,
                uintptr_t bias, uintptr_t y, int M, int64_t N, int64_t K, int64_t bs, bool vec,
                cudaStream_t s) {
  auto xp = reinterpret_cast<const T*>(x);
  auto pp = reinterpret_cast<const uint8_t*>(packed);
  auto cp = reinterpret_cast<const float*>(code);
  auto bp = reinterpret_cast<const T*>(bias);
  auto yp = reinterpret_cast<T*>(y);
  // row counts round up to a power of two: 5 instantiations instead of 16
  if (M <= 1) launch_rows<T, WDT, 1>(xp, sxm, pp, ap, cp, bp, yp, M, N, K, bs, vec, s);
  else if (M <= 2) launch_rows<T, WDT, 2>(xp, sxm, pp, ap, cp, bp, yp, M, N, K, bs, vec, s);
  else if (M <= 4) launch_rows<T, WDT, 4>(xp, sxm, pp, ap, cp, bp, yp, M, N, K, bs, vec, s);
  else if (M <= 8) launch_rows<T, WDT, 8>(xp, sxm, pp, ap, cp, bp, yp, M, N, K, bs, vec, s);
  else launch_rows<T, WDT, 16>(xp, sxm, pp, ap, cp, bp, yp, M, N, K, bs, vec, s);
}

template <typename T>
void launch_t(int wdt, uintptr_t x, int64_t sxm, uintptr_t packed, const Scales& absmax,
              uintptr_t code, uintptr_t bias, uintptr_t y, int M, int64_t N, int64_t K,
              int64_t bs, bool vec, cudaStream_t s) {
  if (wdt == kF32) launch_wdt<T, kF32>(x, sxm, packed, absmax, code, bias, y, M, N, K, bs, vec, s);
  else if (wdt == kF16) launch_wdt<T, kF16>(x, sxm, packed, absmax, code, bias, y, M, N, K, bs, vec, s);
  else launch_wdt<T, kBF16>(x, sxm, packed, absmax, code, bias, y, M, N, K, bs, vec, s);
}

}  // namespace

// x: (M, K) with row stride stride_xm (elements) and unit column stride; y: (M, N)
// contiguous; bias: (N,) or 0. absmax: fp32 per block, or (state2_* and offset non-zero)
// uint8 codes of the nested statistics. Dtypes: x/y/bias share x_dtype (fp16 or bf16).
void nf4_gemv_launch(uintptr_t x, int64_t stride_xm, uintptr_t packed, uintptr_t absmax,
                     uintptr_t code, uintptr_t state2_absmax, uintptr_t state2_code,
                     uintptr_t offset, uintptr_t bias, uintptr_t y, int64_t M, int64_t N,
                     int64_t K, int64_t blocksize, int x_dtype, int w_dtype, uintptr_t stream) {
  if (M < 1 || M > 16)
    throw std::invalid_argument("nf4_gemv: M must be in [1, 16], got " + std::to_string(M));
  if (N < 1 || K < 1 || blocksize < 1)
    throw std::invalid_argument("nf4_gemv: bad shape N=" + std::to_string(N) + " K=" +
                                std::to_string(K) + " blocksize=" + std::to_string(blocksize));
  if (x_dtype != kF16 && x_dtype != kBF16)
    throw std::invalid_argument("nf4_gemv: x must be float16 or bfloat16 (code " + std::to_string(x_dtype) + ")");
  if (w_dtype < kF32 || w_dtype > kBF16)
    throw std::invalid_argument("nf4_gemv: unknown weight dtype code " + std::to_string(w_dtype));
  const bool vec = K % 32 == 0 && blocksize % 32 == 0 && packed % 16 == 0 && x % 16 == 0 &&
                   stride_xm % 8 == 0;
  if ((state2_absmax == 0) != (state2_code == 0) || (state2_absmax == 0) != (offset == 0))
    throw std::invalid_argument("nf4_gemv: nested statistics need state2_absmax, state2_code and offset together");
  const Scales scales{reinterpret_cast<const void*>(absmax), reinterpret_cast<const float*>(state2_absmax),
                      reinterpret_cast<const float*>(state2_code), reinterpret_cast<const float*>(offset)};
  auto s = reinterpret_cast<cudaStream_t>(stream);
  const int m = static_cast<int>(M);
  if (x_dtype == kF16)
    launch_t<__half>(w_dtype, x, stride_xm, packed, scales, code, bias, y, m, N, K, blocksize, vec, s);
  else
    launch_t<__nv_bfloat16>(w_dtype, x, stride_xm, packed, scales, code, bias, y, m, N, K, blocksize, vec, s);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("nf4_gemv: launch failed: ") + cudaGetErrorString(err));
}

}  // namespace fastlora
