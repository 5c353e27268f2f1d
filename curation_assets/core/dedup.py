"""Near-duplicate search with several k-means clusterings (the DALL·E 2 pre-training method), Dagster-free.

The idea: an exact all-pairs search over N embeddings costs N² dot products. Partition the embeddings with
spherical k-means into K clusters and compare points only within their cluster: about N²/K products.
A duplicate pair whose two points fall on opposite sides of a cluster boundary is missed, so the search is
repeated with several clusterings fitted on different random subsets (different seeds) and the pairs are
unioned. OpenAI reported 85% of all pairs found with one clustering (K = 1024) and 97% with five; because
the loss depends on the data, :func:`exact_pairs` + :func:`recall_curve` measure it on a sample.

Conventions: ``x`` is an ``n x d`` float32 matrix of L2-normalised rows (inner product = cosine); points are
referred to by row index; a pair is ``(a, b)`` with ``a < b``; "found by" is a bit mask (bit ``c - 1`` set
when clustering ``c`` found the pair).

Rules (documented because they are user-visible):

- **K** grows with n so that clusters stay bounded: ``K = ceil(n / cluster_size)`` (default 256, optionally
  capped by ``k_max``), so the within-cluster search costs about ``n * cluster_size / 2`` products, linear in n.
- **Two levels**: each clustering is a coarse k-means into ``B = ceil(sqrt(K))`` buckets, then a fine k-means
  inside each bucket with ``K_b`` centroids in proportion to the bucket's share of the fit subset. A point is
  assigned to its nearest coarse centroid, then to the nearest fine centroid of that bucket, which costs
  ``B + K/B`` products per point instead of K. Every cluster lies inside one bucket, so the search runs bucket by
  bucket, each reading only its members' vectors (:func:`bucket_pairs`), and a new shard re-searches only the
  buckets it lands in.
- **Fit subset**: clustering ``c`` is fitted on ``min(n, K * fit_points_per_centroid)`` points drawn without
  replacement with seed ``seed + c`` (faiss needs about 39 training points per centroid); faiss k-means itself
  is seeded with the same value (bucket ``b``'s fine fit with ``seed + c`` and ``b``).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

KMeansFn = Callable[[np.ndarray, int, int, int], np.ndarray]

POLICY_KEYS = ("highest_resolution", "lowest_resolution", "lowest_safety_score", "highest_safety_score", "uid")
OPEN_CLIP_THRESHOLD = 0.95
MAX_POINTS_PER_CENTROID = 256
"""faiss subsamples a k-means training set to this many points per centroid (its guidance: 39 to 256); the
coarse level of a two-level fit, with ~40 sqrt(K) subset points per bucket, is fitted on such a sample."""


# --------------------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class DedupSettings:
    """The validated ``dedup`` config section (see ``curation_assets/configs/dedup.yaml``)."""

    threshold: float | None = None  # None = "auto": follows the encoder, see resolve_threshold
    open_clip_threshold: float = OPEN_CLIP_THRESHOLD
    cluster_size: int = 256
    k_max: int | None = None  # None = no cap
    fit_points_per_centroid: int = 40
    niter: int = 10
    seed: int = 0
    row_block: int = 1024
    col_block: int = 8192
    max_pairs: int = 50_000_000
    representative_order: tuple[str, ...] = ("highest_resolution", "lowest_safety_score", "uid")
    recall_sample_size: int = 5000
    recall_seed: int = 1234
    recall_target: float = 0.95
    verify: Any = None  # core.pixel_verify.VerifySettings; None = its defaults
    vector_dtype: str = "float32"

    @classmethod
    def from_section(cls, section: Mapping[str, Any]) -> "DedupSettings":
        """Validate a merged config section; raises ``ValueError`` naming the offending key."""
        section = dict(section or {})
        known = {"threshold", "open_clip_threshold", "kmeans", "buckets", "search", "representative", "recall",
                 "verify"}
        unknown = sorted(set(section) - known)
        if unknown:
            raise ValueError(f"dedup config: unknown keys {unknown}; known: {sorted(known)}")

        def sub(name: str, keys: set[str]) -> dict:
            value = section.get(name) or {}
            if not isinstance(value, dict):
                raise ValueError(f"dedup config: '{name}' must be a mapping")
            bad = sorted(set(value) - keys)
            if bad:
                raise ValueError(f"dedup config: unknown keys {bad} under '{name}'; known: {sorted(keys)}")
            return value

        if "min_points_per_centroid" in (section.get("kmeans") or {}):
            raise ValueError("dedup config: kmeans.min_points_per_centroid was replaced by kmeans.cluster_size "
                             "(K = ceil(n / cluster_size), no default cap): see configs/dedup.yaml")
        km = sub("kmeans", {"cluster_size", "k_max", "fit_points_per_centroid", "niter", "seed"})
        se = sub("search", {"row_block", "col_block", "max_pairs"})
        rep = sub("representative", {"order"})
        rc = sub("recall", {"sample_size", "seed", "target"})
        bu = sub("buckets", {"vector_dtype"})
        vector_dtype = bu.get("vector_dtype", cls.vector_dtype)
        if vector_dtype not in ("float32", "float16"):
            raise ValueError(f"dedup config: buckets.vector_dtype must be float32 or float16, got {vector_dtype!r}")

        threshold = section.get("threshold", "auto")
        if threshold in (None, "auto"):
            threshold = None
        else:
            threshold = _number("threshold", threshold, -1.0, 1.0)
        order = tuple(rep.get("order", cls.representative_order))
        bad = [key for key in order if key not in POLICY_KEYS]
        if bad or not order:
            raise ValueError(f"dedup config: representative.order {list(order)} has unknown keys {bad}; "
                             f"choose from {list(POLICY_KEYS)}")
        if "uid" not in order:
            order = order + ("uid",)  # uid breaks every remaining tie: the choice is always deterministic

        defaults = cls()
        return cls(
            threshold=threshold,
            open_clip_threshold=_number("open_clip_threshold",
                                        section.get("open_clip_threshold", defaults.open_clip_threshold), -1.0, 1.0),
            cluster_size=_integer("kmeans.cluster_size", km.get("cluster_size", defaults.cluster_size), 2),
            k_max=None if km.get("k_max") is None else _integer("kmeans.k_max", km.get("k_max"), 1),
            fit_points_per_centroid=_integer("kmeans.fit_points_per_centroid",
                                             km.get("fit_points_per_centroid", defaults.fit_points_per_centroid), 1),
            niter=_integer("kmeans.niter", km.get("niter", defaults.niter), 1),
            seed=_integer("kmeans.seed", km.get("seed", defaults.seed), 0),
            row_block=_integer("search.row_block", se.get("row_block", defaults.row_block), 1),
            col_block=_integer("search.col_block", se.get("col_block", defaults.col_block), 1),
            max_pairs=_integer("search.max_pairs", se.get("max_pairs", defaults.max_pairs), 1),
            representative_order=order,
            recall_sample_size=_integer("recall.sample_size", rc.get("sample_size", defaults.recall_sample_size), 1),
            recall_seed=_integer("recall.seed", rc.get("seed", defaults.recall_seed), 0),
            recall_target=_number("recall.target", rc.get("target", defaults.recall_target), 0.0, 1.0),
            verify=_verify_settings(section.get("verify")),
            vector_dtype=vector_dtype,
        )

    @property
    def verification(self):
        """The stage-2 pixel verification settings (:class:`curation_assets.core.pixel_verify.VerifySettings`)."""
        return self.verify if self.verify is not None else _verify_settings(None)

    def resolve_threshold(self, encoder_name: str | None) -> float:
        """The cosine threshold: the configured number, else the default of the encoder that made the embeddings
        (``perceptual*``: ``core.perceptual.DUPLICATE_THRESHOLD``; ``*clip*``: ``open_clip_threshold``)."""
        if self.threshold is not None:
            return self.threshold
        name = (encoder_name or "").lower()
        if name.startswith("perceptual"):
            from curation_assets.core.perceptual import DUPLICATE_THRESHOLD

            return float(DUPLICATE_THRESHOLD)
        if "clip" in name:
            return self.open_clip_threshold
        raise ValueError(f"dedup: no default duplicate threshold for encoder {encoder_name!r}; "
                         "set dedup.threshold in the config")


def _verify_settings(section: Any):
    from curation_assets.core.pixel_verify import VerifySettings

    if section is not None and not isinstance(section, dict):
        raise ValueError("dedup config: 'verify' must be a mapping")
    return VerifySettings.from_section(section)


def _number(name: str, value: Any, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= float(value) <= hi:
        raise ValueError(f"dedup config: {name} must be a number in [{lo}, {hi}], got {value!r}")
    return float(value)


def _integer(name: str, value: Any, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"dedup config: {name} must be an integer >= {lo}, got {value!r}")
    return int(value)


# --------------------------------------------------------------------------------------------- clustering


def default_k(n: int, cluster_size: int = 256, k_max: int | None = None) -> int:
    """K for ``n`` embeddings: ``ceil(n / cluster_size)``, at least 1, capped by ``k_max`` when given."""
    k = max(1, -(-int(n) // int(cluster_size)))
    return int(min(k, k_max) if k_max else k)


def default_buckets(k: int) -> int:
    """Coarse cells (buckets) of a two-level clustering with ``k`` fine clusters: ``ceil(sqrt(k))``."""
    return max(1, int(np.ceil(np.sqrt(k))))


def clustering_seed(base_seed: int, clustering: int) -> int:
    return int(base_seed) + int(clustering)


FIT_COPIES = 4
"""Copies of a fit subset alive during a fit (the subset, faiss's own, the per-bucket slices, distances): a
memory budget of M bytes allows ``M / (FIT_COPIES * 4 * d)`` fit points."""


def fit_points_within(budget_bytes: int, dim: int) -> int:
    """The most fit points (float32, ``dim`` wide) a memory budget allows."""
    return max(1, int(budget_bytes) // (FIT_COPIES * 4 * max(1, int(dim))))


def fit_subset(n: int, k: int, seed: int, fit_points_per_centroid: int = 40, max_points: int | None = None
               ) -> np.ndarray:
    """Sorted row indices of the random subset a clustering is fitted on (all rows when n is small), at most
    ``max_points`` rows (a memory budget: fewer points per centroid, never fewer than K)."""
    size = min(n, max(k, k * fit_points_per_centroid))
    if max_points is not None:
        size = min(size, max(min(n, k), int(max_points)))
    if size >= n:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=size, replace=False)).astype(np.int64)


def faiss_kmeans(x: np.ndarray, k: int, seed: int, niter: int) -> np.ndarray:
    """Spherical faiss k-means on the CPU (the default when no GPU-aware callable is passed)."""
    import faiss

    x = np.ascontiguousarray(x, dtype=np.float32)
    km = faiss.Kmeans(x.shape[1], int(k), niter=int(niter), seed=int(seed), spherical=True, verbose=False,
                      max_points_per_centroid=MAX_POINTS_PER_CENTROID, min_points_per_centroid=1)
    km.train(x)
    return np.ascontiguousarray(km.centroids, dtype=np.float32)


def fit_centroids(x_subset: np.ndarray, k: int, seed: int, niter: int = 10, kmeans: KMeansFn | None = None) -> np.ndarray:
    """Spherical k-means centroids (``k x d``, unit rows) of the fit subset; ``k`` is capped at the subset size."""
    n = len(x_subset)
    if n == 0:
        raise ValueError("cannot fit k-means on zero embeddings")
    k = max(1, min(int(k), n))
    if k == 1:
        mean = x_subset.astype(np.float64).mean(axis=0)
        norm = np.linalg.norm(mean)
        centroid = mean / norm if norm > 0 else x_subset[0].astype(np.float64)
        return centroid.astype(np.float32)[None, :]
    centroids = (kmeans or faiss_kmeans)(x_subset, k, seed, niter)
    norms = np.linalg.norm(centroids, axis=1, keepdims=True)
    return np.ascontiguousarray(centroids / np.maximum(norms, 1e-12), dtype=np.float32)


def assign(x: np.ndarray, centroids: np.ndarray, block: int = 16384) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid by inner product for every row: ``(cluster int32, similarity float32)``."""
    n = len(x)
    labels = np.empty(n, dtype=np.int32)
    sims = np.empty(n, dtype=np.float32)
    ct = np.ascontiguousarray(centroids.T, dtype=np.float32)
    for start in range(0, n, block):
        s = x[start:start + block] @ ct
        best = s.argmax(axis=1)
        labels[start:start + block] = best
        sims[start:start + block] = s[np.arange(len(best)), best]
    return labels, sims


@dataclass(frozen=True)
class TwoLevelCentroids:
    """One clustering: ``coarse`` (``B x d``) bucket centroids and ``fine`` (``K x d``) cluster centroids, where
    bucket ``b`` owns the fine clusters ``offsets[b] .. offsets[b + 1] - 1``. Cluster ids are global."""

    coarse: np.ndarray
    fine: np.ndarray
    offsets: np.ndarray

    @property
    def k(self) -> int:
        return len(self.fine)

    @property
    def buckets(self) -> int:
        return len(self.coarse)

    @property
    def dim(self) -> int:
        return self.fine.shape[1]

    def bucket_of_cluster(self) -> np.ndarray:
        return np.repeat(np.arange(self.buckets, dtype=np.int32), np.diff(self.offsets))

    def save(self, handle) -> None:
        np.savez(handle, coarse=self.coarse, fine=self.fine, offsets=self.offsets)

    @classmethod
    def load(cls, path) -> "TwoLevelCentroids":
        """An ``.npz`` of :meth:`save`, or a one-level ``.npy`` of older releases (one bucket)."""
        if str(path).endswith(".npy"):
            fine = np.load(path)
            return cls.single(fine)
        with np.load(path) as z:
            return cls(z["coarse"], z["fine"], z["offsets"])

    @classmethod
    def single(cls, fine: np.ndarray) -> "TwoLevelCentroids":
        mean = fine.astype(np.float64).mean(axis=0)
        mean = (mean / max(np.linalg.norm(mean), 1e-12)).astype(np.float32)[None, :]
        return cls(mean, np.ascontiguousarray(fine, np.float32), np.array([0, len(fine)], np.int64))

    def version(self) -> str:
        import hashlib

        h = hashlib.sha1()
        for part in (self.coarse, self.fine, self.offsets.astype(np.int64)):
            h.update(np.ascontiguousarray(part).tobytes())
        return h.hexdigest()[:16]


def fit_two_level(x_subset: np.ndarray, k: int, seed: int, niter: int = 10, kmeans: KMeansFn | None = None,
                  buckets: int | None = None) -> TwoLevelCentroids:
    """Coarse k-means into ``buckets`` (default :func:`default_buckets`) cells on the fit subset, then a fine
    k-means in each cell with centroids in proportion to the cell's share of the subset (at least one); in all
    about ``k`` fine centroids. Bucket ``b`` is fitted with seed ``seed * 1009 + b + 1``."""
    n = len(x_subset)
    if n == 0:
        raise ValueError("cannot fit k-means on zero embeddings")
    k = max(1, min(int(k), n))
    n_buckets = max(1, min(int(buckets or default_buckets(k)), k))
    coarse = fit_centroids(x_subset, n_buckets, seed, niter, kmeans)
    cell, _ = assign(x_subset, coarse)
    fine, offsets = [], [0]
    for b in range(len(coarse)):
        members = x_subset[cell == b]
        if len(members) == 0:
            part = coarse[b:b + 1]
        else:
            kb = max(1, int(round(len(members) * k / n)))
            part = fit_centroids(members, kb, seed * 1009 + b + 1, niter, kmeans)
        fine.append(part)
        offsets.append(offsets[-1] + len(part))
    return TwoLevelCentroids(np.ascontiguousarray(coarse, np.float32), np.ascontiguousarray(np.concatenate(fine), np.float32),
                             np.asarray(offsets, np.int64))


def assign_two_level(x: np.ndarray, centroids: TwoLevelCentroids) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(bucket int32, cluster int32, similarity to the fine centroid float32)`` of every row: the nearest
    coarse centroid, then the nearest fine centroid of that bucket."""
    bucket, _ = assign(x, centroids.coarse)
    cluster = np.empty(len(x), np.int32)
    sims = np.empty(len(x), np.float32)
    order = np.argsort(bucket, kind="stable")
    bounds = np.searchsorted(bucket[order], np.arange(centroids.buckets + 1))
    for b in range(centroids.buckets):
        rows = order[bounds[b]:bounds[b + 1]]
        if len(rows) == 0:
            continue
        lo, hi = int(centroids.offsets[b]), int(centroids.offsets[b + 1])
        labels, sim = assign(x[rows], centroids.fine[lo:hi])
        cluster[rows] = labels + lo
        sims[rows] = sim
    return bucket, cluster, sims


# --------------------------------------------------------------------------------------------- pair search


@dataclass
class PairSearchStats:
    clusters: int = 0
    largest_cluster: int = 0
    dot_products: int = 0
    seconds: float = 0.0

    def merge(self, other: "PairSearchStats") -> None:
        """Add the counters of a search done elsewhere (another bucket's task)."""
        self.clusters += other.clusters
        self.largest_cluster = max(self.largest_cluster, other.largest_cluster)
        self.dot_products += other.dot_products
        self.seconds += other.seconds


def _cluster_pairs(x: np.ndarray, idx: np.ndarray, thr: np.float32, row_block: int, col_block: int,
                   ) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray], int]:
    """Pairs inside one cluster (``idx``: its rows, ascending), covering the upper triangle block by block."""
    m = len(idx)
    out_a, out_b, out_s = [], [], []
    products = 0
    for i in range(0, m, row_block):
        rows = idx[i:i + row_block]
        a_block = x[rows]
        for j in range(i, m, col_block):
            cols = idx[j:j + col_block]
            b_block = a_block if (j == i and len(cols) == len(rows)) else x[cols]
            sims = a_block @ b_block.T
            products += sims.size
            r, c = np.nonzero(sims >= thr)
            if len(r):
                keep = (j + c) > (i + r)  # strict upper triangle of the cluster
                r, c = r[keep], c[keep]
            if len(r):
                out_a.append(rows[r])
                out_b.append(cols[c])
                out_s.append(sims[r, c])
    return out_a, out_b, out_s, products


