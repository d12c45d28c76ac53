// Fused back-projection + weight update on tensor cores: for each weight k (blockIdx.z),
//   W_k <- decay(W_k) + lhs_k . rhs_k
// with lhs = the concatenated gated bases [a0 B0, a1 B1, ...] (left side, M x sum r) or the stacked
// deltas (right side, M x sum r), rhs = the stacked deltas (left, sum r x N row-major) or the gated bases
// used transposed (right, stored N x sum r: "column-major" rhs). Inputs are bf16/fp16 (WMMA 16x16x16),
// accumulation fp32, the epilogue is gems::detail::update_one (same roundings as apply_update) so Delta
// is never written to memory: W is read once and written once.
//
// Tiling: 64x64 output tile per block of 4 warps (2x2, 32x32 = 2x2 fragments each), K step 32, operands
// staged through padded shared memory (+8 halves per row: rows stay 16-byte aligned for the vector
// loads, fragment pointers stay 32-byte aligned, and consecutive rows shift banks). Any M, N, K: tiles
// are zero-filled past the edges and the epilogue is bounds-checked; 16-byte global loads where the
// address is aligned and the 8 elements are in range, scalar loads otherwise. sum r is small (hundreds to
// a few thousand) next to M*N, so a single-stage pipeline keeps the kernel short; a cp.async
// double-buffered mainloop is the next step if profiling on a GPU shows the K loop stalling on loads.
#include <type_traits>

#include <mma.h>

#include "gems_common.cuh"

namespace gems {
namespace {

constexpr int kBM = 64, kBN = 64, kBK = 32;
constexpr int kThreads = 128;      // 4 warps
constexpr int kPad = 8;            // halves of padding per shared row
constexpr int kLdA = kBK + kPad;   // sA: kBM rows x kBK (+pad)
constexpr int kLdBRow = kBN + kPad;  // row-major rhs tile: kBK rows x kBN
constexpr int kLdBCol = kBK + kPad;  // column-major rhs tile: kBN rows (n) x kBK (k)
constexpr int kLdC = kBN + 4;        // fp32 accumulator tile, multiple of 4 floats as WMMA requires
constexpr int kVec = 8;              // 16-bit elements per 16-byte vector

constexpr int kSmemA = kBM * kLdA * 2;
constexpr int kSmemB = (kBK * kLdBRow > kBN * kLdBCol ? kBK * kLdBRow : kBN * kLdBCol) * 2;
constexpr int kSmemC = kBM * kLdC * 4;
constexpr int kSmemBytes = (kSmemA + kSmemB > kSmemC) ? kSmemA + kSmemB : kSmemC;
static_assert(kSmemA % 128 == 0, "sB must stay 128-byte aligned");

// Copies a rows x cols tile of a row-major global matrix (row stride ld, bounds R x C) starting at (r0, c0)
// into shared memory (row stride lds), zero-filling outside the matrix.
template <typename T, int kRows, int kCols>
__device__ __forceinline__ void load_tile(T* __restrict__ dst, int lds, const T* __restrict__ src, int64_t ld,
                                          int64_t R, int64_t C, int64_t r0, int64_t c0) {
  constexpr int kVecsPerRow = kCols / kVec;
  const T zero = detail::from_float<T>(0.0f);
#pragma unroll
  for (int v = threadIdx.x; v < kRows * kVecsPerRow; v += kThreads) {
    const int r = v / kVecsPerRow;
    const int c = (v % kVecsPerRow) * kVec;
    const int64_t gr = r0 + r, gc = c0 + c;
    T* d = dst + r * lds + c;
    if (gr < R) {
      const T* s = src + gr * ld + gc;
      if (gc + kVec <= C && detail::aligned16(s)) {
        *reinterpret_cast<uint4*>(d) = *reinterpret_cast<const uint4*>(s);
      } else {
#pragma unroll
        for (int j = 0; j < kVec; ++j) d[j] = gc + j < C ? s[j] : zero;
      }
    } else {
#pragma unroll
      for (int j = 0; j < kVec; ++j) d[j] = zero;
    }
  }
}

template <typename T, bool kRhsColMajor>
__global__ void __launch_bounds__(kThreads)
back_project_kernel(const GemmEntry* __restrict__ table, int64_t entry_offset, int64_t M, int64_t N, int64_t K,
                    int64_t ld_lhs, int64_t ld_rhs, int64_t ld_w, detail::DecayScalars s) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // bf16 WMMA needs sm_80; the launcher refuses older devices before getting here
#else
  using namespace nvcuda;
  using RhsLayout = typename std::conditional<kRhsColMajor, wmma::col_major, wmma::row_major>::type;
  __shared__ __align__(128) unsigned char smem[kSmemBytes];
  T* sA = reinterpret_cast<T*>(smem);
  T* sB = reinterpret_cast<T*>(smem + kSmemA);
  float* sC = reinterpret_cast<float*>(smem);  // reused after the K loop

  const GemmEntry e = table[entry_offset + blockIdx.z];
  const T* __restrict__ lhs = static_cast<const T*>(e.lhs);
  const T* __restrict__ rhs = static_cast<const T*>(e.rhs);
  const int64_t m0 = int64_t(blockIdx.y) * kBM, n0 = int64_t(blockIdx.x) * kBN;
  const int warp = threadIdx.x / 32;
  const int wm = (warp / 2) * 32, wn = (warp % 2) * 32;

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

