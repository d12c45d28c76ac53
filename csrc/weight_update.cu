// Multi-tensor weight-update epilogue: W <- decay(W) + Delta for every weight in one launch, with
// decay(W) = W*(1 - lr*wd) or, for a protected weight, W - lr*wd*(W - Wp) (null-space-aware decay; Wp,
// the protected component, comes from a torch GEMM). Delta is the fp32 output of the cuBLAS
// back-projection. Memory bound: reads W, Delta (and Wp), writes W once.
#include "gems_common.cuh"

namespace gems {
namespace {

constexpr int kThreads = 256;

// N = 16 bytes of W (4 fp32 or 8 bf16/fp16) per thread and vector.
template <typename T, int N>
__global__ void __launch_bounds__(kThreads)
weight_update_kernel(const UpdateEntry* __restrict__ table, int64_t num_entries, detail::DecayScalars s) {
  const int64_t chunk = blockIdx.x;
  const UpdateEntry e = table[detail::find_entry(table, num_entries, chunk)];
  const int64_t begin = (chunk - e.chunk_start) * kChunkElems;
  const int64_t end = begin + kChunkElems < e.numel ? begin + kChunkElems : e.numel;
  T* __restrict__ w = static_cast<T*>(e.weight);
  const float* __restrict__ u = e.update;
  const float* __restrict__ wp = e.protected_part;
  const bool has_wp = wp != nullptr;

  int64_t scalar_begin = begin;
  if (detail::aligned16(w) && detail::aligned16(u) && (!has_wp || detail::aligned16(wp))) {
    const int64_t vec_end = begin + (end - begin) / N * N;
    for (int64_t i = begin + int64_t(threadIdx.x) * N; i < vec_end; i += int64_t(kThreads) * N) {
      float wv[N], uv[N], pv[N];
      detail::load_vec<T, N>(wv, w + i);
      detail::load_vec<float, N>(uv, u + i);
      if (has_wp) {
        detail::load_vec<float, N>(pv, wp + i);
      } else {
#pragma unroll
        for (int j = 0; j < N; ++j) pv[j] = 0.0f;
      }
#pragma unroll
      for (int j = 0; j < N; ++j) wv[j] = detail::update_one<T>(wv[j], uv[j], has_wp, pv[j], s);
      detail::store_vec<T, N>(w + i, wv);
    }
    scalar_begin = vec_end;
  }
  for (int64_t i = scalar_begin + threadIdx.x; i < end; i += kThreads) {
    const float p = has_wp ? wp[i] : 0.0f;
    w[i] = detail::from_float<T>(detail::update_one<T>(detail::to_float(w[i]), u[i], has_wp, p, s));
  }
}

template <typename T, int N>
cudaError_t launch(const UpdateEntry* table, int64_t num_entries, int64_t total_chunks,
                   const detail::DecayScalars& s, cudaStream_t stream) {
  weight_update_kernel<T, N><<<dim3(static_cast<unsigned>(total_chunks)), kThreads, 0, stream>>>(
      table, num_entries, s);
  return cudaGetLastError();
}

}  // namespace

cudaError_t weight_update(const UpdateEntry* table_device, int64_t num_entries, int64_t total_chunks,
                          DType weight_dtype, double lr, double weight_decay, cudaStream_t stream) {
  if (total_chunks == 0) return cudaSuccess;
  if (table_device == nullptr || num_entries <= 0 || total_chunks < 0 || total_chunks > 0x7fffffffLL)
    return cudaErrorInvalidValue;
  const detail::DecayScalars s = detail::make_decay(lr, weight_decay);
  switch (weight_dtype) {
    case kF32: return launch<float, 4>(table_device, num_entries, total_chunks, s, stream);
    case kBF16: return launch<__nv_bfloat16, 8>(table_device, num_entries, total_chunks, s, stream);
    case kF16: return launch<__half, 8>(table_device, num_entries, total_chunks, s, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace gems
