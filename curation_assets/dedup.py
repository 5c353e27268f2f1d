"""The dedup stage: near-duplicate removal with five k-means clusterings (the DALL·E 2 method), with its recall
measured on the user's own data.

- ``kmeans_centroids`` (partitioned by clustering "1".."5"): spherical k-means centroids fitted on a random
  subset of the embeddings drawn with the clustering's seed; one ``.npy`` file per fit under
  ``<root>/artifacts/kmeans_centroids`` (named by its content hash, never overwritten) plus a small Delta table
  describing each fit, written last, with paths relative to the data root (a copied root reads its own files).
- ``cluster_assignments`` (per shard): each embedding's nearest centroid in every clustering, so a new shard
  is assigned without refitting.
- ``duplicate_pairs``: within each cluster, all pairs with cosine >= the threshold (blocked matrix products),
  unioned over the clusterings; each pair once with its similarity and the clusterings that found it.
- ``dedup_groups``: connected components of the pair graph, one representative per group by a configurable,
  deterministic policy. ``deduplicated_samples``: every row of ``samples`` exactly once with its fate.
- ``dedup_recall``: exact (brute-force) search on a random sample measures the fraction of true pairs found
  with 1..5 clusterings; a check warns when recall with all five falls below the target.

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

from curation_assets.core.plots import figure_png, markdown_image, markdown_table, pyplot
from curation_assets.core import dedup as core
from curation_assets.core import pixel_verify as verify_core
from curation_assets.core.pixel_verify import VerifySettings
from curation_assets.core.shards import read_images
from curation_assets.partitions import N_CLUSTERINGS, clustering_partitions, partition_keys, partitioned_asset, shard_asset
from resources.settings import CurationSettings
from resources.shard_source import ShardSource
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


# --------------------------------------------------------------------------------------------- helpers


def _embedding_index(storage: DeltaStorage) -> pl.DataFrame:
    """uid, shard, encoder of every embedding, in the row order :func:`_load_matrix` uses."""
    ids = storage.scan("image_embeddings").select("uid", "shard", "encoder").collect()
    return ids.sort(["shard", "uid"])


def _load_matrix(storage: DeltaStorage, shards: list[str] | None = None) -> tuple[pl.DataFrame, np.ndarray]:
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


def _encoder_name(ids: pl.DataFrame) -> str:
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


def _png(fig) -> bytes:
    return figure_png(fig, dpi=100)


# --------------------------------------------------------------------------------------------- assets


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
    encoder = _encoder_name(index)
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


def _current_centroids(storage: DeltaStorage) -> pl.DataFrame:
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
    table = _current_centroids(storage)
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


def _labels_matrix(storage: DeltaStorage, ids: pl.DataFrame, versions: dict[str, str]) -> np.ndarray:
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


PAIRS_SCHEMA = {"uid_a": pl.String, "uid_b": pl.String, "similarity": pl.Float32,
                "clusterings": pl.List(pl.Int8), "n_clusterings": pl.Int8,
                "verification": pl.Float32, "colour_residual": pl.Float32, "verified": pl.Boolean}


def _candidate_bytes(storage: DeltaStorage, shard_source: ShardSource, uids: list[str]) -> dict[str, bytes]:
    """The encoded image of each uid, read back from its tar (one streaming pass per shard)."""
    members = (storage.scan("samples").select("uid", "shard", "image_member")
               .filter(pl.col("uid").is_in(uids)).collect())
    out: dict[str, bytes] = {}
    for (shard,), part in members.group_by(["shard"], maintain_order=True):
        blobs = read_images(shard_source.get(shard).tar, [m for m in part["image_member"].to_list() if m])
        for uid, member in part.select("uid", "image_member").iter_rows():
            if member in blobs:
                out[uid] = blobs[member]
    return out


def verify_candidates(pairs: pl.DataFrame, blobs: dict[str, bytes], cfg: VerifySettings) -> pl.DataFrame:
    """Stage 2: fill ``verification`` (structure score), ``colour_residual`` and ``verified`` for every
    candidate pair from the two images' pixels; a pair whose image cannot be read back is not verified."""
    todo = [(blobs.get(a), blobs.get(b)) for a, b in pairs.select("uid_a", "uid_b").iter_rows()]
    readable = [i for i, (a, b) in enumerate(todo) if a is not None and b is not None]
    results = verify_core.verify_pairs([todo[i] for i in readable], cfg)
    structure = np.full(pairs.height, -1.0, np.float32)
    colour = np.full(pairs.height, 255.0, np.float32)
    for i, r in zip(readable, results):
        structure[i], colour[i] = r.structure, r.colour_residual
    return pairs.with_columns(
        verification=pl.Series(structure, dtype=pl.Float32), colour_residual=pl.Series(colour, dtype=pl.Float32),
        verified=pl.Series((structure >= cfg.structure_threshold) & (colour <= cfg.colour_threshold), dtype=pl.Boolean))


