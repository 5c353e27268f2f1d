"""The safety stage: classifiers from few labels, active learning, a recall-first threshold, the filtered set.

The first DALL·E 2 pre-training mitigation. Per configured category (violence and sexual by default):

- ``labels`` (external, append-only): human judgements imported with ``curate labels import``.
- ``safety_classifiers``: a calibrated linear probe on the image embeddings of the labelled samples, with
  k-fold cross-validation; a new versioned artefact per materialisation; every materialisation records an
  active-learning round (labels used, CV AUC, precision at the target recall) in ``active_learning_rounds``.
- ``labeling_queue``: the next batch to label, from the model's flags at its high-recall threshold, the
  nearest unlabelled neighbours of positives the CV models miss, and the most uncertain samples.
- ``safety_thresholds``: the highest threshold whose held-out recall meets the target; a blocking check
  stops the filter when the labels cannot support the target.
- ``safety_scores`` and ``filtered_samples`` per shard: every sample of ``samples`` once, kept or not, with
  the reasons ("violence", "sexual", "rejected", "no_embedding").
"""


import math
from pathlib import Path
from typing import Sequence

import dagster as dg
import numpy as np
import polars as pl

from curation_assets.core.plots import figure_png, markdown_image, markdown_table, pyplot
from curation_assets.core import labels as labels_core
from curation_assets.core.safety import (
    CrossValidation,
    LinearProbe,
    ProbeBank,
    SafetyConfig,
    latest_version,
    load_bank,
    next_version,
    publish_latest,
    save_bank,
    train_probe,
)
from curation_assets.core.thresholds import precision_at_recall, recall_threshold
from curation_assets.partitions import partition_keys, shard_asset
from resources.settings import CurationSettings
from resources.storage import DeltaStorage

GROUP = "safety"
LABELS = "labels"
ROUNDS = "active_learning_rounds"
ALL_SHARDS = dg.AllPartitionMapping()


def safety_config(settings: CurationSettings) -> SafetyConfig:
    """The validated ``safety`` section (raises SafetyConfigError naming the bad key)."""
    return SafetyConfig.from_section(settings.section("safety"))


# ------------------------------------------------------------------------------------------- labels


labels_asset = dg.AssetSpec(
    LABELS,
    group_name=GROUP,
    kinds={"delta"},
    metadata={"dagster/column_schema": dg.TableSchema(columns=[
        dg.TableColumn(name, str(dtype)) for name, dtype in labels_core.LABELS_SCHEMA.items()])},
    description=(
        "Human labels for the safety categories: an append-only Delta log (uid, category, label, source, round, "
        "annotator, labeled_at). Written by `curate labels import FILE.csv` (and the demo's simulated "
        "annotator), never by a run; the label in force for a (uid, category) is the latest."
    ),
)


def read_label_history(storage: DeltaStorage) -> pl.DataFrame:
    """Every label ever recorded (empty with the right schema before the first import)."""
    if not storage.exists(LABELS):
        return labels_core.empty_labels()
    history = storage.read(LABELS)
    if "sha256" not in history.columns:  # labels imported before the picture's hash was recorded
        history = history.with_columns(pl.lit(None, pl.String).alias("sha256"))
    return history.select(list(labels_core.LABELS_SCHEMA)).cast(labels_core.LABELS_SCHEMA)


