// CPU kernels of the cgMLP gate (ESPnet's ConvolutionalSpatialGatingUnit: LayerNorm -> depthwise conv -> bias ->
// gate, fused) and of the plain segment-aware depthwise conv, forward and backward:
//   mdus::cgmlp_gate_fwd_kernel, mdus::cgmlp_gate_bwd_kernel,
//   mdus::depthwise_conv1d_fwd_kernel, mdus::depthwise_conv1d_bwd_kernel.
// Semantics: mdus_kernels/reference/cgmlp.py.
//
// Work is cut into tiles of up to `block_t` consecutive tokens of one segment (a sequence, or a maximal run of
// speech tokens of one sequence), so inside a tile every tap reads the same, contiguous range of rows. A tile reads
// its rows plus the k - 1 halo rows once, row by row (sequential DRAM streams), LayerNorm'ed, into an fp32 buffer
// laid out chunk-major (kBlockC channels per chunk); then, chunk by chunk, the k taps sweep that L1-sized block; the
// result goes through a (block_t, C) buffer so that the gate and the output store are row-major passes again.
// LayerNorm, conv, bias and gate thus make one pass over memory. Both ops are one template: LN and GATE switch the
// LayerNorm and the gate off for the plain depthwise conv.
//
// The tap loops are compiled three times (SSE2, AVX2, AVX-512; see cgmlp_kernels.h) and the widest one that both the
// CPU and torch's own dispatch (ATEN_CPU_CAPABILITY) allow is picked at run time, because the default build targets
// baseline x86-64 and the conv is compute-bound (k multiply-adds per element and pass).
//
// The backward recomputes the LayerNorm'ed input and z = conv + bias from x and the saved per-token mean/rstd
// instead of keeping (N, C) activations alive between forward and backward. Parameter gradients are accumulated
// into per-group partial sums, groups being fixed runs of tiles whose number depends only on the problem size, and
// the partials are then summed in group order: the result is bitwise reproducible whatever the thread count or
// scheduling, with no atomics.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <tuple>
#include <vector>

#include "cpu/alloc.h"