@dg.asset(
    group_name=GROUP,
    deps=[dg.AssetDep("cluster_assignments", partition_mapping=dg.AllPartitionMapping()),
          dg.AssetDep("image_embeddings", partition_mapping=dg.AllPartitionMapping())],
    kinds={"numpy", "deltalake"},
)
def duplicate_pairs(context: dg.AssetExecutionContext, storage: DeltaStorage, settings: CurationSettings,
                    shard_source: ShardSource) -> dg.MaterializeResult:
    """Candidate and verified duplicate pairs, in two stages.

    Stage 1: every pair of embeddings with cosine >= the dedup threshold that shares a cluster in at least one
    of the five clusterings; each pair once (uid_a < uid_b) with its similarity and the clusterings that found
    it. Within a cluster the search is exact and blocked (row_block x col_block similarities at a time).
    Stage 2 (``verify``, on by default for perceptual encoders): both images of every candidate are read back
    from the tars and compared on pixels (:mod:`curation_assets.core.pixel_verify`); ``verification`` and
    ``colour_residual`` hold the scores and ``verified`` the verdict. Only verified pairs form groups; with
    verification off every candidate counts as verified (scores null)."""
    cfg = dedup_settings(settings)
    started = time.perf_counter()
    ids, x = _load_matrix(storage)
    if not len(ids):
        raise dg.Failure("image_embeddings is empty")
    encoder = _encoder_name(ids)
    threshold = cfg.resolve_threshold(encoder)
    centroids = _current_centroids(storage)
    if centroids["encoder"].unique().to_list() != [encoder]:
        raise dg.Failure(f"centroids were fitted on {centroids['encoder'].unique().to_list()} embeddings, the "
                         f"current ones come from {encoder!r}: refit kmeans_centroids")
    labels = _labels_matrix(storage, ids, dict(zip(centroids["clustering"], centroids["version"])))
    load_seconds = time.perf_counter() - started

    found, per_clustering, stats = [], [], core.PairSearchStats()
    for c in range(N_CLUSTERINGS):
        pairs = core.within_cluster_pairs(x, labels[:, c], threshold, cfg.row_block, cfg.col_block, cfg.max_pairs, stats)
        found.append(pairs)
        per_clustering.append(len(pairs[0]))
        context.log.info(f"clustering {c + 1}: {len(pairs[0])} pairs at cosine >= {threshold}")
    a, b, sim, mask = core.union_pairs(found, len(ids))
    uids = ids["uid"]
    ua, ub = uids.gather(a), uids.gather(b)
    swap = (ua > ub).to_numpy() if len(a) else np.zeros(0, bool)
    pairs = pl.DataFrame({
        "uid_a": pl.Series(np.where(swap, ub.to_numpy(), ua.to_numpy()) if len(a) else [], dtype=pl.String),
        "uid_b": pl.Series(np.where(swap, ua.to_numpy(), ub.to_numpy()) if len(a) else [], dtype=pl.String),
        "similarity": pl.Series(sim, dtype=pl.Float32),
        "clusterings": pl.Series(core.mask_to_list(mask, N_CLUSTERINGS), dtype=pl.List(pl.Int8)),
        "n_clusterings": pl.Series([bin(int(m)).count("1") for m in mask.tolist()], dtype=pl.Int8),
    }, schema={k: v for k, v in PAIRS_SCHEMA.items() if k not in ("verification", "colour_residual", "verified")}
    ).sort(["uid_a", "uid_b"])
    vcfg = cfg.verification
    verify_meta: dict = {"verification": "off"}
    if vcfg.active(encoder) and pairs.height:
        t = time.perf_counter()
        uids_needed = pl.concat([pairs["uid_a"], pairs["uid_b"]]).unique().to_list()
        blobs = _candidate_bytes(storage, shard_source, uids_needed)
        read_seconds = time.perf_counter() - t
        t = time.perf_counter()
        pairs = verify_candidates(pairs, blobs, vcfg)
        verify_seconds = time.perf_counter() - t
        n_ok = int(pairs["verified"].sum())
        context.log.info(f"verified {n_ok} of {pairs.height} candidate pairs on pixels in {verify_seconds:.1f}s")
        verify_meta = {
            "verification": "on", "verified_pairs": n_ok, "rejected_pairs": pairs.height - n_ok,
            "unreadable_images": len(uids_needed) - len(blobs),
            "structure_threshold": dg.MetadataValue.float(vcfg.structure_threshold),
            "colour_threshold": dg.MetadataValue.float(vcfg.colour_threshold),
            "image_read_seconds": dg.MetadataValue.float(read_seconds),
            "verify_seconds": dg.MetadataValue.float(verify_seconds),
            "pairs_verified_per_second": dg.MetadataValue.float(pairs.height / max(verify_seconds, 1e-9)),
        }
    else:
        pairs = pairs.with_columns(verification=pl.lit(None, pl.Float32), colour_residual=pl.lit(None, pl.Float32),
                                   verified=pl.lit(True))
        verify_meta["verified_pairs"] = pairs.height
    pairs = pairs.cast(PAIRS_SCHEMA)
    storage.write_table("duplicate_pairs", pairs)
    seconds = time.perf_counter() - started
    only_one = int((pairs["n_clusterings"] == 1).sum()) if pairs.height else 0
    per = pl.DataFrame({"clustering": list(range(1, N_CLUSTERINGS + 1)), "pairs": per_clustering})
    return dg.MaterializeResult(metadata={
        **storage.table_metadata("duplicate_pairs", "dedup-recall"),
        "embeddings": len(ids), "encoder": encoder, "threshold": dg.MetadataValue.float(threshold),
        "candidate_pairs": pairs.height, "pairs_found_by_one_clustering_only": only_one, **verify_meta,
        "pairs_per_clustering": dg.MetadataValue.md(markdown_table(per)),
        "largest_cluster": stats.largest_cluster,
        "dot_products_vs_all_pairs": dg.MetadataValue.float(stats.dot_products / max(1, len(ids) * (len(ids) - 1) / 2)),
        "load_seconds": dg.MetadataValue.float(load_seconds),
        "search_seconds": dg.MetadataValue.float(stats.seconds),
        "seconds": dg.MetadataValue.float(seconds),
    })


