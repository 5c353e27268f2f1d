"""The demo's dedup summary: duplicate groups against the planted near-duplicates of the ground truth."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from resources.storage import DeltaStorage

def planted_pair_scores(groups: pl.DataFrame, truth: pl.DataFrame) -> dict[str, float]:
    """Pair precision / recall of the duplicate groups against planted groups. Pairs are all unordered pairs
    within a group (what removal acts on); planted members that were rejected at ingest (corrupt) are not
    counted, since they never reach the search."""
    def pair_set(df: pl.DataFrame, key: str) -> set[tuple[str, str]]:
        out: set[tuple[str, str]] = set()
        for members in df.group_by(key).agg(pl.col("uid").sort())["uid"].to_list():
            for i in range(len(members)):
                for j in range(i + 1, len(members)):
                    out.add((members[i], members[j]))
        return out

    predicted = pair_set(groups.select("uid", "group_id"), "group_id")
    planted = pair_set(truth.filter(pl.col("dup_group").is_not_null()).select("uid", "dup_group"), "dup_group")
    hit = len(predicted & planted)
    return {"planted_pairs": len(planted), "predicted_pairs": len(predicted), "true_positive_pairs": hit,
            "recall": hit / len(planted) if planted else float("nan"),
            "precision": hit / len(predicted) if predicted else float("nan")}


def summary(storage: DeltaStorage, corpus_dir: Path) -> list[str]:
    """Candidate / verified / rejected pair counts, how the near-miss clocks fared, planted near-duplicate pair
    recall and precision of the groups (built from verified pairs) against ground_truth.parquet, fraction
    removed, and the measured recall curve of the candidate search over 1..5 clusterings."""
    if not storage.exists("deduplicated_samples"):
        return ["dedup: deduplicated_samples not materialised"]
    truth = pl.read_parquet(Path(corpus_dir) / "ground_truth.parquet")
    embedded = storage.scan("image_embeddings").select("uid").collect()
    truth = truth.join(embedded, on="uid", how="semi")
    groups = storage.read("dedup_groups")
    s = planted_pair_scores(groups, truth)
    out = storage.read("deduplicated_samples")
    ok = out.filter(pl.col("status") != "rejected").height
    removed = int((out["status"] == "duplicate").sum())
    pairs = storage.read("duplicate_pairs", columns=["uid_a", "uid_b", "verified"])
    near = (truth.filter(pl.col("near_miss_of").is_not_null()).select("uid", "near_miss_of")
            if "near_miss_of" in truth.columns else pl.DataFrame(schema={"uid": pl.String, "near_miss_of": pl.String}))
    near = near.select(pl.min_horizontal("uid", "near_miss_of").alias("uid_a"),
                       pl.max_horizontal("uid", "near_miss_of").alias("uid_b"))
    near_cand = pairs.join(near, on=["uid_a", "uid_b"], how="semi")
    lines = [
        f"candidate pairs (embedding search): {pairs.height}, verified on pixels: {int(pairs['verified'].sum())}, "
        f"rejected: {pairs.height - int(pairs['verified'].sum())}",
        f"near-miss clocks (same clock, other time): {near.height} pairs, {near_cand.height} candidates, "
        f"{int(near_cand['verified'].sum())} verified",
        f"planted duplicate pairs: {s['planted_pairs']}, predicted pairs: {s['predicted_pairs']}",
        f"pair recall {s['recall']:.4f} (required >= 0.95) {'OK' if s['recall'] >= 0.95 else 'BELOW'}; "
        f"pair precision {s['precision']:.4f} (required >= 0.98) {'OK' if s['precision'] >= 0.98 else 'BELOW'}",
        f"removed as duplicates: {removed} of {ok} embedded samples ({removed / ok if ok else 0:.1%})",
    ]
    if storage.exists("dedup_recall"):
        rec = storage.read("dedup_recall").sort("clusterings")
        curve = ", ".join(f"{c}: {r:.3f}" for c, r in zip(rec["clusterings"], rec["recall"]))
        lines.append(f"measured recall vs exact search ({rec['true_pairs'][0]} pairs, threshold "
                     f"{rec['threshold'][0]:.3f}) by clusterings used: {curve}")
    return lines