namespace mdus {
namespace {

constexpr int64_t kMaxKernel = 63;
// Channels per chunk. One chunk of a tile's halo'd input, (block_t + k - 1) x 32 fp32, is 20 KiB for block_t = 128,
// k = 31: it stays in L1 while the k taps sweep over it.
constexpr int64_t kBlockC = 32;

struct Tile {
  int64_t lo, hi;  // the segment [lo, hi) the tile belongs to
  int64_t t0, t1;  // the tile's tokens, inside the segment
  bool active;     // false: a text run (output and gradients 0)
};

// Tiles of at most block_t tokens, never crossing a segment. cu_seqlens and the mask were validated in Python;
// the clamping only keeps unchecked bad offsets inside the tensors.
std::vector<Tile> make_tiles(const int64_t* cu, int64_t B, const bool* mask, int64_t N, int64_t block_t) {
  std::vector<Tile> tiles;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t s = std::clamp<int64_t>(cu[b], 0, N), e = std::clamp<int64_t>(cu[b + 1], s, N);
    for (int64_t t = s; t < e;) {
      const bool active = mask == nullptr || mask[t];
      int64_t r = e;
      if (mask != nullptr) {
        r = t + 1;
        while (r < e && mask[r] == active) ++r;
      }
      for (int64_t t0 = t; t0 < r; t0 += block_t) tiles.push_back({t, r, t0, std::min(t0 + block_t, r), active});
      t = r;
    }
  }
  return tiles;
}

template <typename acc_t>
struct Params {
  int64_t N, C, K, L;
  int64_t ldx;     // row stride of x: U for the gate, C for the plain conv
  int64_t off_in;  // column of the conv input in x: C (x_g) for the gate, 0 for the plain conv
  const acc_t* wT;    // (K, C) tap-major, so that the channel loops are contiguous
  const acc_t* wR;    // (K, C) taps reversed: the transposed conv is the same loop on the reversed taps
  const acc_t* bias;  // (C,) or nullptr
  const acc_t* nw;    // LayerNorm weight / bias (C,), LN only
  const acc_t* nb;
  acc_t eps;
};

// Per-thread buffers of the tile functions. hall/dzall hold a tile's halo'd rows chunk-major (row i of channel chunk
// q at (q * rows + i) * kBlockC), so that each chunk's tap loops sweep a contiguous block.
template <typename acc_t>
struct Workspace {
  int64_t rows;  // block_t + K - 1
  std::vector<acc_t> hall, dzall, zbuf, res, scratch, mu, rs;
  Workspace(int64_t block_t, int64_t K, int64_t C, bool backward, bool ln)
      : rows(block_t + K - 1),
        hall(rows * ((C + kBlockC - 1) / kBlockC) * kBlockC),
        dzall(backward ? hall.size() : 0),
        zbuf(block_t * C),
        res(backward ? block_t * kBlockC : 0),
        scratch(backward ? block_t * C : 0),
        mu(backward || !ln ? 0 : rows),
        rs(backward || !ln ? 0 : rows) {}
};

namespace isa_default {
#define MDUS_VEC_BYTES 16
#define MDUS_TAP_ROWS 6
#include "cpu/cgmlp_kernels.h"
#undef MDUS_VEC_BYTES
#undef MDUS_TAP_ROWS
}  // namespace isa_default

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define MDUS_CGMLP_X86_ISAS 1
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace isa_avx2 {
#define MDUS_VEC_BYTES 32
#define MDUS_TAP_ROWS 6  // 6 accumulators + 6 window rows + 1 weight of the 16 ymm registers
#include "cpu/cgmlp_kernels.h"
#undef MDUS_VEC_BYTES
#undef MDUS_TAP_ROWS
}  // namespace isa_avx2
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
namespace isa_avx512 {
#define MDUS_VEC_BYTES 64
#define MDUS_TAP_ROWS 8  // 8 independent FMA chains cover the FMA latency; 17 of the 32 zmm registers
#include "cpu/cgmlp_kernels.h"
#undef MDUS_VEC_BYTES
#undef MDUS_TAP_ROWS
}  // namespace isa_avx512
#pragma GCC pop_options
#endif

enum class Isa { Default, Avx2, Avx512 };

// The widest instruction set the CPU supports and torch itself uses (so ATEN_CPU_CAPABILITY=default/avx2 also
// narrows these kernels, e.g. to compare them).
Isa cpu_isa() {
  static const Isa isa = [] {
#if defined(MDUS_CGMLP_X86_ISAS)
    const std::string cap = at::get_cpu_capability();
    __builtin_cpu_init();
    if (cap == "AVX512" && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
      return Isa::Avx512;
    }
    if ((cap == "AVX512" || cap == "AVX2") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
      return Isa::Avx2;
    }
#endif
    return Isa::Default;
  }();
  return isa;
}

template <typename scalar_t, bool LN, bool GATE>
void forward(const Params<at::opmath_type<scalar_t>>& P, const scalar_t* x, const std::vector<Tile>& tiles,
             int64_t block_t, scalar_t* out, at::opmath_type<scalar_t>* mean, at::opmath_type<scalar_t>* rstd) {
  using acc_t = at::opmath_type<scalar_t>;
  const Isa isa = cpu_isa();
  at::parallel_for(0, static_cast<int64_t>(tiles.size()), 1, [&](int64_t begin, int64_t end) {
    Workspace<acc_t> ws(block_t, P.K, P.C, false, LN);
    for (int64_t it = begin; it < end; ++it) {
#if defined(MDUS_CGMLP_X86_ISAS)
      if (isa == Isa::Avx512) {
        isa_avx512::forward_tile<scalar_t, LN, GATE>(P, x, tiles[it], ws, out, mean, rstd);
        continue;
      }
      if (isa == Isa::Avx2) {
        isa_avx2::forward_tile<scalar_t, LN, GATE>(P, x, tiles[it], ws, out, mean, rstd);
        continue;
      }
#endif
      isa_default::forward_tile<scalar_t, LN, GATE>(P, x, tiles[it], ws, out, mean, rstd);
    }
  });
}

// Layout of one group's parameter-gradient partial sums (acc_t): dweight tap-major (K, C), then dbias,
// dnorm_weight, dnorm_bias (C each).
inline int64_t partial_size(int64_t K, int64_t C) { return (K + 3) * C; }

template <typename scalar_t, bool LN, bool GATE>
void backward(const Params<at::opmath_type<scalar_t>>& P, const scalar_t* g, const scalar_t* x,
              const at::opmath_type<scalar_t>* mean, const at::opmath_type<scalar_t>* rstd,
              const std::vector<Tile>& tiles, int64_t block_t, int64_t groups, scalar_t* dx,
              at::opmath_type<scalar_t>* partials) {
  using acc_t = at::opmath_type<scalar_t>;
  const Isa isa = cpu_isa();
  const int64_t n_tiles = static_cast<int64_t>(tiles.size());
  const int64_t per_group = (n_tiles + groups - 1) / groups;
  // Parallel over groups, each group's tiles in order into its own partials: no two threads share an accumulator.
  at::parallel_for(0, groups, 1, [&](int64_t g_begin, int64_t g_end) {
    Workspace<acc_t> ws(block_t, P.K, P.C, true, LN);
    for (int64_t grp = g_begin; grp < g_end; ++grp) {
      acc_t* part = partials + grp * partial_size(P.K, P.C);
      for (int64_t it = grp * per_group; it < std::min(n_tiles, (grp + 1) * per_group); ++it) {
#if defined(MDUS_CGMLP_X86_ISAS)
        if (isa == Isa::Avx512) {
          isa_avx512::backward_tile<scalar_t, LN, GATE>(P, g, x, mean, rstd, tiles[it], ws, dx, part);
          continue;
        }
        if (isa == Isa::Avx2) {
          isa_avx2::backward_tile<scalar_t, LN, GATE>(P, g, x, mean, rstd, tiles[it], ws, dx, part);
          continue;
        }
#endif
        isa_default::backward_tile<scalar_t, LN, GATE>(P, g, x, mean, rstd, tiles[it], ws, dx, part);
      }
    }
  });
}

// Sums the groups' partials in group order (bitwise reproducible), in parallel over columns.
template <typename acc_t>
void reduce_partials(const acc_t* partials, int64_t groups, int64_t size, acc_t* out) {
  at::parallel_for(0, size, 4096, [&](int64_t begin, int64_t end) {
    std::fill(out + begin, out + end, acc_t(0));
    for (int64_t grp = 0; grp < groups; ++grp) {
      const acc_t* __restrict src = partials + grp * size;
      for (int64_t i = begin; i < end; ++i) out[i] += src[i];
    }
  });
}

// ------------------------------------------------------------------------------------------------------- bindings

struct Problem {
  at::Tensor x;              // (N, ldx) contiguous
  at::Tensor wT, wR;         // (K, C) acc dtype
  at::Tensor bias, nw, nb;   // (C,) acc dtype or undefined
  std::vector<Tile> tiles;
  int64_t N, C, K, L, block_t;
  bool ln, gate;
  double eps;
};

void check_common(const at::Tensor& x, const at::Tensor& weight, int64_t C, const at::Tensor& cu_seqlens,
                  const std::optional<at::Tensor>& speech_mask) {
  TORCH_CHECK_VALUE(x.device().is_cpu(), "x must be a CPU tensor, got ", x.device());
  TORCH_CHECK_VALUE(at::isFloatingType(x.scalar_type()), "x must be a float tensor, got ", x.scalar_type());
  TORCH_CHECK_VALUE(weight.dim() == 2 || (weight.dim() == 3 && weight.size(1) == 1),
                    "conv weight must be (C, k) or (C, 1, k), got ", weight.sizes());
  TORCH_CHECK_VALUE(weight.size(0) == C, "conv weight must have C=", C, " rows, got ", weight.sizes());
  const int64_t K = weight.size(-1);
  TORCH_CHECK_VALUE(K >= 1 && K <= kMaxKernel, "kernel size must be in [1, ", kMaxKernel, "], got ", K);
  TORCH_CHECK_VALUE(cu_seqlens.dim() == 1 && cu_seqlens.numel() >= 1, "cu_seqlens must be 1-D with >= 1 element");
  TORCH_CHECK_VALUE(cu_seqlens.scalar_type() == at::kInt || cu_seqlens.scalar_type() == at::kLong,
                    "cu_seqlens must be int32 or int64, got ", cu_seqlens.scalar_type());
  TORCH_CHECK_VALUE(cu_seqlens.device().is_cpu(), "cu_seqlens must be on the CPU like x");
  if (speech_mask.has_value()) {
    TORCH_CHECK_VALUE(speech_mask->scalar_type() == at::kBool && speech_mask->dim() == 1 &&
                          speech_mask->size(0) == x.size(0) && speech_mask->device().is_cpu(),
                      "speech_mask must be a (N,) bool CPU tensor with N=", x.size(0));
  }
}

at::Tensor vector_param(const at::Tensor& t, int64_t C, const char* name, at::ScalarType acc) {
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == C, name, " must be (", C, ",), got ", t.sizes());
  TORCH_CHECK_VALUE(t.device().is_cpu() && at::isFloatingType(t.scalar_type()), name, " must be a float CPU tensor");
  return t.to(acc).contiguous();
}