@dg.asset(
    group_name=GROUP,
    deps=["duplicate_pairs", dg.AssetDep("samples", partition_mapping=dg.AllPartitionMapping())],
    kinds={"scipy", "deltalake"},
)
def dedup_groups(context: dg.AssetExecutionContext, storage: DeltaStorage,
                 settings: CurationSettings) -> dg.MaterializeResult:
    """Duplicate groups: connected components of the duplicate-pair graph (members of groups of 2+ only).
    ``group_id`` is the group's smallest uid; one member per group is the representative, chosen by
    ``representative.order`` without the safety keys (default: highest resolution, then smallest uid), so
    dedup needs no label. ``training_set`` applies the whole order, safety keys included, among the members
    the safety filter keeps: a group disappears from training only when every member is filtered."""
    cfg = dedup_settings(settings)
    pairs = storage.read("duplicate_pairs", columns=["uid_a", "uid_b", "verified"])
    candidates = pairs.height
    pairs = pairs.filter(pl.col("verified"))
    nodes = pl.concat([pairs["uid_a"], pairs["uid_b"]]).unique().sort()
    index = {uid: i for i, uid in enumerate(nodes.to_list())}
    a = np.array([index[u] for u in pairs["uid_a"].to_list()], dtype=np.int64)
    b = np.array([index[u] for u in pairs["uid_b"].to_list()], dtype=np.int64)
    groups = core.group_frame(nodes.to_list(), core.connected_components(len(nodes), a, b))
    samples = storage.scan("samples").select("uid", "shard", "width", "height").collect()
    members = groups.join(samples, on="uid", how="left")
    ranked = core.choose_representatives(members, cfg.representative_order)
    out = ranked.select("uid", "shard", "group_id", "group_size", "is_representative", "representative_uid",
                        "width", "height")
    storage.write_table("dedup_groups", out)
    sizes = out.group_by("group_id").agg(pl.len().alias("n"))["n"]
    hist = ""
    if out.height:
        plt = pyplot()

        fig, ax = plt.subplots(figsize=(5, 3))
        counts = sizes.value_counts().sort("n")
        ax.bar(counts["n"].to_list(), counts["count"].to_list())
        ax.set_xlabel("group size")
        ax.set_ylabel("groups")
        hist = markdown_image(_png(fig), "group sizes")
    return dg.MaterializeResult(metadata={
        **storage.table_metadata("dedup_groups", "dedup-recall"),
        "candidate_pairs": candidates, "verified_pairs_used": pairs.height,
        "groups": int(sizes.len()), "grouped_samples": out.height,
        "duplicates_removed": int(out.height - sizes.len()),
        "largest_group": int(sizes.max()) if sizes.len() else 0,
        "representative_order": ", ".join(cfg.representative_order),
        "group_sizes": dg.MetadataValue.md(hist or "no groups"),
    })


