// CPU kernels for LST / BLT patch pooling: mdus::patch_pool_kernel and mdus::patch_unpool_kernel.
// Semantics: mdus_kernels/reference/patch_pool.py.
//
// Work is split into (patch, column-chunk) items so that a batch with few, huge patches still uses every core,
// and each item streams its rows once. The reduce mode is a template parameter so that each inner loop is a
// plain, branch-free pass over a contiguous row segment that the compiler vectorizes.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "cpu/alloc.h"
#include "patch_pool.h"

namespace mdus {
namespace {

constexpr int64_t kChunkCols = 256;  // one item reads <= 1 KiB of fp32 per row: 16 cache lines

struct Work {
  int64_t chunk, n_chunks, grain;
};

Work split_work(int64_t P, int64_t N, int64_t D) {
  // Split columns only when there are too few patches to keep every thread busy.
  const int64_t chunk = P >= 8 * at::get_num_threads() ? D : std::min<int64_t>(D, kChunkCols);
  const int64_t n_chunks = chunk == 0 ? 1 : (D + chunk - 1) / chunk;
  const int64_t avg_elems = std::max<int64_t>(1, (N / std::max<int64_t>(P, 1)) * std::max<int64_t>(chunk, 1));
  return {chunk, n_chunks, std::max<int64_t>(1, (int64_t{1} << 15) / avg_elems)};
}

// Offsets are validated in Python; clamping here keeps the kernel memory-safe when validation is off.
inline void patch_bounds(const int64_t* off, int64_t p, int64_t N, int64_t& bos, int64_t& eos) {
  bos = std::clamp<int64_t>(off[p], 0, N);
  eos = std::clamp<int64_t>(off[p + 1], bos, N);
}

template <Reduce R, typename acc_t>
inline acc_t combine(acc_t acc, acc_t v) {
  if constexpr (R == Reduce::Max) return (v > acc || v != v) ? v : acc;  // NaN propagates, like torch.amax
  else if constexpr (R == Reduce::Min) return (v < acc || v != v) ? v : acc;
  else return acc + v;
}

template <Reduce R, typename scalar_t>
void pool_fwd(const scalar_t* x, const int64_t* off, scalar_t* out, int64_t P, int64_t N, int64_t D) {
  using acc_t = at::opmath_type<scalar_t>;
  const Work w = split_work(P, N, D);
  at::parallel_for(0, P * w.n_chunks, w.grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(w.chunk);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t p = item / w.n_chunks, d0 = (item % w.n_chunks) * w.chunk;
      const int64_t cols = std::min(w.chunk, D - d0);
      int64_t bos, eos;
      patch_bounds(off, p, N, bos, eos);
      scalar_t* o = out + p * D + d0;
      if (eos == bos) {  // empty patch -> 0
        std::fill(o, o + cols, scalar_t(0));
        continue;
      }
      const scalar_t* row = x + bos * D + d0;
      for (int64_t d = 0; d < cols; ++d) acc[d] = static_cast<acc_t>(row[d]);
      for (int64_t t = bos + 1; t < eos; ++t) {
        row = x + t * D + d0;
        for (int64_t d = 0; d < cols; ++d) acc[d] = combine<R>(acc[d], static_cast<acc_t>(row[d]));
      }
      // Divide (not multiply by 1/len) so that every backend rounds exactly like the reference.
      const acc_t len = static_cast<acc_t>(eos - bos);
      for (int64_t d = 0; d < cols; ++d) o[d] = static_cast<scalar_t>(R == Reduce::Mean ? acc[d] / len : acc[d]);
    }
  });
}

