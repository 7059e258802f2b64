// Shared by the CPU and CUDA patch-pooling kernels.
#pragma once

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

}  // namespace mdus
