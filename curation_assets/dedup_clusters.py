"""The clustering half of dedup: k-means centroids per clustering and each shard's cluster assignments.

- ``kmeans_centroids`` (partitioned by clustering "1".."5"): spherical k-means centroids fitted on a random
  subset of the embeddings drawn with the clustering's seed; one ``.npy`` file per fit under
  ``<root>/artifacts/kmeans_centroids`` (named by its content hash, never overwritten) plus a small Delta table
  describing each fit, written last, with paths relative to the data root (a copied root reads its own files).
- ``cluster_assignments`` (per shard): each embedding's nearest centroid in every clustering, so a new shard
  is assigned without refitting.

When to refit the centroids: assignments of new shards use the existing centroids, which is right while new
data looks like the data the centroids were fitted on. Refit (re-materialise ``kmeans_centroids``, then all
``cluster_assignments``) when the encoder changes (required: ``duplicate_pairs`` refuses mixed or stale
assignments), when the dataset has grown several-fold since the fit (K follows n up to 1024), or when
``dedup_recall`` drops or the mean centroid similarity in ``cluster_assignments`` falls for new shards
(their content has drifted away from the fitted clusters).
"""

import hashlib
import os
import time
from datetime import datetime, timezone

import dagster as dg
import numpy as np
import polars as pl

from curation_assets.core import dedup as core
from curation_assets.partitions import (N_CLUSTERINGS, clustering_partitions, partition_keys, partitioned_asset,
                                        shard_asset)
from resources.settings import CurationSettings
from resources.storage import DeltaStorage
from resources.vector_search import VectorSearch


GROUP = "dedup"


CENTROIDS = "kmeans_centroids"


ALL_CLUSTERINGS = [str(c) for c in range(1, N_CLUSTERINGS + 1)]


def dedup_settings(settings: CurationSettings) -> core.DedupSettings:
    try:
        return core.DedupSettings.from_section(settings.section("dedup"))
    except ValueError as exc:
        raise dg.Failure(str(exc)) from exc


def _embedding_index(storage: DeltaStorage) -> pl.DataFrame:
    """uid, shard, encoder of every embedding, in the row order :func:`load_matrix` uses."""
    ids = storage.scan("image_embeddings").select("uid", "shard", "encoder").collect()
    return ids.sort(["shard", "uid"])


def load_matrix(storage: DeltaStorage, shards: list[str] | None = None) -> tuple[pl.DataFrame, np.ndarray]:
    """All embeddings as one float32 matrix, filled shard by shard into a preallocated array so the peak
    stays near one matrix plus one shard (not the several copies a single collect + explode makes)."""
    counts = (storage.scan("image_embeddings").group_by("shard").agg(pl.len().alias("n")).collect().sort("shard"))
    if shards is not None:
        counts = counts.filter(pl.col("shard").is_in(shards))
    total = int(counts["n"].sum()) if counts.height else 0
    x: np.ndarray | None = None
    frames, row = [], 0
    for shard in counts["shard"].to_list():
        ids, xs = storage.load_embeddings([shard])
        if x is None:
            x = np.empty((total, xs.shape[1]), dtype=np.float32)
        x[row:row + len(xs)] = xs
        row += len(xs)
        frames.append(ids)
        del xs
    ids = pl.concat(frames) if frames else pl.DataFrame(schema={"uid": pl.String, "shard": pl.String, "encoder": pl.String})
    return ids, (x if x is not None else np.zeros((0, 0), np.float32))


def encoder_name(ids: pl.DataFrame) -> str:
    encoders = ids["encoder"].unique().to_list()
    if len(encoders) != 1:
        raise dg.Failure(f"image_embeddings mixes encoders {encoders}: re-embed every shard with one encoder")
    return encoders[0]


def _save_centroids(storage: DeltaStorage, clustering: str, centroids: np.ndarray, version: str) -> str:
    """Write a fit under a name of its own (``clustering_<c>_<version>.npy``; write a temporary file, then
    rename) and return its path relative to the data root. Files are never overwritten in place, so a crash
    between fits leaves the table pointing at complete files of the previous fit."""
    directory = storage.artifact_dir(CENTROIDS)
    final = directory / f"clustering_{clustering}_{version}.npy"
    tmp = directory / f".{final.name}.{os.getpid()}.tmp"
    with open(tmp, "wb") as handle:
        np.save(handle, centroids)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, final)
    return final.relative_to(storage.root_path).as_posix()


