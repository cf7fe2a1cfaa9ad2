// Input checks shared by the head ops (train, grid, L-BFGS, predict): each throws
// std::invalid_argument naming the argument, what it must be and what it got.
#pragma once

#include <cstdint>

#include "common/convert.h"
#include "common/head_math.h"

namespace pyft {

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
/// rows[0..count) must be a non-empty list of indices into n rows.
void check_rows(const int64_t* rows, int64_t count, int64_t n, const char* name);

/// Checks shared by the CUDA trainers: the device exists, the feature matrices live on it with
/// contiguous, element-aligned rows, and the sizes fit cuBLAS's int dimensions.
void check_cuda_features(const Matrix& X, const Matrix* val_X, int64_t out_rows);

}  // namespace pyft
