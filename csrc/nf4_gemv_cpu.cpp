// NF4 GEMV on CPU: y[M, N] = x[M, K] · W[N, K]ᵀ (+ bias) for a few rows (decode), reading
// the packed NF4 bytes directly: W is never materialized.
//
// Decode is memory-bound. Dequantize-then-GEMM writes 4 bytes per weight and reads them
// back; this kernel reads ~0.5 byte per weight once, decodes it in registers and
// multiplies it into every row of x while it is there.
//
// Numerics are the dequantize semantics of fastlora/nf4.py (and bitsandbytes'
// dequantize_4bit(W).to(x.dtype)): value = code[nib] · absmax in fp32, rounded to the
// weight's dtype (RNE), then to x's dtype (x itself arrives as fp32, exactly). Per NF4 block the 16 possible values are built once (one vector
// multiply, one rounding) and the nibbles index them. Products accumulate in fp32 (FMA),
// so the result differs from the reference only by the order of the fp32 sums.
// Double-quant statistics are decoded per block, code2[q]·absmax2 + offset as two
// separately rounded operations like bitsandbytes (see block_scale).
//
// Layout (bnb): element 2i of the flat [N, K] weight is the HIGH nibble of byte i; block b
// covers flat elements [b·blocksize, (b+1)·blocksize) and may span rows. With K even
// every row starts on a byte, so x is split once per call into its even and odd columns:
// the high nibbles of a row's bytes then multiply x_even, the low nibbles x_odd, and no
// shuffle is needed to interleave decoded values. Odd K takes the scalar path.
//
// Paths, chosen at run time: AVX-512F (16 weights per lookup, vpermps over the 16-entry
// table in one register), AVX2+FMA (8 per lookup, two vpermps and a blend), scalar.
// Threads (OpenMP) split the output features; x, the table and the accumulators are
// per thread. fastlora/ops/nf4_gemv.py checks every argument before calling here.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include <immintrin.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "nf4.h"
#include "registry.h"

