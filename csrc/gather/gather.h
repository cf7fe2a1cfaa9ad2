// Batch gather for the feature cache: rows picked by index from a (memory-mapped) feature array,
// converted to float32 into a caller-owned, reusable buffer.
#pragma once

#include <cstdint>

#include "common/convert.h"

namespace pyft {

/// View an array with ndim >= 2 dimensions as a matrix of shape[0] rows and prod(shape[1:])
/// columns, without copying. 2-D arrays keep any strides; for ndim > 2 every row src[i] must be
/// C-contiguous (the row stride, strides[0], is free). strides are in bytes. Throws
/// std::invalid_argument naming `name` when the array cannot be viewed that way.
Matrix gather_source(const void* data, DType dtype, int ndim, const int64_t* shape,
                     const int64_t* strides, const char* name);

/// out[r, :] = float32(src[indices[r], :]) for r in [0, count).
///
/// indices: count row indices in any order, repeats allowed, each in [0, src.rows).
/// out: count x src.cols float32, row r at out + r * out_row_stride (floats, >= src.cols); it must
/// not overlap src. Parallel over rows with n_threads (0: all available). Validates everything
/// before writing anything: on a bad index `out` is left untouched.
void gather(const Matrix& src, const int64_t* indices, int64_t count, float* out,
            int64_t out_row_stride, int n_threads);

}  // namespace pyft
