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

// Eight rows per pass over W and the gradient: explicit 8-lane vectors (GCC vector extensions,
// lowered to AVX2 in the x86-64-v3 clone and to SSE pairs in the baseline one) so that the eight
// per-row accumulators and coefficients stay in registers.
typedef float v8f __attribute__((vector_size(32), aligned(4), may_alias));
typedef int32_t v8i __attribute__((vector_size(32)));

inline float hsum8(v8f v) {
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

/// out[r] = sum of the lanes of acc[r], for eight vectors at once (a transpose-and-add network:
/// about 25 vector ops instead of 8 horizontal sums).
inline v8f hsum8x8(const v8f* acc) {
  const v8i even = {0, 2, 8, 10, 4, 6, 12, 14}, odd = {1, 3, 9, 11, 5, 7, 13, 15};
  auto hadd = [&](v8f x, v8f y) {
    return __builtin_shuffle(x, y, even) + __builtin_shuffle(x, y, odd);
  };
  const v8f u0 = hadd(hadd(acc[0], acc[1]), hadd(acc[2], acc[3]));
  const v8f u1 = hadd(hadd(acc[4], acc[5]), hadd(acc[6], acc[7]));
  const v8i lo = {0, 1, 2, 3, 8, 9, 10, 11}, hi = {4, 5, 6, 7, 12, 13, 14, 15};
  return __builtin_shuffle(u0, u1, lo) + __builtin_shuffle(u0, u1, hi);
}

/// Logits of eight rows, class-major: zt[8 * c + r] = w[c] . xs[r] + bias[c].
PYFT_MULTIVERSION
void dot_rows_oct(const float* __restrict w, int64_t rows, int64_t d,
                  const float* const* __restrict xs, const float* __restrict bias,
                  float* __restrict zt /* rows x 8 */) {
  const int64_t d8 = d & ~int64_t(7);
  for (int64_t c = 0; c < rows; ++c) {
    const float* wc = w + c * d;
    v8f acc[8] = {};
    for (int64_t j = 0; j < d8; j += 8) {
      const v8f wv = *reinterpret_cast<const v8f*>(wc + j);
      for (int r = 0; r < 8; ++r) acc[r] += wv * *reinterpret_cast<const v8f*>(xs[r] + j);
    }
    v8f sum = hsum8x8(acc) + bias[c];
    for (int64_t j = d8; j < d; ++j)
      for (int r = 0; r < 8; ++r) sum[r] += wc[j] * xs[r][j];
    *reinterpret_cast<v8f*>(zt + 8 * c) = sum;
  }
}

PYFT_MULTIVERSION
void axpy_rows8(float* __restrict g, int64_t rows, int64_t d, const float* __restrict coef_t,
                const float* const* __restrict xs) {
  const int64_t d8 = d & ~int64_t(7);
  for (int64_t c = 0; c < rows; ++c) {
    float* gc = g + c * d;
    float a[8];
    v8f av[8];
    for (int r = 0; r < 8; ++r) {
      a[r] = coef_t[8 * c + r];
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

// exp(x) on eight lanes (Cephes expf: range reduction by ln 2 and a degree-6 polynomial, within
// 2 ulp of std::exp on [-87, 88]); libm's expf does not vectorize without -ffast-math, and the
// clamp, floor and exponent bit trick defeat GCC's vectorizer in scalar form. Inputs below -87
// give a tiny positive value, as softmax needs.
inline v8f exp8(v8f v) {
  v = v < -87.0f ? v8f{} - 87.0f : v;
  v = v > 88.0f ? v8f{} + 88.0f : v;
  const v8f fx = v * 1.44269504088896341f + 0.5f;
  v8i k = __builtin_convertvector(fx, v8i);
  k += (__builtin_convertvector(k, v8f) > fx);  // floor: the comparison mask is -1 where true
  const v8f kf = __builtin_convertvector(k, v8f);
  v8f r = v - kf * 0.693359375f;
  r = r + kf * 2.12194440e-4f;
  const v8f r2 = r * r;
  v8f p = v8f{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r2 + r + 1.0f;
  const v8i bits = (k + 127) << 23;
  return p * reinterpret_cast<const v8f&>(bits);
}

PYFT_MULTIVERSION
void exp_block(const float* __restrict x, float* __restrict out, int64_t n) {
  const int64_t n8 = n & ~int64_t(7);
  for (int64_t i = 0; i < n8; i += 8)
    *reinterpret_cast<v8f*>(out + i) = exp8(*reinterpret_cast<const v8f*>(x + i));
  if (n8 < n) {  // the tail goes through the same lanes, zero-padded
    v8f tail = {};
    for (int64_t i = n8; i < n; ++i) tail[i - n8] = x[i];
    tail = exp8(tail);
    for (int64_t i = n8; i < n; ++i) out[i] = tail[i - n8];
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


namespace {

/// Softmax cross-entropy of eight rows held class-major (zt[8 c + r]), vectorized across rows.
/// zt is replaced by dL/dz * inv_denom; rows r >= k are padding and get zero gradient.
/// Returns false when some valid logit is NaN or infinite (see BatchResult::nonfinite).
PYFT_MULTIVERSION
bool ce_group_grad(float* __restrict zt, float* __restrict et, int64_t C, int k, const int32_t* y,
                   const LossSpec& loss, float inv_denom, double* row_loss, uint8_t* row_ok) {
  v8f* z = reinterpret_cast<v8f*>(zt);
  v8f* e = reinterpret_cast<v8f*>(et);
  v8i yv;
  v8f wy;
  for (int r = 0; r < 8; ++r) {
    yv[r] = y[r];
    wy[r] = loss.weight(y[r]);
  }
  v8f mx = z[0], fin = z[0] * 0.0f;
  v8i arg = {};
  for (int64_t c = 1; c < C; ++c) {
    const v8i gt = z[c] > mx;  // strict: the first maximum wins, as argmax
    mx = gt ? z[c] : mx;
    arg = gt ? v8i{} + static_cast<int32_t>(c) : arg;
    fin += z[c] * 0.0f;
  }
  bool finite = true;
  for (int r = 0; r < k; ++r) finite &= (fin[r] == 0.0f);
  for (int64_t c = 0; c < C; ++c) z[c] -= mx;
  exp_block(zt, et, 8 * C);
  v8f se = {};
  for (int64_t c = 0; c < C; ++c) se += e[c];
  v8f lse, zy = {};
  for (int r = 0; r < 8; ++r) lse[r] = std::log(se[r]);
  for (int64_t c = 0; c < C; ++c) zy = (yv == static_cast<int32_t>(c)) ? z[c] : zy;
  const float eps = loss.label_smoothing;
  const v8f inv_se = 1.0f / se;
  v8f l = (1.0f - eps) * wy * (lse - zy);
  if (eps > 0.0f) {
    float wsum = 0.0f;
    for (int64_t c = 0; c < C; ++c) wsum += loss.weight(c);
    v8f smooth = {};
    for (int64_t c = 0; c < C; ++c) smooth += loss.weight(c) * (lse - z[c]);
    l += (eps / C) * smooth;
    const v8f A = (1.0f - eps) * wy + (eps / C) * wsum;
    for (int64_t c = 0; c < C; ++c) {
      const v8f onehot = (yv == static_cast<int32_t>(c)) ? (1.0f - eps) * wy : v8f{};
      z[c] = (A * (e[c] * inv_se) - (onehot + (eps / C) * loss.weight(c))) * inv_denom;
    }
  } else {
    const v8f scale = wy * inv_denom;
    for (int64_t c = 0; c < C; ++c) {
      const v8f g = scale * (e[c] * inv_se);
      z[c] = (yv == static_cast<int32_t>(c)) ? g - scale : g;
    }
  }
  for (int r = 0; r < 8; ++r) {
    row_loss[r] = l[r];
    row_ok[r] = arg[r] == yv[r];
  }
  if (k < 8)
    for (int64_t c = 0; c < C; ++c)
      for (int r = k; r < 8; ++r) z[c][r] = 0.0f;  // padded rows add nothing to the gradient
  return finite;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Fused linear kernel: each row is read once, for the logits and for the gradient.

namespace {

BatchResult fused_linear(const HeadSpec& spec, const float* params, const Matrix& X,
                         const int64_t* idx, int64_t start, int64_t count, const int64_t* labels,
                         const LossSpec& loss, double inv_denom, float* grad, bool accumulate,
                         Workspace& ws, int n_threads, const SliceUpdate* update) {
  constexpr int R = 8;  // rows per pass over W and the gradient
  const int64_t C = spec.classes, D = spec.in_features;
  const float* W = params;
  const float* b = params + C * D;
  const int64_t G = C * D + C;
  const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(n_threads, count / R)));
  grow(ws.tgrad, static_cast<size_t>(nt) * G);
  const int64_t per_thread = R * D + 2 * R * C;
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
    float* tb = tg + C * D;
    float* bufs = ws.rowbuf.data() + static_cast<size_t>(t) * per_thread;  // R x D
    float* z = bufs + R * D;  // C x R logits (class-major), then dL/dlogits
    float* e = z + R * C;     // C x R scratch for the vectorized softmax
    double row_loss[R];
    uint8_t row_ok[R];
    std::memset(tg, 0, sizeof(float) * G);
    double lsum = 0.0;
    int64_t ok = 0;
    // Shuffled rows defeat the hardware prefetcher: touch rows PF_DIST ahead so that their
    // misses overlap with this group's work.
    const int64_t PF_DIST = PYFT_PF_DIST, PF_BYTES = PYFT_PF_BYTES;
    for (int64_t q = lo; q < std::min(hi, lo + PF_DIST); ++q)
      prefetch_row(X, idx ? idx[q] : start + q, PF_BYTES);
    for (int64_t r = lo; r < hi; r += R) {
      const int k = static_cast<int>(std::min<int64_t>(R, hi - r));
      for (int64_t q = r + PF_DIST; q < std::min(hi, r + PF_DIST + R); ++q)
        prefetch_row(X, idx ? idx[q] : start + q, PF_BYTES);
      const float* xs[R];
      for (int j = 0; j < k; ++j)
        xs[j] = row_as_f32(X, idx ? idx[r + j] : start + r + j, bufs + j * D);
      for (int j = k; j < R; ++j) xs[j] = xs[0];  // a short last group repeats a valid row
      int32_t y8[R];
      for (int j = 0; j < R; ++j)
        y8[j] = j < k ? static_cast<int32_t>(labels[idx ? idx[r + j] : start + r + j]) : 0;
      dot_rows_oct(W, C, D, xs, b, z);  // z is class-major: z[8 c + j]
      nonfinite |= !ce_group_grad(z, e, C, k, y8, loss, invd, row_loss, row_ok);
      for (int j = 0; j < k; ++j) {
        lsum += row_loss[j];
        ok += row_ok[j];
      }
      axpy_rows8(tg, C, D, z, xs);
      for (int64_t c = 0; c < C; ++c) tb[c] += hsum8(*reinterpret_cast<const v8f*>(z + 8 * c));
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
    // Eight rows per pass, as in training; each row has its own accumulators, so its logits do
    // not depend on which other rows share the call.
    constexpr int R = 8;
    const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(n_threads, count / R)));
    const int64_t per_thread = R * D + R * C;
    grow(ws.rowbuf, static_cast<size_t>(nt) * per_thread);
    const float* W = params;
    const float* b = params + C * D;
#if defined(PYFT_WITH_OPENMP)
#pragma omp parallel num_threads(nt)
#endif
    {
      const int t = thread_id();
      int64_t lo, hi;
      partition(count, nt, t, &lo, &hi);
      float* bufs = ws.rowbuf.data() + static_cast<size_t>(t) * per_thread;
      float* z = bufs + R * D;
      for (int64_t r = lo; r < hi; r += R) {
        const int k = static_cast<int>(std::min<int64_t>(R, hi - r));
        const float* xs[R];
        for (int j = 0; j < k; ++j) xs[j] = row_as_f32(X, start + r + j, bufs + j * D);
        for (int j = k; j < R; ++j) xs[j] = xs[0];
        dot_rows_oct(W, C, D, xs, b, z);
        for (int j = 0; j < k; ++j)
          for (int64_t c = 0; c < C; ++c) out[(r + j) * C + c] = z[8 * c + j];
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
