// Attention forward on the CPU for training (bf16; AMX brgemm or AVX-512-BF16); see attention_forward.cpp.
#pragma once
#include <ATen/ATen.h>

#include <string>
#include <vector>

namespace mdt {

// q [B, Hq, S, D], k, v [B, Hkv, S, D] (bf16, last dim contiguous), mask: optional bool [B or 1,
// Hq or 1, S, S] (true = may attend; combined with the causal rule when is_causal) ->
// out [B, Hq, S, D] bf16 and lse [B, Hq, S] fp32 (natural log of each row's softmax sum, -inf for
// a row that attends nothing), both with sequence-major memory ([B, S, H, ...]).
// matmuls: "auto" | "brgemm" | "avx512_bf16", as for attention_backward.
std::vector<at::Tensor> attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                          const c10::optional<at::Tensor>& mask, bool is_causal, double scale,
                                          const std::string& matmuls);

}  // namespace mdt