def within_cluster_pairs(
    x: np.ndarray,
    labels: np.ndarray,
    threshold: float,
    row_block: int = 1024,
    col_block: int = 8192,
    max_pairs: int | None = None,
    stats: PairSearchStats | None = None,
    workers: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All pairs ``(a, b, cosine)`` with ``a < b``, same label and cosine >= threshold.

    Each cluster's upper triangle is covered by ``row_block x col_block`` matrix products of gathered rows, so
    memory stays at ``row_block * col_block`` similarities whatever the cluster size (never ``m x m``).
    Small clusters (one row block) run in a thread pool with single-threaded BLAS, where multi-threaded BLAS on
    tiny products is several times slower; large clusters use the threaded BLAS one at a time.
    """
    import os
    from concurrent.futures import ThreadPoolExecutor

    from threadpoolctl import threadpool_limits

    t0 = time.perf_counter()
    labels = np.asarray(labels)
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    starts = np.flatnonzero(np.r_[True, sorted_labels[1:] != sorted_labels[:-1]]) if len(order) else np.zeros(0, int)
    ends = np.r_[starts[1:], len(order)].astype(int)
    sizes = ends - starts
    thr = np.float32(threshold)
    results: list[tuple[list, list, list, int]] = []

    def run(batch: list[tuple[int, int]]):
        return [_cluster_pairs(x, order[lo:hi], thr, row_block, col_block) for lo, hi in batch]

    small = [(lo, hi) for lo, hi, m in zip(starts.tolist(), ends.tolist(), sizes.tolist()) if 2 <= m <= row_block]
    large = [(lo, hi) for lo, hi, m in zip(starts.tolist(), ends.tolist(), sizes.tolist()) if m > row_block]
    workers = workers or os.cpu_count() or 1
    if small:
        batches, batch, rows_in_batch = [], [], 0
        for lo, hi in small:
            batch.append((lo, hi))
            rows_in_batch += hi - lo
            if rows_in_batch >= 8 * row_block:
                batches.append(batch)
                batch, rows_in_batch = [], 0
        if batch:
            batches.append(batch)
        with threadpool_limits(1, user_api="blas"), ThreadPoolExecutor(workers) as pool:
            for part in pool.map(run, batches):
                results.extend(part)
    results.extend(run(large))

    out_a = [arr for res in results for arr in res[0]]
    out_b = [arr for res in results for arr in res[1]]
    out_s = [arr for res in results for arr in res[2]]
    total = sum(len(arr) for arr in out_a)
    if max_pairs is not None and total > max_pairs:
        raise RuntimeError(f"{total} pairs at cosine >= {threshold} (limit {max_pairs}): the threshold is too low "
                           "for these embeddings (raise dedup.threshold or search.max_pairs)")
    if stats is not None:
        stats.clusters += len(starts)
        stats.largest_cluster = max(stats.largest_cluster, int(sizes.max()) if len(sizes) else 0)
        stats.dot_products += sum(res[3] for res in results)
        stats.seconds += time.perf_counter() - t0
    if not out_a:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    a = np.concatenate(out_a).astype(np.int64)
    b = np.concatenate(out_b).astype(np.int64)
    s = np.concatenate(out_s).astype(np.float32)
    order_ab = np.lexsort((b, a))
    return a[order_ab], b[order_ab], s[order_ab]


def bucket_pairs(rows: np.ndarray, x: np.ndarray, clusters: np.ndarray, threshold: float, settings: "DedupSettings",
                 stats: PairSearchStats | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The within-cluster pairs of one bucket of one clustering: ``rows`` are the members' global row numbers
    (ascending), ``x`` their vectors and ``clusters`` their cluster ids. Returns ``(a, b, cosine)`` in global
    row numbers, ``a < b``. Since every cluster lies in one bucket, the union over buckets is exactly
    :func:`within_cluster_pairs` on all rows."""
    rows = np.asarray(rows, np.int64)
    if len(rows) > 1 and not np.all(rows[1:] > rows[:-1]):
        order = np.argsort(rows, kind="stable")
        rows, x, clusters = rows[order], x[order], np.asarray(clusters)[order]
    x = np.ascontiguousarray(x, dtype=np.float32)
    a, b, sim = within_cluster_pairs(x, clusters, threshold, settings.row_block, settings.col_block,
                                     settings.max_pairs, stats)
    return rows[a], rows[b], sim


def bucket_pairs_with_new(rows: np.ndarray, x: np.ndarray, clusters: np.ndarray, is_new: np.ndarray, threshold: float,
                          stats: PairSearchStats | None = None, block: int = 1024
                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The within-cluster pairs of a bucket that involve at least one ``is_new`` member: what a bucket that
    only gained rows adds to its earlier pairs. Costs (new members) x (their clusters' sizes) products instead
    of the whole bucket's. Same conventions as :func:`bucket_pairs`."""
    t0 = time.perf_counter()
    rows = np.asarray(rows, np.int64)
    clusters = np.asarray(clusters)
    is_new = np.asarray(is_new, bool)
    x = np.ascontiguousarray(x, dtype=np.float32)
    thr = np.float32(threshold)
    out_a, out_b, out_s, products = [], [], [], 0
    for c in np.unique(clusters[is_new]):
        members = np.flatnonzero(clusters == c)
        fresh = members[is_new[members]]
        for start in range(0, len(fresh), block):
            q = fresh[start:start + block]
            sims = x[q] @ x[members].T
            products += sims.size
            r, k = np.nonzero(sims >= thr)
            qa, mb = q[r], members[k]
            keep = (qa != mb) & (~is_new[mb] | (qa < mb))  # a new-new pair once
            out_a.append(rows[qa[keep]])
            out_b.append(rows[mb[keep]])
            out_s.append(sims[r[keep], k[keep]])
    if stats is not None:
        stats.dot_products += products
        stats.seconds += time.perf_counter() - t0
    if not out_a or sum(len(v) for v in out_a) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    a, b, s = np.concatenate(out_a), np.concatenate(out_b), np.concatenate(out_s).astype(np.float32)
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    order = np.lexsort((hi, lo))
    return lo[order], hi[order], s[order]


def union_pairs(
    found: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], n: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Union of the pairs of several clusterings: ``(a, b, cosine, found_by_mask uint8)``, each pair once,
    sorted by ``(a, b)``. ``found[c]`` holds clustering ``c + 1``'s pairs."""
    keys, sims, masks = [], [], []
    for c, (a, b, s) in enumerate(found):
        keys.append(a.astype(np.int64) * n + b.astype(np.int64))
        sims.append(s.astype(np.float32))
        masks.append(np.full(len(a), 1 << c, dtype=np.uint8))
    if not keys or sum(len(k) for k in keys) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.uint8)
    key = np.concatenate(keys)
    sim = np.concatenate(sims)
    mask = np.concatenate(masks)
    order = np.argsort(key, kind="stable")
    key, sim, mask = key[order], sim[order], mask[order]
    first = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    merged = np.bitwise_or.reduceat(mask, first)
    ukey = key[first]
    return ukey // n, ukey % n, sim[first], merged.astype(np.uint8)


@dataclass
class ClusteredPairs:
    """The pairs found by the within-cluster search of every clustering, unioned (see :func:`union_pairs`)."""

    a: np.ndarray
    b: np.ndarray
    similarity: np.ndarray
    mask: np.ndarray
    per_clustering: list[int]
    stats: PairSearchStats


def search_clusterings(x: np.ndarray, labels: np.ndarray, threshold: float, settings: "DedupSettings",
                       log: Callable[[str], None] | None = None) -> ClusteredPairs:
    """Stage 1 of ``duplicate_pairs``: every pair with cosine >= ``threshold`` inside a cluster of any
    clustering (``labels``: n x clusterings), unioned. The asset and the benchmarks both call this."""
    found, counts, stats = [], [], PairSearchStats()
    for c in range(labels.shape[1]):
        pairs = within_cluster_pairs(x, labels[:, c], threshold, settings.row_block, settings.col_block,
                                     settings.max_pairs, stats)
        found.append(pairs)
        counts.append(len(pairs[0]))
        if log:
            log(f"clustering {c + 1}: {len(pairs[0])} pairs at cosine >= {threshold}")
    a, b, sim, mask = union_pairs(found, len(x))
    return ClusteredPairs(a, b, sim, mask, counts, stats)


def mask_to_list(mask: np.ndarray, n_clusterings: int) -> list[list[int]]:
    """Bit masks as lists of clustering numbers (1-based)."""
    bits = [(c + 1, 1 << c) for c in range(n_clusterings)]
    return [[c for c, bit in bits if m & bit] for m in mask.tolist()]


# --------------------------------------------------------------------------------------------- groups


def connected_components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Component label of each of ``n`` nodes in the undirected graph with edges ``(a[i], b[i])``."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components as cc

    if n == 0:
        return np.zeros(0, np.int64)
    graph = coo_matrix((np.ones(len(a), dtype=np.int8), (a, b)), shape=(n, n)).tocsr()
    _, labels = cc(graph, directed=False)
    return labels.astype(np.int64)


def choose_representatives(members, order: Sequence[str]):
    """One representative per group by a deterministic policy.

    ``members``: a polars DataFrame with ``uid``, ``group_id`` and, as the policy needs them, ``width``,
    ``height`` (resolution = width * height) and ``safety_score`` (nulls sort last; when the column is absent
    the key is skipped). ``order`` is a list of :data:`POLICY_KEYS`; ``uid`` (ascending) always breaks ties.
    Returns ``members`` plus ``is_representative`` (bool) and ``representative_uid``.
    """
    import polars as pl

    by: list[pl.Expr] = []
    descending: list[bool] = []
    for key in order:
        if key in ("highest_resolution", "lowest_resolution"):
            if "width" in members.columns and "height" in members.columns:
                by.append((pl.col("width").cast(pl.Int64) * pl.col("height").cast(pl.Int64)))
                descending.append(key == "highest_resolution")
        elif key in ("lowest_safety_score", "highest_safety_score"):
            if "safety_score" in members.columns:
                by.append(pl.col("safety_score"))
                descending.append(key == "highest_safety_score")
        elif key == "uid":
            pass
        else:
            raise ValueError(f"unknown representative policy key {key!r}; choose from {list(POLICY_KEYS)}")
    by.append(pl.col("uid"))
    descending.append(False)
    ranked = members.sort(by=[pl.col("group_id"), *by], descending=[False, *descending], nulls_last=True)
    ranked = ranked.with_columns(
        (pl.int_range(pl.len()).over("group_id") == 0).alias("is_representative"),
        pl.col("uid").first().over("group_id").alias("representative_uid"),
    )
    return ranked.sort("uid")


# --------------------------------------------------------------------------------------------- exact search / recall


def sample_queries(n: int, size: int, seed: int) -> np.ndarray:
    """Sorted row indices of the recall sample (all rows when ``size >= n``)."""
    if size >= n:
        return np.arange(n, dtype=np.int64)
    return np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False)).astype(np.int64)