def labels_in_force(storage: DeltaStorage) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(labels in force, stale labels): the latest label per (uid, category), split by whether the picture
    it judged is still the one at that uid (:func:`core.labels.split_stale`). Stale labels are never used."""
    current = labels_core.current_labels(read_label_history(storage))
    if current.height == 0 or not storage.exists("samples"):
        return current, current.clear()
    samples = (storage.scan("samples").select("uid", "sha256")
               .filter(pl.col("uid").is_in(current["uid"].unique().implode())).collect())
    return labels_core.split_stale(current, samples)


def import_label_rows(storage: DeltaStorage, cfg: SafetyConfig, rows: Sequence[dict], *, skip_invalid: bool = False,
                      default_source: str = "import", default_annotator: str = "unknown",
                      default_round: int | None = None) -> labels_core.ImportReport:
    """Validate label rows against ``samples`` and the configured categories and append the valid ones.

    With any invalid row nothing is written unless ``skip_invalid`` (then the valid rows are written and the
    invalid ones are still reported)."""
    if not storage.exists("samples"):
        raise FileNotFoundError("no samples table yet: materialise samples before importing labels")
    status = storage.read("samples", columns=["uid", "status", "sha256"])
    with storage.locked(LABELS):  # the round number is read and taken in one step across processes
        report = labels_core.validate_rows(rows, cfg.names, status, existing=read_label_history(storage),
                                           default_source=default_source, default_annotator=default_annotator,
                                           default_round=default_round)
        if report.ok or skip_invalid:
            report.written = storage.append(LABELS, report.accepted)
    return report


# ---------------------------------------------------------------------------------- awaiting labels

MIN_LABELS_PER_CLASS = 2
"""The fewest positive and negative labels per category a classifier can be cross-validated on."""

AWAITING = "awaiting_labels"


def label_readiness(storage: DeltaStorage, cfg: SafetyConfig) -> pl.DataFrame:
    """Per category: the labelled positives and negatives in force (of embedded samples), how many more of
    each the classifier needs before it can train, and how many more positives the target recall needs
    before the threshold rule can show it. ``ready`` is true when the category can be trained."""
    current, stale = labels_in_force(storage)
    if current.height and storage.exists("image_embeddings"):
        embedded = (storage.scan("image_embeddings").select("uid")
                    .filter(pl.col("uid").is_in(current["uid"].unique().implode())).collect())
        current = current.join(embedded, on="uid", how="semi")
    rows = []
    for category in cfg.categories:
        part = current.filter(pl.col("category") == category.name)
        pos = int((part["label"] == 1).sum())
        neg = part.height - pos
        rows.append({"category": category.name, "positives": pos, "negatives": neg,
                     "positives_to_train": max(0, MIN_LABELS_PER_CLASS - pos),
                     "negatives_to_train": max(0, MIN_LABELS_PER_CLASS - neg),
                     "target_recall": category.target_recall,
                     "positives_for_target": max(0, category.required_positives - pos),
                     "stale_labels": int((stale["category"] == category.name).sum()) if stale.height else 0})
    table = pl.DataFrame(rows)
    return table.with_columns(ready=(pl.col("positives_to_train") == 0) & (pl.col("negatives_to_train") == 0))


def awaiting_message(readiness: pl.DataFrame) -> str:
    """One line per category that cannot be trained yet, and what to do next."""
    lines = []
    for r in readiness.filter(~pl.col("ready")).iter_rows(named=True):
        lines.append(f"{r['category']} has {r['positives']}+/{r['negatives']}- labels, needs "
                     f"{r['positives_to_train']}+ and {r['negatives_to_train']}- more to train, "
                     f"{r['positives_for_target']}+ more to show recall {r['target_recall']}")
    return "; ".join(lines)


NEXT_STEP = ("curate labels export-queue --root ROOT --out queue.csv, label it, then "
             "curate labels import queue.csv --root ROOT")


def awaiting_result(readiness: pl.DataFrame, what: str) -> dg.MaterializeResult:
    """The materialisation of a label-dependent asset while labels are missing: nothing is written, the run
    succeeds, and the UI shows why and what to do."""
    return dg.MaterializeResult(metadata={
        "status": dg.MetadataValue.text(AWAITING),
        "awaiting": dg.MetadataValue.text(f"{what} waits for labels: " + (awaiting_message(readiness)
                                                                          or "the classifiers have not been trained")),
        "labels_needed": dg.MetadataValue.md(markdown_table(readiness)),
        "next_step": dg.MetadataValue.text(NEXT_STEP),
    })


def classifiers_trained(storage: DeltaStorage) -> bool:
    return latest_version(classifier_root(storage)) is not None


# -------------------------------------------------------------------------------------- helpers


def _png(fig) -> str:
    return markdown_image(figure_png(fig))


def _figure(ncols: int, width: float = 4.2, height: float = 3.2):
    plt = pyplot()

    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
    return fig, axes[0]


def _embeddings_for(storage: DeltaStorage, uids: Sequence[str]) -> tuple[dict[str, int], np.ndarray, str | None]:
    """Embeddings of some uids: (uid -> row, float32 matrix, encoder name)."""
    from curation_assets.core.delta import matrix

    if not uids:
        return {}, np.zeros((0, 0), np.float32), None
    df = (storage.scan("image_embeddings").filter(pl.col("uid").is_in(list(uids)))
          .select("uid", "embedding", "encoder").collect().unique("uid", keep="first").sort("uid"))
    encoders = df["encoder"].unique().to_list()
    return {u: i for i, u in enumerate(df["uid"].to_list())}, matrix(df["embedding"]), (encoders[0] if encoders else None)


def _encoders(storage: DeltaStorage) -> list[str]:
    return sorted(storage.scan("image_embeddings").select(pl.col("encoder").unique()).collect()["encoder"].to_list())


def classifier_root(storage: DeltaStorage) -> Path:
    return storage.artifact_dir("safety_classifiers")


def load_classifiers(storage: DeltaStorage, version: str | None = None) -> tuple[list[LinearProbe], dict, Path]:
    """The probes, manifest and directory of one artefact version (default: the latest)."""
    root = classifier_root(storage)
    directory = root / version if version else latest_version(root)
    if directory is None or not (directory / "manifest.json").is_file():
        raise FileNotFoundError(f"no safety classifiers under {root}: materialise safety_classifiers first")
    probes, manifest = load_bank(directory)
    return probes, manifest, directory


def load_oof(directory: Path) -> pl.DataFrame:
    """Held-out (out-of-fold) scores of the labelled samples stored with a classifier version."""
    return pl.read_parquet(directory / "cv_scores.parquet")


def _pr_plot(results: dict[str, tuple[CrossValidation, float]]) -> str:
    from sklearn.metrics import precision_recall_curve

    fig, axes = _figure(len(results))
    for ax, (name, (cv, target)) in zip(axes, results.items()):
        precision, recall, _ = precision_recall_curve(cv.labels, cv.oof_scores)
        ax.plot(recall, precision, lw=1.5)
        ax.axvline(target, color="red", ls="--", lw=1, label=f"target recall {target}")
        ax.set_xlabel("recall (held-out)")
        ax.set_ylabel("precision")
        ax.set_title(f"{name}: AUC {cv.auc:.3f}, AP {cv.average_precision:.3f}")
        ax.set_ylim(0, 1.02)
        ax.legend(loc="lower left", fontsize=8)
    return _png(fig)


# --------------------------------------------------------------------------------- classifiers


def _record_round(storage: DeltaStorage, rows: list[dict]) -> pl.DataFrame:
    """Replace this round's per-category rows of ``active_learning_rounds`` (one row per round and category);
    a predicate overwrite, so rounds recorded by other runs at the same time are never lost."""
    fresh = pl.DataFrame(rows)
    storage.replace_where(ROUNDS, fresh, "round", int(fresh["round"][0]))
    return storage.read(ROUNDS).sort(["category", "round"])


@dg.asset(
    group_name=GROUP,
    deps=[LABELS, dg.AssetDep("image_embeddings", partition_mapping=ALL_SHARDS)],
    kinds={"scikitlearn", "numpy"},
)
def safety_classifiers(context: dg.AssetExecutionContext, storage: DeltaStorage,
                       settings: CurationSettings) -> dg.MaterializeResult:
    """One calibrated linear probe per safety category on the embeddings of its labelled samples.

    Stratified k-fold cross-validation gives held-out scores for every label (stored with the model and used
    by the thresholds and the labelling queue), the PR curve, AUC and precision at the target recall. Each
    materialisation writes a new artefact version (``.npz`` arrays + JSON, never pickle) and records the
    round's metrics in ``active_learning_rounds``.
    """
    cfg = safety_config(settings)
    readiness = label_readiness(storage, cfg)
    if not readiness["ready"].all():
        context.log.warning("awaiting labels: " + awaiting_message(readiness))
        return awaiting_result(readiness, "safety_classifiers")
    history = read_label_history(storage)
    current, stale = labels_in_force(storage)
    if stale.height:
        context.log.warning(f"{stale.height} labels are stale (the picture at their uid has changed since it was "
                            "labelled) and are not used; relabel those samples")
    index, X, encoder = _embeddings_for(storage, current["uid"].unique().to_list())
    missing = current.filter(~pl.col("uid").is_in(list(index)))
    if missing.height:
        context.log.warning(f"{missing.height} labels name samples without an embedding; they are not used")
    current = current.filter(pl.col("uid").is_in(list(index)))
    round_no = int(history["round"].max())
    version, directory = next_version(classifier_root(storage))
    probes, cv_frames, rounds, plots = [], [], [], {}
    previous = storage.read(ROUNDS) if storage.exists(ROUNDS) else None
    for category in cfg.categories:
        rows = current.filter(pl.col("category") == category.name)
        y = rows["label"].to_numpy().astype(np.int64)
        Xc = X[[index[u] for u in rows["uid"].to_list()]]
        try:
            probe, cv = train_probe(Xc, y, category.name, cfg.classifier)
        except ValueError as exc:
            raise dg.Failure(f"{exc}; label more samples of {category.name!r} (curate labels import)") from exc
        probes.append(probe)
        plots[category.name] = (cv, category.target_recall)
        random_mask = rows["source"].is_in(list(cfg.random_sources)).to_numpy()
        thr = recall_threshold(cv.oof_scores[y == 1], cv.oof_scores[y == 0], category.target_recall,
                               category.required_positives, cfg.confidence)
        eval_auc, eval_prec = math.nan, math.nan
        ry = y[random_mask]
        if ry.sum() >= 2 and (1 - ry).sum() >= 2:
            from sklearn.metrics import roc_auc_score

            eval_auc = float(roc_auc_score(ry, cv.oof_scores[random_mask]))
            eval_prec = precision_at_recall(cv.oof_scores[random_mask], ry, category.target_recall)
        before = 0
        if previous is not None:
            prior = previous.filter((pl.col("category") == category.name) & (pl.col("round") < round_no))
            before = int(prior.sort("round")["n_labels"][-1]) if prior.height else 0
        rounds.append({
            "round": round_no, "category": category.name, "n_labels": int(len(y)), "n_positive": int(y.sum()),
            "n_negative": int(len(y) - y.sum()), "labels_added": int(len(y)) - before, "folds": cv.folds,
            "cv_auc": cv.auc, "cv_average_precision": cv.average_precision,
            "precision_at_target": thr.precision, "threshold": thr.threshold, "target_recall": category.target_recall,
            "n_random": int(random_mask.sum()), "random_auc": eval_auc, "random_precision_at_target": eval_prec,
            "classifier_version": directory.name, "recorded_at": labels_core.utcnow(),
        })
        cv_frames.append(rows.select("uid", "category", "label", "source", "round")
                         .with_columns(pl.Series("cv_score", cv.oof_scores, dtype=pl.Float64)))
    samples_sha = storage.scan("samples").select("uid", "sha256").filter(
        pl.col("uid").is_in(current["uid"].unique().implode())).collect()
    manifest = {"version": directory.name, "created_at": labels_core.utcnow().isoformat(), "encoder": encoder,
                "label_round": round_no, "config": {"classifier": cfg.classifier.__dict__},
                "metrics": {r["category"]: {k: r[k] for k in ("n_positive", "n_negative", "cv_auc",
                                                               "precision_at_target", "threshold")} for r in rounds}}
    save_bank(directory, probes, manifest)
    pl.concat(cv_frames).join(samples_sha, on="uid", how="left").write_parquet(directory / "cv_scores.parquet")
    publish_latest(classifier_root(storage), directory.name)
    table = _record_round(storage, rounds)
    context.log.info(f"trained {len(probes)} classifiers ({directory.name}) on label round {round_no}")
    summary = pl.DataFrame(rounds).select("category", "n_positive", "n_negative", "cv_auc", "precision_at_target",
                                          "random_precision_at_target", "threshold")
    history_md = markdown_table(table.select("round", "category", "n_labels", "n_positive", "cv_auc",
                                        "precision_at_target", "random_precision_at_target"))
    return dg.MaterializeResult(metadata={
        "version": directory.name,
        "artifact_dir": dg.MetadataValue.path(str(directory)),
        "label_round": round_no,
        "encoder": encoder or "",
        "labels_used": dg.MetadataValue.json({r["category"]: {"positive": r["n_positive"], "negative": r["n_negative"]}
                                              for r in rounds}),
        "labels_without_embedding": missing.height,
        "stale_labels": stale.height,
        **{f"{r['category']}_cv_auc": dg.MetadataValue.float(float(r["cv_auc"])) for r in rounds},
        **{f"{r['category']}_precision_at_target": dg.MetadataValue.float(float(r["precision_at_target"]))
           for r in rounds},
        "metrics": dg.MetadataValue.md(markdown_table(summary)),
        "rounds": dg.MetadataValue.md(history_md),
        "pr_curves": dg.MetadataValue.md(_pr_plot(plots)),
    })


# -------------------------------------------------------------------------------- labelling queue


@dg.asset(
    group_name=GROUP,
    deps=["safety_classifiers", LABELS, dg.AssetDep("image_embeddings", partition_mapping=ALL_SHARDS)],
    kinds={"faiss", "delta"},
)
def labeling_queue(context: dg.AssetExecutionContext, storage: DeltaStorage,
                   settings: CurationSettings) -> dg.MaterializeResult:
    """The next labelling batch per category (active learning), for `curate labels export-queue`.

    Mixes (shares from config) the unlabelled images the current model flags at its high-recall threshold,
    the faiss nearest unlabelled neighbours of labelled positives that cross-validated models miss, and the
    images scored closest to the threshold; the batch holds no image twice and no near-duplicates. The round
    number is one past the latest label round; re-materialising replaces that round's queue.
    """
    from curation_assets.core.active_learning import QueueBuilder, missed_positives

    cfg = safety_config(settings)
    al = cfg.active_learning
    if not classifiers_trained(storage):
        return _first_queue(context, storage, cfg)
    probes, manifest, directory = load_classifiers(storage)
    bank = ProbeBank(probes)
    oof = load_oof(directory)
    current = labels_in_force(storage)[0]
    history = read_label_history(storage)
    round_no = int(history["round"].max()) + 1 if history.height else 1
    quotas = al.quotas()
    builders: dict[str, QueueBuilder] = {}
    labelled: dict[str, set[str]] = {}
    thresholds: dict[str, float] = {}
    for category in cfg.categories:
        rows = oof.filter(pl.col("category") == category.name)
        scores, y = rows["cv_score"].to_numpy(), rows["label"].to_numpy()
        thr = recall_threshold(scores[y == 1], scores[y == 0], category.target_recall, category.required_positives,
                               cfg.confidence)
        thresholds[category.name] = thr.threshold
        missed = missed_positives(scores, y, al.missed_below, al.max_missed_positives)
        query_uids = rows["uid"].gather(missed).to_list() if len(missed) else []
        qindex, QX, _ = _embeddings_for(storage, query_uids)
        builders[category.name] = QueueBuilder(
            thr.threshold, quotas, bank.dim,
            queries=QX[[qindex[u] for u in query_uids]] if query_uids else None,
            query_uids=query_uids, query_scores=scores[missed].tolist(), neighbors=al.neighbors_per_positive,
            oversample=al.candidate_oversample, seed=al.seed + round_no)
        labelled[category.name] = set(current.filter(pl.col("category") == category.name)["uid"].to_list())
        context.log.info(f"{category.name}: high-recall threshold {thr.threshold:.4f}, "
                         f"{len(query_uids)} missed labelled positives as neighbour queries")
    pool = 0
    for shard in storage.shards("image_embeddings"):
        ids, X = storage.load_embeddings([shard])
        if not len(ids):
            continue
        scores = bank.predict_proba(X)
        uids = np.asarray(ids["uid"].to_list(), dtype=object)
        pool += len(uids)
        for j, name in enumerate(bank.categories):
            free = np.fromiter((u not in labelled[name] for u in uids), dtype=bool, count=len(uids))
            builders[name].add(uids[free], X[free], scores[free, j])
    rows = []
    for name, builder in builders.items():
        for rank, item in enumerate(builder.select(al.batch_size, al.near_duplicate_cosine)):
            rows.append({"round": round_no, "category": name, "rank": rank, "uid": item.uid,
                         "shard": item.uid.split("/", 1)[0], "procedure": item.procedure, "score": item.score,
                         "threshold": thresholds[name], "why": item.why, "classifier_version": directory.name,
                         "created_at": labels_core.utcnow()})
    this_round = _write_queue(storage, rows, round_no)
    mix = this_round.group_by("category", "procedure").len().sort("category", "procedure")
    context.log.info(f"round {round_no}: queued {this_round.height} (uid, category) pairs from a pool of {pool}")
    return dg.MaterializeResult(metadata={
        **storage.table_metadata("labeling_queue", "safety-thresholds"),
        "round": round_no,
        "queued": this_round.height,
        "pool_size": pool,
        "classifier_version": directory.name,
        "mix": dg.MetadataValue.md(markdown_table(mix)),
        "thresholds": dg.MetadataValue.json({k: round(v, 6) for k, v in thresholds.items()}),
        "preview": dg.MetadataValue.md(markdown_table(this_round.head(20).select("category", "uid", "procedure", "score"))),
    })


QUEUE_SCHEMA = {"round": pl.Int32, "category": pl.String, "rank": pl.Int32, "uid": pl.String, "shard": pl.String,
                "procedure": pl.String, "score": pl.Float64, "threshold": pl.Float64, "why": pl.String,
                "classifier_version": pl.String, "created_at": pl.Datetime("us", "UTC")}


def _write_queue(storage: DeltaStorage, rows: list[dict], round_no: int) -> pl.DataFrame:
    """Replace exactly this round's queue (a predicate overwrite: queues of other rounds, written by other
    runs at the same time, are never lost)."""
    queue = pl.DataFrame(rows, schema=QUEUE_SCHEMA)
    storage.replace_where("labeling_queue", queue, "round", round_no)
    return queue


def _first_queue(context: dg.AssetExecutionContext, storage: DeltaStorage, cfg: SafetyConfig) -> dg.MaterializeResult:
    """The first labelling batch, before any classifier exists: a diverse sample over k-means regions of a
    bounded random sample of the embeddings (:func:`core.active_learning.diverse_sample`), so the first labels
    cover the data. Every image is queued for every category (one labelling pass answers all of them)."""
    from curation_assets.core.active_learning import diverse_sample

    al = cfg.active_learning
    current = labels_in_force(storage)[0]
    history = read_label_history(storage)
    round_no = int(history["round"].max()) + 1 if history.height else 1
    labelled = set(current["uid"].to_list())
    rng = np.random.default_rng(al.seed + round_no)
    shards = storage.shards("image_embeddings")
    counts = dict(storage.scan("image_embeddings").group_by("shard").agg(pl.len()).collect().iter_rows())
    total = sum(counts.values())
    budget = max(50 * al.batch_size, 5000)
    uids, blocks = [], []
    for shard in shards:
        ids, x = storage.load_embeddings([shard])
        free = ~ids["uid"].is_in(list(labelled)).to_numpy()
        take = np.flatnonzero(free)
        quota = int(np.ceil(budget * counts.get(shard, 0) / max(total, 1)))
        if len(take) > quota:
            take = np.sort(rng.choice(take, quota, replace=False))
        uids.extend(ids["uid"].gather(take).to_list())
        blocks.append(x[take])
    x = np.concatenate(blocks) if blocks else np.zeros((0, 1), np.float32)
    rows_idx, region = diverse_sample(x, al.batch_size, al.seed + round_no)
    now = labels_core.utcnow()
    rows = [{"round": round_no, "category": category.name, "rank": rank, "uid": uids[i], "shard": uids[i].split("/", 1)[0],
             "procedure": "diverse", "score": None, "threshold": None,
             "why": f"nearest to the centre of a k-means region holding {size} of {len(uids)} sampled images",
             "classifier_version": None, "created_at": now}
            for category in cfg.categories for rank, (i, size) in enumerate(zip(rows_idx.tolist(), region.tolist()))]
    queue = _write_queue(storage, rows, round_no)
    readiness = label_readiness(storage, cfg)
    context.log.info(f"round {round_no}: no classifier yet; queued {len(rows_idx)} diverse images for "
                     f"{len(cfg.categories)} categories from a sample of {len(uids)}")
    return dg.MaterializeResult(metadata={
        **storage.table_metadata("labeling_queue", "safety-thresholds"),
        "round": round_no, "queued": queue.height, "images": len(rows_idx), "pool_size": len(uids),
        "procedure": "diverse (no classifier yet)",
        "status": dg.MetadataValue.text(AWAITING),
        "labels_needed": dg.MetadataValue.md(markdown_table(readiness)),
        "next_step": dg.MetadataValue.text(NEXT_STEP),
        "table": dg.MetadataValue.path(str(storage.table_path("labeling_queue"))),
    })


def latest_queue(storage: DeltaStorage) -> pl.DataFrame:
    """The most recent round of ``labeling_queue``."""
    if not storage.exists("labeling_queue"):
        raise FileNotFoundError("no labeling_queue yet: materialise safety_classifiers and labeling_queue first")
    queue = storage.read("labeling_queue")
    return queue.filter(pl.col("round") == queue["round"].max()).sort("category", "rank")


# ------------------------------------------------------------------------------------- thresholds


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


# ------------------------------------------------------------------------------ scores and filter


SCORES_SCHEMA = {"uid": pl.String, "shard": pl.String, "category": pl.String, "score": pl.Float32,
                 "held_out": pl.Boolean, "threshold": pl.Float64, "flagged": pl.Boolean, "classifier_version": pl.String}


def _histograms(frames: dict[str, np.ndarray], thresholds: dict[str, float]) -> str:
    fig, axes = _figure(len(frames))
    for ax, (name, scores) in zip(axes, frames.items()):
        ax.hist(scores, bins=50, range=(0, 1), color="tab:blue", alpha=0.8)
        ax.axvline(thresholds[name], color="red", ls="--", lw=1, label=f"threshold {thresholds[name]:.3g}")
        ax.set_yscale("log")
        ax.set_title(f"{name}: {np.mean(scores >= thresholds[name]):.1%} flagged")
        ax.set_xlabel("calibrated score")
        ax.legend(fontsize=8)
    return _png(fig)


@shard_asset(
    group_name=GROUP,
    deps=["image_embeddings", "safety_classifiers", "safety_thresholds"],
    kinds={"numpy", "delta"},
)
def safety_scores(context: dg.AssetExecutionContext, storage: DeltaStorage,
                  settings: CurationSettings) -> dg.MaterializeResult:
    """Calibrated score of every embedded sample for every category, with the threshold it was judged by and
    whether it is flagged (score >= threshold). Long format: one row per (uid, category). The classifier
    version is the one the thresholds were chosen for; it is loaded once per step. Samples the classifier was
    trained on carry their cross-validated (held-out) score instead (``held_out`` true), the same kind of
    score the threshold was chosen on. Before the first thresholds exist it writes nothing and says it is
    awaiting labels."""
    if not storage.exists("safety_thresholds"):
        return awaiting_result(label_readiness(storage, safety_config(settings)), "safety_scores")
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
    total = 0
    for shard in partition_keys(context):
        ids, X = storage.load_embeddings([shard])
        encoders = ids["encoder"].unique().to_list()
        if manifest.get("encoder") and encoders and encoders != [manifest["encoder"]]:
            raise dg.Failure(f"shard {shard} embeddings come from {encoders}, classifiers {version} from "
                             f"{manifest['encoder']!r}: re-train on the current embeddings")
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
            ).select(list(SCORES_SCHEMA)).cast(SCORES_SCHEMA))
            all_scores[name].append(frames[-1]["score"].to_numpy())
        storage.write_shard("safety_scores", pl.concat(frames), shard)
        total += len(ids)
        context.log.info(f"shard {shard}: scored {len(ids)} samples")
    merged = {c: np.concatenate(v) if v else np.zeros(0) for c, v in all_scores.items()}
    rates = {c: float(np.mean(s >= thr[c])) if len(s) else 0.0 for c, s in merged.items()}
    return dg.MaterializeResult(metadata={
        **storage.table_metadata("safety_scores", "safety-thresholds"),
        "samples_scored": total,
        "classifier_version": version,
        **{f"{c}_flag_rate": dg.MetadataValue.float(r) for c, r in rates.items()},
        "score_histograms": dg.MetadataValue.md(_histograms(merged, thr)) if total else "no samples",
    })


FILTERED_SCHEMA = {"uid": pl.String, "shard": pl.String, "kept": pl.Boolean, "reasons": pl.List(pl.String)}


def filter_shard(samples: pl.DataFrame, scores: pl.DataFrame, current: pl.DataFrame, categories: Sequence[str],
                 trust_negative_labels: bool = False) -> pl.DataFrame:
    """The filter decision for one shard's samples: every row of ``samples`` exactly once.

    Reasons: "rejected" (failed ingest), "no_embedding" (ok but never scored), and each category whose
    classifier flags the sample or whose latest human label is positive. A human negative label clears the
    classifier's flag only with ``trust_negative_labels``. A sample is kept when it has no reason.
    """
    base = samples.select("uid", "shard", "status")
    flagged = (scores.filter(pl.col("category").is_in(list(categories)))
               .select("uid", "category", "flagged"))
    labelled = current.filter(pl.col("category").is_in(list(categories))).select("uid", "category", "label")
    decisions = flagged.join(labelled, on=["uid", "category"], how="full", coalesce=True)
    positive = pl.col("flagged").fill_null(False) | (pl.col("label") == 1).fill_null(False)
    if trust_negative_labels:
        positive = pl.when(pl.col("label").is_not_null()).then(pl.col("label") == 1).otherwise(
            pl.col("flagged").fill_null(False))
    reasons = (decisions.filter(positive).sort("category")
               .group_by("uid").agg(pl.col("category").alias("category_reasons")))
    scored = scores.select("uid").unique()
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
    totals = {"samples": 0, "kept": 0}
    reason_counts: dict[str, int] = {}
    for shard in partition_keys(context):
        samples = storage.read("samples", [shard], columns=["uid", "shard", "status"])
        scores = storage.read("safety_scores", [shard], columns=["uid", "category", "flagged"])
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
    assets=[labels_asset, safety_classifiers, labeling_queue, safety_thresholds, safety_scores, filtered_samples],
    asset_checks=[safety_target_recall_reachable, safety_recall_lower_bound],
)
