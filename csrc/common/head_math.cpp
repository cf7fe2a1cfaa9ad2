#include "common/head_math.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "common/blas.h"
#include "common/parallel.h"
#include "common/rng.h"
#include "common/simd.h"

#ifndef PYFT_PF_DIST
#define PYFT_PF_DIST 8
#endif
#ifndef PYFT_PF_BYTES
#define PYFT_PF_BYTES (1 << 20)
#endif

namespace pyft {

int64_t HeadSpec::num_params() const {
  if (kind == HeadKind::Linear) return classes * in_features + classes;
  return hidden * in_features + hidden + classes * hidden + classes;
}

std::vector<std::pair<int64_t, int64_t>> HeadSpec::weight_ranges() const {
  if (kind == HeadKind::Linear) return {{0, classes * in_features}};
  const int64_t w2 = hidden * in_features + hidden;
  return {{0, hidden * in_features}, {w2, w2 + classes * hidden}};
}

std::vector<std::pair<int64_t, int64_t>> HeadSpec::bias_ranges() const {
  if (kind == HeadKind::Linear) return {{classes * in_features, classes * in_features + classes}};
  const int64_t b1 = hidden * in_features;
  const int64_t b2 = b1 + hidden + classes * hidden;
  return {{b1, b1 + hidden}, {b2, b2 + classes}};
}

bool use_fused_kernel(const HeadSpec& spec, KernelChoice choice) {
  if (spec.kind != HeadKind::Linear) return false;
  if (choice == KernelChoice::Fused) return true;
  if (choice == KernelChoice::Blas) return false;
  // Measured on a 2-core AVX2 machine (bench/bench_head_training.py --kernels): reading each row
  // once for forward and backward (four rows per pass over W and the gradient) beats gather +
  // two GEMMs while C is too small to fill the GEMM micro-kernel: 2x at C=2, 1.2x at C=10;
  // from C=16 on, W and the gradient (2 x C x D floats) outgrow L1 and OpenBLAS wins.
  return spec.classes <= 12;
}

// ---------------------------------------------------------------------------------------------
// Row-level kernels

namespace {

// out[c] = w[c] . x + bias[c] for c < rows. Eight (then four, then one) classes at a time so that
// independent FMA chains hide the FMA latency and each load of x feeds several classes.
PYFT_MULTIVERSION
void dot_rows(const float* __restrict w, int64_t rows, int64_t d, const float* __restrict x,
              const float* __restrict bias, float* __restrict out) {
  int64_t c = 0;
  for (; c + 8 <= rows; c += 8) {
    const float *w0 = w + c * d, *w1 = w0 + d, *w2 = w1 + d, *w3 = w2 + d;
    const float *w4 = w3 + d, *w5 = w4 + d, *w6 = w5 + d, *w7 = w6 + d;
    float s0 = 0, s1 = 0, s2 = 0, s3 = 0, s4 = 0, s5 = 0, s6 = 0, s7 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3, s4, s5, s6, s7)
    for (int64_t j = 0; j < d; ++j) {
      const float xj = x[j];
      s0 += w0[j] * xj; s1 += w1[j] * xj; s2 += w2[j] * xj; s3 += w3[j] * xj;
      s4 += w4[j] * xj; s5 += w5[j] * xj; s6 += w6[j] * xj; s7 += w7[j] * xj;
    }
    out[c] = s0 + bias[c]; out[c + 1] = s1 + bias[c + 1];
    out[c + 2] = s2 + bias[c + 2]; out[c + 3] = s3 + bias[c + 3];
    out[c + 4] = s4 + bias[c + 4]; out[c + 5] = s5 + bias[c + 5];
    out[c + 6] = s6 + bias[c + 6]; out[c + 7] = s7 + bias[c + 7];
  }
  for (; c + 4 <= rows; c += 4) {
    const float *w0 = w + c * d, *w1 = w0 + d, *w2 = w1 + d, *w3 = w2 + d;
    float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
    for (int64_t j = 0; j < d; ++j) {
      const float xj = x[j];
      s0 += w0[j] * xj; s1 += w1[j] * xj; s2 += w2[j] * xj; s3 += w3[j] * xj;
    }
    out[c] = s0 + bias[c]; out[c + 1] = s1 + bias[c + 1];
    out[c + 2] = s2 + bias[c + 2]; out[c + 3] = s3 + bias[c + 3];
  }
  for (; c < rows; ++c) {
    const float* wc = w + c * d;
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t j = 0; j < d; ++j) s += wc[j] * x[j];
    out[c] = s + bias[c];
  }
}

