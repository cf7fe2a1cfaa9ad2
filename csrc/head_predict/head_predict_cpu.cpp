#include <algorithm>
#include <cmath>
#include <vector>

#include "common/head_checks.h"
#include "common/parallel.h"
#include "head_predict/head_predict.h"

namespace pyft {
namespace cpu {

void head_predict(const HeadSpec& spec, const float* params, const Matrix& X, PredictOutput what,
                  float* out, int64_t* out_labels, int n_threads) {
  const int nt = resolve_threads(n_threads);
  const int64_t C = spec.classes;
  const int64_t chunk = 2048;
  Workspace ws;
  bool verified = false;
  std::vector<float> tmp;
  if (what == PredictOutput::Labels) tmp.resize(static_cast<size_t>(std::min(chunk, X.rows)) * C);
  for (int64_t s = 0; s < X.rows; s += chunk) {
    const int64_t n = std::min(chunk, X.rows - s);
    float* z = what == PredictOutput::Labels ? tmp.data() : out + s * C;
    if (forward_logits(spec, params, X, s, n, z, ws, nt) && !verified) {
      verify_finite(X, "features", nt);
      verified = true;  // finite features: the weights themselves produce NaN/inf
    }
    if (what == PredictOutput::Proba) {
      for (int64_t r = 0; r < n; ++r) {
        float* zr = z + r * C;
        const float mx = *std::max_element(zr, zr + C);
        double se = 0.0;
        for (int64_t c = 0; c < C; ++c) se += std::exp(static_cast<double>(zr[c] - mx));
        const double lse = mx + std::log(se);
        for (int64_t c = 0; c < C; ++c) zr[c] = static_cast<float>(std::exp(zr[c] - lse));
      }
    } else if (what == PredictOutput::Labels) {
      for (int64_t r = 0; r < n; ++r) {
        const float* zr = z + r * C;
        out_labels[s + r] = std::max_element(zr, zr + C) - zr;  // first maximum, like argmax
      }
    }
  }
}

}  // namespace cpu
}  // namespace pyft
