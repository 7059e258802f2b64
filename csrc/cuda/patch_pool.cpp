// CUDA implementations of mdus::patch_pool_kernel and mdus::patch_unpool_kernel: the ATen binding of the plain CUDA
// kernels in csrc/cuda/patch_pool_kernels.cu. Argument handling mirrors csrc/cpu/patch_pool.cpp.
// Built only by CUDAExtension (setup.py), as it needs torch's CUDA headers.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include "cuda/patch_pool_kernels.cuh"
#include "patch_pool.h"

namespace mdus {
namespace {

// The CUDA type with the same bits as an ATen scalar type.
template <typename T>
struct cuda_type {
  using type = T;
};
template <>
struct cuda_type<at::Half> {
  using type = __half;
};
template <>
struct cuda_type<at::BFloat16> {
  using type = __nv_bfloat16;
};

template <typename T>
const typename cuda_type<T>::type* cuda_ptr(const at::Tensor& t) {
  return reinterpret_cast<const typename cuda_type<T>::type*>(t.const_data_ptr<T>());
}

template <typename T>
typename cuda_type<T>::type* cuda_mutable_ptr(at::Tensor& t) {
  return reinterpret_cast<typename cuda_type<T>::type*>(t.mutable_data_ptr<T>());
}

at::Tensor patch_pool_cuda(const at::Tensor& x_, const at::Tensor& offsets_, c10::string_view reduce) {
  check_inputs(x_, offsets_, "x");
  const Reduce r = parse_reduce(reduce);
  const c10::cuda::CUDAGuard device_guard(x_.device());
  const at::Tensor x = x_.contiguous();
  const at::Tensor offsets = offsets_.to(at::kLong).contiguous();
  const int64_t N = x.size(0), D = x.size(1), P = offsets.numel() - 1;
  at::Tensor out = at::empty({P, D}, x.options());
  if (out.numel() == 0) return out;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "patch_pool_cuda", [&] {
    C10_CUDA_CHECK(launch_patch_pool_fwd(cuda_ptr<scalar_t>(x), offsets.const_data_ptr<int64_t>(),
                                         cuda_mutable_ptr<scalar_t>(out), P, N, D, static_cast<int>(r), stream));
  });
  return out;
}

at::Tensor patch_unpool_cuda(const at::Tensor& p_, const at::Tensor& offsets_, int64_t num_tokens,
                             c10::string_view reduce, const std::optional<at::Tensor>& x_,
                             const std::optional<at::Tensor>& pooled_) {
  check_inputs(p_, offsets_, "p");
  const Reduce r = parse_reduce(reduce);
  TORCH_CHECK_VALUE(!is_arg_reduce(r) || (x_.has_value() && pooled_.has_value()),
                    "patch_unpool_kernel with reduce='", reduce, "' needs x and pooled");
  const c10::cuda::CUDAGuard device_guard(p_.device());
  const at::Tensor p = p_.contiguous();
  const at::Tensor offsets = offsets_.to(at::kLong).contiguous();
  const int64_t P = offsets.numel() - 1, D = p.size(1), N = num_tokens;
  TORCH_CHECK_VALUE(p.size(0) == P, "p must have ", P, " rows (one per patch), got ", p.size(0));
  at::Tensor x, pooled;
  if (is_arg_reduce(r)) {
    x = x_->contiguous();
    pooled = pooled_->contiguous();
    TORCH_CHECK_VALUE(x.sizes() == at::IntArrayRef({N, D}) && pooled.sizes() == p.sizes(),
                      "x must be (num_tokens, D) and pooled must match p");
    TORCH_CHECK_VALUE(x.scalar_type() == p.scalar_type() && pooled.scalar_type() == p.scalar_type(),
                      "x, pooled and p must share a dtype");
    TORCH_CHECK_VALUE(x.device() == p.device() && pooled.device() == p.device(), "x and pooled must be on ",
                      p.device(), " like p");
  }
  at::Tensor out = at::empty({N, D}, p.options());
  if (out.numel() == 0) return out;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.scalar_type(), "patch_unpool_cuda", [&] {
    using cuda_t = typename cuda_type<scalar_t>::type;
    const cuda_t* px = is_arg_reduce(r) ? cuda_ptr<scalar_t>(x) : nullptr;
    const cuda_t* pr = is_arg_reduce(r) ? cuda_ptr<scalar_t>(pooled) : nullptr;
    C10_CUDA_CHECK(launch_patch_unpool(cuda_ptr<scalar_t>(p), offsets.const_data_ptr<int64_t>(), px, pr,
                                       cuda_mutable_ptr<scalar_t>(out), P, N, D, static_cast<int>(r), stream));
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mdus, CUDA, m) {
  m.impl("patch_pool_kernel", &patch_pool_cuda);
  m.impl("patch_unpool_kernel", &patch_unpool_cuda);
}

}  // namespace mdus
