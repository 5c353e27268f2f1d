"""The dedup stage: near-duplicate removal with five k-means clusterings (the DALL·E 2 method), with its recall
measured on the user's own data.

- ``kmeans_centroids`` and ``cluster_assignments`` (``dedup_clusters.py``): five clusterings of the embeddings.
- ``duplicate_pairs``: within each cluster, all pairs with cosine >= the threshold (blocked matrix products),
  unioned over the clusterings and verified on the pixels; each pair once with its similarity and the
  clusterings that found it.
- ``dedup_groups``: connected components of the pair graph, one representative per group by a configurable,
  deterministic policy. ``deduplicated_samples``: every row of ``samples`` exactly once with its fate.
- ``dedup_recall`` (``dedup_recall.py``): the recall of the clustered search against exact search.

The algorithms are in ``core/dedup.py`` and ``core/pixel_verify.py``.
"""


import dataclasses
import time

import dagster as dg
import numpy as np
import polars as pl

from curation_assets.core import dedup as core
from curation_assets.core import pixel_verify as verify_core
from curation_assets.core.pixel_verify import VerifySettings
from curation_assets.core.plots import figure_markdown
from curation_assets.core.plots import markdown_table, pyplot
from curation_assets.core.delta import binary_to_matrix
from curation_assets.dedup_clusters import (ALL_CLUSTERINGS, ASSIGNMENTS, GROUP, check_assignments, current_centroids,
                                            dedup_settings, encoder_name)
from curation_assets.partitions import N_CLUSTERINGS
from resources.compute import ComputeResource
from resources.settings import CurationSettings
from resources.shard_source import ShardSource
from resources.storage import DeltaStorage


PAIRS_SCHEMA = {"uid_a": pl.String, "uid_b": pl.String, "similarity": pl.Float32,
                "clusterings": pl.List(pl.Int8), "n_clusterings": pl.Int8,
                "verification": pl.Float32, "colour_residual": pl.Float32, "verified": pl.Boolean,
                "sha256_a": pl.String, "sha256_b": pl.String, "verify_version": pl.String}
VERDICT = ["verification", "colour_residual", "verified"]


def reusable_verdicts(storage: DeltaStorage, pairs: pl.DataFrame, version: str) -> pl.DataFrame:
    """``pairs`` (uid_a, uid_b, sha256_a, sha256_b) with the verdict columns of the previous ``duplicate_pairs``
    where the same two images (same uids and content hashes) were verified under the same settings ``version``;
    null elsewhere. A shard's arrival thus verifies only its new candidate pairs."""
    previous = storage.read_if_exists("duplicate_pairs")
    empty = pairs.with_columns(*[pl.lit(None, PAIRS_SCHEMA[c]).alias(c) for c in VERDICT])
    if previous is None or not {"sha256_a", "sha256_b", "verify_version", *VERDICT} <= set(previous.columns):
        return empty
    # a pair whose image could not be read (-1) is tried again: its tar may be back
    done = previous.filter((pl.col("verify_version") == version) & (pl.col("verification") > -1)).select(
        "uid_a", "uid_b", "sha256_a", "sha256_b", *VERDICT)
    return pairs.join(done, on=["uid_a", "uid_b", "sha256_a", "sha256_b"], how="left")


def _candidate_bytes(storage: DeltaStorage, shard_source: ShardSource, uids: list[str]) -> dict[str, bytes]:
    """The encoded image of each uid, read back from its tar (one streaming pass per shard)."""
    members = (storage.scan("samples").select("uid", "shard", "image_member")
               .filter(pl.col("uid").is_in(uids)).collect())
    out: dict[str, bytes] = {}
    for (shard,), part in members.group_by(["shard"], maintain_order=True):
        blobs = shard_source.get(shard).read_images([m for m in part["image_member"].to_list() if m])
        for uid, member in part.select("uid", "image_member").iter_rows():
            if member in blobs:
                out[uid] = blobs[member]
    return out


VERIFY_PIECE = 20_000
"""Candidate pairs verified together in this process: their thumbnails (~4 KB an image, two images a pair at
most) stay under ~160 MB however many pairs a run verifies."""


