// Mini-batch training of a classification head in one native call.
//
// The whole run (seeded shuffle, gather and dtype conversion per batch, forward, softmax
// cross-entropy, backward, SGD/AdamW step, learning-rate schedule, validation and early stopping)
// happens here; Python only sees one call and a per-epoch callback.
#pragma once

#include <cstdint>
#include <functional>

#include "common/convert.h"
#include "common/head_math.h"
#include "common/train_loop.h"
#include "common/train_options.h"

namespace pyft {

struct EpochStats {
  int64_t epoch = 0;  ///< 0-based
  double train_loss = 0.0, train_accuracy = 0.0;
  double val_loss = 0.0, val_accuracy = 0.0;
  bool has_val = false;
  double lr = 0.0;  ///< learning rate of the epoch's last step
  int64_t steps = 0;
  double seconds = 0.0;
};

struct TrainResult : RunResult {
  int64_t best_epoch = -1;  ///< with early stopping: epoch whose weights were restored
  bool stopped_early = false;
};

/// Called after every epoch; return false to stop training.
using EpochCallback = std::function<bool(const EpochStats&)>;

/// Validates all inputs (std::invalid_argument on error), then trains `params` in place.
/// labels: X.rows integers in [0, C); val_X / val_labels may be null.
TrainResult train_head(const HeadSpec& spec, float* params, const Matrix& X,
                       const int64_t* labels, const RowSubset& subset, const Matrix* val_X,
                       const int64_t* val_labels, const LossSpec& loss, const TrainOptions& opt,
                       const EpochCallback& on_epoch, const InterruptCheck& interrupted);

namespace cuda {
/// Linear head on a CUDA device (X.device): same loop and results as cpu::train_head up to
/// float32 summation order; params stay on the host and are updated after every epoch.
TrainResult train_head(const HeadSpec& spec, float* params, const Matrix& X,
                       const int64_t* labels, const RowSubset& subset, const Matrix* val_X,
                       const int64_t* val_labels, const LossSpec& loss, const TrainOptions& opt,
                       const EpochCallback& on_epoch, const InterruptCheck& interrupted);
}  // namespace cuda

namespace cpu {
TrainResult train_head(const HeadSpec& spec, float* params, const Matrix& X,
                       const int64_t* labels, const RowSubset& subset, const Matrix* val_X,
                       const int64_t* val_labels,
                       const LossSpec& loss, const TrainOptions& opt,
                       const EpochCallback& on_epoch, const InterruptCheck& interrupted);
}  // namespace cpu

}  // namespace pyft