namespace fastlora {
namespace {

enum Isa : int { kAuto = -1, kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

// Up to this many rows of x share one decode of the weights (accumulators stay in
// registers: 2 per row, 8 rows = 16 of the 32 zmm registers).
constexpr int kRowTile = 8;

// Below this much work (rows x weights multiply-adds) a parallel region costs more than it
// saves (and waking a team on a busy machine can cost a scheduler slice). Measured on the
// 2-core CPU, SmolLM2-135M decode with 2 threads against 1: batch 8 +17-24% tokens/s,
// batch 32 +28-39%; batch 1 (under this threshold for every layer) unchanged, and a
// threshold 8x lower made batch 1 no faster and the larger batches slower.
constexpr std::int64_t kParallelMinWork = std::int64_t{1} << 22;

struct Args {
  const float* xe;  // [M, K/2] x's even columns (fp32), or x itself [M, K] when K is odd
  const float* xo;  // [M, K/2] x's odd columns
  std::int64_t M, N, K, bs, bs2;
  const std::uint8_t* packed;
  const void* absmax;  // fp32 [nblocks], or uint8 codes when nested
  const float* code;   // the 16 NF4 values
  const float* s2_absmax;
  const float* s2_code;
  float offset;
  bool nested;
  int wdtype;         // nf4::OutDtype of the weight: the values are rounded to it,
  int xdtype;         // then to x's dtype (what W.to(x.dtype) does before the matmul)
  const float* bias;  // fp32 [N] or nullptr
  float* out;         // fp32 [M, N], row stride out_stride
  std::int64_t out_stride;
};

inline std::uint32_t f32_bits(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float bits_f32(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// fp32 scale of block b. The volatile product keeps the compiler from contracting
// code2·absmax2 + offset into one FMA (bitsandbytes rounds the product first).
inline float block_scale(const Args& a, std::int64_t b) {
  if (!a.nested) return static_cast<const float*>(a.absmax)[b];
  volatile float prod = a.s2_code[static_cast<const std::uint8_t*>(a.absmax)[b]] * a.s2_absmax[b / a.bs2];
  return prod + a.offset;
}

// value -> the weight's dtype (RNE) -> fp32. Scales are finite, so no NaN handling.
inline float round_scalar(float v, int wdtype) {
  if (wdtype == nf4::kBFloat16) {
    std::uint32_t u = f32_bits(v);
    u += 0x7fffu + ((u >> 16) & 1u);
    return bits_f32(u & 0xffff0000u);
  }
  // _Float16 (GCC >= 12, clang): a RNE conversion, in software without F16C
  if (wdtype == nf4::kFloat16) return static_cast<float>(static_cast<_Float16>(v));
  return v;
}

// Calls body(k0, k1, scale) for the runs [k0, k1) of row n that lie in one NF4 block.
template <typename F>
inline void for_each_segment(const Args& a, std::int64_t n, F&& body) {
  const std::int64_t e0 = n * a.K;
  std::int64_t k = 0;
  while (k < a.K) {
    const std::int64_t b = (e0 + k) / a.bs;
    const std::int64_t k1 = std::min(a.K, (b + 1) * a.bs - e0);
    body(k, k1, block_scale(a, b));
    k = k1;
  }
}

// ------------------------------------------------------------------------------- scalar
// Also the tail of the vector paths, and every case with K odd (xe is then x itself).
template <int T>
void rows_scalar(const Args& a, std::int64_t n0, std::int64_t n1, std::int64_t m0) {
  const std::int64_t K = a.K, K2 = K / 2;
  const bool odd = K & 1;
  for (std::int64_t n = n0; n < n1; ++n) {
    float acc[T] = {};
    for_each_segment(a, n, [&](std::int64_t k0, std::int64_t k1, float scale) {
      float lut[16];
      for (int q = 0; q < 16; ++q) lut[q] = round_scalar(round_scalar(a.code[q] * scale, a.wdtype), a.xdtype);
      for (std::int64_t k = k0; k < k1; ++k) {
        const std::int64_t e = n * K + k;
        const std::uint8_t byte = a.packed[e >> 1];
        const float w = lut[(e & 1) ? (byte & 15) : (byte >> 4)];
        for (int t = 0; t < T; ++t) {
          const float xv = odd ? a.xe[(m0 + t) * K + k] : ((k & 1) ? a.xo : a.xe)[(m0 + t) * K2 + (k >> 1)];
          acc[t] += xv * w;
        }
      }
    });
    for (int t = 0; t < T; ++t)
      a.out[(m0 + t) * a.out_stride + n] = acc[t] + (a.bias ? a.bias[n] : 0.f);
  }
}

// -------------------------------------------------------------------------------- AVX2
__attribute__((target("avx2,fma,f16c"))) inline __m256 round_avx2(__m256 v, int wdtype) {
  if (wdtype == nf4::kBFloat16) {
    __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    u = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb));
    return _mm256_castsi256_ps(_mm256_and_si256(u, _mm256_set1_epi32(static_cast<int>(0xffff0000u))));
  }
  if (wdtype == nf4::kFloat16) return _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
  return v;
}

__attribute__((target("avx2,fma"))) inline float hsum_avx2(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Looks up 8 nibbles (int32 lanes 0..15) in the 16-entry table held as two halves.
__attribute__((target("avx2,fma"))) inline __m256 lookup_avx2(__m256i idx, __m256 lo8, __m256 hi8) {
  const __m256 sel = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28));  // bit 3 -> sign bit
  return _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo8, idx), _mm256_permutevar8x32_ps(hi8, idx), sel);
}

