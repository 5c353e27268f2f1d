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


def _max_safety_score(storage: DeltaStorage, uids: pl.Series) -> pl.DataFrame | None:
    """uid, safety_score (the highest classifier score over categories) of ``uids``."""
    if not storage.exists("safety_scores"):
        return None
    scores = storage.scan("safety_scores")
    if "scorer" in scores.collect_schema().names():
        scores = scores.filter(pl.col("scorer") == "classifier")
    return (scores.filter(pl.col("uid").is_in(uids.implode())).group_by("uid")
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
    is the deduplicated set with weight 1. Partitioned by shard: a trainer can read shards independently.
    Built shard by shard: only the duplicate groups' members are held for the whole dataset (to pick each
    group's representative), and the weights are renormalised in a second pass."""
    order = dedup_settings(settings).representative_order
    filter_ran, weighted = storage.exists("filtered_samples"), storage.exists("sample_weights")
    groups = storage.read("dedup_groups", columns=["uid", "shard", "group_id", "width", "height"])
    members = groups["uid"]
    filtered_members = (storage.scan("filtered_samples").filter(pl.col("uid").is_in(members.implode()))
                        .select("uid", "kept").collect() if filter_ran else None)
    chosen = core.group_representatives(groups, filtered_members,
                                        _max_safety_score(storage, members) if filter_ran else None, order)

    def shard_verdicts(shard: str, kept_weight_mean: float | None) -> pl.DataFrame:
        return core.final_verdicts(
            storage.scan("samples", [shard]).select("uid", "shard", "status", "error").collect(),
            storage.scan("deduplicated_samples", [shard]).select("uid", "status").collect(),
            groups.filter(pl.col("shard") == shard),
            storage.scan("filtered_samples", [shard]).select("uid", "kept", "reasons").collect() if filter_ran else None,
            None, storage.scan("sample_weights", [shard]).select("uid", "weight").collect() if weighted else None,
            order, representatives=chosen, kept_weight_mean=kept_weight_mean)

    shards = sorted(storage.shards("samples"))
    raw_sum, raw_n = 0.0, 0
    for shard in shards:  # pass 1: the kept samples' raw weights, to renormalise them to mean 1 over the set
        kept = shard_verdicts(shard, 1.0).filter(pl.col("verdict") == "kept")
        raw_sum, raw_n = raw_sum + float(kept["weight"].sum()), raw_n + kept.height
    mean = raw_sum / raw_n if raw_n else 1.0
    counts: dict[str, int] = {}
    moments = {"n": 0, "w": 0.0, "w2": 0.0}

    def frames():
        for shard in shards:  # pass 2: the verdicts, written in one commit
            out = shard_verdicts(shard, mean)
            for verdict, n in out.group_by("verdict").len().iter_rows():
                counts[verdict] = counts.get(verdict, 0) + n
            w = out.filter(pl.col("verdict") == "kept")["weight"]
            moments["n"] += w.len()
            moments["w"] += float(w.sum())
            moments["w2"] += float((w ** 2).sum())
            yield out

    rows = storage.write_table_streamed(TRAINING_SET, frames(), core.TRAINING_SCHEMA, partition_by=["shard"])
    kept_n = moments["n"]
    ess = moments["w"] ** 2 / moments["w2"] if moments["w2"] else 0.0
    status = "filtered, deduplicated and reweighted" if filter_ran and weighted else (
        "filtered and deduplicated, weight 1 (sample_weights not materialised)" if filter_ran else
        "awaiting labels: deduplicated only, weight 1 (the safety filter has not run)")
    context.log.info(f"training set: {kept_n} of {rows} samples kept ({status})")
    return dg.MaterializeResult(metadata={
        **storage.table_metadata("training_set", "funnel"),
        "dagster/row_count": rows,
        "samples_in": rows,
        "kept": kept_n,
        **{f"verdict_{v}": int(counts.get(v, 0)) for v in core.VERDICTS},
        "kept_rate": dg.MetadataValue.float(kept_n / max(rows, 1)),
        "status": dg.MetadataValue.text(status),
        "filter_applied": filter_ran,
        "weights_applied": weighted,
        "effective_sample_size": dg.MetadataValue.float(ess),
        "table": dg.MetadataValue.path(str(storage.table_path(TRAINING_SET))),
    })


@dg.asset_check(asset=training_set, blocking=True,
                description="Every sample of samples appears exactly once; kept weights have mean 1.")
def training_set_accounts_for_every_sample(storage: DeltaStorage) -> dg.AssetCheckResult:
    rows = n_samples = repeated = missing = extra = kept_n = 0
    kept_sum = 0.0
    for shard in sorted(set(storage.shards("samples")) | set(storage.shards(TRAINING_SET))):
        out = storage.scan(TRAINING_SET, [shard]).select("uid", "verdict", "weight").collect()
        samples = storage.scan("samples", [shard]).select("uid").collect()
        rows, n_samples = rows + out.height, n_samples + samples.height
        repeated += out.height - out["uid"].n_unique()
        missing += samples.join(out, on="uid", how="anti").height
        extra += out.join(samples, on="uid", how="anti").height
        kept = out.filter(pl.col("verdict") == "kept")["weight"]
        kept_n, kept_sum = kept_n + kept.len(), kept_sum + float(kept.sum())
    mean = kept_sum / kept_n if kept_n else 1.0
    return dg.AssetCheckResult(
        passed=repeated == 0 and missing == 0 and extra == 0 and abs(mean - 1.0) < 1e-6,
        description=f"{rows} rows for {n_samples} samples; {repeated} repeated, {missing} missing, "
                    f"{extra} unknown; mean kept weight {mean:.6f}",
        metadata={"repeated": repeated, "missing": missing, "unknown": extra,
                  "mean_kept_weight": dg.MetadataValue.float(mean)},
    )


defs = dg.Definitions(assets=[training_set], asset_checks=[training_set_accounts_for_every_sample])
