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

at::Tensor patch_pool_cuda(const at::Tensor& x, const at::Tensor& offsets, c10::string_view reduce) {
  const c10::cuda::CUDAGuard device_guard(x.device());
  const PatchArgs a = prepare_pool(x, offsets, reduce);
  at::Tensor out = at::empty({a.P, a.D}, a.data.options());
  if (out.numel() == 0) return out;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.data.scalar_type(), "patch_pool_cuda", [&] {
    C10_CUDA_CHECK(launch_patch_pool_fwd(cuda_ptr<scalar_t>(a.data), a.offsets.const_data_ptr<int64_t>(),
                                         cuda_mutable_ptr<scalar_t>(out), a.P, a.N, a.D, static_cast<int>(a.reduce),
                                         stream));
  });
  return out;
}

at::Tensor patch_unpool_cuda(const at::Tensor& p, const at::Tensor& offsets, int64_t num_tokens,
                             c10::string_view reduce, const std::optional<at::Tensor>& x,
                             const std::optional<at::Tensor>& pooled) {
  const c10::cuda::CUDAGuard device_guard(p.device());
  const PatchArgs a = prepare_unpool(p, offsets, num_tokens, reduce, x, pooled);
  at::Tensor out = at::empty({a.N, a.D}, a.data.options());
  if (out.numel() == 0) return out;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.data.scalar_type(), "patch_unpool_cuda", [&] {
    using cuda_t = typename cuda_type<scalar_t>::type;
    const bool arg = is_arg_reduce(a.reduce);
    const cuda_t* px = arg ? cuda_ptr<scalar_t>(a.x) : nullptr;
    const cuda_t* pr = arg ? cuda_ptr<scalar_t>(a.pooled) : nullptr;
    C10_CUDA_CHECK(launch_patch_unpool(cuda_ptr<scalar_t>(a.data), a.offsets.const_data_ptr<int64_t>(), px, pr,
                                       cuda_mutable_ptr<scalar_t>(out), a.P, a.N, a.D, static_cast<int>(a.reduce),
                                       stream));
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mdus, CUDA, m) {
  m.impl("patch_pool_kernel", &patch_pool_cuda);
  m.impl("patch_unpool_kernel", &patch_unpool_cuda);
}

}  // namespace mdus
