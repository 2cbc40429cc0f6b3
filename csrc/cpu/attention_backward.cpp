// Attention backward on the CPU in bf16, from the forward's log-sum-exp (the flash-attention
// recurrence), with every matmul bf16 x bf16 -> fp32 on AMX tiles through ATen's brgemm, or on
// AVX-512-BF16 dot products where oneDNN offers no brgemm (BlockMatmul below).
//
// Why our own: torch 2.13's CPU flash-attention backward takes 5-6x its forward's time in bf16
// (bench-20m, 4 x 512: 123 ms of a 700 ms training step against 24 ms forward) while its
// forward already runs on brgemm; this kernel is the same math with the backward's five
// matmuls on brgemm too.
//
// Per (batch, KV head) task, for each query head of the group, each block of 256 queries i and
// each block of 64 keys j up to the causal bound (rows that see none of block j are skipped, and
// blocks the mask allows none of):
//   S_ij = Q_i K_j^T, dP_ij = dO_i V_j^T
//   P = exp(scale * S - lse) on allowed positions, 0 elsewhere
//   dS = P * (dP - delta_i) * scale, delta_i = sum_d dO_i * O_i
//   dQ_i = dS K, dK += dS^T Q_i, dV += P^T dO_i            (dK / dV accumulated in fp32 over the group)
#include "attention_backward.h"
#include "attention_blocks.h"
#include "avx512_math.h"

#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace mdt {

#if defined(__x86_64__)
namespace {

using namespace attention_blocks;

constexpr int64_t kQueryBlock = 256;  // queries per block (fewer, larger brgemm calls)

// One query row over a key block of kBlock columns, in place: scores -> P = exp(scale * s -
// lse), dprobs -> dS = P * (dP - delta) * scale.
MDT_AVX512 void probs_and_dscores(float* scores, float* dprobs, float scale, float lse, float delta) {
  const __m512 vscale = _mm512_set1_ps(scale), vlse = _mm512_set1_ps(lse), vdelta = _mm512_set1_ps(delta);
  for (int64_t c = 0; c < kBlock; c += 16) {
    const __m512 p = exp16(_mm512_fmsub_ps(_mm512_loadu_ps(scores + c), vscale, vlse));
    const __m512 ds = _mm512_mul_ps(_mm512_mul_ps(p, _mm512_sub_ps(_mm512_loadu_ps(dprobs + c), vdelta)), vscale);
    _mm512_storeu_ps(scores + c, p);
    _mm512_storeu_ps(dprobs + c, ds);
  }
}

// sum_i a_i * b_i over n bf16 values (n a multiple of 16), accumulated in fp32
MDT_AVX512 float dot_bf16(const BFloat16* a, const BFloat16* b, int64_t n) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __m512i ai = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + i))), 16);
    const __m512i bi = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + i))), 16);
    acc = _mm512_fmadd_ps(_mm512_castsi512_ps(ai), _mm512_castsi512_ps(bi), acc);
  }
  return _mm512_reduce_add_ps(acc);
}

// Zero the entries of a kBlock-wide row that may not be attended: index >= `keep`, and (with a
// contiguous bool mask row) where the mask is false.
MDT_AVX512 void apply_row_mask(float* s_row, float* dp_row, int64_t keep, const bool* mask_row) {
  __mmask64 allowed = keep >= kBlock ? ~__mmask64(0) : keep <= 0 ? __mmask64(0) : ((__mmask64(1) << keep) - 1);
  if (mask_row != nullptr) allowed &= _mm512_test_epi8_mask(_mm512_loadu_si512(mask_row), _mm512_set1_epi8(1));
  for (int64_t c = 0; c < kBlock; c += 16) {
    const __mmask16 lanes = static_cast<__mmask16>(allowed >> c);
    _mm512_storeu_ps(s_row + c, _mm512_maskz_mov_ps(lanes, _mm512_loadu_ps(s_row + c)));
    _mm512_storeu_ps(dp_row + c, _mm512_maskz_mov_ps(lanes, _mm512_loadu_ps(dp_row + c)));
  }
}

