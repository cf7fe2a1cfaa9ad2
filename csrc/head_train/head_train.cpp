// Validation and dispatch for head training.
#include "head_train/head_train.h"

#include <climits>
#include <cmath>
#include <cstdint>

#include "common/check.h"
#include "common/device.h"
#include "common/parallel.h"

namespace pyft {

void check_spec(const HeadSpec& spec) {
  PYFT_CHECK(spec.in_features >= 1, "features must have at least 1 column; got %lld",
             (long long)spec.in_features);
  PYFT_CHECK(spec.classes >= 2, "num_classes must be >= 2; got %lld", (long long)spec.classes);
  if (spec.kind == HeadKind::MLP)
    PYFT_CHECK(spec.hidden >= 1, "hidden_size must be >= 1 for the MLP head; got %lld",
               (long long)spec.hidden);
}

void check_features(const Matrix& X, const HeadSpec& spec, const char* name, int n_threads) {
  PYFT_CHECK(X.data != nullptr || X.rows == 0, "%s has no data", name);
  PYFT_CHECK(X.rows >= 1, "%s must have at least 1 row; got an empty array of shape (%lld, %lld)",
             name, (long long)X.rows, (long long)X.cols);
  PYFT_CHECK(X.cols == spec.in_features, "%s must have %lld columns (in_features); got %lld",
             name, (long long)spec.in_features, (long long)X.cols);
  // Finiteness is checked lazily (verify_finite) when a kernel sees non-finite pre-activations,
  // so valid data is read once per epoch and never by an extra validation pass.
}

void verify_finite(const Matrix& X, const char* name, int n_threads) {
  int64_t bad_row = -1, bad_col = -1;
  PYFT_CHECK(all_finite(X, resolve_threads(n_threads), &bad_row, &bad_col),
             "%s must be finite; found NaN or infinity at row %lld, column %lld", name,
             (long long)bad_row, (long long)bad_col);
}

void check_labels(const int64_t* labels, int64_t n, int64_t classes, const char* name) {
  PYFT_CHECK(labels != nullptr, "%s is missing", name);
  for (int64_t i = 0; i < n; ++i)
    PYFT_CHECK(labels[i] >= 0 && labels[i] < classes, "%s must be in [0, %lld); got %lld at index %lld",
               name, (long long)classes, (long long)labels[i], (long long)i);
}

void check_loss(const LossSpec& loss, int64_t classes) {
  PYFT_CHECK(loss.label_smoothing >= 0.0f && loss.label_smoothing < 1.0f,
             "label_smoothing must be in [0, 1); got %g", (double)loss.label_smoothing);
  if (loss.class_weights) {
    double total = 0.0;
    for (int64_t c = 0; c < classes; ++c) {
      const float w = loss.class_weights[c];
      PYFT_CHECK(std::isfinite(w) && w >= 0.0f,
                 "class_weights must be finite and >= 0; got %g for class %lld", (double)w,
                 (long long)c);
      total += w;
    }
    PYFT_CHECK(total > 0.0, "class_weights must not all be zero");
  }
}

void check_class_weights_present(const LossSpec& loss, const int64_t* labels, int64_t n) {
  if (!loss.class_weights) return;
  // Every mini-batch needs a positive normaliser sum_i w_{y_i}.
  for (int64_t i = 0; i < n; ++i)
    PYFT_CHECK(loss.class_weights[labels[i]] > 0.0f,
               "class_weights must be > 0 for every class present in labels; class %lld has "
               "weight 0",
               (long long)labels[i]);
}

void check_rows(const int64_t* rows, int64_t count, int64_t n, const char* name) {
  PYFT_CHECK(count >= 1, "%s must select at least 1 row; got %lld", name, (long long)count);
  for (int64_t i = 0; i < count; ++i)
    PYFT_CHECK(rows[i] >= 0 && rows[i] < n, "%s must be in [0, %lld); got %lld at index %lld",
               name, (long long)n, (long long)rows[i], (long long)i);
}

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

void check_cuda_features(const Matrix& X, const Matrix* val_X, int64_t out_rows) {
  require_cuda_device(X.device, "training on CUDA features");
  auto one = [&](const Matrix& M, const char* name) {
    PYFT_CHECK(M.device == X.device,
               "%s must be on the device of features (cuda:%d); got %s%d", name, X.device,
               M.device == kHost ? "host memory, device " : "cuda:", M.device);
    const int64_t item = dtype_size(M.dtype);
    PYFT_CHECK(M.contiguous_rows(),
               "%s on a CUDA device must have contiguous rows (column stride %lld bytes); got a "
               "column stride of %lld bytes: pass %s.contiguous()",
               name, (long long)item, (long long)M.col_stride, name);
    PYFT_CHECK(M.row_stride % item == 0 && reinterpret_cast<uintptr_t>(M.data) % item == 0,
               "%s on a CUDA device must be aligned to its %lld-byte elements", name,
               (long long)item);
  };
  one(X, "features");
  if (val_X) {
    one(*val_X, "val_features");
    PYFT_CHECK(val_X->dtype == X.dtype,
               "val_features must have the dtype of features (%s) on a CUDA device; got %s",
               dtype_name(X.dtype), dtype_name(val_X->dtype));
  }
  PYFT_CHECK(X.cols <= INT_MAX && out_rows <= INT_MAX,
             "features with %lld columns and %lld output rows exceed cuBLAS's 32-bit sizes",
             (long long)X.cols, (long long)out_rows);
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

TrainResult train_head(const HeadSpec& spec, float* params, const Matrix& X,
                       const int64_t* labels, const RowSubset& subset, const Matrix* val_X,
                       const int64_t* val_labels, const LossSpec& loss, const TrainOptions& opt,
                       const EpochCallback& on_epoch, const InterruptCheck& interrupted) {
  check_spec(spec);
  check_options(opt);
  check_loss(loss, spec.classes);
  PYFT_CHECK(params != nullptr, "params is missing");
  check_features(X, spec, "features", opt.n_threads);
  check_labels(labels, X.rows, spec.classes, "labels");
  if (subset.rows) check_rows(subset.rows, subset.count, X.rows, "train_rows");
  if (val_X) {
    check_features(*val_X, spec, "val_features", opt.n_threads);
    check_labels(val_labels, val_X->rows, spec.classes, "val_labels");
  }
  PYFT_CHECK(opt.patience == 0 || val_X != nullptr,
             "patience=%lld (early stopping) needs a validation set (val_features, val_labels)",
             (long long)opt.patience);
  check_class_weights_present(loss, labels, X.rows);
  if (X.device != kHost || (val_X && val_X->device != kHost)) {
    PYFT_CHECK(X.device != kHost,
               "val_features are on cuda:%d but features are in host memory; pass both on the "
               "same device", val_X->device);
    check_cuda_features(X, val_X, spec.classes);
    PYFT_CHECK(spec.kind == HeadKind::Linear,
               "head='mlp' has no CUDA kernel yet (the CUDA trainer covers the linear head); pass "
               "host (NumPy/CPU) features to train an MLP head");
    return cuda::train_head(spec, params, X, labels, subset, val_X, val_labels, loss, opt,
                            on_epoch, interrupted);
  }
  return cpu::train_head(spec, params, X, labels, subset, val_X, val_labels, loss, opt, on_epoch,
                         interrupted);
}

#if !defined(PYFT_WITH_CUDA)
namespace cuda {
TrainResult train_head(const HeadSpec&, float*, const Matrix& X, const int64_t*, const RowSubset&,
                       const Matrix*, const int64_t*, const LossSpec&, const TrainOptions&,
                       const EpochCallback&, const InterruptCheck&) {
  require_cuda_device(X.device, "train_head");  // throws: built without CUDA
  return {};
}
}  // namespace cuda
#endif

}  // namespace pyft