template <int T>
__attribute__((target("avx2,fma,f16c"))) void rows_avx2(const Args& a, std::int64_t n0, std::int64_t n1,
                                                         std::int64_t m0) {
  const std::int64_t K2 = a.K / 2;
  const __m256 c_lo = _mm256_loadu_ps(a.code), c_hi = _mm256_loadu_ps(a.code + 8);
  const __m256i low4 = _mm256_set1_epi32(15);
  for (std::int64_t n = n0; n < n1; ++n) {
    const std::uint8_t* row = a.packed + n * K2;
    __m256 acc_e[T], acc_o[T];
    float tail[T] = {};
    for (int t = 0; t < T; ++t) acc_e[t] = acc_o[t] = _mm256_setzero_ps();
    // the runs of the row inside one NF4 block (no lambda: it would lose the target ISA)
    for (std::int64_t k0 = 0, k1; k0 < a.K; k0 = k1) {
      const std::int64_t b = (n * a.K + k0) / a.bs;
      k1 = std::min(a.K, (b + 1) * a.bs - n * a.K);
      const __m256 s = _mm256_set1_ps(block_scale(a, b));
      const __m256 lo8 = round_avx2(round_avx2(_mm256_mul_ps(c_lo, s), a.wdtype), a.xdtype);
      const __m256 hi8 = round_avx2(round_avx2(_mm256_mul_ps(c_hi, s), a.wdtype), a.xdtype);
      std::int64_t j = k0 / 2;  // byte within the row
      const std::int64_t j1 = k1 / 2;
      for (; j + 8 <= j1; j += 8) {  // 8 bytes = 16 weights
        std::int64_t bytes8;
        std::memcpy(&bytes8, row + j, 8);
        const __m256i v = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(bytes8));
        const __m256 we = lookup_avx2(_mm256_srli_epi32(v, 4), lo8, hi8);
        const __m256 wo = lookup_avx2(_mm256_and_si256(v, low4), lo8, hi8);
        for (int t = 0; t < T; ++t) {
          const std::int64_t xr = (m0 + t) * K2 + j;
          acc_e[t] = _mm256_fmadd_ps(we, _mm256_loadu_ps(a.xe + xr), acc_e[t]);
          acc_o[t] = _mm256_fmadd_ps(wo, _mm256_loadu_ps(a.xo + xr), acc_o[t]);
        }
      }
      if (j < j1) {
        float lut[16];
        _mm256_storeu_ps(lut, lo8);
        _mm256_storeu_ps(lut + 8, hi8);
        for (; j < j1; ++j)
          for (int t = 0; t < T; ++t) {
            const std::int64_t xr = (m0 + t) * K2 + j;
            tail[t] += a.xe[xr] * lut[row[j] >> 4] + a.xo[xr] * lut[row[j] & 15];
          }
      }
    }
    for (int t = 0; t < T; ++t)
      a.out[(m0 + t) * a.out_stride + n] =
          hsum_avx2(_mm256_add_ps(acc_e[t], acc_o[t])) + tail[t] + (a.bias ? a.bias[n] : 0.f);
  }
}

