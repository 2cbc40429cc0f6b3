// C-style entry points of the megatron-domain kernels. No ATen or torch header is included
// here or in the .cu/.cpp files that implement them, so every CUDA kernel compiles with a
// plain `nvcc -c` on a CPU-only machine; ops.cpp binds them to torch tensors.
//
// Conventions (match megatron_domain/kernels/pack.py and megatron_domain/losses.py):
//  pack metadata: a document ends with (and includes) its EOD token; document_ids[r, i] is the
//    number of EODs strictly before i in row r, position_ids[r, i] counts from the document's
//    first token; cu_seqlens lists every document start over the flattened [rows * seq] batch.
//  dpo: segment_ids[t] = 2p (chosen of pair p), 2p + 1 (rejected of pair p) or -1 (ignored);
//    loss_type 0 = sigmoid (label-smoothed), 1 = ipo, 2 = hinge.
#pragma once
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// ---- CPU (csrc/cpu) ----
void mdt_pack_metadata_cpu(const int64_t* tokens, int64_t rows, int64_t seq, int64_t eod_id,
                           int64_t* document_ids, int64_t* position_ids, int64_t* docs_per_row);
void mdt_pack_cu_seqlens_cpu(const int64_t* tokens, const int64_t* document_ids, const int64_t* row_offsets,
                             int64_t rows, int64_t seq, int64_t eod_id, int32_t* cu_seqlens);
void mdt_dpo_forward_cpu(const float* policy, const float* reference, const int64_t* segment_ids, int64_t tokens,
                         int64_t pairs, float beta, float label_smoothing, int loss_type, float* policy_sums,
                         float* reference_sums, float* losses, float* dloss_dh);
void mdt_dpo_backward_cpu(const float* grad_losses, const float* dloss_dh, const int64_t* segment_ids,
                          int64_t tokens, float* grad_policy);

// ---- CUDA (csrc/cuda); `stream` is a cudaStream_t passed as void* to keep this header CUDA-free.
// Each returns 0 or a cudaError_t code.
int mdt_pack_metadata_cuda(const int64_t* tokens, int64_t rows, int64_t seq, int64_t eod_id,
                           int64_t* document_ids, int64_t* position_ids, int64_t* docs_per_row, void* stream);
int mdt_pack_cu_seqlens_cuda(const int64_t* tokens, const int64_t* document_ids, const int64_t* row_offsets,
                             int64_t rows, int64_t seq, int64_t eod_id, int32_t* cu_seqlens, void* stream);
int mdt_dpo_forward_cuda(const float* policy, const float* reference, const int64_t* segment_ids, int64_t tokens,
                         int64_t pairs, float beta, float label_smoothing, int loss_type, float* policy_sums,
                         float* reference_sums, float* losses, float* dloss_dh, void* stream);
int mdt_dpo_backward_cuda(const float* grad_losses, const float* dloss_dh, const int64_t* segment_ids,
                          int64_t tokens, float* grad_policy, void* stream);

#ifdef __cplusplus
}
#endif
