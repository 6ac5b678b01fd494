// NF4 quantize / dequantize on CPU, bit-exact with the pure-torch reference in
// fastlora/nf4.py (and so with bitsandbytes 0.50). Multithreaded over blocks with OpenMP
// when it is linked.
//
// Dequantize is memory-bound: per NF4 block we build a 16-entry table of the already
// rounded output values (code[k] * absmax, cast with round-to-nearest-even), then expand
// bytes through it. With SSE4.1 (x86-64-v2) the table is built with vector math and the
// expansion is pshufb byte shuffles: 16 packed bytes become 32 outputs, no float work.
//
// All functions take raw addresses (uintptr_t) and sizes; fastlora/nf4.py validates
// every argument before it calls here.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(__SSE4_1__)
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

#include "nf4.h"
#include "registry.h"

namespace fastlora {
namespace {

using nf4::OutDtype;

const float kMid[15] = FASTLORA_NF4_MID_INIT;
const float kStats8Thr[nf4::kStats8Thresholds] = FASTLORA_STATS8_THRESHOLD_INIT;

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

// float32 -> bfloat16, round to nearest even (what torch's .to(bfloat16) does).
inline std::uint16_t f32_to_bf16(float f) {
  std::uint32_t u = f32_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<std::uint16_t>((u >> 16) | 0x40u);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<std::uint16_t>(u >> 16);
}

// float32 -> float16, round to nearest even, with subnormals and overflow to inf.
inline std::uint16_t f32_to_f16(float f) {
  const std::uint32_t u = f32_bits(f);
  const std::uint16_t sign = static_cast<std::uint16_t>((u >> 16) & 0x8000u);
  const std::uint32_t a = u & 0x7fffffffu;
  if (a >= 0x7f800000u) return sign | (a > 0x7f800000u ? 0x7e00u : 0x7c00u);
  if (a >= 0x477ff000u) return sign | 0x7c00u;  // >= 65520 rounds to inf
  if (a < 0x38800000u) {
    // Below 2^-14 the result is subnormal, in units of 2^-24. Adding 0.5 (whose ulp is
    // 2^-24) makes the FPU round |f| to that grid, to nearest even.
    const float r = bits_f32(a) + 0.5f;
    return sign | static_cast<std::uint16_t>(f32_bits(r) - 0x3f000000u);
  }
  std::uint32_t r = a + 0xfffu + ((a >> 13) & 1u);  // round the 13 dropped bits
  r -= (127u - 15u) << 23;                           // rebias the exponent
  return sign | static_cast<std::uint16_t>(r >> 13);
}

inline float bf16_to_f32(std::uint16_t h) { return bits_f32(static_cast<std::uint32_t>(h) << 16); }

inline float f16_to_f32(std::uint16_t h) {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  const std::uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  if (e == 0x1f) return bits_f32(sign | 0x7f800000u | (m << 13));
  if (e == 0) {  // subnormal: m * 2^-24, exact in float32
    const float v = std::ldexp(static_cast<float>(m), -24);
    return sign ? -v : v;
  }
  return bits_f32(sign | ((e + 112u) << 23) | (m << 13));
}

// Below this many elements a parallel region costs more than it saves (and on a busy
// machine waking the team can take a scheduler time slice), so small weights run serially.
constexpr std::int64_t kParallelMinElems = std::int64_t{1} << 18;

template <typename F>
inline void parallel_blocks(std::int64_t nblocks, std::int64_t n, F&& body) {
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (n >= kParallelMinElems)
#endif
  for (std::int64_t b = 0; b < nblocks; ++b) body(b);
}

// ---------------------------------------------------------------------------------------
// Dequantize
// ---------------------------------------------------------------------------------------

// The float32 scale of block b. Nested statistics are code2[q] * absmax2[b / bs2], then
// + offset, as two separately rounded operations like bitsandbytes; the volatile product
// keeps a compiler that may use FMA (-march=native) from contracting them.
struct BlockScales {
  const void* absmax;
  const float* s2_absmax;
  const float* s2_code;
  float offset;
  bool nested;
  std::int64_t bs2;