// ------------------------------------------------------------------------------ AVX-512
__attribute__((target("avx512f"))) inline __m512 round_avx512(__m512 v, int wdtype) {
  if (wdtype == nf4::kBFloat16) {
    __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    u = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb));
    return _mm512_castsi512_ps(_mm512_and_si512(u, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
  }
  if (wdtype == nf4::kFloat16) return _mm512_cvtph_ps(_mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
  return v;
}

template <int T>
__attribute__((target("avx512f"))) void rows_avx512(const Args& a, std::int64_t n0, std::int64_t n1,
                                                     std::int64_t m0) {
  const std::int64_t K2 = a.K / 2;
  const __m512 code = _mm512_loadu_ps(a.code);
  const __m512i low4 = _mm512_set1_epi32(15);
  for (std::int64_t n = n0; n < n1; ++n) {
    const std::uint8_t* row = a.packed + n * K2;
    __m512 acc_e[T], acc_o[T];
    float tail[T] = {};
    for (int t = 0; t < T; ++t) acc_e[t] = acc_o[t] = _mm512_setzero_ps();
    for (std::int64_t k0 = 0, k1; k0 < a.K; k0 = k1) {
      const std::int64_t b = (n * a.K + k0) / a.bs;
      k1 = std::min(a.K, (b + 1) * a.bs - n * a.K);
      const __m512 lut = round_avx512(
          round_avx512(_mm512_mul_ps(code, _mm512_set1_ps(block_scale(a, b))), a.wdtype), a.xdtype);
      std::int64_t j = k0 / 2;
      const std::int64_t j1 = k1 / 2;
      for (; j + 16 <= j1; j += 16) {  // 16 bytes = 32 weights
        const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + j)));
        const __m512 we = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), lut);
        const __m512 wo = _mm512_permutexvar_ps(_mm512_and_si512(v, low4), lut);
        for (int t = 0; t < T; ++t) {
          const std::int64_t xr = (m0 + t) * K2 + j;
          acc_e[t] = _mm512_fmadd_ps(we, _mm512_loadu_ps(a.xe + xr), acc_e[t]);
          acc_o[t] = _mm512_fmadd_ps(wo, _mm512_loadu_ps(a.xo + xr), acc_o[t]);
        }
      }
      if (j < j1) {  // a block shorter than 32 weights, or a row end inside a block
        alignas(64) float lt[16];
        _mm512_store_ps(lt, lut);
        for (; j < j1; ++j)
          for (int t = 0; t < T; ++t) {
            const std::int64_t xr = (m0 + t) * K2 + j;
            tail[t] += a.xe[xr] * lt[row[j] >> 4] + a.xo[xr] * lt[row[j] & 15];
          }
      }
    }
    for (int t = 0; t < T; ++t)
      a.out[(m0 + t) * a.out_stride + n] =
          _mm512_reduce_add_ps(_mm512_add_ps(acc_e[t], acc_o[t])) + tail[t] + (a.bias ? a.bias[n] : 0.f);
  }
}

// ----------------------------------------------------------------------------- dispatch
bool isa_available(int isa) {
  switch (isa) {
    case kScalar:
      return true;
    case kAvx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    case kAvx512:
      return __builtin_cpu_supports("avx512f");
    default:
      return false;
  }
}

int best_isa() {
  static const int best = isa_available(kAvx512) ? kAvx512 : isa_available(kAvx2) ? kAvx2 : kScalar;
  return best;
}

using RowsFn = void (*)(const Args&, std::int64_t, std::int64_t, std::int64_t);

template <template <int> class Wrap>
RowsFn pick_tile(int t) {
  switch (t) {
    case 1: return Wrap<1>::fn;
    case 2: return Wrap<2>::fn;
    case 3: return Wrap<3>::fn;
    case 4: return Wrap<4>::fn;
    case 5: return Wrap<5>::fn;
    case 6: return Wrap<6>::fn;
    case 7: return Wrap<7>::fn;
    default: return Wrap<8>::fn;
  }
}
template <int T> struct ScalarW { static constexpr RowsFn fn = rows_scalar<T>; };
template <int T> struct Avx2W { static constexpr RowsFn fn = rows_avx2<T>; };
template <int T> struct Avx512W { static constexpr RowsFn fn = rows_avx512<T>; };

RowsFn pick(int isa, int t) {
  if (isa == kAvx512) return pick_tile<Avx512W>(t);
  if (isa == kAvx2) return pick_tile<Avx2W>(t);
  return pick_tile<ScalarW>(t);
}

