// Forward, loss and gradient of a classification head on float32 mini-batches.
//
// Parameters live in one flat float32 vector so that optimizers and L-BFGS treat every head alike:
//   linear: W (C x D) | b (C)
//   mlp:    W1 (H x D) | b1 (H) | W2 (C x H) | b2 (C)
// The loss is PyTorch's CrossEntropyLoss(weight=w, label_smoothing=eps, reduction="mean"):
//   L = sum_i [(1-eps) w_{y_i} (-log p_{i,y_i}) + eps/C sum_c w_c (-log p_{i,c})] / sum_i w_{y_i}
// and the caller passes the normaliser (1 / sum_i w_{y_i}) so the same code serves mini-batches
// and full-batch objectives.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "common/convert.h"

namespace pyft {

enum class HeadKind : int { Linear = 0, MLP = 1 };
enum class Activation : int { ReLU = 0, GELU = 1 };

struct HeadSpec {
  HeadKind kind = HeadKind::Linear;
  int64_t in_features = 0;  ///< D
  int64_t hidden = 0;       ///< H (MLP only)
  int64_t classes = 0;      ///< C
  Activation activation = Activation::ReLU;

  int64_t num_params() const;
  /// Offsets into the flat parameter vector of the final layer's weight and bias.
  int64_t out_weight_offset() const { return kind == HeadKind::Linear ? 0 : hidden * in_features + hidden; }
  int64_t out_bias_offset() const { return out_weight_offset() + classes * out_in(); }
  /// Width of the input of the final layer (D for linear, H for MLP).
  int64_t out_in() const { return kind == HeadKind::Linear ? in_features : hidden; }
  /// [begin, end) ranges of weight matrices (decayed) and biases (never decayed).
  std::vector<std::pair<int64_t, int64_t>> weight_ranges() const;
  std::vector<std::pair<int64_t, int64_t>> bias_ranges() const;
};

struct LossSpec {
  float label_smoothing = 0.0f;
  const float* class_weights = nullptr;  ///< C weights or null (all ones)
  float weight(int64_t c) const { return class_weights ? class_weights[c] : 1.0f; }
};

/// The loss normaliser of a mini-batch: sum of its rows' class weights (its size without weights).
inline double batch_weight_sum(const LossSpec& loss, const int64_t* labels, const int64_t* idx,
                               int64_t count) {
  if (!loss.class_weights) return static_cast<double>(count);
  double wsum = 0.0;
  for (int64_t r = 0; r < count; ++r) wsum += loss.class_weights[labels[idx[r]]];
  return wsum;
}

/// Dropout for one step: element (sample, unit) is dropped iff hash(seed, sample, unit) < p.
struct DropoutSpec {
  float p = 0.0f;
  uint64_t seed = 0;
};

/// Scratch buffers reused across batches (grown on demand, never inside a parallel region).
struct Workspace {
  std::vector<float> x;        ///< gathered rows, B x D
  std::vector<float> logits;   ///< B x C, overwritten by dL/dlogits
  std::vector<float> e;        ///< B x C exponentials (scratch)
  std::vector<float> hpre;     ///< B x H
  std::vector<float> hact;     ///< B x H
  std::vector<float> dh;       ///< B x H
  std::vector<uint8_t> keep;   ///< B x H dropout keep mask
  std::vector<double> rowloss; ///< per-row losses (summed in a fixed order)
  std::vector<uint8_t> rowok;  ///< per-row correctness
  std::vector<float> tgrad;    ///< per-thread gradient accumulators (fused kernel)
  std::vector<float> rowbuf;   ///< per-thread converted rows (fused kernel)
  std::vector<double> tloss;   ///< per-thread loss sums
  std::vector<int64_t> tcorrect;
  std::vector<uint8_t> tflag;     ///< per-thread non-finite flags (fused kernel)
  std::vector<uint8_t> tflag_ce;  ///< per-thread non-finite flags (softmax block)
};

/// Which implementation computes the linear head's loss and gradient.
enum class KernelChoice : int { Auto = 0, Blas = 1, Fused = 2 };

/// True when the fused row kernel (each row read once for forward and backward) should be used.
bool use_fused_kernel(const HeadSpec& spec, KernelChoice choice);

struct BatchResult {
  double loss_sum = 0.0;  ///< sum of weighted per-row losses times inv_denom
  int64_t correct = 0;
  /// Some row's first-layer pre-activations were NaN or infinite: either the features hold a
  /// non-finite value (the caller then scans them and raises) or the weights have diverged.
  /// Checking C (or H) values per row replaces a separate pass over all D features.
  bool nonfinite = false;
  /// The SliceUpdate passed to loss_grad has been applied to every parameter.
  bool updated = false;
};

/// Called with [lo, hi) of the parameter vector once that slice of the gradient is final (an
/// optimizer step, say). Lets the fused kernel update parameters inside its own parallel region
/// instead of a separate serial pass. Must not throw.
using SliceUpdate = std::function<void(int64_t lo, int64_t hi)>;

/// Loss and gradient over rows of X: idx[0..count) when idx is non-null, else [start, start+count).
/// grad (num_params floats) is overwritten, or accumulated into when `accumulate` is true.
/// Labels are looked up as labels[row].
BatchResult loss_grad(const HeadSpec& spec, const float* params, const Matrix& X,
                      const int64_t* idx, int64_t start, int64_t count, const int64_t* labels,
                      const LossSpec& loss, double inv_denom, const DropoutSpec& dropout,
                      float* grad, bool accumulate, KernelChoice kernel, Workspace& ws,
                      int n_threads, const SliceUpdate* update = nullptr);

/// Logits for rows [start, start+count) of X into out (count x C, row-major). Returns true when
/// some row's first-layer pre-activations are non-finite (see BatchResult::nonfinite).
bool forward_logits(const HeadSpec& spec, const float* params, const Matrix& X, int64_t start,
                    int64_t count, float* out, Workspace& ws, int n_threads);

/// Softmax cross-entropy of rows [0, rows) of a contiguous logits block z (rows x C, bias already
/// added): z is replaced by dL/dz * inv_denom, e (rows x C) is scratch, per-row weighted losses and
/// correctness go to rowloss / rowok. Row r's label is labels[idx[r]] (or labels[start + r]).
void ce_block_grad(float* __restrict z, float* __restrict e, int64_t rows, int64_t C,
                   const int64_t* labels, const int64_t* idx, int64_t start, const LossSpec& loss,
                   float inv_denom, double* rowloss, uint8_t* rowok);

/// Weighted loss of one row without the gradient (for evaluation).
double ce_row_loss(const float* z, int64_t C, int64_t y, const LossSpec& loss, bool* correct);

}  // namespace pyft