DEDUPLICATED_SCHEMA = {"uid": pl.String, "shard": pl.String, "status": pl.String, "kept": pl.Boolean,
                       "group_id": pl.String, "representative_uid": pl.String}


def deduplicate(samples: pl.DataFrame, embedded: pl.DataFrame, groups: pl.DataFrame) -> pl.DataFrame:
    """Every row of ``samples`` once with its fate: ``representative`` (kept, stands for its group),
    ``duplicate`` (removed, with group_id and representative_uid), ``singleton`` (kept, no duplicate found),
    ``rejected`` (rejected at ingest, never embedded) or ``not_embedded`` (ok at ingest but missing from
    image_embeddings: an upstream gap, not kept, flagged by a check)."""
    g = groups.select("uid", "group_id", "is_representative", "representative_uid")
    df = (samples.select("uid", "shard", "status")
          .join(embedded.select("uid").with_columns(pl.lit(True).alias("embedded")), on="uid", how="left")
          .join(g, on="uid", how="left"))
    status = (pl.when(pl.col("status") != "ok").then(pl.lit("rejected"))
              .when(pl.col("embedded").is_null()).then(pl.lit("not_embedded"))
              .when(pl.col("group_id").is_null()).then(pl.lit("singleton"))
              .when(pl.col("is_representative")).then(pl.lit("representative"))
              .otherwise(pl.lit("duplicate")))
    out = df.with_columns(status.alias("fate")).select(
        "uid", "shard", pl.col("fate").alias("status"),
        pl.col("fate").is_in(["singleton", "representative"]).alias("kept"),
        pl.when(pl.col("fate").is_in(["representative", "duplicate"])).then(pl.col("group_id")).alias("group_id"),
        pl.when(pl.col("fate") == "duplicate").then(pl.col("representative_uid")).alias("representative_uid"),
    )
    return out.cast(DEDUPLICATED_SCHEMA).sort("uid")


