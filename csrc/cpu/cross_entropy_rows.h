// Per-row softmax statistics and cross-entropy gradients of a logits slice on the CPU; see
// cross_entropy_rows.cpp.
#pragma once
#include <ATen/ATen.h>

namespace mdt {

// Whether this CPU runs the kernels below (AVX-512 with BF16, as oneDNN's bf16 brgemm needs).
bool cross_entropy_rows_supported();

// logits [n, V] fp32 or bf16 (rows contiguous), targets [n] int64 (a value outside [0, V): the
// target is not among these columns) -> stats [4, n] fp32: per row max m, sum exp(z - m), the
// target's logit (0 when not among them), sum exp(z - m) * z. With grad_weights [n] fp32, the
// rows are then overwritten with d(sum_r w_r log p_r)/dz = w (onehot(target) - softmax(z)), the
// softmax taken over these V columns (the whole vocabulary).
at::Tensor cross_entropy_rows(at::Tensor logits, const at::Tensor& targets, const c10::optional<at::Tensor>& grad_weights);

// In place: logits [n, V] (fp32 or bf16) -> grad_logp (onehot(target) - exp(z - lse)), with
// lse [n], grad_logp [n] fp32 and targets as above.
void cross_entropy_rows_gradient_(at::Tensor logits, const at::Tensor& lse, const at::Tensor& targets,
                                  const at::Tensor& grad_logp);

// dst (fp32) += src (bf16, same shape, both contiguous), converted in registers: torch's
// type-promoting add_ first copies src to a fresh fp32 tensor (an [V, H] one per logits slice
// for the output weight's gradient, page-faulted anew each time on a CPU).
void accumulate_bf16_(at::Tensor dst, const at::Tensor& src);

}  // namespace mdt
