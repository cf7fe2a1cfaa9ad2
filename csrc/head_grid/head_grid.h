// Many linear heads trained together in one native call (a learning-rate / weight-decay grid).
//
// All heads see the same mini-batches (same seed, same order), so each batch is gathered and
// converted once and multiplied against the concatenated (H*C, D) weights of all heads in one
// GEMM; softmax cross-entropy, gradient and optimizer step are then per head, with each head's
// own learning rate and weight decay. Head h of a grid run follows the trajectory of a separate
// train_head run with lr = lrs[h] and weight_decay = weight_decays[h] (up to float32 summation
// order).
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "common/convert.h"
#include "common/head_math.h"
#include "common/train_loop.h"
#include "common/train_options.h"

namespace pyft {

/// Where validation rows come from: a separate matrix (X with labels, `count` = X->rows), or rows
/// of the training matrix (rows[0..count) of the training X, labels looked up in the training
/// labels) so that a k-fold split needs no copies. Empty (count == 0) means no validation.
struct ValidationSet {
  const Matrix* X = nullptr;
  const int64_t* labels = nullptr;
  const int64_t* rows = nullptr;
  int64_t count = 0;
};

/// Per-epoch statistics of every head (vectors of length H).
struct GridEpochStats {
  int64_t epoch = 0;  ///< 0-based
  std::vector<double> train_loss, train_accuracy, val_loss, val_accuracy;
  bool has_val = false;
  double lr_factor = 0.0;  ///< schedule multiplier of the epoch's last step (head h: lrs[h] times it)
  int64_t steps = 0;
  double seconds = 0.0;
};

struct GridResult : RunResult {};

/// Called after every epoch (params already hold that epoch's weights); return false to stop.
using GridEpochCallback = std::function<bool(const GridEpochStats&)>;

/// Validates all inputs (std::invalid_argument naming the argument), then trains `heads` linear
/// heads in place. params: heads x (C*D + C) floats, row h = head h's flat layout W (C x D) | b (C).
/// lrs / weight_decays: `heads` values each; opt.lr, opt.weight_decay, opt.kernel are ignored and
/// opt.dropout / opt.patience must be 0. labels: X.rows integers in [0, C).
GridResult train_heads(const HeadSpec& spec, int64_t heads, float* params, const double* lrs,
                       const double* weight_decays, const Matrix& X, const int64_t* labels,
                       const RowSubset& subset, const ValidationSet& val, const LossSpec& loss,
                       const TrainOptions& opt, const GridEpochCallback& on_epoch,
                       const InterruptCheck& interrupted);

namespace cuda {
/// Grid training on a CUDA device (X.device; val.X on the same device): per batch one gather,
/// one forward GEMM for all heads, a fused softmax cross-entropy + gradient kernel, one weight-
/// gradient GEMM and one fused optimizer kernel; bf16/fp16 features multiply in their own type
/// with float32 accumulation. params, lrs, labels and rows stay on the host; params are updated
/// in place after every epoch (before on_epoch).
GridResult train_heads(const HeadSpec& spec, int64_t heads, float* params, const double* lrs,
                       const double* weight_decays, const Matrix& X, const int64_t* labels,
                       const RowSubset& subset, const ValidationSet& val, const LossSpec& loss,
                       const TrainOptions& opt, const GridEpochCallback& on_epoch,
                       const InterruptCheck& interrupted);
}  // namespace cuda

namespace cpu {
GridResult train_heads(const HeadSpec& spec, int64_t heads, float* params, const double* lrs,
                       const double* weight_decays, const Matrix& X, const int64_t* labels,
                       const RowSubset& subset, const ValidationSet& val, const LossSpec& loss,
                       const TrainOptions& opt, const GridEpochCallback& on_epoch,
                       const InterruptCheck& interrupted);
}  // namespace cpu

}  // namespace pyft
