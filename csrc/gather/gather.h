// Batch gather for the feature cache: rows picked by index from a (memory-mapped) feature array,
// converted to float32 into a caller-owned, reusable buffer.
#pragma once

#include <cstdint>

#include "common/convert.h"
#include "common/device.h"

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
///
/// Device placement: src.device says where src lives. With src on a CUDA device, out must be on
/// the same device and indices on that device or the host (`place`); the gather is queued on
/// place.stream (the caller's stream) and this call returns once it is queued, except that
/// device-resident indices are validated first (one small copy back). CPU builds throw
/// std::runtime_error for device arrays.
struct GatherPlacement {
  int indices_device = kHost;
  int out_device = kHost;
  StreamHandle stream = 0;
};

void gather(const Matrix& src, const int64_t* indices, int64_t count, float* out,
            int64_t out_row_stride, int n_threads, const GatherPlacement& place = {});

namespace cuda {
/// The CUDA kernel behind gather (validated arguments only).
void gather(const Matrix& src, const int64_t* indices, bool indices_on_device, int64_t count,
            float* out, int64_t out_row_stride, StreamHandle stream);
}  // namespace cuda

}  // namespace pyft
