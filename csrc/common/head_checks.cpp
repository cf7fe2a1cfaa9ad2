// Input checks shared by the head ops.
#include "common/head_checks.h"

#include <climits>
#include <cmath>
#include <cstdint>

#include "common/check.h"
#include "common/device.h"
#include "common/parallel.h"

namespace pyft {

void check_spec(const HeadSpec& spec) {
  PYFT_CHECK(spec.in_features >= 1, "features must have at least 1 column; got %lld",
             (long long)spec.in_features);
  PYFT_CHECK(spec.classes >= 2, "num_classes must be >= 2; got %lld", (long long)spec.classes);
  if (spec.kind == HeadKind::MLP)
    PYFT_CHECK(spec.hidden >= 1, "hidden_size must be >= 1 for the MLP head; got %lld",
               (long long)spec.hidden);
}

void check_features(const Matrix& X, const HeadSpec& spec, const char* name, int n_threads) {
  PYFT_CHECK(X.data != nullptr || X.rows == 0, "%s has no data", name);
  PYFT_CHECK(X.rows >= 1, "%s must have at least 1 row; got an empty array of shape (%lld, %lld)",
             name, (long long)X.rows, (long long)X.cols);
  PYFT_CHECK(X.cols == spec.in_features, "%s must have %lld columns (in_features); got %lld",
             name, (long long)spec.in_features, (long long)X.cols);
  // Finiteness is checked lazily (verify_finite) when a kernel sees non-finite pre-activations,
  // so valid data is read once per epoch and never by an extra validation pass.
}

void verify_finite(const Matrix& X, const char* name, int n_threads) {
  int64_t bad_row = -1, bad_col = -1;
  PYFT_CHECK(all_finite(X, resolve_threads(n_threads), &bad_row, &bad_col),
             "%s must be finite; found NaN or infinity at row %lld, column %lld", name,
             (long long)bad_row, (long long)bad_col);
}

void check_labels(const int64_t* labels, int64_t n, int64_t classes, const char* name) {
  PYFT_CHECK(labels != nullptr, "%s is missing", name);
  for (int64_t i = 0; i < n; ++i)
    PYFT_CHECK(labels[i] >= 0 && labels[i] < classes, "%s must be in [0, %lld); got %lld at index %lld",
               name, (long long)classes, (long long)labels[i], (long long)i);
}

void check_loss(const LossSpec& loss, int64_t classes) {
  PYFT_CHECK(loss.label_smoothing >= 0.0f && loss.label_smoothing < 1.0f,
             "label_smoothing must be in [0, 1); got %g", (double)loss.label_smoothing);
  if (loss.class_weights) {
    double total = 0.0;
    for (int64_t c = 0; c < classes; ++c) {
      const float w = loss.class_weights[c];
      PYFT_CHECK(std::isfinite(w) && w >= 0.0f,
                 "class_weights must be finite and >= 0; got %g for class %lld", (double)w,
                 (long long)c);
      total += w;
    }
    PYFT_CHECK(total > 0.0, "class_weights must not all be zero");
  }
}

void check_class_weights_present(const LossSpec& loss, const int64_t* labels, int64_t n) {
  if (!loss.class_weights) return;
  // Every mini-batch needs a positive normaliser sum_i w_{y_i}.
  for (int64_t i = 0; i < n; ++i)
    PYFT_CHECK(loss.class_weights[labels[i]] > 0.0f,
               "class_weights must be > 0 for every class present in labels; class %lld has "
               "weight 0",
               (long long)labels[i]);
}

void check_rows(const int64_t* rows, int64_t count, int64_t n, const char* name) {
  PYFT_CHECK(count >= 1, "%s must select at least 1 row; got %lld", name, (long long)count);
  for (int64_t i = 0; i < count; ++i)
    PYFT_CHECK(rows[i] >= 0 && rows[i] < n, "%s must be in [0, %lld); got %lld at index %lld",
               name, (long long)n, (long long)rows[i], (long long)i);
}

void check_cuda_features(const Matrix& X, const Matrix* val_X, int64_t out_rows) {
  require_cuda_device(X.device, "training on CUDA features");
  auto one = [&](const Matrix& M, const char* name) {
    PYFT_CHECK(M.device == X.device,
               "%s must be on the device of features (cuda:%d); got %s%d", name, X.device,
               M.device == kHost ? "host memory, device " : "cuda:", M.device);
    const int64_t item = dtype_size(M.dtype);
    PYFT_CHECK(M.contiguous_rows(),
               "%s on a CUDA device must have contiguous rows (column stride %lld bytes); got a "
               "column stride of %lld bytes: pass %s.contiguous()",
               name, (long long)item, (long long)M.col_stride, name);
    PYFT_CHECK(M.row_stride % item == 0 && reinterpret_cast<uintptr_t>(M.data) % item == 0,
               "%s on a CUDA device must be aligned to its %lld-byte elements", name,
               (long long)item);
  };
  one(X, "features");
  if (val_X) {
    one(*val_X, "val_features");
    PYFT_CHECK(val_X->dtype == X.dtype,
               "val_features must have the dtype of features (%s) on a CUDA device; got %s",
               dtype_name(X.dtype), dtype_name(val_X->dtype));
  }
  PYFT_CHECK(X.cols <= INT_MAX && out_rows <= INT_MAX,
             "features with %lld columns and %lld output rows exceed cuBLAS's 32-bit sizes",
             (long long)X.cols, (long long)out_rows);
}

}  // namespace pyft