// Logits of two rows at once: every load of W feeds both rows, and 4 classes x 2 rows give eight
// independent FMA chains.
PYFT_MULTIVERSION
void dot_rows_pair(const float* __restrict w, int64_t rows, int64_t d, const float* __restrict x0,
                   const float* __restrict x1, const float* __restrict bias, float* __restrict z0,
                   float* __restrict z1) {
  int64_t c = 0;
  for (; c + 4 <= rows; c += 4) {
    const float *w0 = w + c * d, *w1 = w0 + d, *w2 = w1 + d, *w3 = w2 + d;
    float a0 = 0, a1 = 0, a2 = 0, a3 = 0, b0 = 0, b1 = 0, b2 = 0, b3 = 0;
#pragma omp simd reduction(+ : a0, a1, a2, a3, b0, b1, b2, b3)
    for (int64_t j = 0; j < d; ++j) {
      const float u = x0[j], v = x1[j];
      a0 += w0[j] * u; b0 += w0[j] * v;
      a1 += w1[j] * u; b1 += w1[j] * v;
      a2 += w2[j] * u; b2 += w2[j] * v;
      a3 += w3[j] * u; b3 += w3[j] * v;
    }
    z0[c] = a0 + bias[c]; z0[c + 1] = a1 + bias[c + 1];
    z0[c + 2] = a2 + bias[c + 2]; z0[c + 3] = a3 + bias[c + 3];
    z1[c] = b0 + bias[c]; z1[c + 1] = b1 + bias[c + 1];
    z1[c + 2] = b2 + bias[c + 2]; z1[c + 3] = b3 + bias[c + 3];
  }
  for (; c + 2 <= rows; c += 2) {
    const float *w0 = w + c * d, *w1 = w0 + d;
    float a0 = 0, a1 = 0, b0 = 0, b1 = 0;
#pragma omp simd reduction(+ : a0, a1, b0, b1)
    for (int64_t j = 0; j < d; ++j) {
      const float u = x0[j], v = x1[j];
      a0 += w0[j] * u; b0 += w0[j] * v;
      a1 += w1[j] * u; b1 += w1[j] * v;
    }
    z0[c] = a0 + bias[c]; z0[c + 1] = a1 + bias[c + 1];
    z1[c] = b0 + bias[c]; z1[c + 1] = b1 + bias[c + 1];
  }
  for (; c < rows; ++c) {
    const float* w0 = w + c * d;
    float a0 = 0, b0 = 0;
#pragma omp simd reduction(+ : a0, b0)
    for (int64_t j = 0; j < d; ++j) {
      a0 += w0[j] * x0[j];
      b0 += w0[j] * x1[j];
    }
    z0[c] = a0 + bias[c];
    z1[c] = b0 + bias[c];
  }
}

// Eight rows per pass over W and the gradient: explicit 8-lane vectors (GCC vector extensions,
// lowered to AVX2 in the x86-64-v3 clone and to SSE pairs in the baseline one) so that the eight
// per-row accumulators and coefficients stay in registers.
typedef float v8f __attribute__((vector_size(32), aligned(4), may_alias));

