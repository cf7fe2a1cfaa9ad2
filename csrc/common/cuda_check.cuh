// Error checking for CUDA runtime and cuBLAS calls (included by .cu files only).
//
// Every call's status is checked; a failure becomes std::runtime_error (RuntimeError in Python)
// naming the call, the error and the source line, never a crash or a silently wrong result.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "common/check.h"

namespace pyft {
namespace cuda {

inline const char* cublas_status_name(cublasStatus_t s) {
  switch (s) {
    case CUBLAS_STATUS_SUCCESS: return "CUBLAS_STATUS_SUCCESS";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_ALLOC_FAILED: return "CUBLAS_STATUS_ALLOC_FAILED";
    case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_ARCH_MISMATCH: return "CUBLAS_STATUS_ARCH_MISMATCH";
    case CUBLAS_STATUS_MAPPING_ERROR: return "CUBLAS_STATUS_MAPPING_ERROR";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
    case CUBLAS_STATUS_INTERNAL_ERROR: return "CUBLAS_STATUS_INTERNAL_ERROR";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
    case CUBLAS_STATUS_LICENSE_ERROR: return "CUBLAS_STATUS_LICENSE_ERROR";
    default: return "unknown cuBLAS status";
  }
}

[[noreturn]] inline void throw_cuda(cudaError_t e, const char* call, const char* file, int line) {
  throw std::runtime_error(::pyft::format("pyft CUDA error: %s failed with %s (%s) at %s:%d",
                                          call, cudaGetErrorName(e), cudaGetErrorString(e), file,
                                          line));
}

[[noreturn]] inline void throw_cublas(cublasStatus_t s, const char* call, const char* file,
                                      int line) {
  throw std::runtime_error(::pyft::format("pyft cuBLAS error: %s failed with %s at %s:%d", call,
                                          cublas_status_name(s), file, line));
}

}  // namespace cuda
}  // namespace pyft

#define PYFT_CUDA_CHECK(call)                                                      \
  do {                                                                             \
    const cudaError_t pyft_err_ = (call);                                          \
    if (pyft_err_ != cudaSuccess) ::pyft::cuda::throw_cuda(pyft_err_, #call, __FILE__, __LINE__); \
  } while (0)

#define PYFT_CUBLAS_CHECK(call)                                                    \
  do {                                                                             \
    const cublasStatus_t pyft_st_ = (call);                                        \
    if (pyft_st_ != CUBLAS_STATUS_SUCCESS)                                         \
      ::pyft::cuda::throw_cublas(pyft_st_, #call, __FILE__, __LINE__);             \
  } while (0)

/// After a kernel launch: launch-configuration errors surface here, not at the next call.
#define PYFT_CUDA_LAUNCH_CHECK() PYFT_CUDA_CHECK(cudaGetLastError())

namespace pyft {
namespace cuda {

inline cudaStream_t as_stream(uintptr_t h) { return reinterpret_cast<cudaStream_t>(h); }

/// Makes `device` current for the scope and restores the caller's device afterwards.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    PYFT_CUDA_CHECK(cudaGetDevice(&previous_));
    if (previous_ != device) PYFT_CUDA_CHECK(cudaSetDevice(device));
  }
  ~DeviceGuard() { cudaSetDevice(previous_); }  // never throws from a destructor
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

/// Device memory owned by the scope (cudaFree in the destructor, errors ignored there).
template <typename T>
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(int64_t n) { resize(n); }
  ~DeviceBuffer() { release(); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  void resize(int64_t n) {
    release();
    if (n > 0) {
      void* p = nullptr;
      PYFT_CUDA_CHECK(cudaMalloc(&p, static_cast<size_t>(n) * sizeof(T)));
      ptr_ = static_cast<T*>(p);
      size_ = n;
    }
  }
  T* get() const { return ptr_; }
  int64_t size() const { return size_; }
  size_t bytes() const { return static_cast<size_t>(size_) * sizeof(T); }

 private:
  void release() {
    if (ptr_) cudaFree(ptr_);
    ptr_ = nullptr;
    size_ = 0;
  }
  T* ptr_ = nullptr;
  int64_t size_ = 0;
};

}  // namespace cuda
}  // namespace pyft
