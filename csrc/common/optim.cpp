#include "common/optim.h"

#include <cmath>

#include "common/simd.h"

namespace pyft {

PYFT_MULTIVERSION
void sgd_update(float* __restrict p, const float* __restrict g, float* __restrict buf, int64_t n,
                float lr, float wd, float momentum, float dampening, bool nesterov,
                bool first_step) {
  for (int64_t i = 0; i < n; ++i) {
    float d = g[i];
    if (wd != 0.0f) d += wd * p[i];
    if (momentum != 0.0f) {
      const float b = first_step ? d : momentum * buf[i] + (1.0f - dampening) * d;
      buf[i] = b;
      d = nesterov ? d + momentum * b : b;
    }
    p[i] -= lr * d;
  }
}

PYFT_MULTIVERSION
void adamw_update(float* __restrict p, const float* __restrict g, float* __restrict m,
                  float* __restrict v, int64_t n, float lr, float wd, float one_minus_beta1,
                  float beta2, float one_minus_beta2, float eps, float step_size,
                  float bc2_sqrt) {
  const float decay = 1.0f - lr * wd;
  for (int64_t i = 0; i < n; ++i) {
    // Same operation order as torch.optim.AdamW (single-tensor path); 1 - beta is formed in
    // double and then rounded, as torch does, not from the float-rounded beta.
    if (wd != 0.0f) p[i] *= decay;
    m[i] += one_minus_beta1 * (g[i] - m[i]);
    v[i] = v[i] * beta2 + one_minus_beta2 * g[i] * g[i];
    const float denom = std::sqrt(v[i]) / bc2_sqrt + eps;
    p[i] += -step_size * (m[i] / denom);
  }
}

}  // namespace pyft
