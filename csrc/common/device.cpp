// The CPU-build side of common/device.h; a CUDA build gets common/device_cuda.cu instead.
#include "common/device.h"

#include <stdexcept>

namespace pyft {

#if !defined(PYFT_WITH_CUDA)

namespace {
[[noreturn]] void no_cuda() {
  throw std::runtime_error("pyft was built without CUDA; rebuild with PYFT_ENABLE_CUDA=ON");
}
}  // namespace

bool built_with_cuda() { return false; }
int cuda_device_count() { return 0; }
void require_cuda_device(int, const char*) { no_cuda(); }
void cuda_copy_to_host(void*, const void*, int64_t, int, StreamHandle) { no_cuda(); }

#endif

}  // namespace pyft
