// CUDA kernel of the batch gather: rows of a device feature matrix picked by index, converted to
// float32. Memory-bound: one block per output row, 16-byte loads and stores where the layout
// allows (the common case: contiguous rows of 2048 bf16 values), element loads otherwise.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <climits>
#include <cstdint>

#include "common/cuda_check.cuh"
#include "gather/gather.h"

namespace pyft {
namespace cuda {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(double x) { return __double2float_rn(x); }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

/// out[r, j] = float(src[idx[r], j]), any alignment.
template <typename T>
__global__ void gather_scalar(const char* __restrict__ src, int64_t row_stride,
                              const int64_t* __restrict__ idx, int64_t count, int64_t cols,
                              float* __restrict__ out, int64_t ld) {
  for (int64_t r = blockIdx.x; r < count; r += gridDim.x) {
    const T* row = reinterpret_cast<const T*>(src + idx[r] * row_stride);
    float* o = out + r * ld;
    for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) o[j] = to_f32(row[j]);
  }
}

/// Same, 16 bytes of src per load: V elements of T (V = 16 / sizeof(T)), written as V floats.
/// Needs 16-byte aligned rows in src and out and cols % V == 0 (checked on the host).
template <typename T>
__global__ void gather_vec16(const char* __restrict__ src, int64_t row_stride,
                             const int64_t* __restrict__ idx, int64_t count, int64_t cols,
                             float* __restrict__ out, int64_t ld) {
  constexpr int V = 16 / sizeof(T);
  const int64_t vecs = cols / V;
  for (int64_t r = blockIdx.x; r < count; r += gridDim.x) {
    const uint4* row = reinterpret_cast<const uint4*>(src + idx[r] * row_stride);
    float4* o = reinterpret_cast<float4*>(out + r * ld);
    for (int64_t k = threadIdx.x; k < vecs; k += blockDim.x) {
      const uint4 raw = __ldg(row + k);
      const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int q = 0; q < V; q += 4) {
        // V is 2 for double: the second float4 store would be half out of range, so doubles
        // write a float2.
        if constexpr (V >= 4) {
          o[k * (V / 4) + q / 4] =
              make_float4(to_f32(e[q]), to_f32(e[q + 1]), to_f32(e[q + 2]), to_f32(e[q + 3]));
        } else {
          reinterpret_cast<float2*>(o)[k] = make_float2(to_f32(e[0]), to_f32(e[1]));
        }
      }
    }
  }
}

/// Smallest position r with idx[r] outside [0, rows), via atomicMin (ULLONG_MAX when none).
__global__ void find_bad_index(const int64_t* __restrict__ idx, int64_t count, int64_t rows,
                               unsigned long long* first_bad) {
  for (int64_t r = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; r < count;
       r += (int64_t)gridDim.x * blockDim.x) {
    const int64_t i = idx[r];
    if (i < 0 || i >= rows) atomicMin(first_bad, static_cast<unsigned long long>(r));
  }
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

template <typename T>
void launch(const Matrix& src, const int64_t* idx, int64_t count, float* out, int64_t ld,
            cudaStream_t stream) {
  const int blocks = static_cast<int>(count < (1 << 20) ? count : (1 << 20));
  constexpr int V = 16 / sizeof(T);
  const char* base = static_cast<const char*>(src.data);
  const bool vec = aligned16(base) && src.row_stride % 16 == 0 && src.cols % V == 0 &&
                   aligned16(out) && (ld * 4) % 16 == 0;
  if (vec) {
    gather_vec16<T><<<blocks, kThreads, 0, stream>>>(base, src.row_stride, idx, count, src.cols,
                                                     out, ld);
  } else {
    gather_scalar<T><<<blocks, kThreads, 0, stream>>>(base, src.row_stride, idx, count, src.cols,
                                                      out, ld);
  }
  PYFT_CUDA_LAUNCH_CHECK();
}

}  // namespace

void gather(const Matrix& src, const int64_t* indices, bool indices_on_device, int64_t count,
            float* out, int64_t out_row_stride, StreamHandle stream_handle) {
  DeviceGuard guard(src.device);
  const cudaStream_t stream = as_stream(stream_handle);
  const int64_t* idx = indices;
  int64_t* staged = nullptr;  // host indices, copied to the device in stream order
  if (!indices_on_device) {
    PYFT_CUDA_CHECK(cudaMallocAsync(reinterpret_cast<void**>(&staged),
                                    static_cast<size_t>(count) * sizeof(int64_t), stream));
    // From pageable memory the copy is staged before it returns, so the caller may free
    // `indices` as soon as this call is done.
    const cudaError_t e = cudaMemcpyAsync(staged, indices, static_cast<size_t>(count) * 8,
                                          cudaMemcpyHostToDevice, stream);
    if (e != cudaSuccess) {
      cudaFreeAsync(staged, stream);
      throw_cuda(e, "cudaMemcpyAsync(indices)", __FILE__, __LINE__);
    }
    idx = staged;
  } else {
    // Validate on the device, then one 8-byte copy back: the gather must not read out of bounds,
    // and a bad index must leave `out` untouched, as on the CPU.
    DeviceBuffer<unsigned long long> first_bad(1);
    PYFT_CUDA_CHECK(cudaMemsetAsync(first_bad.get(), 0xFF, sizeof(unsigned long long), stream));
    const int blocks = static_cast<int>(std::min<int64_t>((count + 255) / 256, 4096));
    find_bad_index<<<blocks, 256, 0, stream>>>(idx, count, src.rows, first_bad.get());
    PYFT_CUDA_LAUNCH_CHECK();
    unsigned long long bad = 0;
    PYFT_CUDA_CHECK(cudaMemcpyAsync(&bad, first_bad.get(), sizeof(bad), cudaMemcpyDeviceToHost,
                                    stream));
    PYFT_CUDA_CHECK(cudaStreamSynchronize(stream));
    if (bad != ULLONG_MAX) {
      int64_t value = 0;
      PYFT_CUDA_CHECK(cudaMemcpy(&value, idx + bad, sizeof(value), cudaMemcpyDeviceToHost));
      PYFT_CHECK(false, "indices must be in [0, %lld) (rows of src); got %lld at position %llu",
                 (long long)src.rows, (long long)value, bad);
    }
  }
  try {
    switch (src.dtype) {
      case DType::F32: launch<float>(src, idx, count, out, out_row_stride, stream); break;
      case DType::F16: launch<__half>(src, idx, count, out, out_row_stride, stream); break;
      case DType::BF16: launch<__nv_bfloat16>(src, idx, count, out, out_row_stride, stream); break;
      case DType::F64: launch<double>(src, idx, count, out, out_row_stride, stream); break;
    }
  } catch (...) {
    if (staged) cudaFreeAsync(staged, stream);
    throw;
  }
  if (staged) PYFT_CUDA_CHECK(cudaFreeAsync(staged, stream));
}

}  // namespace cuda
}  // namespace pyft
