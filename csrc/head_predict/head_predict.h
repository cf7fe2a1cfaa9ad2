// Batched inference of a trained head: logits, probabilities or labels.
#pragma once

#include <cstdint>

#include "common/convert.h"
#include "common/head_math.h"

namespace pyft {

enum class PredictOutput : int { Logits = 0, Proba = 1, Labels = 2 };

/// out: (X.rows x C) float32 for Logits/Proba; X.rows int64 for Labels (written via out_labels).
void head_predict(const HeadSpec& spec, const float* params, const Matrix& X, PredictOutput what,
                  float* out, int64_t* out_labels, int n_threads);

namespace cpu {
void head_predict(const HeadSpec& spec, const float* params, const Matrix& X, PredictOutput what,
                  float* out, int64_t* out_labels, int n_threads);
}

}  // namespace pyft
