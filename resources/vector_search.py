"""Vector search on embeddings with faiss: GPU when one is visible and the GPU build is installed, CPU otherwise."""

from __future__ import annotations

import dagster as dg
import numpy as np


def _faiss():
    import faiss

    return faiss


def gpu_available() -> bool:
    faiss = _faiss()
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


class VectorSearch(dg.ConfigurableResource):
    """Exact k-NN, range search and spherical k-means over L2-normalised float32 vectors (inner product = cosine).

    ``device``: "auto" (GPU when available), "cpu" or "gpu" (an error without one). ``threads``: faiss OpenMP
    threads on CPU (0 = faiss default).
    """

    device: str = "auto"
    threads: int = 0

    def use_gpu(self) -> bool:
        if self.device == "cpu":
            return False
        available = gpu_available()
        if self.device == "gpu" and not available:
            raise RuntimeError("vector_search.device='gpu' but faiss sees no GPU (install the 'gpu' extra on a CUDA machine)")
        return available

    def _setup(self):
        faiss = _faiss()
        if self.threads:
            faiss.omp_set_num_threads(self.threads)
        return faiss

    def flat_index(self, xb: np.ndarray):
        """An exact inner-product index over ``xb`` (on the GPU when in use)."""
        faiss = self._setup()
        xb = np.ascontiguousarray(xb, dtype=np.float32)
        index = faiss.IndexFlatIP(xb.shape[1])
        if self.use_gpu():
            index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
        index.add(xb)
        return index

    def knn(self, xb: np.ndarray, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact ``k`` nearest neighbours of each query row: (similarities, indices into ``xb``), -1 where fewer exist."""
        if len(xb) == 0:
            return (np.full((len(xq), k), -np.inf, np.float32), np.full((len(xq), k), -1, np.int64))
        index = self.flat_index(xb)
        return index.search(np.ascontiguousarray(xq, dtype=np.float32), min(k, len(xb)))

    def kmeans(self, x: np.ndarray, k: int, seed: int, niter: int = 20) -> np.ndarray:
        """Spherical k-means centroids (k x d, L2-normalised) fitted on ``x``."""
        faiss = self._setup()
        x = np.ascontiguousarray(x, dtype=np.float32)
        from curation_assets.core.dedup import MAX_POINTS_PER_CENTROID

        km = faiss.Kmeans(x.shape[1], int(k), niter=niter, seed=int(seed), spherical=True,
                          gpu=self.use_gpu(), verbose=False, max_points_per_centroid=MAX_POINTS_PER_CENTROID,
                          min_points_per_centroid=1)
        km.train(x)
        return np.ascontiguousarray(km.centroids, dtype=np.float32)
