// Thin torch binding of the gems CUDA kernels (csrc/*.cu): TORCH_CHECK-style argument checks, a device
// table of raw pointers per multi-tensor call, and a Python error on any non-success cudaError_t.
// Only CPU-side torch headers are used (the stream comes from Python as an integer,
// torch.cuda.current_stream().cuda_stream), so this file also compiles against a CPU build of torch.
// python/gems/cuda_backend.py validates everything first; the checks here are the last line of defence.
// Narrow torch includes (not torch/extension.h): the same binding, about a third less compile time.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/python.h>

#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "gems_cuda.h"

namespace {

gems::DType dtype_code(const at::Tensor& t, const char* what) {
  switch (t.scalar_type()) {
    case at::kFloat: return gems::kF32;
    case at::kBFloat16: return gems::kBF16;
    case at::kHalf: return gems::kF16;
    default: break;
  }
  TORCH_CHECK_TYPE(false, what, " must be float32, bfloat16 or float16, got ", t.scalar_type());
  return gems::kF32;
}

void check_tensor(const at::Tensor& t, const at::Device& device, const char* what) {
  TORCH_CHECK_VALUE(t.device() == device, what, " must be on ", device, ", got ", t.device());
  TORCH_CHECK_VALUE(t.is_contiguous(), what, " must be contiguous");
}

void check_fp32(const at::Tensor& t, const at::Device& device, int64_t numel, const char* what) {
  check_tensor(t, device, what);
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, what, " must be float32, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.numel() == numel, what, " has ", t.numel(), " elements, expected ", numel);
}

cudaStream_t as_stream(int64_t stream) {
  return reinterpret_cast<cudaStream_t>(static_cast<uintptr_t>(stream));
}

void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "gems CUDA ", what, " failed: ", cudaGetErrorName(err), ": ",
              cudaGetErrorString(err));
}

// The entries as a byte tensor on `device`: staged in pinned memory and copied on the current stream
// (the caller launches on that stream, so the caching allocator's stream ordering keeps the table alive
// until the kernel has read it, and the pinned buffer until the copy is done).
template <typename Entry>
at::Tensor device_table(const std::vector<Entry>& entries, const at::Device& device) {
  const int64_t bytes = static_cast<int64_t>(entries.size() * sizeof(Entry));
  at::Tensor host = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host.data_ptr(), entries.data(), static_cast<size_t>(bytes));
  return host.to(device, /*non_blocking=*/true);
}

void subspace_adam(const std::vector<at::Tensor>& grads, const std::vector<at::Tensor>& exp_avgs,
                   const std::vector<at::Tensor>& exp_avg_sqs, const std::vector<at::Tensor>& deltas,
                   int64_t step, double lr, double beta1, double beta2, double eps, int64_t stream) {
  const size_t n = grads.size();
  TORCH_CHECK_VALUE(exp_avgs.size() == n && exp_avg_sqs.size() == n && deltas.size() == n,
                    "subspace_adam: grads, exp_avgs, exp_avg_sqs and deltas must have the same length");
  TORCH_CHECK_VALUE(step >= 1, "subspace_adam: step must be >= 1, got ", step);
  if (n == 0) return;
  const at::Device device = grads[0].device();
  TORCH_CHECK_VALUE(device.is_cuda(), "subspace_adam: tensors must be CUDA tensors, got ", device);
  const gems::DType grad_dtype = dtype_code(grads[0], "grad");
  std::vector<gems::AdamEntry> entries;
  entries.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    const int64_t numel = grads[i].numel();
    check_tensor(grads[i], device, "grad");
    TORCH_CHECK_TYPE(dtype_code(grads[i], "grad") == grad_dtype, "subspace_adam: all grads must share one dtype");
    check_fp32(exp_avgs[i], device, numel, "exp_avg");
    check_fp32(exp_avg_sqs[i], device, numel, "exp_avg_sq");
    check_fp32(deltas[i], device, numel, "delta");
    if (numel == 0) continue;
    entries.push_back({grads[i].data_ptr(), exp_avgs[i].data_ptr<float>(), exp_avg_sqs[i].data_ptr<float>(),
                       deltas[i].data_ptr<float>(), numel, 0});
  }
  if (entries.empty()) return;
  const int64_t chunks = gems::assign_chunks(entries.data(), static_cast<int64_t>(entries.size()));
  const at::Tensor table = device_table(entries, device);
  check_cuda(gems::subspace_adam(static_cast<const gems::AdamEntry*>(table.data_ptr()),
                                 static_cast<int64_t>(entries.size()), chunks, grad_dtype, step, lr, beta1,
                                 beta2, eps, as_stream(stream)),
             "subspace_adam");
}

void weight_update(const std::vector<at::Tensor>& weights, const std::vector<at::Tensor>& updates,
                   const std::vector<std::optional<at::Tensor>>& protected_parts, double lr,
                   double weight_decay, int64_t stream) {
  const size_t n = weights.size();
  TORCH_CHECK_VALUE(updates.size() == n && protected_parts.size() == n,
                    "weight_update: weights, updates and protected_parts must have the same length");
  if (n == 0) return;
  const at::Device device = weights[0].device();
  TORCH_CHECK_VALUE(device.is_cuda(), "weight_update: tensors must be CUDA tensors, got ", device);
  const gems::DType dtype = dtype_code(weights[0], "weight");
  std::vector<gems::UpdateEntry> entries;
  entries.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    const int64_t numel = weights[i].numel();
    check_tensor(weights[i], device, "weight");
    TORCH_CHECK_TYPE(dtype_code(weights[i], "weight") == dtype, "weight_update: all weights must share one dtype");
    check_fp32(updates[i], device, numel, "update");
    const float* wp = nullptr;
    if (protected_parts[i].has_value()) {
      check_fp32(*protected_parts[i], device, numel, "protected_part");
      wp = protected_parts[i]->data_ptr<float>();
    }
    if (numel == 0) continue;
    entries.push_back({weights[i].data_ptr(), updates[i].data_ptr<float>(), wp, numel, 0});
  }
  if (entries.empty()) return;
  const int64_t chunks = gems::assign_chunks(entries.data(), static_cast<int64_t>(entries.size()));
  const at::Tensor table = device_table(entries, device);
  check_cuda(gems::weight_update(static_cast<const gems::UpdateEntry*>(table.data_ptr()),
                                 static_cast<int64_t>(entries.size()), chunks, dtype, lr, weight_decay,
                                 as_stream(stream)),
             "weight_update");
}