template <Reduce R, typename scalar_t>
void unpool(const scalar_t* g, const int64_t* off, const scalar_t* x, const scalar_t* pooled, scalar_t* out,
            int64_t P, int64_t N, int64_t D) {
  using acc_t = at::opmath_type<scalar_t>;
  const Work w = split_work(P, N, D);
  at::parallel_for(0, P * w.n_chunks, w.grain, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> val(w.chunk);
    std::vector<int32_t> found(w.chunk);  // int32, not char: same lane width as fp32 and no aliasing, so it vectorizes
    for (int64_t item = begin; item < end; ++item) {
      const int64_t p = item / w.n_chunks, d0 = (item % w.n_chunks) * w.chunk;
      const int64_t cols = std::min(w.chunk, D - d0);
      int64_t bos, eos;
      patch_bounds(off, p, N, bos, eos);
      const scalar_t* __restrict gp = g + p * D + d0;
      if constexpr (R == Reduce::Max || R == Reduce::Min) {
        // The gradient goes to the first token whose value equals the pooled extreme. pooled holds that exact
        // value (a max/min is one of its inputs, so the round trip through acc_t is exact).
        const scalar_t* __restrict ref = pooled + p * D + d0;
        int32_t* __restrict fnd = found.data();
        std::fill(fnd, fnd + cols, 0);
        for (int64_t t = bos; t < eos; ++t) {
          const scalar_t* __restrict xr = x + t * D + d0;
          scalar_t* __restrict o = out + t * D + d0;
          for (int64_t d = 0; d < cols; ++d) {
            // Unconditional loads and a select (no branch), so the loop vectorizes.
            const scalar_t gv = gp[d];
            const int32_t hit = static_cast<int32_t>(fnd[d] == 0) &
                                static_cast<int32_t>(static_cast<acc_t>(xr[d]) == static_cast<acc_t>(ref[d]));
            o[d] = hit ? gv : scalar_t(0);
            fnd[d] |= hit;
          }
        }
      } else {
        const acc_t len = static_cast<acc_t>(std::max<int64_t>(eos - bos, 1));
        for (int64_t d = 0; d < cols; ++d) {
          const acc_t v = static_cast<acc_t>(gp[d]);
          val[d] = static_cast<scalar_t>(R == Reduce::Mean ? v / len : v);
        }
        for (int64_t t = bos; t < eos; ++t) std::copy(val.begin(), val.begin() + cols, out + t * D + d0);
      }
    }
  });
}

at::Tensor patch_pool_cpu(const at::Tensor& x, const at::Tensor& offsets, c10::string_view reduce) {
  const PatchArgs a = prepare_pool(x, offsets, reduce);
  at::Tensor out = empty_output({a.P, a.D}, a.data.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.data.scalar_type(), "patch_pool_cpu", [&] {
    const scalar_t* px = a.data.const_data_ptr<scalar_t>();
    const int64_t* po = a.offsets.const_data_ptr<int64_t>();
    scalar_t* pout = out.mutable_data_ptr<scalar_t>();
    switch (a.reduce) {
      case Reduce::Sum: pool_fwd<Reduce::Sum>(px, po, pout, a.P, a.N, a.D); break;
      case Reduce::Mean: pool_fwd<Reduce::Mean>(px, po, pout, a.P, a.N, a.D); break;
      case Reduce::Max: pool_fwd<Reduce::Max>(px, po, pout, a.P, a.N, a.D); break;
      case Reduce::Min: pool_fwd<Reduce::Min>(px, po, pout, a.P, a.N, a.D); break;
    }
  });
  return out;
}

at::Tensor patch_unpool_cpu(const at::Tensor& p, const at::Tensor& offsets, int64_t num_tokens,
                            c10::string_view reduce, const std::optional<at::Tensor>& x,
                            const std::optional<at::Tensor>& pooled) {
  const PatchArgs a = prepare_unpool(p, offsets, num_tokens, reduce, x, pooled);
  at::Tensor out = empty_output({a.N, a.D}, a.data.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.data.scalar_type(), "patch_unpool_cpu", [&] {
    const bool arg = is_arg_reduce(a.reduce);
    const scalar_t* pg = a.data.const_data_ptr<scalar_t>();
    const int64_t* po = a.offsets.const_data_ptr<int64_t>();
    const scalar_t* px = arg ? a.x.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* pr = arg ? a.pooled.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* pout = out.mutable_data_ptr<scalar_t>();
    switch (a.reduce) {
      case Reduce::Sum: unpool<Reduce::Sum>(pg, po, px, pr, pout, a.P, a.N, a.D); break;
      case Reduce::Mean: unpool<Reduce::Mean>(pg, po, px, pr, pout, a.P, a.N, a.D); break;
      case Reduce::Max: unpool<Reduce::Max>(pg, po, px, pr, pout, a.P, a.N, a.D); break;
      case Reduce::Min: unpool<Reduce::Min>(pg, po, px, pr, pout, a.P, a.N, a.D); break;
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mdus, CPU, m) {
  m.impl("patch_pool_kernel", &patch_pool_cpu);
  m.impl("patch_unpool_kernel", &patch_unpool_cpu);
}

}  // namespace mdus