  float operator()(std::int64_t b) const {
    if (!nested) return static_cast<const float*>(absmax)[b];
    volatile float prod = s2_code[static_cast<const std::uint8_t*>(absmax)[b]] * s2_absmax[b / bs2];
    return prod + offset;
  }
};

// Expand `nbytes` packed bytes into 2*nbytes outputs of T through a 16-entry table.
template <typename T>
inline void expand_scalar(const std::uint8_t* in, std::int64_t nbytes, const T* lut, T* out) {
  for (std::int64_t j = 0; j < nbytes; ++j) {
    const std::uint8_t b = in[j];
    out[2 * j] = lut[b >> 4];
    out[2 * j + 1] = lut[b & 15];
  }
}

#if defined(__SSE4_1__)
// The SIMD path. Per block, the 16 possible outputs (code[k] * absmax, rounded) are built
// with vector math and split into byte planes: plane p holds byte p of each of the 16
// values. Expansion is then pure byte shuffling: pshufb looks each nibble up in every plane
// and unpacks interleave the planes back into values. A scalar table setup costs several
// times more than expanding a whole blocksize-64 block (32 bytes), hence the vector setup.
struct Tables {
  __m128i plane[4];  // 2 planes for 16-bit outputs, 4 for 32-bit
};

inline void products(const float* code, float scale, __m128 p[4]) {
  const __m128 s = _mm_set1_ps(scale);
  for (int k = 0; k < 4; ++k) p[k] = _mm_mul_ps(_mm_loadu_ps(code + 4 * k), s);
}

// 16 uint16 values (w0: values 0..7, w1: 8..15) -> low-byte plane and high-byte plane.
inline void split16(__m128i w0, __m128i w1, Tables& t) {
  const __m128i even_odd = _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
  w0 = _mm_shuffle_epi8(w0, even_odd);
  w1 = _mm_shuffle_epi8(w1, even_odd);
  t.plane[0] = _mm_unpacklo_epi64(w0, w1);
  t.plane[1] = _mm_unpackhi_epi64(w0, w1);
}

inline void tables_bf16(const float* code, float scale, Tables& t) {
  __m128 p[4];
  products(code, scale, p);
  const __m128i one = _mm_set1_epi32(1), bias = _mm_set1_epi32(0x7fff);
  __m128i h[4];
  for (int k = 0; k < 4; ++k) {  // round to nearest even, as f32_to_bf16 (values are finite)
    const __m128i u = _mm_castps_si128(p[k]);
    const __m128i lsb = _mm_and_si128(_mm_srli_epi32(u, 16), one);
    h[k] = _mm_srli_epi32(_mm_add_epi32(u, _mm_add_epi32(bias, lsb)), 16);
  }
  split16(_mm_packus_epi32(h[0], h[1]), _mm_packus_epi32(h[2], h[3]), t);
}

// F16C is not in x86-64-v2: used when the CPU has it (checked once at run time).
__attribute__((target("f16c"))) void tables_f16_f16c(const float* code, float scale, Tables& t) {
  __m128 p[4];
  products(code, scale, p);
  __m128i h[4];
  for (int k = 0; k < 4; ++k) h[k] = _mm_cvtps_ph(p[k], _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  split16(_mm_unpacklo_epi64(h[0], h[1]), _mm_unpacklo_epi64(h[2], h[3]), t);
}

inline void tables_f16_scalar(const float* code, float scale, Tables& t) {
  alignas(16) std::uint16_t v[16];
  for (int k = 0; k < 16; ++k) v[k] = f32_to_f16(code[k] * scale);
  split16(_mm_load_si128(reinterpret_cast<const __m128i*>(v)),
          _mm_load_si128(reinterpret_cast<const __m128i*>(v + 8)), t);
}

inline void tables_f32(const float* code, float scale, Tables& t) {
  __m128 p[4];
  products(code, scale, p);
  // Per vector: byte 0 of its 4 values, then bytes 1, 2, 3; a 4x4 transpose of 32-bit
  // lanes then gathers each byte plane across the 16 values, in order.
  const __m128i planes = _mm_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  __m128 q[4];
  for (int k = 0; k < 4; ++k) q[k] = _mm_castsi128_ps(_mm_shuffle_epi8(_mm_castps_si128(p[k]), planes));
  _MM_TRANSPOSE4_PS(q[0], q[1], q[2], q[3]);
  for (int k = 0; k < 4; ++k) t.plane[k] = _mm_castps_si128(q[k]);
}

// 16 packed bytes -> nibble indices of elements 0..15 and 16..31, in element order.
inline void nibbles(const std::uint8_t* in, __m128i& i0, __m128i& i1) {
  const __m128i mask = _mm_set1_epi8(0x0f);
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(in));
  const __m128i nh = _mm_and_si128(_mm_srli_epi16(v, 4), mask);
  const __m128i nl = _mm_and_si128(v, mask);
  i0 = _mm_unpacklo_epi8(nh, nl);
  i1 = _mm_unpackhi_epi8(nh, nl);
}

inline void expand16(const std::uint8_t* in, std::int64_t nbytes, const Tables& t, std::uint16_t* out) {
  for (std::int64_t j = 0; j < nbytes; j += 16) {
    __m128i i0, i1;
    nibbles(in + j, i0, i1);
    const __m128i l0 = _mm_shuffle_epi8(t.plane[0], i0), h0 = _mm_shuffle_epi8(t.plane[1], i0);
    const __m128i l1 = _mm_shuffle_epi8(t.plane[0], i1), h1 = _mm_shuffle_epi8(t.plane[1], i1);
    __m128i* o = reinterpret_cast<__m128i*>(out + 2 * j);
    _mm_storeu_si128(o + 0, _mm_unpacklo_epi8(l0, h0));
    _mm_storeu_si128(o + 1, _mm_unpackhi_epi8(l0, h0));
    _mm_storeu_si128(o + 2, _mm_unpacklo_epi8(l1, h1));
    _mm_storeu_si128(o + 3, _mm_unpackhi_epi8(l1, h1));
  }
}

inline void store32x16(__m128i idx, const Tables& t, std::uint32_t* out) {
  const __m128i b0 = _mm_shuffle_epi8(t.plane[0], idx), b1 = _mm_shuffle_epi8(t.plane[1], idx);
  const __m128i b2 = _mm_shuffle_epi8(t.plane[2], idx), b3 = _mm_shuffle_epi8(t.plane[3], idx);
  const __m128i lo01 = _mm_unpacklo_epi8(b0, b1), hi01 = _mm_unpackhi_epi8(b0, b1);
  const __m128i lo23 = _mm_unpacklo_epi8(b2, b3), hi23 = _mm_unpackhi_epi8(b2, b3);
  __m128i* o = reinterpret_cast<__m128i*>(out);
  _mm_storeu_si128(o + 0, _mm_unpacklo_epi16(lo01, lo23));
  _mm_storeu_si128(o + 1, _mm_unpackhi_epi16(lo01, lo23));
  _mm_storeu_si128(o + 2, _mm_unpacklo_epi16(hi01, hi23));
  _mm_storeu_si128(o + 3, _mm_unpackhi_epi16(hi01, hi23));
}

inline void expand32(const std::uint8_t* in, std::int64_t nbytes, const Tables& t, std::uint32_t* out) {
  for (std::int64_t j = 0; j < nbytes; j += 16) {
    __m128i i0, i1;
    nibbles(in + j, i0, i1);
    store32x16(i0, t, out + 2 * j);
    store32x16(i1, t, out + 2 * j + 16);
  }
}
#endif

// Scalar table: the 16 rounded outputs of one block.
template <typename T>
inline void scalar_lut(const float* code, float scale, int out_dtype, T* lut) {
  for (int k = 0; k < 16; ++k) {
    const float v = code[k] * scale;
    if constexpr (sizeof(T) == 4) {
      lut[k] = f32_bits(v);
    } else {
      lut[k] = out_dtype == nf4::kFloat16 ? f32_to_f16(v) : f32_to_bf16(v);
    }
  }
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FASTLORA_HAVE_AVX512_PATH 1
// AVX-512 (F + BW), chosen at run time. vpermps / vpermw look 16 nibbles up in a 16-entry
// table in one instruction each, so there are no byte planes to build or recombine: the
// table is just the 16 rounded products in one register.
template <typename T>
__attribute__((target("avx512f,avx512bw"))) std::int64_t expand_avx512(const std::uint8_t* in, std::int64_t nbytes,
                                                                       const float* code, float scale,
                                                                       int out_dtype, T* out) {
  const __m512 prod = _mm512_mul_ps(_mm512_loadu_ps(code), _mm512_set1_ps(scale));
  const __m512i low4 = _mm512_set1_epi32(15);
  std::int64_t j = 0;
  if constexpr (sizeof(T) == 4) {
    // byte i's nibbles sit in lane i of h (high) and l (low); interleave them into
    // element order: 2i <- h[i], 2i+1 <- l[i].
    const __m512i first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i second = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    for (; j + 16 <= nbytes; j += 16) {
      const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(in + j)));
      const __m512i h = _mm512_srli_epi32(b, 4), l = _mm512_and_si512(b, low4);
      float* o = reinterpret_cast<float*>(out + 2 * j);
      _mm512_storeu_ps(o, _mm512_permutexvar_ps(_mm512_permutex2var_epi32(h, first, l), prod));
      _mm512_storeu_ps(o + 16, _mm512_permutexvar_ps(_mm512_permutex2var_epi32(h, second, l), prod));
    }
  } else {
    __m256i table16;  // the 16 rounded 16-bit values
    if (out_dtype == nf4::kBFloat16) {
      const __m512i u = _mm512_castps_si512(prod);
      const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
      const __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb));
      table16 = _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16));
    } else {
      table16 = _mm512_cvtps_ph(prod, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    }
    const __m512i table = _mm512_castsi256_si512(table16);  // only lanes 0..15 are indexed
    for (; j + 16 <= nbytes; j += 16) {
      const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(in + j)));
      // 32-bit lane i = hi | lo << 16: as 16-bit lanes, the nibbles in element order.
      const __m512i idx = _mm512_or_si512(_mm512_srli_epi32(b, 4), _mm512_slli_epi32(_mm512_and_si512(b, low4), 16));
      _mm512_storeu_si512(out + 2 * j, _mm512_permutexvar_epi16(idx, table));
    }
  }
  return j;
}
#endif

