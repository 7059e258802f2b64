"""k-means in torch: greedy k-means++ seeding and Lloyd iterations, deterministic given a seed.

scikit-learn is not a dependency of mdus, and its MiniBatchKMeans runs on the CPU only; this one runs on whatever
device the features are on (an SSL model's features are already on the GPU) and its result depends only on the data
and the seed. Squared distances use ``|x|^2 - 2 x.c + |c|^2`` in the data's dtype, a row chunk at a time so
that the (N, K) distance matrix never exists at once. Cluster sums are accumulated in float64, so the centroid of a
big cluster does not drift with the order of the additions.
"""

from __future__ import annotations

import math

import torch

# Bound on the elements of one (rows x K) distance block: 4M floats (16 MB) keeps the GEMM efficient without
# letting K = 5000 units on a million frames allocate 20 GB.
_BLOCK_ELEMENTS = 1 << 22


def _row_chunk(k: int) -> int:
    return max(256, _BLOCK_ELEMENTS // max(k, 1))


def squared_distances(x: torch.Tensor, centroids: torch.Tensor, x_sq: torch.Tensor | None = None) -> torch.Tensor:
    """(N, D) x (K, D) -> (N, K) squared Euclidean distances, clamped at 0 (the expansion can round below it).
    ``x_sq`` (N,): the precomputed row norms ``(x * x).sum(1)``, which callers looping over centroids reuse."""
    if x_sq is None:
        x_sq = (x * x).sum(1)
    d = x_sq[:, None] - 2.0 * (x @ centroids.T) + (centroids * centroids).sum(1)
    return d.clamp_min_(0.0)


def assign(x: torch.Tensor, centroids: torch.Tensor, x_sq: torch.Tensor | None = None):
    """Nearest centroid of every row of ``x`` and the squared distance to it: (N,) int64, (N,) x.dtype."""
    labels = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    dists = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
    if x_sq is None:
        x_sq = (x * x).sum(1)
    c_sq = (centroids * centroids).sum(1)
    step = _row_chunk(centroids.shape[0])
    for i in range(0, x.shape[0], step):
        xb = x[i:i + step]
        d = x_sq[i:i + step, None] - 2.0 * (xb @ centroids.T) + c_sq
        # argmin picks the lowest index on ties, so equal inputs give equal labels on every run.
        best, idx = d.min(dim=1)
        labels[i:i + step] = idx
        dists[i:i + step] = best.clamp_min(0.0)
    return labels, dists


def kmeans_plus_plus(x: torch.Tensor, k: int, generator: torch.Generator, n_local_trials: int | None = None):
    """Greedy k-means++ (Arthur & Vassilvitskii's D^2 sampling, with several candidates per step and the one that
    lowers the potential most kept): (K, D) initial centroids drawn from the rows of ``x``.

    Sampling goes through a float64 cumulative sum and ``searchsorted`` rather than ``torch.multinomial``, which
    caps the number of categories at 2^24 and draws differently on different devices.
    """
    n = x.shape[0]
    if n_local_trials is None:
        n_local_trials = 2 + int(math.log(k))
    first = int(torch.randint(n, (1,), generator=generator))
    centroids = x.new_empty(k, x.shape[1])
    centroids[0] = x[first]
    x_sq = (x * x).sum(1)
    closest = squared_distances(x, x[first:first + 1], x_sq).squeeze(1).double()
    for c in range(1, k):
        total = float(closest.sum())
        if total <= 0.0:
            # Fewer distinct points than clusters: the rest duplicate existing centroids; Lloyd reseeds them.
            centroids[c:] = centroids[0]
            break
        cdf = closest.cumsum(0)
        draws = torch.rand(n_local_trials, generator=generator, dtype=torch.float64) * total
        candidates = torch.searchsorted(cdf, draws.to(cdf.device)).clamp_max_(n - 1)
        # Potential (sum of distances to the nearest centroid) if each candidate were added.
        with_candidate = torch.minimum(closest[None, :], squared_distances(x, x[candidates], x_sq).T.double())
        best = int(with_candidate.sum(1).argmin())
        centroids[c] = x[candidates[best]]
        closest = with_candidate[best]
    return centroids


def _cluster_sums(x: torch.Tensor, labels: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    counts = torch.bincount(labels, minlength=k).double()
    if x.device.type == "cpu":
        # index_add_ runs sequentially on the CPU: deterministic.
        sums = torch.zeros(k, x.shape[1], dtype=torch.float64, device=x.device).index_add_(0, labels, x.double())
    else:
        # On accelerators index_add_ uses atomics (order-dependent float sums); a one-hot GEMM is reproducible.
        sums = torch.zeros(k, x.shape[1], dtype=torch.float64, device=x.device)
        step = _row_chunk(k)
        for i in range(0, x.shape[0], step):
            onehot = torch.nn.functional.one_hot(labels[i:i + step], k).to(x.dtype)
            sums += (onehot.T @ x[i:i + step]).double()
    return sums, counts


def lloyd(x: torch.Tensor, centroids: torch.Tensor, max_iter: int = 100, tol: float = 1e-4):
    """Lloyd iterations from ``centroids``; returns (centroids, labels, inertia, n_iter).

    Stops when no label changes or when the summed squared centroid shift falls below ``tol`` x the mean per-dim
    variance of ``x`` (scikit-learn's scale-free criterion). A cluster that loses all its points is moved onto the
    points farthest from their centroids, which is where the partition fits worst.
    """
    k = centroids.shape[0]
    threshold = tol * float(x.double().var(dim=0, unbiased=False).mean())
    x_sq = (x * x).sum(1)
    labels, dists = assign(x, centroids, x_sq)
    n_iter = 0
    while n_iter < max_iter:
        n_iter += 1
        sums, counts = _cluster_sums(x, labels, k)
        empty = counts == 0
        new = (sums / counts.clamp_min(1.0)[:, None]).to(x.dtype)
        if bool(empty.any()):
            n_empty = int(empty.sum())
            far = torch.topk(dists, min(n_empty, x.shape[0])).indices
            new[empty.nonzero().squeeze(1)[:far.numel()]] = x[far]
        shift = float((new.double() - centroids.double()).square().sum())
        centroids = new
        new_labels, dists = assign(x, centroids, x_sq)
        changed = bool((new_labels != labels).any())
        labels = new_labels
        if not changed or shift <= threshold:
            break
    return centroids, labels, float(dists.double().sum()), n_iter


class KMeans:
    """k-means with ``n_clusters`` centroids: k-means++ seeding (on at most ``init_size`` rows), then Lloyd.

    ``n_init`` restarts keep the lowest inertia. Everything random comes from one ``torch.Generator`` seeded with
    ``seed``, so the same data and seed give the same centroids.

    Example:
        >>> x = torch.cat([torch.randn(50, 2), torch.randn(50, 2) + 10])
        >>> km = KMeans(2, seed=0).fit(x)
        >>> km.predict(x[:1]).tolist() != km.predict(x[-1:]).tolist()
        True
    """

    def __init__(self, n_clusters: int, *, max_iter: int = 100, tol: float = 1e-4, n_init: int = 1, seed: int = 0,
                 init_size: int | None = None):
        if int(n_clusters) < 1:
            raise ValueError(f"n_clusters must be >= 1, got {n_clusters}")
        if int(max_iter) < 1 or int(n_init) < 1:
            raise ValueError(f"max_iter and n_init must be >= 1, got max_iter={max_iter}, n_init={n_init}")
        self.n_clusters, self.max_iter, self.tol = int(n_clusters), int(max_iter), float(tol)
        self.n_init, self.seed, self.init_size = int(n_init), int(seed), init_size
        self.centroids: torch.Tensor | None = None
        self.inertia: float | None = None
        self.n_iter: int | None = None

    def fit(self, x: torch.Tensor) -> KMeans:
        """Fit on ``x`` (N, D) floating point, N >= n_clusters."""
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.dtype.is_floating_point:
            raise ValueError(f"x must be a 2-D floating-point tensor (N, D), got "
                             f"{getattr(x, 'shape', type(x).__name__)} {getattr(x, 'dtype', '')}")
        if x.shape[0] < self.n_clusters:
            raise ValueError(f"x has {x.shape[0]} rows, fewer than n_clusters={self.n_clusters}")
        if not bool(torch.isfinite(x).all()):
            raise ValueError("x contains NaN or infinite values")
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()  # the |x|^2 - 2 x.c + |c|^2 expansion cancels catastrophically in half precision
        generator = torch.Generator().manual_seed(self.seed)
        init_size = self.init_size or max(10 * self.n_clusters, 10_000)
        best = None
        for _ in range(self.n_init):
            pool = x
            if init_size < x.shape[0]:
                pool = x[torch.randperm(x.shape[0], generator=generator)[:init_size].to(x.device)]
            start = kmeans_plus_plus(pool, self.n_clusters, generator)
            result = lloyd(x, start, self.max_iter, self.tol)
            if best is None or result[2] < best[2]:
                best = result
        self.centroids, _, self.inertia, self.n_iter = best
        return self

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Nearest-centroid ids (N,) int64 of ``x`` (N, D)."""
        if self.centroids is None:
            raise RuntimeError("KMeans.predict called before fit (or before loading centroids)")
        if (not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != self.centroids.shape[1]
                or not x.dtype.is_floating_point):
            raise ValueError(f"x must be a floating-point tensor of shape (N, {self.centroids.shape[1]}), got "
                             f"{getattr(x, 'shape', type(x).__name__)} {getattr(x, 'dtype', '')}")
        centroids = self.centroids.to(device=x.device, dtype=x.dtype)
        if centroids.dtype in (torch.float16, torch.bfloat16):
            x, centroids = x.float(), centroids.float()
        return assign(x, centroids)[0]