@dg.asset(
    group_name=GROUP,
    deps=["dedup_groups", dg.AssetDep("samples", partition_mapping=dg.AllPartitionMapping()),
          dg.AssetDep("image_embeddings", partition_mapping=dg.AllPartitionMapping())],
    kinds={"deltalake"},
)
def deduplicated_samples(context: dg.AssetExecutionContext, storage: DeltaStorage) -> dg.MaterializeResult:
    """Every sample of ``samples`` exactly once, with ``kept`` and its fate (status: representative,
    duplicate, singleton, rejected, not_embedded); partitioned by shard so per-shard readers prune."""
    samples = storage.scan("samples").select("uid", "shard", "status").collect()
    embedded = storage.scan("image_embeddings").select("uid").collect()
    groups = storage.read("dedup_groups")
    out = deduplicate(samples, embedded, groups)
    storage.write_table("deduplicated_samples", out, partition_by=["shard"])
    counts = dict(out.group_by("status").agg(pl.len()).iter_rows())
    ok = out.filter(pl.col("status") != "rejected").height
    removed = counts.get("duplicate", 0)
    return dg.MaterializeResult(metadata={
        **storage.table_metadata("deduplicated_samples", "dedup-recall"),
        "samples_in": samples.height, "rows_out": out.height, "kept": int(out["kept"].sum()),
        "duplicates_removed": removed, "rejected": counts.get("rejected", 0),
        "not_embedded": counts.get("not_embedded", 0),
        "removed_fraction_of_ok": dg.MetadataValue.float(removed / ok if ok else 0.0),
    })


@dg.asset_check(asset=deduplicated_samples, blocking=True,
                description="Every row of samples appears exactly once, and every ok sample was embedded.")
def deduplicated_samples_account_for_every_sample(storage: DeltaStorage) -> dg.AssetCheckResult:
    out = storage.scan("deduplicated_samples").select("uid", "status").collect()
    samples = storage.scan("samples").select("uid").collect()
    duplicated_uids = out.height - out["uid"].n_unique()
    missing = samples.join(out, on="uid", how="anti").height
    extra = out.join(samples, on="uid", how="anti").height
    not_embedded = int((out["status"] == "not_embedded").sum())
    return dg.AssetCheckResult(
        passed=duplicated_uids == 0 and missing == 0 and extra == 0 and not_embedded == 0,
        description=(f"{out.height} rows for {samples.height} samples; {duplicated_uids} repeated, {missing} missing, "
                     f"{extra} unknown, {not_embedded} ok samples without embeddings"),
        metadata={"repeated": duplicated_uids, "missing": missing, "unknown": extra, "not_embedded": not_embedded},
    )