  for (int64_t k0 = 0; k0 < K; k0 += kBK) {
    load_tile<T, kBM, kBK>(sA, kLdA, lhs, ld_lhs, M, K, m0, k0);
    if constexpr (kRhsColMajor) {
      load_tile<T, kBN, kBK>(sB, kLdBCol, rhs, ld_rhs, N, K, n0, k0);  // stored N x K
    } else {
      load_tile<T, kBK, kBN>(sB, kLdBRow, rhs, ld_rhs, K, N, k0, n0);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kBK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, RhsLayout> b[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(a[i], sA + (wm + i * 16) * kLdA + kk, kLdA);
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        if constexpr (kRhsColMajor) {
          wmma::load_matrix_sync(b[j], sB + (wn + j * 16) * kLdBCol + kk, kLdBCol);
        } else {
          wmma::load_matrix_sync(b[j], sB + kk * kLdBRow + wn + j * 16, kLdBRow);
        }
      }
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(sC + (wm + i * 16) * kLdC + wn + j * 16, acc[i][j], kLdC, wmma::mem_row_major);
  __syncthreads();

  // Epilogue: 8 consecutive columns per thread and step, 16-byte accesses to W (and Wp) when possible.
  T* __restrict__ w = static_cast<T*>(e.weight);
  const float* __restrict__ wp = e.protected_part;
  const bool has_wp = wp != nullptr;
  constexpr int kVecsPerRow = kBN / kVec;
  for (int v = threadIdx.x; v < kBM * kVecsPerRow; v += kThreads) {
    const int r = v / kVecsPerRow;
    const int c = (v % kVecsPerRow) * kVec;
    const int64_t gr = m0 + r, gc = n0 + c;
    if (gr >= M) continue;
    const int64_t off = gr * ld_w + gc;
    const float* cv = sC + r * kLdC + c;
    if (gc + kVec <= N && detail::aligned16(w + off) && (!has_wp || detail::aligned16(wp + off))) {
      float wv[kVec], pv[kVec];
      detail::load_vec<T, kVec>(wv, w + off);
      if (has_wp) {
        detail::load_vec<float, kVec>(pv, wp + off);
      } else {
#pragma unroll
        for (int j = 0; j < kVec; ++j) pv[j] = 0.0f;
      }
#pragma unroll
      for (int j = 0; j < kVec; ++j) wv[j] = detail::update_one<T>(wv[j], cv[j], has_wp, pv[j], s);
      detail::store_vec<T, kVec>(w + off, wv);
    } else {
      for (int j = 0; j < kVec && gc + j < N; ++j) {
        const float p = has_wp ? wp[off + j] : 0.0f;
        w[off + j] = detail::from_float<T>(detail::update_one<T>(detail::to_float(w[off + j]), cv[j], has_wp, p, s));
      }
    }
  }
#endif
}

template <typename T, bool kRhsColMajor>
cudaError_t launch(const GemmEntry* table, int64_t num_entries, int64_t M, int64_t N, int64_t K, int64_t ld_lhs,
                   int64_t ld_rhs, int64_t ld_w, const detail::DecayScalars& s, cudaStream_t stream) {
  const dim3 block(kThreads);
  for (int64_t first = 0; first < num_entries; first += 65535) {  // gridDim.z limit
    const int64_t count = num_entries - first < 65535 ? num_entries - first : 65535;
    const dim3 grid(static_cast<unsigned>((N + kBN - 1) / kBN), static_cast<unsigned>((M + kBM - 1) / kBM),
                    static_cast<unsigned>(count));
    back_project_kernel<T, kRhsColMajor><<<grid, block, 0, stream>>>(table, first, M, N, K, ld_lhs, ld_rhs, ld_w, s);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace

cudaError_t back_project_update(const GemmEntry* table_device, int64_t num_entries, int64_t M, int64_t N,
                                int64_t K, int64_t ld_lhs, int64_t ld_rhs, int64_t ld_weight,
                                bool rhs_col_major, DType dtype, double lr, double weight_decay,
                                cudaStream_t stream) {
  if (num_entries == 0 || M == 0 || N == 0) return cudaSuccess;
  if (table_device == nullptr || num_entries < 0 || M < 0 || N < 0 || K < 0 ||
      (N + kBN - 1) / kBN > 0x7fffffffLL || (M + kBM - 1) / kBM > 65535)
    return cudaErrorInvalidValue;
  int device = 0, major = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  if (err != cudaSuccess) return err;
  if (major < 8) return cudaErrorInvalidDeviceFunction;
  const detail::DecayScalars s = detail::make_decay(lr, weight_decay);
  if (dtype == kBF16) {
    return rhs_col_major
               ? launch<__nv_bfloat16, true>(table_device, num_entries, M, N, K, ld_lhs, ld_rhs, ld_weight, s, stream)
               : launch<__nv_bfloat16, false>(table_device, num_entries, M, N, K, ld_lhs, ld_rhs, ld_weight, s, stream);
  }
  if (dtype == kF16) {
    return rhs_col_major
               ? launch<__half, true>(table_device, num_entries, M, N, K, ld_lhs, ld_rhs, ld_weight, s, stream)
               : launch<__half, false>(table_device, num_entries, M, N, K, ld_lhs, ld_rhs, ld_weight, s, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace gems