// Instruction sets of the dequantize kernel; tests force each one.
enum Isa : int { kIsaAuto = -1, kIsaScalar = 0, kIsaSse41 = 1, kIsaAvx512 = 2 };

bool isa_available(int isa) {
  switch (isa) {
    case kIsaScalar:
      return true;
    case kIsaSse41:
#if defined(__SSE4_1__)
      return true;
#else
      return false;
#endif
    case kIsaAvx512:
#ifdef FASTLORA_HAVE_AVX512_PATH
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
#else
      return false;
#endif
    default:
      return false;
  }
}

int best_isa() {
  static const int best = isa_available(kIsaAvx512) ? kIsaAvx512 : isa_available(kIsaSse41) ? kIsaSse41 : kIsaScalar;
  return best;
}

template <typename T>
void dequantize_impl(const std::uint8_t* packed, const BlockScales& scale_of, const float* code, std::int64_t n,
                     std::int64_t bs, T* out, int out_dtype, int isa) {
  const std::int64_t nblocks = (n + bs - 1) / bs;
#if defined(__SSE4_1__)
  static const bool has_f16c = __builtin_cpu_supports("f16c");
#endif
  parallel_blocks(nblocks, n, [&](std::int64_t b) {
    const std::int64_t e0 = b * bs;  // bs is even, so a block starts on a byte boundary
    const std::int64_t ne = std::min(bs, n - e0);
    const std::int64_t full_bytes = ne / 2;
    const std::uint8_t* in = packed + e0 / 2;
    T* o = out + e0;
    const float scale = scale_of(b);
    std::int64_t done = 0;
#ifdef FASTLORA_HAVE_AVX512_PATH
    if (isa == kIsaAvx512) done = expand_avx512(in, full_bytes, code, scale, out_dtype, o);
#endif
#if defined(__SSE4_1__)
    if (isa == kIsaSse41 && full_bytes >= 16) {
      done = full_bytes & ~std::int64_t{15};
      Tables t;
      if constexpr (sizeof(T) == 4) {
        tables_f32(code, scale, t);
        expand32(in, done, t, o);
      } else {
        if (out_dtype == nf4::kBFloat16) {
          tables_bf16(code, scale, t);
        } else if (has_f16c) {
          tables_f16_f16c(code, scale, t);
        } else {
          tables_f16_scalar(code, scale, t);
        }
        expand16(in, done, t, o);
      }
    }
#endif
    if (done == full_bytes && !(ne & 1)) return;
    T lut[16];  // the last, partial block (or no SIMD): a scalar table
    scalar_lut(code, scale, out_dtype, lut);
    expand_scalar(in + done, full_bytes - done, lut, o + 2 * done);
    if (ne & 1) o[ne - 1] = lut[in[full_bytes] >> 4];  // odd n: the last byte's high nibble
  });
}

