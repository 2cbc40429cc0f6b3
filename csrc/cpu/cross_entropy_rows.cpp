// Per-row softmax statistics and cross-entropy gradients of a logits slice on the CPU, for the
// chunked `linear_logprobs` (megatron_domain/kernels/linear_logprobs.py, CppSliceMath).
//
// Why our own: the same work in torch ops (logsumexp, then sub_ / exp_ / mul_ / an indexed add,
// and fp32 <-> bf16 copies around a bf16 matmul) walks each [rows, V] slice 6-8 times and took
// ~45 ms of an 85 ms fused cross-entropy (forward + backward) in a bf16 step at bench-20m; here
// each row is read once from memory and worked on while it is in cache, in the logits' own
// dtype (bf16 logits are read and the gradient written as bf16, rounded once from fp32).
#include "cross_entropy_rows.h"

#include "avx512_math.h"

#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <cmath>
#include <cstring>
#include <limits>

namespace mdt {

#if defined(__x86_64__)
namespace {

// one stored value as fp32 (bf16: its 16 bits are the high half of the fp32 pattern)
inline float as_float(float v) { return v; }
inline float as_float(uint16_t v) {
  const uint32_t bits = static_cast<uint32_t>(v) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

struct RowStats {
  float max, sum_exp, sum_exp_z;
};

// max, sum exp(z - max) and sum exp(z - max) * z of one row of n values
template <typename T>
MDT_AVX512 RowStats row_stats(const T* z, int64_t n) {
  __m512 vmax = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t c = 0; c < n; c += 16) {
    const __mmask16 lanes = lanes_from(c, n);
    vmax = _mm512_mask_max_ps(vmax, lanes, vmax, load16(z + c, lanes));
  }
  const float m = _mm512_reduce_max_ps(vmax);
  const __m512 vm = _mm512_set1_ps(m);
  __m512 vsum = _mm512_setzero_ps(), vsum_z = _mm512_setzero_ps();
  for (int64_t c = 0; c < n; c += 16) {
    const __mmask16 lanes = lanes_from(c, n);
    const __m512 x = load16(z + c, lanes);
    const __m512 e = _mm512_maskz_mov_ps(lanes, exp16(_mm512_sub_ps(x, vm)));
    vsum = _mm512_add_ps(vsum, e);
    vsum_z = _mm512_fmadd_ps(e, x, vsum_z);
  }
  return {m, _mm512_reduce_add_ps(vsum), _mm512_reduce_add_ps(vsum_z)};
}

// one row in place: z -> g (onehot(target) - exp(z - lse)); target outside [0, n): no onehot
template <typename T>
MDT_AVX512 void row_gradient(T* z, int64_t n, float lse, float g, int64_t target) {
  const bool owned = target >= 0 && target < n;
  const float target_logit = owned ? as_float(z[target]) : 0.f;
  const __m512 vlse = _mm512_set1_ps(lse), vneg_g = _mm512_set1_ps(-g);
  for (int64_t c = 0; c < n; c += 16) {
    const __mmask16 lanes = lanes_from(c, n);
    store16(z + c, _mm512_mul_ps(exp16(_mm512_sub_ps(load16(z + c, lanes), vlse)), vneg_g), lanes);
  }
  if (owned) {  // (-g p) + g in fp32, rounded once, as the torch path computes it
    const __m512 p = exp16(_mm512_set1_ps(target_logit - lse));
    store16(z + target, _mm512_add_ps(_mm512_mul_ps(p, vneg_g), _mm512_set1_ps(g)), 1);
  }
}

// d[i] += s[i] for n values, s bf16
MDT_AVX512 void add_bf16(float* d, const uint16_t* s, int64_t n) {
  for (int64_t c = 0; c < n; c += 16) {
    const __mmask16 lanes = lanes_from(c, n);
    store16(d + c, _mm512_add_ps(load16(d + c, lanes), load16(s + c, lanes)), lanes);
  }
}

template <typename T>
void stats_rows(T* logits, int64_t rows, int64_t vocab, int64_t ld, const int64_t* targets, const float* weights,
                float* stats) {
  at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      T* z = logits + r * ld;
      const RowStats s = row_stats(z, vocab);
      const int64_t t = targets[r];
      const bool owned = t >= 0 && t < vocab;
      stats[r] = s.max;
      stats[rows + r] = s.sum_exp;
      stats[2 * rows + r] = owned ? as_float(z[t]) : 0.f;
      stats[3 * rows + r] = s.sum_exp_z;
      if (weights != nullptr) row_gradient(z, vocab, s.max + std::log(s.sum_exp), weights[r], t);
    }
  });
}

template <typename T>
void gradient_rows(T* logits, int64_t rows, int64_t vocab, int64_t ld, const int64_t* targets, const float* lse,
                   const float* grad_logp) {
  at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) row_gradient(logits + r * ld, vocab, lse[r], grad_logp[r], targets[r]);
  });
}

