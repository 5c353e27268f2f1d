"""The safety filter: thresholds chosen for recall, per-shard scores, and the filtered set.

- ``safety_thresholds``: per category the highest threshold whose held-out recall on the labelled positives
  meets the target; a blocking check stops the filter when the labels cannot support the target.
- ``safety_scores`` (per shard): every embedded sample's calibrated score per category.
- ``filtered_samples`` (per shard): every sample of ``samples`` once, kept or not, with the reasons
  ("violence", "sexual", "rejected", "no_embedding").
"""


from typing import Sequence

import dagster as dg
import numpy as np
import polars as pl

from curation_assets.core import labels as labels_core
from curation_assets.core.plots import figure_markdown, figure_row
from curation_assets.core.plots import markdown_table
from curation_assets.core.safety import (
    ProbeBank,
)
from curation_assets.core.thresholds import recall_threshold
from curation_assets.partitions import partition_keys, shard_asset
from curation_assets.safety import classifiers_trained, load_classifiers, load_oof
from curation_assets.safety_labels import (AWAITING, GROUP, LABELS, NEXT_STEP, awaiting_message, awaiting_result,
                                           label_readiness, labels_in_force, safety_config)
from resources.compute import ComputeResource
from resources.settings import CurationSettings
from resources.storage import DeltaStorage
from curation_assets.core.safety import Category, PRIORS


@dg.asset(group_name=GROUP, deps=["safety_classifiers"], kinds={"delta"})
def safety_thresholds(context: dg.AssetExecutionContext, storage: DeltaStorage,
                      settings: CurationSettings) -> dg.MaterializeResult:
    """Per category the highest score threshold whose held-out (cross-validated) recall on the labelled
    positives meets the target recall, the Wilson interval of that recall, and the precision it costs.
    ``reachable`` is false when the labels hold too few positives to show the target (see the check)."""
    cfg = safety_config(settings)
    if not classifiers_trained(storage):
        return awaiting_result(label_readiness(storage, cfg), "safety_thresholds")
    _, manifest, directory = load_classifiers(storage)
    oof = load_oof(directory)
    rows = []
    for category in cfg.categories:
        part = oof.filter(pl.col("category") == category.name)
        if part.height == 0:
            raise dg.Failure(f"classifier version {directory.name} has no {category.name!r} model: "
                             "re-materialise safety_classifiers")
        s, y = part["cv_score"].to_numpy(), part["label"].to_numpy()
        result = recall_threshold(s[y == 1], s[y == 0], category.target_recall, category.required_positives,
                                  cfg.confidence)
        rows.append({"category": category.name, **result.as_dict(), "confidence": cfg.confidence,
                     "classifier_version": directory.name, "computed_at": labels_core.utcnow()})
        context.log.info(f"{category.name}: {result.message}")
    table = pl.DataFrame(rows).with_columns(pl.col("positives_needed_for_bound").cast(pl.Int64))
    storage.write_table("safety_thresholds", table)
    shown = table.select("category", "threshold", "target_recall", "recall", "recall_low", "precision",
                         "n_positive", "reachable", "positives_needed")
    return dg.MaterializeResult(metadata={
        **storage.table_metadata("safety_thresholds", "safety-thresholds"),
        "classifier_version": directory.name,
        "thresholds": dg.MetadataValue.md(markdown_table(shown)),
        **{f"{r['category']}_threshold": dg.MetadataValue.float(float(r["threshold"])) for r in rows},
        **{f"{r['category']}_precision": dg.MetadataValue.float(float(r["precision"])) for r in rows},
    })


def read_thresholds(storage: DeltaStorage) -> pl.DataFrame:
    if not storage.exists("safety_thresholds"):
        raise FileNotFoundError("no safety_thresholds yet: materialise safety_classifiers and safety_thresholds")
    return storage.read("safety_thresholds")


