// Building blocks of the CPU attention kernels (attention_forward.cpp, attention_backward.cpp):
// 64-key blocks, bf16 x bf16 -> fp32 block matmuls on one packed layout (AMX brgemm or
// AVX-512-BF16 dot products), transposes and padded copies. x86-64 only; every AVX-512 function
// runs only where the caller checked cpu_has_avx512_bf16().
#pragma once
#if defined(__x86_64__)
#include "avx512_math.h"

#include <ATen/ATen.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>

namespace mdt::attention_blocks {

using at::BFloat16;
namespace cpublas = at::native::cpublas;

constexpr int64_t kBlock = 64;        // keys per block: the packed column width
// head dims: multiples of 32 (the demo's model has 32; bench-20m and real models 64 or 128). The
// head dim is a brgemm K (a multiple of 2 suffices) everywhere but in dQ = dS K, where its columns
// are packed kBlock at a time, or 32 at a time when it is not a multiple of kBlock
constexpr int64_t kHeadDimStep = 32;

// The matmuls the kernels' "auto" runs on this CPU: "brgemm" (oneDNN packs bf16 for it: AMX),
// "avx512_bf16" (VDPBF16PS dot products), or "none" (no AVX-512-BF16: the kernels refuse).
inline std::string attention_matmuls_here() {
  if (!cpu_has_avx512_bf16()) return "none";
  return cpublas::could_pack(at::kBFloat16) ? "brgemm" : "avx512_bf16";
}

// n floats (a multiple of 16, default kBlock) -> bf16 (round to nearest even)
MDT_AVX512 inline void to_bf16(const float* src, BFloat16* dst, int64_t n = kBlock) {
  for (int64_t c = 0; c < n; c += 16) {
    const __m256bh packed = _mm512_cvtneps_pbh(_mm512_loadu_ps(src + c));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + c), reinterpret_cast<const __m256i&>(packed));
  }
}

// The attention kernels' matmuls, C [M, N] (+)= A [M, K] x B [K, N]: A row-major bf16, B "VNNI-packed"
// ([K / 2][N][2] bf16: rows 2p and 2p + 1 interleaved, K even, N = kBlock, or 32 for the head
// dim's columns when it is not a multiple of 64), C fp32. Two implementations of one layout:
// - brgemm: ATen's oneDNN brgemm, AMX tiles. oneDNN packs bf16 for it only on AMX CPUs in our
//   measurements (an AMD EPYC with AVX-512-BF16 but no AMX: no).
// - avx512_bf16: our register-tiled loop of VDPBF16PS (a bf16 pair dot product into fp32, the
//   instruction AVX-512-BF16 CPUs without AMX have; oneDNN offers no brgemm there, and calling
//   its plain gemm per 64-key block would repack B on every call).
class BlockMatmul {
 public:
  explicit BlockMatmul(bool brgemm) : brgemm_(brgemm) {}

  // Whether a kernel asked for `matmuls` ("auto" | "brgemm" | "avx512_bf16") runs brgemm; an
  // implementation this CPU cannot run is refused, naming the ones it can.
  static bool uses_brgemm(const char* kernel, const std::string& matmuls) {
    const std::string available = attention_matmuls_here();
    TORCH_CHECK(matmuls == "auto" || matmuls == "avx512_bf16" || (matmuls == "brgemm" && available == "brgemm"),
                kernel, ": matmuls='", matmuls, "' is not one this CPU runs: 'auto' (here '", available,
                "'), 'avx512_bf16', or 'brgemm' where oneDNN packs bf16 for it (AMX)");
    return matmuls == "brgemm" || (matmuls == "auto" && available == "brgemm");
  }

  // B's packed copy of the row-major [K, N] bf16 block `src` (leading dimension ld)
  void pack(const BFloat16* src, int64_t K, int64_t ld, BFloat16* dst, int64_t N = kBlock) const {
    if (brgemm_) {  // oneDNN packs at most 64 columns at a time
      cpublas::pack(K, N, ld, N, at::kBFloat16, at::kBFloat16, src, dst);
      return;
    }
    for (int64_t p = 0; p < K / 2; ++p)
      for (int64_t n = 0; n < N; ++n) {
        dst[(p * N + n) * 2] = src[2 * p * ld + n];
        dst[(p * N + n) * 2 + 1] = src[(2 * p + 1) * ld + n];
      }
  }

