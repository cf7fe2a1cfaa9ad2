#include "common/convert.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common/parallel.h"
#include "common/simd.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif


namespace pyft {

const char* dtype_name(DType d) {
  switch (d) {
    case DType::F32: return "float32";
    case DType::F16: return "float16";
    case DType::BF16: return "bfloat16";
    case DType::F64: return "float64";
  }
  return "unknown";
}

int64_t dtype_size(DType d) {
  switch (d) {
    case DType::F32: return 4;
    case DType::F16: return 2;
    case DType::BF16: return 2;
    case DType::F64: return 8;
  }
  return 0;
}

namespace {

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

// IEEE half -> float, branch-free so that the loop vectorizes (after F. Giesen's half_to_float).
inline float half_to_float(uint16_t h) {
  const uint32_t shifted_exp = 0x7c00u << 13;
  uint32_t o = static_cast<uint32_t>(h & 0x7fffu) << 13;
  uint32_t exp = shifted_exp & o;
  o += (127u - 15u) << 23;
  uint32_t inf_nan = (exp == shifted_exp) ? ((128u - 16u) << 23) : 0u;
  o += inf_nan;
  // zero / subnormal: renormalise through a float subtraction
  float denorm = bits_to_float(o + (1u << 23)) - bits_to_float(113u << 23);
  uint32_t res = (exp == 0) ? float_to_bits(denorm) : o;
  return bits_to_float(res | (static_cast<uint32_t>(h & 0x8000u) << 16));
}

PYFT_MULTIVERSION
void convert_f16_portable(const uint16_t* __restrict src, float* __restrict dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = half_to_float(src[j]);
}

#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
#define PYFT_HAVE_F16C_PATH 1
// The hardware conversion (8 halves per instruction). It quiets signalling NaNs, which the
// portable path (like NumPy) keeps bit for bit, so 8-lane groups holding an infinity or NaN
// (exponent all ones; rare in features) go through the portable path.
__attribute__((target("avx2,f16c"))) void convert_f16_f16c(const uint16_t* __restrict src,
                                                          float* __restrict dst, int64_t n) {
  const __m128i exp_mask = _mm_set1_epi16(0x7c00);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + j));
    const __m128i special = _mm_cmpeq_epi16(_mm_and_si128(h, exp_mask), exp_mask);
    if (_mm_movemask_epi8(special)) {
      for (int k = 0; k < 8; ++k) dst[j + k] = half_to_float(src[j + k]);
    } else {
      _mm256_storeu_ps(dst + j, _mm256_cvtph_ps(h));
    }
  }
  for (; j < n; ++j) dst[j] = half_to_float(src[j]);
}

bool cpu_has_f16c() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
  return has;
}
#endif

void convert_f16(const uint16_t* __restrict src, float* __restrict dst, int64_t n) {
#ifdef PYFT_HAVE_F16C_PATH
  if (cpu_has_f16c()) {
    convert_f16_f16c(src, dst, n);
    return;
  }
#endif
  convert_f16_portable(src, dst, n);
}

PYFT_MULTIVERSION
void convert_bf16(const uint16_t* __restrict src, float* __restrict dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = bits_to_float(static_cast<uint32_t>(src[j]) << 16);
}

PYFT_MULTIVERSION
void convert_f64(const double* __restrict src, float* __restrict dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<float>(src[j]);
}

template <typename T>
inline T load(const char* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}

}  // namespace

void convert_row(const Matrix& m, int64_t i, float* out) {
  const char* row = m.row_ptr(i);
  const int64_t n = m.cols;
  if (m.contiguous_rows()) {
    switch (m.dtype) {
      case DType::F32: std::memcpy(out, row, n * sizeof(float)); return;
      case DType::F16: convert_f16(reinterpret_cast<const uint16_t*>(row), out, n); return;
      case DType::BF16: convert_bf16(reinterpret_cast<const uint16_t*>(row), out, n); return;
      case DType::F64: convert_f64(reinterpret_cast<const double*>(row), out, n); return;
    }
  }
  // Strided columns (Fortran order, slices with a step): element by element.
  const int64_t cs = m.col_stride;
  switch (m.dtype) {
    case DType::F32:
      for (int64_t j = 0; j < n; ++j) out[j] = load<float>(row + j * cs);
      return;
    case DType::F16:
      for (int64_t j = 0; j < n; ++j) out[j] = half_to_float(load<uint16_t>(row + j * cs));
      return;
    case DType::BF16:
      for (int64_t j = 0; j < n; ++j)
        out[j] = bits_to_float(static_cast<uint32_t>(load<uint16_t>(row + j * cs)) << 16);
      return;
    case DType::F64:
      for (int64_t j = 0; j < n; ++j) out[j] = static_cast<float>(load<double>(row + j * cs));
      return;
  }
}

void gather_rows(const Matrix& m, const int64_t* idx, int64_t start, int64_t count, float* out,
                 int64_t ld, int n_threads) {
  // Small batches are not worth waking threads for.
  const int nt = (count * m.cols < (1 << 15)) ? 1 : n_threads;
#if defined(PYFT_WITH_OPENMP)
#pragma omp parallel for num_threads(nt) schedule(static)
#endif
  for (int64_t r = 0; r < count; ++r) {
    const int64_t i = idx ? idx[r] : start + r;
    convert_row(m, i, out + r * ld);
  }
  (void)nt;
}

namespace {
PYFT_MULTIVERSION
bool span_finite(const float* x, int64_t n, int64_t* bad) {
  // Sum of x*0 is NaN iff some x is NaN or infinite; cheap and vectorizable.
  float acc = 0.0f;
  for (int64_t j = 0; j < n; ++j) acc += x[j] * 0.0f;
  if (acc == 0.0f) return true;
  for (int64_t j = 0; j < n; ++j) {
    if (!std::isfinite(x[j])) {
      *bad = j;
      return false;
    }
  }
  return true;
}
}  // namespace

bool all_finite(const Matrix& m, int n_threads, int64_t* bad_row, int64_t* bad_col) {
  if (m.rows == 0 || m.cols == 0) return true;
  const int nt = std::max<int>(1, std::min<int64_t>(n_threads, m.rows));
  std::vector<int64_t> first_bad_row(nt, -1), first_bad_col(nt, -1);
  std::vector<float> scratch_all(static_cast<size_t>(nt) * m.cols);  // no allocation in the region
#if defined(PYFT_WITH_OPENMP)
#pragma omp parallel num_threads(nt)
#endif
  {
    const int t = thread_id();
    int64_t lo, hi;
    partition(m.rows, nt, t, &lo, &hi);
    float* scratch = scratch_all.data() + static_cast<size_t>(t) * m.cols;
    for (int64_t i = lo; i < hi; ++i) {
      const float* row = row_as_f32(m, i, scratch);
      int64_t bad = -1;
      if (!span_finite(row, m.cols, &bad)) {
        first_bad_row[t] = i;
        first_bad_col[t] = bad;
        break;
      }
    }
  }
  for (int t = 0; t < nt; ++t) {
    if (first_bad_row[t] >= 0) {
      *bad_row = first_bad_row[t];
      *bad_col = first_bad_col[t];
      return false;
    }
  }
  return true;
}

}  // namespace pyft
