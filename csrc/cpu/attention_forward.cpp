// Attention forward on the CPU in bf16 for training (causal, optionally restricted by a bool
// mask): the flash-attention recurrence over 64-key blocks (online softmax: a running row max
// and sum, the output rescaled when the max grows), returning the output and the natural-log
// log-sum-exp that attention_backward starts from. Its matmuls are attention_blocks' BlockMatmul.
//
// Why our own: on an AVX-512-BF16 CPU without AMX (AMD EPYC), torch 2.13's CPU flash forward
// finds no bf16 brgemm and runs at ~60 GFLOP/s on 2 threads (18 ms per bench-20m layer, 4 x 8
// heads x 512 x 64), a third of the rate our backward reaches with the same VDPBF16PS tiles. Where
// oneDNN offers brgemm (AMX), torch's forward already runs on it and stays the one used (the
// Python side chooses; see megatron_domain/kernels/cpu_attention.py).
//
// Per (batch, KV head) task, for each query head of the group and each block of 64 queries i:
//   for each block of 64 keys j up to the causal bound that the mask allows any of:
//     S = scale * Q_i K_j^T (disallowed positions -inf), m' = max(m, rowmax S),
//     P = exp(S - m'), l = l e^(m - m') + rowsum P, O = O e^(m - m') + P V_j
//   out_i = O / l, lse_i = m + log l (a row that may attend nothing: out 0, lse -inf)
#include "attention_forward.h"

#include "attention_blocks.h"
#include "avx512_math.h"

#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <vector>