// Two rows a, b of kBlock floats -> the kBlock (a_n, b_n) bf16 pairs of brgemm's VNNI B layout
// ([K / 2][N][2], checked equal to oneDNN's pack), written without a separate pack pass
MDT_AVX512 void to_bf16_pairs(const float* a, const float* b, BFloat16* dst) {
  for (int64_t c = 0; c < kBlock; c += 16) {
    const __m256bh wa = _mm512_cvtneps_pbh(_mm512_loadu_ps(a + c));
    const __m256bh wb = _mm512_cvtneps_pbh(_mm512_loadu_ps(b + c));
    const __m512i low = _mm512_cvtepu16_epi32(reinterpret_cast<const __m256i&>(wa));
    const __m512i high = _mm512_slli_epi32(_mm512_cvtepu16_epi32(reinterpret_cast<const __m256i&>(wb)), 16);
    _mm512_storeu_si512(dst + 2 * c, _mm512_or_si512(low, high));
  }
}

}  // namespace

bool attention_backward_supported(const at::Tensor& q) {
  return q.device().is_cpu() && q.scalar_type() == at::kBFloat16 && q.size(-1) % kHeadDimStep == 0 &&
         cpu_has_avx512_bf16();
}

std::string attention_backward_matmuls() { return attention_matmuls_here(); }

