"""``dedup_recall``: exact (brute-force) search on a random sample measures the fraction of true pairs the
clustered search finds with 1..5 clusterings; a check warns when recall with all five falls below the target."""

import time

import dagster as dg
import numpy as np
import polars as pl

from curation_assets.core import dedup as core
from curation_assets.core.plots import figure_markdown, markdown_table, pyplot
from curation_assets.dedup_clusters import GROUP, dedup_settings, encoder_name
from curation_assets.partitions import N_CLUSTERINGS
from resources.settings import CurationSettings
from resources.storage import DeltaStorage
from resources.vector_search import VectorSearch


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
    intervals and the mean over all subsets of c clusterings. The embeddings are streamed shard by shard
    (twice: once for the sample's vectors, once to search them), so memory holds the sample and one shard."""
    cfg = dedup_settings(settings)
    shards = sorted(storage.shards("image_embeddings"))
    started = time.perf_counter()
    pairs = storage.read("duplicate_pairs", columns=["uid_a", "uid_b", "clusterings"])
    needed = pl.concat([pairs["uid_a"], pairs["uid_b"]]).unique()
    n, encoders, xq, queries, row = _sample_vectors(storage, shards, cfg.recall_sample_size, cfg.recall_seed, needed)
    encoder = encoder_name(pl.DataFrame({"encoder": encoders}, schema={"encoder": pl.String}))
    threshold = cfg.resolve_threshold(encoder)
    # on the GPU through a flat index per shard; on the CPU straight on the shard's matrix
    search = (lambda q, xb, thr: vector_search.flat_index(xb).range_search(q, thr)) if vector_search.use_gpu() else None
    true_a, true_b, _ = core.exact_pairs_streamed(xq, queries, _blocks(storage, shards), threshold, n,
                                                  range_search=search)
    exact_seconds = time.perf_counter() - started
    mapped = (pairs.join(row.rename({"uid": "uid_a", "row": "ra"}), on="uid_a")
                   .join(row.rename({"uid": "uid_b", "row": "rb"}), on="uid_b"))
    fa = np.minimum(mapped["ra"].to_numpy(), mapped["rb"].to_numpy())
    fb = np.maximum(mapped["ra"].to_numpy(), mapped["rb"].to_numpy())
    fmask = np.array([sum(1 << (c - 1) for c in cs) for cs in mapped["clusterings"].to_list()], dtype=np.uint8)
    curve = core.recall_curve(true_a, true_b, fa, fb, fmask, n, N_CLUSTERINGS)
    table = pl.DataFrame([r.__dict__ for r in curve]).with_columns(
        pl.lit(len(queries)).alias("sample_size"), pl.lit(n).alias("n_embeddings"),
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
        "recall_curve": dg.MetadataValue.md(figure_markdown(fig, "recall vs clusterings", dpi=100)),
        "exact_search_seconds": dg.MetadataValue.float(exact_seconds),
    })


def _sample_vectors(storage: DeltaStorage, shards: list[str], size: int, seed: int, needed: pl.Series
                    ) -> tuple[int, list[str], np.ndarray, np.ndarray, pl.DataFrame]:
    """Reading one shard at a time: the number of embeddings, their encoders, the sampled query rows' vectors,
    the query rows (row numbers in shard order, as the search sees them) and the row number of each uid in
    ``needed`` (the uids of the found pairs); nothing is held for all N."""
    counts = dict(storage.scan("image_embeddings").group_by("shard").agg(pl.len()).collect().iter_rows())
    n = sum(counts.get(s, 0) for s in shards)
    queries = core.sample_queries(n, size, seed)
    vectors, rows, encoders, offset = [], [], set(), 0
    for shard in shards:
        ids, xs = storage.load_embeddings([shard])
        local = queries[(queries >= offset) & (queries < offset + len(ids))] - offset
        vectors.append(xs[local])
        encoders |= set(ids["encoder"].unique().to_list())
        rows.append(ids.select("uid").with_row_index("row", offset=offset)
                    .filter(pl.col("uid").is_in(needed.implode())))
        offset += len(ids)
    if offset != n:
        raise dg.Failure(f"image_embeddings changed while dedup_recall read it ({n} rows counted, {offset} read): "
                         "re-materialise dedup_recall")
    dim = vectors[0].shape[1] if vectors else 0
    row = (pl.concat(rows) if rows else pl.DataFrame(schema={"row": pl.UInt32, "uid": pl.String})).select(
        "uid", pl.col("row").cast(pl.Int64))
    return n, sorted(encoders), (np.concatenate(vectors) if vectors else np.zeros((0, dim), np.float32)), queries, row


def _blocks(storage: DeltaStorage, shards: list[str]):
    offset = 0
    for shard in shards:
        _, xs = storage.load_embeddings([shard])
        yield offset, xs
        offset += len(xs)


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


defs = dg.Definitions(assets=[dedup_recall], asset_checks=[dedup_recall_meets_target])
