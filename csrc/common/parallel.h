// Thin OpenMP helpers so that every parallel loop sees the same, explicit thread count.
#pragma once

#include <algorithm>
#include <cstdint>

#if defined(PYFT_WITH_OPENMP)
#include <omp.h>
#endif

namespace pyft {

/// Number of threads to use when the caller asks for `requested` (<= 0: all available).
inline int resolve_threads(int requested) {
#if defined(PYFT_WITH_OPENMP)
  int avail = omp_get_max_threads();
#else
  int avail = 1;
#endif
  if (requested <= 0) return std::max(1, avail);
#if defined(PYFT_WITH_OPENMP)
  return requested;
#else
  return 1;
#endif
}

inline int thread_id() {
#if defined(PYFT_WITH_OPENMP)
  return omp_get_thread_num();
#else
  return 0;
#endif
}

/// Static contiguous partition of [0, n) into `parts` chunks; chunk `i` is [*lo, *hi).
inline void partition(int64_t n, int parts, int i, int64_t* lo, int64_t* hi, int64_t align = 1) {
  int64_t units = (n + align - 1) / align;
  int64_t per = units / parts, rem = units % parts;
  int64_t a = i * per + std::min<int64_t>(i, rem);
  int64_t b = a + per + (i < rem ? 1 : 0);
  *lo = std::min(n, a * align);
  *hi = std::min(n, b * align);
}

}  // namespace pyft