std::vector<at::Tensor> attention_backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                                           const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                           const c10::optional<at::Tensor>& mask, bool is_causal, double scale,
                                           const std::string& matmuls) {
  TORCH_CHECK(attention_backward_supported(q), "attention_backward: needs bf16 CPU tensors with a head dim that is a "
              "multiple of 32, on a CPU with AVX-512-BF16");
  const BlockMatmul matmul(BlockMatmul::uses_brgemm("attention_backward", matmuls));
  const at::Tensor mask_bool = checked_inputs("attention_backward", q, k, v, mask);  // [B, Hq, S, S] or undefined
  const int64_t batch = q.size(0), heads = q.size(1), seq = q.size(2), dim = q.size(3);
  const int64_t kv_heads = k.size(1), groups = heads / kv_heads;
  for (const at::Tensor* t : {&grad_out, &k, &v, &out})
    TORCH_CHECK(t->scalar_type() == at::kBFloat16, "attention_backward: every tensor but lse must be bf16");
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(), "attention_backward: grad_out / out must be like q");
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.dim() == 3, "attention_backward: lse must be fp32 [B, H, S]");
  const bool has_mask = mask_bool.defined();
  auto last_contiguous = [](const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); };
  const at::Tensor qc = last_contiguous(q), kc = last_contiguous(k), vc = last_contiguous(v);
  const at::Tensor goc = last_contiguous(grad_out), oc = last_contiguous(out);
  const int64_t padded = (seq + kBlock - 1) / kBlock * kBlock, blocks = padded / kBlock;
  const float fscale = static_cast<float>(scale);
  const int64_t dcols = dim % kBlock == 0 ? kBlock : kHeadDimStep;  // head-dim columns per packed block of K

  auto grad_q = at::empty({batch, heads, seq, dim}, q.options());
  auto grad_k = at::empty({batch, kv_heads, seq, dim}, k.options());
  auto grad_v = at::empty({batch, kv_heads, seq, dim}, v.options());
  const BFloat16* q_data = qc.data_ptr<BFloat16>();
  const BFloat16* k_data = kc.data_ptr<BFloat16>();
  const BFloat16* v_data = vc.data_ptr<BFloat16>();
  const BFloat16* go_data = goc.data_ptr<BFloat16>();
  const BFloat16* o_data = oc.data_ptr<BFloat16>();
  const float* lse_data = lse.data_ptr<float>();
  const bool* mask_data = has_mask ? mask_bool.data_ptr<bool>() : nullptr;
  BFloat16* grad_q_data = grad_q.data_ptr<BFloat16>();
  BFloat16* grad_k_data = grad_k.data_ptr<BFloat16>();
  BFloat16* grad_v_data = grad_v.data_ptr<BFloat16>();

  at::parallel_for(0, batch * kv_heads, 1, [&](int64_t begin, int64_t end) {
    // per-thread buffers
    std::vector<BFloat16> key(padded * dim), value(padded * dim), query(padded * dim), grad_o(padded * dim);
    std::vector<BFloat16> query_t(dim * padded), grad_o_t(dim * padded);
    std::vector<BFloat16> key_packed(padded * dim), key_t_packed(dim * padded), value_t_packed(dim * padded);
    std::vector<BFloat16> dscores(kQueryBlock * padded);  // [rows, span] bf16, row-major
    std::vector<BFloat16> probs_packed(kQueryBlock * kBlock), dscores_packed(kQueryBlock * kBlock);  // one key block
    // fp32 S and dP of one key block at a time (stays in L2), [rows, kBlock]
    std::vector<float> scores(kQueryBlock * kBlock), dprobs(kQueryBlock * kBlock), dq(kQueryBlock * dim);
    std::vector<float> dk_t(dim * padded), dv_t(dim * padded), delta(padded), row_lse(padded);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / kv_heads, hk = task % kv_heads;
      copy_rows_padded(k_data + b * kc.stride(0) + hk * kc.stride(1), seq, dim, kc.stride(2), padded, key.data());
      copy_rows_padded(v_data + b * vc.stride(0) + hk * vc.stride(1), seq, dim, vc.stride(2), padded, value.data());
      for (int64_t c = 0; c < dim; c += dcols)  // B of dQ = dS K: [L, D]
        matmul.pack(key.data() + c, padded, dim, key_packed.data() + c * padded, dcols);
      for (int64_t c = 0; c < padded; c += kBlock) {  // B of S = Q K^T and of dP = dO V^T: [D, L]
        pack_transposed_block(key.data() + c * dim, dim, key_t_packed.data() + c * dim);
        pack_transposed_block(value.data() + c * dim, dim, value_t_packed.data() + c * dim);
      }
      std::fill(dk_t.begin(), dk_t.end(), 0.f);
      std::fill(dv_t.begin(), dv_t.end(), 0.f);
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t h = hk * groups + g;
        copy_rows_padded(q_data + b * qc.stride(0) + h * qc.stride(1), seq, dim, qc.stride(2), padded, query.data());
        copy_rows_padded(go_data + b * goc.stride(0) + h * goc.stride(1), seq, dim, goc.stride(2), padded,
                         grad_o.data());
        transpose_bf16(query.data(), padded, dim, dim, query_t.data(), padded);
        transpose_bf16(grad_o.data(), padded, dim, dim, grad_o_t.data(), padded);
        const BFloat16* o_head = o_data + b * oc.stride(0) + h * oc.stride(1);
        const float* lse_head = lse_data + b * lse.stride(0) + h * lse.stride(1);
        for (int64_t i = 0; i < seq; ++i) {
          delta[i] = dot_bf16(grad_o.data() + i * dim, o_head + i * oc.stride(2), dim);
          row_lse[i] = lse_head[i * lse.stride(2)];
        }
        const bool* mask_head = has_mask ? mask_data + b * mask_bool.stride(0) + h * mask_bool.stride(1) : nullptr;
        const int64_t mask_ld = has_mask ? mask_bool.stride(2) : 0;
        const int64_t mask_cd = has_mask ? mask_bool.stride(3) : 0;
        for (int64_t q0 = 0; q0 < padded; q0 += kQueryBlock) {
          const int64_t rows = std::min(kQueryBlock, padded - q0);
          const int64_t span = is_causal ? q0 + rows : padded;  // keys [0, span)
          for (int64_t k0 = 0; k0 < span; k0 += kBlock) {
            // causal: rows before k0 see none of this key block (r0 is a multiple of kBlock)
            const int64_t r0 = is_causal ? std::max<int64_t>(k0 - q0, 0) : 0;
            if (has_mask && !block_allowed(mask_head, mask_ld, mask_cd, std::min(q0 + r0, seq), std::min(q0 + rows, seq),
                                           k0, std::min(k0 + kBlock, seq))) {
              // no query row may attend these keys (other documents): dS is 0 there, nothing to add
              for (int64_t r = 0; r < rows; ++r)
                std::memset(dscores.data() + r * padded + k0, 0, kBlock * sizeof(BFloat16));
              continue;
            }
            for (int64_t r = 0; r < r0; ++r) {
              std::memset(dscores.data() + r * padded + k0, 0, kBlock * sizeof(BFloat16));
            }
            // S = Q K^T, dP = dO V^T on rows [r0, rows) x keys [k0, k0 + kBlock)
            matmul.gemm(rows - r0, dim, query.data() + (q0 + r0) * dim, dim, key_t_packed.data() + k0 * dim,
                 scores.data() + r0 * kBlock, kBlock, false);
            matmul.gemm(rows - r0, dim, grad_o.data() + (q0 + r0) * dim, dim, value_t_packed.data() + k0 * dim,
                 dprobs.data() + r0 * kBlock, kBlock, false);
            const bool check_diagonal = is_causal && k0 >= q0;
            for (int64_t r = r0; r < rows; ++r) {
              const int64_t qi = q0 + r;
              float* s_row = scores.data() + r * kBlock;
              float* dp_row = dprobs.data() + r * kBlock;
              if (qi >= seq || std::isinf(row_lse[qi])) {  // padding, or a row that attends nothing
                std::fill(s_row, s_row + kBlock, 0.f);
                std::fill(dp_row, dp_row + kBlock, 0.f);
              } else {
                probs_and_dscores(s_row, dp_row, fscale, row_lse[qi], delta[qi]);
                if (has_mask || k0 + kBlock > seq || (check_diagonal && qi < k0 + kBlock)) {
                  const int64_t keep = std::min(seq, is_causal ? qi + 1 : seq) - k0;  // keys k0 + [0, keep)
                  const bool* mask_row = has_mask ? mask_head + qi * mask_ld + k0 * mask_cd : nullptr;
                  if (mask_row != nullptr && (mask_cd != 1 || k0 + kBlock > seq)) {  // strided or partial row
                    for (int64_t c = 0; c < kBlock; ++c)
                      if (c >= keep || !mask_row[c * mask_cd]) s_row[c] = dp_row[c] = 0.f;
                  } else {
                    apply_row_mask(s_row, dp_row, keep, mask_row);
                  }
                }
              }
              to_bf16(dp_row, dscores.data() + r * padded + k0);  // row-major dS: A of dQ
            }
            // P and dS of rows [r0, rows) as brgemm B operands (VNNI pairs of rows), written directly
            for (int64_t r = r0; r < rows; r += 2) {
              to_bf16_pairs(scores.data() + r * kBlock, scores.data() + (r + 1) * kBlock,
                            probs_packed.data() + (r - r0) * kBlock);
              to_bf16_pairs(dprobs.data() + r * kBlock, dprobs.data() + (r + 1) * kBlock,
                            dscores_packed.data() + (r - r0) * kBlock);
            }
            // dK^T [D, keys] += Q^T [D, rows] dS [rows, keys]; dV^T [D, keys] += dO^T [D, rows] P [rows, keys]
            matmul.gemm(dim, rows - r0, query_t.data() + q0 + r0, padded, dscores_packed.data(), dk_t.data() + k0, padded,
                 true);
            matmul.gemm(dim, rows - r0, grad_o_t.data() + q0 + r0, padded, probs_packed.data(), dv_t.data() + k0, padded,
                 true);
          }
          // dQ [rows, D] = dS [rows, span] K [span, D]
          for (int64_t c = 0; c < dim; c += dcols)
            matmul.gemm(rows, span, dscores.data(), padded, key_packed.data() + c * padded, dq.data() + c, dim, false, dcols);
          for (int64_t r = 0; r < rows && q0 + r < seq; ++r) {
            BFloat16* dst = grad_q_data + ((b * heads + h) * seq + q0 + r) * dim;
            to_bf16(dq.data() + r * dim, dst, dim);
          }
        }
      }
      BFloat16* dk_head = grad_k_data + (b * kv_heads + hk) * seq * dim;
      BFloat16* dv_head = grad_v_data + (b * kv_heads + hk) * seq * dim;
      transpose(dk_t.data(), dim, seq, padded, dk_head, dim);
      transpose(dv_t.data(), dim, seq, padded, dv_head, dim);
    }
    matmul.release();
  });
  return {grad_q, grad_k, grad_v};
}

#else  // not x86-64: no AVX-512 / AMX; the caller keeps torch's own backward

bool attention_backward_supported(const at::Tensor&) { return false; }

std::string attention_backward_matmuls() { return "none"; }

std::vector<at::Tensor> attention_backward(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                           const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&, bool,
                                           double, const std::string&) {
  TORCH_CHECK(false, "attention_backward: needs an x86-64 CPU with AVX-512-BF16");
}

#endif

}  // namespace mdt