// Tokens per tile. The (block_t, C) fp32 buffers of a tile (z, and the backward's dh scratch) are written a chunk
// at a time and read row by row, so they should stay in L2: 512 KiB each. Fewer rows make the k - 1 halo rows,
// loaded and normalized by both neighbouring tiles, a larger overhead, hence the floor of 32. Measured on a Zen 4
// core at k = 31: 128 rows beat 64 by ~8% at C = 1024, and 256 rows lose again.
int64_t tile_rows(int64_t C) { return std::clamp<int64_t>(131072 / std::max<int64_t>(C, 1), 32, 128); }

Problem prepare(const at::Tensor& x, int64_t C, bool ln, bool gate, const at::Tensor& weight,
                const std::optional<at::Tensor>& bias, const at::Tensor* nw, const at::Tensor* nb, double eps,
                const at::Tensor& cu_seqlens, const std::optional<at::Tensor>& speech_mask, bool causal) {
  check_common(x, weight, C, cu_seqlens, speech_mask);
  Problem pr;
  const at::ScalarType acc = at::toOpMathType(x.scalar_type());
  pr.x = x.contiguous();
  pr.N = x.size(0);
  pr.C = C;
  pr.K = weight.size(-1);
  pr.L = causal ? pr.K - 1 : (pr.K - 1) / 2;
  pr.block_t = tile_rows(C);
  pr.ln = ln;
  pr.gate = gate;
  pr.eps = eps;
  const at::Tensor w = weight.reshape({C, pr.K}).to(acc);
  pr.wT = w.t().contiguous();
  pr.wR = w.flip({1}).t().contiguous();
  if (bias.has_value()) pr.bias = vector_param(*bias, C, "conv bias", acc);
  if (ln) {
    pr.nw = vector_param(*nw, C, "norm_weight", acc);
    pr.nb = vector_param(*nb, C, "norm_bias", acc);
  }
  const at::Tensor cu = cu_seqlens.to(at::kLong).contiguous();
  at::Tensor mask;
  if (speech_mask.has_value()) mask = speech_mask->contiguous();
  pr.tiles = make_tiles(cu.const_data_ptr<int64_t>(), cu.numel() - 1,
                        mask.defined() ? mask.const_data_ptr<bool>() : nullptr, pr.N, pr.block_t);
  return pr;
}

