// AVX-512 helpers shared by the CPU kernels (attention backward, cross-entropy rows). The
// extension itself is compiled for baseline x86-64: these functions target AVX-512 (with
// AVX-512-BF16) and run only where the caller checked cpu_has_avx512_bf16() (the attention
// backward uses oneDNN's bf16 brgemm where it packs bf16, which only AMX CPUs offered in our
// measurements, and its own VDPBF16PS loop elsewhere).
#pragma once
#if defined(__x86_64__)
#include <immintrin.h>

#include <cstdint>

#define MDT_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")))

// Whether this CPU (and the OS, which must save the AVX-512 state) runs MDT_AVX512 code.
inline bool cpu_has_avx512_bf16() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("fma");
}

namespace mdt {

// e^x for 16 floats: x = n ln2 + r, |r| <= ln2 / 2, e^r by its degree-6 Taylor polynomial
// (relative error < 2e-7), times 2^n by scalef (0 for very negative x).
MDT_AVX512 inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.3f)), _mm512_set1_ps(-104.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.f / 720.f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

// up to 16 values (the lanes of `lanes`; others read as 0) as fp32, from fp32 or bf16 memory
MDT_AVX512 inline __m512 load16(const float* src, __mmask16 lanes) { return _mm512_maskz_loadu_ps(lanes, src); }
MDT_AVX512 inline __m512 load16(const uint16_t* src, __mmask16 lanes) {
  const __m256i raw = _mm256_maskz_loadu_epi16(lanes, src);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

// the lanes of `lanes` of 16 fp32 values to fp32 or bf16 memory (bf16: round to nearest even)
MDT_AVX512 inline void store16(float* dst, __m512 v, __mmask16 lanes) { _mm512_mask_storeu_ps(dst, lanes, v); }
MDT_AVX512 inline void store16(uint16_t* dst, __m512 v, __mmask16 lanes) {
  const __m256bh packed = _mm512_cvtneps_pbh(v);
  _mm256_mask_storeu_epi16(dst, lanes, reinterpret_cast<const __m256i&>(packed));
}

// the lanes of a 16-wide step at column c of a row of n columns
inline __mmask16 lanes_from(int64_t c, int64_t n) {
  return n - c >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << (n - c)) - 1u);
}

}  // namespace mdt
#endif
