// CPU kernel of grid training: one gather and two GEMMs per batch for all heads, then per-head
// softmax cross-entropy (common/head_math) and optimizer steps (common/optim).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <vector>

#include "common/blas.h"
#include "common/head_checks.h"
#include "common/optim.h"
#include "common/parallel.h"
#include "common/rng.h"
#include "common/train_loop.h"
#include "head_grid/head_grid.h"

namespace pyft {
namespace cpu {

namespace {

/// All heads' parameters packed so that one GEMM covers every head: W is (H*C) x D (head h owns
/// rows [h*C, (h+1)*C)), b is H x C. Gradients and optimizer moments use the same layout.
struct Packed {
  int64_t H, C, D;
  std::vector<float> W, b;
  float* w(int64_t h) { return W.data() + h * C * D; }
  float* bias(int64_t h) { return b.data() + h * C; }
  Packed(int64_t h, int64_t c, int64_t d, bool allocate) : H(h), C(c), D(d) {
    if (allocate) {
      W.assign(static_cast<size_t>(H * C * D), 0.0f);
      b.assign(static_cast<size_t>(H * C), 0.0f);
    }
  }
};

void unpack(const float* params, Packed& p) {
  const int64_t P = p.C * p.D + p.C;
  for (int64_t h = 0; h < p.H; ++h) {
    std::memcpy(p.w(h), params + h * P, sizeof(float) * p.C * p.D);
    std::memcpy(p.bias(h), params + h * P + p.C * p.D, sizeof(float) * p.C);
  }
}

void pack_back(Packed& p, float* params) {
  const int64_t P = p.C * p.D + p.C;
  for (int64_t h = 0; h < p.H; ++h) {
    std::memcpy(params + h * P, p.w(h), sizeof(float) * p.C * p.D);
    std::memcpy(params + h * P + p.C * p.D, p.bias(h), sizeof(float) * p.C);
  }
}

/// Per-thread scratch for one head's (rows x C) logits block.
struct HeadScratch {
  std::vector<float> z, e;
  std::vector<double> rowloss;
  std::vector<uint8_t> rowok;
  void reserve(int64_t rows, int64_t C) {
    if (static_cast<int64_t>(z.size()) < rows * C) {
      z.resize(static_cast<size_t>(rows * C));
      e.resize(static_cast<size_t>(rows * C));
    }
    if (static_cast<int64_t>(rowloss.size()) < rows) {
      rowloss.resize(static_cast<size_t>(rows));
      rowok.resize(static_cast<size_t>(rows));
    }
  }
};

inline bool finite_span(const float* x, int64_t n) {
  float acc = 0.0f;
  for (int64_t i = 0; i < n; ++i) acc += x[i] * 0.0f;
  return acc == 0.0f;
}

struct GridOptimizer {
  const TrainOptions& opt;
  const double* lrs;
  const double* wds;
  Packed m, v;  // AdamW moments, or the SGD momentum buffer in m
  int64_t t = 0;

  GridOptimizer(const TrainOptions& o, const double* l, const double* w, int64_t H, int64_t C,
                int64_t D)
      : opt(o), lrs(l), wds(w),
        m(H, C, D, o.optimizer == OptimizerKind::AdamW || o.momentum != 0.0),
        v(H, C, D, o.optimizer == OptimizerKind::AdamW) {}

  void update(float* p, const float* g, float* mm, float* vv, int64_t n, double lr, float wd) {
    if (opt.optimizer == OptimizerKind::AdamW) {
      const double bc1 = 1.0 - std::pow(opt.beta1, static_cast<double>(t));
      const double bc2 = 1.0 - std::pow(opt.beta2, static_cast<double>(t));
      adamw_update(p, g, mm, vv, n, static_cast<float>(lr), wd,
                   static_cast<float>(1.0 - opt.beta1), static_cast<float>(opt.beta2),
                   static_cast<float>(1.0 - opt.beta2), static_cast<float>(opt.eps),
                   static_cast<float>(lr / bc1), static_cast<float>(std::sqrt(bc2)));
    } else {
      sgd_update(p, g, mm, n, static_cast<float>(lr), wd, static_cast<float>(opt.momentum),
                 static_cast<float>(opt.dampening), opt.nesterov, t == 1);
    }
  }