def _verify_chunks(todo: pl.DataFrame, compute: ComputeResource, piece: int = VERIFY_PIECE) -> list[pl.DataFrame]:
    """The pairs to verify in pieces of at most ``piece`` pairs in-process, or about four pieces per worker CPU
    on Ray (no larger than ``piece`` either), sorted by ``uid_a`` so that an image's pairs mostly share a
    piece and its thumbnail is read once."""
    if not todo.height:
        return []
    pieces = max(1, min(todo.height // 50, 4 * compute.parallelism())) if compute.on_ray else 1
    pieces = max(pieces, -(-todo.height // piece))
    ordered = todo.sort("uid_a")
    size = -(-ordered.height // pieces)
    return [ordered.slice(i, size) for i in range(0, ordered.height, size)]


def _thumbnails(storage: DeltaStorage, shard_source: ShardSource, uids: list[str]) -> tuple[dict[str, bytes | None], int]:
    """Each uid's verification thumbnail from ``image_embeddings``; for uids embedded without one (an older
    release, or verification turned on later) the image is read back from its tar and the thumbnail made
    now. Returns the thumbnails and how many images had to be read from tars."""
    want = pl.Series("uid", uids, dtype=pl.String).implode()
    shards = sorted({uid.split("/", 1)[0] for uid in uids})  # a uid is "{shard}/{key}": read only those shards
    thumbs: dict[str, bytes | None] = {}
    if "thumbnail" in storage.scan("image_embeddings").collect_schema().names():
        found = (storage.scan("image_embeddings", shards)
                 .filter(pl.col("uid").is_in(want) & pl.col("thumbnail").is_not_null())
                 .select("uid", "thumbnail").collect())
        thumbs = dict(found.iter_rows())
    missing = [u for u in uids if u not in thumbs]
    if missing:
        thumbs.update({uid: verify_core.thumbnail_of(blob)
                       for uid, blob in _candidate_bytes(storage, shard_source, missing).items()})
    return thumbs, len(missing)


def _verify_chunk(pairs: pl.DataFrame, storage: DeltaStorage, shard_source: ShardSource, cfg: VerifySettings
                  ) -> tuple[pl.DataFrame, float, int, int]:
    """Verify a piece of the candidate pairs from the thumbnails stored beside the embeddings (a task of its
    own on Ray): the verdicts, the seconds spent fetching thumbnails, how many images have none (they are
    never verified) and how many had to be read from tars instead."""
    started = time.perf_counter()
    uids = pl.concat([pairs["uid_a"], pairs["uid_b"]]).unique().sort().to_list()
    thumbs, from_tars = _thumbnails(storage, shard_source, uids)
    read_seconds = time.perf_counter() - started
    unreadable = sum(1 for u in uids if thumbs.get(u) is None)
    return verify_candidates(pairs, thumbs, cfg), read_seconds, unreadable, from_tars


def verify_candidates(pairs: pl.DataFrame, thumbnails: dict[str, bytes | None], cfg: VerifySettings) -> pl.DataFrame:
    """Stage 2: fill ``verification`` (structure score), ``colour_residual`` and ``verified`` for every
    candidate pair from the two images' thumbnails; a pair with an image that has none is not verified."""
    results = verify_core.verify_thumbnails(list(pairs.select("uid_a", "uid_b").iter_rows()), thumbnails, cfg)
    structure = np.array([r.structure for r in results], np.float32)
    colour = np.array([r.colour_residual for r in results], np.float32)
    return pairs.with_columns(
        verification=pl.Series(structure, dtype=pl.Float32), colour_residual=pl.Series(colour, dtype=pl.Float32),
        verified=pl.Series((structure >= cfg.structure_threshold) & (colour <= cfg.colour_threshold), dtype=pl.Boolean))


BUCKET_PAIRS = "bucket_pairs"
BUCKET_STATE = "bucket_state"
BUCKET_PAIRS_SCHEMA = {"bucket_key": pl.String, "clustering": pl.String, "bucket": pl.Int32, "uid_a": pl.String,
                       "uid_b": pl.String, "similarity": pl.Float32}


def bucket_fingerprints(storage: DeltaStorage, versions: dict[str, str], threshold: float) -> pl.DataFrame:
    """One row per (clustering, bucket) of ``cluster_assignments``: ``bucket_key``, its data ``files`` (each
    holds one shard's rows, and a shard's rewrite replaces its files), the ``shards`` of those files, and a
    ``fingerprint`` of everything the bucket's search depends on (files, centroids version, threshold) plus a
    ``base`` of the last two, so an unchanged bucket is not searched again and a bucket that only gained
    files searches only its new rows."""
    import hashlib

    def digest(text: str) -> str:
        return hashlib.sha1(text.encode()).hexdigest()[:20]

    files = storage.partition_files(ASSIGNMENTS, stats=["shard"])
    one_shard = pl.col("min.shard") == pl.col("max.shard")  # always, unless a compaction merged shards
    files = files.select("clustering", pl.col("bucket").cast(pl.Int32), "path", "num_records",
                         pl.when(one_shard).then(pl.col("min.shard")).alias("shard"))
    grouped = (files.sort("path").group_by("clustering", "bucket")
               .agg(pl.col("path").alias("files"), pl.col("shard").alias("shards"),
                    pl.col("num_records").sum().alias("rows"))
               .sort("clustering", "bucket"))
    base = [digest(f"{versions.get(c, '')}|{threshold!r}") for c in grouped["clustering"].to_list()]
    prints = [digest(f"{b}|{'|'.join(paths)}") for b, paths in zip(base, grouped["files"].to_list())]
    return grouped.select(
        (pl.col("clustering") + ":" + pl.col("bucket").cast(pl.String)).alias("bucket_key"), "clustering", "bucket",
        "rows", "files", "shards", pl.Series("base", base, dtype=pl.String), pl.Series("fingerprint", prints, dtype=pl.String))


def bucket_row_cap(budget: int, dim: int) -> int:
    """Rows of a bucket one read may hold: each costs its packed vector, its float32 copy and its uid (~64
    bytes), and a read may use half the step's memory budget (the rest: the pairs and the search blocks)."""
    return max(1, int(budget) // 2 // (dim * 8 + 64))


def cluster_chunks(clusters: np.ndarray, cap: int) -> list[tuple[int, int]]:
    """Consecutive cluster-id ranges ``(lo, hi)`` (inclusive) of a bucket, each holding at most ``cap`` rows
    unless one cluster alone is larger; every cluster lies in one range, so searching the ranges one by one
    finds exactly the bucket's pairs."""
    ids, counts = np.unique(clusters, return_counts=True)
    chunks: list[tuple[int, int]] = []
    lo, last, rows = None, None, 0
    for cluster, count in zip(ids.tolist(), counts.tolist()):
        if lo is not None and rows + count > cap:
            chunks.append((lo, last))
            lo, rows = None, 0
        if lo is None:
            lo = cluster
        rows += count
        last = cluster
    if lo is not None:
        chunks.append((lo, last))
    return chunks


def search_bucket(storage: DeltaStorage, clustering: str, bucket: int, files: list[str], rows: int, dim: int,
                  threshold: float, cfg: core.DedupSettings, stats: core.PairSearchStats, row_cap: int,
                  new_shards: list[str] | None = None) -> tuple[pl.DataFrame, int, pl.Series | None]:
    """The reduce step for one bucket: its members' vectors (only its files are read) and the pairs within
    each of its clusters, as uids (``uid_a < uid_b``). A bucket of more than ``row_cap`` rows is read in
    ranges of whole clusters (:func:`cluster_chunks`). With ``new_shards``, only the pairs that involve a
    member of those shards (the bucket's earlier pairs stay valid); their uids are returned too. Returns the
    pairs, the most rows held at once and the new members' uids (or None)."""
    if rows > row_cap:
        ids = storage.read_files(ASSIGNMENTS, files, ["cluster"])["cluster"].to_numpy()
        ranges = [pl.col("cluster").is_between(lo, hi) for lo, hi in cluster_chunks(ids, row_cap)]
    else:
        ranges = [None]
    frames, new_parts, held = [], [], 0
    for where in ranges:
        part = storage.read_files(ASSIGNMENTS, files, ["uid", "shard", "cluster", "vector"], where).sort("uid")
        held = max(held, part.height)
        x = binary_to_matrix(part["vector"], dim)
        clusters = part["cluster"].to_numpy()
        if new_shards is None:
            a, b, sim = core.bucket_pairs(np.arange(part.height), x, clusters, threshold, cfg, stats)
        else:
            is_new = part["shard"].is_in(new_shards).to_numpy()
            new_parts.append(part.filter(pl.Series(is_new))["uid"])
            a, b, sim = core.bucket_pairs_with_new(np.arange(part.height), x, clusters, is_new, threshold, stats)
        uids = part["uid"]
        frames.append(pl.DataFrame({
            "bucket_key": pl.Series([f"{clustering}:{bucket}"] * len(a), dtype=pl.String),
            "clustering": pl.Series([clustering] * len(a), dtype=pl.String),
            "bucket": pl.Series([bucket] * len(a), dtype=pl.Int32),
            "uid_a": uids.gather(a), "uid_b": uids.gather(b), "similarity": pl.Series(sim, dtype=pl.Float32),
        }, schema=BUCKET_PAIRS_SCHEMA))
        del part, x
    new_uids = pl.concat(new_parts) if new_parts else None
    return pl.concat(frames), held, new_uids


def _plan(current: pl.DataFrame, previous: pl.DataFrame | None) -> pl.DataFrame:
    """``current`` plus ``action``: ``reuse`` (fingerprint unchanged), ``add`` (same centroids and threshold,
    every earlier file still there: search only the rows of the new files, whose shards are ``new_shards``)
    or ``search`` (everything else: new bucket, a shard rewritten or deleted, refit, other threshold)."""
    if previous is None or "files" not in previous.columns:
        return current.with_columns(pl.lit("search").alias("action"), pl.lit(None, pl.List(pl.String)).alias("new_shards"))
    before = {key: (fp, base, set(files)) for key, fp, base, files
              in previous.select("bucket_key", "fingerprint", "base", "files").iter_rows()}
    actions, new_shards = [], []
    for key, fp, base, files, shards in current.select("bucket_key", "fingerprint", "base", "files", "shards").iter_rows():
        old = before.get(key)
        added = [s for f, s in zip(files, shards) if old and f not in old[2]]
        if old and old[0] == fp:
            actions.append("reuse"), new_shards.append(None)
        elif old and old[1] == base and old[2] <= set(files) and all(added):
            actions.append("add"), new_shards.append(sorted(set(added)))
        else:
            actions.append("search"), new_shards.append(None)
    return current.with_columns(pl.Series("action", actions, dtype=pl.String),
                                pl.Series("new_shards", new_shards, dtype=pl.List(pl.String)))


def _search_job(job: tuple, storage: DeltaStorage, dim: int, threshold: float, cfg: core.DedupSettings,
                row_cap: int) -> tuple[pl.DataFrame, int, pl.Series | None, core.PairSearchStats, float]:
    """One bucket's search (a task of its own on Ray): its pairs, rows held, new uids, counters, seconds."""
    clustering, bucket, files, rows, new_shards = job
    started, stats = time.perf_counter(), core.PairSearchStats()
    pairs, held, new_uids = search_bucket(storage, clustering, bucket, files, rows, dim, threshold, cfg, stats,
                                          row_cap, new_shards)
    return pairs, held, new_uids, stats, time.perf_counter() - started


def search_buckets(storage: DeltaStorage, versions: dict[str, str], dim: int, threshold: float,
                   cfg: core.DedupSettings, budget: int, log, compute: ComputeResource | None = None
                   ) -> tuple[pl.DataFrame, dict]:
    """Search the buckets that changed since their last search (only the new rows of a bucket that merely
    gained shards), keep the stored pairs of the others, and return all pairs (``bucket_pairs``) with what
    was done. A bucket's new pairs are committed before its new state, so a crash in between only repeats
    that bucket's work (its pairs are replaced, never appended twice)."""
    current = bucket_fingerprints(storage, versions, threshold)
    previous = storage.read_if_exists(BUCKET_STATE) if storage.exists(BUCKET_PAIRS) else None
    plan = _plan(current, previous)
    stats = core.PairSearchStats()
    frames, members, seconds, replaced = [], {}, {}, []
    todo = plan.filter(pl.col("action") != "reuse")
    row_cap = bucket_row_cap(budget, dim)
    earlier = ({key: part for (key,), part in storage.read(BUCKET_PAIRS).partition_by("bucket_key", as_dict=True).items()}
               if (todo["action"] == "add").any() else {})
    jobs = [(clustering, bucket, files, rows, new_shards if action == "add" else None)
            for clustering, bucket, files, rows, action, new_shards in todo.select(
                "clustering", "bucket", "files", "rows", "action", "new_shards").iter_rows()]
    results = (compute or ComputeResource()).map(_search_job, jobs, "duplicate_pairs", storage, dim, threshold,
                                                 cfg, row_cap)
    for key, (pairs, members[key], new_uids, bucket_stats, seconds[key]) in zip(todo["bucket_key"].to_list(), results):
        stats.merge(bucket_stats)
        if new_uids is not None:  # keep the bucket's earlier pairs that involve none of its new rows
            kept = earlier.pop(key, pl.DataFrame(schema=BUCKET_PAIRS_SCHEMA)).filter(
                ~pl.col("uid_a").is_in(new_uids.implode()) & ~pl.col("uid_b").is_in(new_uids.implode()))
            pairs = pl.concat([kept.select(list(BUCKET_PAIRS_SCHEMA)).cast(BUCKET_PAIRS_SCHEMA), pairs])
        frames.append(pairs)
        replaced.append(key)
    vanished = ([] if previous is None or "bucket_key" not in previous.columns
                else sorted(set(previous["bucket_key"].to_list()) - set(current["bucket_key"].to_list())))
    replaced += vanished
    if replaced:
        new_pairs = pl.concat(frames) if frames else pl.DataFrame(schema=BUCKET_PAIRS_SCHEMA)
        if storage.exists(BUCKET_PAIRS):
            storage.replace_in(BUCKET_PAIRS, new_pairs, "bucket_key", replaced)
        else:
            storage.write_table(BUCKET_PAIRS, new_pairs)
    state = plan.with_columns(
        pl.col("bucket_key").replace_strict(members, default=None, return_dtype=pl.Int64).alias("read_rows"),
        pl.col("bucket_key").replace_strict(seconds, default=None, return_dtype=pl.Float64).alias("seconds"))
    if previous is not None and "read_rows" in previous.columns:  # reused buckets keep their last numbers
        last = previous.select("bucket_key", pl.col("read_rows").alias("m0"), pl.col("seconds").alias("s0"))
        state = (state.join(last, on="bucket_key", how="left")
                 .with_columns(pl.col("read_rows").fill_null(pl.col("m0")), pl.col("seconds").fill_null(pl.col("s0")))
                 .drop("m0", "s0"))
    storage.write_table(BUCKET_STATE, state.drop("new_shards").sort("bucket_key"))
    pairs = storage.read(BUCKET_PAIRS) if storage.exists(BUCKET_PAIRS) else pl.DataFrame(schema=BUCKET_PAIRS_SCHEMA)
    if pairs.height > cfg.max_pairs:
        raise dg.Failure(f"{pairs.height} pairs at cosine >= {threshold} (limit {cfg.max_pairs}): the threshold is "
                         "too low for these embeddings (raise dedup.threshold or search.max_pairs)")
    counts = dict(plan.group_by("action").len().iter_rows())
    log(f"{current.height} buckets: {counts.get('search', 0)} searched, {counts.get('add', 0)} searched for their "
        f"new rows only, {counts.get('reuse', 0)} unchanged; {stats.seconds:.1f}s; {pairs.height} pairs in all")
    return pairs, {"buckets": current.height, "buckets_searched": counts.get("search", 0),
                   "buckets_searched_new_rows_only": counts.get("add", 0), "buckets_reused": counts.get("reuse", 0),
                   "largest_bucket": int(current["rows"].max() or 0) if current.height else 0,
                   "largest_read_rows": max(members.values(), default=0), "read_row_cap": row_cap, "stats": stats}


def union_bucket_pairs(pairs: pl.DataFrame) -> pl.DataFrame:
    """Each pair once over all clusterings: ``uid_a, uid_b, similarity, clusterings (sorted), n_clusterings``."""
    return (pairs.group_by("uid_a", "uid_b")
            .agg(pl.col("similarity").sort_by("clustering").first(), pl.col("clustering").cast(pl.Int8).unique().sort().alias("clusterings"))
            .with_columns(pl.col("clusterings").list.len().cast(pl.Int8).alias("n_clusterings"))
            .sort("uid_a", "uid_b"))


@dg.asset(
    group_name=GROUP,
    deps=[dg.AssetDep("cluster_assignments", partition_mapping=dg.AllPartitionMapping()),
          dg.AssetDep("image_embeddings", partition_mapping=dg.AllPartitionMapping())],
    kinds={"numpy", "deltalake"},
)
def duplicate_pairs(context: dg.AssetExecutionContext, storage: DeltaStorage, settings: CurationSettings,
                    shard_source: ShardSource, compute: ComputeResource) -> dg.MaterializeResult:
    """Candidate and verified duplicate pairs, in two stages.

    Stage 1, bucket by bucket: every pair of embeddings with cosine >= the dedup threshold that shares a
    cluster in at least one of the five clusterings. Each clustering's clusters lie inside its coarse buckets,
    so each bucket is searched on its own from its partition of ``cluster_assignments`` (only its members'
    vectors in memory; exact, blocked: row_block x col_block similarities at a time), and a bucket none of
    whose shards changed since its last search is not searched again (``bucket_pairs``, ``bucket_state``).
    The pairs are unioned over the clusterings: each once (uid_a < uid_b) with its similarity and the
    clusterings that found it.
    Stage 2 (``verify``, on by default for perceptual encoders): both images of every candidate are compared
    on pixels (:mod:`curation_assets.core.pixel_verify`) through the thumbnails ``image_embeddings`` stored
    beside their vectors, so no tar is read (an image embedded without one is read from its tar instead, and
    ``images_read_from_tars`` counts them); ``verification`` and ``colour_residual`` hold the scores and
    ``verified`` the verdict. Only verified pairs form groups; with
    verification off every candidate counts as verified (scores null)."""
    cfg = dedup_settings(settings)
    started = time.perf_counter()
    embedded = (storage.scan("image_embeddings").group_by("shard", "encoder").agg(pl.len().alias("n")).collect()
                if storage.exists("image_embeddings") else pl.DataFrame())
    if not embedded.height or int(embedded["n"].sum()) == 0:
        raise dg.Failure("image_embeddings is empty")
    encoder = encoder_name(embedded)
    threshold = cfg.resolve_threshold(encoder)
    centroids = current_centroids(storage)
    if centroids["encoder"].unique().to_list() != [encoder]:
        raise dg.Failure(f"centroids were fitted on {centroids['encoder'].unique().to_list()} embeddings, the "
                         f"current ones come from {encoder!r}: refit kmeans_centroids")
    versions = dict(zip(centroids["clustering"], centroids["version"]))
    check_assignments(storage, embedded.select("shard", "n"), versions)
    n_embeddings = int(embedded["n"].sum())
    load_seconds = time.perf_counter() - started

    dims = centroids["dim"].unique().to_list()
    if len(dims) != 1:
        raise dg.Failure(f"kmeans_centroids mixes dimensions {dims}: refit kmeans_centroids")
    found, bucket_meta = search_buckets(storage, versions, int(dims[0]), threshold, cfg, settings.memory_budget(),
                                        context.log.info, compute)
    stats = bucket_meta.pop("stats")
    per_clustering = [int((found["clustering"] == c).sum()) for c in ALL_CLUSTERINGS]
    pairs = union_bucket_pairs(found).cast({k: v for k, v in PAIRS_SCHEMA.items() if k in
                                            ("uid_a", "uid_b", "similarity", "clusterings", "n_clusterings")})
    vcfg = cfg.verification
    verify_meta: dict = {"verification": "off"}
    if vcfg.active(encoder) and pairs.height:
        shas = (storage.scan("samples").select("uid", "sha256")
                .filter(pl.col("uid").is_in(pl.concat([pairs["uid_a"], pairs["uid_b"]]).unique().implode())).collect())
        pairs = (pairs.join(shas.rename({"uid": "uid_a", "sha256": "sha256_a"}), on="uid_a", how="left")
                 .join(shas.rename({"uid": "uid_b", "sha256": "sha256_b"}), on="uid_b", how="left"))
        pairs = reusable_verdicts(storage, pairs, vcfg.version())
        todo = pairs.filter(pl.col("verification").is_null())
        t = time.perf_counter()
        # on Ray each piece is a task on one CPU; in this process vcfg.workers threads share each block
        task_cfg = dataclasses.replace(vcfg, workers=1) if compute.on_ray else vcfg
        done = list(compute.map(_verify_chunk, _verify_chunks(todo.drop(VERDICT), compute), "verify_pairs",
                                storage, shard_source, task_cfg))
        fresh = pl.concat([d[0] for d in done]) if done else todo
        read_seconds, unreadable = sum((d[1] for d in done), 0.0), sum(d[2] for d in done)
        from_tars = sum(d[3] for d in done)
        verify_seconds = time.perf_counter() - t - (read_seconds if not compute.on_ray else 0.0)
        pairs = (pl.concat([pairs.filter(pl.col("verification").is_not_null()), fresh.select(pairs.columns)])
                 .with_columns(pl.lit(vcfg.version()).alias("verify_version")).sort(["uid_a", "uid_b"]))
        n_ok = int(pairs["verified"].sum())
        context.log.info(f"verified {todo.height} candidate pairs on pixels in {verify_seconds:.1f}s "
                         f"({pairs.height - todo.height} verdicts reused); {n_ok} of {pairs.height} pass")
        verify_meta = {
            "verification": "on", "verified_pairs": n_ok, "rejected_pairs": pairs.height - n_ok,
            "pairs_verified_now": todo.height, "verdicts_reused": pairs.height - todo.height,
            "unreadable_images": unreadable, "images_read_from_tars": from_tars,
            "structure_threshold": dg.MetadataValue.float(vcfg.structure_threshold),
            "colour_threshold": dg.MetadataValue.float(vcfg.colour_threshold),
            "thumbnail_read_seconds": dg.MetadataValue.float(read_seconds),
            "verify_seconds": dg.MetadataValue.float(verify_seconds),
            "pairs_verified_per_second": dg.MetadataValue.float(todo.height / max(verify_seconds, 1e-9)),
        }
    else:
        pairs = pairs.with_columns(verification=pl.lit(None, pl.Float32), colour_residual=pl.lit(None, pl.Float32),
                                   verified=pl.lit(True), sha256_a=pl.lit(None, pl.String),
                                   sha256_b=pl.lit(None, pl.String), verify_version=pl.lit(None, pl.String))
        verify_meta["verified_pairs"] = pairs.height
    pairs = pairs.cast(PAIRS_SCHEMA).select(list(PAIRS_SCHEMA))
    storage.write_table("duplicate_pairs", pairs)
    seconds = time.perf_counter() - started
    only_one = int((pairs["n_clusterings"] == 1).sum()) if pairs.height else 0
    per = pl.DataFrame({"clustering": list(range(1, N_CLUSTERINGS + 1)), "pairs": per_clustering})
    return dg.MaterializeResult(metadata={
        **storage.table_metadata("duplicate_pairs", "dedup-recall"),
        "embeddings": n_embeddings, "encoder": encoder, "threshold": dg.MetadataValue.float(threshold),
        "candidate_pairs": pairs.height, "pairs_found_by_one_clustering_only": only_one, **verify_meta,
        "pairs_per_clustering": dg.MetadataValue.md(markdown_table(per)),
        "largest_cluster": stats.largest_cluster, **bucket_meta,
        "dot_products_vs_all_pairs": dg.MetadataValue.float(
            stats.dot_products / max(1, n_embeddings * (n_embeddings - 1) / 2)),
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
    nodes = pl.concat([pairs["uid_a"], pairs["uid_b"]]).unique().sort().to_frame("uid").with_row_index("node")
    a = pairs.select(pl.col("uid_a").alias("uid")).join(nodes, on="uid", how="left", maintain_order="left")["node"]
    b = pairs.select(pl.col("uid_b").alias("uid")).join(nodes, on="uid", how="left", maintain_order="left")["node"]
    groups = core.group_frame(nodes["uid"], core.connected_components(nodes.height, a.to_numpy().astype(np.int64),
                                                                      b.to_numpy().astype(np.int64)))
    samples = (storage.scan("samples").select("uid", "shard", "width", "height")
               .filter(pl.col("uid").is_in(groups["uid"].implode())).collect())
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
        hist = figure_markdown(fig, "group sizes", dpi=100)
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
    duplicate, singleton, rejected, not_embedded); partitioned by shard so per-shard readers prune. Built
    one shard at a time and written in one commit."""
    groups = storage.read("dedup_groups")
    totals: dict[str, int] = {}

    def frames():
        for shard in sorted(storage.shards("samples")):
            samples = storage.scan("samples", [shard]).select("uid", "shard", "status").collect()
            embedded = storage.scan("image_embeddings", [shard]).select("uid").collect()
            out = deduplicate(samples, embedded, groups.filter(pl.col("shard") == shard))
            for status, n in out.group_by("status").agg(pl.len()).iter_rows():
                totals[status] = totals.get(status, 0) + n
            totals["_kept"] = totals.get("_kept", 0) + int(out["kept"].sum())
            yield out

    rows = storage.write_table_streamed("deduplicated_samples", frames(), DEDUPLICATED_SCHEMA, partition_by=["shard"])
    ok = rows - totals.get("rejected", 0)
    removed = totals.get("duplicate", 0)
    return dg.MaterializeResult(metadata={
        **storage.table_metadata("deduplicated_samples", "dedup-recall"),
        "samples_in": rows, "rows_out": rows, "kept": totals.get("_kept", 0),
        "duplicates_removed": removed, "rejected": totals.get("rejected", 0),
        "not_embedded": totals.get("not_embedded", 0),
        "removed_fraction_of_ok": dg.MetadataValue.float(removed / ok if ok else 0.0),
    })


@dg.asset_check(asset=deduplicated_samples, blocking=True,
                description="Every row of samples appears exactly once, and every ok sample was embedded.")
def deduplicated_samples_account_for_every_sample(storage: DeltaStorage) -> dg.AssetCheckResult:
    duplicated_uids = missing = extra = not_embedded = rows = n_samples = 0
    for shard in sorted(set(storage.shards("samples")) | set(storage.shards("deduplicated_samples"))):
        out = storage.scan("deduplicated_samples", [shard]).select("uid", "status").collect()
        samples = storage.scan("samples", [shard]).select("uid").collect()
        rows, n_samples = rows + out.height, n_samples + samples.height
        duplicated_uids += out.height - out["uid"].n_unique()
        missing += samples.join(out, on="uid", how="anti").height
        extra += out.join(samples, on="uid", how="anti").height
        not_embedded += int((out["status"] == "not_embedded").sum())
    return dg.AssetCheckResult(
        passed=duplicated_uids == 0 and missing == 0 and extra == 0 and not_embedded == 0,
        description=(f"{rows} rows for {n_samples} samples; {duplicated_uids} repeated, {missing} missing, "
                     f"{extra} unknown, {not_embedded} ok samples without embeddings"),
        metadata={"repeated": duplicated_uids, "missing": missing, "unknown": extra, "not_embedded": not_embedded},
    )


@dg.asset_check(asset=duplicate_pairs, blocking=False,
                description="The k-means centroids still fit the data: it has not grown past twice its size at "
                            "the fit (beyond that clusters average over 2 x cluster_size and should be refitted).")
def centroids_fit_the_data(storage: DeltaStorage, settings: CurationSettings) -> dg.AssetCheckResult:
    cfg = dedup_settings(settings)
    table = current_centroids(storage)
    at_fit = int(table["n_embeddings"].min())
    now = int(storage.scan("image_embeddings").select(pl.len()).collect().item())
    mean_cluster = now / max(1, int(table["k"].min()))
    grown = now / max(1, at_fit)
    return dg.AssetCheckResult(
        passed=grown <= 2.0, severity=dg.AssetCheckSeverity.WARN,
        description=(f"{now} embeddings, {at_fit} when the centroids were fitted ({grown:.2f}x); mean cluster "
                     f"{mean_cluster:.0f} rows (target {cfg.cluster_size})"
                     + ("" if grown <= 2.0 else ": refit kmeans_centroids, then every shard of cluster_assignments")),
        metadata={"embeddings": now, "embeddings_at_fit": at_fit, "growth": dg.MetadataValue.float(grown),
                  "mean_cluster_size": dg.MetadataValue.float(mean_cluster)},
    )


defs = dg.Definitions(assets=[duplicate_pairs, dedup_groups, deduplicated_samples],
                      asset_checks=[deduplicated_samples_account_for_every_sample, centroids_fit_the_data])
