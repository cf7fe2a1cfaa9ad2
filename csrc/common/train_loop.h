// Host-side bookkeeping that every mini-batch trainer shares (CPU and CUDA, one head or a grid):
// the batches of an epoch, the schedule per step, early stopping and the end-of-epoch protocol.
// Keeping it in one place keeps the trainers on the same trajectory and the same stopping rules.
#pragma once

#include <algorithm>
#include <cstdint>
#include <functional>
#include <vector>

#include "common/train_options.h"

namespace pyft {

/// Polled every few batches (and at epoch ends); return true to abort (e.g. Ctrl-C).
using InterruptCheck = std::function<bool()>;

/// Rows of X that form the training set: rows[0..count), or all of X when rows is null. Lets a
/// caller hold out a validation split of a memmap without copying the training part.
struct RowSubset {
  const int64_t* rows = nullptr;
  int64_t count = 0;
};

/// How a run ended (TrainResult and GridResult add their own fields).
struct RunResult {
  int64_t epochs_run = 0;
  int64_t steps = 0;
  bool stopped_by_callback = false;
  bool interrupted = false;
};

/// The batches of every epoch: `rows` training rows in batches of `batch` (the last one short
/// unless drop_last), and the schedule over all epochs' steps.
struct StepPlan {
  int64_t rows = 0, batch = 0, steps_per_epoch = 0, total_steps = 0;

  StepPlan(const TrainOptions& opt, int64_t n)
      : rows(n), batch(std::min<int64_t>(opt.batch_size, n)) {
    steps_per_epoch = opt.drop_last ? std::max<int64_t>(1, rows / batch)
                                    : (rows + batch - 1) / batch;
    total_steps = steps_per_epoch * opt.epochs;
  }
  /// Rows of step s of an epoch (0-based).
  int64_t batch_rows(int64_t s) const { return std::min(batch, rows - s * batch); }
  /// Rows an epoch trains on (fewer than `rows` with drop_last).
  int64_t rows_per_epoch() const { return std::min(rows, steps_per_epoch * batch); }
  /// Learning-rate multiplier of optimizer step `step` (0-based, counted over all epochs).
  double lr_factor(const TrainOptions& opt, int64_t step) const {
    return pyft::lr_factor(opt, step, total_steps, steps_per_epoch);
  }
};

/// An epoch's mean of a per-row sum (loss, hits) over the rows it saw.
inline double per_row(double sum, int64_t rows) {
  return sum / static_cast<double>(std::max<int64_t>(1, rows));
}

/// Early stopping on validation loss: stop after `patience` epochs without an improvement of more
/// than min_delta, and hand back the best epoch's weights (kept on the host).
class EarlyStopping {
 public:
  EarlyStopping(const TrainOptions& opt, bool has_val, int64_t num_params);
  bool enabled() const { return enabled_; }
  /// After an epoch's validation: keeps params when the loss improved. True when patience ran
  /// out (the caller stops).
  bool observe(int64_t epoch, double val_loss, const float* params);
  /// Epoch whose weights restore() writes back; -1 before the first improvement.
  int64_t best_epoch() const { return best_epoch_; }
  /// Writes the best weights back into params (nothing when disabled or never improved).
  void restore(float* params) const;

 private:
  bool enabled_;
  double min_delta_;
  int64_t patience_, num_params_;
  double best_val_;
  int64_t since_best_ = 0, best_epoch_ = -1;
  std::vector<float> best_params_;
};

/// Runs the user's per-epoch callback (when set); false from it stops the run, recorded in res.
template <class Stats>
bool callback_continues(const std::function<bool(const Stats&)>& on_epoch, const Stats& st,
                        RunResult& res) {
  if (!on_epoch || on_epoch(st)) return true;
  res.stopped_by_callback = true;
  return false;
}

/// Polls `interrupted` (when set) and records an interrupt in res.
inline bool poll_interrupt(const InterruptCheck& interrupted, RunResult& res) {
  if (!interrupted || !interrupted()) return false;
  res.interrupted = true;
  return true;
}

/// An interrupt inside epoch `epoch` after `step` optimizer steps: that epoch does not count.
inline bool poll_interrupt(const InterruptCheck& interrupted, RunResult& res, int64_t epoch,
                           int64_t step) {
  if (!poll_interrupt(interrupted, res)) return false;
  res.steps = step;
  res.epochs_run = epoch;
  return true;
}

}  // namespace pyft