void nf4_dequantize_cpu(std::uintptr_t packed, std::uintptr_t absmax, std::uintptr_t code,
                        std::uintptr_t s2_absmax, std::uintptr_t s2_code, float offset, bool nested,
                        std::int64_t n, std::int64_t blocksize, std::int64_t s2_blocksize,
                        std::uintptr_t out, int out_dtype, int isa) {
  if (isa == kIsaAuto) isa = best_isa();
  if (!isa_available(isa))
    throw std::invalid_argument("nf4_dequantize_cpu: instruction set " + std::to_string(isa) +
                                " is not available on this CPU/build");
  const BlockScales am{reinterpret_cast<const void*>(absmax), reinterpret_cast<const float*>(s2_absmax),
                       reinterpret_cast<const float*>(s2_code), offset, nested, s2_blocksize};
  const auto* p = reinterpret_cast<const std::uint8_t*>(packed);
  const auto* c = reinterpret_cast<const float*>(code);
  switch (out_dtype) {
    case nf4::kFloat32:
      dequantize_impl<std::uint32_t>(p, am, c, n, blocksize, reinterpret_cast<std::uint32_t*>(out), out_dtype, isa);
      break;
    case nf4::kFloat16:
    case nf4::kBFloat16:
      dequantize_impl<std::uint16_t>(p, am, c, n, blocksize, reinterpret_cast<std::uint16_t*>(out), out_dtype, isa);
      break;
    default:
      throw std::invalid_argument("nf4_dequantize_cpu: unknown output dtype code " + std::to_string(out_dtype));
  }
}