def _awaiting_check(storage: DeltaStorage, settings: CurationSettings) -> dg.AssetCheckResult:
    """Before the first classifier: a warning (never blocking) that says how many labels are missing."""
    readiness = label_readiness(storage, safety_config(settings))
    return dg.AssetCheckResult(
        passed=False, severity=dg.AssetCheckSeverity.WARN,
        description="awaiting labels: " + (awaiting_message(readiness) or "train safety_classifiers"),
        metadata={"status": AWAITING, "labels_needed": dg.MetadataValue.md(markdown_table(readiness)),
                  "next_step": NEXT_STEP})


@dg.asset_check(asset=safety_thresholds, blocking=True,
                description="Every category's target recall is reachable with the labelled positives available.")
def safety_target_recall_reachable(storage: DeltaStorage, settings: CurationSettings) -> dg.AssetCheckResult:
    if not storage.exists("safety_thresholds"):
        return _awaiting_check(storage, settings)
    table = read_thresholds(storage)
    failing = table.filter(~pl.col("reachable"))
    return dg.AssetCheckResult(
        passed=failing.height == 0,
        description=("; ".join(f"{r['category']}: {r['message']}" for r in failing.iter_rows(named=True))
                     or "every category's target recall is met on held-out labels"),
        metadata={
            "positives_needed": dg.MetadataValue.json(dict(zip(table["category"], table["positives_needed"]))),
            "n_positive": dg.MetadataValue.json(dict(zip(table["category"], table["n_positive"]))),
        },
    )


@dg.asset_check(asset=safety_thresholds,
                description="The Wilson lower bound of each category's held-out recall reaches the target (warning).")
def safety_recall_lower_bound(storage: DeltaStorage, settings: CurationSettings) -> dg.AssetCheckResult:
    if not storage.exists("safety_thresholds"):
        return _awaiting_check(storage, settings)
    table = read_thresholds(storage)
    short = table.filter(pl.col("recall_low") < pl.col("target_recall"))
    return dg.AssetCheckResult(
        passed=short.height == 0,
        severity=dg.AssetCheckSeverity.WARN,
        description="; ".join(
            f"{r['category']}: lower bound {r['recall_low']:.4f} < {r['target_recall']}; "
            + (f"{r['positives_needed_for_bound']} more positives, all caught, would lift it"
               if r["positives_needed_for_bound"] is not None else "more positives alone cannot lift it")
            for r in short.iter_rows(named=True)) or "every lower bound reaches its target",
        metadata={"recall_low": dg.MetadataValue.json(dict(zip(table["category"], table["recall_low"])))},
    )


SCORES_SCHEMA = {"uid": pl.String, "shard": pl.String, "category": pl.String, "score": pl.Float32,
                 "held_out": pl.Boolean, "threshold": pl.Float64, "flagged": pl.Boolean, "classifier_version": pl.String,
                 "scorer": pl.String}
CLASSIFIER = "classifier"


def prior_scores(storage: DeltaStorage, shard: str, categories: Sequence[Category]) -> pl.DataFrame:
    """Rows of ``safety_scores`` from each category's pretrained prior (``scorer`` = ``prior:<name>``), for the
    images of the shard ``image_attributes`` measured. ``flagged`` only where ``prior_threshold`` is set."""
    with_prior = [c for c in categories if c.prior]
    if not with_prior or not storage.exists("image_attributes"):
        return pl.DataFrame(schema=SCORES_SCHEMA)
    measured = storage.scan("image_attributes", [shard]).collect()
    frames = []
    for category in with_prior:
        column = PRIORS[category.prior]
        rows = measured.filter(pl.col(column).is_not_null())
        threshold = category.prior_threshold
        frames.append(rows.select(
            "uid", "shard", pl.lit(category.name).alias("category"), pl.col(column).cast(pl.Float32).alias("score"),
            pl.lit(False).alias("held_out"), pl.lit(threshold, dtype=pl.Float64).alias("threshold"),
            ((pl.col(column) >= threshold) if threshold is not None else pl.lit(False)).alias("flagged"),
            pl.col("nsfw_model").alias("classifier_version"), pl.lit(f"prior:{category.prior}").alias("scorer"),
        ).cast(SCORES_SCHEMA))
    return pl.concat(frames) if frames else pl.DataFrame(schema=SCORES_SCHEMA)


