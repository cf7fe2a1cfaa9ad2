// Validation and dispatch for the L-BFGS solver.
#include "head_lbfgs/head_lbfgs.h"

#include <cmath>

#include "common/check.h"
#include "common/head_checks.h"

namespace pyft {

namespace {
void check_common(const HeadSpec& spec, const float* params, const Matrix& X,
                  const int64_t* labels, const LossSpec& loss, double l2, int n_threads) {
  check_spec(spec);
  PYFT_CHECK(params != nullptr, "params is missing");
  PYFT_CHECK(std::isfinite(l2) && l2 >= 0.0, "l2 must be a finite number >= 0; got %g", l2);
  check_loss(loss, spec.classes);
  check_features(X, spec, "features", n_threads);
  check_labels(labels, X.rows, spec.classes, "labels");
  if (loss.class_weights) {
    double total = 0.0;
    for (int64_t i = 0; i < X.rows; ++i) total += loss.class_weights[labels[i]];
    PYFT_CHECK(total > 0.0, "class_weights give every sample weight 0");
  }
}
}  // namespace

LbfgsResult train_head_lbfgs(const HeadSpec& spec, float* params, const Matrix& X,
                             const int64_t* labels, const LossSpec& loss, const LbfgsOptions& opt,
                             const LbfgsCallback& on_iter, const InterruptCheck& interrupted) {
  PYFT_CHECK(spec.kind == HeadKind::Linear,
             "the L-BFGS solver trains the linear head only; use SGD or AdamW for the MLP head");
  check_common(spec, params, X, labels, loss, opt.l2, opt.n_threads);
  PYFT_CHECK(opt.max_iter >= 1, "max_iter must be >= 1; got %lld", (long long)opt.max_iter);
  PYFT_CHECK(std::isfinite(opt.tol) && opt.tol >= 0.0, "tol must be >= 0; got %g", opt.tol);
  PYFT_CHECK(std::isfinite(opt.ftol) && opt.ftol >= 0.0, "ftol must be >= 0; got %g", opt.ftol);
  PYFT_CHECK(opt.history >= 0, "history must be >= 0 (0: automatic); got %lld",
             (long long)opt.history);
  PYFT_CHECK(opt.max_linesearch >= 1, "max_linesearch must be >= 1; got %lld",
             (long long)opt.max_linesearch);
  return cpu::train_head_lbfgs(spec, params, X, labels, loss, opt, on_iter, interrupted);
}

double head_objective(const HeadSpec& spec, const float* params, const Matrix& X,
                      const int64_t* labels, const LossSpec& loss, double l2, float* grad,
                      int n_threads, KernelChoice kernel) {
  check_common(spec, params, X, labels, loss, l2, n_threads);
  return cpu::objective(spec, params, X, labels, loss, l2, grad, n_threads, kernel,
                        /*verify=*/true);
}

}  // namespace pyft
