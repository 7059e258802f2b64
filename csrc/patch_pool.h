// Shared by the CPU and CUDA patch-pooling kernels.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string_view>

namespace mdus {

enum class Reduce : int { Sum = 0, Mean = 1, Max = 2, Min = 3 };

inline Reduce parse_reduce(std::string_view reduce) {
  if (reduce == "sum") return Reduce::Sum;
  if (reduce == "mean") return Reduce::Mean;
  if (reduce == "max") return Reduce::Max;
  if (reduce == "min") return Reduce::Min;
  TORCH_CHECK_VALUE(false, "reduce must be one of 'mean', 'max', 'min', 'sum', got '", reduce, "'");
}

inline bool is_arg_reduce(Reduce r) { return r == Reduce::Max || r == Reduce::Min; }

// The binding-level checks of both kernels (the public Python ops check more, with friendlier messages).
inline void check_inputs(const at::Tensor& t, const at::Tensor& offsets, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 2, name, " must be 2-D (rows, D), got ", t.dim(), "-D");
  TORCH_CHECK_VALUE(offsets.dim() == 1 && offsets.numel() >= 1, "offsets must be 1-D with >= 1 element");
  TORCH_CHECK_VALUE(offsets.scalar_type() == at::kInt || offsets.scalar_type() == at::kLong,
                    "offsets must be int32 or int64, got ", offsets.scalar_type());
  // The kernels dereference every pointer on the device of `t`.
  TORCH_CHECK_VALUE(offsets.device() == t.device(), "offsets must be on ", t.device(), " like ", name, ", got ",
                    offsets.device());
}

// Checked, contiguous arguments of patch_pool_kernel / patch_unpool_kernel, shared by the CPU and CUDA bindings.
struct PatchArgs {
  Reduce reduce;
  at::Tensor data;     // pool: x (N, D); unpool: p (P, D)
  at::Tensor offsets;  // int64 (P + 1,)
  at::Tensor x, pooled;  // unpool with max/min only
  int64_t P, N, D;
};

inline PatchArgs prepare_pool(const at::Tensor& x, const at::Tensor& offsets, std::string_view reduce) {
  check_inputs(x, offsets, "x");
  PatchArgs a{parse_reduce(reduce), x.contiguous(), offsets.to(at::kLong).contiguous(), {}, {}, 0, 0, 0};
  a.P = a.offsets.numel() - 1;
  a.N = a.data.size(0);
  a.D = a.data.size(1);
  return a;
}

inline PatchArgs prepare_unpool(const at::Tensor& p, const at::Tensor& offsets, int64_t num_tokens,
                                std::string_view reduce, const std::optional<at::Tensor>& x,
                                const std::optional<at::Tensor>& pooled) {
  check_inputs(p, offsets, "p");
  PatchArgs a{parse_reduce(reduce), p.contiguous(), offsets.to(at::kLong).contiguous(), {}, {}, 0, num_tokens, 0};
  a.P = a.offsets.numel() - 1;
  a.D = a.data.size(1);
  TORCH_CHECK_VALUE(a.data.size(0) == a.P, "p must have ", a.P, " rows (one per patch), got ", a.data.size(0));
  if (is_arg_reduce(a.reduce)) {
    TORCH_CHECK_VALUE(x.has_value() && pooled.has_value(), "patch_unpool_kernel with reduce='", reduce,
                      "' needs x and pooled");
    a.x = x->contiguous();
    a.pooled = pooled->contiguous();
    TORCH_CHECK_VALUE(a.x.sizes() == at::IntArrayRef({a.N, a.D}) && a.pooled.sizes() == a.data.sizes(),
                      "x must be (num_tokens, D) and pooled must match p");
    TORCH_CHECK_VALUE(a.x.scalar_type() == p.scalar_type() && a.pooled.scalar_type() == p.scalar_type(),
                      "x, pooled and p must share a dtype");
    TORCH_CHECK_VALUE(a.x.device() == p.device() && a.pooled.device() == p.device(), "x and pooled must be on ",
                      p.device(), " like p");
  }
  return a;
}

}  // namespace mdus