def _histograms(frames: dict[str, np.ndarray], thresholds: dict[str, float]) -> str:
    fig, axes = figure_row(len(frames))
    for ax, (name, scores) in zip(axes, frames.items()):
        ax.hist(scores, bins=50, range=(0, 1), color="tab:blue", alpha=0.8)
        ax.axvline(thresholds[name], color="red", ls="--", lw=1, label=f"threshold {thresholds[name]:.3g}")
        ax.set_yscale("log")
        ax.set_title(f"{name}: {np.mean(scores >= thresholds[name]):.1%} flagged")
        ax.set_xlabel("calibrated score")
        ax.legend(fontsize=8)
    return figure_markdown(fig)


def score_shard(shard: str, storage: DeltaStorage, bank: ProbeBank, encoder: str | None, held_out: pl.DataFrame,
                thr: dict[str, float], version: str, categories) -> tuple[list[pl.DataFrame], pl.DataFrame, int, str | None]:
    """One shard's ``safety_scores`` (a task of its own on Ray): a frame per category, the prior rows, the
    sample count, and an error when its embeddings come from another encoder than the classifiers'."""
    ids, X = storage.load_embeddings([shard])
    encoders = ids["encoder"].unique().to_list()
    if encoder and encoders and encoders != [encoder]:
        return [], pl.DataFrame(), len(ids), (f"shard {shard} embeddings come from {encoders}, classifiers {version} "
                                              f"from {encoder!r}: re-train on the current embeddings")
    P = bank.predict_proba(X) if len(ids) else np.zeros((0, len(bank.categories)), np.float32)
    # a held-out score belongs to the picture it was computed on: not to another picture at the same uid
    same_picture = (held_out.join(storage.read("samples", [shard], columns=["uid", "sha256"]), on="uid")
                    .filter(pl.col("held_out_sha256").is_null() | (pl.col("held_out_sha256") == pl.col("sha256")))
                    .select("uid", "category", "cv_score"))
    frames = []
    for j, name in enumerate(bank.categories):
        frame = pl.DataFrame({
            "uid": ids["uid"], "shard": ids["shard"], "category": pl.Series([name] * len(ids), dtype=pl.String),
            "score": pl.Series(P[:, j], dtype=pl.Float32),
        })
        # a sample the model was trained on is judged by its held-out score: the in-sample score leans
        # towards its label, and a wrong 'clean' label would otherwise hide a positive from the filter
        frame = (frame.join(same_picture.filter(pl.col("category") == name).drop("category"), on="uid", how="left")
                 .with_columns(pl.col("cv_score").is_not_null().alias("held_out"),
                               pl.coalesce(pl.col("cv_score").cast(pl.Float32), pl.col("score")).alias("score"))
                 .drop("cv_score"))
        frames.append(frame.with_columns(
            pl.lit(thr[name], dtype=pl.Float64).alias("threshold"),
            (pl.col("score") >= thr[name]).alias("flagged"),
            pl.lit(version, dtype=pl.String).alias("classifier_version"),
            pl.lit(CLASSIFIER).alias("scorer"),
        ).select(list(SCORES_SCHEMA)).cast(SCORES_SCHEMA))
    return frames, prior_scores(storage, shard, categories), len(ids), None


