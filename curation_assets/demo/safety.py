"""The demo's labeller and safety summary: a simulated annotator answering from ``ground_truth.parquet``
seeds the labels and answers every active-learning queue, and the final filter is measured against the
ground truth. The pipeline itself never reads the ground truth."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import polars as pl

from curation_assets.core import labels as labels_core
from curation_assets.core.safety import ProbeBank, SafetyConfig
from curation_assets.core.thresholds import precision_at_recall
from curation_assets.safety import ROUNDS, latest_queue, load_classifiers, load_oof
from curation_assets.safety_filter import read_thresholds
from curation_assets.safety_labels import LABELS, import_label_rows, read_label_history, safety_config
from resources.settings import CurationSettings
from resources.storage import DeltaStorage

@dataclass(frozen=True)
class AnnotatorSettings:
    """The simulated annotator. Label noise is asymmetric on purpose: at a 4% base rate even 0.5% false alarms
    would make ~10% of the positive labels wrong, and a 99%-recall threshold chosen on labelled positives must
    then catch those clean images too, i.e. flag nearly everything. The seed is up to ``seed_positives``
    positives and ``seed_negatives`` negatives per category from a random review of at most ``seed_pool``
    images: the demo corpus holds only ~160-180 positives per category (4%), so the seed starts small and
    active learning has to find the rest (the 0.99 target needs 100 labelled positives)."""

    annotator_miss_rate: float = 0.02
    annotator_false_alarm_rate: float = 0.0
    seed_positives: int = 20
    seed_negatives: int = 300
    seed_pool: int = 4000
    seed: int = 0


class SimulatedAnnotator:
    """Answers label requests from ``ground_truth.parquet``, calling a true positive clean with probability
    ``miss_rate`` and a clean image positive with probability ``false_alarm_rate`` (the demo's stand-in for
    human labellers; the pipeline itself never reads the ground truth)."""

    def __init__(self, truth: pl.DataFrame, miss_rate: float = 0.0, false_alarm_rate: float = 0.0, seed: int = 0):
        self.category = dict(zip(truth["uid"].to_list(), truth["category"].to_list()))
        self.miss_rate = miss_rate
        self.false_alarm_rate = false_alarm_rate
        self.rng = np.random.default_rng(seed)

    def label(self, uid: str, category: str) -> int:
        truth = int(self.category.get(uid) == category)
        flip = self.miss_rate if truth else self.false_alarm_rate
        return 1 - truth if self.rng.random() < flip else truth


def seed_labels(annotator: SimulatedAnnotator, ok_uids: Sequence[str], cfg: SafetyConfig,
                demo: AnnotatorSettings = AnnotatorSettings()) -> list[dict]:
    """The seed: per category the annotator reviews a random pool and keeps up to ``seed_positives`` of what
    it calls positive and ``seed_negatives`` of what it calls negative (fewer positives when the pool has
    fewer, as on a small corpus)."""
    rng = np.random.default_rng(demo.seed)
    rows = []
    now = labels_core.utcnow()
    for category in cfg.categories:
        pool = rng.permutation(np.asarray(ok_uids, dtype=object))[: demo.seed_pool]
        pos = neg = 0
        for uid in pool:
            answer = annotator.label(uid, category.name)
            if answer and pos < demo.seed_positives:
                pos += 1
            elif not answer and neg < demo.seed_negatives:
                neg += 1
            else:
                continue
            rows.append({"uid": uid, "category": category.name, "label": answer, "source": "seed",
                         "round": 0, "annotator": "simulated", "labeled_at": now.isoformat()})
            if pos >= demo.seed_positives and neg >= demo.seed_negatives:
                break
    return rows


def rounds_table(storage: DeltaStorage) -> pl.DataFrame:
    """``active_learning_rounds`` as read by people: per category and round, labels used and CV metrics."""
    return storage.read(ROUNDS).sort("category", "round")


def format_rounds(table: pl.DataFrame) -> list[str]:
    """The per-category, per-round table the demo prints. ``corpus_*`` columns are present only in the demo
    (measured against the ground truth)."""
    has_truth = "corpus_precision_at_target" in table.columns
    lines = ["safety active learning per category and round: labels used; cross-validated AUC and precision at "
             "the target recall on all labels and on the random seed labels only (a fixed distribution)"
             + ("; corpus = every embedded image scored by that round's model, measured against the ground truth"
                if has_truth else ""),
             f"  {'category':<10} {'round':>5} {'labels':>6} {'pos':>4} {'neg':>4} {'CV AUC':>7} {'CV P@t':>7} "
             f"{'seed P@t':>8}" + (f" {'corpus AUC':>10} {'corpus P@t':>10}" if has_truth else "")]
    for r in table.iter_rows(named=True):
        lines.append(f"  {r['category']:<10} {r['round']:>5} {r['n_labels']:>6} {r['n_positive']:>4} "
                     f"{r['n_negative']:>4} {r['cv_auc']:>7.4f} {r['precision_at_target']:>7.4f} "
                     f"{r['random_precision_at_target']:>8.4f}"
                     + (f" {r['corpus_auc']:>10.4f} {r['corpus_precision_at_target']:>10.4f}" if has_truth else ""))
    return lines


def corpus_metrics(storage: DeltaStorage, truth: pl.DataFrame, versions: Sequence[str],
                   targets: dict[str, float]) -> pl.DataFrame:
    """Demo only: each classifier version scored on every embedded image (held-out scores for the samples it
    was trained on, as the filter does) and measured against the ground truth: AUC, and precision at the
    highest threshold that removes the target share of the true positives."""
    from sklearn.metrics import roc_auc_score

    ids, X = storage.load_embeddings()
    category_of = dict(zip(truth["uid"].to_list(), truth["category"].to_list()))
    gt = np.array([category_of.get(u) for u in ids["uid"].to_list()], dtype=object)
    rows = []
    for version in versions:
        probes, _, directory = load_classifiers(storage, version)
        P = ProbeBank(probes).predict_proba(X)
        position = {u: i for i, u in enumerate(ids["uid"].to_list())}
        oof = load_oof(directory)
        for j, probe in enumerate(probes):
            scores = P[:, j].astype(np.float64)
            part = oof.filter(pl.col("category") == probe.category)
            at = [position[u] for u in part["uid"].to_list() if u in position]
            scores[at] = [s for u, s in zip(part["uid"].to_list(), part["cv_score"].to_list()) if u in position]
            y = gt == probe.category
            rows.append({"classifier_version": version, "category": probe.category,
                         "corpus_auc": float(roc_auc_score(y, scores)) if 0 < y.sum() < len(y) else math.nan,
                         "corpus_precision_at_target": precision_at_recall(scores, y, targets[probe.category])})
    return pl.DataFrame(rows)


SMALL_CORPUS = 1000
SMALL_CORPUS_OVERRIDES = {
    "categories": [{"name": "violence", "definition": "graphic violence (the demo's stand-in motif)", "target_recall": 0.9},
                   {"name": "sexual", "definition": "sexual content (the demo's stand-in motif)", "target_recall": 0.9}],
    "active_learning": {"batch_size": 15},
}
SMALL_CORPUS_ANNOTATOR = AnnotatorSettings(seed_positives=3, seed_negatives=60)


def is_small_corpus(corpus_dir: Path) -> bool:
    truth = Path(corpus_dir) / "ground_truth.parquet"
    return truth.is_file() and pl.scan_parquet(truth).select(pl.len()).collect().item() < SMALL_CORPUS


def annotator_settings(corpus_dir: Path) -> AnnotatorSettings:
    """The seed for the corpus: a smaller one below ``SMALL_CORPUS`` images (see :func:`config`)."""
    return SMALL_CORPUS_ANNOTATOR if is_small_corpus(corpus_dir) else AnnotatorSettings()


def config(corpus_dir: Path) -> dict:
    """Demo overrides: none for the demo corpus (4000 images, ~160 positives per category). A corpus under
    1000 images (the test corpus) holds ~15-20 positives per category, too few to resolve a 0.99 recall (that
    needs 100), so its target is 0.9 (10 positives) with a smaller seed and batch."""
    if is_small_corpus(corpus_dir):
        return SMALL_CORPUS_OVERRIDES
    return {}


def active_learning(materialize: Callable[[list[str]], object], storage: DeltaStorage,
                    settings: CurationSettings, corpus_dir: Path, rounds: int = 3,
                    annotator_config: AnnotatorSettings | None = None) -> list[str]:
    """Seed labels with the simulated annotator, run ``rounds`` active-learning rounds (train, queue, label,
    import), train once more and pick the thresholds; returns the per-category, per-round table to print
    (cross-validated metrics from the pipeline, corpus metrics measured here against the ground truth)."""
    cfg = safety_config(settings)
    truth = pl.read_parquet(Path(corpus_dir) / "ground_truth.parquet", columns=["uid", "category"])
    demo = annotator_config or annotator_settings(corpus_dir)
    annotator = SimulatedAnnotator(truth, demo.annotator_miss_rate, demo.annotator_false_alarm_rate, demo.seed)
    if not storage.exists(LABELS) or read_label_history(storage).height == 0:
        ok = storage.read("samples", columns=["uid", "status"]).filter(pl.col("status") == "ok").sort("uid")
        report = import_label_rows(storage, cfg, seed_labels(annotator, ok["uid"].to_list(), cfg, demo),
                                   default_annotator="simulated")
        if not report.ok:
            raise RuntimeError(f"seed labels failed validation:\n{report.summary()}")
    start = int(read_label_history(storage)["round"].max())
    for _ in range(rounds):
        materialize(["safety_classifiers", "labeling_queue"])
        queue = latest_queue(storage)
        answers = [{"uid": r["uid"], "category": r["category"], "label": annotator.label(r["uid"], r["category"]),
                    "source": f"queue:{r['procedure']}", "round": r["round"], "annotator": "simulated"}
                   for r in queue.iter_rows(named=True)]
        report = import_label_rows(storage, cfg, answers, default_annotator="simulated")
        if not report.ok:
            raise RuntimeError(f"queue labels failed validation:\n{report.summary()}")
    materialize(["safety_classifiers", "safety_thresholds"])
    table = rounds_table(storage).filter(pl.col("round") >= start)
    measured = corpus_metrics(storage, truth, table["classifier_version"].unique().to_list(),
                              {c.name: c.target_recall for c in cfg.categories})
    return format_rounds(table.join(measured, on=["classifier_version", "category"], how="left"))


def summary(storage: DeltaStorage, corpus_dir: Path) -> list[str]:
    """Final filter recall per category against the ground truth (target: the configured recall) and the
    share of clean images it removed."""
    from curation_assets.core.stats import wilson_interval

    truth = pl.read_parquet(Path(corpus_dir) / "ground_truth.parquet", columns=["uid", "category", "hard_negative"])
    filtered = storage.read("filtered_samples", columns=["uid", "kept", "reasons"])
    joined = filtered.join(truth, on="uid", how="left")
    thresholds = read_thresholds(storage) if storage.exists("safety_thresholds") else None
    targets = dict(zip(thresholds["category"], thresholds["target_recall"])) if thresholds is not None else {}
    lines = ["safety filter vs ground truth (recall = share of true positives removed; 'as category' = removed "
             "with that category among the reasons)"]
    categories = [c for c in joined["category"].drop_nulls().unique().sort().to_list()]
    for category in categories:
        pos = joined.filter(pl.col("category") == category)
        removed = int((~pos["kept"]).sum())
        as_category = int(pos["reasons"].list.contains(category).sum())
        ci = wilson_interval(removed, pos.height)
        target = targets.get(category, math.nan)
        verdict = "meets" if removed / pos.height >= target else "MISSES"
        lines.append(f"  {category:<10} recall {removed}/{pos.height} = {removed / pos.height:.4f} "
                     f"(95% CI {ci.low:.3f}-{ci.high:.3f}; as category {as_category / pos.height:.4f}) "
                     f"{verdict} target {target}")
    clean = joined.filter(pl.col("category").is_null() & ~pl.col("reasons").list.contains("rejected"))
    removed_clean = int((~clean["kept"]).sum())
    hard = clean.filter(pl.col("hard_negative").fill_null(False))
    lines.append(f"  clean images removed: {removed_clean}/{clean.height} = {removed_clean / max(clean.height, 1):.4f}"
                 f" (hard negatives: {int((~hard['kept']).sum())}/{hard.height})")
    return lines
