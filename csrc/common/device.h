// CUDA devices as the plain C++ API sees them: an ordinal and a stream handle, no CUDA types, so
// that every .cpp file compiles the same with or without the CUDA toolkit.
#pragma once

#include <cstdint>

namespace pyft {

/// Where an array lives: kHost, or a CUDA device ordinal (>= 0).
constexpr int kHost = -1;

/// A cudaStream_t carried as an integer: 0 is the legacy default stream; 1 and 2 are CUDA's
/// cudaStreamLegacy and cudaStreamPerThread handles (the same numbers DLPack uses).
using StreamHandle = uintptr_t;

/// True when this build has the CUDA kernels (PYFT_ENABLE_CUDA=ON).
bool built_with_cuda();

/// CUDA devices the driver reports; 0 without a driver, without a device or in a CPU build.
/// Never throws: it is what `pyft info` and the tests ask before trying a device.
int cuda_device_count();

/// Throws std::runtime_error for environment problems that stop `op` from running on `device`:
/// a CPU-only build, no driver or device, or an ordinal out of range.
void require_cuda_device(int device, const char* op);

/// Copies `bytes` from device memory on `device` to host memory (stream-ordered, then waits).
void cuda_copy_to_host(void* dst, const void* src, int64_t bytes, int device,
                       StreamHandle stream);

}  // namespace pyft