void nf4_gemv_cpu(std::uintptr_t x, std::int64_t x_stride, std::int64_t M, std::uintptr_t packed,
                  std::uintptr_t absmax, std::uintptr_t code, std::uintptr_t s2_absmax, std::uintptr_t s2_code,
                  float offset, bool nested, std::int64_t s2_blocksize, std::int64_t N, std::int64_t K,
                  std::int64_t blocksize, int weight_dtype, int x_dtype, std::uintptr_t bias, std::uintptr_t out,
                  std::int64_t out_stride, int isa, int threads) {
  if (isa == kAuto) isa = best_isa();
  if (!isa_available(isa))
    throw std::invalid_argument("nf4_gemv_cpu: instruction set " + std::to_string(isa) +
                                " is not available on this CPU");
  for (int d : {weight_dtype, x_dtype})
    if (d != nf4::kFloat32 && d != nf4::kFloat16 && d != nf4::kBFloat16)
      throw std::invalid_argument("nf4_gemv_cpu: unknown dtype code " + std::to_string(d));
  if (M <= 0 || N <= 0) return;
  const auto* xp = reinterpret_cast<const float*>(x);
  const bool odd = K & 1;
  if (odd) isa = kScalar;  // rows start mid-byte: only the scalar path indexes per element
  // x split into even / odd columns (or copied densely for odd K): M·K floats, small.
  std::vector<float> xs(static_cast<std::size_t>(M * K));
  const std::int64_t K2 = K / 2;
  for (std::int64_t m = 0; m < M; ++m) {
    const float* src = xp + m * x_stride;
    if (odd) {
      std::memcpy(xs.data() + m * K, src, sizeof(float) * K);
    } else {
      float* e = xs.data() + m * K2;
      float* o = xs.data() + M * K2 + m * K2;
      for (std::int64_t j = 0; j < K2; ++j) {
        e[j] = src[2 * j];
        o[j] = src[2 * j + 1];
      }
    }
  }
  Args a{xs.data(), odd ? nullptr : xs.data() + M * K2, M, N, K, blocksize, s2_blocksize,
         reinterpret_cast<const std::uint8_t*>(packed), reinterpret_cast<const void*>(absmax),
         reinterpret_cast<const float*>(code), reinterpret_cast<const float*>(s2_absmax),
         reinterpret_cast<const float*>(s2_code), offset, nested, weight_dtype, x_dtype,
         reinterpret_cast<const float*>(bias), reinterpret_cast<float*>(out), out_stride};

  // Chunks of output features: whole rows of W per thread, each read once per row tile.
  constexpr std::int64_t kChunk = 16;
  const std::int64_t nchunks = (N + kChunk - 1) / kChunk;
  int nt = std::max(1, threads);
  if (M * N * K < kParallelMinWork) nt = 1;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
#endif
  for (std::int64_t c = 0; c < nchunks; ++c) {
    const std::int64_t n0 = c * kChunk, n1 = std::min(N, n0 + kChunk);
    for (std::int64_t m0 = 0; m0 < M; m0 += kRowTile) {
      const int t = static_cast<int>(std::min<std::int64_t>(kRowTile, M - m0));
      pick(isa, t)(a, n0, n1, m0);
    }
  }
}

}  // namespace
}  // namespace fastlora

static void nf4_gemv_cpu_bind(pybind11::module_& m) {
  namespace py = pybind11;
  using namespace fastlora;
  m.def("nf4_gemv_cpu", &nf4_gemv_cpu, py::call_guard<py::gil_scoped_release>(),
        "y[M, N] (fp32, row stride out_stride) = x[M, K] (fp32, row stride x_stride) · W[N, K]ᵀ (+ bias fp32) "
        "with W in bnb NF4 layout, never materialized; weights rounded to weight_dtype then x_dtype "
        "(0 f32, 1 f16, 2 bf16). isa: -1 best, 0 scalar, 1 AVX2, 2 AVX-512.",
        py::arg("x"), py::arg("x_stride"), py::arg("M"), py::arg("packed"), py::arg("absmax"), py::arg("code"),
        py::arg("state2_absmax"), py::arg("state2_code"), py::arg("offset"), py::arg("nested"),
        py::arg("state2_blocksize"), py::arg("N"), py::arg("K"), py::arg("blocksize"), py::arg("weight_dtype"),
        py::arg("x_dtype"), py::arg("bias"), py::arg("out"), py::arg("out_stride"), py::arg("isa") = -1, py::arg("threads") = 1);
  m.def("nf4_gemv_cpu_isa_available", &isa_available, "whether nf4_gemv_cpu can use an instruction set");
}

FASTLORA_REGISTER(nf4_gemv_cpu_bind);
