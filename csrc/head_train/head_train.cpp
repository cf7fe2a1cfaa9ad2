// Validation and dispatch for head training.
#include "head_train/head_train.h"

#include "common/check.h"
#include "common/device.h"
#include "common/head_checks.h"

namespace pyft {

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