inline float hsum8(v8f v) {
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

PYFT_MULTIVERSION
void dot_rows_oct(const float* __restrict w, int64_t rows, int64_t d,
                  const float* const* __restrict xs, const float* __restrict bias,
                  float* __restrict z /* 8 x rows */) {
  const int64_t d8 = d & ~int64_t(7);
  for (int64_t c = 0; c < rows; ++c) {
    const float* wc = w + c * d;
    v8f acc[8] = {};
    for (int64_t j = 0; j < d8; j += 8) {
      const v8f wv = *reinterpret_cast<const v8f*>(wc + j);
      for (int r = 0; r < 8; ++r) acc[r] += wv * *reinterpret_cast<const v8f*>(xs[r] + j);
    }
    for (int r = 0; r < 8; ++r) {
      float t = hsum8(acc[r]);
      for (int64_t j = d8; j < d; ++j) t += wc[j] * xs[r][j];
      z[r * rows + c] = t + bias[c];
    }
  }
}

PYFT_MULTIVERSION
void axpy_rows8(float* __restrict g, int64_t rows, int64_t d, const float* __restrict coef,
                const float* const* __restrict xs) {
  const int64_t d8 = d & ~int64_t(7);
  for (int64_t c = 0; c < rows; ++c) {
    float* gc = g + c * d;
    float a[8];
    v8f av[8];
    for (int r = 0; r < 8; ++r) {
      a[r] = coef[r * rows + c];
      av[r] = v8f{} + a[r];
    }
    for (int64_t j = 0; j < d8; j += 8) {
      v8f t = *reinterpret_cast<v8f*>(gc + j);
      for (int r = 0; r < 8; ++r) t += av[r] * *reinterpret_cast<const v8f*>(xs[r] + j);
      *reinterpret_cast<v8f*>(gc + j) = t;
    }
    for (int64_t j = d8; j < d; ++j) {
      float t = gc[j];
      for (int r = 0; r < 8; ++r) t += a[r] * xs[r][j];
      gc[j] = t;
    }
  }
}

// Logits of four rows at once: two classes x four rows = eight FMA chains; every W load feeds
// four rows and every x load two classes.
PYFT_MULTIVERSION
void dot_rows_quad(const float* __restrict w, int64_t rows, int64_t d,
                   const float* const* __restrict xs, const float* __restrict bias,
                   float* __restrict z /* 4 x rows */) {
  const float* __restrict x0 = xs[0];
  const float* __restrict x1 = xs[1];
  const float* __restrict x2 = xs[2];
  const float* __restrict x3 = xs[3];
  int64_t c = 0;
  for (; c + 2 <= rows; c += 2) {
    const float *wa = w + c * d, *wb = wa + d;
    float a0 = 0, a1 = 0, a2 = 0, a3 = 0, b0 = 0, b1 = 0, b2 = 0, b3 = 0;
#pragma omp simd reduction(+ : a0, a1, a2, a3, b0, b1, b2, b3)
    for (int64_t j = 0; j < d; ++j) {
      const float u = wa[j], v = wb[j];
      a0 += u * x0[j]; a1 += u * x1[j]; a2 += u * x2[j]; a3 += u * x3[j];
      b0 += v * x0[j]; b1 += v * x1[j]; b2 += v * x2[j]; b3 += v * x3[j];
    }
    z[c] = a0 + bias[c]; z[rows + c] = a1 + bias[c];
    z[2 * rows + c] = a2 + bias[c]; z[3 * rows + c] = a3 + bias[c];
    z[c + 1] = b0 + bias[c + 1]; z[rows + c + 1] = b1 + bias[c + 1];
    z[2 * rows + c + 1] = b2 + bias[c + 1]; z[3 * rows + c + 1] = b3 + bias[c + 1];
  }
  for (; c < rows; ++c) {
    const float* wa = w + c * d;
    float a0 = 0, a1 = 0, a2 = 0, a3 = 0;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
    for (int64_t j = 0; j < d; ++j) {
      const float u = wa[j];
      a0 += u * x0[j]; a1 += u * x1[j]; a2 += u * x2[j]; a3 += u * x3[j];
    }
    z[c] = a0 + bias[c]; z[rows + c] = a1 + bias[c];
    z[2 * rows + c] = a2 + bias[c]; z[3 * rows + c] = a3 + bias[c];
  }
}

// g[c] += sum_r coef[r * rows + c] * x_r for four rows: one load/store of g per four FMAs.
PYFT_MULTIVERSION
void axpy_rows4(float* __restrict g, int64_t rows, int64_t d, const float* __restrict coef,
                const float* const* __restrict xs) {
  const float* __restrict x0 = xs[0];
  const float* __restrict x1 = xs[1];
  const float* __restrict x2 = xs[2];
  const float* __restrict x3 = xs[3];
  int64_t c = 0;
  // Two classes per pass: each x load feeds two gradient rows (6 loads per 8 FMAs, not 10).
  for (; c + 2 <= rows; c += 2) {
    float* __restrict ga = g + c * d;
    float* __restrict gb = ga + d;
    const float a0 = coef[c], a1 = coef[rows + c], a2 = coef[2 * rows + c], a3 = coef[3 * rows + c];
    const float b0 = coef[c + 1], b1 = coef[rows + c + 1], b2 = coef[2 * rows + c + 1],
                b3 = coef[3 * rows + c + 1];
    for (int64_t j = 0; j < d; ++j) {
      const float u0 = x0[j], u1 = x1[j], u2 = x2[j], u3 = x3[j];
      // Written as FMA chains on g (not a sum of products) so each term is one FMA.
      float ta = ga[j], tb = gb[j];
      ta += a0 * u0; tb += b0 * u0;
      ta += a1 * u1; tb += b1 * u1;
      ta += a2 * u2; tb += b2 * u2;
      ta += a3 * u3; tb += b3 * u3;
      ga[j] = ta;
      gb[j] = tb;
    }
  }
  for (; c < rows; ++c) {
    float* gc = g + c * d;
    const float a0 = coef[c], a1 = coef[rows + c], a2 = coef[2 * rows + c], a3 = coef[3 * rows + c];
    for (int64_t j = 0; j < d; ++j) {
      float t = gc[j];
      t += a0 * x0[j];
      t += a1 * x1[j];
      t += a2 * x2[j];
      t += a3 * x3[j];
      gc[j] = t;
    }
  }
}

// g[c] += coef0[c] * x0 + coef1[c] * x1: two rows per pass halve the gradient's load/store traffic.
PYFT_MULTIVERSION
void axpy_rows2(float* __restrict g, int64_t rows, int64_t d, const float* __restrict coef0,
                const float* __restrict x0, const float* __restrict coef1,
                const float* __restrict x1) {
  for (int64_t c = 0; c < rows; ++c) {
    float* gc = g + c * d;
    const float a0 = coef0[c], a1 = coef1[c];
    for (int64_t j = 0; j < d; ++j) gc[j] += a0 * x0[j] + a1 * x1[j];
  }
}

PYFT_MULTIVERSION
void axpy_rows(float* __restrict g, int64_t rows, int64_t d, const float* __restrict coef,
               const float* __restrict x) {
  for (int64_t c = 0; c < rows; ++c) {
    float* gc = g + c * d;
    const float a = coef[c];
    for (int64_t j = 0; j < d; ++j) gc[j] += a * x[j];
  }
}

// exp(x) for a block, vectorizable (Cephes expf: range reduction by ln 2 and a degree-6
// polynomial, within 2 ulp of std::exp on [-87, 88]); libm's expf does not vectorize without
// -ffast-math. Inputs below -87 give a tiny positive value, as softmax needs.
PYFT_MULTIVERSION
void exp_block(const float* __restrict x, float* __restrict out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    float v = x[i];
    v = v < -87.0f ? -87.0f : (v > 88.0f ? 88.0f : v);
    const float fx = v * 1.44269504088896341f + 0.5f;
    int32_t k = static_cast<int32_t>(fx);
    k -= (static_cast<float>(k) > fx) ? 1 : 0;  // floor
    const float kf = static_cast<float>(k);
    float r = v - kf * 0.693359375f;
    r = r + kf * 2.12194440e-4f;
    const float r2 = r * r;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r2 + r + 1.0f;
    uint32_t bits = static_cast<uint32_t>(k + 127) << 23;
    float scale;
    std::memcpy(&scale, &bits, 4);
    out[i] = p * scale;
  }
}

