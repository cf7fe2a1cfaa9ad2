// The few DLPack (https://github.com/dmlc/dlpack, Apache-2.0) structures pyft reads: a borrowed
// DLManagedTensor from a "dltensor" capsule. Layouts copied from dlpack.h v1.x (the legacy,
// unversioned tensor, which every producer still hands out when no max_version is asked for);
// vendored so the core needs no DLPack or torch headers at build time.
#pragma once

#include <cstdint>

namespace pyft {
namespace dlpack {

enum DeviceType : int32_t { kCPU = 1, kCUDA = 2, kCUDAHost = 3, kROCM = 10, kCUDAManaged = 13 };
enum TypeCode : uint8_t { kInt = 0, kUInt = 1, kFloat = 2, kBfloat = 4 };

struct Device {
  int32_t device_type;
  int32_t device_id;
};

struct DataType {
  uint8_t code;
  uint8_t bits;
  uint16_t lanes;
};

struct Tensor {
  void* data;
  Device device;
  int32_t ndim;
  DataType dtype;
  int64_t* shape;
  int64_t* strides;  ///< in elements; null means C-contiguous
  uint64_t byte_offset;
};

struct ManagedTensor {
  Tensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(ManagedTensor* self);
};

}  // namespace dlpack
}  // namespace pyft
