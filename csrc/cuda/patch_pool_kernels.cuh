// Host launchers of the CUDA patch-pooling kernels (csrc/cuda/patch_pool_kernels.cu). Plain CUDA: raw pointers and a
// stream, no torch headers, so that the device code compiles and is checked without a CUDA build of torch.
// Semantics: mdus_kernels/reference/patch_pool.py (the same as csrc/cpu/patch_pool.cpp).
//
// `reduce` is the int value of mdus::Reduce (csrc/patch_pool.h, not includable here as it needs c10):
// Sum = 0, Mean = 1, Max = 2, Min = 3. T is float, double, __half or __nv_bfloat16. Each launcher returns the
// launch status (cudaSuccess, or the error of the launch).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace mdus {

// x (N, D) and out (P, D) contiguous, offsets (P + 1,) int64, all on the device of `stream`.
template <typename T>
cudaError_t launch_patch_pool_fwd(const T* x, const int64_t* offsets, T* out, int64_t P, int64_t N, int64_t D,
                                  int reduce, cudaStream_t stream);

// g and pooled (P, D), x and out (N, D) contiguous, offsets (P + 1,) int64. x and pooled are read only for Max and
// Min (null otherwise). Rows of out outside every patch are not written.
template <typename T>
cudaError_t launch_patch_unpool(const T* g, const int64_t* offsets, const T* x, const T* pooled, T* out, int64_t P,
                                int64_t N, int64_t D, int reduce, cudaStream_t stream);

}  // namespace mdus
