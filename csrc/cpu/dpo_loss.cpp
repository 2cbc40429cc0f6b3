// DPO-family loss on the CPU: per-sequence sums of token log-probs, per-pair loss, and the
// backward to the policy's token log-probs (see kernels.h for the conventions).
#include <string.h>

#include "../dpo_math.h"
#include "../kernels.h"

extern "C" void mdt_dpo_forward_cpu(const float* policy, const float* reference, const int64_t* segment_ids,
                                    int64_t tokens, int64_t pairs, float beta, float label_smoothing, int loss_type,
                                    float* policy_sums, float* reference_sums, float* losses, float* dloss_dh) {
  // sums in double, rounded once: the reference sums in fp32 with a different order, so the
  // two agree to fp32 rounding of the sum rather than bit for bit
  double* sums = new double[4 * pairs]();
  for (int64_t t = 0; t < tokens; ++t) {
    const int64_t s = segment_ids[t];
    if (s < 0 || s >= 2 * pairs) continue;
    sums[s] += policy[t];
    sums[2 * pairs + s] += reference[t];
  }
  for (int64_t s = 0; s < 2 * pairs; ++s) {
    policy_sums[s] = (float)sums[s];
    reference_sums[s] = (float)sums[2 * pairs + s];
  }
  delete[] sums;
  for (int64_t p = 0; p < pairs; ++p) {
    const float h = (policy_sums[2 * p] - policy_sums[2 * p + 1]) - (reference_sums[2 * p] - reference_sums[2 * p + 1]);
    losses[p] = mdt_dpo_pair_loss(h, beta, label_smoothing, loss_type, &dloss_dh[p]);
  }
}

extern "C" void mdt_dpo_backward_cpu(const float* grad_losses, const float* dloss_dh, const int64_t* segment_ids,
                                     int64_t tokens, float* grad_policy) {
  for (int64_t t = 0; t < tokens; ++t) {
    const int64_t s = segment_ids[t];
    if (s < 0) {
      grad_policy[t] = 0.f;
      continue;
    }
    const int64_t p = s / 2;
    const float sign = (s % 2 == 0) ? 1.f : -1.f;  // d h / d pi_w = +1, d h / d pi_l = -1
    grad_policy[t] = sign * grad_losses[p] * dloss_dh[p];
  }
}
