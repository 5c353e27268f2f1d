"""The demo's audits: its own "model outputs" to audit, and the regurgitation audit measured against the
planted copies of ``generated_truth.parquet``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from curation_assets.core import regurgitation as rg
from curation_assets.core import report as rpt
from curation_assets.demo.safety import is_small_corpus
from resources.storage import DeltaStorage

SMALL_CORPUS_ATTRIBUTES = {"sample_per_shard": 40}
"""The test-sized corpus measures 40 images per shard with the image models: its people are drawn (the models
find no faces), so more would only cost time."""


def config(corpus_dir: Path) -> dict:
    """The demo audits its own "model outputs": generated/ beside the shards (40% perturbed copies)."""
    section: dict = {"regurgitation": {"generated": str(Path(corpus_dir) / "generated")}}
    if is_small_corpus(corpus_dir):
        section["attributes"] = dict(SMALL_CORPUS_ATTRIBUTES)
    return section


def summary(storage: DeltaStorage, corpus_dir: Path) -> list[str]:
    """Regurgitation recall on the planted copies and flag rate on novel images, against generated_truth."""
    truth_path = Path(corpus_dir) / "generated_truth.parquet"
    table = storage.read_if_exists("regurgitation_audit")
    lines = [f"report: {storage.reports_dir() / rpt.REPORT_PAGE}"]
    if table is None or not truth_path.is_file():
        return lines + ["regurgitation audit: not run or no generated_truth.parquet"]
    truth = pl.read_parquet(truth_path)
    for reference in table["reference"].unique(maintain_order=True).to_list():
        per_image = rg.flagged_per_image(table, reference)
        joined = truth.join(per_image, left_on="uid", right_on="generated_id", how="left").with_columns(
            pl.col("flagged").fill_null(False))
        copies = joined.filter(pl.col("kind") == "copy")
        novel = joined.filter(pl.col("kind") == "novel")
        found = copies.filter(pl.col("flagged"))
        recall = copies["flagged"].mean() if copies.height else float("nan")
        source_hit = (found["train_uid"] == found["source_uid"]).mean() if found.height else float("nan")
        group_hit = float("nan")
        if found.height and (Path(corpus_dir) / "ground_truth.parquet").is_file():
            group = dict(pl.read_parquet(Path(corpus_dir) / "ground_truth.parquet").select("uid", "dup_group").iter_rows())
            group_hit = float(np.mean([t == s or (group.get(s) is not None and group.get(t) == group.get(s))
                                       for t, s in found.select("train_uid", "source_uid").iter_rows()]))
        fpr = novel["flagged"].mean() if novel.height else float("nan")
        lines.append(f"regurgitation ({reference} set): recall on {copies.height} planted copies {recall:.3f} (required >= 0.95), "
                     f"matched training image = true source for {source_hit:.3f} of them "
                     f"(the source or one of its planted near-duplicates: {group_hit:.3f}); "
                     f"flag rate on {novel.height} novel images {fpr:.3f} (required <= 0.01)")
    return lines