inline float gelu(float x) { return 0.5f * x * (1.0f + std::erf(x * 0.70710678118654752f)); }
inline float gelu_grad(float x) {
  const float cdf = 0.5f * (1.0f + std::erf(x * 0.70710678118654752f));
  const float pdf = 0.39894228040143268f * std::exp(-0.5f * x * x);
  return cdf + x * pdf;
}

void add_bias_rows(float* out, int64_t rows, int64_t cols, const float* bias) {
  for (int64_t r = 0; r < rows; ++r) {
    float* o = out + r * cols;
    for (int64_t c = 0; c < cols; ++c) o[c] += bias[c];
  }
}

/// Column sums of a (rows x cols) block, accumulated in a fixed order.
void colsum(const float* a, int64_t rows, int64_t cols, float* out, bool accumulate) {
  if (!accumulate) std::fill(out, out + cols, 0.0f);
  for (int64_t r = 0; r < rows; ++r) {
    const float* ar = a + r * cols;
    for (int64_t c = 0; c < cols; ++c) out[c] += ar[c];
  }
}

inline void prefetch_row(const Matrix& X, int64_t i, int64_t max_bytes) {
  if (!X.contiguous_rows()) return;
  const char* p = X.row_ptr(i);
  const int64_t bytes = std::min(max_bytes, X.cols * dtype_size(X.dtype));
  for (int64_t k = 0; k < bytes; k += 64) __builtin_prefetch(p + k);
}

/// True when all n values are finite (x * 0 is NaN exactly for NaN and infinities).
inline bool finite_span(const float* x, int64_t n) {
  float acc = 0.0f;
  for (int64_t i = 0; i < n; ++i) acc += x[i] * 0.0f;
  return acc == 0.0f;
}

template <typename T>
void grow(std::vector<T>& v, size_t n) {
  if (v.size() < n) v.resize(n);
}

}  // namespace

double ce_row_loss(const float* z, int64_t C, int64_t y, const LossSpec& loss, bool* correct) {
  float mx = z[0];
  int64_t arg = 0;
  for (int64_t c = 1; c < C; ++c)
    if (z[c] > mx) {
      mx = z[c];
      arg = c;
    }
  double se = 0.0;
  for (int64_t c = 0; c < C; ++c) se += std::exp(static_cast<double>(z[c] - mx));
  const double lse = mx + std::log(se);
  const double eps = loss.label_smoothing;
  double l = (1.0 - eps) * loss.weight(y) * (lse - z[y]);
  if (eps > 0) {
    double s = 0.0;
    for (int64_t c = 0; c < C; ++c) s += loss.weight(c) * (lse - z[c]);
    l += eps / C * s;
  }
  *correct = (arg == y);
  return l;
}

double ce_row_grad(float* z, int64_t C, int64_t y, const LossSpec& loss, float inv_denom,
                   bool* correct) {
  float mx = z[0];
  int64_t arg = 0;
  for (int64_t c = 1; c < C; ++c)
    if (z[c] > mx) {
      mx = z[c];
      arg = c;
    }
  float se = 0.0f;
  for (int64_t c = 0; c < C; ++c) {
    const float e = std::exp(z[c] - mx);
    se += e;
  }
  const float lse = mx + std::log(se);
  const float eps = loss.label_smoothing;
  const float wy = loss.weight(y);
  double l = (1.0 - eps) * wy * static_cast<double>(lse - z[y]);
  if (eps > 0.0f) {
    double s = 0.0;
    float wsum = 0.0f;
    for (int64_t c = 0; c < C; ++c) {
      s += loss.weight(c) * static_cast<double>(lse - z[c]);
      wsum += loss.weight(c);
    }
    l += eps / C * s;
    // dL/dz_c = (A p_c - a_c), a_c = (1-eps) w_y [c==y] + eps/C w_c, A = sum_c a_c
    const float A = (1.0f - eps) * wy + eps / C * wsum;
    for (int64_t c = 0; c < C; ++c) {
      const float p = std::exp(z[c] - lse);
      const float a = eps / C * loss.weight(c) + (c == y ? (1.0f - eps) * wy : 0.0f);
      z[c] = (A * p - a) * inv_denom;
    }
  } else {
    for (int64_t c = 0; c < C; ++c) {
      const float p = std::exp(z[c] - lse);
      z[c] = wy * (p - (c == y ? 1.0f : 0.0f)) * inv_denom;
    }
  }
  *correct = (arg == y);
  return l;
}

