// Multi-tensor fused subspace Adam: one launch updates the moments and writes delta for every subspace
// of every targeted weight (see gems_cuda.h for the table). Elementwise and memory bound: per element it
// reads R (2 or 4 B), m, v and writes m, v, delta (fp32), so the only things that matter are one launch
// for all subspaces and full-width (16-byte) memory transactions.
#include <cmath>

#include "gems_common.cuh"

namespace gems {
namespace {

constexpr int kThreads = 256;

struct AdamScalars {
  float lerp_weight;      // 1 - beta1
  float one_minus_lerp;   // 1 - lerp_weight, in float (torch's lerp for weight >= 0.5)
  int lerp_small;         // |weight| < 0.5 selects torch's first lerp formula
  float beta2;
  float one_minus_beta2;  // addcmul_ value
  float inv_bc2_sqrt;     // torch's CUDA div by a CPU scalar multiplies by the (float-rounded) reciprocal
  float eps;
  float neg_step_size;    // addcdiv_ value = -(lr / bias_correction1)
};

// One element, in the order of gems.reference.adam_delta; each torch kernel boundary is a rounding
// boundary (__f*_rn), inside one torch kernel nvcc may contract exactly as it does for torch.
__device__ __forceinline__ float adam_one(float g, float& m, float& v, const AdamScalars& s) {
  m = s.lerp_small ? m + s.lerp_weight * (g - m) : g - (g - m) * s.one_minus_lerp;  // lerp_
  const float vb = __fmul_rn(v, s.beta2);                                            // mul_
  v = vb + s.one_minus_beta2 * g * g;                                                // addcmul_
  const float denom = __fadd_rn(__fmul_rn(__fsqrt_rn(v), s.inv_bc2_sqrt), s.eps);         // sqrt, /, add_
  return __fmul_rn(s.neg_step_size, __fdiv_rn(m, denom));                            // 0 + value*(m/d)
}

// N elements per thread and vector: 16 bytes of R (4 fp32 or 8 bf16/fp16), moments in 16-byte pieces.
template <typename G, int N>
__global__ void __launch_bounds__(kThreads)
subspace_adam_kernel(const AdamEntry* __restrict__ table, int64_t num_entries, AdamScalars s) {
  const int64_t chunk = blockIdx.x;
  const AdamEntry e = table[detail::find_entry(table, num_entries, chunk)];
  const int64_t begin = (chunk - e.chunk_start) * kChunkElems;
  const int64_t end = begin + kChunkElems < e.numel ? begin + kChunkElems : e.numel;
  const G* __restrict__ grad = static_cast<const G*>(e.grad);
  float* __restrict__ m = e.exp_avg;
  float* __restrict__ v = e.exp_avg_sq;
  float* __restrict__ d = e.delta;

  int64_t scalar_begin = begin;
  // begin is a multiple of kChunkElems (so of N): 16-byte aligned bases give aligned vectors throughout.
  if (detail::aligned16(grad) && detail::aligned16(m) && detail::aligned16(v) && detail::aligned16(d)) {
    const int64_t vec_end = begin + (end - begin) / N * N;
    for (int64_t i = begin + int64_t(threadIdx.x) * N; i < vec_end; i += int64_t(kThreads) * N) {
      float gv[N], mv[N], vv[N], dv[N];
      detail::load_vec<G, N>(gv, grad + i);
      detail::load_vec<float, N>(mv, m + i);
      detail::load_vec<float, N>(vv, v + i);
#pragma unroll
      for (int j = 0; j < N; ++j) dv[j] = adam_one(gv[j], mv[j], vv[j], s);
      detail::store_vec<float, N>(m + i, mv);
      detail::store_vec<float, N>(v + i, vv);
      detail::store_vec<float, N>(d + i, dv);
    }
    scalar_begin = vec_end;
  }
  for (int64_t i = scalar_begin + threadIdx.x; i < end; i += kThreads) {
    float mi = m[i], vi = v[i];
    d[i] = adam_one(detail::to_float(grad[i]), mi, vi, s);
    m[i] = mi;
    v[i] = vi;
  }
}

template <typename G, int N>
cudaError_t launch(const AdamEntry* table, int64_t num_entries, int64_t total_chunks, const AdamScalars& s,
                   cudaStream_t stream) {
  subspace_adam_kernel<G, N><<<dim3(static_cast<unsigned>(total_chunks)), kThreads, 0, stream>>>(
      table, num_entries, s);
  return cudaGetLastError();
}

}  // namespace

cudaError_t subspace_adam(const AdamEntry* table_device, int64_t num_entries, int64_t total_chunks,
                          DType grad_dtype, int64_t step, double lr, double beta1, double beta2, double eps,
                          cudaStream_t stream) {
  if (total_chunks == 0) return cudaSuccess;
  if (table_device == nullptr || num_entries <= 0 || total_chunks < 0 || total_chunks > 0x7fffffffLL ||
      step < 1)
    return cudaErrorInvalidValue;
  // Python-float arithmetic of the reference, then the float rounding torch applies to scalar arguments.
  const double bias_correction1 = 1.0 - std::pow(beta1, static_cast<double>(step));
  const double bias_correction2 = 1.0 - std::pow(beta2, static_cast<double>(step));
  AdamScalars s;
  s.lerp_weight = static_cast<float>(1.0 - beta1);
  s.one_minus_lerp = 1.0f - s.lerp_weight;
  s.lerp_small = std::fabs(s.lerp_weight) < 0.5f ? 1 : 0;
  s.beta2 = static_cast<float>(beta2);
  s.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  s.inv_bc2_sqrt = static_cast<float>(1.0 / std::sqrt(bias_correction2));  // reciprocal in double, as recent torch
  s.eps = static_cast<float>(eps);
  s.neg_step_size = static_cast<float>(-(lr / bias_correction1));
  switch (grad_dtype) {
    case kF32: return launch<float, 4>(table_device, num_entries, total_chunks, s, stream);
    case kBF16: return launch<__nv_bfloat16, 8>(table_device, num_entries, total_chunks, s, stream);
    case kF16: return launch<__half, 8>(table_device, num_entries, total_chunks, s, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace gems
