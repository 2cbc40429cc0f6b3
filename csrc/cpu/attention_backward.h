// Attention backward on the CPU (bf16; AMX brgemm or AVX-512-BF16); see attention_backward.cpp.
#pragma once
#include <ATen/ATen.h>

#include <string>
#include <vector>

namespace mdt {

// Whether attention_backward can run q's dtype and head dim on this CPU.
bool attention_backward_supported(const at::Tensor& q);

// The matmuls attention_backward's "auto" runs on this CPU: "brgemm" (oneDNN packs bf16 for it:
// AMX), "avx512_bf16" (VDPBF16PS dot products), or "none" (no AVX-512-BF16: the kernel refuses).
std::string attention_backward_matmuls();

// grad_out, q, out [B, Hq, S, D], k, v [B, Hkv, S, D] (bf16, last dim contiguous), lse [B, Hq, S]
// fp32 (natural log, from the forward), mask: optional bool [B or 1, Hq or 1, S, S] (true = may
// attend; combined with the causal rule when is_causal) -> grad_q [B, Hq, S, D], grad_k, grad_v [B, Hkv, S, D].
// matmuls: "auto" (attention_backward_matmuls()), or "brgemm" / "avx512_bf16" to pick one (tests
// compare both where a CPU has both).
std::vector<at::Tensor> attention_backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                                           const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                           const c10::optional<at::Tensor>& mask, bool is_causal, double scale,
                                           const std::string& matmuls);

}  // namespace mdt
