#include "common/train_loop.h"

#include <limits>

namespace pyft {

EarlyStopping::EarlyStopping(const TrainOptions& opt, bool has_val, int64_t num_params)
    : enabled_(opt.patience > 0 && has_val), min_delta_(opt.min_delta), patience_(opt.patience),
      num_params_(num_params), best_val_(std::numeric_limits<double>::infinity()) {}

bool EarlyStopping::observe(int64_t epoch, double val_loss, const float* params) {
  if (!enabled_) return false;
  if (val_loss < best_val_ - min_delta_) {
    best_val_ = val_loss;
    best_params_.assign(params, params + num_params_);
    best_epoch_ = epoch;
    since_best_ = 0;
    return false;
  }
  return ++since_best_ >= patience_;
}

void EarlyStopping::restore(float* params) const {
  if (enabled_ && !best_params_.empty())
    std::copy(best_params_.begin(), best_params_.end(), params);
}

}  // namespace pyft
