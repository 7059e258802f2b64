// The per-tile bodies of the cgMLP-gate / depthwise-conv CPU kernels, for one instruction set.
//
// Deliberately without an include guard and without includes: csrc/cpu/cgmlp.cpp includes this file once per
// instruction set, each time inside its own namespace and `#pragma GCC target` region, with
//   MDUS_VEC_BYTES  the vector width in bytes (16: SSE2/NEON, 32: AVX2, 64: AVX-512), and
//   MDUS_TAP_ROWS   how many output rows (or taps) one register block accumulates,
// after everything used here (ATen, <algorithm>, Tile, Params, Workspace, kBlockC) has been declared.
//
// The tap loops use GCC vector types rather than relying on auto-vectorization: left to itself, GCC vectorized
// the weight-gradient loop across rows with shuffles and ran it 3x slower than the forward. A register block keeps
// MDUS_TAP_ROWS accumulators and a sliding window of input rows in registers, so each tap costs one vector load of
// the input and one of the weight for MDUS_TAP_ROWS fused multiply-adds.

typedef float vfloat __attribute__((vector_size(MDUS_VEC_BYTES)));
typedef double vdouble __attribute__((vector_size(MDUS_VEC_BYTES)));

template <typename T>
struct VecOf;
template <>
struct VecOf<float> {
  using type = vfloat;
};
template <>
struct VecOf<double> {
  using type = vdouble;
};

template <typename V, typename T>
inline V vload(const T* p) {
  V v;
  __builtin_memcpy(&v, p, sizeof(V));  // an unaligned vector load
  return v;
}

template <typename V, typename T>
inline void vstore(T* p, const V& v) {
  __builtin_memcpy(p, &v, sizeof(V));
}

// res[r * ldr + c] = init[c] + sum_j w[j * ldw + c] * buf[(r + j) * kBlockC + c] for the NR rows r0..r0+NR-1 and
// one vector of channels at c. Row r + 1 at tap j reads what row r reads at tap j + 1, hence the window h.
template <int NR, typename acc_t>
inline void tap_sum_block(const acc_t* __restrict w, int64_t ldw, const acc_t* __restrict buf, int64_t r0,
                          int64_t K, int64_t c, const acc_t* __restrict init, acc_t* __restrict res, int64_t ldr) {
  using V = typename VecOf<acc_t>::type;
  V a[NR], h[NR];
  const V a0 = init ? vload<V>(init + c) : V{};
#pragma GCC unroll 16
  for (int i = 0; i < NR; ++i) a[i] = a0;
#pragma GCC unroll 16
  for (int i = 0; i + 1 < NR; ++i) h[i] = vload<V>(buf + (r0 + i) * kBlockC + c);
  for (int64_t j = 0; j < K; ++j) {
    h[NR - 1] = vload<V>(buf + (r0 + j + NR - 1) * kBlockC + c);
    const V wj = vload<V>(w + j * ldw + c);
#pragma GCC unroll 16
    for (int i = 0; i < NR; ++i) a[i] += wj * h[i];
#pragma GCC unroll 16
    for (int i = 0; i + 1 < NR; ++i) h[i] = h[i + 1];
  }
#pragma GCC unroll 16
  for (int i = 0; i < NR; ++i) vstore(res + (r0 + i) * ldr + c, a[i]);
}

// res[r * ldr + c] = init[c] + sum_j w[j * ldw + c] * buf[(r + j) * kBlockC + c] for r < rows, c < cols; init may
// be null. With w the taps, buf the halo'd input and res the output, this is the conv; with the reversed taps and
// buf the upstream gradient it is the transposed conv.
template <typename acc_t>
void tap_sum(const acc_t* __restrict w, int64_t ldw, const acc_t* __restrict buf, int64_t rows, int64_t K,
             int64_t cols, const acc_t* __restrict init, acc_t* __restrict res, int64_t ldr) {
  using V = typename VecOf<acc_t>::type;
  constexpr int64_t W = sizeof(V) / sizeof(acc_t);
  int64_t c = 0;
  for (; c + W <= cols; c += W) {
    int64_t r = 0;
    for (; r + MDUS_TAP_ROWS <= rows; r += MDUS_TAP_ROWS) {
      tap_sum_block<MDUS_TAP_ROWS>(w, ldw, buf, r, K, c, init, res, ldr);
    }
    for (; r + 2 <= rows; r += 2) tap_sum_block<2>(w, ldw, buf, r, K, c, init, res, ldr);
    for (; r < rows; ++r) tap_sum_block<1>(w, ldw, buf, r, K, c, init, res, ldr);
  }
  for (; c < cols; ++c) {  // channel tail (C not a multiple of the vector width)
    for (int64_t r = 0; r < rows; ++r) {
      acc_t a = init ? init[c] : acc_t(0);
      for (int64_t j = 0; j < K; ++j) a += w[j * ldw + c] * buf[(r + j) * kBlockC + c];
      res[r * ldr + c] = a;
    }
  }
}

