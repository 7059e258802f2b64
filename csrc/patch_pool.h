// Shared by the CPU and CUDA patch-pooling kernels.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

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

}  // namespace mdus
