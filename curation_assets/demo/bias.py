"""The demo's bias summary: the women/men caption ratio through the stages, and the same ratio counted from
the ground truth's gender labels."""

from __future__ import annotations

import math
from pathlib import Path

import polars as pl

from curation_assets.bias import WEIGHTS, read_overall
from curation_assets.core.demographics import STAGES
from resources.storage import DeltaStorage

def config(corpus_dir: Path) -> dict:
    """The demo uses the shipped defaults."""
    return {}


def summary(storage: DeltaStorage, corpus_dir: Path) -> list[str]:
    """Women/men ratio raw, filtered and filtered + reweighted (overall, with intervals) and whether the
    acceptance holds: filtering shifts it by more than 5%, reweighting brings it back within 3% of raw."""
    table = read_overall(storage)
    if table is None:
        return ["bias: overall_demographic_ratios not materialised"]
    table = table.filter(pl.col("source") == "caption")
    ratios = {r["stage"]: r for r in table.filter(pl.col("kind") == "ratio").iter_rows(named=True)
              if r["group"] == "women/men"}
    lines = ["bias: women/men caption ratio (overall, 95% log-method interval)"]
    for stage in STAGES:
        if stage in ratios:
            r = ratios[stage]
            change = f"{100 * r['change_vs_raw']:+.1f}% vs raw" if r["change_vs_raw"] is not None else ""
            lines.append(f"  {stage:<20} {r['value']:.3f} [{r['low']:.3f}, {r['high']:.3f}] {change}")
    if "raw" in ratios and "filtered" in ratios and "filtered_reweighted" in ratios:
        shift = abs(ratios["filtered"]["change_vs_raw"])
        back = abs(ratios["filtered_reweighted"]["change_vs_raw"])
        lines.append(f"  filtering shifts the ratio by {100 * shift:.1f}% (> 5%: {'yes' if shift > 0.05 else 'NO'}); "
                     f"reweighting leaves {100 * back:.1f}% (within 3%: {'yes' if back <= 0.03 else 'NO'})")
    if "training_set_weighted" in ratios:
        r = ratios["training_set_weighted"]
        lines.append(f"  the final training set, as trained on (weighted): {r['value']:.3f} [{r['low']:.3f}, "
                     f"{r['high']:.3f}], {100 * r['change_vs_raw']:+.1f}% vs raw")
    keywords = table.filter((pl.col("kind") == "keyword") & pl.col("stage").is_in(["filtered", "filtered_reweighted"]))
    if keywords.height:
        lines.append("  keyword change vs raw (filtered | filtered+reweighted):")
        pivot = {}
        for r in keywords.iter_rows(named=True):
            pivot.setdefault(r["group"], {})[r["stage"]] = r["change_vs_raw"]
        for word, changes in sorted(pivot.items()):
            f, fr = changes.get("filtered"), changes.get("filtered_reweighted")
            if f is None or not math.isfinite(f):
                continue
            lines.append(f"    {word:<12} {100 * f:+6.1f}% | " + (f"{100 * fr:+6.1f}%" if fr is not None and math.isfinite(fr) else "-"))
    truth_path = Path(corpus_dir) / "ground_truth.parquet"
    if truth_path.is_file() and storage.exists("filtered_samples"):
        truth = pl.read_parquet(truth_path)
        if "gender" in truth.columns:
            kept = storage.read("filtered_samples", columns=["uid", "kept"])
            t = truth.join(kept, on="uid", how="inner")
            def wm(df):
                w, m = (df["gender"] == "women").sum(), (df["gender"] == "men").sum()
                return w / m if m else float("nan")
            line = (f"  ground truth, captions naming only women / only men: raw {wm(t):.3f}, "
                    f"filtered {wm(t.filter(pl.col('kept'))):.3f}")
            if storage.exists(WEIGHTS):
                w = storage.read(WEIGHTS, columns=["uid", "weight"]).join(truth, on="uid")
                ww = w.filter(pl.col("gender") == "women")["weight"].sum()
                wmn = w.filter(pl.col("gender") == "men")["weight"].sum()
                line += f", filtered+reweighted {ww / wmn:.3f}" if wmn else ""
            lines.append(line)
    return lines
