// Matrix products through OpenBLAS (the scipy-openblas32 build, `scipy_` symbol prefix).
//
// Parallelism comes from our own OpenMP threads: each thread calls single-threaded sgemm on a
// fixed slice of the output, so results are deterministic for a given thread count and OpenBLAS'
// pthread pool never competes with OpenMP for the same cores.
#pragma once

#include <cstdint>

namespace pyft {

/// Row-major C[M x N] = alpha * op(A) op(B) + beta * C, split over n_threads along M or N.
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
          int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc,
          int n_threads);

/// Version string of the OpenBLAS in use.
const char* blas_config();

}  // namespace pyft