@shard_asset(
    group_name=GROUP,
    deps=["image_embeddings", "safety_classifiers", "safety_thresholds"],
    kinds={"numpy", "delta"},
)
def safety_scores(context: dg.AssetExecutionContext, storage: DeltaStorage,
                  settings: CurationSettings, compute: ComputeResource) -> dg.MaterializeResult:
    """Calibrated score of every embedded sample for every category, with the threshold it was judged by and
    whether it is flagged (score >= threshold). Long format: one row per (uid, category). The classifier
    version is the one the thresholds were chosen for; it is loaded once per step. Samples the classifier was
    trained on carry their cross-validated (held-out) score instead (``held_out`` true), the same kind of
    score the threshold was chosen on. ``scorer`` is ``classifier``; a category with a pretrained prior also
    gets ``prior:<name>`` rows for the images ``image_attributes`` measured, to compare with the classifier.
    Before the first thresholds exist it writes nothing and says it is awaiting labels."""
    if not storage.exists("safety_thresholds"):
        return awaiting_result(label_readiness(storage, safety_config(settings)), "safety_scores")
    cfg = safety_config(settings)
    thresholds = read_thresholds(storage)
    version = thresholds["classifier_version"][0]
    probes, manifest, directory = load_classifiers(storage, version)
    bank = ProbeBank(probes)
    held_out = load_oof(directory)
    if "sha256" not in held_out.columns:  # classifiers trained before the picture's hash was kept
        held_out = held_out.with_columns(pl.lit(None, pl.String).alias("sha256"))
    held_out = held_out.select("uid", "category", "cv_score", pl.col("sha256").alias("held_out_sha256"))
    thr = dict(zip(thresholds["category"], thresholds["threshold"]))
    missing = [c for c in bank.categories if c not in thr]
    if missing:
        raise dg.Failure(f"no thresholds for {missing}: re-materialise safety_thresholds")
    all_scores = {c: [] for c in bank.categories}
    total = priors = 0
    shards = partition_keys(context)
    scored = compute.map(score_shard, shards, "safety_scores", storage, bank, manifest.get("encoder"), held_out, thr,
                         version, cfg.categories)
    for shard, (frames, prior, n, error) in zip(shards, scored):
        if error:
            raise dg.Failure(error)
        for name, frame in zip(bank.categories, frames):
            all_scores[name].append(frame["score"].to_numpy())
        priors += prior.height
        storage.write_shard("safety_scores", pl.concat([*frames, prior]), shard)
        total += n
        context.log.info(f"shard {shard}: scored {n} samples ({compute.describe()})")
    merged = {c: np.concatenate(v) if v else np.zeros(0) for c, v in all_scores.items()}
    rates = {c: float(np.mean(s >= thr[c])) if len(s) else 0.0 for c, s in merged.items()}
    return dg.MaterializeResult(metadata={
        **storage.table_metadata("safety_scores", "safety-thresholds"),
        "samples_scored": total,
        "prior_rows": priors,
        "classifier_version": version,
        **{f"{c}_flag_rate": dg.MetadataValue.float(r) for c, r in rates.items()},
        "score_histograms": dg.MetadataValue.md(_histograms(merged, thr)) if total else "no samples",
    })


FILTERED_SCHEMA = {"uid": pl.String, "shard": pl.String, "kept": pl.Boolean, "reasons": pl.List(pl.String)}


