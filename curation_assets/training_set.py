"""The training set: the one table a trainer reads, every sample once with its final verdict and weight.

It joins the three decisions the pipeline makes about a sample (ingest, safety filter, dedup) and the
reweighting, and resolves the one interaction between them: a duplicate group is represented by its best
member the safety filter keeps (:mod:`curation_assets.core.training_set`). Before labels exist the safety
filter has not run, and the training set is the deduplicated set with weight 1; its materialisation says so.
"""

import dagster as dg
import polars as pl

from curation_assets.core import training_set as core
from curation_assets.dedup_clusters import dedup_settings
from resources.settings import CurationSettings
from resources.storage import DeltaStorage

TRAINING_SET = "training_set"
ALL_SHARDS = dg.AllPartitionMapping()


def _max_safety_score(storage: DeltaStorage) -> pl.DataFrame | None:
    if not storage.exists("safety_scores"):
        return None
    scores = storage.scan("safety_scores")
    if "scorer" in scores.collect_schema().names():
        scores = scores.filter(pl.col("scorer") == "classifier")
    return (scores.group_by("uid")
            .agg(pl.col("score").cast(pl.Float64).max().alias("safety_score")).collect())


@dg.asset(
    deps=[dg.AssetDep("samples", partition_mapping=ALL_SHARDS), "deduplicated_samples", "dedup_groups",
          dg.AssetDep("filtered_samples", partition_mapping=ALL_SHARDS),
          dg.AssetDep("safety_scores", partition_mapping=ALL_SHARDS), "sample_weights"],
    group_name="training",
    kinds={"deltalake", "polars"},
)
def training_set(context: dg.AssetExecutionContext, storage: DeltaStorage,
                 settings: CurationSettings) -> dg.MaterializeResult:
    """Every sample of ``samples`` exactly once: ``verdict`` (kept, duplicate, filtered, rejected,
    not_embedded, pending), ``reason`` (the ingest error, the filter's categories, or which sample it
    duplicates), its duplicate group and, for kept samples, the reweighting ``weight`` renormalised to mean 1
    over this set. ``filter_applied`` is false until labels exist and the safety filter has run; then the set
    is the deduplicated set with weight 1. Partitioned by shard: a trainer can read shards independently."""
    order = dedup_settings(settings).representative_order
    samples = storage.scan("samples").select("uid", "shard", "status", "error").collect()
    filtered = storage.read("filtered_samples", columns=["uid", "kept", "reasons"]) \
        if storage.exists("filtered_samples") else None
    weights = storage.read("sample_weights", columns=["uid", "weight"]) if storage.exists("sample_weights") else None
    out = core.final_verdicts(
        samples, storage.read("deduplicated_samples", columns=["uid", "status"]),
        storage.read("dedup_groups", columns=["uid", "group_id", "width", "height"]),
        filtered, _max_safety_score(storage) if filtered is not None else None, weights, order)
    storage.write_table(TRAINING_SET, out, partition_by=["shard"])
    counts = dict(out.group_by("verdict").len().iter_rows())
    kept = out.filter(pl.col("verdict") == "kept")
    w = kept["weight"]
    ess = float(w.sum() ** 2 / (w**2).sum()) if kept.height else 0.0
    status = "filtered, deduplicated and reweighted" if filtered is not None and weights is not None else (
        "filtered and deduplicated, weight 1 (sample_weights not materialised)" if filtered is not None else
        "awaiting labels: deduplicated only, weight 1 (the safety filter has not run)")
    context.log.info(f"training set: {kept.height} of {out.height} samples kept ({status})")
    return dg.MaterializeResult(metadata={
        **storage.table_metadata("training_set", "funnel"),
        "dagster/row_count": out.height,
        "samples_in": samples.height,
        "kept": kept.height,
        **{f"verdict_{v}": int(counts.get(v, 0)) for v in core.VERDICTS},
        "kept_rate": dg.MetadataValue.float(kept.height / max(out.height, 1)),
        "status": dg.MetadataValue.text(status),
        "filter_applied": filtered is not None,
        "weights_applied": weights is not None,
        "effective_sample_size": dg.MetadataValue.float(ess),
        "table": dg.MetadataValue.path(str(storage.table_path(TRAINING_SET))),
    })


@dg.asset_check(asset=training_set, blocking=True,
                description="Every sample of samples appears exactly once; kept weights have mean 1.")
def training_set_accounts_for_every_sample(storage: DeltaStorage) -> dg.AssetCheckResult:
    out = storage.scan(TRAINING_SET).select("uid", "verdict", "weight").collect()
    samples = storage.scan("samples").select("uid").collect()
    repeated = out.height - out["uid"].n_unique()
    missing = samples.join(out, on="uid", how="anti").height
    extra = out.join(samples, on="uid", how="anti").height
    kept = out.filter(pl.col("verdict") == "kept")["weight"]
    mean = float(kept.mean()) if kept.len() else 1.0
    return dg.AssetCheckResult(
        passed=repeated == 0 and missing == 0 and extra == 0 and abs(mean - 1.0) < 1e-6,
        description=f"{out.height} rows for {samples.height} samples; {repeated} repeated, {missing} missing, "
                    f"{extra} unknown; mean kept weight {mean:.6f}",
        metadata={"repeated": repeated, "missing": missing, "unknown": extra,
                  "mean_kept_weight": dg.MetadataValue.float(mean)},
    )


defs = dg.Definitions(assets=[training_set], asset_checks=[training_set_accounts_for_every_sample])
