"""Active learning for the safety classifiers: which unlabelled images to show labellers next.

Three procedures fill each category's batch (shares from config), following the DALL·E 2 pre-training
mitigations:

- ``flagged`` (cuts false positives): a random sample of the unlabelled images the current model flags at
  its high-recall threshold, so labellers mostly confirm or reject what the filter would remove.
- ``missed_neighbors`` (cuts false negatives): labelled positives that cross-validated models misclassify
  (out-of-fold score below ``missed_below``) are used as queries; their nearest neighbours in the unlabelled
  pool (exact inner-product search, faiss) are likely positives the model misses too.
- ``uncertain``: unlabelled images whose score lies closest to the threshold (in logit space).

The batch is de-duplicated: an image enters once, and a candidate whose cosine similarity to an image already
in the batch exceeds ``near_duplicate_cosine`` is skipped. The pool is streamed block by block (a shard at a
time) and only a bounded number of candidates per procedure is kept, so memory does not grow with the corpus.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

Knn = Callable[[np.ndarray, np.ndarray, int], tuple[np.ndarray, np.ndarray]]


def faiss_knn(xb: np.ndarray, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product k-NN with faiss (similarities, indices into ``xb``; -1 where fewer exist)."""
    import faiss

    xb = np.ascontiguousarray(xb, dtype=np.float32)
    return faiss.knn(np.ascontiguousarray(xq, dtype=np.float32), xb, min(k, len(xb)),
                     metric=faiss.METRIC_INNER_PRODUCT)  # brute force without copying xb into an index


def missed_positives(oof_scores: np.ndarray, labels: np.ndarray, missed_below: float, max_n: int) -> np.ndarray:
    """Indices of labelled positives whose held-out score is below ``missed_below``, most-missed first."""
    oof = np.asarray(oof_scores, dtype=np.float64)
    pos = np.flatnonzero(np.asarray(labels) == 1)
    missed = pos[oof[pos] < missed_below]
    return missed[np.argsort(oof[missed], kind="stable")][:max_n]


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-7, 1 - 1e-7)
    return np.log(p) - np.log1p(-p)


@dataclass
class QueueItem:
    uid: str
    procedure: str
    score: float
    why: str


class _Kept:
    """At most ``capacity`` candidates, the ones with the smallest ``key``."""

    def __init__(self, capacity: int, dim: int):
        self.capacity = capacity
        self.uids = np.empty(0, dtype=object)
        self.keys = np.empty(0)
        self.scores = np.empty(0)
        self.vecs = np.empty((0, dim), dtype=np.float32)

    def offer(self, uids: np.ndarray, keys: np.ndarray, scores: np.ndarray, vecs: np.ndarray) -> None:
        if self.capacity <= 0 or len(uids) == 0:
            return
        if len(keys) > self.capacity:  # only the block's best can make the cut: copy those, not the block
            best = np.argpartition(keys, self.capacity - 1)[: self.capacity]
            uids, keys, scores, vecs = uids[best], keys[best], scores[best], vecs[best]
        self.uids = np.concatenate([self.uids, uids])
        self.keys = np.concatenate([self.keys, keys])
        self.scores = np.concatenate([self.scores, scores])
        self.vecs = np.concatenate([self.vecs, vecs])
        if len(self.uids) > self.capacity:
            keep = np.argpartition(self.keys, self.capacity - 1)[: self.capacity]
            self.uids, self.keys, self.scores, self.vecs = (self.uids[keep], self.keys[keep], self.scores[keep],
                                                            self.vecs[keep])

    def ordered(self) -> np.ndarray:
        return np.argsort(self.keys, kind="stable")