def _load_centroids(storage: DeltaStorage, row: dict) -> np.ndarray:
    """The centroids a ``kmeans_centroids`` row names, checked against the row (shape and content hash)."""
    path = storage.root_path / row["path"]
    if not path.is_file():
        raise dg.Failure(f"kmeans_centroids row of clustering {row['clustering']} names {row['path']}, which is "
                         "missing: re-materialise kmeans_centroids")
    centroids = np.load(path)
    if centroids.shape != (row["k"], row["dim"]) or _centroid_version(centroids) != row["version"]:
        raise dg.Failure(f"{row['path']} does not hold the centroids its kmeans_centroids row describes "
                         f"(shape {centroids.shape}, expected ({row['k']}, {row['dim']})): re-materialise kmeans_centroids")
    return centroids


def _centroid_version(centroids: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(centroids).tobytes()).hexdigest()[:16]


def _write_centroid_rows(storage: DeltaStorage, df: pl.DataFrame) -> None:
    """Replace the rows of the given clusterings in the small ``kmeans_centroids`` table."""
    storage.replace_in(CENTROIDS, df, "clustering", df["clustering"].to_list())


@partitioned_asset(
    clustering_partitions, dg.BackfillPolicy.single_run(),
    group_name=GROUP,
    deps=[dg.AssetDep("image_embeddings", partition_mapping=dg.AllPartitionMapping())],
    kinds={"faiss", "numpy"},
)
def kmeans_centroids(context: dg.AssetExecutionContext, storage: DeltaStorage, settings: CurationSettings,
                     vector_search: VectorSearch) -> dg.MaterializeResult:
    """Spherical k-means centroids of one clustering ("1".."5"), fitted on a random subset of the embeddings
    drawn with seed ``kmeans.seed + clustering``. K = min(k_max, max(1, n // min_points_per_centroid));
    the subset holds min(n, K * fit_points_per_centroid) embeddings. Faiss k-means runs on the GPU when one is
    visible (vector_search resource), on the CPU otherwise."""
    cfg = dedup_settings(settings)
    index = _embedding_index(storage)
    n = index.height
    if n == 0:
        raise dg.Failure("image_embeddings is empty: materialise it first")
    encoder = encoder_name(index)
    k = core.default_k(n, cfg.k_max, cfg.min_points_per_centroid)
    rows, meta = [], {}
    keys = partition_keys(context) or ALL_CLUSTERINGS
    seeds = {key: core.clustering_seed(cfg.seed, int(key)) for key in keys}
    subsets = {key: core.fit_subset(n, k, seeds[key], cfg.fit_points_per_centroid) for key in keys}
    fit_rows = _fit_rows(storage, index, subsets)  # every shard is read once for all clusterings of this step
    for key in keys:
        started = time.perf_counter()
        seed = seeds[key]
        x_fit = fit_rows[key]
        centroids = core.fit_centroids(x_fit, k, seed, cfg.niter, kmeans=vector_search.kmeans)
        version = _centroid_version(centroids)
        path = _save_centroids(storage, key, centroids, version)
        seconds = time.perf_counter() - started
        rows.append({"clustering": key, "k": len(centroids), "dim": centroids.shape[1], "n_embeddings": n,
                     "n_fit": len(x_fit), "seed": seed, "niter": cfg.niter, "encoder": encoder, "version": version,
                     "path": path, "fit_seconds": seconds, "fitted_at": datetime.now(timezone.utc).isoformat()})
        context.log.info(f"clustering {key}: K={len(centroids)} fitted on {len(x_fit)} of {n} in {seconds:.1f}s")
        meta[f"version_{key}"] = version
    _write_centroid_rows(storage, pl.DataFrame(rows))
    return dg.MaterializeResult(metadata={
        **storage.table_metadata("kmeans_centroids", "dedup-recall"),
        "n_embeddings": n, "k": k, "encoder": encoder,
        "k_rule": f"min({cfg.k_max}, max(1, n // {cfg.min_points_per_centroid}))",
        "n_fit": rows[0]["n_fit"], "fit_seconds": dg.MetadataValue.float(sum(r["fit_seconds"] for r in rows)),
        "centroids_dir": dg.MetadataValue.path(str(storage.artifact_dir(CENTROIDS))), **meta,
    })