// dw[(j0 + i) * ldw + c] += sum_r dz[r * kBlockC + c] * h[(r + j0 + i) * kBlockC + c] for NR taps j0..j0+NR-1:
// tap j0 + i + 1 at row r reads what tap j0 + i reads at row r + 1, the same window trick over rows.
template <int NR, typename acc_t>
inline void tap_corr_block(const acc_t* __restrict dz, const acc_t* __restrict h, int64_t rows, int64_t j0,
                           int64_t c, acc_t* __restrict dw, int64_t ldw) {
  using V = typename VecOf<acc_t>::type;
  V a[NR], hw[NR];
#pragma GCC unroll 16
  for (int i = 0; i < NR; ++i) a[i] = V{};
#pragma GCC unroll 16
  for (int i = 0; i + 1 < NR; ++i) hw[i] = vload<V>(h + (j0 + i) * kBlockC + c);
  for (int64_t r = 0; r < rows; ++r) {
    hw[NR - 1] = vload<V>(h + (r + j0 + NR - 1) * kBlockC + c);
    const V d = vload<V>(dz + r * kBlockC + c);
#pragma GCC unroll 16
    for (int i = 0; i < NR; ++i) a[i] += d * hw[i];
#pragma GCC unroll 16
    for (int i = 0; i + 1 < NR; ++i) hw[i] = hw[i + 1];
  }
#pragma GCC unroll 16
  for (int i = 0; i < NR; ++i) {
    acc_t* p = dw + (j0 + i) * ldw + c;
    vstore(p, vload<V>(p) + a[i]);
  }
}

// dw[j * ldw + c] += sum_{r < rows} dz[r * kBlockC + c] * h[(r + j) * kBlockC + c]: the conv weight's gradient.
template <typename acc_t>
void tap_corr(const acc_t* __restrict dz, const acc_t* __restrict h, int64_t rows, int64_t K, int64_t cols,
              acc_t* __restrict dw, int64_t ldw) {
  using V = typename VecOf<acc_t>::type;
  constexpr int64_t W = sizeof(V) / sizeof(acc_t);
  int64_t c = 0;
  for (; c + W <= cols; c += W) {
    int64_t j = 0;
    for (; j + MDUS_TAP_ROWS <= K; j += MDUS_TAP_ROWS) tap_corr_block<MDUS_TAP_ROWS>(dz, h, rows, j, c, dw, ldw);
    for (; j + 2 <= K; j += 2) tap_corr_block<2>(dz, h, rows, j, c, dw, ldw);
    for (; j < K; ++j) tap_corr_block<1>(dz, h, rows, j, c, dw, ldw);
  }
  for (; c < cols; ++c) {
    for (int64_t j = 0; j < K; ++j) {
      acc_t a = 0;
      for (int64_t r = 0; r < rows; ++r) a += dz[r * kBlockC + c] * h[(r + j) * kBlockC + c];
      dw[j * ldw + c] += a;
    }
  }
}

// sum_{c < n} f(c) with MDUS_VEC_BYTES / 4 independent partial sums: a serial float sum cannot be vectorized
// without reassociation, which the compiler does not do on its own.
template <typename acc_t, typename F>
inline acc_t lane_sum(int64_t n, F f) {
  constexpr int64_t kLanes = 2 * MDUS_VEC_BYTES / static_cast<int64_t>(sizeof(acc_t));
  acc_t s[kLanes] = {};
  int64_t c = 0;
  for (; c + kLanes <= n; c += kLanes) {
    for (int64_t v = 0; v < kLanes; ++v) s[v] += f(c + v);
  }
  for (; c < n; ++c) s[c % kLanes] += f(c);
  acc_t total = 0;
  for (int64_t v = 0; v < kLanes; ++v) total += s[v];
  return total;
}

