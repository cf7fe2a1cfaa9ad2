// Mini-batch training of a classification head in one native call.
//
// The whole run (seeded shuffle, gather and dtype conversion per batch, forward, softmax
// cross-entropy, backward, SGD/AdamW step, learning-rate schedule, validation and early stopping)
// happens here; Python only sees one call and a per-epoch callback.
#pragma once

#include <cstdint>
#include <functional>

#include "common/convert.h"
#include "common/device.h"
#include "common/head_math.h"

namespace pyft {

enum class OptimizerKind : int { SGD = 0, AdamW = 1 };
enum class ScheduleKind : int { Constant = 0, Cosine = 1, Step = 2 };

struct TrainOptions {
  OptimizerKind optimizer = OptimizerKind::AdamW;
  double lr = 1e-3;
  double weight_decay = 0.0;  ///< SGD: L2 added to the gradient; AdamW: decoupled. Never on biases.
  double momentum = 0.0;      ///< SGD
  double dampening = 0.0;     ///< SGD
  bool nesterov = false;      ///< SGD
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8;  ///< AdamW

  ScheduleKind schedule = ScheduleKind::Constant;
  int64_t warmup_steps = 0;   ///< linear warm-up from lr/warmup_steps to lr (any schedule)
  double min_lr_ratio = 0.0;  ///< cosine floor, as a fraction of lr
  int64_t step_size = 1;      ///< step schedule: epochs between decays
  double gamma = 0.1;         ///< step schedule: decay factor

  int64_t epochs = 10;
  int64_t batch_size = 256;
  bool shuffle = true;
  bool drop_last = false;
  uint64_t seed = 0;
  float dropout = 0.0f;       ///< MLP hidden-layer dropout
  int64_t patience = 0;       ///< early stopping on validation loss; 0 disables
  double min_delta = 0.0;
  int n_threads = 0;          ///< <= 0: all available
  KernelChoice kernel = KernelChoice::Auto;
  // CUDA runs (features on a device): the caller's stream, which the run is ordered after, and
  // whether each epoch's steps are captured once into a CUDA graph and replayed (epochs >= 2).
  StreamHandle stream = 0;
  bool cuda_graphs = true;
};

struct EpochStats {
  int64_t epoch = 0;  ///< 0-based
  double train_loss = 0.0, train_accuracy = 0.0;
  double val_loss = 0.0, val_accuracy = 0.0;
  bool has_val = false;
  double lr = 0.0;  ///< learning rate of the epoch's last step
  int64_t steps = 0;
  double seconds = 0.0;
};

struct TrainResult {
  int64_t epochs_run = 0;
  int64_t steps = 0;
  int64_t best_epoch = -1;  ///< with early stopping: epoch whose weights were restored
  bool stopped_early = false;
  bool stopped_by_callback = false;
  bool interrupted = false;
};

/// Called after every epoch; return false to stop training.
using EpochCallback = std::function<bool(const EpochStats&)>;
/// Polled every few batches (and at epoch ends); return true to abort (e.g. Ctrl-C).
using InterruptCheck = std::function<bool()>;

/// Learning-rate multiplier at optimizer step `step` (0-based) of `total` steps.
double lr_factor(const TrainOptions& opt, int64_t step, int64_t total, int64_t steps_per_epoch);

/// Rows of X that form the training set: rows[0..count), or all of X when rows is null. Lets a
/// caller hold out a validation split of a memmap without copying the training part.
struct RowSubset {
  const int64_t* rows = nullptr;
  int64_t count = 0;
};

/// Validates all inputs (std::invalid_argument on error), then trains `params` in place.
/// labels: X.rows integers in [0, C); val_X / val_labels may be null.
TrainResult train_head(const HeadSpec& spec, float* params, const Matrix& X,
                       const int64_t* labels, const RowSubset& subset, const Matrix* val_X,
                       const int64_t* val_labels, const LossSpec& loss, const TrainOptions& opt,
                       const EpochCallback& on_epoch, const InterruptCheck& interrupted);

// Shared validation helpers (also used by the L-BFGS and predict ops).
void check_spec(const HeadSpec& spec);
void check_features(const Matrix& X, const HeadSpec& spec, const char* name, int n_threads);
/// Scans X and throws std::invalid_argument naming the first (lowest row) NaN or infinity. Called
/// when a kernel reports non-finite pre-activations; returns normally when X is finite (then the
/// weights have diverged, which is not an input error).
void verify_finite(const Matrix& X, const char* name, int n_threads);
void check_labels(const int64_t* labels, int64_t n, int64_t classes, const char* name);
void check_loss(const LossSpec& loss, int64_t classes);
/// Every label's class weight is > 0 (so every mini-batch has a positive weight sum).
void check_class_weights_present(const LossSpec& loss, const int64_t* labels, int64_t n);
/// Optimizer, schedule and loop options (lr and weight_decay included).
void check_options(const TrainOptions& opt);
/// rows[0..count) must be a non-empty list of indices into n rows.
void check_rows(const int64_t* rows, int64_t count, int64_t n, const char* name);

/// Checks shared by the CUDA trainers: the device exists, the feature matrices live on it with
/// contiguous, element-aligned rows, and the sizes fit cuBLAS's int dimensions.
void check_cuda_features(const Matrix& X, const Matrix* val_X, int64_t out_rows);

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