// ---------------------------------------------------------------------------------------
// Quantize
// ---------------------------------------------------------------------------------------
inline std::uint8_t nf4_index(float x) {
  // Branch-free comparison count: x > mid moves up, so ties go to the lower code.
  int q = 0;
  for (int k = 0; k < 15; ++k) q += x > kMid[k];
  return static_cast<std::uint8_t>(q);
}

template <typename Load>
void quantize_impl(Load load, std::int64_t n, std::int64_t bs, std::uint8_t* packed, float* absmax) {
  const std::int64_t nblocks = (n + bs - 1) / bs;
  parallel_blocks(nblocks, n, [&](std::int64_t b) {
    const std::int64_t e0 = b * bs, ne = std::min(bs, n - e0);
    float x[4096];  // the largest valid blocksize
    float am = 0.f;
    for (std::int64_t i = 0; i < ne; ++i) {
      x[i] = load(e0 + i);
      am = std::max(am, std::fabs(x[i]));
    }
    // bitsandbytes 0.50 (default/CPU path): full blocks multiply by the reciprocal of the
    // clamped absmax and store the unclamped one; the trailing partial block divides by
    // its clamped absmax and stores the clamped one.
    const float amc = std::max(am, 1e-38f);
    std::uint8_t q[4096];
    if (ne == bs) {
      const float r = 1.0f / amc;
      absmax[b] = am;
      for (std::int64_t i = 0; i < ne; ++i) q[i] = nf4_index(std::min(std::max(x[i] * r, -1.f), 1.f));
    } else {
      absmax[b] = amc;
      for (std::int64_t i = 0; i < ne; ++i) q[i] = nf4_index(std::min(std::max(x[i] / amc, -1.f), 1.f));
    }
    if (ne & 1) q[ne] = 7;  // odd n: bitsandbytes pads with 0.0, which is code 7
    std::uint8_t* o = packed + e0 / 2;
    for (std::int64_t j = 0; j < (ne + 1) / 2; ++j) o[j] = static_cast<std::uint8_t>(q[2 * j] << 4 | q[2 * j + 1]);
  });
}