// LayerNorm statistics of one row: two passes (mean, then the biased variance around it), which keeps the variance
// accurate for rows with a large mean, unlike E[x^2] - E[x]^2.
template <typename scalar_t, typename acc_t>
inline void row_stats(const scalar_t* __restrict row, int64_t C, acc_t eps, acc_t& mean, acc_t& rstd) {
  const acc_t m = lane_sum<acc_t>(C, [&](int64_t c) { return static_cast<acc_t>(row[c]); }) / static_cast<acc_t>(C);
  const acc_t var = lane_sum<acc_t>(C, [&](int64_t c) {
                      const acc_t d = static_cast<acc_t>(row[c]) - m;
                      return d * d;
                    }) /
                    static_cast<acc_t>(C);
  mean = m;
  rstd = acc_t(1) / std::sqrt(var + eps);
}

// Element-wise row loops. They are functions with __restrict parameters because GCC ignores __restrict on local
// pointers, and without it the accumulations into the partial sums were left scalar for fear of aliasing.
template <typename scalar_t, typename acc_t>
inline void normalize_row(const scalar_t* __restrict xs, acc_t m, acc_t r, const acc_t* __restrict nw,
                          const acc_t* __restrict nb, acc_t* __restrict dst, int64_t n) {
  for (int64_t c = 0; c < n; ++c) dst[c] = (static_cast<acc_t>(xs[c]) - m) * r * nw[c] + nb[c];
}

template <typename scalar_t, typename acc_t>
inline void convert_row(const scalar_t* __restrict xs, acc_t* __restrict dst, int64_t n) {
  for (int64_t c = 0; c < n; ++c) dst[c] = static_cast<acc_t>(xs[c]);
}

template <typename scalar_t, typename acc_t>
inline void product_row(const scalar_t* __restrict a, const scalar_t* __restrict b, acc_t* __restrict dst, int64_t n) {
  for (int64_t c = 0; c < n; ++c) dst[c] = static_cast<acc_t>(a[c]) * static_cast<acc_t>(b[c]);
}

template <typename scalar_t, typename acc_t>
inline void gate_row(const scalar_t* __restrict a, const acc_t* __restrict z, scalar_t* __restrict out, int64_t n) {
  for (int64_t c = 0; c < n; ++c) out[c] = static_cast<scalar_t>(static_cast<acc_t>(a[c]) * z[c]);
}

template <typename scalar_t, typename acc_t>
inline void store_row(const acc_t* __restrict z, scalar_t* __restrict out, int64_t n) {
  for (int64_t c = 0; c < n; ++c) out[c] = static_cast<scalar_t>(z[c]);
}

template <typename acc_t>
inline void accumulate_row(const acc_t* __restrict v, acc_t* __restrict sum, int64_t n) {
  for (int64_t c = 0; c < n; ++c) sum[c] += v[c];
}

// LayerNorm parameter gradients of one row chunk (dnw += dh * xhat, dnb += dh) and dxhat = dh * nw into sc.
template <typename scalar_t, typename acc_t>
inline void ln_param_grad_row(const acc_t* __restrict dh, const scalar_t* __restrict xg, acc_t m, acc_t rsd,
                              const acc_t* __restrict nw, acc_t* __restrict dnw, acc_t* __restrict dnb,
                              acc_t* __restrict sc, int64_t n) {
  for (int64_t c = 0; c < n; ++c) {
    const acc_t xhat = (static_cast<acc_t>(xg[c]) - m) * rsd;
    dnw[c] += dh[c] * xhat;
    dnb[c] += dh[c];
    sc[c] = dh[c] * nw[c];
  }
}

// LayerNorm's input gradient of one row: rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)).
template <typename scalar_t, typename acc_t>
inline void ln_input_grad_row(const acc_t* __restrict sc, const scalar_t* __restrict xg, acc_t m, acc_t rsd,
                              scalar_t* __restrict out, int64_t n) {
  const acc_t inv_n = acc_t(1) / static_cast<acc_t>(n);
  const acc_t a = lane_sum<acc_t>(n, [&](int64_t c) { return sc[c]; }) * inv_n;
  const acc_t b = lane_sum<acc_t>(n, [&](int64_t c) { return sc[c] * ((static_cast<acc_t>(xg[c]) - m) * rsd); }) * inv_n;
  for (int64_t c = 0; c < n; ++c) {
    const acc_t xhat = (static_cast<acc_t>(xg[c]) - m) * rsd;
    out[c] = static_cast<scalar_t>(rsd * (sc[c] - a - xhat * b));
  }
}