template <typename acc_t>
Params<acc_t> params_of(const Problem& pr) {
  return Params<acc_t>{pr.N,
                       pr.C,
                       pr.K,
                       pr.L,
                       pr.x.size(1),
                       pr.gate ? pr.C : 0,
                       pr.wT.const_data_ptr<acc_t>(),
                       pr.wR.const_data_ptr<acc_t>(),
                       pr.bias.defined() ? pr.bias.const_data_ptr<acc_t>() : nullptr,
                       pr.ln ? pr.nw.const_data_ptr<acc_t>() : nullptr,
                       pr.ln ? pr.nb.const_data_ptr<acc_t>() : nullptr,
                       static_cast<acc_t>(pr.eps)};
}

// Enough groups to keep every core busy, few enough that the (groups, (k+3)*C) partials stay small. Depends on the
// problem only, not on the thread count, so that results do not either.
int64_t num_groups(int64_t n_tiles, int64_t K, int64_t C, size_t acc_size) {
  const int64_t bytes = partial_size(K, C) * static_cast<int64_t>(acc_size);
  const int64_t by_memory = std::max<int64_t>(8, (int64_t{64} << 20) / std::max<int64_t>(bytes, 1));
  return std::max<int64_t>(1, std::min({n_tiles, int64_t{64}, by_memory}));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_impl(const Problem& pr) {
  const at::ScalarType acc = at::toOpMathType(pr.x.scalar_type());
  at::Tensor out = empty_output({pr.N, pr.C}, pr.x.options());
  at::Tensor mean = at::empty({pr.ln ? pr.N : 0}, pr.x.options().dtype(acc));
  at::Tensor rstd = at::empty({pr.ln ? pr.N : 0}, pr.x.options().dtype(acc));
  if (out.numel() == 0) return {out, mean, rstd};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pr.x.scalar_type(), "mdus_dwconv_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Params<acc_t> P = params_of<acc_t>(pr);
    const scalar_t* px = pr.x.const_data_ptr<scalar_t>();
    scalar_t* po = out.mutable_data_ptr<scalar_t>();
    acc_t* pm = pr.ln ? mean.mutable_data_ptr<acc_t>() : nullptr;
    acc_t* pv = pr.ln ? rstd.mutable_data_ptr<acc_t>() : nullptr;
    if (pr.ln) {
      forward<scalar_t, true, true>(P, px, pr.tiles, pr.block_t, po, pm, pv);
    } else {
      forward<scalar_t, false, false>(P, px, pr.tiles, pr.block_t, po, pm, pv);
    }
  });
  return {out, mean, rstd};
}

