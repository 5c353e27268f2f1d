"""The clustering half of dedup: two-level k-means centroids per clustering and each shard's assignments.

- ``kmeans_centroids`` (partitioned by clustering "1".."5"): two-level spherical k-means (B coarse buckets,
  then fine clusters inside each; see :mod:`curation_assets.core.dedup`) fitted on a random subset of the
  embeddings drawn with the clustering's seed; one ``.npz`` file per fit under
  ``<root>/artifacts/kmeans_centroids`` (named by its content hash, never overwritten) plus a small Delta table
  describing each fit, written last, with paths relative to the data root (a copied root reads its own files).
- ``cluster_assignments`` (per shard): each embedding's bucket and cluster in every clustering, with its vector,
  in a table partitioned by ``clustering`` and ``bucket``: the map side of the bucketed search, so that
  ``duplicate_pairs`` reads one bucket's members at a time and a new shard is assigned without refitting.

When to refit the centroids: assignments of new shards use the existing centroids, which is right while new
data looks like the data the centroids were fitted on. Refit (re-materialise ``kmeans_centroids``, then all
``cluster_assignments``) when the encoder changes (required: ``duplicate_pairs`` refuses mixed or stale
assignments), when the dataset has grown several-fold since the fit (K follows n: clusters grow with the data
until the refit), or when ``dedup_recall`` drops or the mean centroid similarity in ``cluster_assignments``
falls for new shards (their content has drifted away from the fitted clusters).
"""

import io
import time
from datetime import datetime, timezone

import dagster as dg
import numpy as np
import polars as pl

from curation_assets.core import dedup as core
from curation_assets.core.delta import vectors_to_binary
from curation_assets.core.location import write_atomic
from curation_assets.partitions import (N_CLUSTERINGS, clustering_partitions, partition_keys, partitioned_asset,
                                        shard_asset)
from resources.compute import ComputeResource
from resources.settings import CurationSettings
from resources.storage import DeltaStorage
from resources.vector_search import VectorSearch


GROUP = "dedup"


CENTROIDS = "kmeans_centroids"
ASSIGNMENTS = "cluster_assignments"
ASSIGNMENT_PARTITIONS = ("clustering", "bucket")


ALL_CLUSTERINGS = [str(c) for c in range(1, N_CLUSTERINGS + 1)]


def dedup_settings(settings: CurationSettings) -> core.DedupSettings:
    try:
        return core.DedupSettings.from_section(settings.section("dedup"))
    except ValueError as exc:
        raise dg.Failure(str(exc)) from exc


