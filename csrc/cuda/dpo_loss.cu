// DPO-family loss on the GPU (plain CUDA, no ATen): segment sums of token log-probs with
// float atomics into per-sequence sums, one thread per pair for the loss and dL/dh, and one
// thread per token for the backward (see kernels.h for the conventions).
#include <cuda_runtime.h>

#include "../dpo_math.h"
#include "../kernels.h"

namespace {

constexpr int kThreads = 256;

__global__ void segment_sums_kernel(const float* __restrict__ policy, const float* __restrict__ reference,
                                    const int64_t* __restrict__ segment_ids, int64_t tokens, int64_t segments,
                                    float* __restrict__ policy_sums, float* __restrict__ reference_sums) {
  const int64_t t = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (t >= tokens) return;
  const int64_t s = segment_ids[t];
  if (s < 0 || s >= segments) return;
  atomicAdd(&policy_sums[s], policy[t]);
  atomicAdd(&reference_sums[s], reference[t]);
}

__global__ void pair_loss_kernel(const float* __restrict__ policy_sums, const float* __restrict__ reference_sums,
                                 int64_t pairs, float beta, float label_smoothing, int loss_type,
                                 float* __restrict__ losses, float* __restrict__ dloss_dh) {
  const int64_t p = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (p >= pairs) return;
  const float h = (policy_sums[2 * p] - policy_sums[2 * p + 1]) - (reference_sums[2 * p] - reference_sums[2 * p + 1]);
  losses[p] = mdt_dpo_pair_loss(h, beta, label_smoothing, loss_type, &dloss_dh[p]);
}

__global__ void backward_kernel(const float* __restrict__ grad_losses, const float* __restrict__ dloss_dh,
                                const int64_t* __restrict__ segment_ids, int64_t tokens,
                                float* __restrict__ grad_policy) {
  const int64_t t = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (t >= tokens) return;
  const int64_t s = segment_ids[t];
  if (s < 0) {
    grad_policy[t] = 0.f;
    return;
  }
  const int64_t p = s / 2;
  grad_policy[t] = ((s % 2 == 0) ? 1.f : -1.f) * grad_losses[p] * dloss_dh[p];
}

unsigned blocks_for(int64_t n) { return (unsigned)((n + kThreads - 1) / kThreads); }

}  // namespace

extern "C" int mdt_dpo_forward_cuda(const float* policy, const float* reference, const int64_t* segment_ids,
                                    int64_t tokens, int64_t pairs, float beta, float label_smoothing, int loss_type,
                                    float* policy_sums, float* reference_sums, float* losses, float* dloss_dh,
                                    void* stream) {
  cudaStream_t s = (cudaStream_t)stream;
  cudaMemsetAsync(policy_sums, 0, sizeof(float) * 2 * pairs, s);
  cudaMemsetAsync(reference_sums, 0, sizeof(float) * 2 * pairs, s);
  if (tokens > 0)
    segment_sums_kernel<<<blocks_for(tokens), kThreads, 0, s>>>(policy, reference, segment_ids, tokens, 2 * pairs,
                                                                policy_sums, reference_sums);
  if (pairs > 0)
    pair_loss_kernel<<<blocks_for(pairs), kThreads, 0, s>>>(policy_sums, reference_sums, pairs, beta,
                                                            label_smoothing, loss_type, losses, dloss_dh);
  return (int)cudaGetLastError();
}

extern "C" int mdt_dpo_backward_cuda(const float* grad_losses, const float* dloss_dh, const int64_t* segment_ids,
                                     int64_t tokens, float* grad_policy, void* stream) {
  if (tokens > 0)
    backward_kernel<<<blocks_for(tokens), kThreads, 0, (cudaStream_t)stream>>>(grad_losses, dloss_dh, segment_ids,
                                                                               tokens, grad_policy);
  return (int)cudaGetLastError();
}
