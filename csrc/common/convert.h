// Feature matrices of any supported dtype and layout, read row by row into float32.
//
// The trainer never copies a whole feature matrix: rows are converted into small float32
// buffers one mini-batch (or chunk) at a time, so a float16 memmap larger than memory trains
// without a float32 copy.
#pragma once

#include <cstdint>
#include <cstring>

#include "common/device.h"

namespace pyft {

enum class DType : int { F32 = 0, F16 = 1, BF16 = 2, F64 = 3 };

const char* dtype_name(DType d);
int64_t dtype_size(DType d);

/// A read-only 2-D view: element (i, j) lives at data + i * row_stride + j * col_stride (bytes).
/// Strides may be negative or zero; they are never assumed to be C-contiguous.
struct Matrix {
  const void* data = nullptr;
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t row_stride = 0;  ///< bytes
  int64_t col_stride = 0;  ///< bytes
  DType dtype = DType::F32;
  int device = kHost;      ///< kHost, or the CUDA device that holds data (never read on the host)

  bool contiguous_rows() const { return col_stride == dtype_size(dtype); }
  const char* row_ptr(int64_t i) const {
    return static_cast<const char*>(data) + i * row_stride;
  }
  /// True when row i can be used in place as a float32 vector (no conversion, no copy).
  bool rows_are_f32() const { return dtype == DType::F32 && contiguous_rows(); }
};

/// Convert row `i` of `m` into `out` (m.cols floats).
void convert_row(const Matrix& m, int64_t i, float* out);

/// Pointer to row i as contiguous float32: the row itself when possible, else `scratch` filled.
inline const float* row_as_f32(const Matrix& m, int64_t i, float* scratch) {
  if (m.rows_are_f32()) return reinterpret_cast<const float*>(m.row_ptr(i));
  convert_row(m, i, scratch);
  return scratch;
}

/// Gather rows idx[0..count) (or start..start+count when idx is null) into out (count x ld),
/// converting to float32; parallel over rows with n_threads.
void gather_rows(const Matrix& m, const int64_t* idx, int64_t start, int64_t count, float* out,
                 int64_t ld, int n_threads);

/// Scan the matrix for NaN or infinity. Returns false and sets (*bad_row, *bad_col) on the first
/// (lowest row) non-finite value.
bool all_finite(const Matrix& m, int n_threads, int64_t* bad_row, int64_t* bad_col);

}  // namespace pyft