void nf4_quantize_cpu(std::uintptr_t in, int in_dtype, std::int64_t n, std::int64_t blocksize,
                      std::uintptr_t packed, std::uintptr_t absmax) {
  auto* p = reinterpret_cast<std::uint8_t*>(packed);
  auto* a = reinterpret_cast<float*>(absmax);
  if (blocksize > 4096 || blocksize < 2 || blocksize % 2)
    throw std::invalid_argument("nf4_quantize_cpu: blocksize must be even and at most 4096");
  switch (in_dtype) {
    case nf4::kFloat32: {
      const auto* x = reinterpret_cast<const float*>(in);
      quantize_impl([x](std::int64_t i) { return x[i]; }, n, blocksize, p, a);
      break;
    }
    case nf4::kFloat16: {
      const auto* x = reinterpret_cast<const std::uint16_t*>(in);
      quantize_impl([x](std::int64_t i) { return f16_to_f32(x[i]); }, n, blocksize, p, a);
      break;
    }
    case nf4::kBFloat16: {
      const auto* x = reinterpret_cast<const std::uint16_t*>(in);
      quantize_impl([x](std::int64_t i) { return bf16_to_f32(x[i]); }, n, blocksize, p, a);
      break;
    }
    default:
      throw std::invalid_argument("nf4_quantize_cpu: unknown input dtype code " + std::to_string(in_dtype));
  }
}

// Double-quant statistics: blockwise 8-bit with bitsandbytes' CPU thresholds (nf4.h).
void nf4_quantize_stats_cpu(std::uintptr_t in, std::int64_t n, std::int64_t blocksize, std::uintptr_t q_out,
                            std::uintptr_t absmax_out) {
  const auto* x = reinterpret_cast<const float*>(in);
  auto* q = reinterpret_cast<std::uint8_t*>(q_out);
  auto* absmax = reinterpret_cast<float*>(absmax_out);
  const std::int64_t nblocks = (n + blocksize - 1) / blocksize;
  parallel_blocks(nblocks, n, [&](std::int64_t b) {
    const std::int64_t e0 = b * blocksize, ne = std::min(blocksize, n - e0);
    float am = 0.f;
    for (std::int64_t i = 0; i < ne; ++i) am = std::max(am, std::fabs(x[e0 + i]));
    absmax[b] = am;
    const float r = 1.0f / am;  // inf for an all-zero block: 0 * inf = NaN -> index 0
    for (std::int64_t i = 0; i < ne; ++i) {
      const float v = x[e0 + i] * r;
      q[e0 + i] = std::isnan(v) ? 0
                                : static_cast<std::uint8_t>(std::upper_bound(kStats8Thr, kStats8Thr + nf4::kStats8Thresholds, v) -
                                                            kStats8Thr);
    }
  });
}

}  // namespace
}  // namespace fastlora

static void nf4_cpu_bind(pybind11::module_& m) {
  namespace py = pybind11;
  using namespace fastlora;
  m.def("nf4_dequantize_cpu", &nf4_dequantize_cpu, py::call_guard<py::gil_scoped_release>(),
        "NF4 dequantize (CPU): packed, absmax, code, state2_absmax, state2_code, offset, nested, n, "
        "blocksize, state2_blocksize, out, out_dtype (0 f32, 1 f16, 2 bf16), isa (-1 best, 0 scalar, "
        "1 SSE4.1, 2 AVX-512)",
        py::arg("packed"), py::arg("absmax"), py::arg("code"), py::arg("state2_absmax"), py::arg("state2_code"),
        py::arg("offset"), py::arg("nested"), py::arg("n"), py::arg("blocksize"), py::arg("state2_blocksize"),
        py::arg("out"), py::arg("out_dtype"), py::arg("isa") = -1);
  m.def("nf4_cpu_isa_available", &isa_available, "whether the dequantize kernel can use an instruction set");
  m.def("nf4_quantize_cpu", &nf4_quantize_cpu, py::call_guard<py::gil_scoped_release>(),
        "NF4 quantize (CPU): input, in_dtype, n, blocksize, packed_out, absmax_out");
  m.def("nf4_quantize_stats_cpu", &nf4_quantize_stats_cpu, py::call_guard<py::gil_scoped_release>(),
        "double-quant statistics (CPU): float32 input, n, blocksize, q_out, absmax_out");
}

FASTLORA_REGISTER(nf4_cpu_bind);