void check_rows(const at::Tensor& logits, const at::Tensor& targets, const char* op) {
  TORCH_CHECK(cross_entropy_rows_supported(), op, ": needs an x86-64 CPU with AVX-512 (F, BW, VL, DQ) and AVX-512-BF16");
  TORCH_CHECK(logits.device().is_cpu() && logits.dim() == 2 && logits.stride(1) == 1, op,
              ": logits must be a CPU [n, V] tensor with contiguous rows");
  TORCH_CHECK(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kBFloat16, op,
              ": logits must be fp32 or bf16, got ", logits.scalar_type());
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == logits.size(0) && targets.scalar_type() == at::kLong, op,
              ": targets must be int64 [n] with n = ", logits.size(0));
}

at::Tensor row_vector(const at::Tensor& v, int64_t n, const char* op, const char* name) {
  TORCH_CHECK(v.dim() == 1 && v.size(0) == n, op, ": ", name, " must be [n] with n = ", n);
  return v.to(at::kFloat).contiguous();
}

}  // namespace

// The row kernels are plain AVX-512 code (no brgemm), so ask the CPU rather than oneDNN: oneDNN's
// bf16 packing for brgemm, the earlier test, said no on an AMD EPYC with AVX-512-BF16 but no AMX
// (measured), where these kernels run.
bool cross_entropy_rows_supported() { return cpu_has_avx512_bf16(); }

at::Tensor cross_entropy_rows(at::Tensor logits, const at::Tensor& targets, const c10::optional<at::Tensor>& grad_weights) {
  check_rows(logits, targets, "cross_entropy_rows");
  const int64_t rows = logits.size(0), vocab = logits.size(1), ld = logits.stride(0);
  auto t = targets.contiguous();
  auto stats = at::empty({4, rows}, logits.options().dtype(at::kFloat));
  at::Tensor w;
  if (grad_weights.has_value()) w = row_vector(*grad_weights, rows, "cross_entropy_rows", "grad_weights");
  const float* wp = w.defined() ? w.data_ptr<float>() : nullptr;
  if (logits.scalar_type() == at::kFloat) {
    stats_rows(logits.data_ptr<float>(), rows, vocab, ld, t.data_ptr<int64_t>(), wp, stats.data_ptr<float>());
  } else {
    stats_rows(reinterpret_cast<uint16_t*>(logits.data_ptr<at::BFloat16>()), rows, vocab, ld, t.data_ptr<int64_t>(),
               wp, stats.data_ptr<float>());
  }
  return stats;
}

void cross_entropy_rows_gradient_(at::Tensor logits, const at::Tensor& lse, const at::Tensor& targets,
                                  const at::Tensor& grad_logp) {
  check_rows(logits, targets, "cross_entropy_rows_gradient_");
  const int64_t rows = logits.size(0), vocab = logits.size(1), ld = logits.stride(0);
  auto t = targets.contiguous();
  auto l = row_vector(lse, rows, "cross_entropy_rows_gradient_", "lse");
  auto g = row_vector(grad_logp, rows, "cross_entropy_rows_gradient_", "grad_logp");
  if (logits.scalar_type() == at::kFloat) {
    gradient_rows(logits.data_ptr<float>(), rows, vocab, ld, t.data_ptr<int64_t>(), l.data_ptr<float>(),
                  g.data_ptr<float>());
  } else {
    gradient_rows(reinterpret_cast<uint16_t*>(logits.data_ptr<at::BFloat16>()), rows, vocab, ld,
                  t.data_ptr<int64_t>(), l.data_ptr<float>(), g.data_ptr<float>());
  }
}

void accumulate_bf16_(at::Tensor dst, const at::Tensor& src) {
  TORCH_CHECK(cross_entropy_rows_supported(), "accumulate_bf16_: needs an x86-64 CPU with AVX-512 (F, BW, VL, DQ) and AVX-512-BF16");
  TORCH_CHECK(dst.scalar_type() == at::kFloat && src.scalar_type() == at::kBFloat16 && dst.sizes() == src.sizes() &&
                  dst.is_contiguous() && src.is_contiguous() && dst.device().is_cpu() && src.device().is_cpu(),
              "accumulate_bf16_: dst must be fp32 and src bf16, contiguous CPU tensors of one shape");
  float* d = dst.data_ptr<float>();
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src.data_ptr<at::BFloat16>());
  at::parallel_for(0, dst.numel(), 1 << 16, [&](int64_t begin, int64_t end) { add_bf16(d + begin, s + begin, end - begin); });
}

#else  // not x86-64: the caller keeps the torch slice math

bool cross_entropy_rows_supported() { return false; }

at::Tensor cross_entropy_rows(at::Tensor, const at::Tensor&, const c10::optional<at::Tensor>&) {
  TORCH_CHECK(false, "cross_entropy_rows: needs an x86-64 CPU with AVX-512 (F, BW, VL, DQ) and AVX-512-BF16");
}

void cross_entropy_rows_gradient_(at::Tensor, const at::Tensor&, const at::Tensor&, const at::Tensor&) {
  TORCH_CHECK(false, "cross_entropy_rows_gradient_: needs an x86-64 CPU with AVX-512 (F, BW, VL, DQ) and AVX-512-BF16");
}

void accumulate_bf16_(at::Tensor, const at::Tensor&) {
  TORCH_CHECK(false, "accumulate_bf16_: needs an x86-64 CPU with AVX-512 (F, BW, VL, DQ) and AVX-512-BF16");
}

#endif

}  // namespace mdt