def _fit_rows(storage: DeltaStorage, index: pl.DataFrame, subsets: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The embeddings of each clustering's fit subset (row numbers into ``index``), reading each shard once."""
    wanted = pl.concat([
        index[rows.tolist()].select("uid", "shard").with_columns(pl.lit(key).alias("clustering"))
        for key, rows in subsets.items()
    ])
    parts: dict[str, list[np.ndarray]] = {key: [] for key in subsets}
    for shard in wanted["shard"].unique().sort().to_list():
        ids, xs = storage.load_embeddings([shard])
        in_shard = wanted.filter(pl.col("shard") == shard)
        for key in subsets:
            uids = in_shard.filter(pl.col("clustering") == key)["uid"]
            if len(uids):
                parts[key].append(xs[ids["uid"].is_in(uids.implode()).to_numpy()])
        del xs
    return {key: np.concatenate(p) for key, p in parts.items()}


def current_centroids(storage: DeltaStorage) -> pl.DataFrame:
    if not storage.exists(CENTROIDS):
        raise dg.Failure("kmeans_centroids has not been materialised")
    table = storage.read(CENTROIDS).sort("clustering")
    missing = sorted(set(ALL_CLUSTERINGS) - set(table["clustering"].to_list()))
    if missing:
        raise dg.Failure(f"kmeans_centroids lacks clusterings {missing}: materialise all of its partitions")
    return table


@shard_asset(
    group_name=GROUP,
    deps=["image_embeddings", dg.AssetDep(CENTROIDS, partition_mapping=dg.AllPartitionMapping())],
    kinds={"numpy", "deltalake"},
)
def cluster_assignments(context: dg.AssetExecutionContext, storage: DeltaStorage) -> dg.MaterializeResult:
    """Each embedding's nearest centroid in every clustering (long format: uid, shard, clustering, cluster,
    centroid similarity, centroids version). Per shard, so new shards need no refit; ``duplicate_pairs``
    refuses assignments made with centroids that have since been refitted."""
    table = current_centroids(storage)
    centroids = {r["clustering"]: (_load_centroids(storage, r), r["version"]) for r in table.iter_rows(named=True)}
    total, sims = 0, []
    for shard in partition_keys(context):
        ids, x = storage.load_embeddings([shard])
        frames = []
        for key in ALL_CLUSTERINGS:
            cents, version = centroids[key]
            if len(ids) and x.shape[1] != cents.shape[1]:
                raise dg.Failure(f"shard {shard}: embeddings have dimension {x.shape[1]}, centroids {cents.shape[1]}: "
                                 "refit kmeans_centroids on the current embeddings")
            labels, sim = core.assign(x, cents) if len(ids) else (np.zeros(0, np.int32), np.zeros(0, np.float32))
            sims.append(sim)
            frames.append(pl.DataFrame({
                "uid": ids["uid"], "shard": ids["shard"],
                "clustering": pl.Series([key] * len(ids), dtype=pl.String),
                "cluster": pl.Series(labels, dtype=pl.Int32),
                "centroid_similarity": pl.Series(sim, dtype=pl.Float32),
                "centroids_version": pl.Series([version] * len(ids), dtype=pl.String),
            }))
        storage.write_shard("cluster_assignments", pl.concat(frames), shard)
        total += len(ids)
        context.log.info(f"shard {shard}: assigned {len(ids)} embeddings in {N_CLUSTERINGS} clusterings")
    all_sims = np.concatenate(sims) if sims else np.zeros(0)
    return dg.MaterializeResult(metadata={
        **storage.table_metadata("cluster_assignments", "dedup-recall"),
        "embeddings_assigned": total,
        "mean_centroid_similarity": dg.MetadataValue.float(float(all_sims.mean()) if len(all_sims) else 0.0),
    })


def labels_matrix(storage: DeltaStorage, ids: pl.DataFrame, versions: dict[str, str]) -> np.ndarray:
    """n x 5 cluster labels aligned with ``ids``; fails on missing shards or stale centroids."""
    assignments = storage.scan("cluster_assignments").select("uid", "clustering", "cluster", "centroids_version").collect()
    stale = assignments.filter(pl.col("centroids_version") != pl.col("clustering").replace_strict(versions, default=""))
    if stale.height:
        shards = sorted({u.split("/")[0] for u in stale["uid"].head(100000).to_list()})
        raise dg.Failure(f"cluster_assignments of shards {shards[:20]} were made with centroids that have since been "
                         "refitted: re-materialise cluster_assignments for every shard")
    wide = assignments.pivot(on="clustering", index="uid", values="cluster")
    aligned = ids.select("uid").join(wide, on="uid", how="left", maintain_order="left")
    missing = aligned.filter(pl.any_horizontal(pl.col(ALL_CLUSTERINGS).is_null()) if set(ALL_CLUSTERINGS) <= set(aligned.columns)
                             else pl.lit(True))
    if missing.height:
        shards = sorted({u.split("/")[0] for u in missing["uid"].to_list()})
        raise dg.Failure(f"{missing.height} embeddings have no cluster assignment (shards {shards[:20]}): "
                         "materialise cluster_assignments for them")
    return aligned.select(ALL_CLUSTERINGS).to_numpy().astype(np.int32)


defs = dg.Definitions(assets=[kmeans_centroids, cluster_assignments])