// Rows [first, first + rows) of the conv input (x_g normalized, or x itself) into the chunk-major buffer `buf` (row
// i of chunk q at buf + (q * ws_rows + i) * kBlockC), 0 outside the tile's segment. The rows are read from memory
// in order and whole, so that DRAM sees sequential streams (a per-chunk read would fetch 128 bytes per row at the
// row stride, which defeats the hardware prefetchers). With LN and `stats`, the statistics of each row are computed
// here too (while the row is in L1) into mu/rs[i]; otherwise they are read from mu/rs[p - stat_base].
template <typename scalar_t, bool LN, typename acc_t>
void fill_input(const Params<acc_t>& P, const scalar_t* x, const Tile& tile, int64_t first, int64_t rows,
                int64_t ws_rows, bool stats, acc_t* mu, acc_t* rs, int64_t stat_base, acc_t* __restrict buf) {
  const int64_t C = P.C;
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t p = first + i;
    if (p < tile.lo || p >= tile.hi) {
      for (int64_t c0 = 0; c0 < C; c0 += kBlockC) {
        acc_t* row = buf + ((c0 / kBlockC) * ws_rows + i) * kBlockC;
        std::fill(row, row + std::min(kBlockC, C - c0), acc_t(0));
      }
      continue;
    }
    const scalar_t* xs = x + p * P.ldx + P.off_in;
    acc_t m = 0, r = 1;
    if constexpr (LN) {
      if (stats) {
        row_stats(xs, C, P.eps, mu[i], rs[i]);
        m = mu[i];
        r = rs[i];
      } else {
        m = mu[p - stat_base];
        r = rs[p - stat_base];
      }
    }
    for (int64_t c0 = 0; c0 < C; c0 += kBlockC) {
      const int64_t cols = std::min(kBlockC, C - c0);
      acc_t* row = buf + ((c0 / kBlockC) * ws_rows + i) * kBlockC;
      if constexpr (LN) {
        normalize_row(xs + c0, m, r, P.nw + c0, P.nb + c0, row, cols);
      } else {
        convert_row(xs + c0, row, cols);
      }
    }
  }
}

// One forward tile: out[t] = (x_r[t] *) (bias + sum_j w[j] * h[t + j - L]) for t in [t0, t1), and (LN) the tile
// rows' mean/rstd.
template <typename scalar_t, bool LN, bool GATE, typename acc_t>
void forward_tile(const Params<acc_t>& P, const scalar_t* x, const Tile& tile, Workspace<acc_t>& ws, scalar_t* out,
                  acc_t* mean, acc_t* rstd) {
  const int64_t C = P.C, K = P.K, n = tile.t1 - tile.t0, first = tile.t0 - P.L, rows = n + K - 1;
  if (!tile.active) {
    std::fill(out + tile.t0 * C, out + tile.t1 * C, scalar_t(0));
    if constexpr (LN) {
      std::fill(mean + tile.t0, mean + tile.t1, acc_t(0));
      std::fill(rstd + tile.t0, rstd + tile.t1, acc_t(0));
    }
    return;
  }
  acc_t* mu = ws.mu.data();
  acc_t* rs = ws.rs.data();
  acc_t* hall = ws.hall.data();
  acc_t* zbuf = ws.zbuf.data();
  // The halo rows' statistics and normalization are recomputed by both neighbouring tiles ((k-1)/block_t extra
  // work), so that tiles stay independent; a tile writes only its own rows.
  fill_input<scalar_t, LN>(P, x, tile, first, rows, ws.rows, true, mu, rs, 0, hall);
  if constexpr (LN) {
    std::copy(mu + P.L, mu + P.L + n, mean + tile.t0);
    std::copy(rs + P.L, rs + P.L + n, rstd + tile.t0);
  }
  for (int64_t c0 = 0; c0 < C; c0 += kBlockC) {
    const int64_t cols = std::min(kBlockC, C - c0);
    tap_sum(P.wT + c0, C, hall + (c0 / kBlockC) * ws.rows * kBlockC, n, K, cols, P.bias ? P.bias + c0 : nullptr,
            zbuf + c0, C);
  }
  for (int64_t r = 0; r < n; ++r) {  // row-major, so that x_r is read and out written as sequential streams
    const int64_t t = tile.t0 + r;
    if constexpr (GATE) {
      gate_row(x + t * P.ldx, zbuf + r * C, out + t * C, C);
    } else {
      store_row(zbuf + r * C, out + t * C, C);
    }
  }
}