class QueueBuilder:
    """Streams the unlabelled pool of one category and selects its labelling batch.

    ``threshold`` is the model's high-recall threshold; ``queries`` are the embeddings of the missed labelled
    positives (``query_uids``/``query_scores`` name them and their held-out scores in the reasons).
    """

    def __init__(self, threshold: float, quotas: dict[str, int], dim: int, queries: np.ndarray | None = None,
                 query_uids: Sequence[str] = (), query_scores: Sequence[float] = (), neighbors: int = 5,
                 oversample: int = 5, seed: int = 0, knn: Knn = faiss_knn):
        self.threshold = float(threshold)
        self.quotas = {p: int(quotas.get(p, 0)) for p in ("flagged", "missed_neighbors", "uncertain")}
        self.rng = np.random.default_rng(seed)
        self.knn = knn
        self.flagged = _Kept(max(1, self.quotas["flagged"]) * oversample, dim)
        self.uncertain = _Kept(max(1, self.quotas["uncertain"]) * oversample, dim)
        self.queries = (np.ascontiguousarray(queries, dtype=np.float32)
                        if queries is not None and len(queries) else np.zeros((0, dim), np.float32))
        self.query_uids = list(query_uids)
        self.query_scores = list(query_scores)
        self.k = neighbors
        nq = len(self.queries)
        self.nn_sim = np.full((nq, 0), -np.inf, dtype=np.float32)
        self.nn_uid = np.empty((nq, 0), dtype=object)
        self.nn_score = np.empty((nq, 0))
        self.nn_vec = np.empty((nq, 0, dim), dtype=np.float32)
        self.seen = 0

    def add(self, uids: Sequence[str], X: np.ndarray, scores: np.ndarray) -> None:
        """Offer a block of the unlabelled pool (uids, L2-normalised embeddings, calibrated scores)."""
        if len(uids) == 0:
            return
        uids = np.asarray(uids, dtype=object)
        X = np.ascontiguousarray(X, dtype=np.float32)
        scores = np.asarray(scores, dtype=np.float64)
        self.seen += len(uids)
        flagged = scores >= self.threshold
        if flagged.any():
            self.flagged.offer(uids[flagged], self.rng.random(int(flagged.sum())), scores[flagged], X[flagged])
        distance = np.abs(_logit(scores) - _logit(np.array([self.threshold]))[0])
        self.uncertain.offer(uids, distance, scores, X)
        if len(self.queries) and self.k > 0:
            sim, idx = self.knn(X, self.queries, self.k)
            valid = idx >= 0
            sim = np.where(valid, sim, -np.inf).astype(np.float32)
            idx = np.where(valid, idx, 0)
            self.nn_sim = np.concatenate([self.nn_sim, sim], axis=1)
            self.nn_uid = np.concatenate([self.nn_uid, uids[idx]], axis=1)
            self.nn_score = np.concatenate([self.nn_score, scores[idx]], axis=1)
            self.nn_vec = np.concatenate([self.nn_vec, X[idx]], axis=1)
            order = np.argsort(-self.nn_sim, axis=1, kind="stable")[:, : self.k]
            rows = np.arange(len(self.queries))[:, None]
            self.nn_sim, self.nn_uid = self.nn_sim[rows, order], self.nn_uid[rows, order]
            self.nn_score, self.nn_vec = self.nn_score[rows, order], self.nn_vec[rows, order]

    def _candidates(self, procedure: str):
        """(uid, score, vector, why) in preference order for one procedure."""
        t = self.threshold
        if procedure == "flagged":
            kept = self.flagged
            for i in kept.ordered():
                yield (kept.uids[i], kept.scores[i], kept.vecs[i],
                       f"flagged: score {kept.scores[i]:.3f} >= high-recall threshold {t:.3f}")
        elif procedure == "uncertain":
            kept = self.uncertain
            for i in kept.ordered():
                yield (kept.uids[i], kept.scores[i], kept.vecs[i],
                       f"uncertain: score {kept.scores[i]:.3f} close to threshold {t:.3f}")
        else:  # round robin: the first neighbour of every missed positive, then the second, ...
            for rank in range(self.nn_sim.shape[1]):
                for q in range(len(self.queries)):
                    if not np.isfinite(self.nn_sim[q, rank]):
                        continue
                    yield (self.nn_uid[q, rank], self.nn_score[q, rank], self.nn_vec[q, rank],
                           f"missed_neighbors: neighbour #{rank + 1} (cosine {self.nn_sim[q, rank]:.3f}) of labelled "
                           f"positive {self.query_uids[q]} that cross-validation scored "
                           f"{self.query_scores[q]:.3f}")

    def select(self, batch_size: int, near_duplicate_cosine: float = 0.95) -> list[QueueItem]:
        """The batch: each procedure up to its quota, then shortfalls filled from the others; no image twice
        and no two images with cosine above ``near_duplicate_cosine``."""
        chosen: list[QueueItem] = []
        chosen_uids: set[str] = set()
        chosen_vecs: list[np.ndarray] = []
        iterators = {p: self._candidates(p) for p in ("missed_neighbors", "flagged", "uncertain")}

        def take(procedure: str, limit: int) -> int:
            taken = 0
            while taken < limit and len(chosen) < batch_size:
                candidate = next(iterators[procedure], None)
                if candidate is None:
                    break
                uid, score, vec, why = candidate
                if uid in chosen_uids:
                    continue
                if chosen_vecs and float(np.max(np.stack(chosen_vecs) @ vec)) > near_duplicate_cosine:
                    continue
                chosen.append(QueueItem(str(uid), procedure, float(score), why))
                chosen_uids.add(uid)
                chosen_vecs.append(vec)
                taken += 1
            return taken

        for procedure in ("missed_neighbors", "flagged", "uncertain"):
            take(procedure, self.quotas[procedure])
        for procedure in ("uncertain", "flagged", "missed_neighbors"):
            if len(chosen) < batch_size and self.quotas[procedure] > 0:
                take(procedure, batch_size - len(chosen))
        return chosen


def diverse_sample(x: np.ndarray, n: int, seed: int, niter: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """A first labelling batch chosen without any model: ``n`` rows spread over the data.

    Spherical k-means with ``n`` centroids partitions ``x`` into regions whose sizes follow the data's density,
    and the row nearest each centroid represents its region, so the batch covers common and rare kinds of
    image alike (a stratified, diverse sample). Returns (row indices into ``x``, size of each row's region),
    largest regions first. ``x`` should already be a bounded random sample of the corpus."""
    from curation_assets.core.dedup import assign, fit_centroids

    if len(x) == 0 or n <= 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if n >= len(x):
        return np.arange(len(x), dtype=np.int64), np.ones(len(x), np.int64)
    centroids = fit_centroids(x, n, seed, niter)
    labels, sims = assign(x, centroids)
    rows, sizes = [], []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        rows.append(int(members[np.argmax(sims[members])]))
        sizes.append(len(members))
    order = np.argsort(-np.asarray(sizes), kind="stable")
    return np.asarray(rows, np.int64)[order], np.asarray(sizes, np.int64)[order]
