// CPU training loop: shuffle, batch loss/gradient (common/head_math), optimizer, schedule.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <vector>

#include "common/optim.h"
#include "common/parallel.h"
#include "common/head_checks.h"
#include "common/rng.h"
#include "common/train_loop.h"
#include "head_train/head_train.h"

namespace pyft {
namespace cpu {

namespace {

struct Optimizer {
  const HeadSpec& spec;
  const TrainOptions& opt;
  std::vector<float> m, v;  // AdamW moments, or SGD momentum buffer in m
  int64_t t = 0;
  int n_threads;
  std::vector<std::pair<int64_t, int64_t>> wr, br;

  Optimizer(const HeadSpec& s, const TrainOptions& o, int nt) : spec(s), opt(o), n_threads(nt) {
    const int64_t P = spec.num_params();
    if (opt.optimizer == OptimizerKind::AdamW) {
      m.assign(P, 0.0f);
      v.assign(P, 0.0f);
    } else if (opt.momentum != 0.0) {
      m.assign(P, 0.0f);
    }
    wr = spec.weight_ranges();
    br = spec.bias_ranges();
  }

  /// Starts an optimizer step (bias corrections and the first-step flag use the step count).
  void begin_step() { ++t; }

  /// Updates params[lo, hi) of the current step on the calling thread.
  void update_slice(float* params, const float* grad, double lr, int64_t lo, int64_t hi) {
    for (auto& r : wr) update_range(params, grad, lr, std::max(lo, r.first), std::min(hi, r.second),
                                    static_cast<float>(opt.weight_decay));
    for (auto& r : br) update_range(params, grad, lr, std::max(lo, r.first), std::min(hi, r.second),
                                    0.0f);
  }

  void update_range(float* params, const float* grad, double lr, int64_t a, int64_t b, float wd) {
    if (b <= a) return;
    if (opt.optimizer == OptimizerKind::AdamW) {
      const double bc1 = 1.0 - std::pow(opt.beta1, static_cast<double>(t));
      const double bc2 = 1.0 - std::pow(opt.beta2, static_cast<double>(t));
      adamw_update(params + a, grad + a, m.data() + a, v.data() + a, b - a, static_cast<float>(lr),
                   wd, static_cast<float>(1.0 - opt.beta1), static_cast<float>(opt.beta2),
                   static_cast<float>(1.0 - opt.beta2), static_cast<float>(opt.eps),
                   static_cast<float>(lr / bc1), static_cast<float>(std::sqrt(bc2)));
    } else {
      sgd_update(params + a, grad + a, m.empty() ? nullptr : m.data() + a, b - a,
                 static_cast<float>(lr), wd, static_cast<float>(opt.momentum),
                 static_cast<float>(opt.dampening), opt.nesterov, t == 1);
    }
  }