// Returns (dx, dweight (C, k), dbias (C,), dnorm_weight (C,), dnorm_bias (C,)), the parameter gradients in the
// computation dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_impl(
    const Problem& pr, const at::Tensor& grad_in, const at::Tensor& mean_in, const at::Tensor& rstd_in) {
  const at::ScalarType acc = at::toOpMathType(pr.x.scalar_type());
  TORCH_CHECK_VALUE(grad_in.sizes() == at::IntArrayRef({pr.N, pr.C}), "grad must be (", pr.N, ", ", pr.C,
                    "), got ", grad_in.sizes());
  const at::Tensor grad = grad_in.to(pr.x.scalar_type()).contiguous();
  at::Tensor mean, rstd;
  if (pr.ln) {
    TORCH_CHECK_VALUE(mean_in.numel() == pr.N && rstd_in.numel() == pr.N, "mean and rstd must be (N,)");
    mean = mean_in.to(acc).contiguous();
    rstd = rstd_in.to(acc).contiguous();
  }
  at::Tensor dx = empty_output(pr.x.sizes(), pr.x.options());
  const int64_t n_tiles = static_cast<int64_t>(pr.tiles.size());
  const int64_t groups = num_groups(n_tiles, pr.K, pr.C, at::elementSize(acc));
  const int64_t size = partial_size(pr.K, pr.C);
  at::Tensor partials = at::zeros({std::max<int64_t>(groups, 1), size}, pr.x.options().dtype(acc));
  at::Tensor reduced = at::empty({size}, pr.x.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pr.x.scalar_type(), "mdus_dwconv_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Params<acc_t> P = params_of<acc_t>(pr);
    const scalar_t* pg = grad.const_data_ptr<scalar_t>();
    const scalar_t* px = pr.x.const_data_ptr<scalar_t>();
    const acc_t* pm = pr.ln ? mean.const_data_ptr<acc_t>() : nullptr;
    const acc_t* pv = pr.ln ? rstd.const_data_ptr<acc_t>() : nullptr;
    scalar_t* pdx = dx.mutable_data_ptr<scalar_t>();
    acc_t* ppart = partials.mutable_data_ptr<acc_t>();
    if (n_tiles > 0) {
      if (pr.ln) {
        backward<scalar_t, true, true>(P, pg, px, pm, pv, pr.tiles, pr.block_t, groups, pdx, ppart);
      } else {
        backward<scalar_t, false, false>(P, pg, px, pm, pv, pr.tiles, pr.block_t, groups, pdx, ppart);
      }
    }
    reduce_partials(partials.const_data_ptr<acc_t>(), groups, size, reduced.mutable_data_ptr<acc_t>());
  });
  const int64_t K = pr.K, C = pr.C;
  // Separate tensors, not views of `reduced`: the outputs of an op must not alias each other.
  return {dx, reduced.narrow(0, 0, K * C).view({K, C}).t().contiguous(), reduced.narrow(0, K * C, C).clone(),
          reduced.narrow(0, (K + 1) * C, C).clone(), reduced.narrow(0, (K + 2) * C, C).clone()};
}

