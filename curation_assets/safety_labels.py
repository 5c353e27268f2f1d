"""Labels for the safety classifiers: the ``labels`` log, the labels in force, imports, and readiness.

- ``labels`` (an external asset, append-only Delta log): human judgements imported with
  ``curate labels import``; the label in force for a (uid, category) is the latest, and a label whose image
  changed since it was given (its sha256) is stale.
- Until every category has at least :data:`MIN_LABELS_PER_CLASS` positives and negatives, the safety assets
  materialise an ``awaiting_labels`` state that says what to label next instead of failing.
"""


from typing import Sequence

import dagster as dg
import polars as pl

from curation_assets.core import labels as labels_core
from curation_assets.core.plots import markdown_table
from curation_assets.core.safety import (
    SafetyConfig,
)
from resources.settings import CurationSettings
from resources.storage import DeltaStorage


GROUP = "safety"


LABELS = "labels"


def safety_config(settings: CurationSettings) -> SafetyConfig:
    """The validated ``safety`` section (raises SafetyConfigError naming the bad key)."""
    return SafetyConfig.from_section(settings.section("safety"))


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


defs = dg.Definitions(assets=[labels_asset])