  /// Updates all parameters of the current step (after begin_step), in parallel when large.
  void apply(float* params, const float* grad, double lr) {
    auto run = [&](int64_t lo, int64_t hi, float wd) {
      const int64_t n = hi - lo;
      const int nt = n >= (1 << 16) ? n_threads : 1;
#if defined(PYFT_WITH_OPENMP)
#pragma omp parallel num_threads(nt)
#endif
      {
        int64_t a, b;
        partition(n, nt, thread_id(), &a, &b, 64);
        update_range(params, grad, lr, a + lo, b + lo, wd);
      }
      (void)nt;
    };
    for (auto& r : wr) run(r.first, r.second, static_cast<float>(opt.weight_decay));
    for (auto& r : br) run(r.first, r.second, 0.0f);
  }
};

/// Mean loss (same criterion as training) and accuracy over a whole feature matrix.
void evaluate(const HeadSpec& spec, const float* params, const Matrix& X, const int64_t* labels,
              const LossSpec& loss, Workspace& ws, std::vector<float>& logits, int n_threads,
              bool* verified, double* mean_loss, double* accuracy) {
  const int64_t C = spec.classes;
  const int64_t chunk = 1024;
  logits.resize(static_cast<size_t>(chunk) * C);
  double lsum = 0.0, wsum = 0.0;
  int64_t correct = 0;
  for (int64_t s = 0; s < X.rows; s += chunk) {
    const int64_t n = std::min(chunk, X.rows - s);
    if (forward_logits(spec, params, X, s, n, logits.data(), ws, n_threads) && !*verified) {
      verify_finite(X, "val_features", n_threads);
      *verified = true;
    }
    for (int64_t r = 0; r < n; ++r) {
      bool ok;
      lsum += ce_row_loss(logits.data() + r * C, C, labels[s + r], loss, &ok);
      wsum += loss.weight(labels[s + r]);
      correct += ok;
    }
  }
  *mean_loss = wsum > 0 ? lsum / wsum : 0.0;
  *accuracy = static_cast<double>(correct) / static_cast<double>(X.rows);
}

}  // namespace

TrainResult train_head(const HeadSpec& spec, float* params, const Matrix& X,
                       const int64_t* labels, const RowSubset& subset, const Matrix* val_X,
                       const int64_t* val_labels, const LossSpec& loss, const TrainOptions& opt,
                       const EpochCallback& on_epoch, const InterruptCheck& interrupted) {
  using clock = std::chrono::steady_clock;
  const int nt = resolve_threads(opt.n_threads);
  const StepPlan plan(opt, subset.rows ? subset.count : X.rows);
  const int64_t N = plan.rows, B = plan.batch, steps_per_epoch = plan.steps_per_epoch;
  const int64_t P = spec.num_params();

  std::vector<int64_t> order(N);
  std::vector<float> grad(P);
  std::vector<float> eval_logits;
  Workspace ws;
  Optimizer optimizer(spec, opt, nt);

  TrainResult res;
  EarlyStopping early(opt, val_X != nullptr, P);
  int64_t step = 0;
  bool features_verified = false, val_verified = false;

  for (int64_t epoch = 0; epoch < opt.epochs; ++epoch) {
    const auto t0 = clock::now();
    epoch_rows(opt.shuffle, opt.seed, epoch, N, subset.rows, order.data());
    double loss_sum = 0.0;
    int64_t correct = 0, seen = 0;
    double lr = opt.lr;
    for (int64_t s = 0; s < steps_per_epoch; ++s) {
      const int64_t begin = s * B;
      const int64_t count = std::min(B, N - begin);
      const int64_t* idx = order.data() + begin;
      const double wsum = batch_weight_sum(loss, labels, idx, count);
      DropoutSpec drop{opt.dropout, hash_combine(opt.seed ^ 0xd509u, static_cast<uint64_t>(step))};
      lr = opt.lr * plan.lr_factor(opt, step);
      optimizer.begin_step();
      const SliceUpdate update = [&](int64_t lo, int64_t hi) {
        optimizer.update_slice(params, grad.data(), lr, lo, hi);
      };
      BatchResult br = loss_grad(spec, params, X, idx, 0, count, labels, loss, 1.0 / wsum, drop,
                                 grad.data(), false, opt.kernel, ws, nt, &update);
      if (br.nonfinite && !features_verified) {
        verify_finite(X, "features", nt);  // throws before this batch updates the weights
        features_verified = true;
      }
      if (!br.updated) optimizer.apply(params, grad.data(), lr);
      loss_sum += br.loss_sum * static_cast<double>(count);
      correct += br.correct;
      seen += count;
      ++step;
      if ((step & 63) == 0 && poll_interrupt(interrupted, res, epoch, step)) return res;
    }
    EpochStats st;
    st.epoch = epoch;
    st.train_loss = per_row(loss_sum, seen);
    st.train_accuracy = per_row(static_cast<double>(correct), seen);
    st.lr = lr;
    st.steps = step;
    if (val_X) {
      evaluate(spec, params, *val_X, val_labels, loss, ws, eval_logits, nt, &val_verified,
               &st.val_loss, &st.val_accuracy);
      st.has_val = true;
    }
    st.seconds = std::chrono::duration<double>(clock::now() - t0).count();
    res.epochs_run = epoch + 1;
    res.steps = step;

    bool stop = false;
    if (early.observe(epoch, st.val_loss, params)) {
      res.stopped_early = true;
      stop = true;
    }
    res.best_epoch = early.best_epoch();
    if (!callback_continues(on_epoch, st, res)) stop = true;
    if (poll_interrupt(interrupted, res)) return res;
    if (stop) break;
  }
  early.restore(params);
  return res;
}

}  // namespace cpu
}  // namespace pyft
