// Small device helpers shared by the CUDA kernels (included by .cu files only).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace pyft {
namespace cuda {

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(double x) { return __double2float_rn(x); }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_f32(float x);
template <>
__device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

/// Converting copy of one element (the compute type of a GEMM from a feature dtype).
template <typename Tout, typename Tin>
__device__ __forceinline__ Tout convert(Tin x) {
  return from_f32<Tout>(to_f32(x));
}
template <>
__device__ __forceinline__ __nv_bfloat16 convert<__nv_bfloat16, __nv_bfloat16>(__nv_bfloat16 x) {
  return x;
}
template <>
__device__ __forceinline__ __half convert<__half, __half>(__half x) {
  return x;
}

/// Sum over a block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
__device__ __forceinline__ float block_sum(float v, float* shared /* 32 floats */) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  __syncthreads();  // `shared` may still be read by a previous reduction
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = lane < warps ? shared[lane] : 0.0f;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

/// Maximum and its first index over a block (ties: smaller index, like argmax). NaN never wins.
__device__ __forceinline__ void block_argmax(float* v, int64_t* i, float* sv /* 32 */,
                                             int64_t* si /* 32 */) {
  auto better = [](float a, int64_t ia, float b, int64_t ib) {
    return b > a || (b == a && ib < ia);
  };
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, *v, o);
    const int64_t oi = __shfl_xor_sync(0xffffffffu, *i, o);
    if (better(*v, *i, ov, oi)) {
      *v = ov;
      *i = oi;
    }
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  __syncthreads();
  if (lane == 0) {
    sv[warp] = *v;
    si[warp] = *i;
  }
  __syncthreads();
  *v = lane < warps ? sv[lane] : -INFINITY;
  *i = lane < warps ? si[lane] : INT64_MAX;
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, *v, o);
    const int64_t oi = __shfl_xor_sync(0xffffffffu, *i, o);
    if (better(*v, *i, ov, oi)) {
      *v = ov;
      *i = oi;
    }
  }
}

}  // namespace cuda
}  // namespace pyft
