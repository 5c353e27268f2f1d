"""The safety stage: classifiers from few labels and the active learning that improves them.

The first DALL·E 2 pre-training mitigation. Per configured category (violence and sexual by default):

- ``safety_classifiers``: a calibrated linear probe on the image embeddings of the labelled samples, with
  k-fold cross-validation; a new versioned artefact per materialisation; every materialisation records an
  active-learning round (labels used, CV AUC, precision at the target recall) in ``active_learning_rounds``.
- ``labeling_queue``: the next batch to label, from the model's flags at its high-recall threshold, the
  nearest unlabelled neighbours of positives the CV models miss, and the most uncertain samples.

The labels they learn from are in ``safety_labels.py``; the thresholds, scores and the filtered set in
``safety_filter.py``.
"""


import math
from pathlib import Path
from typing import Sequence

import dagster as dg
import numpy as np
import polars as pl

from curation_assets.core import labels as labels_core
from curation_assets.core.plots import figure_markdown, figure_row
from curation_assets.core.plots import markdown_table
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
from curation_assets.safety_labels import (AWAITING, GROUP, LABELS, NEXT_STEP, awaiting_message, awaiting_result,
                                           label_readiness, labels_in_force, read_label_history, safety_config)
from resources.settings import CurationSettings
from resources.storage import DeltaStorage
from curation_assets.core.safety import Category, PRIORS

ROUNDS = "active_learning_rounds"
ALL_SHARDS = dg.AllPartitionMapping()


def classifiers_trained(storage: DeltaStorage) -> bool:
    return latest_version(classifier_root(storage)) is not None


# -------------------------------------------------------------------------------------- helpers


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
    return pl.read_parquet((directory / "cv_scores.parquet").read_bytes())


def _pr_plot(results: dict[str, tuple[CrossValidation, float]]) -> str:
    from sklearn.metrics import precision_recall_curve

    fig, axes = figure_row(len(results))
    for ax, (name, (cv, target)) in zip(axes, results.items()):
        precision, recall, _ = precision_recall_curve(cv.labels, cv.oof_scores)
        ax.plot(recall, precision, lw=1.5)
        ax.axvline(target, color="red", ls="--", lw=1, label=f"target recall {target}")
        ax.set_xlabel("recall (held-out)")
        ax.set_ylabel("precision")
        ax.set_title(f"{name}: AUC {cv.auc:.3f}, AP {cv.average_precision:.3f}")
        ax.set_ylim(0, 1.02)
        ax.legend(loc="lower left", fontsize=8)
    return figure_markdown(fig)


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
    with (directory / "cv_scores.parquet").open("wb") as handle:
        pl.concat(cv_frames).join(samples_sha, on="uid", how="left").write_parquet(handle)
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
    cover the data. Every image is queued for every category (one labelling pass answers all of them). A
    category with a pretrained prior also gets the images its prior scores highest and those at its decision
    boundary (:func:`prior_picks`), so the first batch holds positives even when they are rare."""
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
    rows = []
    for category in cfg.categories:
        picks = prior_picks(storage, category, labelled, al.batch_size // 4)
        diverse = [{"uid": uids[i], "procedure": "diverse", "score": None, "threshold": None,
                    "why": f"nearest to the centre of a k-means region holding {size} of {len(uids)} sampled images",
                    "classifier_version": None} for i, size in zip(rows_idx.tolist(), region.tolist())]
        taken = {p["uid"] for p in picks}
        for rank, pick in enumerate(picks + [d for d in diverse if d["uid"] not in taken]):
            rows.append({"round": round_no, "category": category.name, "rank": rank, "shard": pick["uid"].split("/", 1)[0],
                         "created_at": now, **pick})
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


def prior_picks(storage: DeltaStorage, category: Category, labelled: set[str], per_kind: int) -> list[dict]:
    """Queue rows from a category's pretrained prior (``image_attributes``): the ``per_kind`` unlabelled images
    it scores highest, then the ``per_kind`` nearest its 0.5 decision boundary. Empty without a prior or
    before ``image_attributes`` ran."""
    if not category.prior or per_kind <= 0 or not storage.exists("image_attributes"):
        return []
    column = PRIORS[category.prior]
    scored = (storage.scan("image_attributes").select("uid", column, "nsfw_model")
              .filter(pl.col(column).is_not_null() & ~pl.col("uid").is_in(list(labelled))))
    measured = scored.select(pl.len()).collect().item()
    top = scored.sort(column, "uid", descending=[True, False]).head(per_kind).collect()  # a top-k, not a full sort
    boundary = (scored.filter(~pl.col("uid").is_in(top["uid"].implode()))
                .with_columns((pl.col(column) - 0.5).abs().alias("_d")).sort("_d", "uid").head(per_kind)
                .drop("_d").collect())
    rows = []
    for kind, frame, why in (("prior_top", top, "among the highest"), ("prior_boundary", boundary, "nearest 0.5")):
        rows += [{"uid": r["uid"], "procedure": kind, "score": float(r[column]), "threshold": None,
                  "why": f"{category.prior} prior score {r[column]:.3f}, {why} of {measured} measured images",
                  "classifier_version": r["nsfw_model"]} for r in frame.iter_rows(named=True)]
    return rows


def latest_queue(storage: DeltaStorage) -> pl.DataFrame:
    """The most recent round of ``labeling_queue``."""
    if not storage.exists("labeling_queue"):
        raise FileNotFoundError("no labeling_queue yet: materialise safety_classifiers and labeling_queue first")
    queue = storage.read("labeling_queue")
    return queue.filter(pl.col("round") == queue["round"].max()).sort("category", "rank")


defs = dg.Definitions(assets=[safety_classifiers, labeling_queue])
