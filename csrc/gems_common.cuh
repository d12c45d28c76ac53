// Device helpers shared by the gems kernels: dtype conversion, 16-byte vector loads/stores, the
// multi-tensor entry lookup and the weight-update epilogue (one definition, used by weight_update.cu and
// back_project.cu so both round exactly like gems.reference.apply_update).
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "gems_cuda.h"

namespace gems {
namespace detail {

template <DType D> struct Storage;
template <> struct Storage<kF32> { using type = float; };
template <> struct Storage<kBF16> { using type = __nv_bfloat16; };
template <> struct Storage<kF16> { using type = __half; };

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }

// Round x to T and back: the value torch holds after `.to(T)`.
template <typename T> __device__ __forceinline__ float round_to(float x) { return to_float(from_float<T>(x)); }

__host__ __device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & uintptr_t(15)) == 0;
}

// N elements of T (N*sizeof(T) a multiple of 16, p 16-byte aligned) in 16-byte pieces, as floats.
template <typename T, int N>
__device__ __forceinline__ void load_vec(float (&out)[N], const T* p) {
  static_assert((N * sizeof(T)) % 16 == 0, "vector must be whole 16-byte pieces");
  alignas(16) T buf[N];
#pragma unroll
  for (int q = 0; q < int(N * sizeof(T) / 16); ++q)
    reinterpret_cast<uint4*>(buf)[q] = reinterpret_cast<const uint4*>(p)[q];
#pragma unroll
  for (int j = 0; j < N; ++j) out[j] = to_float(buf[j]);
}

template <typename T, int N>
__device__ __forceinline__ void store_vec(T* p, const float (&in)[N]) {
  static_assert((N * sizeof(T)) % 16 == 0, "vector must be whole 16-byte pieces");
  alignas(16) T buf[N];
#pragma unroll
  for (int j = 0; j < N; ++j) buf[j] = from_float<T>(in[j]);
#pragma unroll
  for (int q = 0; q < int(N * sizeof(T) / 16); ++q)
    reinterpret_cast<uint4*>(p)[q] = reinterpret_cast<const uint4*>(buf)[q];
}

// Index of the entry owning `chunk`: the last entry with chunk_start <= chunk. Entries with no chunk
// (numel 0) share chunk_start with their successor and are skipped because the search takes the last.
template <typename Entry>
__device__ __forceinline__ int64_t find_entry(const Entry* table, int64_t count, int64_t chunk) {
  int64_t lo = 0, hi = count - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) >> 1;
    if (table[mid].chunk_start <= chunk) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// Scalars of the decoupled decay, formed in double and rounded to float like torch's Python scalars.
struct DecayScalars {
  float factor;  // 1 - lr*wd   (W.mul_(1 - lr*wd))
  float lr_wd;   // lr*wd       (W - lr*wd*(W - Wp))
  int decay;     // 0 when lr*wd == 0: the reference skips decay altogether
};

inline DecayScalars make_decay(double lr, double weight_decay) {
  DecayScalars s;
  s.factor = static_cast<float>(1.0 - lr * weight_decay);
  s.lr_wd = static_cast<float>(lr * weight_decay);
  s.decay = (lr != 0.0 && weight_decay != 0.0) ? 1 : 0;
  return s;
}

// new W for one element, same roundings as gems.reference.apply_update; the __f*_rn intrinsics stop
// nvcc from contracting steps that torch runs as separate kernels into an FMA.
template <typename T>
__device__ __forceinline__ float update_one(float w, float update, bool has_protected, float wp,
                                            const DecayScalars& s) {
  if (s.decay) {
    if (has_protected) {
      w = round_to<T>(__fsub_rn(w, __fmul_rn(s.lr_wd, __fsub_rn(w, wp))));
    } else {
      w = round_to<T>(__fmul_rn(w, s.factor));
    }
  }
  return __fadd_rn(w, round_to<T>(update));
}

}  // namespace detail
}  // namespace gems
