#include "common/blas.h"

#include <algorithm>
#include <climits>

#include "common/check.h"
#include "common/parallel.h"

extern "C" {
// From scipy_openblas32's cblas.h; declared here so the header's macros stay out of our code.
enum PYFT_CBLAS_ORDER { PyftRowMajor = 101 };
enum PYFT_CBLAS_TRANSPOSE { PyftNoTrans = 111, PyftTrans = 112 };
void scipy_cblas_sgemm(int order, int trans_a, int trans_b, int m, int n, int k, float alpha,
                       const float* a, int lda, const float* b, int ldb, float beta, float* c,
                       int ldc);
void scipy_openblas_set_num_threads(int n);
char* scipy_openblas_get_config(void);
}

namespace pyft {

namespace {
struct SingleThreadedBlas {
  SingleThreadedBlas() { scipy_openblas_set_num_threads(1); }
};

inline void sgemm1(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                   int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  scipy_cblas_sgemm(PyftRowMajor, ta ? PyftTrans : PyftNoTrans, tb ? PyftTrans : PyftNoTrans,
                    static_cast<int>(m), static_cast<int>(n), static_cast<int>(k), alpha, a,
                    static_cast<int>(lda), b, static_cast<int>(ldb), beta, c,
                    static_cast<int>(ldc));
}
}  // namespace

void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
          int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc,
          int n_threads) {
  static SingleThreadedBlas once;
  (void)once;
  PYFT_CHECK_RUNTIME(m < INT_MAX && n < INT_MAX && k < INT_MAX && lda < INT_MAX &&
                         ldb < INT_MAX && ldc < INT_MAX,
                     "matrix product too large for 32-bit BLAS indices (%lld x %lld x %lld)",
                     (long long)m, (long long)n, (long long)k);
  const double flops = 2.0 * m * n * k;
  int nt = std::max(1, n_threads);
  if (flops < 2.0e5) nt = 1;
  if (nt == 1) {
    sgemm1(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    return;
  }
  // Split the larger output dimension into contiguous slices aligned to the micro-kernel width.
  const bool split_m = m >= n;
  const int64_t extent = split_m ? m : n;
  nt = static_cast<int>(std::min<int64_t>(nt, (extent + 15) / 16));
  if (nt <= 1) {
    sgemm1(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    return;
  }
#if defined(PYFT_WITH_OPENMP)
#pragma omp parallel num_threads(nt)
#endif
  {
    int64_t lo, hi;
    partition(extent, nt, thread_id(), &lo, &hi, 16);
    if (hi > lo) {
      if (split_m) {
        // rows lo..hi of op(A): A is m x k (lda) or k x m (trans).
        const float* a_part = ta ? a + lo : a + lo * lda;
        sgemm1(ta, tb, hi - lo, n, k, alpha, a_part, lda, b, ldb, beta, c + lo * ldc, ldc);
      } else {
        // columns lo..hi of op(B): B is k x n (ldb) or n x k (trans).
        const float* b_part = tb ? b + lo * ldb : b + lo;
        sgemm1(ta, tb, m, hi - lo, k, alpha, a, lda, b_part, ldb, beta, c + lo, ldc);
      }
    }
  }
}

const char* blas_config() { return scipy_openblas_get_config(); }

}  // namespace pyft