def exact_pairs(x: np.ndarray, queries: np.ndarray, threshold: float, block: int = 4096,
                index: Any = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Brute force (faiss exact range search of the query rows against all rows; through ``index`` when given,
    e.g. a GPU flat index, else directly on ``x`` without copying it): every pair with cosine >= threshold
    that involves at least one query row, as ``(a, b, cosine)`` with ``a < b``, each pair once.

    Sampling query rows uniformly samples pairs uniformly (a pair is included when either end is sampled),
    so the recall of the clustered search over these pairs estimates its recall over all pairs."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    out_a, out_b, out_s = [], [], []
    for start in range(0, len(queries), block):
        q = queries[start:start + block]
        xq = np.ascontiguousarray(x[q])
        if index is not None:
            lims, dist, ids = index.range_search(xq, float(threshold))
        else:
            lims, dist, ids = _range_search_ip(xq, x, float(threshold))
        counts = np.diff(lims)
        src = np.repeat(q, counts.astype(np.int64))
        keep = ids != src
        out_a.append(src[keep])
        out_b.append(ids[keep].astype(np.int64))
        out_s.append(dist[keep].astype(np.float32))
    if not out_a:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    a, b, s = np.concatenate(out_a), np.concatenate(out_b), np.concatenate(out_s)
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    key = lo * len(x) + hi
    _, first = np.unique(key, return_index=True)
    return lo[first], hi[first], s[first]


def exact_pairs_streamed(xq: np.ndarray, queries: np.ndarray, blocks: Iterable[tuple[int, np.ndarray]],
                         threshold: float, n: int, block: int = 4096, range_search: Any = None
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`exact_pairs` with the database streamed: ``xq`` holds the query rows' vectors (rows ``queries``)
    and ``blocks`` yields ``(first row, vectors)`` of consecutive row ranges covering all ``n`` rows, so only
    the queries and one block are in memory. The same pairs as :func:`exact_pairs` on the whole matrix.
    ``range_search(xq, xb, threshold)``: another exact search (e.g. a GPU flat index per block)."""
    search = range_search or _range_search_ip
    xq = np.ascontiguousarray(xq, dtype=np.float32)
    out_a, out_b, out_s = [], [], []
    for offset, xb in blocks:
        xb = np.ascontiguousarray(xb, dtype=np.float32)
        for start in range(0, len(queries), block):
            q = queries[start:start + block]
            lims, dist, ids = search(xq[start:start + block], xb, float(threshold))
            src = np.repeat(q, np.diff(lims).astype(np.int64))
            ids = ids.astype(np.int64) + offset
            keep = ids != src
            out_a.append(src[keep])
            out_b.append(ids[keep])
            out_s.append(dist[keep].astype(np.float32))
    if not out_a or sum(len(a) for a in out_a) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    a, b, s = np.concatenate(out_a), np.concatenate(out_b), np.concatenate(out_s)
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    _, first = np.unique(lo * n + hi, return_index=True)
    return lo[first], hi[first], s[first]


def _range_search_ip(xq: np.ndarray, xb: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """faiss exact inner-product range search straight on ``xb`` (no index, so no copy of the database)."""
    import faiss

    res = faiss.RangeSearchResult(len(xq))
    faiss.range_search_inner_product(faiss.swig_ptr(xq), faiss.swig_ptr(xb), xb.shape[1], len(xq), len(xb),
                                     threshold, res)
    lims = faiss.rev_swig_ptr(res.lims, len(xq) + 1).copy()
    total = int(lims[-1])
    dist = faiss.rev_swig_ptr(res.distances, total).copy() if total else np.zeros(0, np.float32)
    ids = faiss.rev_swig_ptr(res.labels, total).copy() if total else np.zeros(0, np.int64)
    return lims, dist, ids


@dataclass
class RecallRow:
    clusterings: int
    true_pairs: int
    found: int
    recall: float
    recall_low: float
    recall_high: float
    recall_mean_over_subsets: float


def recall_curve(true_a: np.ndarray, true_b: np.ndarray, found_a: np.ndarray, found_b: np.ndarray,
                 found_mask: np.ndarray, n: int, n_clusterings: int) -> list[RecallRow]:
    """Fraction of the true pairs found using clusterings ``1..c`` for ``c = 1..n_clusterings`` (Wilson 95%
    interval), plus the mean over every subset of ``c`` clusterings (independent of their numbering)."""
    from curation_assets.core.stats import wilson_interval

    true_key = true_a.astype(np.int64) * n + true_b.astype(np.int64)
    found_key = found_a.astype(np.int64) * n + found_b.astype(np.int64)
    order = np.argsort(found_key)
    found_key, found_mask = found_key[order], found_mask[order]
    pos = np.searchsorted(found_key, true_key)
    pos = np.minimum(pos, max(len(found_key) - 1, 0))
    hit = (len(found_key) > 0) & (found_key[pos] == true_key) if len(found_key) else np.zeros(len(true_key), bool)
    mask = np.where(hit, found_mask[pos] if len(found_key) else 0, 0).astype(np.uint16)
    total = len(true_key)
    rows = []
    for c in range(1, n_clusterings + 1):
        found = int(np.count_nonzero(mask & ((1 << c) - 1)))
        subsets = [sum(1 << i for i in combo) for combo in itertools.combinations(range(n_clusterings), c)]
        mean = float(np.mean([np.count_nonzero(mask & s) for s in subsets])) / total if total else float("nan")
        interval = wilson_interval(found, total) if total else None
        rows.append(RecallRow(
            clusterings=c, true_pairs=total, found=found,
            recall=found / total if total else float("nan"),
            recall_low=interval.low if interval else float("nan"),
            recall_high=interval.high if interval else float("nan"),
            recall_mean_over_subsets=mean,
        ))
    return rows


# --------------------------------------------------------------------------------------------- whole stage


@dataclass
class DedupResult:
    threshold: float
    k: int
    centroids: list[TwoLevelCentroids]
    labels: np.ndarray  # n x n_clusterings int32
    pair_a: np.ndarray
    pair_b: np.ndarray
    pair_sim: np.ndarray
    pair_mask: np.ndarray
    component: np.ndarray  # component label per row (singletons have their own)
    seconds: dict[str, float] = field(default_factory=dict)
    per_clustering_pairs: list[int] = field(default_factory=list)
    search_stats: PairSearchStats = field(default_factory=PairSearchStats)


def run_dedup(x: np.ndarray, threshold: float, settings: DedupSettings | None = None, n_clusterings: int = 5,
              kmeans: KMeansFn | None = None, log: Callable[[str], None] | None = None) -> DedupResult:
    """The whole search in memory, through the functions the assets call one step at a time:
    ``kmeans_centroids`` (:func:`default_k`, :func:`clustering_seed`, :func:`fit_subset`,
    :func:`fit_two_level`), ``cluster_assignments`` (:func:`assign_two_level`), ``duplicate_pairs``
    (:func:`search_clusterings`, which equals :func:`bucket_pairs` unioned over buckets) and ``dedup_groups``
    (:func:`connected_components`). Used by the benchmarks and tests."""
    settings = settings or DedupSettings()
    n = len(x)
    k = default_k(n, settings.cluster_size, settings.k_max)
    seconds: dict[str, float] = {"fit": 0.0, "assign": 0.0, "search": 0.0}
    labels = np.empty((n, n_clusterings), dtype=np.int32)
    centroids = []
    for c in range(1, n_clusterings + 1):
        seed = clustering_seed(settings.seed, c)
        t = time.perf_counter()
        subset = fit_subset(n, k, seed, settings.fit_points_per_centroid)
        cents = fit_two_level(x[subset], k, seed, settings.niter, kmeans)
        seconds["fit"] += time.perf_counter() - t
        t = time.perf_counter()
        _, labels[:, c - 1], _ = assign_two_level(x, cents)
        seconds["assign"] += time.perf_counter() - t
        centroids.append(cents)
    t = time.perf_counter()
    found = search_clusterings(x, labels, threshold, settings, log)
    seconds["search"] = time.perf_counter() - t
    t = time.perf_counter()
    component = connected_components(n, found.a, found.b)
    seconds["union_components"] = time.perf_counter() - t
    return DedupResult(threshold=threshold, k=k, centroids=centroids, labels=labels, pair_a=found.a,
                       pair_b=found.b, pair_sim=found.similarity, pair_mask=found.mask, component=component,
                       seconds=seconds, per_clustering_pairs=found.per_clustering, search_stats=found.stats)


def group_frame(uids: Sequence[str], component: np.ndarray):
    """The duplicate groups as a polars frame ``uid, group_id, group_size`` (only components of 2+ rows).
    ``group_id`` is the smallest uid of the group: independent of the representative policy, so changing the
    policy does not rename groups."""
    import polars as pl

    df = pl.DataFrame({"uid": pl.Series("uid", uids, dtype=pl.String), "component": component})
    return (df.with_columns(pl.len().over("component").alias("group_size"),
                            pl.col("uid").min().over("component").alias("group_id"))
              .filter(pl.col("group_size") > 1)
              .select("uid", "group_id", pl.col("group_size").cast(pl.Int32))
              .sort("uid"))