namespace mdt {

#if defined(__x86_64__)
namespace {

using namespace attention_blocks;

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// The keys of block [k0, k0 + kBlock) that query row qi may attend: below `keep` (the sequence
// end and, causal, qi + 1, relative to k0) and, with a mask row (element stride `step`; `whole`:
// all kBlock entries exist), where it is true.
MDT_AVX512 __mmask64 allowed_keys(int64_t keep, const bool* mask_row, int64_t step, bool whole) {
  __mmask64 allowed = keep >= kBlock ? ~__mmask64(0) : keep <= 0 ? __mmask64(0) : ((__mmask64(1) << keep) - 1);
  if (mask_row == nullptr) return allowed;
  if (step == 1 && whole)  // one load of kBlock contiguous bytes
    return allowed & _mm512_test_epi8_mask(_mm512_loadu_si512(mask_row), _mm512_set1_epi8(1));
  for (int64_t c = 0; c < std::min(keep, kBlock); ++c)
    if (!mask_row[c * step]) allowed &= ~(__mmask64(1) << c);
  return allowed;
}

// One query row's scores over a key block, in place: s -> p = exp(scale s - m') on the allowed
// keys, 0 elsewhere, with m' = max(m, the row's scaled max); updates the running max m and sum l
// and returns the factor e^(m - m') for the row's output so far (1 when nothing is allowed).
MDT_AVX512 float online_softmax_row(float* s_row, __mmask64 allowed, float scale, float& m, float& l) {
  const __m512 vscale = _mm512_set1_ps(scale), neg_inf = _mm512_set1_ps(kNegInf);
  __m512 vmax = neg_inf;
  for (int64_t c = 0; c < kBlock; c += 16) {
    const __mmask16 lanes = static_cast<__mmask16>(allowed >> c);
    const __m512 s = _mm512_mask_mul_ps(neg_inf, lanes, _mm512_loadu_ps(s_row + c), vscale);
    _mm512_storeu_ps(s_row + c, s);
    vmax = _mm512_max_ps(vmax, s);
  }
  const float block_max = _mm512_reduce_max_ps(vmax);
  if (block_max == kNegInf) {  // no key of this block may be attended
    for (int64_t c = 0; c < kBlock; c += 16) _mm512_storeu_ps(s_row + c, _mm512_setzero_ps());
    return 1.f;
  }
  const float new_max = std::max(m, block_max);
  const float rescale = m == kNegInf ? 0.f : std::exp(m - new_max);
  const __m512 vmax_new = _mm512_set1_ps(new_max);
  __m512 vsum = _mm512_setzero_ps();
  for (int64_t c = 0; c < kBlock; c += 16) {
    const __mmask16 lanes = static_cast<__mmask16>(allowed >> c);
    const __m512 p = _mm512_maskz_mov_ps(lanes, exp16(_mm512_sub_ps(_mm512_loadu_ps(s_row + c), vmax_new)));
    _mm512_storeu_ps(s_row + c, p);
    vsum = _mm512_add_ps(vsum, p);
  }
  l = l * rescale + _mm512_reduce_add_ps(vsum);
  m = new_max;
  return rescale;
}

// n floats (a multiple of 16) times a factor, in place
MDT_AVX512 void scale_row(float* row, int64_t n, float factor) {
  const __m512 f = _mm512_set1_ps(factor);
  for (int64_t c = 0; c < n; c += 16) _mm512_storeu_ps(row + c, _mm512_mul_ps(_mm512_loadu_ps(row + c), f));
}

}  // namespace

std::vector<at::Tensor> attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                          const c10::optional<at::Tensor>& mask, bool is_causal, double scale,
                                          const std::string& matmuls) {
  TORCH_CHECK(q.device().is_cpu() && q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16 &&
                  v.scalar_type() == at::kBFloat16 && q.size(-1) % kHeadDimStep == 0 && cpu_has_avx512_bf16(),
              "attention_forward: needs bf16 CPU tensors with a head dim that is a multiple of 32, on a CPU with "
              "AVX-512-BF16");
  const at::Tensor mask_bool = checked_inputs("attention_forward", q, k, v, mask);  // [B, Hq, S, S] or undefined
  const int64_t batch = q.size(0), heads = q.size(1), seq = q.size(2), dim = q.size(3);
  const int64_t kv_heads = k.size(1), groups = heads / kv_heads;
  const BlockMatmul matmul(BlockMatmul::uses_brgemm("attention_forward", matmuls));
  const bool has_mask = mask_bool.defined();
  auto last_contiguous = [](const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); };
  const at::Tensor qc = last_contiguous(q), kc = last_contiguous(k), vc = last_contiguous(v);
  const int64_t padded = (seq + kBlock - 1) / kBlock * kBlock;
  const float fscale = static_cast<float>(scale);
  const int64_t dcols = dim % kBlock == 0 ? kBlock : kHeadDimStep;  // head-dim columns per packed block of V

  // sequence-major memory ([B, S, H, ...]), as torch's CPU flash forward writes them
  auto out = at::empty({batch, seq, heads, dim}, q.options());
  auto lse = at::empty({batch, seq, heads}, q.options().dtype(at::kFloat));
  const BFloat16* q_data = qc.data_ptr<BFloat16>();
  const BFloat16* k_data = kc.data_ptr<BFloat16>();
  const BFloat16* v_data = vc.data_ptr<BFloat16>();
  const bool* mask_data = has_mask ? mask_bool.data_ptr<bool>() : nullptr;
  BFloat16* out_data = out.data_ptr<BFloat16>();
  float* lse_data = lse.data_ptr<float>();

  at::parallel_for(0, batch * kv_heads, 1, [&](int64_t begin, int64_t end) {
    // per-thread buffers
    std::vector<BFloat16> key(padded * dim), value(padded * dim), query(padded * dim);
    std::vector<BFloat16> key_t_packed(dim * padded), value_packed(padded * dim);
    std::vector<BFloat16> probs(kBlock * kBlock);  // [queries, keys] bf16: A of O += P V
    std::vector<float> scores(kBlock * kBlock), acc(kBlock * dim), row_max(kBlock), row_sum(kBlock);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / kv_heads, hk = task % kv_heads;
      copy_rows_padded(k_data + b * kc.stride(0) + hk * kc.stride(1), seq, dim, kc.stride(2), padded, key.data());
      copy_rows_padded(v_data + b * vc.stride(0) + hk * vc.stride(1), seq, dim, vc.stride(2), padded, value.data());
      for (int64_t c = 0; c < padded; c += kBlock)  // B of S = Q K^T: [D, L]
        pack_transposed_block(key.data() + c * dim, dim, key_t_packed.data() + c * dim);
      for (int64_t c = 0; c < dim; c += dcols)  // B of O += P V: [L, D]
        matmul.pack(value.data() + c, padded, dim, value_packed.data() + c * padded, dcols);
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t h = hk * groups + g;
        copy_rows_padded(q_data + b * qc.stride(0) + h * qc.stride(1), seq, dim, qc.stride(2), padded, query.data());
        const bool* mask_head = has_mask ? mask_data + b * mask_bool.stride(0) + h * mask_bool.stride(1) : nullptr;
        const int64_t mask_ld = has_mask ? mask_bool.stride(2) : 0;
        const int64_t mask_cd = has_mask ? mask_bool.stride(3) : 0;
        for (int64_t q0 = 0; q0 < seq; q0 += kBlock) {
          const int64_t rows = std::min(kBlock, seq - q0);
          const int64_t span = is_causal ? q0 + rows : seq;  // keys [0, span)
          std::fill(row_max.begin(), row_max.end(), kNegInf);
          std::fill(row_sum.begin(), row_sum.end(), 0.f);
          std::fill(acc.begin(), acc.end(), 0.f);
          for (int64_t k0 = 0; k0 < span; k0 += kBlock) {
            if (has_mask && !block_allowed(mask_head, mask_ld, mask_cd, q0, q0 + rows, k0, std::min(k0 + kBlock, seq)))
              continue;  // no query of this block may attend these keys (other documents)
            matmul.gemm(rows, dim, query.data() + q0 * dim, dim, key_t_packed.data() + k0 * dim, scores.data(),
                        kBlock, false);
            const bool whole = k0 + kBlock <= seq;
            for (int64_t r = 0; r < rows; ++r) {
              const int64_t qi = q0 + r;
              const int64_t keep = std::min(seq, is_causal ? qi + 1 : seq) - k0;  // keys k0 + [0, keep)
              const bool* mask_row = has_mask ? mask_head + qi * mask_ld + k0 * mask_cd : nullptr;
              float* s_row = scores.data() + r * kBlock;
              const float rescale =
                  online_softmax_row(s_row, allowed_keys(keep, mask_row, mask_cd, whole), fscale, row_max[r], row_sum[r]);
              if (rescale != 1.f) scale_row(acc.data() + r * dim, dim, rescale);
              to_bf16(s_row, probs.data() + r * kBlock);
            }
            for (int64_t c = 0; c < dim; c += dcols)
              matmul.gemm(rows, kBlock, probs.data(), kBlock, value_packed.data() + c * padded + k0 * dcols,
                          acc.data() + c, dim, true, dcols);
          }
          for (int64_t r = 0; r < rows; ++r) {
            const int64_t row = (b * seq + q0 + r) * heads + h;
            const bool attends = row_sum[r] > 0.f;
            scale_row(acc.data() + r * dim, dim, attends ? 1.f / row_sum[r] : 0.f);
            to_bf16(acc.data() + r * dim, out_data + row * dim, dim);
            lse_data[row] = attends ? row_max[r] + std::log(row_sum[r]) : kNegInf;
          }
        }
      }
    }
    matmul.release();
  });
  return {out.transpose(1, 2), lse.transpose(1, 2)};
}

#else  // not x86-64: no AVX-512; the caller keeps torch's own forward

std::vector<at::Tensor> attention_forward(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                          const c10::optional<at::Tensor>&, bool, double, const std::string&) {
  TORCH_CHECK(false, "attention_forward: needs an x86-64 CPU with AVX-512-BF16");
}

#endif

}  // namespace mdt
