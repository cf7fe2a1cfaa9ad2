// L-BFGS with a strong-Wolfe line search (cubic interpolation and zoom, as in
// torch.optim.LBFGS and Nocedal & Wright, Algorithm 3.5/3.6).
#include <algorithm>
#include <cmath>
#include <deque>
#include <vector>

#include "common/head_checks.h"
#include "common/parallel.h"
#include "head_lbfgs/head_lbfgs.h"

namespace pyft {
namespace cpu {

namespace {

double dot(const std::vector<double>& a, const std::vector<double>& b) {
  double s = 0.0;
  const double* pa = a.data();
  const double* pb = b.data();
  const int64_t n = static_cast<int64_t>(a.size());
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += pa[i] * pb[i];
  return s;
}

/// History size for history == 0: up to 100 curvature pairs, as many as fit in 256 MB and at most
/// one per 20 samples (the two-loop recursion costs O(m P) per iteration, one pass over the data
/// O(N P)). Long histories cut the iterations on ill-conditioned probes: raw MNIST-5k pixels need
/// 126 evaluations to reach scikit-learn's objective with m = 10, 79 with m = 50, 68 with m = 100.
int64_t auto_history(int64_t P, int64_t N) {
  const int64_t budget = (int64_t(256) << 20) / (2 * 8 * std::max<int64_t>(P, 1));
  return std::max<int64_t>(5, std::min<int64_t>({100, budget, N / 20}));
}

double max_abs(const std::vector<double>& a) {
  double m = 0.0;
  for (double v : a) m = std::max(m, std::fabs(v));
  return m;
}

double cubic_interpolate(double x1, double f1, double g1, double x2, double f2, double g2,
                         bool has_bounds, double lo_bound, double hi_bound) {
  double xmin = has_bounds ? lo_bound : std::min(x1, x2);
  double xmax = has_bounds ? hi_bound : std::max(x1, x2);
  const double d1 = g1 + g2 - 3.0 * (f1 - f2) / (x1 - x2);
  const double d2_sq = d1 * d1 - g1 * g2;
  if (d2_sq >= 0.0) {
    const double d2 = std::sqrt(d2_sq);
    double pos;
    if (x1 <= x2)
      pos = x2 - (x2 - x1) * ((g2 + d2 - d1) / (g2 - g1 + 2.0 * d2));
    else
      pos = x1 - (x1 - x2) * ((g1 + d2 - d1) / (g1 - g2 + 2.0 * d2));
    if (!std::isfinite(pos)) return 0.5 * (xmin + xmax);
    return std::min(std::max(pos, xmin), xmax);
  }
  return 0.5 * (xmin + xmax);
}

/// Objective evaluator in float64 coordinates.
struct Problem {
  const HeadSpec& spec;
  const Matrix& X;
  const int64_t* labels;
  const LossSpec& loss;
  double l2;
  int n_threads;
  KernelChoice kernel;
  std::vector<float> pf, gf;
  int64_t evals = 0;

