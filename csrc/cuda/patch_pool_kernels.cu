// CUDA kernels for LST / BLT patch pooling: the device side of mdus::patch_pool_kernel and mdus::patch_unpool_kernel.
// Semantics: mdus_kernels/reference/patch_pool.py, the same as csrc/cpu/patch_pool.cpp. No torch headers here (see
// patch_pool_kernels.cuh); the ATen binding is csrc/cuda/patch_pool.cpp.
//
// A block owns one (patch, column chunk). threadIdx.x walks the columns, one 16-byte vector per thread, so that each
// row segment is read with full-width, coalesced loads and the reduction needs no cross-lane traffic. threadIdx.y
// only exists for long patches: it splits the patch's rows into contiguous runs, combined in row order in shared
// memory, so that a few huge patches still put enough loads in flight. The reduce mode and the vector width are
// template parameters so that the row loop is branch-free and unrolled.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "cuda/patch_pool_kernels.cuh"

namespace mdus {
namespace {

constexpr int kSum = 0, kMean = 1, kMax = 2, kMin = 3;  // mdus::Reduce
constexpr int kThreads = 256;         // per block at most: 8 such blocks fill an SM's 2048 threads
constexpr int kMinBlocks = 4;         // resident per SM: >= 1024 threads keep enough loads in flight (<= 64 registers)
constexpr int kVecBytes = 16;         // the widest per-thread global load (LDG.128)
constexpr int kRowsPerThread = 4;     // rows each y-thread keeps at least: fewer are not worth a shared-memory combine
constexpr int64_t kTargetBlocks = 1024;  // about one full wave of 256-thread blocks on an H100 (132 SMs x 8)

template <typename T>
constexpr int kVec = kVecBytes / sizeof(T);

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Explicit conversions: torch builds with __CUDA_NO_HALF_CONVERSIONS__ / __CUDA_NO_BFLOAT16_CONVERSIONS__.
template <typename T>
__device__ __forceinline__ acc_t<T> to_acc(T v) {
  if constexpr (std::is_same_v<T, __half>) return __half2float(v);
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return __bfloat162float(v);
  else return v;
}

template <typename T>
__device__ __forceinline__ T from_acc(acc_t<T> v) {
  if constexpr (std::is_same_v<T, __half>) return __float2half_rn(v);
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return __float2bfloat16_rn(v);
  else return v;
}

template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <int V, typename T>
__device__ __forceinline__ Pack<T, V> load(const T* p) {
  return *reinterpret_cast<const Pack<T, V>*>(p);
}

template <int V, typename T>
__device__ __forceinline__ void store(T* p, const Pack<T, V>& b) {
  *reinterpret_cast<Pack<T, V>*>(p) = b;
}

template <int R, typename A>
__device__ __forceinline__ A combine(A acc, A v) {
  if constexpr (R == kMax) return (v > acc || v != v) ? v : acc;  // NaN propagates, like torch.amax
  else if constexpr (R == kMin) return (v < acc || v != v) ? v : acc;
  else return acc + v;
}

// -0 (not +0) is the neutral element of +: -0 + x == x bit for bit, so a single-run sum matches the CPU kernel's.
template <int R, typename A>
__device__ __forceinline__ A identity() {
  if constexpr (R == kMax) return -A(INFINITY);
  else if constexpr (R == kMin) return A(INFINITY);
  else return A(-0.0);
}

__device__ __forceinline__ int64_t clamp(int64_t v, int64_t lo, int64_t hi) { return v < lo ? lo : v > hi ? hi : v; }

// The patch's rows [bos, eos) and this y-thread's contiguous run [t0, t1) of them. Offsets are validated in Python;
// clamping keeps the kernel memory-safe when validation is off.
struct Rows {
  int64_t bos, eos, t0, t1;
};

__device__ __forceinline__ Rows patch_rows(const int64_t* offsets, int64_t i_p, int64_t N) {
  const int64_t bos = clamp(offsets[i_p], 0, N), eos = clamp(offsets[i_p + 1], bos, N);
  const int64_t run = (eos - bos + blockDim.y - 1) / blockDim.y;
  const int64_t t0 = clamp(bos + threadIdx.y * run, bos, eos);
  return {bos, eos, t0, clamp(t0 + run, t0, eos)};
}

// Combines the y-threads' partial results into thread y == 0's. Pairing y with y + s only when y % 2s == 0 keeps
// every partial a contiguous run of rows combined in order, so max/min ties resolve to the first row, as on the CPU.
template <int R, int V, typename A>
__device__ __forceinline__ void reduce_runs(A (&b_acc)[V], A* s_acc) {
  const int x = threadIdx.x, y = threadIdx.y, X = blockDim.x, Y = blockDim.y;
  for (int s = 1; s < Y; s *= 2) {
    if (y % (2 * s) == s) {
#pragma unroll
      for (int e = 0; e < V; ++e) s_acc[(e * Y + y) * X + x] = b_acc[e];
    }
    __syncthreads();
    if (y % (2 * s) == 0 && y + s < Y) {
#pragma unroll
      for (int e = 0; e < V; ++e) b_acc[e] = combine<R>(b_acc[e], s_acc[(e * Y + y + s) * X + x]);
    }
    __syncthreads();
  }
}

template <int R, int V, typename T>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    patch_pool_fwd_kernel(const T* __restrict__ x, const int64_t* __restrict__ offsets, T* __restrict__ out,
                          int64_t N, int64_t D, int64_t n_chunks) {
  using A = acc_t<T>;
  __shared__ A s_acc[kThreads * V];
  const int64_t i_p = blockIdx.x;
  const Rows r = patch_rows(offsets, i_p, N);
  for (int64_t i_c = blockIdx.y; i_c < n_chunks; i_c += gridDim.y) {
    const int64_t o_d = (i_c * blockDim.x + threadIdx.x) * V;
    const bool m_d = o_d < D;  // D % V == 0, so the whole vector is in bounds
    A b_acc[V];
#pragma unroll
    for (int e = 0; e < V; ++e) b_acc[e] = identity<R, A>();
    if (m_d) {
      // Unrolled so that several rows' loads are in flight before the first combine needs one.
#pragma unroll 4
      for (int64_t t = r.t0; t < r.t1; ++t) {
        const Pack<T, V> b_x = load<V>(x + t * D + o_d);
#pragma unroll
        for (int e = 0; e < V; ++e) b_acc[e] = combine<R>(b_acc[e], to_acc(b_x.v[e]));
      }
    }
    reduce_runs<R>(b_acc, s_acc);
    if (threadIdx.y == 0 && m_d) {
      // Divide (not multiply by 1/len) so that every backend rounds exactly like the reference.
      const int64_t len = r.eos - r.bos;
      const A a_len = static_cast<A>(len);
      Pack<T, V> b_o;
#pragma unroll
      for (int e = 0; e < V; ++e) b_o.v[e] = from_acc<T>(len == 0 ? A(0) : R == kMean ? b_acc[e] / a_len : b_acc[e]);
      store(out + i_p * D + o_d, b_o);
    }
  }
}

template <int R, int V, typename T>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    patch_unpool_kernel(const T* __restrict__ g, const int64_t* __restrict__ offsets, const T* __restrict__ x,
                        const T* __restrict__ pooled, T* __restrict__ out, int64_t N, int64_t D, int64_t n_chunks) {
  using A = acc_t<T>;
  const int64_t i_p = blockIdx.x;
  const Rows r = patch_rows(offsets, i_p, N);
  for (int64_t i_c = blockIdx.y; i_c < n_chunks; i_c += gridDim.y) {
    const int64_t o_d = (i_c * blockDim.x + threadIdx.x) * V;
    const bool m_d = o_d < D;
    if constexpr (R == kSum || R == kMean) {
      if (!m_d) continue;
      Pack<T, V> b_g = load<V>(g + i_p * D + o_d);
      if constexpr (R == kMean) {
        const A a_len = static_cast<A>(r.eos - r.bos > 1 ? r.eos - r.bos : 1);
#pragma unroll
        for (int e = 0; e < V; ++e) b_g.v[e] = from_acc<T>(to_acc(b_g.v[e]) / a_len);
      }
      for (int64_t t = r.t0; t < r.t1; ++t) store(out + t * D + o_d, b_g);
    } else {
      // Per column, the first row (relative to bos) whose x equals pooled: each y-thread finds the first of its run,
      // then the block takes the minimum. kNone (no hit, e.g. a NaN column) matches no row.
      constexpr unsigned long long kNone = ~0ull;
      unsigned long long b_first[V];
#pragma unroll
      for (int e = 0; e < V; ++e) b_first[e] = kNone;
      if (m_d) {
        const Pack<T, V> b_ref = load<V>(pooled + i_p * D + o_d);
#pragma unroll 2  // not 4: with 8 64-bit indices per thread, that spills under the 64-register cap
        for (int64_t t = r.t1 - 1; t >= r.t0; --t) {  // backwards: the last hit written is the first one
          const Pack<T, V> b_x = load<V>(x + t * D + o_d);
#pragma unroll
          for (int e = 0; e < V; ++e) {
            const bool hit = to_acc(b_x.v[e]) == to_acc(b_ref.v[e]);
            b_first[e] = hit ? static_cast<unsigned long long>(t - r.bos) : b_first[e];
          }
        }
      }
      if (blockDim.y > 1) {  // block-uniform; short patches (one y-thread) skip the shared memory and barriers
        __shared__ unsigned long long s_first[kThreads / 2 * V];  // blockDim.y >= 2, so blockDim.x <= kThreads / 2
        unsigned long long* p_first = s_first + threadIdx.x;  // column e at p_first[e * blockDim.x]
        if (threadIdx.y == 0) {
#pragma unroll
          for (int e = 0; e < V; ++e) p_first[e * blockDim.x] = kNone;
        }
        __syncthreads();
#pragma unroll
        for (int e = 0; e < V; ++e) {
          if (b_first[e] != kNone) atomicMin(p_first + e * blockDim.x, b_first[e]);
        }
        __syncthreads();
#pragma unroll
        for (int e = 0; e < V; ++e) b_first[e] = p_first[e * blockDim.x];
        __syncthreads();  // the next chunk resets s_first
      }
      if (m_d) {
        const Pack<T, V> b_g = load<V>(g + i_p * D + o_d);
        const T zero = from_acc<T>(A(0));
        for (int64_t t = r.t0; t < r.t1; ++t) {
          const auto row = static_cast<unsigned long long>(t - r.bos);
          Pack<T, V> b_o;
#pragma unroll
          for (int e = 0; e < V; ++e) b_o.v[e] = row == b_first[e] ? b_g.v[e] : zero;
          store(out + t * D + o_d, b_o);
        }
      }
    }
  }
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct Geometry {
  dim3 grid, block;
  int64_t n_chunks;
};

// vecs: column vectors per row (D / V). Patches go on grid.x (up to 2^31 - 1), column chunks on grid.y.
Geometry geometry(int64_t P, int64_t N, int64_t vecs) {
  int64_t n_chunks = ceil_div(vecs, kThreads);
  // Too few (patch, chunk) blocks to fill the GPU: narrow the chunks, down to one warp, for more blocks.
  if (P * n_chunks < kTargetBlocks) {
    n_chunks = std::max(n_chunks, std::min(ceil_div(kTargetBlocks, P), ceil_div(vecs, 32)));
  }
  const int64_t bx = ceil_div(vecs, n_chunks);
  n_chunks = ceil_div(vecs, bx);
  // Long patches: split their rows across a power-of-two number of y-threads, each keeping >= kRowsPerThread rows.
  const int64_t avg_len = ceil_div(N, P);
  int64_t by = 1;
  while (2 * by * bx <= kThreads && 2 * by * kRowsPerThread <= avg_len) by *= 2;
  const auto grid_y = static_cast<unsigned>(std::min<int64_t>(n_chunks, 65535));  // the kernels loop over the rest
  return {dim3(static_cast<unsigned>(P), grid_y), dim3(static_cast<unsigned>(bx), static_cast<unsigned>(by)),
          n_chunks};
}

// 16-byte vectors need D to be a multiple of the vector and every row pointer to be 16-byte aligned.
template <typename T>
bool vectorizable(int64_t D, std::initializer_list<const void*> ptrs) {
  if (D % kVec<T> != 0) return false;
  for (const void* p : ptrs) {
    if (reinterpret_cast<uintptr_t>(p) % kVecBytes != 0) return false;
  }
  return true;
}

// Calls launch(R, V) with R and V as std::integral_constant's, so that each (reduce, vector) pair is its own kernel.
template <typename T, typename Launch>
cudaError_t dispatch(int reduce, bool vectorize, Launch&& launch) {
  const auto with_vec = [&](auto r) {
    return vectorize ? launch(r, std::integral_constant<int, kVec<T>>{})
                     : launch(r, std::integral_constant<int, 1>{});
  };
  switch (reduce) {
    case kSum: return with_vec(std::integral_constant<int, kSum>{});
    case kMean: return with_vec(std::integral_constant<int, kMean>{});
    case kMax: return with_vec(std::integral_constant<int, kMax>{});
    case kMin: return with_vec(std::integral_constant<int, kMin>{});
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

template <typename T>
cudaError_t launch_patch_pool_fwd(const T* x, const int64_t* offsets, T* out, int64_t P, int64_t N, int64_t D,
                                  int reduce, cudaStream_t stream) {
  if (P <= 0 || D <= 0) return cudaSuccess;
  if (P > INT32_MAX) return cudaErrorInvalidConfiguration;
  return dispatch<T>(reduce, vectorizable<T>(D, {x, out}), [&](auto R, auto V) {
    constexpr int kV = decltype(V)::value;
    const Geometry geo = geometry(P, N, D / kV);
    patch_pool_fwd_kernel<decltype(R)::value, kV, T>
        <<<geo.grid, geo.block, 0, stream>>>(x, offsets, out, N, D, geo.n_chunks);
    return cudaGetLastError();
  });
}

template <typename T>
cudaError_t launch_patch_unpool(const T* g, const int64_t* offsets, const T* x, const T* pooled, T* out, int64_t P,
                                int64_t N, int64_t D, int reduce, cudaStream_t stream) {
  if (P <= 0 || N <= 0 || D <= 0) return cudaSuccess;
  if (P > INT32_MAX) return cudaErrorInvalidConfiguration;
  return dispatch<T>(reduce, vectorizable<T>(D, {g, x, pooled, out}), [&](auto R, auto V) {
    constexpr int kV = decltype(V)::value;
    const Geometry geo = geometry(P, N, D / kV);
    patch_unpool_kernel<decltype(R)::value, kV, T>
        <<<geo.grid, geo.block, 0, stream>>>(g, offsets, x, pooled, out, N, D, geo.n_chunks);
    return cudaGetLastError();
  });
}

#define MDUS_INSTANTIATE(T)                                                                                          \
  template cudaError_t launch_patch_pool_fwd<T>(const T*, const int64_t*, T*, int64_t, int64_t, int64_t, int,      \
                                                cudaStream_t);                                                      \
  template cudaError_t launch_patch_unpool<T>(const T*, const int64_t*, const T*, const T*, T*, int64_t, int64_t,  \
                                              int64_t, int, cudaStream_t);
MDUS_INSTANTIATE(float)
MDUS_INSTANTIATE(double)
MDUS_INSTANTIATE(__half)
MDUS_INSTANTIATE(__nv_bfloat16)
#undef MDUS_INSTANTIATE

}  // namespace mdus