  // C [M, N] (+)= A [M, K] x B [K, N] (B packed as above with the same N)
  void gemm(int64_t M, int64_t K, const BFloat16* A, int64_t lda, const BFloat16* B, float* C, int64_t ldc,
            bool accumulate, int64_t N = kBlock) const {
    if (brgemm_) {
      cpublas::brgemm(M, N, K, lda, N, ldc, accumulate, A, B, C, true);
    } else if (N == kBlock) {
      vnni_gemm<4>(M, K / 2, A, lda, B, C, ldc, accumulate);
    } else {
      TORCH_CHECK(N == 32, "attention_backward: packed blocks are 64 or 32 columns wide");
      vnni_gemm<2>(M, K / 2, A, lda, B, C, ldc, accumulate);
    }
  }

  // brgemm keeps per-thread AMX state; give it back once a thread's tasks are done
  void release() const {
    if (brgemm_) cpublas::brgemm_release(true);
  }

 private:
  bool brgemm_;

  // rows of C per register tile: rows x NV vectors of 16 fp32 accumulators (24 of AVX-512's 32
  // registers for 64 columns; 16 for 32 columns), plus NV for B and one for A
  template <int NV>
  static constexpr int kTileRows = NV == 4 ? 6 : 8;

  template <int NV>
  static void vnni_gemm(int64_t M, int64_t pairs, const BFloat16* A, int64_t lda, const BFloat16* B, float* C,
                        int64_t ldc, bool accumulate) {
    constexpr int R = kTileRows<NV>;
    int64_t m = 0;
    for (; m + R <= M; m += R) vnni_tile<R, NV>(pairs, A + m * lda, lda, B, C + m * ldc, ldc, accumulate);
    if (m < M) vnni_tail<R - 1, NV>(M - m, pairs, A + m * lda, lda, B, C + m * ldc, ldc, accumulate);
  }

  // the last `rows` (< R) rows: the tile of exactly that many rows
  template <int R, int NV>
  static void vnni_tail(int64_t rows, int64_t pairs, const BFloat16* A, int64_t lda, const BFloat16* B, float* C,
                        int64_t ldc, bool accumulate) {
    if constexpr (R > 0) {
      if (rows == R) {
        vnni_tile<R, NV>(pairs, A, lda, B, C, ldc, accumulate);
      } else {
        vnni_tail<R - 1, NV>(rows, pairs, A, lda, B, C, ldc, accumulate);
      }
    }
  }

  // C [R, 16 NV] (+)= A [R, 2 pairs] x B: per pair p, A's (a_2p, a_2p+1) broadcast to all lanes
  // and dotted with B's 16 NV packed column pairs
  template <int R, int NV>
  MDT_AVX512 static void vnni_tile(int64_t pairs, const BFloat16* A, int64_t lda, const BFloat16* B, float* C,
                                   int64_t ldc, bool accumulate) {
    __m512 acc[R][NV];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = accumulate ? _mm512_loadu_ps(C + r * ldc + 16 * v) : _mm512_setzero_ps();
    for (int64_t p = 0; p < pairs; ++p) {
      __m512i b[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) b[v] = _mm512_loadu_si512(B + (p * NV * 16 + v * 16) * 2);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        int32_t pair;
        std::memcpy(&pair, A + r * lda + 2 * p, sizeof(pair));
        const __m512i a = _mm512_set1_epi32(pair);
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v)
          acc[r][v] = _mm512_dpbf16_ps(acc[r][v], reinterpret_cast<const __m512bh&>(a),
                                       reinterpret_cast<const __m512bh&>(b[v]));
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) _mm512_storeu_ps(C + r * ldc + 16 * v, acc[r][v]);
  }
};