def _shard_counts(storage: DeltaStorage) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Embeddings per shard (``shard, n``, in shard order: row r of the dataset is row r - offset of its
    shard's embeddings sorted by uid) and the encoders that made them (``encoder``), without reading uids."""
    lf = storage.scan("image_embeddings")
    counts = lf.group_by("shard").agg(pl.len().alias("n")).collect().sort("shard")
    encoders = lf.select(pl.col("encoder").unique()).collect()
    return counts, encoders


def encoder_name(ids: pl.DataFrame) -> str:
    encoders = ids["encoder"].unique().to_list()
    if len(encoders) != 1:
        raise dg.Failure(f"image_embeddings mixes encoders {encoders}: re-embed every shard with one encoder")
    return encoders[0]


def _save_centroids(storage: DeltaStorage, clustering: str, centroids: core.TwoLevelCentroids, version: str) -> str:
    """Write a fit under a name of its own (``clustering_<c>_<version>.npz``; write a temporary file, then
    rename) and return its path relative to the data root. Files are never overwritten in place, so a crash
    between fits leaves the table pointing at complete files of the previous fit."""
    final = storage.artifact_dir(CENTROIDS) / f"clustering_{clustering}_{version}.npz"
    buffer = io.BytesIO()
    centroids.save(buffer)
    write_atomic(final, buffer.getvalue())
    return f"artifacts/{CENTROIDS}/{final.name}"


def _load_centroids(storage: DeltaStorage, row: dict) -> core.TwoLevelCentroids:
    """The centroids a ``kmeans_centroids`` row names, checked against the row (shape and content hash)."""
    path = storage.root_path / row["path"]
    if not path.is_file():
        raise dg.Failure(f"kmeans_centroids row of clustering {row['clustering']} names {row['path']}, which is "
                         "missing: re-materialise kmeans_centroids")
    if path.suffix != ".npz":
        raise dg.Failure(f"{row['path']} holds one-level centroids of an older release: re-materialise "
                         "kmeans_centroids, then every shard of cluster_assignments")
    centroids = core.TwoLevelCentroids.load(io.BytesIO(path.read_bytes()))
    if (centroids.k, centroids.dim) != (row["k"], row["dim"]) or centroids.version() != row["version"]:
        raise dg.Failure(f"{row['path']} does not hold the centroids its kmeans_centroids row describes "
                         f"(shape {(centroids.k, centroids.dim)}, expected ({row['k']}, {row['dim']})): "
                         "re-materialise kmeans_centroids")
    return centroids


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
    """Two-level spherical k-means centroids of one clustering ("1".."5"), fitted on a random subset of the
    embeddings drawn with seed ``kmeans.seed + clustering``: K = ceil(n / cluster_size) fine clusters inside
    B = ceil(sqrt(K)) coarse buckets; the subset holds min(n, K * fit_points_per_centroid) embeddings. Faiss
    k-means runs on the GPU when one is visible (vector_search resource), on the CPU otherwise."""
    cfg = dedup_settings(settings)
    counts, encoders = _shard_counts(storage)
    n = int(counts["n"].sum()) if counts.height else 0
    if n == 0:
        raise dg.Failure("image_embeddings is empty: materialise it first")
    encoder = encoder_name(encoders)
    k = core.default_k(n, cfg.cluster_size, cfg.k_max)
    rows, meta = [], {}
    keys = partition_keys(context) or ALL_CLUSTERINGS
    seeds = {key: core.clustering_seed(cfg.seed, int(key)) for key in keys}
    budget, dim = settings.memory_budget(), storage.embedding_shape()[1]
    cap = core.fit_points_within(budget, dim)
    subsets = {key: core.fit_subset(n, k, seeds[key], cfg.fit_points_per_centroid, max_points=cap) for key in keys}
    passes = _passes(keys, {key: len(v) for key, v in subsets.items()}, cap)
    for group in passes:  # each pass reads every shard once for the clusterings whose subsets fit together
        fit_rows = _fit_rows(storage, counts, {key: subsets[key] for key in group})
        for key in group:
            rows.append(_fit_one(context, storage, vector_search, cfg, key, seeds[key], fit_rows.pop(key), k, n,
                                 encoder))
            meta[f"version_{key}"] = rows[-1]["version"]
    _write_centroid_rows(storage, pl.DataFrame(rows))
    return dg.MaterializeResult(metadata={
        **storage.table_metadata("kmeans_centroids", "dedup-recall"),
        "n_embeddings": n, "k": k, "buckets": rows[0]["buckets"], "encoder": encoder,
        "k_rule": f"ceil(n / {cfg.cluster_size})" + (f", at most {cfg.k_max}" if cfg.k_max else "")
                  + "; buckets = ceil(sqrt(K))",
        "n_fit": rows[0]["n_fit"], "fit_seconds": dg.MetadataValue.float(sum(r["fit_seconds"] for r in rows)),
        "memory_budget_gb": dg.MetadataValue.float(budget / (1 << 30)), "fit_points_cap": cap,
        "fit_passes": len(passes),
        "centroids_dir": dg.MetadataValue.path(str(storage.artifact_dir(CENTROIDS))), **meta,
    })


def _passes(keys: list[str], sizes: dict[str, int], cap: int) -> list[list[str]]:
    """Clusterings grouped so that the fit subsets loaded together hold at most ``cap`` points."""
    passes: list[list[str]] = []
    for key in keys:
        if passes and sum(sizes[k] for k in passes[-1]) + sizes[key] <= cap:
            passes[-1].append(key)
        else:
            passes.append([key])
    return passes


def _fit_one(context, storage: DeltaStorage, vector_search: VectorSearch, cfg: core.DedupSettings, key: str,
             seed: int, x_fit: np.ndarray, k: int, n: int, encoder: str) -> dict:
    started = time.perf_counter()
    centroids = core.fit_two_level(x_fit, k, seed, cfg.niter, kmeans=vector_search.kmeans)
    version = centroids.version()
    path = _save_centroids(storage, key, centroids, version)
    seconds = time.perf_counter() - started
    context.log.info(f"clustering {key}: K={centroids.k} in {centroids.buckets} buckets fitted on {len(x_fit)} "
                     f"of {n} in {seconds:.1f}s")
    return {"clustering": key, "k": centroids.k, "buckets": centroids.buckets, "dim": centroids.dim,
            "n_embeddings": n, "n_fit": len(x_fit), "seed": seed, "niter": cfg.niter, "encoder": encoder,
            "version": version, "path": path, "fit_seconds": seconds,
            "fitted_at": datetime.now(timezone.utc).isoformat()}


def _fit_rows(storage: DeltaStorage, counts: pl.DataFrame, subsets: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The embeddings of each clustering's fit subset (dataset row numbers, see :func:`_shard_counts`),
    reading each shard that holds any of them once."""
    parts: dict[str, list[np.ndarray]] = {key: [] for key in subsets}
    offset = 0
    for shard, size in counts.select("shard", "n").iter_rows():
        local = {key: rows[(rows >= offset) & (rows < offset + size)] - offset for key, rows in subsets.items()}
        offset += size
        if not any(len(v) for v in local.values()):
            continue
        ids, xs = storage.load_embeddings([shard])
        if len(ids) != size:
            raise dg.Failure(f"image_embeddings of shard {shard} changed while kmeans_centroids read it: re-run")
        for key, rows in local.items():
            if len(rows):
                parts[key].append(xs[rows])
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


ASSIGNMENT_SCHEMA = {"uid": pl.String, "shard": pl.String, "clustering": pl.String, "bucket": pl.Int32,
                     "cluster": pl.Int32, "centroid_similarity": pl.Float32, "centroids_version": pl.String,
                     "vector": pl.Binary}


def assignment_frame(ids: pl.DataFrame, x: np.ndarray, clustering: str, centroids: core.TwoLevelCentroids,
                     version: str, vector_dtype: str = "float32") -> pl.DataFrame:
    """One clustering's rows of ``cluster_assignments`` for a block of embeddings (vectors included, packed as
    ``vector_dtype``)."""
    bucket, cluster, sim = core.assign_two_level(x, centroids)
    vectors = vectors_to_binary(x, vector_dtype)
    return pl.DataFrame({
        "uid": ids["uid"], "shard": ids["shard"], "clustering": pl.Series([clustering] * len(ids), dtype=pl.String),
        "bucket": pl.Series(bucket, dtype=pl.Int32), "cluster": pl.Series(cluster, dtype=pl.Int32),
        "centroid_similarity": pl.Series(sim, dtype=pl.Float32),
        "centroids_version": pl.Series([version] * len(ids), dtype=pl.String), "vector": vectors,
    }, schema=ASSIGNMENT_SCHEMA)


def assign_shard(shard: str, storage: DeltaStorage, centroids: dict, vector_dtype: str
                 ) -> tuple[pl.DataFrame, int, str | None]:
    """The map step for one shard (a task of its own on Ray): its rows of ``cluster_assignments`` in every
    clustering, its embedding count, and an error when its dimension does not match the centroids."""
    ids, x = storage.load_embeddings([shard])
    frames = []
    for key in ALL_CLUSTERINGS:
        cents, version = centroids[key]
        if len(ids) and x.shape[1] != cents.dim:
            return pl.DataFrame(schema=ASSIGNMENT_SCHEMA), len(ids), (
                f"shard {shard}: embeddings have dimension {x.shape[1]}, centroids {cents.dim}: refit "
                "kmeans_centroids on the current embeddings")
        frames.append(assignment_frame(ids, x, key, cents, version, vector_dtype) if len(ids)
                      else pl.DataFrame(schema=ASSIGNMENT_SCHEMA))
    return pl.concat(frames), len(ids), None


@shard_asset(
    group_name=GROUP,
    deps=["image_embeddings", dg.AssetDep(CENTROIDS, partition_mapping=dg.AllPartitionMapping())],
    kinds={"numpy", "deltalake"},
)
def cluster_assignments(context: dg.AssetExecutionContext, storage: DeltaStorage,
                        settings: CurationSettings, compute: ComputeResource) -> dg.MaterializeResult:
    """Each embedding's bucket and cluster in every clustering, with its vector (long format: uid, shard,
    clustering, bucket, cluster, centroid similarity, centroids version, vector), in a table partitioned by
    clustering and bucket: the map step of the bucketed duplicate search. Per shard, so new shards need no
    refit; a shard's rewrite replaces exactly its rows in every bucket. ``duplicate_pairs`` refuses
    assignments made with centroids that have since been refitted."""
    cfg = dedup_settings(settings)
    table = current_centroids(storage)
    centroids = {r["clustering"]: (_load_centroids(storage, r), r["version"]) for r in table.iter_rows(named=True)}
    total, sims, touched = 0, [], 0
    shards = partition_keys(context)
    for shard, (out, n, error) in zip(shards, compute.map(assign_shard, shards, "cluster_assignments", storage,
                                                          centroids, cfg.vector_dtype)):
        if error:
            raise dg.Failure(error)
        sims.append(out["centroid_similarity"].to_numpy())
        try:
            storage.write_shard(ASSIGNMENTS, out, shard, partition_by=ASSIGNMENT_PARTITIONS)
        except ValueError as exc:
            raise dg.Failure(str(exc)) from exc
        shard_buckets = out.select("clustering", "bucket").unique().height
        touched += shard_buckets
        total += n
        context.log.info(f"shard {shard}: assigned {n} embeddings in {N_CLUSTERINGS} clusterings "
                         f"({shard_buckets} buckets, {compute.describe()})")
    all_sims = np.concatenate(sims) if sims else np.zeros(0)
    return dg.MaterializeResult(metadata={
        **storage.table_metadata(ASSIGNMENTS, "dedup-recall"),
        "embeddings_assigned": total, "buckets_touched": touched,
        "mean_centroid_similarity": dg.MetadataValue.float(float(all_sims.mean()) if len(all_sims) else 0.0),
    })


def check_assignments(storage: DeltaStorage, embedded: pl.DataFrame, versions: dict[str, str]) -> None:
    """Fail unless every shard of ``embedded`` (shard, n) has all its embeddings assigned, in every clustering,
    with the current centroids (``versions``: clustering -> version). Reads only the data files' statistics
    (row counts, and the shard and centroids version each file holds), not the rows."""
    if not storage.exists(ASSIGNMENTS):
        raise dg.Failure("cluster_assignments has not been materialised")
    files = storage.partition_files(ASSIGNMENTS, stats=["shard", "centroids_version"])
    if files.height and files.select(pl.all().is_null().any()).select(pl.any_horizontal(pl.all())).item():
        raise dg.Failure("cluster_assignments files lack statistics: re-materialise cluster_assignments")
    mixed = files.filter((pl.col("min.shard") != pl.col("max.shard"))
                         | (pl.col("min.centroids_version") != pl.col("max.centroids_version")))
    if mixed.height:  # a compaction merged shards: count the rows instead
        counts = (storage.scan(ASSIGNMENTS).group_by("shard", "clustering", "centroids_version")
                  .agg(pl.len().alias("assigned")).collect())
    else:
        counts = (files.group_by(pl.col("min.shard").alias("shard"), "clustering",
                                 pl.col("min.centroids_version").alias("centroids_version"))
                  .agg(pl.col("num_records").sum().alias("assigned")))
    stale = counts.filter(pl.col("centroids_version") != pl.col("clustering").replace_strict(versions, default=""))
    if stale.height:
        shards = sorted(stale["shard"].unique().to_list())
        raise dg.Failure(f"cluster_assignments of shards {shards[:20]} were made with centroids that have since been "
                         "refitted: re-materialise cluster_assignments for every shard")
    counts = counts.group_by("shard", "clustering").agg(pl.col("assigned").sum())
    expected = embedded.join(pl.DataFrame({"clustering": ALL_CLUSTERINGS}), how="cross")
    joined = expected.join(counts, on=["shard", "clustering"], how="left")
    missing = joined.filter(pl.col("assigned").is_null() | (pl.col("assigned") != pl.col("n")))
    if missing.height:
        shards = sorted(missing["shard"].unique().to_list())
        raise dg.Failure(f"{missing.height} (shard, clustering) pairs have no or stale cluster assignments "
                         f"(shards {shards[:20]}): materialise cluster_assignments for them")


defs = dg.Definitions(assets=[kmeans_centroids, cluster_assignments])