  double eval(const std::vector<double>& x, std::vector<double>& g) {
    const int64_t P = static_cast<int64_t>(x.size());
    for (int64_t i = 0; i < P; ++i) pf[i] = static_cast<float>(x[i]);
    ++evals;
    // Only the first evaluation checks the data; later non-finite values come from trial steps
    // of the line search, which backtracks from them.
    const double f = objective(spec, pf.data(), X, labels, loss, 0.0, gf.data(), n_threads, kernel,
                               /*verify=*/evals == 1);
    for (int64_t i = 0; i < P; ++i) g[i] = gf[i];
    double reg = 0.0;
    for (auto& r : spec.weight_ranges()) {
      for (int64_t i = r.first; i < r.second; ++i) {
        reg += x[i] * x[i];
        g[i] += l2 * x[i];
      }
    }
    return f + 0.5 * l2 * reg;
  }
};

}  // namespace

double objective(const HeadSpec& spec, const float* params, const Matrix& X,
                 const int64_t* labels, const LossSpec& loss, double l2, float* grad,
                 int n_threads, KernelChoice kernel, bool verify) {
  const int nt = resolve_threads(n_threads);
  const int64_t P = spec.num_params();
  double wsum = 0.0;
  if (loss.class_weights) {
    for (int64_t i = 0; i < X.rows; ++i) wsum += loss.class_weights[labels[i]];
  } else {
    wsum = static_cast<double>(X.rows);
  }
  std::vector<float> scratch;
  float* g = grad;
  if (!g) {
    scratch.resize(P);
    g = scratch.data();
  }
  Workspace ws;
  // The fused kernel keeps per-thread gradients for the whole range; the BLAS path works in
  // chunks so its buffers stay small.
  const bool fused = use_fused_kernel(spec, kernel);
  const int64_t chunk = fused ? X.rows : 4096;
  double f = 0.0;
  for (int64_t s = 0; s < X.rows; s += chunk) {
    const int64_t n = std::min(chunk, X.rows - s);
    BatchResult br = loss_grad(spec, params, X, nullptr, s, n, labels, loss, 1.0 / wsum,
                               DropoutSpec{}, g, s > 0, kernel, ws, nt);
    if (br.nonfinite && verify) {
      verify_finite(X, "features", nt);
      verify = false;
    }
    f += br.loss_sum;
  }
  if (l2 > 0.0) {
    double reg = 0.0;
    for (auto& r : spec.weight_ranges())
      for (int64_t i = r.first; i < r.second; ++i) {
        reg += static_cast<double>(params[i]) * params[i];
        g[i] += static_cast<float>(l2) * params[i];
      }
    f += 0.5 * l2 * reg;
  }
  return f;
}

LbfgsResult train_head_lbfgs(const HeadSpec& spec, float* params, const Matrix& X,
                             const int64_t* labels, const LossSpec& loss, const LbfgsOptions& opt,
                             const LbfgsCallback& on_iter, const InterruptCheck& interrupted) {
  const int64_t P = spec.num_params();
  Problem prob{spec, X, labels, loss, opt.l2, resolve_threads(opt.n_threads), opt.kernel,
               std::vector<float>(P), std::vector<float>(P)};
  std::vector<double> x(params, params + P), g(P), d(P), g_new(P), x_try(P);
  std::deque<std::vector<double>> S, Y;
  std::deque<double> rho;
  const int64_t history = opt.history > 0 ? opt.history : auto_history(P, X.rows);
  std::vector<double> alpha(history);
  double H_diag = 1.0;

  LbfgsResult res;
  double f = prob.eval(x, g);
  auto finish = [&](const char* msg, bool converged) {
    for (int64_t i = 0; i < P; ++i) params[i] = static_cast<float>(x[i]);
    res.objective = f;
    res.grad_max = max_abs(g);
    res.evaluations = prob.evals;
    res.converged = converged;
    res.message = msg;
    return res;
  };
  if (!std::isfinite(f)) return finish("objective is not finite at the initial parameters", false);
  if (max_abs(g) <= opt.tol) return finish("gradient below tol at the initial parameters", true);

  auto obj_at = [&](double t, std::vector<double>& gout) {
    for (int64_t i = 0; i < P; ++i) x_try[i] = x[i] + t * d[i];
    return prob.eval(x_try, gout);
  };

  for (int64_t it = 1; it <= opt.max_iter; ++it) {
    // Two-loop recursion: d = -H g.
    for (int64_t i = 0; i < P; ++i) d[i] = -g[i];
    const int64_t k = static_cast<int64_t>(S.size());
    for (int64_t j = k - 1; j >= 0; --j) {
      alpha[j] = rho[j] * dot(S[j], d);
      for (int64_t i = 0; i < P; ++i) d[i] -= alpha[j] * Y[j][i];
    }
    for (int64_t i = 0; i < P; ++i) d[i] *= H_diag;
    for (int64_t j = 0; j < k; ++j) {
      const double beta = rho[j] * dot(Y[j], d);
      for (int64_t i = 0; i < P; ++i) d[i] += S[j][i] * (alpha[j] - beta);
    }
    double gtd = dot(g, d);
    if (!(gtd < 0.0)) {
      // Not a descent direction (curvature information went stale): restart from -g.
      S.clear();
      Y.clear();
      rho.clear();
      H_diag = 1.0;
      for (int64_t i = 0; i < P; ++i) d[i] = -g[i];
      gtd = dot(g, d);
    }
    double t = 1.0;
    if (S.empty()) {
      double g1 = 0.0;
      for (double v : g) g1 += std::fabs(v);
      t = std::min(1.0, 1.0 / g1);
    }

    // ---- strong Wolfe line search ----
    const double c1 = 1e-4, c2 = 0.9, tol_change = 1e-12;
    const double d_norm = max_abs(d);
    double f_new = obj_at(t, g_new);
    double gtd_new = dot(g_new, d);
    double t_prev = 0.0, f_prev = f, gtd_prev = gtd;
    std::vector<double> g_prev = g;
    double br_t[2], br_f[2], br_gtd[2];
    std::vector<double> br_g[2];
    bool done = false, bracketed = false;
    int64_t ls = 0;
    while (ls < opt.max_linesearch) {
      if (f_new > f + c1 * t * gtd || (ls > 1 && f_new >= f_prev) || !std::isfinite(f_new)) {
        br_t[0] = t_prev; br_f[0] = f_prev; br_g[0] = g_prev; br_gtd[0] = gtd_prev;
        br_t[1] = t; br_f[1] = f_new; br_g[1] = g_new; br_gtd[1] = gtd_new;
        bracketed = true;
        break;
      }
      if (std::fabs(gtd_new) <= -c2 * gtd) {
        br_t[0] = br_t[1] = t; br_f[0] = br_f[1] = f_new; br_g[0] = g_new; br_gtd[0] = gtd_new;
        done = true;
        break;
      }
      if (gtd_new >= 0) {
        br_t[0] = t_prev; br_f[0] = f_prev; br_g[0] = g_prev; br_gtd[0] = gtd_prev;
        br_t[1] = t; br_f[1] = f_new; br_g[1] = g_new; br_gtd[1] = gtd_new;
        bracketed = true;
        break;
      }
      const double min_step = t + 0.01 * (t - t_prev), max_step = t * 10.0;
      const double tmp = t;
      t = cubic_interpolate(t_prev, f_prev, gtd_prev, t, f_new, gtd_new, true, min_step, max_step);
      t_prev = tmp; f_prev = f_new; g_prev = g_new; gtd_prev = gtd_new;
      f_new = obj_at(t, g_new);
      gtd_new = dot(g_new, d);
      ++ls;
    }
    if (!done && !bracketed) {
      br_t[0] = 0.0; br_f[0] = f; br_g[0] = g; br_gtd[0] = gtd;
      br_t[1] = t; br_f[1] = f_new; br_g[1] = g_new; br_gtd[1] = gtd_new;
    }
    int lo = 0, hi = 1;
    if (!done) {
      lo = br_f[0] <= br_f[1] ? 0 : 1;
      hi = 1 - lo;
      bool insuf = false;
      while (ls < opt.max_linesearch && bracketed) {
        if (std::fabs(br_t[1] - br_t[0]) * d_norm < tol_change) break;
        t = cubic_interpolate(br_t[0], br_f[0], br_gtd[0], br_t[1], br_f[1], br_gtd[1], false, 0, 0);
        const double bmax = std::max(br_t[0], br_t[1]), bmin = std::min(br_t[0], br_t[1]);
        const double eps = 0.1 * (bmax - bmin);
        if (std::min(bmax - t, t - bmin) < eps) {
          if (insuf || t >= bmax || t <= bmin) {
            t = std::fabs(t - bmax) < std::fabs(t - bmin) ? bmax - eps : bmin + eps;
            insuf = false;
          } else {
            insuf = true;
          }
        } else {
          insuf = false;
        }
        f_new = obj_at(t, g_new);
        gtd_new = dot(g_new, d);
        ++ls;
        if (f_new > f + c1 * t * gtd || f_new >= br_f[lo] || !std::isfinite(f_new)) {
          br_t[hi] = t; br_f[hi] = f_new; br_g[hi] = g_new; br_gtd[hi] = gtd_new;
          lo = br_f[0] <= br_f[1] ? 0 : 1;
          hi = 1 - lo;
        } else {
          if (std::fabs(gtd_new) <= -c2 * gtd) {
            done = true;
          } else if (gtd_new * (br_t[hi] - br_t[lo]) >= 0) {
            br_t[hi] = br_t[lo]; br_f[hi] = br_f[lo]; br_g[hi] = br_g[lo]; br_gtd[hi] = br_gtd[lo];
          }
          br_t[lo] = t; br_f[lo] = f_new; br_g[lo] = g_new; br_gtd[lo] = gtd_new;
          if (done) break;
        }
      }
    }
    t = br_t[lo];
    f_new = br_f[lo];
    if (t == 0.0 || !(f_new <= f)) {
      // The line search found no decrease: at float32 precision we are at the minimum.
      res.iterations = it - 1;
      return finish("line search found no decrease (converged to float32 precision)", true);
    }
    g_new = br_g[lo];

    // Update the curvature pairs.
    std::vector<double> s(P), y(P);
    for (int64_t i = 0; i < P; ++i) {
      s[i] = t * d[i];
      y[i] = g_new[i] - g[i];
    }
    const double ys = dot(y, s);
    if (ys > 1e-10) {
      if (static_cast<int64_t>(S.size()) == history) {
        S.pop_front();
        Y.pop_front();
        rho.pop_front();
      }
      H_diag = ys / dot(y, y);
      S.push_back(std::move(s));
      Y.push_back(std::move(y));
      rho.push_back(1.0 / ys);
    }
    for (int64_t i = 0; i < P; ++i) x[i] += t * d[i];
    const double f_old = f;
    f = f_new;
    g.swap(g_new);
    res.iterations = it;

    const double gmax = max_abs(g);
    if (on_iter && !on_iter(LbfgsIteration{it, f, gmax, prob.evals}))
      return finish("stopped by callback", false);
    if (interrupted && interrupted()) {
      res.interrupted = true;
      return finish("interrupted", false);
    }
    if (gmax <= opt.tol) return finish("max |gradient| <= tol", true);
    if ((f_old - f) / std::max({std::fabs(f_old), std::fabs(f), 1.0}) <= opt.ftol)
      return finish("relative reduction of the objective <= ftol", true);
  }
  return finish("reached max_iter", false);
}

}  // namespace cpu
}  // namespace pyft