// dst [cols, rows] (leading dimension ld_dst) = src [rows, cols]^T (leading dimension ld_src),
// converted to T, in 16 x 16 tiles (an element-wise strided copy missed the cache on every store
// and took ~40% of the kernel's time)
template <typename S, typename T>
inline void transpose(const S* src, int64_t rows, int64_t cols, int64_t ld_src, T* dst, int64_t ld_dst) {
  constexpr int64_t kTile = 16;
  for (int64_t r0 = 0; r0 < rows; r0 += kTile)
    for (int64_t c0 = 0; c0 < cols; c0 += kTile) {
      const int64_t r1 = std::min(r0 + kTile, rows), c1 = std::min(c0 + kTile, cols);
      for (int64_t c = c0; c < c1; ++c)
        for (int64_t r = r0; r < r1; ++r) dst[c * ld_dst + r] = static_cast<T>(src[r * ld_src + c]);
    }
}

// brgemm's B operand for X^T [D, kBlock keys], X = the row-major [kBlock, D] bf16 rows at `x`:
// a VNNI pair of X^T's rows (d, d + 1) is two adjacent elements of one row of X, so the packed
// block is X's rows transposed as 32-bit words ([D / 2][kBlock] pairs): no 16-bit transpose and
// no pack pass
inline void pack_transposed_block(const BFloat16* x, int64_t dim, BFloat16* dst) {
  transpose(reinterpret_cast<const uint32_t*>(x), kBlock, dim / 2, dim / 2, reinterpret_cast<uint32_t*>(dst), kBlock);
}

// the same for bf16 -> bf16, moved as 16-bit words
inline void transpose_bf16(const BFloat16* src, int64_t rows, int64_t cols, int64_t ld_src, BFloat16* dst, int64_t ld_dst) {
  transpose(reinterpret_cast<const uint16_t*>(src), rows, cols, ld_src, reinterpret_cast<uint16_t*>(dst), ld_dst);
}

// Checks the kernels' shared input contract (`kernel` names the caller in the errors): q
// [B, Hq, S, D], k / v [B, Hkv, S, D] with Hq a multiple of Hkv, an optional bool mask [B or 1,
// Hq or 1, S, S]; returns the mask expanded to [B, Hq, S, S] (undefined when none was given).
inline at::Tensor checked_inputs(const char* kernel, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const c10::optional<at::Tensor>& mask) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, kernel, ": q, k, v must be [B, H, S, D]");
  const int64_t batch = q.size(0), heads = q.size(1), seq = q.size(2), dim = q.size(3);
  TORCH_CHECK(heads % k.size(1) == 0 && k.size(0) == batch && k.size(2) == seq && k.size(3) == dim &&
                  v.sizes() == k.sizes(),
              kernel, ": k / v must be [B, Hkv, S, D] with Hq a multiple of Hkv");
  if (!mask.has_value() || !mask->defined()) return at::Tensor();
  TORCH_CHECK(mask->scalar_type() == at::kBool && mask->dim() == 4 && mask->size(2) == seq && mask->size(3) == seq,
              kernel, ": mask must be bool [B or 1, H or 1, S, S]");
  return mask->expand({batch, heads, seq, seq});
}

// Whether any query in [q0, q1) may attend any key in [k0, k1) under a bool mask (row stride ld,
// element stride cd): a block of packed rows whose documents do not meet is skipped whole.
inline bool block_allowed(const bool* mask, int64_t ld, int64_t cd, int64_t q0, int64_t q1, int64_t k0, int64_t k1) {
  for (int64_t qi = q0; qi < q1; ++qi) {
    const bool* row = mask + qi * ld;
    if (cd == 1) {
      if (std::memchr(row + k0, 1, k1 - k0) != nullptr) return true;
    } else {
      for (int64_t kj = k0; kj < k1; ++kj)
        if (row[kj * cd]) return true;
    }
  }
  return false;
}

// the [S, D] slice (last dim contiguous) zero-padded to `padded` rows, as contiguous bf16
inline void copy_rows_padded(const BFloat16* src, int64_t rows, int64_t dim, int64_t ld, int64_t padded, BFloat16* dst) {
  for (int64_t r = 0; r < rows; ++r) std::memcpy(dst + r * dim, src + r * ld, dim * sizeof(BFloat16));
  std::memset(dst + rows * dim, 0, (padded - rows) * dim * sizeof(BFloat16));
}

}  // namespace mdt::attention_blocks
#endif
