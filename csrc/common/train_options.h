// Options of the mini-batch trainers (train_head, train_heads on CPU and CUDA), their checks and
// the learning-rate schedule they define.
#pragma once

#include <cstdint>

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

/// Optimizer, schedule and loop options (lr and weight_decay included); std::invalid_argument
/// naming the first bad option.
void check_options(const TrainOptions& opt);

/// Learning-rate multiplier at optimizer step `step` (0-based) of `total` steps.
double lr_factor(const TrainOptions& opt, int64_t step, int64_t total, int64_t steps_per_epoch);

}  // namespace pyft