  /// One step of head h with schedule multiplier `factor` (weights decayed, biases not).
  void step_head(Packed& params, Packed& grad, int64_t h, double factor) {
    const double lr = lrs[h] * factor;
    const int64_t CD = params.C * params.D;
    const bool has_m = !m.W.empty(), has_v = !v.W.empty();
    update(params.w(h), grad.w(h), has_m ? m.w(h) : nullptr, has_v ? v.w(h) : nullptr, CD, lr,
           static_cast<float>(wds[h]));
    update(params.bias(h), grad.bias(h), has_m ? m.bias(h) : nullptr,
           has_v ? v.bias(h) : nullptr, params.C, lr, 0.0f);
  }
};

}  // namespace

GridResult train_heads(const HeadSpec& spec, int64_t heads, float* params, const double* lrs,
                       const double* weight_decays, const Matrix& X, const int64_t* labels,
                       const RowSubset& subset, const ValidationSet& val, const LossSpec& loss,
                       const TrainOptions& opt, const GridEpochCallback& on_epoch,
                       const InterruptCheck& interrupted) {
  using clock = std::chrono::steady_clock;
  const int nt = resolve_threads(opt.n_threads);
  const int64_t H = heads, C = spec.classes, D = spec.in_features, HC = H * C;
  const StepPlan plan(opt, subset.rows ? subset.count : X.rows);
  const int64_t N = plan.rows, B = plan.batch, steps_per_epoch = plan.steps_per_epoch;
  const int64_t chunk = 1024;  // validation rows per GEMM
  const int64_t rows_max = std::max(B, chunk);

  Packed W(H, C, D, true), G(H, C, D, true);
  unpack(params, W);
  GridOptimizer optimizer(opt, lrs, weight_decays, H, C, D);
  std::vector<int64_t> order(N);
  std::vector<float> xbuf(static_cast<size_t>(rows_max * D));
  std::vector<float> Z(static_cast<size_t>(rows_max * HC));  // logits, then dL/dlogits
  std::vector<HeadScratch> scratch(nt);
  for (auto& s : scratch) s.reserve(rows_max, C);
  std::vector<double> head_loss(H), head_lsum(H), head_wsum(H);
  std::vector<int64_t> head_correct(H);
  std::vector<uint8_t> head_bad(H);
  const int head_threads = static_cast<int>(std::min<int64_t>(nt, H));
  // Split the heads over the threads when each gets at least one (and the batch is big enough to
  // be worth the threads); otherwise all threads share each GEMM.
  const bool head_split = nt > 1 && H >= nt && B * D >= (1 << 15);

  GridResult res;
  int64_t step = 0;
  bool features_verified = false, val_verified = false;
  // Parallel over heads; every head's result depends only on its own rows, so it is the same for
  // any thread count.
  auto for_heads = [&](auto&& body) {
#if defined(PYFT_WITH_OPENMP)
#pragma omp parallel for num_threads(head_threads) schedule(static)
#endif
    for (int64_t h = 0; h < H; ++h) body(h, scratch[thread_id()]);
  };

  for (int64_t epoch = 0; epoch < opt.epochs; ++epoch) {
    const auto t0 = clock::now();
    epoch_rows(opt.shuffle, opt.seed, epoch, N, subset.rows, order.data());
    std::vector<double> loss_sum(H, 0.0);
    std::vector<int64_t> correct(H, 0);
    int64_t seen = 0;
    double factor = 1.0;
    for (int64_t s = 0; s < steps_per_epoch; ++s) {
      const int64_t begin = s * B;
      const int64_t count = std::min(B, N - begin);
      const int64_t* idx = order.data() + begin;
      const double wsum = batch_weight_sum(loss, labels, idx, count);
      const double inv_denom = 1.0 / wsum;
      const float invd = static_cast<float>(inv_denom);
      factor = plan.lr_factor(opt, step);

      // Softmax cross-entropy of head h on its block of Z; Z's block becomes dL/dlogits.
      auto ce_head = [&](int64_t h, HeadScratch& sc) {
        // Head h's block, made contiguous for the shared softmax cross-entropy.
        float* z = sc.z.data();
        const float* bh = W.bias(h);
        for (int64_t r = 0; r < count; ++r) {
          const float* src = Z.data() + r * HC + h * C;
          for (int64_t c = 0; c < C; ++c) z[r * C + c] = src[c] + bh[c];
        }
        head_bad[h] = !finite_span(z, count * C);
        ce_block_grad(z, sc.e.data(), count, C, labels, idx, 0, loss, invd, sc.rowloss.data(),
                      sc.rowok.data());
        double l = 0.0;
        int64_t ok = 0;
        for (int64_t r = 0; r < count; ++r) {
          l += sc.rowloss[r];
          ok += sc.rowok[r];
        }
        head_loss[h] = l * inv_denom;
        head_correct[h] = ok;
        float* gb = G.bias(h);
        std::fill(gb, gb + C, 0.0f);
        for (int64_t r = 0; r < count; ++r) {
          float* dst = Z.data() + r * HC + h * C;
          for (int64_t c = 0; c < C; ++c) {
            dst[c] = z[r * C + c];
            gb[c] += z[r * C + c];
          }
        }
      };
      // Heads [h0, h1): logits Z[:, h0*C : h1*C] = x W[h0*C : h1*C]^T, and after the loss the
      // weight gradient G[h0*C : h1*C] = dZ[:, h0*C : h1*C]^T x.
      auto forward = [&](int64_t h0, int64_t h1, int threads) {
        gemm(false, true, count, (h1 - h0) * C, D, 1.0f, xbuf.data(), D, W.w(h0), D, 0.0f,
             Z.data() + h0 * C, HC, threads);
      };
      auto backward = [&](int64_t h0, int64_t h1, int threads) {
        gemm(true, false, (h1 - h0) * C, D, count, 1.0f, Z.data() + h0 * C, HC, xbuf.data(), D,
             0.0f, G.w(h0), D, threads);
      };
      ++optimizer.t;
      bool stepped = false;
      if (head_split) {
        // Each thread owns a contiguous range of heads: its own GEMMs (one operand packed per
        // thread instead of both threads packing the shared one), loss and optimizer step, with
        // two barriers per batch (after the shared gather, after the loss) instead of one per
        // phase. Head h's arithmetic does not depend on which thread runs it.
        bool any_bad = false;
#if defined(PYFT_WITH_OPENMP)
#pragma omp parallel num_threads(nt)
#endif
        {
          const int t = thread_id();
          int64_t lo, hi, h0, h1;
          partition(count, nt, t, &lo, &hi);
          if (hi > lo) gather_rows(X, idx + lo, 0, hi - lo, xbuf.data() + lo * D, D, 1);
#if defined(PYFT_WITH_OPENMP)
#pragma omp barrier
#endif
          partition(H, nt, t, &h0, &h1);
          if (h1 > h0) forward(h0, h1, 1);
          for (int64_t h = h0; h < h1; ++h) ce_head(h, scratch[t]);
#if defined(PYFT_WITH_OPENMP)
#pragma omp barrier
#endif
          bool bad = false;
          for (int64_t h = 0; h < H; ++h) bad |= head_bad[h] != 0;
          if (!bad && h1 > h0) {
            backward(h0, h1, 1);
            for (int64_t h = h0; h < h1; ++h) optimizer.step_head(W, G, h, factor);
          }
          if (t == 0) any_bad = bad;
        }
        stepped = !any_bad;
      } else {
        gather_rows(X, idx, 0, count, xbuf.data(), D, nt);
        forward(0, H, nt);
        for_heads(ce_head);
      }
      if (!stepped) {
        bool any_bad = false;
        for (int64_t h = 0; h < H; ++h) any_bad |= head_bad[h] != 0;
        if (any_bad && !features_verified) {
          verify_finite(X, "features", nt);  // throws before this batch updates the weights
          features_verified = true;
        }
        backward(0, H, nt);
        for_heads([&](int64_t h, HeadScratch&) { optimizer.step_head(W, G, h, factor); });
      }
      for (int64_t h = 0; h < H; ++h) {
        loss_sum[h] += head_loss[h] * static_cast<double>(count);
        correct[h] += head_correct[h];
      }
      seen += count;
      ++step;
      if ((step & 15) == 0 && poll_interrupt(interrupted, res, epoch, step)) {
        pack_back(W, params);
        return res;
      }
    }
    pack_back(W, params);

    GridEpochStats st;
    st.epoch = epoch;
    st.train_loss.resize(H);
    st.train_accuracy.resize(H);
    for (int64_t h = 0; h < H; ++h) {
      st.train_loss[h] = per_row(loss_sum[h], seen);
      st.train_accuracy[h] = per_row(static_cast<double>(correct[h]), seen);
    }
    st.lr_factor = factor;
    st.steps = step;
    if (val.count > 0) {
      const Matrix& VX = val.X ? *val.X : X;
      const int64_t* vlabels = val.X ? val.labels : labels;
      std::fill(head_lsum.begin(), head_lsum.end(), 0.0);
      std::fill(head_correct.begin(), head_correct.end(), 0);
      double wtotal = 0.0;
      for (int64_t s0 = 0; s0 < val.count; s0 += chunk) {
        const int64_t n = std::min(chunk, val.count - s0);
        const int64_t* vidx = val.rows ? val.rows + s0 : nullptr;
        gather_rows(VX, vidx, s0, n, xbuf.data(), D, nt);
        gemm(false, true, n, HC, D, 1.0f, xbuf.data(), D, W.W.data(), D, 0.0f, Z.data(), HC, nt);
        for (int64_t r = 0; r < n; ++r) wtotal += loss.weight(vlabels[vidx ? vidx[r] : s0 + r]);
        for_heads([&](int64_t h, HeadScratch& sc) {
          const float* bh = W.bias(h);
          float* z = sc.z.data();
          double l = 0.0;
          int64_t ok = 0;
          bool bad = false;
          for (int64_t r = 0; r < n; ++r) {
            const float* src = Z.data() + r * HC + h * C;
            for (int64_t c = 0; c < C; ++c) z[c] = src[c] + bh[c];
            bad |= !finite_span(z, C);
            bool hit;
            l += ce_row_loss(z, C, vlabels[vidx ? vidx[r] : s0 + r], loss, &hit);
            ok += hit;
          }
          head_lsum[h] += l;
          head_correct[h] += ok;
          head_bad[h] = bad;
        });
        bool any_bad = false;
        for (int64_t h = 0; h < H; ++h) any_bad |= head_bad[h] != 0;
        if (any_bad && !val_verified) {
          verify_finite(VX, val.X ? "val_features" : "features", nt);
          val_verified = true;
        }
      }
      st.val_loss.resize(H);
      st.val_accuracy.resize(H);
      for (int64_t h = 0; h < H; ++h) {
        st.val_loss[h] = wtotal > 0 ? head_lsum[h] / wtotal : 0.0;
        st.val_accuracy[h] =
            static_cast<double>(head_correct[h]) / static_cast<double>(val.count);
      }
      st.has_val = true;
    }
    st.seconds = std::chrono::duration<double>(clock::now() - t0).count();
    res.epochs_run = epoch + 1;
    res.steps = step;
    if (!callback_continues(on_epoch, st, res)) break;
    if (poll_interrupt(interrupted, res)) return res;
  }
  return res;
}

}  // namespace cpu
}  // namespace pyft