// One backward tile: dx of the tile's rows, and the tile's contribution to the parameter gradients, added into
// `part` (its group's partial sums, laid out as dweight (K, C) tap-major, dbias, dnorm_weight, dnorm_bias).
template <typename scalar_t, bool LN, bool GATE, typename acc_t>
void backward_tile(const Params<acc_t>& P, const scalar_t* g, const scalar_t* x, const acc_t* mean,
                   const acc_t* rstd, const Tile& tile, Workspace<acc_t>& ws, scalar_t* dx, acc_t* part) {
  const int64_t C = P.C, K = P.K, R = K - 1 - P.L, n = tile.t1 - tile.t0, rows = n + K - 1;
  if (!tile.active) {
    std::fill(dx + tile.t0 * P.ldx, dx + tile.t1 * P.ldx, scalar_t(0));
    return;
  }
  acc_t* p_dw = part;
  acc_t* p_db = part + K * C;
  acc_t* p_dnw = p_db + C;
  acc_t* p_dnb = p_dnw + C;
  acc_t* hall = ws.hall.data();
  acc_t* dzall = ws.dzall.data();
  acc_t* zbuf = ws.zbuf.data();
  acc_t* res = ws.res.data();
  acc_t* scratch = ws.scratch.data();
  // h (the conv input) on the forward window's rows [t0 - L, t1 + R), dz = dout (* x_r) on the transposed window's
  // rows [t0 - R, t1 + L), both read row by row into chunk-major buffers.
  fill_input<scalar_t, LN>(P, x, tile, tile.t0 - P.L, rows, ws.rows, false, const_cast<acc_t*>(mean),
                           const_cast<acc_t*>(rstd), 0, hall);
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t s = tile.t0 - R + i;
    const bool inside = s >= tile.lo && s < tile.hi;
    const scalar_t* gs = g + s * C;
    const scalar_t* xr = x + s * P.ldx;
    for (int64_t c0 = 0; c0 < C; c0 += kBlockC) {
      const int64_t cols = std::min(kBlockC, C - c0);
      acc_t* row = dzall + ((c0 / kBlockC) * ws.rows + i) * kBlockC;
      if (!inside) {
        std::fill(row, row + cols, acc_t(0));
      } else if constexpr (GATE) {
        product_row(gs + c0, xr + c0, row, cols);
      } else {
        convert_row(gs + c0, row, cols);
      }
    }
  }
  for (int64_t c0 = 0; c0 < C; c0 += kBlockC) {
    const int64_t cols = std::min(kBlockC, C - c0);
    const acc_t* h = hall + (c0 / kBlockC) * ws.rows * kBlockC;
    const acc_t* dz = dzall + (c0 / kBlockC) * ws.rows * kBlockC;
    if constexpr (GATE) {  // z for dx_r = dout * z, recomputed rather than saved by the forward
      tap_sum(P.wT + c0, C, h, n, K, cols, P.bias ? P.bias + c0 : nullptr, zbuf + c0, C);
    }
    const acc_t* dz_tile = dz + R * kBlockC;  // dz of the tile's own rows
    for (int64_t r = 0; r < n; ++r) accumulate_row(dz_tile + r * kBlockC, p_db + c0, cols);
    tap_corr(dz_tile, h, n, K, cols, p_dw + c0, C);
    if constexpr (LN) {
      tap_sum(P.wR + c0, C, dz, n, K, cols, static_cast<const acc_t*>(nullptr), res, kBlockC);  // dh
      for (int64_t r = 0; r < n; ++r) {
        const int64_t p = tile.t0 + r;  // x_g's row is in cache since the fill above
        ln_param_grad_row(res + r * kBlockC, x + p * P.ldx + P.off_in + c0, mean[p], rstd[p], P.nw + c0, p_dnw + c0,
                          p_dnb + c0, scratch + r * C + c0, cols);
      }
    } else {
      tap_sum(P.wR + c0, C, dz, n, K, cols, static_cast<const acc_t*>(nullptr), scratch + c0, C);  // dh = dx
    }
  }
  // Row-major output pass. LayerNorm's backward needs two reductions over all C channels of dxhat, which the
  // chunks above completed in the (block_t, C) scratch.
  for (int64_t r = 0; r < n; ++r) {
    const int64_t p = tile.t0 + r;
    if constexpr (GATE) gate_row(g + p * C, zbuf + r * C, dx + p * P.ldx, C);  // dx_r = dout * z
    if constexpr (LN) {
      ln_input_grad_row(scratch + r * C, x + p * P.ldx + P.off_in, mean[p], rstd[p], dx + p * P.ldx + P.off_in, C);
    } else {
      store_row(scratch + r * C, dx + p * P.ldx + P.off_in, C);
    }
  }
}
