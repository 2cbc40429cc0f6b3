// Per-pair DPO-family loss and its derivative, shared by the CPU and CUDA implementations.
// h = (pi_w - pi_l) - (ref_w - ref_l);  returns L(h) and writes dL/dh.
#pragma once
#include <math.h>

#ifdef __CUDACC__
#define MDT_HOST_DEVICE __host__ __device__
#else
#define MDT_HOST_DEVICE
#endif

// log sigma(x), stable for large |x|
MDT_HOST_DEVICE inline float mdt_log_sigmoid(float x) {
  return x >= 0.f ? -log1pf(expf(-x)) : x - log1pf(expf(x));
}

MDT_HOST_DEVICE inline float mdt_sigmoid(float x) {
  return x >= 0.f ? 1.f / (1.f + expf(-x)) : expf(x) / (1.f + expf(x));
}

MDT_HOST_DEVICE inline float mdt_dpo_pair_loss(float h, float beta, float label_smoothing, int loss_type,
                                               float* dloss_dh) {
  if (loss_type == 1) {  // ipo: (h - 1 / (2 beta))^2
    const float d = h - 0.5f / beta;
    *dloss_dh = 2.f * d;
    return d * d;
  }
  const float z = beta * h;
  if (loss_type == 2) {  // hinge: max(0, 1 - beta h)
    *dloss_dh = z < 1.f ? -beta : 0.f;
    return z < 1.f ? 1.f - z : 0.f;
  }
  if (loss_type == 3) {  // robust: (-(1 - eps) log sigma(z) + eps log sigma(-z)) / (1 - 2 eps)
    const float norm = 1.f - 2.f * label_smoothing;
    *dloss_dh = beta * (-(1.f - label_smoothing) * mdt_sigmoid(-z) - label_smoothing * mdt_sigmoid(z)) / norm;
    return (-(1.f - label_smoothing) * mdt_log_sigmoid(z) + label_smoothing * mdt_log_sigmoid(-z)) / norm;
  }
  // sigmoid: -(1 - eps) log sigma(z) - eps log sigma(-z)
  *dloss_dh = beta * (-(1.f - label_smoothing) * mdt_sigmoid(-z) + label_smoothing * mdt_sigmoid(z));
  return -(1.f - label_smoothing) * mdt_log_sigmoid(z) - label_smoothing * mdt_log_sigmoid(-z);
}
