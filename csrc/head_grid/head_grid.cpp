// Validation and dispatch for grid training of many linear heads.
#include "head_grid/head_grid.h"

#include <cmath>

#include "common/check.h"
#include "common/device.h"
#include "common/head_checks.h"

namespace pyft {

GridResult train_heads(const HeadSpec& spec, int64_t heads, float* params, const double* lrs,
                       const double* weight_decays, const Matrix& X, const int64_t* labels,
                       const RowSubset& subset, const ValidationSet& val, const LossSpec& loss,
                       const TrainOptions& opt, const GridEpochCallback& on_epoch,
                       const InterruptCheck& interrupted) {
  check_spec(spec);
  PYFT_CHECK(spec.kind == HeadKind::Linear, "train_heads trains linear heads only");
  PYFT_CHECK(heads >= 1, "params must hold at least 1 head (one row per head); got %lld",
             (long long)heads);
  PYFT_CHECK(params != nullptr, "params is missing");
  PYFT_CHECK(lrs != nullptr && weight_decays != nullptr, "lrs and weight_decays are required");
  for (int64_t h = 0; h < heads; ++h) {
    PYFT_CHECK(std::isfinite(lrs[h]) && lrs[h] > 0.0, "lrs must be positive numbers; got %g at index %lld",
               lrs[h], (long long)h);
    PYFT_CHECK(std::isfinite(weight_decays[h]) && weight_decays[h] >= 0.0,
               "weight_decays must be finite and >= 0; got %g at index %lld", weight_decays[h],
               (long long)h);
  }
  TrainOptions checked = opt;
  checked.lr = lrs[0];
  checked.weight_decay = weight_decays[0];
  check_options(checked);
  PYFT_CHECK(opt.dropout == 0.0f, "train_heads has no dropout (linear heads); got dropout=%g",
             (double)opt.dropout);
  PYFT_CHECK(opt.patience == 0, "train_heads has no early stopping; got patience=%lld",
             (long long)opt.patience);
  check_loss(loss, spec.classes);
  check_features(X, spec, "features", opt.n_threads);
  check_labels(labels, X.rows, spec.classes, "labels");
  if (subset.rows) check_rows(subset.rows, subset.count, X.rows, "train_rows");
  if (val.X) {
    check_features(*val.X, spec, "val_features", opt.n_threads);
    check_labels(val.labels, val.X->rows, spec.classes, "val_labels");
    PYFT_CHECK(val.rows == nullptr, "give either val_features/val_labels or val_rows, not both");
  } else if (val.rows) {
    check_rows(val.rows, val.count, X.rows, "val_rows");
  }
  check_class_weights_present(loss, labels, X.rows);
  if (X.device != kHost || (val.X && val.X->device != kHost)) {
    PYFT_CHECK(X.device != kHost,
               "val_features are on cuda:%d but features are in host memory; pass both on the "
               "same device", val.X->device);
    check_cuda_features(X, val.X, heads * spec.classes);
    PYFT_CHECK(heads <= 65535, "the CUDA grid trainer takes at most 65535 heads per call; got %lld",
               (long long)heads);
    return cuda::train_heads(spec, heads, params, lrs, weight_decays, X, labels, subset, val, loss,
                             opt, on_epoch, interrupted);
  }
  return cpu::train_heads(spec, heads, params, lrs, weight_decays, X, labels, subset, val, loss,
                          opt, on_epoch, interrupted);
}

#if !defined(PYFT_WITH_CUDA)
namespace cuda {
GridResult train_heads(const HeadSpec&, int64_t, float*, const double*, const double*,
                       const Matrix& X, const int64_t*, const RowSubset&, const ValidationSet&,
                       const LossSpec&, const TrainOptions&, const GridEpochCallback&,
                       const InterruptCheck&) {
  require_cuda_device(X.device, "train_heads");  // throws: built without CUDA
  return {};
}
}  // namespace cuda
#endif

}  // namespace pyft
