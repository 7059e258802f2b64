// Output allocation shared by the CPU kernels.
#pragma once

#include <ATen/ATen.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <cstdint>

namespace mdus {

// at::empty, with large buffers backed by transparent huge pages where the system allows it (THP "madvise" mode,
// the Debian/Ubuntu default). A fresh multi-GB output otherwise costs one page fault and one kernel zeroing per
// 4 KiB on first touch, which on the machines we measured takes longer than the kernel's own pass over memory.
// This is what torch does for every allocation under THP_MEM_ALLOC_ENABLE=1, applied here to our outputs only.
inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor out = at::empty(sizes, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(out.data_ptr());
  const uintptr_t end = begin + out.nbytes();
  const uintptr_t lo = (begin + kHuge - 1) & ~(kHuge - 1), hi = end & ~(kHuge - 1);
  if (out.nbytes() >= 2 * kHuge && hi > lo) {
    madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);  // advisory: failure just means small pages
  }
#endif
  return out;
}

}  // namespace mdus
