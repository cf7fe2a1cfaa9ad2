// Validation for the batch gather; the row copy and conversion are convert.h's gather_rows.
#include "gather/gather.h"

#include <algorithm>
#include <string>

#include "common/check.h"
#include "common/device.h"
#include "common/parallel.h"

namespace pyft {
namespace {

std::string shape_str(int ndim, const int64_t* v) {
  std::string s = "(";
  for (int d = 0; d < ndim; ++d) {
    if (d) s += ", ";
    s += std::to_string(v[d]);
  }
  return s + (ndim == 1 ? ",)" : ")");
}

/// Bytes [lo, hi) that a strided 2-D view can touch (rows, cols >= 1).
void byte_extent(const char* base, int64_t rows, int64_t cols, int64_t row_stride,
                 int64_t col_stride, int64_t itemsize, const char** lo, const char** hi) {
  const int64_t r = (rows - 1) * row_stride, c = (cols - 1) * col_stride;
  *lo = base + std::min<int64_t>(0, r) + std::min<int64_t>(0, c);
  *hi = base + std::max<int64_t>(0, r) + std::max<int64_t>(0, c) + itemsize;
}

}  // namespace

Matrix gather_source(const void* data, DType dtype, int ndim, const int64_t* shape,
                     const int64_t* strides, const char* name) {
  PYFT_CHECK(ndim >= 2,
             "%s must have at least 2 dimensions (n_rows, ...); got %d dimension(s)", name, ndim);
  Matrix m;
  m.data = data;
  m.dtype = dtype;
  m.rows = shape[0];
  m.row_stride = strides[0];
  if (ndim == 2) {
    m.cols = shape[1];
    m.col_stride = strides[1];
    return m;
  }
  // Rows are flattened to prod(shape[1:]) values, which needs every row to be one C-contiguous
  // block; a size-1 dimension's stride is never used, so it may be anything (as in NumPy), and
  // an empty array has no rows to read (NumPy gives them zero strides).
  const int64_t item = dtype_size(dtype);
  int64_t cols = 1;
  bool contiguous = true;
  for (int d = ndim - 1; d >= 1; --d) {
    if (shape[d] != 1 && strides[d] != item * cols) contiguous = false;
    cols *= shape[d];
  }
  PYFT_CHECK(contiguous || cols == 0 || m.rows == 0,
             "%s with %d dimensions must have C-contiguous rows (each %s[i] one contiguous block; "
             "only 2-D arrays may have arbitrary strides); got shape %s and strides %s bytes. Pass "
             "np.ascontiguousarray(%s) or reshape it to 2-D",
             name, ndim, name, shape_str(ndim, shape).c_str(), shape_str(ndim, strides).c_str(),
             name);
  m.cols = cols;
  m.col_stride = item;
  return m;
}

void gather(const Matrix& src, const int64_t* indices, int64_t count, float* out,
            int64_t out_row_stride, int n_threads, const GatherPlacement& place) {
  const bool on_device = src.device != kHost || place.out_device != kHost ||
                         place.indices_device != kHost;
  if (on_device)
    require_cuda_device(src.device != kHost          ? src.device
                        : place.out_device != kHost ? place.out_device
                                                    : place.indices_device,
                        "gather_rows");
  PYFT_CHECK(src.rows >= 0 && src.cols >= 0, "src must have a non-negative shape; got (%lld, %lld)",
             (long long)src.rows, (long long)src.cols);
  PYFT_CHECK(count >= 0, "indices must hold >= 0 entries; got %lld", (long long)count);
  PYFT_CHECK(n_threads >= 0, "n_threads must be >= 0 (0: all available threads); got %d",
             n_threads);
  PYFT_CHECK(out_row_stride >= src.cols,
             "out row stride must be >= the row size %lld (floats); got %lld", (long long)src.cols,
             (long long)out_row_stride);
  if (on_device) {
    PYFT_CHECK(src.device != kHost,
               "src is in host memory but out or indices are on cuda:%d; the gather runs where "
               "src lives: move src to the GPU or pass host arrays",
               place.out_device != kHost ? place.out_device : place.indices_device);
    PYFT_CHECK(place.out_device == src.device,
               "out must be on the device of src (cuda:%d); got %s%d", src.device,
               place.out_device == kHost ? "host memory, device " : "cuda:", place.out_device);
    PYFT_CHECK(place.indices_device == kHost || place.indices_device == src.device,
               "indices must be in host memory or on the device of src (cuda:%d); got cuda:%d",
               src.device, place.indices_device);
  }
  if (count == 0) return;
  PYFT_CHECK(indices != nullptr, "indices is missing");
  const bool device_indices = on_device && place.indices_device != kHost;
  // Every index before any row is written, so a bad batch leaves a reused buffer untouched
  // (device-resident indices are checked the same way, by the CUDA gather before it copies).
  for (int64_t r = 0; r < (device_indices ? 0 : count); ++r) {
    const int64_t i = indices[r];
    PYFT_CHECK(i >= 0 && i < src.rows, "indices must be in [0, %lld) (rows of src); got %lld at "
               "position %lld", (long long)src.rows, (long long)i, (long long)r);
  }
  if (src.cols == 0) return;
  PYFT_CHECK(src.data != nullptr && out != nullptr, "src or out is missing");
  // Threads write rows of out while others read src, so an overlap would give schedule-dependent
  // results. Compared by bounding boxes: conservative, and exact for the C-contiguous out.
  const char *s_lo, *s_hi, *o_lo, *o_hi;
  byte_extent(static_cast<const char*>(src.data), src.rows, src.cols, src.row_stride,
              src.col_stride, dtype_size(src.dtype), &s_lo, &s_hi);
  byte_extent(reinterpret_cast<const char*>(out), count, src.cols,
              out_row_stride * (int64_t)sizeof(float), sizeof(float), sizeof(float), &o_lo, &o_hi);
  PYFT_CHECK(o_hi <= s_lo || s_hi <= o_lo,
             "out must not share memory with src; pass a separate float32 buffer");
  if (on_device) {
    PYFT_CHECK(src.contiguous_rows(),
               "src on a CUDA device must have contiguous rows (column stride %lld bytes, the "
               "item size); got a column stride of %lld bytes",
               (long long)dtype_size(src.dtype), (long long)src.col_stride);
    cuda::gather(src, indices, device_indices, count, out, out_row_stride, place.stream);
    return;
  }
  const int nt = static_cast<int>(std::min<int64_t>(resolve_threads(n_threads), count));
  gather_rows(src, indices, 0, count, out, out_row_stride, nt);
}

#if !defined(PYFT_WITH_CUDA)
namespace cuda {
void gather(const Matrix&, const int64_t*, bool, int64_t, float*, int64_t, StreamHandle) {
  require_cuda_device(0, "gather_rows");  // throws: built without CUDA
}
}  // namespace cuda
#endif

}  // namespace pyft
