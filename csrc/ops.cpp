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
}

// A module init so that `import mdus_kernels._C` loads the library (and runs the registrations above).
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "mdus C++/CUDA kernels", -1, nullptr};
  return PyModule_Create(&module_def);
}
