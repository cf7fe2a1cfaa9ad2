// The CUDA-build side of common/device.h: device discovery is lazy (the first call that needs a
// device), so importing the module works on machines without a driver.
#include <string>

#include "common/check.h"
#include "common/cuda_check.cuh"
#include "common/device.h"

namespace pyft {

bool built_with_cuda() { return true; }

int cuda_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error for later calls
    return 0;
  }
  return n;
}

void require_cuda_device(int device, const char* op) {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    cudaGetLastError();
    throw std::runtime_error(format(
        "%s needs a CUDA device, but the CUDA runtime found none: %s (%s). pyft was built with "
        "CUDA; run on a machine with an NVIDIA GPU and driver, or pass CPU (NumPy) arrays",
        op, cudaGetErrorName(e), cudaGetErrorString(e)));
  }
  if (n == 0)
    throw std::runtime_error(format("%s needs a CUDA device, but none is visible", op));
  if (device < 0 || device >= n)
    throw std::runtime_error(format("%s: CUDA device %d does not exist (%d visible)", op, device, n));
}

void cuda_copy_to_host(void* dst, const void* src, int64_t bytes, int device,
                       StreamHandle stream) {
  if (bytes <= 0) return;
  require_cuda_device(device, "copying to the host");
  cuda::DeviceGuard guard(device);
  const cudaStream_t s = cuda::as_stream(stream);
  PYFT_CUDA_CHECK(cudaMemcpyAsync(dst, src, static_cast<size_t>(bytes), cudaMemcpyDeviceToHost, s));
  PYFT_CUDA_CHECK(cudaStreamSynchronize(s));
}

}  // namespace pyft
