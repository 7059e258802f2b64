// Every schema of the mdus C++/CUDA kernels, in one place. Device kernels are added with
// TORCH_LIBRARY_IMPL(mdus, CPU|CUDA, m) in csrc/cpu/<op>.cpp and csrc/cuda/<op>.cpp.
//
// These are the low-level kernels. The public, autograd- and torch.compile-aware ops (mdus::patch_pool, ...)
// are torch.library.custom_op's defined in mdus_kernels/ops/<op>.py, which call into these.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(mdus, m) {
  // Reduces the rows offsets[p]:offsets[p+1] of x (N, D) into row p of the (P, D) result.
  m.def("patch_pool_kernel(Tensor x, Tensor offsets, str reduce) -> Tensor");
  // The transpose of patch_pool_kernel: row p of `p` goes back to the rows of its patch, scaled by 1/len for
  // "mean" and routed to the first arg-extreme token (found by comparing x to pooled) for "max"/"min".
  m.def(
      "patch_unpool_kernel(Tensor p, Tensor offsets, int num_tokens, str reduce, Tensor? x=None, "
      "Tensor? pooled=None) -> Tensor");

  // cgMLP gate, packed x (N, U), C = U/2, conv_weight (C, k): out = x[:, :C] * (dwconv(LayerNorm(x[:, C:])) + bias)
  // within each segment (a sequence, or a run of speech tokens when speech_mask is given). Also returns the
  // per-token LayerNorm mean/rstd (computation dtype, 0 for text tokens) that the backward reuses.
  m.def(
      "cgmlp_gate_fwd_kernel(Tensor x, Tensor norm_weight, Tensor norm_bias, Tensor conv_weight, Tensor conv_bias, "
      "Tensor cu_seqlens, Tensor? speech_mask, bool causal, float eps) -> (Tensor, Tensor, Tensor)");
  // Returns (dx (N, U), dnorm_weight, dnorm_bias, dconv_weight (C, k), dconv_bias), parameter gradients in the
  // computation dtype (fp32, fp64 for fp64 x), reduced deterministically.
  m.def(
      "cgmlp_gate_bwd_kernel(Tensor grad, Tensor x, Tensor norm_weight, Tensor norm_bias, Tensor conv_weight, "
      "Tensor conv_bias, Tensor cu_seqlens, Tensor? speech_mask, Tensor mean, Tensor rstd, bool causal) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The segment-aware depthwise conv alone: x (N, C), weight (C, k), bias (C,) or None.
  m.def(
      "depthwise_conv1d_fwd_kernel(Tensor x, Tensor weight, Tensor? bias, Tensor cu_seqlens, Tensor? speech_mask, "
      "bool causal) -> Tensor");
  // Returns (dx, dweight (C, k), dbias (C,)), parameter gradients in the computation dtype.
  m.def(
      "depthwise_conv1d_bwd_kernel(Tensor grad, Tensor x, Tensor weight, Tensor cu_seqlens, Tensor? speech_mask, "
      "bool causal) -> (Tensor, Tensor, Tensor)");
}

// A module init so that `import mdus_kernels._C` loads the library (and runs the registrations above).
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "mdus C++/CUDA kernels", -1, nullptr};
  return PyModule_Create(&module_def);
}