int64_t gate_channels(const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.dim() == 2, "x must be 2-D (N, U), got ", x.dim(), "-D");
  TORCH_CHECK_VALUE(x.size(1) % 2 == 0 && x.size(1) > 0, "x must have an even number of columns U, got ",
                    x.size(1));
  return x.size(1) / 2;
}

int64_t conv_channels(const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.dim() == 2, "x must be 2-D (N, C), got ", x.dim(), "-D");
  return x.size(1);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cgmlp_gate_fwd_cpu(
    const at::Tensor& x, const at::Tensor& norm_weight, const at::Tensor& norm_bias, const at::Tensor& conv_weight,
    const at::Tensor& conv_bias, const at::Tensor& cu_seqlens, const std::optional<at::Tensor>& speech_mask,
    bool causal, double eps) {
  const Problem pr = prepare(x, gate_channels(x), true, true, conv_weight, conv_bias, &norm_weight, &norm_bias, eps,
                             cu_seqlens, speech_mask, causal);
  return forward_impl(pr);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cgmlp_gate_bwd_cpu(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& norm_weight, const at::Tensor& norm_bias,
    const at::Tensor& conv_weight, const at::Tensor& conv_bias, const at::Tensor& cu_seqlens,
    const std::optional<at::Tensor>& speech_mask, const at::Tensor& mean, const at::Tensor& rstd, bool causal) {
  const Problem pr = prepare(x, gate_channels(x), true, true, conv_weight, conv_bias, &norm_weight, &norm_bias, 0.0,
                             cu_seqlens, speech_mask, causal);
  auto [dx, dw, db, dnw, dnb] = backward_impl(pr, grad, mean, rstd);
  return {dx, dnw, dnb, dw, db};
}

at::Tensor depthwise_conv1d_fwd_cpu(const at::Tensor& x, const at::Tensor& weight,
                                    const std::optional<at::Tensor>& bias, const at::Tensor& cu_seqlens,
                                    const std::optional<at::Tensor>& speech_mask, bool causal) {
  const Problem pr = prepare(x, conv_channels(x), false, false, weight, bias, nullptr, nullptr, 0.0, cu_seqlens,
                             speech_mask, causal);
  return std::get<0>(forward_impl(pr));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> depthwise_conv1d_bwd_cpu(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& cu_seqlens,
    const std::optional<at::Tensor>& speech_mask, bool causal) {
  const Problem pr = prepare(x, conv_channels(x), false, false, weight, std::nullopt, nullptr, nullptr, 0.0,
                             cu_seqlens, speech_mask, causal);
  auto [dx, dw, db, dnw, dnb] = backward_impl(pr, grad, at::Tensor(), at::Tensor());
  return {dx, dw, db};
}

}  // namespace

TORCH_LIBRARY_IMPL(mdus, CPU, m) {
  m.impl("cgmlp_gate_fwd_kernel", &cgmlp_gate_fwd_cpu);
  m.impl("cgmlp_gate_bwd_kernel", &cgmlp_gate_bwd_cpu);
  m.impl("depthwise_conv1d_fwd_kernel", &depthwise_conv1d_fwd_cpu);
  m.impl("depthwise_conv1d_bwd_kernel", &depthwise_conv1d_bwd_cpu);
}

}  // namespace mdus
