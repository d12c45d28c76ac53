// Host API of the gems CUDA kernels (csrc/*.cu). Plain C++ + the CUDA runtime API: no torch headers, so
// nvcc compiles the kernels without torch and binding.cpp (the only torch-aware file) just forwards raw
// pointers and sizes. Every launcher enqueues on the given stream, checks cudaGetLastError() after each
// launch and returns the first error (cudaSuccess otherwise); it never synchronises.
//
// Multi-tensor ops (apex's multi_tensor_apply idea): the caller puts one entry per tensor in a *device*
// table, with `chunk_start` = the index of the tensor's first chunk of kChunkElems elements (fill it with
// gems::assign_chunks, which also returns the total number of chunks = the grid size). Entries with
// numel == 0 own no chunk and are never touched. One block processes one chunk and finds its entry by a
// binary search over chunk_start, so a single launch covers any number of tensors of any sizes.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace gems {

// Element types (the binding maps torch dtypes onto these).
enum DType : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

// Elements per chunk of the multi-tensor kernels: 16K elements = 64 KiB of fp32 per stream, enough for
// 256 threads x 8 elements x 8 iterations, small enough that a 128x576 coordinate tensor gives 5 blocks.
constexpr int64_t kChunkElems = 16384;

// One subspace of the fused Adam: `grad` (the projected gradient R, dtype given to the launcher) is read,
// the fp32 moments are updated in place and the fp32 update delta is written. All four have `numel`
// contiguous elements.
struct AdamEntry {
  const void* grad;
  float* exp_avg;
  float* exp_avg_sq;
  float* delta;
  int64_t numel;
  int64_t chunk_start;
};

// One weight of the update epilogue: W (dtype given to the launcher) <- decay(W) + update, where `update`
// is fp32 with the same numel and `protected_part` is null (decay = W) or W's protected component
// Wp = W Q Q^T (or Q Q^T W) in fp32 (decay = W - Wp).
struct UpdateEntry {
  void* weight;
  const float* update;
  const float* protected_part;
  int64_t numel;
  int64_t chunk_start;
};

// One weight of the fused back-projection: W (M x N, row stride ld_weight) <- decay(W) + lhs . rhs with
// lhs M x K row-major (row stride ld_lhs) and rhs K x N, either row-major (element (k, n) at
// k*ld_rhs + n) or "column-major" (element (k, n) at n*ld_rhs + k, i.e. an N x K row-major matrix used
// transposed). lhs, rhs and W share one 16-bit dtype; `protected_part` as in UpdateEntry (M x N, row
// stride ld_weight).
struct GemmEntry {
  void* weight;
  const void* lhs;
  const void* rhs;
  const float* protected_part;
};

// Fills entries[i].chunk_start and returns the total number of chunks.
template <typename Entry>
inline int64_t assign_chunks(Entry* entries, int64_t count) {
  int64_t chunks = 0;
  for (int64_t i = 0; i < count; ++i) {
    entries[i].chunk_start = chunks;
    chunks += (entries[i].numel + kChunkElems - 1) / kChunkElems;
  }
  return chunks;
}

// Adam in every subspace at once, same order of operations as gems.reference.adam_delta:
//   m.lerp_(g, 1-beta1); v = v*beta2 + (1-beta2)*g*g; denom = sqrt(v)/sqrt(1-beta2^step) + eps;
//   delta = -(lr/(1-beta1^step)) * (m/denom).
// Scalars are formed in double then rounded to float, as torch does with Python scalars.
cudaError_t subspace_adam(const AdamEntry* table_device, int64_t num_entries, int64_t total_chunks,
                          DType grad_dtype, int64_t step, double lr, double beta1, double beta2, double eps,
                          cudaStream_t stream);

// W <- W*(1 - lr*wd) + update, or W <- W - lr*wd*(W - Wp) + update for entries with a protected part,
// rounded exactly as gems.reference.apply_update (decay rounded to W's dtype, update rounded to W's
// dtype, then added). No decay at all when lr*wd == 0.
cudaError_t weight_update(const UpdateEntry* table_device, int64_t num_entries, int64_t total_chunks,
                          DType weight_dtype, double lr, double weight_decay, cudaStream_t stream);

// Fused back-projection GEMM on tensor cores (WMMA, 16-bit inputs, fp32 accumulation) with the update
// epilogue of weight_update, for `num_entries` weights of the same shape in one launch. dtype must be
// kBF16 or kF16; needs sm_80 or newer (returns cudaErrorInvalidDeviceFunction otherwise).
cudaError_t back_project_update(const GemmEntry* table_device, int64_t num_entries, int64_t M, int64_t N,
                                int64_t K, int64_t ld_lhs, int64_t ld_rhs, int64_t ld_weight,
                                bool rhs_col_major, DType dtype, double lr, double weight_decay,
                                cudaStream_t stream);

}  // namespace gems
