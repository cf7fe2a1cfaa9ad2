#include "common/train_options.h"

#include <algorithm>
#include <cmath>

#include "common/check.h"

namespace pyft {

void check_options(const TrainOptions& opt) {
  PYFT_CHECK(std::isfinite(opt.lr) && opt.lr > 0.0, "lr must be a positive number; got %g", opt.lr);
  PYFT_CHECK(opt.epochs >= 1, "epochs must be >= 1; got %lld", (long long)opt.epochs);
  PYFT_CHECK(opt.batch_size >= 1, "batch_size must be >= 1; got %lld", (long long)opt.batch_size);
  PYFT_CHECK(std::isfinite(opt.weight_decay) && opt.weight_decay >= 0.0,
             "weight_decay must be >= 0; got %g", opt.weight_decay);
  PYFT_CHECK(opt.momentum >= 0.0 && opt.momentum < 1.0, "momentum must be in [0, 1); got %g",
             opt.momentum);
  PYFT_CHECK(opt.dampening >= 0.0 && opt.dampening <= 1.0, "dampening must be in [0, 1]; got %g",
             opt.dampening);
  PYFT_CHECK(!opt.nesterov || (opt.momentum > 0.0 && opt.dampening == 0.0),
             "nesterov=True needs momentum > 0 and dampening == 0; got momentum=%g, dampening=%g",
             opt.momentum, opt.dampening);
  PYFT_CHECK(opt.beta1 >= 0.0 && opt.beta1 < 1.0, "beta1 must be in [0, 1); got %g", opt.beta1);
  PYFT_CHECK(opt.beta2 >= 0.0 && opt.beta2 < 1.0, "beta2 must be in [0, 1); got %g", opt.beta2);
  PYFT_CHECK(opt.eps > 0.0, "eps must be > 0; got %g", opt.eps);
  PYFT_CHECK(opt.warmup_steps >= 0, "warmup_steps must be >= 0; got %lld",
             (long long)opt.warmup_steps);
  PYFT_CHECK(opt.min_lr_ratio >= 0.0 && opt.min_lr_ratio <= 1.0,
             "min_lr_ratio must be in [0, 1]; got %g", opt.min_lr_ratio);
  PYFT_CHECK(opt.step_size >= 1, "step_size must be >= 1; got %lld", (long long)opt.step_size);
  PYFT_CHECK(opt.gamma > 0.0, "gamma must be > 0; got %g", opt.gamma);
  PYFT_CHECK(opt.dropout >= 0.0f && opt.dropout < 1.0f, "dropout must be in [0, 1); got %g",
             (double)opt.dropout);
  PYFT_CHECK(opt.patience >= 0, "patience must be >= 0; got %lld", (long long)opt.patience);
  PYFT_CHECK(opt.min_delta >= 0.0, "min_delta must be >= 0; got %g", opt.min_delta);
}

double lr_factor(const TrainOptions& opt, int64_t step, int64_t total, int64_t steps_per_epoch) {
  double f = 1.0;
  const int64_t w = opt.warmup_steps;
  switch (opt.schedule) {
    case ScheduleKind::Constant: break;
    case ScheduleKind::Cosine: {
      if (step >= w) {
        const double span = static_cast<double>(std::max<int64_t>(1, total - w));
        const double progress = std::min(1.0, static_cast<double>(step - w) / span);
        f = opt.min_lr_ratio + (1.0 - opt.min_lr_ratio) * 0.5 * (1.0 + std::cos(M_PI * progress));
      }
      break;
    }
    case ScheduleKind::Step: {
      const int64_t epoch = step / std::max<int64_t>(1, steps_per_epoch);
      f = std::pow(opt.gamma, static_cast<double>(epoch / opt.step_size));
      break;
    }
  }
  if (step < w) f *= static_cast<double>(step + 1) / static_cast<double>(w);
  return f;
}

}  // namespace pyft
