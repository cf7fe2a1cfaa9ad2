// Full-batch L-BFGS for the linear head (the linear-probe standard).
//
// Minimises  f(W, b) = sum_i w_{y_i} CE_i / sum_i w_{y_i} + l2/2 ||W||^2   (bias unpenalised),
// which is scikit-learn's LogisticRegression objective with l2 = 1 / (C * sum_i w_{y_i}).
// Iterates are kept in float64; each objective evaluation runs the float32 kernels of
// common/head_math over the whole data in chunks.
#pragma once

#include <cstdint>
#include <functional>
#include <string>

#include "common/convert.h"
#include "common/head_math.h"
#include "common/train_loop.h"

namespace pyft {

struct LbfgsOptions {
  double l2 = 0.0;
  int64_t max_iter = 1000;
  double tol = 1e-4;    ///< stop when max |gradient| <= tol
  double ftol = 1e-9;   ///< stop when (f_prev - f) / max(|f_prev|, |f|, 1) <= ftol
  int64_t history = 0;  ///< curvature pairs kept; 0: automatic (up to 100, within 256 MB)
  int64_t max_linesearch = 25;
  int n_threads = 0;
  KernelChoice kernel = KernelChoice::Auto;
};

struct LbfgsIteration {
  int64_t iteration = 0;  ///< 1-based
  double objective = 0.0;
  double grad_max = 0.0;
  int64_t evaluations = 0;
};

struct LbfgsResult {
  int64_t iterations = 0;
  int64_t evaluations = 0;
  double objective = 0.0;
  double grad_max = 0.0;
  bool converged = false;
  bool interrupted = false;
  std::string message;
};

/// Called after each iteration; return false to stop.
using LbfgsCallback = std::function<bool(const LbfgsIteration&)>;

LbfgsResult train_head_lbfgs(const HeadSpec& spec, float* params, const Matrix& X,
                             const int64_t* labels, const LossSpec& loss, const LbfgsOptions& opt,
                             const LbfgsCallback& on_iter, const InterruptCheck& interrupted);

/// The objective above (and its gradient into grad when non-null) at params.
double head_objective(const HeadSpec& spec, const float* params, const Matrix& X,
                      const int64_t* labels, const LossSpec& loss, double l2, float* grad,
                      int n_threads, KernelChoice kernel);

namespace cpu {
LbfgsResult train_head_lbfgs(const HeadSpec& spec, float* params, const Matrix& X,
                             const int64_t* labels, const LossSpec& loss, const LbfgsOptions& opt,
                             const LbfgsCallback& on_iter, const InterruptCheck& interrupted);
/// verify: scan X and raise when the kernels report non-finite pre-activations.
double objective(const HeadSpec& spec, const float* params, const Matrix& X,
                 const int64_t* labels, const LossSpec& loss, double l2, float* grad,
                 int n_threads, KernelChoice kernel, bool verify);
}  // namespace cpu

}  // namespace pyft