@dg.asset(
    group_name=GROUP,
    deps=["duplicate_pairs", dg.AssetDep("image_embeddings", partition_mapping=dg.AllPartitionMapping())],
    kinds={"faiss", "deltalake"},
)
def dedup_recall(context: dg.AssetExecutionContext, storage: DeltaStorage, settings: CurationSettings,
                 vector_search: VectorSearch) -> dg.MaterializeResult:
    """Measured recall of the clustered search: a random sample of ``recall.sample_size`` embeddings is searched
    exactly (faiss brute-force range search against all embeddings); of the true pairs (cosine >= threshold)
    involving a sampled embedding, the fraction found using clusterings 1..c, for c = 1..5, with Wilson 95%
    intervals and the mean over all subsets of c clusterings."""
    cfg = dedup_settings(settings)
    ids, x = _load_matrix(storage)
    encoder = _encoder_name(ids)
    threshold = cfg.resolve_threshold(encoder)
    queries = core.sample_queries(len(ids), cfg.recall_sample_size, cfg.recall_seed)
    started = time.perf_counter()
    # on the GPU through a flat index; on the CPU straight on the matrix (an index would copy it)
    index = vector_search.flat_index(x) if vector_search.use_gpu() else None
    true_a, true_b, _ = core.exact_pairs(x, queries, threshold, index=index)
    exact_seconds = time.perf_counter() - started
    del x
    pairs = storage.read("duplicate_pairs", columns=["uid_a", "uid_b", "clusterings"])
    row = pl.DataFrame({"uid": ids["uid"], "row": pl.int_range(ids.height, eager=True)})
    mapped = (pairs.join(row.rename({"uid": "uid_a", "row": "ra"}), on="uid_a")
                   .join(row.rename({"uid": "uid_b", "row": "rb"}), on="uid_b"))
    fa = np.minimum(mapped["ra"].to_numpy(), mapped["rb"].to_numpy())
    fb = np.maximum(mapped["ra"].to_numpy(), mapped["rb"].to_numpy())
    fmask = np.array([sum(1 << (c - 1) for c in cs) for cs in mapped["clusterings"].to_list()], dtype=np.uint8)
    curve = core.recall_curve(true_a, true_b, fa, fb, fmask, len(ids), N_CLUSTERINGS)
    table = pl.DataFrame([r.__dict__ for r in curve]).with_columns(
        pl.lit(len(queries)).alias("sample_size"), pl.lit(len(ids)).alias("n_embeddings"),
        pl.lit(threshold).alias("threshold"), pl.lit(encoder).alias("encoder"),
        pl.lit(cfg.recall_target).alias("target"))
    storage.write_table("dedup_recall", table)

    plt = pyplot()

    fig, ax = plt.subplots(figsize=(5, 3.2))
    cs = table["clusterings"].to_list()
    ax.plot(cs, table["recall"].to_list(), marker="o", label="clusterings 1..c")
    ax.fill_between(cs, table["recall_low"].to_list(), table["recall_high"].to_list(), alpha=0.2, label="Wilson 95%")
    ax.plot(cs, table["recall_mean_over_subsets"].to_list(), ls="--", label="mean over subsets of c")
    ax.axhline(cfg.recall_target, color="grey", lw=0.8, ls=":", label=f"target {cfg.recall_target}")
    ax.set_xlabel("clusterings")
    ax.set_ylabel("pair recall")
    ax.set_xticks(cs)
    ax.legend(fontsize=7)
    final = curve[-1]
    return dg.MaterializeResult(metadata={
        **storage.table_metadata("dedup_recall", "dedup-recall"),
        "sample_size": len(queries), "true_pairs_in_sample": final.true_pairs,
        "recall_1": dg.MetadataValue.float(curve[0].recall),
        "recall_all": dg.MetadataValue.float(final.recall),
        "recall_table": dg.MetadataValue.md(markdown_table(table.select(
            "clusterings", "true_pairs", "found", "recall", "recall_low", "recall_high", "recall_mean_over_subsets"))),
        "recall_curve": dg.MetadataValue.md(markdown_image(_png(fig), "recall vs clusterings")),
        "exact_search_seconds": dg.MetadataValue.float(exact_seconds),
    })


@dg.asset_check(asset=dedup_recall, description="Recall of the five-clustering search on the exact-search sample "
                                                "reaches recall.target (warning).")
def dedup_recall_meets_target(storage: DeltaStorage) -> dg.AssetCheckResult:
    table = storage.read("dedup_recall").sort("clusterings")
    last = table.row(-1, named=True)
    if last["true_pairs"] == 0:
        return dg.AssetCheckResult(passed=True, severity=dg.AssetCheckSeverity.WARN,
                                   description="the sample holds no pair above the threshold: recall not measurable; "
                                               "raise recall.sample_size")
    return dg.AssetCheckResult(
        passed=last["recall"] >= last["target"], severity=dg.AssetCheckSeverity.WARN,
        description=(f"recall with {last['clusterings']} clusterings {last['recall']:.4f} "
                     f"(95% CI {last['recall_low']:.3f}-{last['recall_high']:.3f}) on {last['true_pairs']} true pairs; "
                     f"target {last['target']}"),
        metadata={"recall": last["recall"], "true_pairs": last["true_pairs"]},
    )


defs = dg.Definitions(
    assets=[kmeans_centroids, cluster_assignments, duplicate_pairs, dedup_groups, deduplicated_samples, dedup_recall],
    asset_checks=[deduplicated_samples_account_for_every_sample, dedup_recall_meets_target],
)
