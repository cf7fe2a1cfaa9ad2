// Element-wise optimizer steps shared by the head trainers (one head, or a grid of heads).
#pragma once

#include <cstdint>

namespace pyft {

/// torch.optim.SGD on p[0, n): weight decay as L2 on the gradient, optional momentum buffer `buf`
/// (null without momentum), dampening and Nesterov; `first_step` initialises the buffer.
void sgd_update(float* __restrict p, const float* __restrict g, float* __restrict buf, int64_t n,
                float lr, float wd, float momentum, float dampening, bool nesterov,
                bool first_step);

/// torch.optim.AdamW (single-tensor path) on p[0, n) with moments m, v; step_size = lr / bc1 and
/// bc2_sqrt = sqrt(1 - beta2^t) for bias correction.
void adamw_update(float* __restrict p, const float* __restrict g, float* __restrict m,
                  float* __restrict v, int64_t n, float lr, float wd, float one_minus_beta1,
                  float beta2, float one_minus_beta2, float eps, float step_size, float bc2_sqrt);

}  // namespace pyft
