// Validation and dispatch for head inference.
#include "head_predict/head_predict.h"

#include "common/check.h"
#include "common/head_checks.h"

namespace pyft {

void head_predict(const HeadSpec& spec, const float* params, const Matrix& X, PredictOutput what,
                  float* out, int64_t* out_labels, int n_threads) {
  check_spec(spec);
  PYFT_CHECK(params != nullptr, "params is missing");
  check_features(X, spec, "features", n_threads);
  PYFT_CHECK(what == PredictOutput::Labels ? out_labels != nullptr : out != nullptr,
             "output buffer is missing");
  cpu::head_predict(spec, params, X, what, out, out_labels, n_threads);
}

}  // namespace pyft