namespace {

/// Softmax cross-entropy for rows [0, rows) of a logits block (bias already added): z is replaced
/// by dL/dz * inv_denom, e (rows*C) is scratch, per-row losses/correctness go to rowloss/rowok.
void ce_block_grad(float* __restrict z, float* __restrict e, int64_t rows, int64_t C,
                   const int64_t* labels, const int64_t* idx, int64_t start, const LossSpec& loss,
                   float inv_denom, double* rowloss, uint8_t* rowok) {
  for (int64_t r = 0; r < rows; ++r) {
    float* zr = z + r * C;
    float mx = zr[0];
    int64_t arg = 0;
    for (int64_t c = 1; c < C; ++c)
      if (zr[c] > mx) {
        mx = zr[c];
        arg = c;
      }
    const int64_t y = labels[idx ? idx[r] : start + r];
    rowok[r] = (arg == y);
    for (int64_t c = 0; c < C; ++c) zr[c] -= mx;
  }
  exp_block(z, e, rows * C);
  const float eps = loss.label_smoothing;
  float wsum = 0.0f;
  if (eps > 0.0f)
    for (int64_t c = 0; c < C; ++c) wsum += loss.weight(c);
  for (int64_t r = 0; r < rows; ++r) {
    float* zr = z + r * C;
    const float* er = e + r * C;
    float se = 0.0f;
    for (int64_t c = 0; c < C; ++c) se += er[c];
    const float lse = std::log(se);  // of the shifted logits
    const int64_t y = labels[idx ? idx[r] : start + r];
    const float wy = loss.weight(y);
    double l = (1.0 - eps) * wy * static_cast<double>(lse - zr[y]);
    const float inv_se = 1.0f / se;
    if (eps > 0.0f) {
      double s = 0.0;
      for (int64_t c = 0; c < C; ++c) s += loss.weight(c) * static_cast<double>(lse - zr[c]);
      l += eps / C * s;
      const float A = (1.0f - eps) * wy + eps / C * wsum;
      for (int64_t c = 0; c < C; ++c) {
        const float a = eps / C * loss.weight(c) + (c == y ? (1.0f - eps) * wy : 0.0f);
        zr[c] = (A * (er[c] * inv_se) - a) * inv_denom;
      }
    } else {
      const float scale = wy * inv_denom;
      for (int64_t c = 0; c < C; ++c) zr[c] = scale * (er[c] * inv_se);
      zr[y] -= scale;
    }
    rowloss[r] = l;
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Fused linear kernel: each row is read once, for the logits and for the gradient.

namespace {

BatchResult fused_linear(const HeadSpec& spec, const float* params, const Matrix& X,
                         const int64_t* idx, int64_t start, int64_t count, const int64_t* labels,
                         const LossSpec& loss, double inv_denom, float* grad, bool accumulate,
                         Workspace& ws, int n_threads, const SliceUpdate* update) {
  const int64_t C = spec.classes, D = spec.in_features;
  const float* W = params;
  const float* b = params + C * D;
  const int64_t G = C * D + C;
  const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(n_threads, count / 8)));
  grow(ws.tgrad, static_cast<size_t>(nt) * G);
  const int64_t per_thread = 8 * D + 8 * C + 8 * C;
  grow(ws.rowbuf, static_cast<size_t>(nt) * per_thread);
  grow(ws.tloss, nt);
  grow(ws.tcorrect, nt);
  grow(ws.tflag, nt);
  const float invd = static_cast<float>(inv_denom);
#if defined(PYFT_WITH_OPENMP)
#pragma omp parallel num_threads(nt)
#endif
  {
    const int t = thread_id();
    int64_t lo, hi;
    partition(count, nt, t, &lo, &hi);
    bool nonfinite = false;
    float* tg = ws.tgrad.data() + static_cast<size_t>(t) * G;
    float* bufs = ws.rowbuf.data() + static_cast<size_t>(t) * per_thread;  // 8 x D
    float* buf0 = bufs;
    float* buf1 = bufs + D;
    float* z0 = bufs + 8 * D;  // 8 x C logits block for the vectorized softmax
    float* z1 = z0 + C;
    float* e2 = z0 + 8 * C;
    double pair_loss[8];
    uint8_t pair_ok[8];
    float* tb = tg + C * D;
    std::memset(tg, 0, sizeof(float) * G);
    double lsum = 0.0;
    int64_t ok = 0;
    // Shuffled rows defeat the hardware prefetcher. Touch the head of rows PF_DIST ahead so
    // that their first misses overlap with this pair's work and the L2 streamer takes over.
    const int64_t PF_DIST = PYFT_PF_DIST, PF_BYTES = PYFT_PF_BYTES;
    for (int64_t q = lo; q < std::min(hi, lo + PF_DIST); ++q)
      prefetch_row(X, idx ? idx[q] : start + q, PF_BYTES);
    int64_t r = lo;
    // Eight rows at a time (W and the gradient are read once per eight rows), then 4, 2, 1.
    for (; r + 8 <= hi; r += 8) {
      for (int64_t q = r + PF_DIST; q < std::min(hi, r + PF_DIST + 8); ++q)
        prefetch_row(X, idx ? idx[q] : start + q, PF_BYTES);
      const float* xs[8];
      for (int k = 0; k < 8; ++k)
        xs[k] = row_as_f32(X, idx ? idx[r + k] : start + r + k, bufs + k * D);
      dot_rows_oct(W, C, D, xs, b, z0);
      nonfinite |= !finite_span(z0, 8 * C);
      ce_block_grad(z0, e2, 8, C, labels, idx ? idx + r : nullptr, start + r, loss, invd,
                    pair_loss, pair_ok);
      for (int k = 0; k < 8; ++k) {
        lsum += pair_loss[k];
        ok += pair_ok[k];
      }
      axpy_rows8(tg, C, D, z0, xs);
      for (int64_t c = 0; c < C; ++c) {
        float sb = 0.0f;
        for (int k = 0; k < 8; ++k) sb += z0[k * C + c];
        tb[c] += sb;
      }
    }
    for (; r + 4 <= hi; r += 4) {
      for (int64_t q = r + PF_DIST; q < std::min(hi, r + PF_DIST + 4); ++q)
        prefetch_row(X, idx ? idx[q] : start + q, PF_BYTES);
      const float* xs[4];
      for (int k = 0; k < 4; ++k)
        xs[k] = row_as_f32(X, idx ? idx[r + k] : start + r + k, bufs + k * D);
      dot_rows_quad(W, C, D, xs, b, z0);
      nonfinite |= !finite_span(z0, 4 * C);
      ce_block_grad(z0, e2, 4, C, labels, idx ? idx + r : nullptr, start + r, loss, invd,
                    pair_loss, pair_ok);
      lsum += (pair_loss[0] + pair_loss[1]) + (pair_loss[2] + pair_loss[3]);
      ok += pair_ok[0] + pair_ok[1] + pair_ok[2] + pair_ok[3];
      axpy_rows4(tg, C, D, z0, xs);
      for (int64_t c = 0; c < C; ++c) tb[c] += (z0[c] + z0[C + c]) + (z0[2 * C + c] + z0[3 * C + c]);
    }
    for (; r < hi; r += 2) {
      const bool pair = r + 1 < hi;
      const int64_t i0 = idx ? idx[r] : start + r;
      const float* x0 = row_as_f32(X, i0, buf0);
      bool correct;
      if (pair) {
        const int64_t i1 = idx ? idx[r + 1] : start + r + 1;
        const float* x1 = row_as_f32(X, i1, buf1);
        dot_rows_pair(W, C, D, x0, x1, b, z0, z1);
        nonfinite |= !finite_span(z0, 2 * C);
        ce_block_grad(z0, e2, 2, C, labels, idx ? idx + r : nullptr, start + r, loss, invd,
                      pair_loss, pair_ok);
        lsum += pair_loss[0] + pair_loss[1];
        ok += pair_ok[0] + pair_ok[1];
        axpy_rows2(tg, C, D, z0, x0, z1, x1);
        for (int64_t c = 0; c < C; ++c) tb[c] += z0[c] + z1[c];
      } else {
        dot_rows(W, C, D, x0, b, z0);
        nonfinite |= !finite_span(z0, C);
        lsum += ce_row_grad(z0, C, labels[i0], loss, invd, &correct);
        ok += correct;
        axpy_rows(tg, C, D, z0, x0);
        for (int64_t c = 0; c < C; ++c) tb[c] += z0[c];
      }
    }
    ws.tloss[t] = lsum;
    ws.tcorrect[t] = ok;
    ws.tflag[t] = nonfinite;
#if defined(PYFT_WITH_OPENMP)
#pragma omp barrier
#endif
    // Each thread reduces its slice of the per-thread gradients, in thread order (deterministic
    // for a fixed thread count), then applies the update to that slice: no serial pass.
    bool any_nonfinite = false;
    for (int u = 0; u < nt; ++u) any_nonfinite |= ws.tflag[u] != 0;
    int64_t plo, phi;
    partition(G, nt, t, &plo, &phi, 16);
    for (int64_t p = plo; p < phi; ++p) {
      float sum = accumulate ? grad[p] : 0.0f;
      for (int u = 0; u < nt; ++u) sum += ws.tgrad[static_cast<size_t>(u) * G + p];
      grad[p] = sum;
    }
    if (update && !any_nonfinite && phi > plo) (*update)(plo, phi);
  }
  BatchResult res;
  for (int t = 0; t < nt; ++t) {
    res.loss_sum += ws.tloss[t];
    res.correct += ws.tcorrect[t];
    res.nonfinite |= ws.tflag[t] != 0;
  }
  res.updated = update != nullptr && !res.nonfinite;
  res.loss_sum *= inv_denom;
  return res;
}

/// Rows [start, start+count) or idx rows of X as a float32 block: zero-copy when X already is one.
const float* rows_block(const Matrix& X, const int64_t* idx, int64_t start, int64_t count,
                        Workspace& ws, int n_threads, int64_t* ld) {
  const int64_t D = X.cols;
  if (!idx && X.rows_are_f32() && X.row_stride >= D * 4 && X.row_stride % 4 == 0) {
    *ld = X.row_stride / 4;
    return reinterpret_cast<const float*>(X.row_ptr(start));
  }
  grow(ws.x, static_cast<size_t>(count) * D);
  gather_rows(X, idx, start, count, ws.x.data(), D, n_threads);
  *ld = D;
  return ws.x.data();
}

/// Hidden layer of the MLP: hpre = x W1^T + b1, hact = act(hpre) (times the dropout mask).
bool mlp_hidden(const HeadSpec& spec, const float* params, const float* x, int64_t ldx,
                int64_t count, const int64_t* idx, int64_t start, const DropoutSpec& dropout,
                Workspace& ws, int n_threads) {
  const int64_t D = spec.in_features, H = spec.hidden;
  const float* W1 = params;
  const float* b1 = params + H * D;
  grow(ws.hpre, static_cast<size_t>(count) * H);
  grow(ws.hact, static_cast<size_t>(count) * H);
  float* hpre = ws.hpre.data();
  float* hact = ws.hact.data();
  gemm(false, true, count, H, D, 1.0f, x, ldx, W1, D, 0.0f, hpre, H, n_threads);
  const bool drop = dropout.p > 0.0f;
  if (drop) grow(ws.keep, static_cast<size_t>(count) * H);
  const float keep_scale = drop ? 1.0f / (1.0f - dropout.p) : 1.0f;
  const bool is_gelu = spec.activation == Activation::GELU;
  grow(ws.rowok, count);
#if defined(PYFT_WITH_OPENMP)
#pragma omp parallel for num_threads(n_threads) schedule(static)
#endif
  for (int64_t r = 0; r < count; ++r) {
    float* pr = hpre + r * H;
    float* ar = hact + r * H;
    for (int64_t j = 0; j < H; ++j) {
      pr[j] += b1[j];
      ar[j] = is_gelu ? gelu(pr[j]) : (pr[j] > 0.0f ? pr[j] : 0.0f);
    }
    ws.rowok[r] = finite_span(pr, H);  // ReLU would hide a NaN: check before the activation
    if (drop) {
      const uint64_t sample = static_cast<uint64_t>(idx ? idx[r] : start + r);
      const uint64_t hs = hash_combine(dropout.seed, sample);
      uint8_t* kr = ws.keep.data() + r * H;
      for (int64_t j = 0; j < H; ++j) {
        const bool keep = uniform01(hash_combine(hs, static_cast<uint64_t>(j))) >= dropout.p;
        kr[j] = keep;
        ar[j] = keep ? ar[j] * keep_scale : 0.0f;
      }
    }
  }
  for (int64_t r = 0; r < count; ++r)
    if (!ws.rowok[r]) return true;
  return false;
}

}  // namespace

BatchResult loss_grad(const HeadSpec& spec, const float* params, const Matrix& X,
                      const int64_t* idx, int64_t start, int64_t count, const int64_t* labels,
                      const LossSpec& loss, double inv_denom, const DropoutSpec& dropout,
                      float* grad, bool accumulate, KernelChoice kernel, Workspace& ws,
                      int n_threads, const SliceUpdate* update) {
  if (use_fused_kernel(spec, kernel))
    return fused_linear(spec, params, X, idx, start, count, labels, loss, inv_denom, grad,
                        accumulate, ws, n_threads, update);

  const int64_t D = spec.in_features, C = spec.classes, H = spec.hidden;
  int64_t ldx;
  const float* x = rows_block(X, idx, start, count, ws, n_threads, &ldx);
  grow(ws.logits, static_cast<size_t>(count) * C);
  grow(ws.rowloss, count);
  grow(ws.rowok, count);
  float* z = ws.logits.data();

  // Forward.
  const float* feat = x;  // input of the output layer
  int64_t ldf = ldx, F = D;
  bool hidden_nonfinite = false;
  if (spec.kind == HeadKind::MLP) {
    hidden_nonfinite = mlp_hidden(spec, params, x, ldx, count, idx, start, dropout, ws, n_threads);
    feat = ws.hact.data();
    ldf = H;
    F = H;
  }
  const float* Wo = params + spec.out_weight_offset();
  const float* bo = params + spec.out_bias_offset();
  gemm(false, true, count, C, F, 1.0f, feat, ldf, Wo, F, 0.0f, z, C, n_threads);

  // Loss and dL/dlogits in row blocks per thread; losses summed afterwards in row order.
  const float invd = static_cast<float>(inv_denom);
  grow(ws.e, static_cast<size_t>(count) * C);
  const int ce_threads = count * C >= 4096 ? n_threads : 1;
  grow(ws.tflag_ce, ce_threads);
#if defined(PYFT_WITH_OPENMP)
#pragma omp parallel num_threads(ce_threads)
#endif
  {
    int64_t lo, hi;
    partition(count, ce_threads, thread_id(), &lo, &hi);
    for (int64_t r = lo; r < hi; ++r) {
      float* zr = z + r * C;
      for (int64_t c = 0; c < C; ++c) zr[c] += bo[c];
    }
    ws.tflag_ce[thread_id()] = !finite_span(z + lo * C, (hi - lo) * C);
    if (hi > lo)
      ce_block_grad(z + lo * C, ws.e.data() + lo * C, hi - lo, C, labels, idx ? idx + lo : nullptr,
                    start + lo, loss, invd, ws.rowloss.data() + lo, ws.rowok.data() + lo);
  }
  (void)ce_threads;
  BatchResult res;
  for (int64_t r = 0; r < count; ++r) {
    res.loss_sum += ws.rowloss[r];
    res.correct += ws.rowok[r];
  }
  res.loss_sum *= inv_denom;
  if (spec.kind == HeadKind::MLP) {
    res.nonfinite = hidden_nonfinite;
  } else {
    for (int t = 0; t < ce_threads; ++t) res.nonfinite |= ws.tflag_ce[t] != 0;
  }

  // Backward through the output layer.
  const float beta = accumulate ? 1.0f : 0.0f;
  float* gWo = grad + spec.out_weight_offset();
  float* gbo = grad + spec.out_bias_offset();
  gemm(true, false, C, F, count, 1.0f, z, C, feat, ldf, beta, gWo, F, n_threads);
  colsum(z, count, C, gbo, accumulate);

  if (spec.kind == HeadKind::MLP) {
    // dh = dz W2, masked by dropout and scaled by the activation's derivative.
    grow(ws.dh, static_cast<size_t>(count) * H);
    float* dh = ws.dh.data();
    gemm(false, false, count, H, C, 1.0f, z, C, Wo, H, 0.0f, dh, H, n_threads);
    const bool drop = dropout.p > 0.0f;
    const float keep_scale = drop ? 1.0f / (1.0f - dropout.p) : 1.0f;
    const bool is_gelu = spec.activation == Activation::GELU;
    const float* hpre = ws.hpre.data();
#if defined(PYFT_WITH_OPENMP)
#pragma omp parallel for num_threads(n_threads) schedule(static)
#endif
    for (int64_t r = 0; r < count; ++r) {
      float* dr = dh + r * H;
      const float* pr = hpre + r * H;
      const uint8_t* kr = drop ? ws.keep.data() + r * H : nullptr;
      for (int64_t j = 0; j < H; ++j) {
        float g = dr[j];
        if (drop) g = kr[j] ? g * keep_scale : 0.0f;
        dr[j] = g * (is_gelu ? gelu_grad(pr[j]) : (pr[j] > 0.0f ? 1.0f : 0.0f));
      }
    }
    float* gW1 = grad;
    float* gb1 = grad + H * D;
    gemm(true, false, H, D, count, 1.0f, dh, H, x, ldx, beta, gW1, D, n_threads);
    colsum(dh, count, H, gb1, accumulate);
  }
  return res;
}

bool forward_logits(const HeadSpec& spec, const float* params, const Matrix& X, int64_t start,
                    int64_t count, float* out, Workspace& ws, int n_threads) {
  const int64_t D = spec.in_features, C = spec.classes, H = spec.hidden;
  if (spec.kind == HeadKind::Linear && use_fused_kernel(spec, KernelChoice::Auto)) {
    // Row by row: each row's logits do not depend on which other rows share the call.
    const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(n_threads, count / 8)));
    grow(ws.rowbuf, static_cast<size_t>(nt) * (D + C));
    const float* W = params;
    const float* b = params + C * D;
#if defined(PYFT_WITH_OPENMP)
#pragma omp parallel num_threads(nt)
#endif
    {
      const int t = thread_id();
      int64_t lo, hi;
      partition(count, nt, t, &lo, &hi);
      float* buf = ws.rowbuf.data() + static_cast<size_t>(t) * (D + C);
      for (int64_t r = lo; r < hi; ++r) {
        const float* x = row_as_f32(X, start + r, buf);
        dot_rows(W, C, D, x, b, out + r * C);
      }
    }
    return !finite_span(out, count * C);
  }
  int64_t ldx;
  const float* x = rows_block(X, nullptr, start, count, ws, n_threads, &ldx);
  const float* feat = x;
  int64_t ldf = ldx, F = D;
  bool hidden_nonfinite = false;
  if (spec.kind == HeadKind::MLP) {
    hidden_nonfinite =
        mlp_hidden(spec, params, x, ldx, count, nullptr, start, DropoutSpec{}, ws, n_threads);
    feat = ws.hact.data();
    ldf = H;
    F = H;
  }
  gemm(false, true, count, C, F, 1.0f, feat, ldf, params + spec.out_weight_offset(), F, 0.0f, out,
       C, n_threads);
  add_bias_rows(out, count, C, params + spec.out_bias_offset());
  return spec.kind == HeadKind::MLP ? hidden_nonfinite : !finite_span(out, count * C);
}

}  // namespace pyft
