// Attention backward on the CPU (bf16, brgemm); see attention_backward.cpp.
#pragma once
#include <ATen/ATen.h>

#include <vector>

namespace mdt {

// Whether attention_backward can run q's dtype and head dim on this CPU.
bool attention_backward_supported(const at::Tensor& q);

// grad_out, q, out [B, Hq, S, D], k, v [B, Hkv, S, D] (bf16, last dim contiguous), lse [B, Hq, S]
// fp32 (natural log, from the forward), mask: optional bool [B or 1, Hq or 1, S, S] (true = may
// attend; combined with the causal rule when is_causal) -> grad_q [B, Hq, S, D], grad_k, grad_v [B, Hkv, S, D]
std::vector<at::Tensor> attention_backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                                           const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                           const c10::optional<at::Tensor>& mask, bool is_causal, double scale);

}  // namespace mdt