void back_project_update(const std::vector<at::Tensor>& weights, const std::vector<at::Tensor>& lhs,
                         const std::vector<at::Tensor>& rhs,
                         const std::vector<std::optional<at::Tensor>>& protected_parts, bool rhs_col_major,
                         double lr, double weight_decay, int64_t stream) {
  const size_t n = weights.size();
  TORCH_CHECK_VALUE(lhs.size() == n && rhs.size() == n && protected_parts.size() == n,
                    "back_project_update: weights, lhs, rhs and protected_parts must have the same length");
  if (n == 0) return;
  const at::Device device = weights[0].device();
  TORCH_CHECK_VALUE(device.is_cuda(), "back_project_update: tensors must be CUDA tensors, got ", device);
  const gems::DType dtype = dtype_code(weights[0], "weight");
  TORCH_CHECK_TYPE(dtype != gems::kF32, "back_project_update: the tensor-core kernel takes bfloat16 or float16 weights");
  TORCH_CHECK_VALUE(weights[0].dim() == 2 && lhs[0].dim() == 2 && rhs[0].dim() == 2,
                    "back_project_update: weights, lhs and rhs must be 2-D");
  const int64_t M = weights[0].size(0), N = weights[0].size(1), K = lhs[0].size(1);
  std::vector<gems::GemmEntry> entries;
  entries.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    check_tensor(weights[i], device, "weight");
    check_tensor(lhs[i], device, "lhs");
    check_tensor(rhs[i], device, "rhs");
    TORCH_CHECK_TYPE(weights[i].scalar_type() == weights[0].scalar_type() &&
                         lhs[i].scalar_type() == weights[0].scalar_type() &&
                         rhs[i].scalar_type() == weights[0].scalar_type(),
                     "back_project_update: weights, lhs and rhs must share one dtype");
    TORCH_CHECK_VALUE(weights[i].sizes() == weights[0].sizes(), "back_project_update: weights must share one shape");
    TORCH_CHECK_VALUE(lhs[i].dim() == 2 && lhs[i].size(0) == M && lhs[i].size(1) == K,
                      "back_project_update: lhs must be ", M, " x ", K, ", got ", lhs[i].sizes());
    if (rhs_col_major) {
      TORCH_CHECK_VALUE(rhs[i].dim() == 2 && rhs[i].size(0) == N && rhs[i].size(1) == K,
                        "back_project_update: column-major rhs must be stored ", N, " x ", K, ", got ", rhs[i].sizes());
    } else {
      TORCH_CHECK_VALUE(rhs[i].dim() == 2 && rhs[i].size(0) == K && rhs[i].size(1) == N,
                        "back_project_update: rhs must be ", K, " x ", N, ", got ", rhs[i].sizes());
    }
    const float* wp = nullptr;
    if (protected_parts[i].has_value()) {
      check_fp32(*protected_parts[i], device, M * N, "protected_part");
      wp = protected_parts[i]->data_ptr<float>();
    }
    entries.push_back({weights[i].data_ptr(), lhs[i].data_ptr(), rhs[i].data_ptr(), wp});
  }
  if (M == 0 || N == 0) return;
  const at::Tensor table = device_table(entries, device);
  check_cuda(gems::back_project_update(static_cast<const gems::GemmEntry*>(table.data_ptr()),
                                       static_cast<int64_t>(n), M, N, K, /*ld_lhs=*/K, /*ld_rhs=*/rhs_col_major ? K : N,
                                       /*ld_weight=*/N, rhs_col_major, dtype, lr, weight_decay, as_stream(stream)),
             "back_project_update");
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "gems CUDA kernels: multi-tensor subspace Adam, weight-update epilogue, fused WMMA back-projection";
  m.attr("CHUNK_ELEMS") = gems::kChunkElems;
  m.def("subspace_adam", &subspace_adam, "Fused Adam over many subspaces in one launch (moments in place, writes deltas)",
        py::arg("grads"), py::arg("exp_avgs"), py::arg("exp_avg_sqs"), py::arg("deltas"), py::arg("step"),
        py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("stream"));
  m.def("weight_update", &weight_update, "W <- decay(W) + update for many weights in one launch",
        py::arg("weights"), py::arg("updates"), py::arg("protected_parts"), py::arg("lr"), py::arg("weight_decay"),
        py::arg("stream"));
  m.def("back_project_update", &back_project_update,
        "W <- decay(W) + lhs @ rhs on tensor cores (bf16/fp16), many weights of one shape in one launch",
        py::arg("weights"), py::arg("lhs"), py::arg("rhs"), py::arg("protected_parts"), py::arg("rhs_col_major"),
        py::arg("lr"), py::arg("weight_decay"), py::arg("stream"));
}