def filter_shard(samples: pl.DataFrame, scores: pl.DataFrame, current: pl.DataFrame, categories: Sequence[str],
                 trust_negative_labels: bool = False) -> pl.DataFrame:
    """The filter decision for one shard's samples: every row of ``samples`` exactly once.

    Reasons: "rejected" (failed ingest), "no_embedding" (ok but never scored), and each category whose
    classifier flags the sample or whose latest human label is positive (a prior flags only where its
    ``prior_threshold`` is configured). A human negative label clears the classifier's flag only with
    ``trust_negative_labels``. A sample is kept when it has no reason.
    """
    base = samples.select("uid", "shard", "status")
    flagged = (scores.filter(pl.col("category").is_in(list(categories)))
               .group_by("uid", "category").agg(pl.col("flagged").any()))
    labelled = current.filter(pl.col("category").is_in(list(categories))).select("uid", "category", "label")
    decisions = flagged.join(labelled, on=["uid", "category"], how="full", coalesce=True)
    positive = pl.col("flagged").fill_null(False) | (pl.col("label") == 1).fill_null(False)
    if trust_negative_labels:
        positive = pl.when(pl.col("label").is_not_null()).then(pl.col("label") == 1).otherwise(
            pl.col("flagged").fill_null(False))
    reasons = (decisions.filter(positive).sort("category")
               .group_by("uid").agg(pl.col("category").alias("category_reasons")))
    classifier = scores.filter(pl.col("scorer") == CLASSIFIER) if "scorer" in scores.columns else scores
    scored = classifier.select("uid").unique()
    out = (base.join(reasons, on="uid", how="left")
           .join(scored.with_columns(pl.lit(True).alias("scored")), on="uid", how="left")
           .with_columns(
               pl.when(pl.col("status") != "ok").then(pl.lit(["rejected"]))
               .when(pl.col("scored").is_null()).then(pl.lit(["no_embedding"]))
               .otherwise(pl.col("category_reasons").fill_null(pl.lit([], dtype=pl.List(pl.String))))
               .alias("reasons"))
           .with_columns((pl.col("reasons").list.len() == 0).alias("kept")))
    return out.select(list(FILTERED_SCHEMA)).cast(FILTERED_SCHEMA)


@shard_asset(
    group_name=GROUP,
    deps=["samples", "safety_scores", LABELS],
    kinds={"delta"},
)
def filtered_samples(context: dg.AssetExecutionContext, storage: DeltaStorage,
                     settings: CurationSettings) -> dg.MaterializeResult:
    """Every sample of ``samples`` exactly once: ``kept`` or not, and why (``reasons``: the categories the
    filter or a human flagged, or "rejected" at ingest). Counts reconcile with ``samples`` per shard.
    Before the first safety scores exist it writes nothing and says it is awaiting labels."""
    cfg = safety_config(settings)
    if not storage.exists("safety_scores"):
        return awaiting_result(label_readiness(storage, cfg), "filtered_samples")
    current = labels_in_force(storage)[0]
    written = storage.scan("safety_scores").collect_schema().names()  # tables from before priors lack scorer
    score_columns = ["uid", "category", "flagged"] + (["scorer"] if "scorer" in written else [])
    totals = {"samples": 0, "kept": 0}
    reason_counts: dict[str, int] = {}
    for shard in partition_keys(context):
        samples = storage.read("samples", [shard], columns=["uid", "shard", "status"])
        scores = storage.read("safety_scores", [shard], columns=score_columns)
        out = filter_shard(samples, scores, current.filter(pl.col("uid").str.starts_with(f"{shard}/")),
                           cfg.names, cfg.trust_negative_labels)
        if out.height != samples.height or out["uid"].n_unique() != samples["uid"].n_unique():
            raise dg.Failure(f"shard {shard}: filtered_samples has {out.height} rows for {samples.height} samples")
        storage.write_shard("filtered_samples", out, shard)
        totals["samples"] += samples.height
        totals["kept"] += int(out["kept"].sum())
        for reason, n in out["reasons"].explode().drop_nulls().value_counts().iter_rows():
            reason_counts[reason] = reason_counts.get(reason, 0) + n
        context.log.info(f"shard {shard}: kept {int(out['kept'].sum())} of {samples.height}")
    n = max(totals["samples"], 1)
    return dg.MaterializeResult(metadata={
        **storage.table_metadata("filtered_samples", "funnel"),
        "samples_in": totals["samples"],
        "kept": totals["kept"],
        "removed": totals["samples"] - totals["kept"],
        "kept_rate": dg.MetadataValue.float(totals["kept"] / n),
        "reasons": dg.MetadataValue.json(reason_counts),
        **{f"{c}_removal_rate": dg.MetadataValue.float(reason_counts.get(c, 0) / n) for c in cfg.names},
        "reconciles_with_samples": True,
    })


defs = dg.Definitions(
    assets=[safety_thresholds, safety_scores, filtered_samples],
    asset_checks=[safety_target_recall_reachable, safety_recall_lower_bound],
)
