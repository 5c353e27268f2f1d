"""The final verdict of every sample: what a trainer reads.

Each sample of ``samples`` gets exactly one verdict, decided in this order:

- ``rejected``: failed ingest (``reason`` holds the ingest error);
- ``not_embedded``: accepted at ingest but has no embedding (an upstream gap, never trained on);
- ``filtered``: the safety filter removed it (``reason`` lists the categories);
- ``duplicate``: another member of its duplicate group is kept (``representative_uid`` names it);
- ``pending``: its shard arrived after the last dedup or filter run (``reason`` says which); not trained on
  until the next refresh;
- ``kept``: everything else, with a training ``weight``.

Within a duplicate group the representative is chosen among the members the filter keeps, by the dedup
stage's representative order (safety keys included), so a group disappears only when every member is
filtered. Weights come from the reweighting stage and are renormalised to mean 1 over the kept rows; samples
without a weight (before labels exist, or shards not reweighted yet) count 1.
"""

from __future__ import annotations

from typing import Sequence

import polars as pl

from curation_assets.core.dedup import choose_representatives

VERDICTS = ("kept", "duplicate", "filtered", "rejected", "not_embedded", "pending")

TRAINING_SCHEMA = {
    "uid": pl.String, "shard": pl.String, "verdict": pl.String, "reason": pl.String, "group_id": pl.String,
    "representative_uid": pl.String, "weight": pl.Float64, "filter_applied": pl.Boolean,
}


def group_representatives(groups: pl.DataFrame, filtered: pl.DataFrame | None, safety: pl.DataFrame | None,
                          order: Sequence[str]) -> pl.DataFrame:
    """``group_id, representative_uid``: each duplicate group's best member among those the safety filter
    keeps (by ``order``); groups whose every member is filtered have none. ``groups``: uid, group_id, width,
    height of every member; ``filtered``: uid, kept of (at least) the members, or None before the filter;
    ``safety``: uid, safety_score of (at least) the members, or None."""
    members = groups.select("uid", "group_id", "width", "height")
    if filtered is not None:
        members = members.join(filtered.select("uid", pl.col("kept").alias("filter_kept")), on="uid", how="left")
    else:
        members = members.with_columns(filter_kept=pl.lit(True))
    eligible = members.filter(pl.col("filter_kept").fill_null(False))
    if safety is not None:
        eligible = eligible.join(safety.select("uid", "safety_score"), on="uid", how="left")
    return (choose_representatives(eligible, order).filter(pl.col("is_representative"))
            .select("group_id", pl.col("uid").alias("representative_uid")))


def final_verdicts(samples: pl.DataFrame, deduplicated: pl.DataFrame, groups: pl.DataFrame,
                   filtered: pl.DataFrame | None, safety: pl.DataFrame | None, weights: pl.DataFrame | None,
                   order: Sequence[str], representatives: pl.DataFrame | None = None,
                   kept_weight_mean: float | None = None) -> pl.DataFrame:
    """One row per sample (schema :data:`TRAINING_SCHEMA`).

    ``samples``: uid, shard, status, error. ``deduplicated``: uid, status (the dedup fate). ``groups``: uid,
    group_id, width, height of every member of a duplicate group. ``filtered``: uid, kept, reasons, or None
    before the filter exists. ``safety``: uid, safety_score (max over categories) or None. ``weights``: uid,
    weight or None. ``order``: the representative policy keys. For a part of the data (one shard at a
    time), pass the dataset's ``representatives`` (:func:`group_representatives`) and the mean raw weight of
    its kept samples (``kept_weight_mean``); otherwise both are computed from these frames."""
    base = (samples.select("uid", "shard", "status", "error")
            .join(deduplicated.select("uid", pl.col("status").alias("fate")), on="uid", how="left"))
    applied = filtered is not None
    if applied:
        base = base.join(filtered.select("uid", pl.col("kept").alias("filter_kept"), "reasons"), on="uid", how="left")
    else:
        base = base.with_columns(filter_kept=pl.lit(True), reasons=pl.lit(None, pl.List(pl.String)))
    chosen = representatives if representatives is not None else group_representatives(
        groups, base.select("uid", pl.col("filter_kept").alias("kept")) if applied else None, safety, order)
    grouped = groups.select("uid", "group_id").join(chosen, on="group_id", how="left")
    out = base.join(grouped, on="uid", how="left")
    verdict = (pl.when(pl.col("status") != "ok").then(pl.lit("rejected"))
               .when(pl.col("fate").is_null() | pl.col("filter_kept").is_null()).then(pl.lit("pending"))
               .when(pl.col("fate") == "not_embedded").then(pl.lit("not_embedded"))
               .when(~pl.col("filter_kept")).then(pl.lit("filtered"))
               .when(pl.col("group_id").is_not_null() & (pl.col("representative_uid") != pl.col("uid")))
               .then(pl.lit("duplicate"))
               .otherwise(pl.lit("kept")))
    out = out.with_columns(verdict.alias("verdict"))
    reason = (pl.when(pl.col("verdict") == "rejected").then(pl.col("error"))
              .when(pl.col("verdict") == "filtered").then(pl.col("reasons").list.join(","))
              .when(pl.col("verdict") == "duplicate").then(pl.lit("duplicate of ") + pl.col("representative_uid"))
              .when(pl.col("verdict") == "not_embedded").then(pl.lit("accepted at ingest but not embedded"))
              .when(pl.col("fate").is_null()).then(pl.lit("not deduplicated yet"))
              .when(pl.col("verdict") == "pending").then(pl.lit("not filtered yet")))
    out = out.with_columns(reason.alias("reason"),
                           pl.when(pl.col("verdict") == "duplicate").then(pl.col("representative_uid"))
                           .alias("representative_uid"),
                           pl.when(pl.col("verdict").is_in(["kept", "duplicate", "filtered"])).then(pl.col("group_id"))
                           .alias("group_id"))
    if weights is not None:
        out = out.join(weights.select("uid", pl.col("weight").alias("raw_weight")), on="uid", how="left")
    else:
        out = out.with_columns(raw_weight=pl.lit(None, pl.Float64))
    kept = pl.col("verdict") == "kept"
    raw = pl.col("raw_weight").fill_null(1.0)
    mean = pl.lit(kept_weight_mean) if kept_weight_mean is not None else raw.filter(kept).mean()
    out = out.with_columns(
        pl.when(kept).then(raw / mean).alias("weight"),
        pl.lit(applied).alias("filter_applied"),
    )
    return out.select(list(TRAINING_SCHEMA)).cast(TRAINING_SCHEMA).sort("uid")
